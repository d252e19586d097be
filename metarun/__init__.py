"""metarun: a command-line experiment runner for MAML-family meta-learning."""

__version__ = "0.2.0"  # the one place it is written (pyproject.toml reads it)
