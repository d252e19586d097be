"""MkDocs hook: pages generated from the code at build time, never written by hand twice.

- `<!-- generated: settings train -->` and `<!-- generated: settings eval -->` become the tables
  that `metarun.settings.settings_markdown("train" | "eval")` returns (every setting with its
  default and meaning, from the settings schema).
- `<!-- generated: state -->` becomes a mkdocstrings block `::: metarun.runner.state` (the
  versioned checkpoint and results.json schema).

An error in either module fails the build (`mkdocs build --strict` in CI).
"""

from __future__ import annotations

import importlib
import re

MARKER = re.compile(r"<!-- generated: (settings (train|eval)|state) -->")


def settings_table(app: str) -> str:
    """`metarun train` or `metarun eval` settings as Markdown."""
    return importlib.import_module("metarun.settings").settings_markdown(app)


def state_block() -> str:
    """A mkdocstrings block of metarun.runner.state."""
    importlib.import_module("metarun.runner.state")  # a broken module fails the build
    return "::: metarun.runner.state\n"


def replace(match: re.Match) -> str:
    if match.group(1) == "state":
        return state_block()
    return settings_table(match.group(2))


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs event: replace the generated-content markers of any page."""
    return MARKER.sub(replace, markdown)
