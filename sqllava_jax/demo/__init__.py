"""`sqllava-jax demo`: the whole method on the synthetic shapes set, on a CPU, in minutes.

The demo is a client of the library: `synthetic.py` generates the shapes set and registers
it as the data source `synthetic` (`data.source: synthetic`), `tasks.py` registers its eval
tasks `synthetic_vqa` and `synthetic_sq`; `sqllava_jax.cli` and `data.pipeline` import them.
Stage configs are package data (`stage0.yaml`, `stage1.yaml`, `stage2.yaml` on top of
`model.yaml`), and so is the stage-0 base (`base/`, see `base.py`) that the default demo
starts stages 1 and 2 from, so the command works from any directory. `run.run_demo` is the
entry point; `report.py` writes what it shows.
"""
