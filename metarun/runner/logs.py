"""Logging of a run (configured by Hydra's job logging, conf/*.yaml): messages on stdout, warnings and
errors on stderr, everything in the run's log file."""
import logging


class BelowWarning(logging.Filter):
    """Lets through records below WARNING: the stdout handler's half of the stdout/stderr split."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING
