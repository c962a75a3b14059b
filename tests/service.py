"""Real service processes for tests: a private Redis, PostgreSQL databases, the API and Celery workers."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

POSTGRES_ADMIN_URL = os.environ.get("SECATEURS_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)  # CI has the services: their absence is a failure, not a reason to skip
    pytest.skip(reason)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the machine's server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"secateurs_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # any connection error: PostgreSQL is not there
        admin.dispose()
        _unavailable(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {type(exc).__name__}")
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class RedisServer:
    """A private redis-server with append-only persistence, so a restart keeps the queue (as in compose)."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("redis-server") is None:
            _unavailable("redis-server is not installed")
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_for(self._pings, 10, "redis-server")

    def _pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
            self.process = None


class Process:
    """A `secateurs` subprocess in its own process group (so a kill reaches its Celery children too)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "secateurs", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def service_env(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_") or k == "SECATEURS_CACHE_DIR"}
    env["SECATEURS_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env.update({f"SECATEURS_{key.upper()}": value for key, value in settings.items()})
    return env


def start_api(env: dict[str, str], log: Path, *extra: str) -> tuple[Process, str]:
    port = free_port()
    api = Process(["serve", "--port", str(port), *extra], env, log)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if api.process.poll() is not None:
            raise RuntimeError(f"the API exited:\n{api.output()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60, "the API")
    return api, url


TEXT = ("the quick brown fox jumps over the lazy dog while calibration text flows onward " * 400).encode()


def job_spec(model: Path, text: Path, samples: int = 8) -> dict[str, Any]:
    """A small CPU job on ``model``, calibrated and evaluated on ``text`` (64-token windows)."""
    return {
        "model": str(model),
        "calibration": {"file": str(text)},
        "calibration_samples": samples,
        "calibration_seqlen": 64,
        "evaluation": {"file": str(text)},
        "eval_seqlen": 64,
        "eval_windows": 2,
        "device": "cpu",
        "measure_speed": False,  # the speed step (on by default) adds time; tests of it live in test_speed.py
    }
