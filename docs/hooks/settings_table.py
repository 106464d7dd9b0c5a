"""mkdocs hook: the configuration page's table, generated at build time from the settings table
in service/core/settings.py, so each default is written once (there)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
PAGE = "configuration.md"
MARKER = "<!-- settings-table -->"


def _cell(text: str) -> str:
    """Plain text in a table cell: no column break, no emphasis."""
    return text.replace("|", "\\|").replace("*", "\\*")


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def settings_table() -> str:
    """One markdown row per setting, in the table's order."""
    sys.path.insert(0, str(ROOT))  # the repo's own copy; service.core is pure, nothing else is needed
    try:
        from service.core.settings import SETTINGS
    finally:
        sys.path.remove(str(ROOT))
    rows = ["| variable | `relay serve` flag | meaning | default |", "| --- | --- | --- | --- |"]
    for row in SETTINGS.values():
        names = " or ".join(f"`{name}`" for name in (row.variable, *row.aliases))
        meaning = _cell(row.help) + (" (secret: give it in the environment)" if row.secret else "")
        if row.unset:
            default = _cell(row.unset)
        elif row.default_text:
            default = _code(row.default_text)
        else:
            default = "none"
        rows.append(f"| {names} | `{row.flag}` | {meaning} | {default} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} lost its {MARKER} line: the settings table has nowhere to go")
    return markdown.replace(MARKER, settings_table())
