"""Logging of a run (configured by Hydra's job logging, conf/*.yaml): messages on stdout, warnings
and errors on stderr, everything in the run's log file."""

import logging
from contextlib import contextmanager

from tqdm import tqdm


class BelowWarning(logging.Filter):
    """Lets through records below WARNING: the stdout handler's half of the stdout/stderr split."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class _ThroughTqdm:
    """A console handler's emit that writes with tqdm.write, to the handler's own stream."""

    def __init__(self, handler: logging.StreamHandler):
        self.handler = handler

    def __call__(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.handler.format(record), file=self.handler.stream)
        except Exception:  # logging's own convention: a failed emit reports itself, never raises
            self.handler.handleError(record)


@contextmanager
def console_through_tqdm():
    """While a tqdm bar runs: console log records are written with tqdm.write (the bar is redrawn
    below them), each by its own handler, so the stdout/stderr split, the handlers' levels and
    filters all stay (tqdm's logging_redirect_tqdm merges the console handlers into one: warnings
    then vanished from the console of rank 0, and the INFO lines of torchrun's quiet ranks
    appeared)."""
    handlers = [
        h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler
    ]  # not files
    for handler in handlers:
        handler.emit = _ThroughTqdm(handler)
    try:
        yield
    finally:
        for handler in handlers:
            del handler.emit
