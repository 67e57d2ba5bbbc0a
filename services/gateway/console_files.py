"""The operator console's static files (services/gateway/console/) served under /console/.

The console is plain HTML, JavaScript modules and CSS: no build step, nothing fetched from another
origin. It calls only the gateway's own HTTP API with the operator's token. The files are read
once at start-up, so a request can only ever get one of them (no path from the URL reaches the
file system), each with a strong ETag for cheap revalidation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from starlette.responses import RedirectResponse, Response

from services.gateway.dispatch import problem_response
from services.gateway.status import route_not_found

CONSOLE_DIR = Path(__file__).with_name("console")
CONSOLE_PATH = "/console"
CONSOLE_FILES_MAX = 200  # a console is a handful of files; more means the folder holds something else
CONSOLE_FILE_BYTES_MAX = 1024 * 1024

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}

# Everything comes from the gateway itself; the API is same-origin, so no CORS either.
SECURITY_HEADERS = {
    "content-security-policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


@dataclass(frozen=True)
class ConsoleFile:
    body: bytes
    media_type: str
    etag: str


def load_console(root: Path = CONSOLE_DIR) -> dict[str, ConsoleFile]:
    """URL path (under /console/) → file, for every file of a known type under `root`."""
    files: dict[str, ConsoleFile] = {}
    for path in sorted(root.rglob("*")):
        media_type = MEDIA_TYPES.get(path.suffix)
        if not path.is_file() or media_type is None:
            continue
        body = path.read_bytes()
        if len(body) > CONSOLE_FILE_BYTES_MAX:
            raise ValueError(f"{path}: {len(body)} bytes, over {CONSOLE_FILE_BYTES_MAX}")
        files[path.relative_to(root).as_posix()] = ConsoleFile(body, media_type,
                                                               f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    if len(files) > CONSOLE_FILES_MAX:
        raise ValueError(f"{root}: {len(files)} files, over {CONSOLE_FILES_MAX}")
    return files


def is_console_path(path: str) -> bool:
    return path == CONSOLE_PATH or path.startswith(CONSOLE_PATH + "/")


def console_response(files: dict[str, ConsoleFile], method: str, path: str, if_none_match: str | None) -> Response:
    if path == CONSOLE_PATH:
        return RedirectResponse(CONSOLE_PATH + "/", status_code=308)
    name = path[len(CONSOLE_PATH) + 1:] or "index.html"
    found = files.get(name)
    if found is None:
        return problem_response(route_not_found(method, path))
    headers = {**SECURITY_HEADERS, "etag": found.etag}
    if if_none_match is not None and found.etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(found.body, media_type=found.media_type, headers=headers)
