"""mkdocs hook: the configuration page's tables, generated at build time from the settings table
in service/core/settings.py, so each default is written once (there).

Settings are grouped as in the `Settings` class: a comment line of its own (`# Webhook
ingestion`) heads the fields below it, up to the next such comment.
"""

from __future__ import annotations

import re
from typing import Any

from generated_section import ROOT, fill_marker, from_repo
from mkdocs.exceptions import PluginError

SOURCE = ROOT / "service" / "core" / "settings.py"
PAGE = "configuration.md"
MARKER = "<!-- settings-table -->"
HEADING = re.compile(r"^    # (?P<heading>.+)$")
FIELD = re.compile(r"^    (?P<attr>[a-z_][a-z0-9_]*): ")


def _cell(text: str) -> str:
    """Plain text in a table cell: no column break, no emphasis."""
    return text.replace("|", "\\|").replace("*", "\\*")


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def groups() -> dict[str, list[str]]:
    """The `Settings` fields under each heading comment of the class body, in order."""
    found: dict[str, list[str]] = {}
    heading = "Other"
    body = SOURCE.read_text().split("\nclass Settings:", 1)[1].split("\n\n\n", 1)[0]
    for line in body.splitlines():
        if match := HEADING.match(line):
            heading = match["heading"].strip()
        elif match := FIELD.match(line):
            found.setdefault(heading, []).append(match["attr"])
    return found


def settings_tables() -> str:
    """A heading and a table per group, one row per setting."""
    settings = from_repo("service.core.settings", "SETTINGS")  # service.core is pure: nothing else loads
    placed = {attr for attrs in groups().values() for attr in attrs}
    if missing := set(settings) - placed:
        raise PluginError(f"settings not found in the Settings class body: {sorted(missing)}")
    sections = []
    for heading, attrs in groups().items():
        rows = [
            f"### {heading}",
            "",
            "| variable | `relay serve` flag | meaning | default |",
            "| --- | --- | --- | --- |",
        ]
        for attr in (a for a in attrs if a in settings):
            row = settings[attr]
            names = " or ".join(f"`{name}`" for name in (row.variable, *row.aliases))
            meaning = _cell(row.help) + (" (secret: give it in the environment)" if row.secret else "")
            if row.unset:
                default = _cell(row.unset)
            elif row.default_text:
                default = _code(row.default_text)
            else:
                default = "none"
            rows.append(f"| {names} | `{row.flag}` | {meaning} | {default} |")
        if len(rows) > 4:
            sections.append("\n".join(rows))
    return "\n\n".join(sections)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return fill_marker(markdown, page, PAGE, MARKER, "the settings table", settings_tables)
