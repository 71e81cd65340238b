"""One module per `sqllava-jax` sub-command; each defines `add_arguments(parser)` and `run(args)`."""
