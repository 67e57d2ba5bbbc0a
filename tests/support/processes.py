"""Start real service processes on loopback ports for end-to-end tests, and stop them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from tools.supervisor import health_status

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RunningProcess:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_status(self, wanted: str, timeout_s: float = READY_TIMEOUT_S,
                    credentials: grpc.ChannelCredentials | None = None) -> None:
        """Until the health check answers `wanted`: in plaintext, or over TLS with `credentials`
        (a server that requires a client certificate refuses a plaintext check)."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            last = health_status(self.address, timeout_s=0.5, credentials=credentials)
            if last == wanted:
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.name} still {last} after {timeout_s}s, wanted {wanted}:\n{self.log()[-4000:]}")

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_module(name: str, module: str, env: dict[str, str], log_dir: Path,
                 extra_pythonpath: Path | None = None, port: int | None = None) -> RunningProcess:
    port = port or free_port()
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["LOYALTY_PORT"] = str(port)
    if extra_pythonpath is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_pythonpath), full_env.get("PYTHONPATH")]))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", module], env=full_env, stdout=log_file,
                                   stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    return RunningProcess(name, f"127.0.0.1:{port}", process, log_path)


def stop_all(processes: list[RunningProcess], timeout_s: float = 15.0) -> None:
    """SIGTERM every process at once, then wait for each (SIGKILL when it does not stop in time)."""
    for running in processes:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
    for running in processes:
        try:
            running.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()
