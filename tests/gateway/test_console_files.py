"""The console's static files as the gateway serves them: only files read at start-up, of known
types, each with its ETag; the shipped console loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.console_files import CONSOLE_FILE_BYTES_MAX, console_response, load_console


def test_only_known_types_are_loaded_and_paths_never_reach_the_disk(tmp_path: Path) -> None:
    (tmp_path / "pages").mkdir()
    (tmp_path / "index.html").write_text("<h1>hi</h1>")
    (tmp_path / "pages" / "a.js").write_text("export {};")
    (tmp_path / "notes.txt").write_text("secret")
    files = load_console(tmp_path)
    assert sorted(files) == ["index.html", "pages/a.js"]

    index = console_response(files, "GET", "/console/", None)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert console_response(files, "GET", "/console/", index.headers["etag"]).status_code == 304
    for path in ("/console/notes.txt", "/console/../index.html", "/console/pages/../index.html", "/console/pages"):
        assert console_response(files, "GET", path, None).status_code == 404, path
    assert console_response(files, "GET", "/console", None).headers["location"] == "/console/"


def test_an_oversized_file_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "big.js").write_bytes(b"x" * (CONSOLE_FILE_BYTES_MAX + 1))
    with pytest.raises(ValueError, match=r"big\.js"):
        load_console(tmp_path)


def test_the_shipped_console_has_its_pages() -> None:
    files = load_console()
    assert {"index.html", "app.js", "api.js", "console.css", "pages/dashboard.js", "pages/policy-lab.js",
            "pages/review-queue.js", "pages/member.js"} <= set(files)
