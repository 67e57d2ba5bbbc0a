#!/usr/bin/env python3
"""Bootstrap for the Loyalty suite: the README's two commands go through this file.

    python3 dev.py up      install what is missing, generate stubs, start everything, load demo data
    python3 dev.py test    install what is missing (Chromium too), then ruff, mypy, buf lint/breaking and pytest

It only uses the standard library, because it runs before anything is installed. Each step is
skipped when a stamp says its inputs have not changed, so a second run starts in seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
BUF = ROOT / "node_modules" / ".bin" / "buf"
GEN = ROOT / "gen"
THIRD_PARTY = ROOT / "third_party" / "protos"
PYTHON_VERSION_REQUIRED = (3, 11)


def _say(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def _run(cmd: list[str | os.PathLike[str]], **kwargs: object) -> None:
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _stamp_ok(stamp: Path, value: str) -> bool:
    return stamp.exists() and stamp.read_text() == value


def ensure_python_env() -> None:
    """A virtualenv with exactly the locked (hash-checked) dependencies and the project itself."""
    if sys.version_info[:2] != PYTHON_VERSION_REQUIRED:
        _say(f"warning: Python {PYTHON_VERSION_REQUIRED[0]}.{PYTHON_VERSION_REQUIRED[1]} is the tested version")
    lock = ROOT / "requirements.lock"
    stamp = VENV / ".loyalty-stamp"
    want = _digest([lock, ROOT / "pyproject.toml"])
    if _stamp_ok(stamp, want):
        return
    if not PYTHON.exists():
        _say("creating .venv")
        _run([sys.executable, "-m", "venv", VENV])
    _say("installing locked Python dependencies (requirements.lock, hashes checked)")
    _run([PYTHON, "-m", "pip", "install", "--quiet", "--require-hashes", "-r", lock])
    _link_project()
    stamp.write_text(want)


def _link_project() -> None:
    """Make the work tree importable (libs, services, tools, and the generated `loyalty` stubs in
    gen/) and put the `loyalty` command on the venv's PATH. A .pth file instead of an editable
    install: the stubs are generated after this step, and a .pth sees them whenever they appear."""
    site = subprocess.run([str(PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "loyalty-dev.pth").write_text(f"{ROOT}\n{GEN}\n")
    launcher = VENV / "bin" / "loyalty"
    launcher.write_text(f'#!/bin/sh\nexec "{PYTHON}" -m tools.cli "$@"\n')
    launcher.chmod(0o755)


def ensure_node_tools() -> None:
    """buf comes from the npm package @bufbuild/buf, pinned by package-lock.json."""
    stamp = ROOT / "node_modules" / ".loyalty-stamp"
    want = _digest([ROOT / "package-lock.json"])
    if BUF.exists() and _stamp_ok(stamp, want):
        return
    _say("installing Node tooling (npm ci: @bufbuild/buf)")
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm not found: install Node.js 20 (it brings npm)")
    _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"])
    stamp.write_text(want)


def ensure_stubs() -> None:
    """Generate the Python stubs when the protos or the generator changed (never committed)."""
    inputs = [*sorted((ROOT / "protos").rglob("*.proto")), ROOT / "tools" / "gen_protos.py",
              ROOT / "requirements.lock"]
    stamp = GEN / ".loyalty-stamp"
    want = _digest(inputs)
    if _stamp_ok(stamp, want):
        return
    _say("generating stubs from protos/ into gen/")
    _run([PYTHON, "-m", "tools.gen_protos"])
    stamp.write_text(want)


CHROMIUM = Path("/usr/bin/chromium")


def ensure_browser() -> None:
    """Debian's Chromium for the console's browser tests (Playwright drives it; `playwright install`
    would download its own build, which needs the internet)."""
    if CHROMIUM.exists():
        return
    apt_get = shutil.which("apt-get")
    if apt_get is None or os.geteuid() != 0:
        _say(f"warning: {CHROMIUM} is missing and cannot be installed here (needs apt-get as root): "
             "install the Debian package `chromium` for the console tests (tests/console)")
        return
    lists = Path("/var/lib/apt/lists")
    if not any(lists.glob("*_Packages*")):
        _say("apt-get update (package lists are empty)")
        _run([apt_get, "update"])
    install = [apt_get, "install", "-y", "--no-install-recommends", "chromium"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _say("installing Chromium for the console tests: apt-get install -y --no-install-recommends chromium")
    try:
        _run(install, env=env)
    except subprocess.CalledProcessError:
        # Stale lists (a package version the mirror no longer has): refresh them once and retry.
        _say("apt-get install failed: apt-get update, then once more")
        _run([apt_get, "update"], env=env)
        _run(install, env=env)


def ensure_all() -> None:
    ensure_python_env()
    ensure_node_tools()
    ensure_stubs()
    ensure_browser()


def _buf_breaking() -> int:
    """Compare the working tree's contracts with the last landed ones (origin/main, else main)."""
    against_ref = os.environ.get("BUF_BREAKING_AGAINST")
    if against_ref is None:
        for candidate in ("origin/main", "main"):
            probe = subprocess.run(["git", "rev-parse", "--verify", "--quiet", candidate],
                                   cwd=ROOT, capture_output=True)
            if probe.returncode == 0:
                against_ref = candidate
                break
    if against_ref is None:
        _say("buf breaking: no main branch yet, skipped")
        return 0
    has_protos = subprocess.run(["git", "cat-file", "-e", f"{against_ref}:protos/loyalty"], cwd=ROOT,
                                capture_output=True).returncode == 0
    if not has_protos:
        _say(f"buf breaking: {against_ref} has no protos yet, skipped")
        return 0
    with tempfile.TemporaryDirectory(prefix="loyalty-buf-") as tmp:
        archive = subprocess.run(["git", "archive", against_ref, "protos"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        shutil.copytree(THIRD_PARTY, Path(tmp) / "third_party" / "protos")
        shutil.copy(ROOT / "buf.yaml", Path(tmp) / "buf.yaml")
        _say(f"buf breaking against {against_ref}")
        return subprocess.run([str(BUF), "breaking", "--against", tmp], cwd=ROOT).returncode


def cmd_test(pytest_args: list[str]) -> int:
    ensure_all()
    checks: list[tuple[str, list[str]]] = [
        ("ruff", [str(PYTHON), "-m", "ruff", "check", "."]),
        ("mypy", [str(PYTHON), "-m", "mypy", "libs", "services", "tools"]),
        ("buf lint", [str(BUF), "lint"]),
    ]
    failed: list[str] = []
    for name, cmd in checks:
        _say(name)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(name)
    if _buf_breaking() != 0:
        failed.append("buf breaking")
    _say("pytest")
    rc = subprocess.run([str(PYTHON), "-m", "pytest", *pytest_args], cwd=ROOT).returncode
    if rc != 0:
        failed.append("pytest")
    if failed:
        _say("FAILED: " + ", ".join(failed))
        return 1
    _say("all checks passed")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "test":
        return cmd_test(rest)
    if command == "setup":
        ensure_all()
        return 0
    if command == "gen":
        ensure_python_env()
        ensure_stubs()
        return 0
    if command == "up":
        ensure_all()
        os.execv(str(PYTHON), [str(PYTHON), "-m", "tools.cli", "up", *rest])
    if command == "loyalty":
        ensure_all()
        os.execv(str(PYTHON), [str(PYTHON), "-m", "tools.cli", *rest])
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
