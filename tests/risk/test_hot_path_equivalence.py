"""The batch path's shortcuts give exactly what the generic calls they replace give: masked IPs,
ids, timestamps."""

from __future__ import annotations

import ipaddress
import random
import uuid
from datetime import UTC

import pytest
from google.protobuf import timestamp_pb2

from services.risk.entrypoints.assessments_api import mask_ip
from services.risk.service_layer.assess import _utc, _uuid4_strings


def reference_mask(ip: str) -> str:
    if not ip:
        return ip
    try:
        address = ipaddress.ip_address(ip.split("/")[0])
    except ValueError:
        return "***"
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def test_mask_ip_fast_path_matches_ipaddress() -> None:
    rng = random.Random(3)
    cases = ["", "1.2.3.4", "0.0.0.0", "255.255.255.255", "256.1.1.1", "01.2.3.4", "1.2.3.04", "1.2.3", "1.2.3.4.5",
             "1.2.3.4\n", " 1.2.3.4", "1.2.3.4/8", "1.2.3.4/", "\u0661.2.3.4", "10.0.0.00", "2001:db8::1",
             "::ffff:1.2.3.4", "1.2.3.4%eth0", "a.b.c.d", "1..2.3"]
    octets = ["0", "00", "1", "9", "10", "99", "100", "199", "200", "249", "250", "255", "256", "300", "012"]
    for _ in range(20_000):
        text = ".".join(rng.choice(octets) for _ in range(rng.choice([3, 4, 4, 4, 5])))
        cases.append(text + (rng.choice(["/24", "/", "\n", " ", "x"]) if rng.random() < 0.1 else ""))
    assert [mask_ip(c) for c in cases] == [reference_mask(c) for c in cases]


def test_ids_are_uuid4_strings() -> None:
    ids = _uuid4_strings(2_000)
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize(("seconds", "nanos"), [(0, 0), (1_700_000_000, 123_456_789), (-1, 999_999_999),
                                                (-62135596800, 0), (253402300799, 999_999_999), (5, 999)])
def test_utc_matches_to_datetime(seconds: int, nanos: int) -> None:
    stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    assert _utc(stamp) == stamp.ToDatetime(tzinfo=UTC) and _utc(stamp).tzinfo is UTC


@pytest.mark.parametrize(("seconds", "nanos"), [(253402300800, 0), (0, -1), (0, 1_000_000_000)])
def test_utc_refuses_what_to_datetime_refuses(seconds: int, nanos: int) -> None:
    with pytest.raises(ValueError, match="Timestamp is not valid"):
        _utc(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
