"""What gateway tests read from a google.rpc.Status JSON body."""

from __future__ import annotations

from typing import Any


def reason(status: dict[str, Any]) -> str | None:
    """The ErrorInfo reason."""
    return next((d["reason"] for d in status["details"] if d["@type"].endswith("google.rpc.ErrorInfo")), None)


def violations(status: dict[str, Any]) -> dict[str, str]:
    """BadRequest field violations: {field: description}."""
    return {v["field"]: v["description"] for d in status["details"] if d["@type"].endswith("google.rpc.BadRequest")
            for v in d["fieldViolations"]}
