"""Allow and deny lists: checking an entry's value against its subject type, and matching an accrual."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from services.risk.domain.decision import ListHit, ListKind

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,255}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


class Subject(IntEnum):  # loyalty.risk.v1.ListSubjectType
    MEMBER = 1
    DEVICE = 2
    IP = 3
    EMAIL_DOMAIN = 4


def normalise(subject: Subject, value: str) -> str:
    """The canonical form of `value` for `subject`; ValueError says why it does not fit."""
    value = value.strip()
    if subject in (Subject.MEMBER, Subject.DEVICE):
        if not _ID.match(value):
            raise ValueError(f"is not a valid {subject.name.lower()} id")
        return value
    if subject == Subject.IP:
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError("is not an IP address or CIDR range") from None
        if network.num_addresses == 1:
            return str(network.network_address)
        if network.prefixlen < (8 if network.version == 4 else 32):
            raise ValueError("is a CIDR range too wide to list (at most /8 for IPv4, /32 for IPv6)")
        return str(network)
    lowered = value.lower().lstrip("@")
    if not _DOMAIN.match(lowered):
        raise ValueError("is not an e-mail domain (e.g. example.com)")
    return lowered


@dataclass(frozen=True)
class Entry:
    entry_id: str
    kind: ListKind
    subject: Subject
    value: str
    expires_at: datetime | None


class ListIndex:
    """Active entries by subject, for a constant-time look-up per accrual (CIDR ranges are scanned)."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._exact: dict[tuple[Subject, str], list[Entry]] = {}
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Entry]] = []
        self.size = 0
        for entry in entries:
            self.size += 1
            if entry.subject == Subject.IP and "/" in entry.value:
                self._networks.append((ipaddress.ip_network(entry.value), entry))
            else:
                self._exact.setdefault((entry.subject, entry.value), []).append(entry)

    def match(self, member_id: str, device_id: str, ip: str, email_domain: str, now: datetime) -> list[ListHit]:
        if self.size == 0:
            return []
        found: list[Entry] = []
        for subject, value in ((Subject.MEMBER, member_id), (Subject.DEVICE, device_id),
                               (Subject.EMAIL_DOMAIN, email_domain.lower()), (Subject.IP, ip)):
            if value:
                found.extend(self._exact.get((subject, value), ()))
        if ip and self._networks:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                address = None
            if address is not None:
                found.extend(e for net, e in self._networks if address.version == net.version and address in net)
        return [ListHit(e.entry_id, e.kind, int(e.subject), e.value) for e in found
                if e.expires_at is None or e.expires_at > now]
