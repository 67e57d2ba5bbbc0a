"""`/docs`: one self-contained HTML page built from the OpenAPI document (no CDN, no script):
every operation by service with its scopes, parameters, body and response schemas, and every
schema with its properties, linked to each other."""

from __future__ import annotations

from html import escape
from typing import Any

from services.gateway.openapi import REF

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em 2em;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
details{border:1px solid #e3e3e3;border-radius:4px;margin:.3em 0;padding:.3em .6em}
summary{cursor:pointer} code{background:#f4f4f4;padding:0 .25em;border-radius:3px}
.m{display:inline-block;width:4.5em;font-weight:600;font-family:monospace}
.GET{color:#1565c0}.POST{color:#2e7d32}.PATCH{color:#ef6c00}.PUT{color:#6a1b9a}.DELETE{color:#c62828}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #e3e3e3;padding:.15em .5em;text-align:left;
vertical-align:top}.muted{color:#777}
"""


def render_docs(spec: dict[str, Any]) -> str:
    info = spec["info"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{escape(info['title'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(info['title'])} <span class=muted>{escape(info['version'])}</span></h1>",
        f"<p>{escape(info['description'])}</p>",
        "<p>Machine-readable: <a href=\"/openapi.json\"><code>/openapi.json</code></a> (OpenAPI 3.1). "
        "Authenticate with <code>Authorization: Bearer &lt;token&gt;</code>.</p>",
    ]
    for tag in spec.get("tags", []):
        parts.append(f"<h2 id=\"{escape(tag['name'])}\">{escape(tag['name'])} "
                     f"<span class=muted>{escape(tag['description'])}</span></h2>")
        for path, method, operation in _operations(spec, tag["name"]):
            parts.append(_operation_html(path, method, operation))
    parts.append("<h2 id=schemas>Schemas</h2>")
    for name, schema in spec["components"]["schemas"].items():
        parts.append(_schema_html(name, schema))
    parts.append("</body></html>")
    return "\n".join(parts)


def _operations(spec: dict[str, Any], tag: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method.upper(), operation) for path, item in spec["paths"].items()
            for method, operation in item.items() if tag in operation.get("tags", ())]


def _operation_html(path: str, method: str, operation: dict[str, Any]) -> str:
    scopes = ", ".join(operation.get("x-loyalty-scopes", [])) or "public"
    rows = "".join(
        f"<tr><td><code>{escape(p['name'])}</code></td><td>{p['in']}</td><td>{_type(p['schema'])}</td></tr>"
        for p in operation.get("parameters", []))
    body = operation.get("requestBody", {}).get("content", {})
    ok = operation["responses"]["200"].get("content", {})
    sections = [f"<p>{escape(operation.get('description', ''))}</p>"]
    if rows:
        sections.append(f"<table><tr><th>parameter</th><th>in</th><th>type</th></tr>{rows}</table>")
    for media, content in body.items():
        sections.append(f"<p>Request body ({escape(media)}): {_type(content['schema'])}</p>")
    for media, content in ok.items():
        sections.append(f"<p>Response 200 ({escape(media)}): {_type(content['schema'])}</p>")
    sections.append("<p>Errors: <a href=\"#google.rpc.Status\">google.rpc.Status</a></p>")
    return (f"<details id=\"{escape(operation['operationId'])}\"><summary><span class=\"m {method}\">{method}</span>"
            f"<code>{escape(path)}</code> — {escape(operation['operationId'])} "
            f"<span class=muted>[{escape(scopes)}]</span></summary>{''.join(sections)}</details>")


def _schema_html(name: str, schema: dict[str, Any]) -> str:
    if "enum" in schema:
        values = ", ".join(f"<code>{escape(v)}</code>" for v in schema["enum"])
        return f"<details id=\"{escape(name)}\"><summary>{escape(name)} (enum)</summary><p>{values}</p></details>"
    rows = "".join(f"<tr><td><code>{escape(prop)}</code></td><td>{_type(sub)}</td><td>{_rules(sub)}</td></tr>"
                   for prop, sub in schema.get("properties", {}).items())
    note = f"<p>{escape(schema['description'])}</p>" if "description" in schema else ""
    return (f"<details id=\"{escape(name)}\"><summary>{escape(name)}</summary>{note}"
            f"<table><tr><th>field</th><th>type</th><th>rules</th></tr>{rows}</table></details>")


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(REF)
        return f"<a href=\"#{escape(name)}\">{escape(name)}</a>"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of {_type(schema['additionalProperties'])}"
    if kind == "object" and "properties" in schema:
        inner = ", ".join(f"{escape(k)}: {_type(v)}" for k, v in schema["properties"].items())
        return f"object {{{inner}}}"
    fmt = f" ({escape(schema['format'])})" if "format" in schema else ""
    return escape(str(kind)) + fmt


def _rules(schema: dict[str, Any]) -> str:
    rules = schema.get("x-loyalty-rules")
    if not rules:
        return ""
    return escape(", ".join(f"{k}={v}" for k, v in rules.items()))
