"""The API reference in markdown, generated from Relay's OpenAPI document (service.web.app).

As an mkdocs hook it replaces the line `<!-- openapi-reference -->` of docs/api.md at build time;
run as a script (`python docs/hooks/openapi_reference.py`) it prints the same markdown.
"""

from __future__ import annotations

import json
from typing import Any

from generated_section import fill_marker, from_repo

PAGE = "api.md"
MARKER = "<!-- openapi-reference -->"
SCHEME_NAMES = {"AdminToken": "admin token", "ApiKey": "API key", "SubscriberToken": "subscriber token"}


def load_document() -> dict[str, Any]:
    document: dict[str, Any] = from_repo("service.web.app", "openapi_document")()
    return document


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _schema_text(schema: dict[str, Any]) -> str:
    """A one-line reading of a parameter's schema: type, bounds, pattern or allowed values."""
    if "enum" in schema:
        return " \\| ".join(f"`{value}`" for value in schema["enum"])
    parts = [str(schema.get("type", "any"))]
    for key, label in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
    ):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "format" in schema:
        parts.append(schema["format"])
    if "pattern" in schema:
        parts.append(f"`{_cell(schema['pattern'])}`")
    return ", ".join(parts)


def _auth(spec: dict[str, Any]) -> str:
    names = [SCHEME_NAMES.get(name, name) for requirement in spec.get("security", []) for name in requirement]
    return " or ".join(names) if names else "none"


def _operation(method: str, path: str, spec: dict[str, Any]) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", "", spec["summary"] + ".", ""]
    if spec.get("description"):
        lines += [spec["description"], ""]
    lines += [f"**Authentication:** {_auth(spec)}.", ""]
    if spec.get("parameters"):
        lines += ["| parameter | in | required | schema | meaning |", "| --- | --- | --- | --- | --- |"]
        for param in spec["parameters"]:
            required = "yes" if param.get("required") else "no"
            lines.append(
                f"| `{param['name']}` | {param['in']} | {required} | {_schema_text(param['schema'])} "
                f"| {_cell(param.get('description', ''))} |"
            )
        lines.append("")
    body = spec.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body is not None:
        lines += ["Request body (JSON Schema):", "", "```json", json.dumps(body, indent=2), "```", ""]
    lines += ["| status | meaning |", "| --- | --- |"]
    for status, answer in sorted(spec["responses"].items()):
        lines.append(f"| {status} | {_cell(answer['description'])} |")
    return [*lines, ""]


def render(document: dict[str, Any] | None = None) -> str:
    """Every operation of the document, grouped by tag, as markdown."""
    document = document or load_document()
    by_tag: dict[str, list[str]] = {}
    for path, methods in document["paths"].items():
        for method, spec in methods.items():
            by_tag.setdefault(spec["tags"][0], []).extend(_operation(method, path, spec))
    lines = [f"_Generated from `/openapi.json` (OpenAPI {document['openapi']})._", ""]
    for tag, operations in by_tag.items():
        lines += [f"## {tag}", "", *operations]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return fill_marker(markdown, page, PAGE, MARKER, "the API reference", render)


if __name__ == "__main__":
    print(render())
