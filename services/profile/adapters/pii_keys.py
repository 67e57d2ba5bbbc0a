"""The PII key ring, read from its JSON file (see services/profile/settings.py).

Read once, then again only when asked for a key id it does not hold or before a rotation: an
operator adds a key to the file and rotates without restarting the service.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

from libs import errors
from libs.files import atomic_write, create_once
from services.profile.domain.pii import KeyRing, KeyRingError, UnknownKeyIdError

log = logging.getLogger(__name__)

KEY_FILE_MODE = 0o600


class KeyRingFile:
    def __init__(self, path: Path, create_if_missing: bool) -> None:
        self.path = path
        self.create_if_missing = create_if_missing
        self._ring: KeyRing | None = None

    def current(self) -> KeyRing:
        return self._ring if self._ring is not None else self.reload()

    def reload(self) -> KeyRing:
        """Read the file again. A broken file leaves the last good ring in place (and fails this call)."""
        if self.create_if_missing:
            create_once(self.path, self._create)
        try:
            mode = self.path.stat().st_mode
            ring = KeyRing.from_document(json.loads(self.path.read_text()))
        except (OSError, ValueError) as error:  # KeyRingError and JSONDecodeError are ValueErrors
            # The message names the file and what is wrong with it, never a key.
            detail = str(error) if isinstance(error, KeyRingError) else type(error).__name__
            log.error("PII key ring unusable", extra={"path": str(self.path), "error": detail})
            raise errors.unavailable(f"PII key ring unusable: {detail}", reason="PII_KEYS_UNAVAILABLE") from None
        if stat.S_IMODE(mode) & 0o077:
            log.warning("PII key ring is readable by other users", extra={"path": str(self.path),
                                                                          "mode": oct(stat.S_IMODE(mode))})
        self._ring = ring
        return ring

    def containing(self, key_id: str) -> KeyRing:
        """The ring holding `key_id`, re-reading the file once if needed (a key added since)."""
        ring = self.current()
        if key_id not in ring.keks:
            ring = self.reload()
        if key_id not in ring.keks:
            raise UnknownKeyIdError(key_id)
        return ring

    def _create(self) -> None:
        ring = KeyRing.generate()
        atomic_write(self.path, json.dumps(ring.to_document(), indent=2) + "\n", KEY_FILE_MODE)
        log.info("created a PII key ring", extra={"path": str(self.path), "key_id": ring.active_key_id})
