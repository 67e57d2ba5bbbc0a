"""Generate Python stubs (+ mypy .pyi) from protos/ into gen/, and fill third_party/protos for buf.

Run by `python3 dev.py up|test|gen` whenever the protos change; the output is never committed.
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
THIRD_PARTY = ROOT / "third_party" / "protos"
DESCRIPTOR_SET = GEN / "loyalty_descriptor_set.binpb"

# The google/api files our contracts import, copied from the pinned googleapis-common-protos wheel.
GOOGLE_API_FILES = ("annotations.proto", "http.proto", "field_behavior.proto")


def _googleapis_root() -> Path:
    import google.api

    return Path(next(iter(google.api.__path__))).parent.parent


def _fill_third_party() -> None:
    target = THIRD_PARTY / "google" / "api"
    target.mkdir(parents=True, exist_ok=True)
    source = _googleapis_root() / "google" / "api"
    for name in GOOGLE_API_FILES:
        shutil.copyfile(source / name, target / name)


def main() -> int:
    _fill_third_party()
    if GEN.exists():
        shutil.rmtree(GEN)
    GEN.mkdir()
    well_known = str(resources.files("grpc_tools") / "_proto")
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    if not files:
        print("no .proto files under protos/", file=sys.stderr)
        return 1
    mypy_plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    mypy_grpc_plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{THIRD_PARTY}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--python_out={GEN}",
        f"--grpc_python_out={GEN}",
        f"--mypy_out={GEN}",
        f"--mypy_grpc_out={GEN}",
        f"--descriptor_set_out={DESCRIPTOR_SET}",
        "--include_imports",
        "--include_source_info",
        *files,
    ]
    rc = protoc.main(args)
    if rc != 0:
        return int(rc)
    # Regular packages (not namespace packages) so mypy and importlib resolve them unambiguously.
    for directory in [GEN / "loyalty", *(p for p in (GEN / "loyalty").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (GEN / "loyalty" / "py.typed").touch()
    print(f"generated {len(files)} proto files into {GEN.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
