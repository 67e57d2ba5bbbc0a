"""Console fixtures: the four services and the HTTP gateway on a database of their own (the policy
lab activates policies, which the session's shared services must not see), a little data seeded
through the real APIs, and headless Debian Chromium driven by Playwright, with a screenshot folder
kept after the run (its path is printed in the summary)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from tests.conftest import bearer
from tests.risk.test_cases import open_cases
from tests.scoring.conftest import Stack, own_stack, policy, uid

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SEED_TIMEOUT_S = 30.0
UI_TIMEOUT_MS = 10_000
POLICY_ID = "console-tiers"

_artifacts: list[Path] = []


@dataclass
class Seeded:
    """What the seed put behind the gateway."""

    url: str
    token: str
    members: list[str]  # by spend, the smallest first
    case_member: str
    cases: list[str]


@pytest.fixture(scope="package")
def console_stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Stack]:
    with own_stack(pg_dsn, service_env, state_dir, "loyalty_console") as stack:
        stack.start_gateway()
        yield stack


@pytest.fixture(scope="package")
def seeded(console_stack: Stack, dev_tokens: dict[str, str]) -> Seeded:
    url = f"http://{console_stack.address('gateway')}"
    admin = dev_tokens["admin"]
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {admin}"}, timeout=20) as http:
        members = _seed_purchases(http)
        _seed_tiers(http)
    case_member, cases = asyncio.run(_seed_cases(console_stack.address("risk"), dev_tokens["rewards"]))
    return Seeded(url, admin, members, case_member, cases)


def _ok(reply: httpx.Response) -> Any:
    assert reply.status_code == 200, f"{reply.request.method} {reply.request.url.path}: {reply.text}"
    return reply.json()


def _seed_purchases(http: httpx.Client) -> list[str]:
    """Six members with one to six purchases over the last weeks, credited through the outbox."""
    now = datetime.now(UTC).replace(microsecond=0)
    members = [uid("cm") for _ in range(6)]
    events = [{"eventId": uid("e"), "memberId": member, "channel": "CHANNEL_WEB",
               "occurredAt": (now - timedelta(days=3 * n + 1, hours=i)).isoformat().replace("+00:00", "Z"),
               "purchase": {"orderId": uid("o"), "amount": {"amountMinor": str(4_000 + 2_500 * i), "currency": "CNY"}}}
              for i, member in enumerate(members) for n in range(i + 1)]
    _ok(http.post("/v1/events:batchRecord", json={"events": events, "createUnknownMembers": True}))
    deadline = time.monotonic() + SEED_TIMEOUT_S
    for member in members:
        while not _ok(http.get(f"/v1/rewards/members/{member}/ledger-entries"))["entries"]:
            assert time.monotonic() < deadline, f"no ledger entry for {member} after {SEED_TIMEOUT_S}s"
            time.sleep(0.1)
    return members


def _seed_tiers(http: httpx.Client) -> None:
    """An active policy and two applied evaluation runs, so tiers have a history."""
    body = json_format.MessageToDict(policy(POLICY_ID))
    created = _ok(http.post("/v1/policies", json={"requestId": uid("rq"), "policy": body}))["policy"]
    _ok(http.post(f"/v1/policies/{POLICY_ID}:activate", json={"requestId": uid("rq"), "version": created["version"]}))
    for days_ago in (2, 0):
        as_of = (datetime.now(UTC) - timedelta(days=days_ago, seconds=5)).isoformat().replace("+00:00", "Z")
        run = _ok(http.post("/v1/evaluations:run", json={"requestId": uid("rq"), "asOf": as_of}))["run"]
        deadline = time.monotonic() + SEED_TIMEOUT_S
        while run["state"] in ("EVALUATION_STATE_PENDING", "EVALUATION_STATE_RUNNING"):
            assert time.monotonic() < deadline, f"evaluation {run['runId']} still {run['state']}"
            time.sleep(0.2)
            run = _ok(http.get(f"/v1/evaluations/{run['runId']}"))["run"]
        assert run["state"] == "EVALUATION_STATE_SUCCEEDED", run


async def _seed_cases(risk_address: str, rewards_token: str) -> tuple[str, list[str]]:
    async with grpc.aio.insecure_channel(risk_address) as channel:
        member, reviews = await open_cases(RiskServiceStub(channel), bearer(rewards_token), count=2)
    return member.member_id, [review.case_id for review in reviews]


@pytest.fixture(scope="package")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests save what the browser showed: LOYALTY_CONSOLE_ARTIFACTS, else a folder under
    pytest's temporary directory (kept for the last runs)."""
    chosen = os.environ.get("LOYALTY_CONSOLE_ARTIFACTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("console-screenshots", numbered=True)
    folder.mkdir(parents=True, exist_ok=True)
    _artifacts.append(folder)
    return folder


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for folder in _artifacts:
        shots = sorted(folder.glob("*.png"))
        terminalreporter.write_line(f"console screenshots ({len(shots)}): {folder}")


@pytest.fixture(scope="package")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the package, with a fresh profile."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `python3 dev.py setup` installs the Debian package chromium")
    profile = tmp_path_factory.mktemp("chromium-profile")
    # Playwright's sync API leaves the main thread without a current event loop when it stops;
    # the session's loop is put back so later synchronous tests that drive it still find it.
    policy = asyncio.get_event_loop_policy()
    try:
        session_loop: asyncio.AbstractEventLoop | None = policy.get_event_loop()
    except RuntimeError:
        session_loop = None
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900})
            context.set_default_timeout(UI_TIMEOUT_MS)
            try:
                yield context
            finally:
                context.close()
                shutil.rmtree(profile, ignore_errors=True)
    finally:
        policy.set_event_loop(session_loop)


@dataclass
class Console:
    """A signed-in console tab, and the errors its scripts raised."""

    page: Any
    seeded: Seeded
    screenshots: Path
    errors: list[str]

    def open(self, route: str) -> None:
        self.page.goto(f"{self.seeded.url}/console/#/{route}")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.screenshots / f"{name}.png"), full_page=True)


@pytest.fixture
def console(browser: Any, seeded: Seeded, screenshots: Path) -> Iterator[Console]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.on("console", lambda message: errors.append(f"console {message.type}: {message.text}")
            if message.type == "error" and not message.text.startswith("Failed to load resource") else None)
    page.goto(f"{seeded.url}/console/")
    page.get_by_label("Token").fill(seeded.token)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("button", name="Sign out").wait_for()
    try:
        yield Console(page, seeded, screenshots, errors)
    finally:
        page.close()
