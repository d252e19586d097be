"""MkDocs hook: pages generated from the code at build time, never written by hand twice.

- `<!-- generated: settings train -->` and `<!-- generated: settings eval -->` become the tables
  that `metarun.settings.settings_markdown("train" | "eval")` returns (every setting with its
  default and meaning, from the settings schema).
- `<!-- generated: state -->` becomes a mkdocstrings block `::: metarun.runner.state` (the
  versioned checkpoint and results.json schema).

Until those modules exist on this branch, each marker becomes a one-line placeholder, clearly
marked, ONLY on the ImportError of that very module (any other error fails the build). The
fallbacks are temporary: remove them when metarun.settings and metarun.runner.state have landed.
"""

from __future__ import annotations

import importlib
import re

MARKER = re.compile(r"<!-- generated: (settings (train|eval)|state) -->")

PLACEHOLDER = (
    '!!! warning "Placeholder (build fallback)"\n'
    "    {what} is not on this branch yet (ImportError: {error}); this page is generated from it "
    "once it lands.\n"
)


def settings_table(app: str) -> str:
    """`metarun train` or `metarun eval` settings as Markdown (a placeholder on ImportError)."""
    try:
        settings = importlib.import_module("metarun.settings")
    except ImportError as error:  # TEMPORARY fallback: remove when metarun.settings has landed
        if error.name != "metarun.settings":
            raise  # the module exists and is broken: fail the build
        return PLACEHOLDER.format(what="`metarun.settings.settings_markdown`", error=error)
    return settings.settings_markdown(app)


def state_block() -> str:
    """A mkdocstrings block of metarun.runner.state (a placeholder on ImportError)."""
    try:
        importlib.import_module("metarun.runner.state")
    except ImportError as error:  # TEMPORARY fallback: remove when metarun.runner.state has landed
        if error.name != "metarun.runner.state":
            raise  # the module exists and is broken: fail the build
        return PLACEHOLDER.format(what="`metarun.runner.state`", error=error)
    return "::: metarun.runner.state\n"


def replace(match: re.Match) -> str:
    if match.group(1) == "state":
        return state_block()
    return settings_table(match.group(2))


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs event: replace the generated-content markers of any page."""
    return MARKER.sub(replace, markdown)
