"""Compile the test-only protos into a folder (with the product's common options on the path)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


def build_test_protos(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    files = [str(p.relative_to(HERE / "protos")) for p in (HERE / "protos").rglob("*.proto")]
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{HERE / 'protos'}", f"-I{REPO_ROOT / 'protos'}",
        f"-I{REPO_ROOT / 'third_party' / 'protos'}", f"-I{well_known}",
        f"--python_out={out}", f"--grpc_python_out={out}", *files,
    ])
    if rc != 0:
        raise RuntimeError("test proto compilation failed")
    return out
