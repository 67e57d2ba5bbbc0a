"""A member's personal data (PII): what is encrypted, how, how it is looked up, and how it is shown
to a caller without `pii.read`.

Envelope encryption. Each member has its own random 256-bit data key (DEK). The DEK encrypts one
AES-GCM blob holding all the member's PII (bound to the member id through the associated data), and
is itself stored wrapped (AES-GCM) by a key-encryption key (KEK) from the key ring, named by a key id.
Rotating a KEK re-wraps DEKs, never touching the PII blobs; erasing a member deletes its wrapped DEK,
after which no key in the world opens its blob (crypto-shredding).

Look-ups by e-mail or phone go through an HMAC-SHA256 of the normalised value under a separate key,
so the database can answer "who holds this e-mail" without holding the e-mail in clear.

Pure: no file or database access; keys come in as arguments.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import IntEnum
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32  # AES-256 for DEKs and KEKs, and the HMAC key
NONCE_BYTES = 12  # the AES-GCM standard nonce; random per encryption (see _encrypt)
KEY_ID_LEN_MAX = 128
PII_FIELDS: tuple[str, ...] = ("display_name", "email", "phone", "birth_date")

# Associated data labels: a blob encrypted for one purpose (a wrapped key) can never be opened as
# another (a PII blob), and neither can be moved to another member.
_PII_AAD = b"loyalty.profile.pii\x00"
_DEK_AAD = b"loyalty.profile.dek\x00"
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")


class KeyRingError(ValueError):
    """The key ring document is unusable. Messages never contain key material."""


class UnknownKeyIdError(LookupError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"key id {key_id!r} is not in the key ring")
        self.key_id = key_id


class PiiIntegrityError(ValueError):
    """A stored blob does not open under its key: tampered with, or moved to another member."""


@dataclass(frozen=True, slots=True)
class Pii:
    """The personal data of one member; "" means absent."""

    display_name: str = ""
    email: str = ""
    phone: str = ""  # E.164
    birth_date: str = ""  # YYYY-MM-DD

    def is_empty(self) -> bool:
        return not (self.display_name or self.email or self.phone or self.birth_date)

    def to_plaintext(self) -> bytes:
        present = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}
        return json.dumps(present, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_plaintext(cls, data: bytes) -> Pii:
        decoded: dict[str, str] = json.loads(data)
        return cls(**{name: str(decoded.get(name, "")) for name in PII_FIELDS})

    def masked(self, keep_birth_month: bool = False) -> Pii:
        """The form shown to callers without `pii.read` (formats from member.proto); the birth
        month stays for a caller with `pii.birth_month` only."""
        return Pii(display_name=mask_display_name(self.display_name), email=mask_email(self.email),
                   phone=mask_phone(self.phone), birth_date=mask_birth_date(self.birth_date, keep_birth_month))

    def with_values(self, **values: str) -> Pii:
        return replace(self, **values)


# ---- Key ring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRing:
    """The KEKs by key id, which one wraps new data keys, and the look-up hash key."""

    active_key_id: str
    keks: Mapping[str, bytes]
    lookup_hash_key: bytes

    def __post_init__(self) -> None:
        if self.active_key_id not in self.keks:
            raise KeyRingError(f"active key id {self.active_key_id!r} is not among the keys")
        for key_id, key in self.keks.items():
            if not _KEY_ID.fullmatch(key_id):
                raise KeyRingError(f"key id {key_id!r} must be 1-128 of A-Z a-z 0-9 . _ : -")
            if len(key) != KEY_BYTES:
                raise KeyRingError(f"key {key_id!r} must be {KEY_BYTES} bytes")
        if len(self.lookup_hash_key) != KEY_BYTES:
            raise KeyRingError(f"lookup_hash_key must be {KEY_BYTES} bytes")

    def __repr__(self) -> str:  # never print key material, even in a traceback or a debugger
        return f"KeyRing(active_key_id={self.active_key_id!r}, key_ids={sorted(self.keks)!r})"

    def kek(self, key_id: str) -> bytes:
        try:
            return self.keks[key_id]
        except KeyError:
            raise UnknownKeyIdError(key_id) from None

    @classmethod
    def generate(cls, key_id: str = "k1") -> KeyRing:
        return cls(active_key_id=key_id, keks={key_id: os.urandom(KEY_BYTES)}, lookup_hash_key=os.urandom(KEY_BYTES))

    @classmethod
    def from_document(cls, document: Any) -> KeyRing:
        """Parse `{"active": id, "keys": {id: base64}, "lookup_hash_key": base64}`."""
        if not isinstance(document, dict):
            raise KeyRingError("the key ring must be a JSON object")
        active = document.get("active")
        keys = document.get("keys")
        if not isinstance(active, str) or not active:
            raise KeyRingError('"active" must name a key id')
        if not isinstance(keys, dict) or not keys:
            raise KeyRingError('"keys" must map key ids to base64 keys')
        keks = {str(key_id): _decode_key(value, f"key {key_id!r}") for key_id, value in keys.items()}
        return cls(active_key_id=active, keks=keks,
                   lookup_hash_key=_decode_key(document.get("lookup_hash_key"), "lookup_hash_key"))

    def to_document(self) -> dict[str, Any]:
        return {
            "active": self.active_key_id,
            "keys": {key_id: base64.b64encode(key).decode() for key_id, key in self.keks.items()},
            "lookup_hash_key": base64.b64encode(self.lookup_hash_key).decode(),
        }


def _decode_key(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeyRingError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyRingError(f"{what} is not valid base64") from None


# ---- Envelope encryption -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A member's data key as stored: encrypted under the KEK `kek_id`."""

    wrapped: bytes
    nonce: bytes
    kek_id: str


