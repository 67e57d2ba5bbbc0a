"""Mutual TLS between the real services, with the certificates `loyalty certs` makes (tools/certs.py).

profile, rewards and risk run on a database of their own, each with its own certificate, the one
CA, and the others' addresses (127.0.0.1, which every certificate names):

- a purchase recorded in profile is relayed to rewards (Accrue), which asks risk, and is posted:
  every hop is a TLS connection on which both ends showed a certificate of the CA;
- each service refuses a plaintext caller, a TLS caller without a client certificate and one whose
  certificate another CA signed; a caller with a certificate of the CA is served;
- `loyalty certs` writes keys 0600, refuses to replace a CA without --force, and each service's
  certificate chains to the CA and is good for serving and for calling.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.clients import channel_credentials, open_channel
from libs.settings import SERVICE_NAMES, Settings
from loyalty.profile.v1 import event_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from loyalty.rewards.v1 import ledger_pb2, rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from tests.profile.conftest import Events
from tests.support.database import sibling_database
from tests.support.processes import REPO_ROOT, RunningProcess, free_port, start_module, stop_all
from tools.certs import SERVICES, CertBundle, generate
from tools.cli import main as loyalty

pytestmark = pytest.mark.e2e

RUNNING = ("profile", "rewards", "risk")
WAIT_S = 30.0
REFUSED_S = 3.0


@dataclass
class Stack:
    certs: CertBundle
    processes: dict[str, RunningProcess]
    state_dir: Path

    def credentials(self, caller: str = "gateway") -> grpc.ChannelCredentials:
        """What `caller` presents: its certificate and key, trusting the CA."""
        credentials = channel_credentials(self.settings(caller))
        assert credentials is not None
        return credentials

    def settings(self, caller: str = "gateway") -> Settings:
        """Settings of a process that calls the services as `caller` (the product's client path)."""
        issued = self.certs.services[caller]
        return Settings(state_dir=self.state_dir, tls_ca_file=self.certs.ca_cert, tls_cert_file=issued.cert,
                        tls_key_file=issued.key)


@pytest.fixture(scope="module")
def stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    certs = generate(tmp_path_factory.mktemp("mtls") / "certs")
    # scoring gets an address too (nothing listens there): rewards' channel to it must not reach a
    # developer's suite on the default port.
    ports = {name: free_port() for name in SERVICE_NAMES}
    with sibling_database(pg_dsn, f"loyalty_mtls_{secrets.token_hex(4)}") as dsn:
        env = dict(service_env, DATABASE_URL=dsn, LOYALTY_REWARDS_JOBS_INTERVAL_S="0.2",
                   LOYALTY_REWARDS_GATE_RETRY_BACKOFF_MAX_S="0.5",
                   **{f"LOYALTY_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()})
        processes = {name: start_module(f"{name}-mtls", f"services.{name}", dict(env, **certs.env(name)),
                                        state_dir / "logs", port=ports[name]) for name in RUNNING}
        running = Stack(certs, processes, state_dir)
        try:
            for process in processes.values():
                process.wait_status("SERVING", credentials=running.credentials())
            yield running
        finally:
            stop_all(list(processes.values()))


async def test_a_purchase_travels_profile_rewards_risk_over_mtls(stack: Stack, dev_tokens: dict[str, str]) -> None:
    events = Events()
    profile_address = stack.processes["profile"].address
    rewards_address = stack.processes["rewards"].address
    async with open_channel(profile_address, stack.settings(), [P.DESCRIPTOR.services_by_name["ProfileService"]],
                            token=dev_tokens["storefront"]) as channel:
        reply = await ProfileServiceStub(channel).BatchRecordEvents(
            P.BatchRecordEventsRequest(events=[events.purchase(10_000)], create_unknown_members=True))
    assert [r.status for r in reply.results] == [event_pb2.EVENT_STATUS_ACCEPTED], reply

    # profile's outbox relay -> rewards Accrue -> rewards asks risk -> posted. Risk out of reach
    # would leave the points held (GATE_UNAVAILABLE), never posted.
    balance = ledger_pb2.Balance()
    async with open_channel(rewards_address, stack.settings(), [rewards_pb2.DESCRIPTOR.services_by_name[
            "RewardsService"]], token=dev_tokens["readonly"]) as channel:
        rewards = RewardsServiceStub(channel)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            balance = (await rewards.GetBalance(rewards_pb2.GetBalanceRequest(member_id=events.member_id))).balance
            if balance.posted_points:
                break
            await asyncio.sleep(0.1)
    logs = "\n".join(f"--- {name}\n{p.log()[-2000:]}" for name, p in stack.processes.items())
    assert (balance.posted_points, balance.held_points) == (105, 0), f"{balance}\n{logs}"


async def _health(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode | int:
    """The health status a caller gets (an int), or the code its call failed with."""
    channel = (grpc.aio.insecure_channel(address) if credentials is None
               else grpc.aio.secure_channel(address, credentials))
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                    timeout=REFUSED_S)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return reply.status


@pytest.mark.parametrize("service", RUNNING)
async def test_only_callers_with_a_certificate_of_the_ca_are_served(stack: Stack, service: str,
                                                                   tmp_path: Path) -> None:
    address = stack.processes[service].address
    ca = stack.certs.ca_cert.read_bytes()
    stranger = generate(tmp_path / "other-ca", ("gateway",)).services["gateway"]  # right names, other CA
    callers: dict[str, grpc.ChannelCredentials | None] = {
        "plaintext": None,
        "TLS without a client certificate": grpc.ssl_channel_credentials(ca),
        "client certificate of another CA": grpc.ssl_channel_credentials(
            ca, stranger.key.read_bytes(), stranger.cert.read_bytes()),
    }
    answers = {caller: await _health(address, credentials) for caller, credentials in callers.items()}
    assert answers == dict.fromkeys(callers, grpc.StatusCode.UNAVAILABLE)
    # Certificates of the CA are served: a caller's own, another service's (a service calling
    # it), by IP address and by host name (the certificate names both).
    port = address.rsplit(":", 1)[1]
    for target, caller in ((address, "gateway"), (address, "scoring"), (f"localhost:{port}", "gateway")):
        assert await _health(target, stack.credentials(caller)) == health_pb2.HealthCheckResponse.SERVING, \
            (target, caller)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_loyalty_certs_writes_a_ca_and_a_certificate_per_service(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "certs"
    assert loyalty(["certs", "--dir", str(directory), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert sorted(written["services"]) == sorted(SERVICES)
    ca_path = Path(written["ca_cert"])
    ca = _cert(ca_path)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    keys = [Path(written["ca_key"])]
    for name, env in written["services"].items():
        assert env["LOYALTY_TLS_CA_FILE"] == str(ca_path)
        cert = _cert(Path(env["LOYALTY_TLS_CERT_FILE"]))
        cert.verify_directly_issued_by(ca)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", name}
        assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        keys.append(Path(env["LOYALTY_TLS_KEY_FILE"]))
    assert {stat.S_IMODE(key.stat().st_mode) for key in keys} == {0o600}

    # An existing CA is kept unless --force: the files stay as they were.
    before = ca_path.read_bytes()
    assert loyalty(["certs", "--dir", str(directory)]) == 2
    assert "--force" in capsys.readouterr().err
    assert ca_path.read_bytes() == before
    assert loyalty(["certs", "--dir", str(directory), "--force", "--services", "risk"]) == 0
    assert ca_path.read_bytes() != before
    _cert(directory / "risk.pem").verify_directly_issued_by(_cert(ca_path))

    # A folder that cannot be created (its parent is a file) is one clear line, exit 2.
    (tmp_path / "file").write_text("")
    capsys.readouterr()
    assert loyalty(["certs", "--dir", str(tmp_path / "file" / "certs")]) == 2
    assert "cannot write certificates" in capsys.readouterr().err


def test_loyalty_certs_from_the_command_line_prints_each_services_environment(tmp_path: Path) -> None:
    """The command as an operator runs it: the default folder is <LOYALTY_STATE_DIR>/certs."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOYALTY_")}
    done = subprocess.run([sys.executable, "-m", "tools.cli", "certs"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(env, LOYALTY_STATE_DIR=str(tmp_path)), check=False)
    assert done.returncode == 0, done.stderr
    directory = tmp_path / "certs"
    for name in SERVICES:
        block = done.stdout.split(f"# {name}\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert block == [f"export LOYALTY_TLS_CERT_FILE={directory / f'{name}.pem'}",
                         f"export LOYALTY_TLS_KEY_FILE={directory / f'{name}.key'}",
                         f"export LOYALTY_TLS_CA_FILE={directory / 'ca.pem'}"]
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600


def test_loyalty_status_and_services_check_the_servers_over_mtls(stack: Stack) -> None:
    env = dict(os.environ, LOYALTY_STATE_DIR=str(stack.state_dir), LOYALTY_SCORING_ADDR=f"127.0.0.1:{free_port()}",
               **{f"LOYALTY_{name.upper()}_ADDR": p.address for name, p in stack.processes.items()})

    def run_cli(*args: str, tls: bool) -> subprocess.CompletedProcess[str]:
        run_env = dict(env, **stack.certs.env("gateway")) if tls else env
        return subprocess.run([sys.executable, "-m", "tools.cli", *args], env=run_env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60)

    status = json.loads(run_cli("status", "--json", tls=True).stdout)
    assert {name: status[name] for name in RUNNING} == dict.fromkeys(RUNNING, "SERVING"), status
    assert status["scoring"] == "UNREACHABLE"  # nothing listens there: exit 1 below
    # Without the certificates the servers refuse the handshake: never reported as serving.
    plain = json.loads(run_cli("status", "--json", tls=False).stdout)
    assert all(plain[name] == "UNREACHABLE" for name in RUNNING), plain
    listed = run_cli("services", "--addr", stack.processes["rewards"].address, tls=True)
    assert listed.returncode == 0 and "loyalty.rewards.v1.RewardsService" in listed.stdout, listed
