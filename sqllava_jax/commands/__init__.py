"""One module per `sqllava-jax` sub-command; each defines `add_arguments(parser)` and `run(args)`.

`cli.py` imports only the chosen command's module, so `sqllava-jax --help` stays fast. The
imports a few commands make inside `run` are deliberate too: `plan` sets JAX's device flags
before JAX starts, and `train`, `check-checkpoint` and `demo` keep training and orbax out of
their `--help`."""
