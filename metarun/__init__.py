"""metarun: a command-line experiment runner for MAML-family meta-learning."""

__version__ = "0.1.0"  # the one place it is written (pyproject.toml reads it)
