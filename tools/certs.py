"""Development certificates for TLS / mTLS between the services: one CA, and one certificate per
service that serves as its server certificate and as its client certificate when it calls the
others (extended key usage serverAuth and clientAuth).

Files in the directory (default `<LOYALTY_STATE_DIR>/certs`):

    ca.pem, ca.key              the CA every service trusts (LOYALTY_TLS_CA_FILE)
    <service>.pem, <service>.key
                                the service's certificate and key (LOYALTY_TLS_CERT_FILE,
                                LOYALTY_TLS_KEY_FILE); names: localhost, 127.0.0.1 and the service's name

Keys are EC P-256, written 0600. An existing CA is never replaced unless asked (`force`): every
certificate it signed would stop being trusted. For development and tests only: the CA key sits
next to the certificates, unencrypted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from libs.settings import Settings

SERVICES: tuple[str, ...] = ("profile", "scoring", "rewards", "risk", "gateway")
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
CA_DAYS = 5 * 365
LEAF_DAYS = 365
# Certificates start a little in the past, so a clock slightly behind the issuer's accepts them.
BACKDATE = dt.timedelta(minutes=5)
CA_COMMON_NAME = "loyalty-dev-ca"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class CertError(Exception):
    """Bad input or a directory the certificates cannot be written to: the message says which."""


@dataclass(frozen=True)
class ServiceCert:
    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class CertBundle:
    directory: Path
    ca_cert: Path
    ca_key: Path
    services: dict[str, ServiceCert]

    def env(self, service: str) -> dict[str, str]:
        """The LOYALTY_TLS_* variables one service runs with: its own certificate, the shared CA."""
        issued = self.services[service]
        return {"LOYALTY_TLS_CERT_FILE": str(issued.cert), "LOYALTY_TLS_KEY_FILE": str(issued.key),
                "LOYALTY_TLS_CA_FILE": str(self.ca_cert)}


def default_directory(settings: Settings) -> Path:
    return settings.state_dir / "certs"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_ca(common_name: str = CA_COMMON_NAME, days: int = CA_DAYS, now: dt.datetime | None = None
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA allowed to sign end-entity certificates only (path length 0)."""
    now = now or dt.datetime.now(dt.UTC)
    key = new_key()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(public).serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # in order, once each
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, hosts: Iterable[str],
          days: int = LEAF_DAYS, now: dt.datetime | None = None
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An end-entity certificate for `hosts` (DNS names or IP addresses), good for serving and for
    calling (serverAuth and clientAuth), signed by the CA."""
    now = now or dt.datetime.now(dt.UTC)
    key = new_key()
    cert = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file in the same folder, created with `mode` (never readable by
    others for a moment), then renamed over `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _check_names(services: Sequence[str], hosts: Sequence[str]) -> None:
    if not services:
        raise CertError("no services to issue certificates for")
    for name in services:
        if not _NAME.match(name):
            raise CertError(f"{name!r} is not a service name (lower-case letters, digits and '-')")
    if len(set(services)) != len(services) or "ca" in services:
        raise CertError(f"service names must be distinct and not 'ca': {', '.join(services)}")
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not host or not all(_NAME.match(label) for label in host.lower().split(".")):
                raise CertError(f"{host!r} is neither an IP address nor a DNS name") from None


def generate(directory: Path, services: Sequence[str] = SERVICES, *, hosts: Sequence[str] = (),
             force: bool = False, ca_days: int = CA_DAYS, leaf_days: int = LEAF_DAYS,
             ca_common_name: str = CA_COMMON_NAME) -> CertBundle:
    """A new CA and one certificate per service in `directory` (created 0700 if missing). Each
    service's certificate names localhost, 127.0.0.1, the service and `hosts`. Raises CertError when
    a CA is there already and `force` is not set, or when the directory cannot be written."""
    services = list(services)
    hosts = list(hosts)
    _check_names(services, hosts)
    if ca_days < 1 or leaf_days < 1:
        raise CertError("validity must be at least one day")
    bundle = CertBundle(directory, directory / "ca.pem", directory / "ca.key",
                        {name: ServiceCert(name, directory / f"{name}.pem", directory / f"{name}.key")
                         for name in services})
    existing = [path for path in (bundle.ca_cert, bundle.ca_key) if path.exists()]
    if existing and not force:
        raise CertError(f"a CA exists already in {directory} ({', '.join(p.name for p in existing)}); "
                        "pass --force to replace it and every certificate it signed (restart the services "
                        "with the new files)")
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = new_ca(ca_common_name, ca_days, now)
    issued = {name: issue(ca_cert, ca_key, name, [*DEFAULT_HOSTS, name, *hosts], leaf_days, now)
              for name in services}
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The service files first and the CA last: a run that fails half-way leaves no CA behind to
        # block the next one.
        for name, (cert, key) in issued.items():
            _write(bundle.services[name].key, key_pem(key), 0o600)
            _write(bundle.services[name].cert, cert_pem(cert), 0o644)
        _write(bundle.ca_key, key_pem(ca_key), 0o600)
        _write(bundle.ca_cert, cert_pem(ca_cert), 0o644)
    except OSError as error:
        raise CertError(f"cannot write certificates to {directory}: {error.strerror or error}") from None
    return bundle
