"""Service commands of the ``secateurs`` CLI: ``serve``, ``db upgrade`` and ``api-key``. No torch here."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import httpx

from secateurs.app.cli import cli, err_console, user_errors
from secateurs.app.errors import ServerError
from secateurs.app.settings import Settings, get_settings, hash_api_key

log = logging.getLogger(__name__)


def _settings_for_serve() -> Settings:
    """Embedded mode reads the caller's own files unless allowed roots are configured."""
    settings = get_settings()
    if settings.embedded and not settings.allowed_roots:
        settings = settings.model_copy(update={"allowed_roots": [Path("/")]})
    return settings


class _WorkerProcess:
    """``secateurs worker`` as a child of ``serve``, restarted if it dies while the API runs."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "secateurs", "worker"], env=self.env)

    def _supervise(self) -> None:
        while not self.stopping.is_set():
            self.process = self._spawn()
            code = self.process.wait()
            time.sleep(1.0)  # a signal to the whole group reaches serve too: let it say it is stopping
            if self.stopping.is_set():
                return
            err_console.print(f"[yellow]worker exited with code {code}; restarting it[/]")

    def stop(self) -> None:
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


@contextlib.contextmanager
def embedded_server(settings: Settings) -> Iterator[str]:
    """`secateurs serve` (API + worker) as a child on a free local port, for one command's duration; its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.data_dir / "embedded-serve.log"
    url = f"http://127.0.0.1:{port}"
    err_console.print(f"embedded service on {url} (data and log in {settings.data_dir})", highlight=False)
    with log_path.open("ab") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "secateurs", "serve", "--port", str(port), "--worker"],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise ServerError(f"the embedded server exited with code {server.returncode}", hint=f"see {log_path}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise ServerError("the embedded server did not start in 120 s", hint=f"see {log_path}") from None
                time.sleep(0.25)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port.")
@click.option(
    "--worker/--no-worker",
    default=None,
    help="Also run a worker process here. Default: yes in embedded mode (no SECATEURS_BROKER_URL), no otherwise.",
)
def serve(host: str, port: int, worker: bool | None) -> None:
    """Run the REST API (and, in embedded mode, a Celery worker beside it).

    \b
    Embedded (default, nothing else to install or start): a SQLite job store and a filesystem broker
    under $SECATEURS_DATA_DIR (~/.local/share/secateurs); local paths anywhere are allowed.
      secateurs serve --port 8000
    Distributed: the API alone, workers elsewhere (`secateurs worker` per GPU):
      SECATEURS_BROKER_URL=redis://host:6379/0 SECATEURS_DATABASE_URL=postgresql+psycopg://… secateurs serve
    """
    import uvicorn

    from secateurs.app.main import create_app
    from secateurs.app.migrate import upgrade

    with user_errors():
        settings = _settings_for_serve()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.embedded or settings.store_url.startswith("sqlite"):
            upgrade(settings.store_url)
        run_worker = settings.embedded if worker is None else worker
        child = None
        if run_worker:
            env = dict(os.environ, SECATEURS_DATA_DIR=str(settings.data_dir))
            child = _WorkerProcess(env)
            child.start()
        mode = "embedded" if settings.embedded else f"broker {settings.broker_url}"
        err_console.print(
            f"secateurs API on http://{host}:{port} ({mode}; store {settings.store_url}; "
            f"{'with' if run_worker else 'without'} a local worker)",
            highlight=False,
        )

        def shutdown(signum: int, _frame: object) -> None:
            # uvicorn re-raises SIGTERM/SIGINT once it has shut down: stop the worker, then exit.
            if child is not None:
                child.stop()
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, shutdown)
        signal.signal(signal.SIGINT, shutdown)
        try:
            uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
        finally:
            if child is not None:
                child.stop()


@cli.group()
def db() -> None:
    """The job store's schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create or migrate the job store at $SECATEURS_DATABASE_URL (default: the SQLite file in the data dir)."""
    from secateurs.app.migrate import upgrade

    with user_errors():
        url = get_settings().store_url
        upgrade(url, revision)
    err_console.print(f"job store at {url.split('@')[-1]} is at revision {revision}", highlight=False)


@cli.command("api-key")
def api_key() -> None:
    """Make a new API key: prints the key (give it to the client) and its hash (put it in SECATEURS_API_KEYS)."""
    key = "sk-sec-" + secrets.token_urlsafe(24)
    click.echo(f"key:  {key}")
    click.echo(f"hash: {hash_api_key(key)}")