@dataclass(frozen=True, slots=True)
class SealedPii:
    ciphertext: bytes
    nonce: bytes


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def _encrypt(key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    # Random 96-bit nonces: a DEK encrypts a handful of versions of one blob, and a KEK one key per
    # member per rotation, far below the 2^32 messages per key where random nonces start to risk reuse.
    nonce = os.urandom(NONCE_BYTES)
    return AESGCM(key).encrypt(nonce, plaintext, aad), nonce


def _decrypt(key: bytes, ciphertext: bytes, nonce: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise PiiIntegrityError("ciphertext does not authenticate under its key") from None


def _dek_aad(member_id: str, kek_id: str) -> bytes:
    return _DEK_AAD + member_id.encode() + b"\x00" + kek_id.encode()


def wrap_data_key(ring: KeyRing, dek: bytes, member_id: str, kek_id: str | None = None) -> WrappedKey:
    """Wrap `dek` under `kek_id` (default: the active key)."""
    key_id = kek_id or ring.active_key_id
    wrapped, nonce = _encrypt(ring.kek(key_id), dek, _dek_aad(member_id, key_id))
    return WrappedKey(wrapped, nonce, key_id)


def unwrap_data_key(ring: KeyRing, key: WrappedKey, member_id: str) -> bytes:
    return _decrypt(ring.kek(key.kek_id), key.wrapped, key.nonce, _dek_aad(member_id, key.kek_id))


def rewrap_data_key(ring: KeyRing, key: WrappedKey, member_id: str, kek_id: str) -> WrappedKey:
    """The same data key under another KEK: rotation never decrypts the PII itself."""
    return wrap_data_key(ring, unwrap_data_key(ring, key, member_id), member_id, kek_id)


def seal_pii(dek: bytes, pii: Pii, member_id: str) -> SealedPii:
    ciphertext, nonce = _encrypt(dek, pii.to_plaintext(), _PII_AAD + member_id.encode())
    return SealedPii(ciphertext, nonce)


def open_pii(dek: bytes, sealed: SealedPii, member_id: str) -> Pii:
    return Pii.from_plaintext(_decrypt(dek, sealed.ciphertext, sealed.nonce, _PII_AAD + member_id.encode()))


# ---- Keyed look-up hashes ----------------------------------------------------------------------


class LookupKind(IntEnum):
    """Kinds of unique member keys (the `member_keys.kind` column)."""

    EXTERNAL_ID = 1
    EMAIL = 2
    PHONE = 3


def normalise_email(email: str) -> str:
    # Case-insensitive as a whole: mailbox providers treat local parts case-insensitively in practice,
    # and two accounts differing only by case are the same customer.
    return email.strip().lower()


def normalise_phone(phone: str) -> str:
    # Requests carry E.164 already; separators a person might type are dropped for robustness.
    return re.sub(r"[\s\-().]", "", phone)


def lookup_hash(hash_key: bytes, kind: LookupKind, value: str) -> bytes:
    """HMAC-SHA256 of the normalised value; the kind is in the input so an e-mail hash can never
    match a phone hash."""
    normalised = normalise_email(value) if kind is LookupKind.EMAIL else normalise_phone(value)
    return hmac.new(hash_key, f"{kind.name}\x00{normalised}".encode(), hashlib.sha256).digest()


def fingerprint(hash_key: bytes, field: str, value: str) -> str:
    """A keyed digest of a PII value, for places that must compare values without keeping them
    (request-id payload digests): without the key, it confirms nothing about a guessed value."""
    return hmac.new(hash_key, f"fingerprint\x00{field}\x00{value}".encode(), hashlib.sha256).hexdigest()


# ---- Masks (member.proto) ----------------------------------------------------------------------

# ITU-T E.164 country calling codes of one and two digits; every other code has three.
_CALLING_CODES_1 = frozenset({"1", "7"})
_CALLING_CODES_2 = frozenset({
    "20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45", "46", "47", "48",
    "49", "51", "52", "53", "54", "55", "56", "57", "58", "60", "61", "62", "63", "64", "65", "66", "81",
    "82", "84", "86", "90", "91", "92", "93", "94", "95", "98",
})
PHONE_DIGITS_KEPT = 4  # "+86*******8000": the country code and the last four digits stay visible
PHONE_DIGITS_HIDDEN_MIN = 3  # a short number keeps fewer digits rather than showing all of them


def calling_code(digits: str) -> str:
    if digits[:1] in _CALLING_CODES_1:
        return digits[:1]
    if digits[:2] in _CALLING_CODES_2:
        return digits[:2]
    return digits[:3]


def mask_display_name(name: str) -> str:
    return f"{name[0]}**" if name else ""


def mask_email(email: str) -> str:
    if not email:
        return ""
    local, at, domain = email.rpartition("@")
    if not at or not local:
        return "***"
    return f"{local[0]}***@{domain}"


def mask_phone(phone: str) -> str:
    if not phone:
        return ""
    digits = normalise_phone(phone).lstrip("+")
    code = calling_code(digits)
    subscriber = digits[len(code):]
    hidden = max(len(subscriber) - PHONE_DIGITS_KEPT, min(PHONE_DIGITS_HIDDEN_MIN, len(subscriber)))
    return f"+{code}{'*' * hidden}{subscriber[hidden:]}"


def mask_birth_date(birth_date: str, keep_month: bool = False) -> str:
    """"YYYY-**-**", or "YYYY-MM-**" with the month kept (the birthday bonus needs no more)."""
    if not birth_date:
        return ""
    return f"{birth_date[:7]}-**" if keep_month else f"{birth_date[:4]}-**-**"


# An IP address without `pii.read` (event.proto): the network is kept, the host part zeroed.
IPV4_PREFIX_KEPT = 24  # the last octet zeroed
IPV6_PREFIX_KEPT = 48  # the last 80 bits zeroed


def mask_ip(ip: str) -> str:
    if not ip:
        return ""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "***"  # stored events hold validated addresses; never echo something unexpected
    prefix = IPV4_PREFIX_KEPT if address.version == 4 else IPV6_PREFIX_KEPT
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)
