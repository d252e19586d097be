"""metarun/runner/logs.py: the console during a progress bar."""

import sys


def test_console_logging_keeps_its_split_and_levels_while_the_bar_runs(capsys):
    """During training (a tqdm bar) INFO goes to stdout, warnings to stderr, and a quiet handler
    (torchrun's other ranks: warnings only) stays quiet; tqdm's logging_redirect_tqdm merged them
    into one handler."""
    import logging

    from metarun.runner.logs import BelowWarning, console_through_tqdm

    root, saved = logging.getLogger(), (logging.getLogger().handlers[:], logging.getLogger().level)
    # an earlier in-process run may have left the metarun logger with a level or its own handlers
    own = logging.getLogger("metarun")
    own_saved = (own.handlers[:], own.level, own.propagate, own.disabled)
    own.handlers, own.propagate, own.disabled = [], True, False
    own.setLevel(logging.NOTSET)
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(BelowWarning())
    err.setLevel(logging.WARNING)
    root.handlers = [out, err]
    root.setLevel(logging.INFO)  # setLevel, not .level =: it clears the loggers' level caches
    try:
        with console_through_tqdm():
            logging.getLogger("metarun").info("an info line")
            logging.getLogger("metarun").warning("a warning line")
        logging.getLogger("metarun").info("after the bar")
    finally:
        root.handlers = saved[0]
        root.setLevel(saved[1])
        own.handlers, _, own.propagate, own.disabled = own_saved
        own.setLevel(own_saved[1])
    captured = capsys.readouterr()
    assert captured.out == "an info line\nafter the bar\n" and captured.err == "a warning line\n"
    assert out.emit.__func__ is logging.StreamHandler.emit  # restored
