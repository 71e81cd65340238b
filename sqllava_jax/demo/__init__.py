"""`sqllava-jax demo`: the whole method on the synthetic shapes set, on a CPU, in minutes.

Stage configs are package data (`stage0.yaml`, `stage1.yaml`, `stage2.yaml` on top of
`model.yaml`), so the command works from any directory. `run.run_demo` is the entry point.
"""
