"""What the docs hooks share: reading from the repo's own copy of `service`, and putting the
markdown they generate where a page's marker line stands. (mkdocs puts this folder on sys.path
while it loads a hook, and so does Python when a hook runs as a script.)"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def from_repo(module: str, name: str) -> Any:
    """`module.name` from this checkout's `service`, not an installed copy."""
    sys.path.insert(0, str(ROOT))
    try:
        return getattr(importlib.import_module(module), name)
    finally:
        sys.path.remove(str(ROOT))


def fill_marker(
    markdown: str, page: Any, page_name: str, marker: str, what: str, render: Callable[[], str]
) -> str:
    """`markdown` with `marker` replaced by `render()` on `page_name`; other pages unchanged."""
    if page.file.src_uri != page_name:
        return markdown
    if marker not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{page_name} lost its {marker} line: {what} has nowhere to go")
    return markdown.replace(marker, render())
