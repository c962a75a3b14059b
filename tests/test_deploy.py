"""The deployment files hold what they promise.

``compose.yaml`` is validated by Compose itself where a Compose CLI is installed (``docker compose config``, or
Debian's ``docker-compose`` 1.29, which ``.ci/run`` installs), and always against the Compose Specification's
JSON schema (``tests/data/compose_spec.json``, from the docker-compose 1.29.2 wheel, Apache-2.0); then it is
read for the properties the service relies on: Redis with AOF and ``noeviction``, health checks, a migration
step the API and workers wait for, one GPU reserved per worker, the same store/broker URLs everywhere, a shared
data volume.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE = REPO_ROOT / "compose.yaml"
SERVICES = {"redis", "postgres", "migrate", "api", "worker"}
LONG_RUNNING = SERVICES - {"migrate"}
APP_SERVICES = ("migrate", "api", "worker")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _dockerfile_lines(name: str) -> list[str]:
    """The Dockerfile's instructions, comments dropped and continuation lines joined."""
    text = (REPO_ROOT / "docker" / name).read_text()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [line.strip() for line in text.splitlines() if line.strip()]


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Compose CLI installed (docker compose, or docker-compose)")
    done = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_compose_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")  # comes with schemathesis, a dev dependency
    schema = json.loads((REPO_ROOT / "tests" / "data" / "compose_spec.json").read_text())
    validator = jsonschema_rs.validator_for(schema)
    errors = [str(error) for error in validator.iter_errors(compose)]
    assert errors == []
    broken = {**compose, "services": {**compose["services"], "api": {**compose["services"]["api"], "helthcheck": {}}}}
    assert not validator.is_valid(broken)  # the schema does catch a misspelt key


def test_services_and_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no health check"
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])  # broker and store reachable
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == depends["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_redis_keeps_the_queue(compose: dict[str, Any]) -> None:
    command = _command(compose["services"]["redis"])
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags["--appendonly"] == "yes"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert any(volume.endswith(":/data") for volume in compose["services"]["redis"]["volumes"])


def test_settings_shared_by_api_workers_and_migration(compose: dict[str, Any]) -> None:
    services = compose["services"]
    envs = [services[name]["environment"] for name in APP_SERVICES]
    for env in envs:
        assert env["SECATEURS_BROKER_URL"] == "redis://redis:6379/0"
        assert env["SECATEURS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["SECATEURS_DATABASE_URL"]
        assert env["SECATEURS_DATA_DIR"] == "/data"
    assert len({json.dumps({k: v for k, v in env.items() if k != "SECATEURS_CACHE_DIR"}) for env in envs}) == 1
    for name in ("api", "worker"):
        assert "secateurs-data:/data" in services[name]["volumes"]
    assert "secateurs-data" in compose["volumes"]


def test_commands_exist(compose: dict[str, Any]) -> None:
    from secateurs.app.cli import cli
    from secateurs.app.main import create_app
    from secateurs.workers import cli as worker_cli

    assert callable(create_app) and worker_cli.main
    services = compose["services"]
    assert _command(services["migrate"]) == ["secateurs", "db", "upgrade"]
    api = _command(services["api"])
    assert (
        api[:3] == ["uvicorn", "--factory", "secateurs.app.main:create_app"] and api[api.index("--port") + 1] == "8000"
    )
    assert any(str(port).endswith(":8000") for port in services["api"]["ports"])
    worker = _command(services["worker"])
    ctx = click.Context(cli)
    db = cli.get_command(ctx, "db")
    assert isinstance(db, click.Group) and db.get_command(ctx, "upgrade") is not None
    command = cli.get_command(ctx, worker[0])
    assert command is not None and "--hostname" in {opt for p in command.params for opt in p.opts}


def test_one_gpu_per_worker(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert "device_ids" in COMPOSE.read_text()  # the note on adding a worker per GPU
    assert "gpu0@" in " ".join(_command(worker))  # its own name, which its health check pings


def test_api_image_installs_no_torch() -> None:
    lines = _dockerfile_lines("api.Dockerfile")
    assert lines[0].startswith("FROM python:3.11")
    commands = [part.strip() for line in lines if line.startswith("RUN") for part in line[3:].split("&&")]
    installs = [command for command in commands if "pip install" in command]
    assert installs, "the API image installs the package"
    for command in installs:
        assert not re.search(r"torch|transformers|\[engine|\[dev|-r ", command), command
        assert re.fullmatch(r"pip install \.", command), command  # the package, no extras
    assert any("find_spec('torch')" in command for command in commands)  # the build fails if torch came along
    worker = _dockerfile_lines("worker.Dockerfile")
    assert worker[0].startswith("FROM pytorch/pytorch:") and "cuda" in worker[0]
    assert any("pip install '.[engine]'" in line for line in worker)


def test_default_dependencies_are_the_light_side() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    heavy = ("torch", "transformers", "accelerate", "safetensors", "gguf")
    default = [re.split(r"[<>=\[ ]", dep)[0].lower() for dep in project["dependencies"]]
    assert not set(default) & set(heavy)
    assert {"httpx", "pyyaml"} <= set(default)
    engine = [re.split(r"[<>=\[ ]", dep)[0].lower() for dep in project["optional-dependencies"]["engine"]]
    assert set(heavy) <= set(engine)
    dev = project["optional-dependencies"]["dev"]  # `pip install -e '.[dev]'`: everything
    assert any(re.fullmatch(r"secateurs\[(\w+,)*engine(,\w+)*\]", dep) for dep in dev), dev
    for text in ((REPO_ROOT / ".ci" / "run").read_text(), (REPO_ROOT / "README.md").read_text()):
        assert "pip install --quiet -e '.[dev]'" in text or "pip install -e '.[dev]'" in text
