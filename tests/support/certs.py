"""A throw-away CA with a server certificate and a client certificate (both for localhost and
127.0.0.1), made by the product's own generator (tools/certs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tools.certs import generate


@dataclass(frozen=True)
class CertSet:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(directory: Path) -> CertSet:
    bundle = generate(directory, ("server", "client"), force=True, ca_days=1, leaf_days=1,
                      ca_common_name="loyalty-test-ca")
    server, client = bundle.services["server"], bundle.services["client"]
    return CertSet(bundle.ca_cert, server.cert, server.key, client.cert, client.key)
