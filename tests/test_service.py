"""The service as deployed: real Redis, the API under uvicorn, real `celery worker` processes, over HTTP.

Crash safety (a worker SIGKILLed mid-job), broker restarts, cancellation, and the embedded mode's
three-command contract (`submit`, `wait`, `download`) with the real SmolLM2.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoModelForCausalLM

from secateurs.workers.assets import OfflineAssets
from tests.models import tiny_model, tiny_tokenizer
from tests.service import TEXT, Process, RedisServer, job_spec, service_env, start_api, wait_for

FAST = {"heartbeat_interval": "0.5", "heartbeat_timeout": "4", "reaper_interval": "1", "event_poll_interval": "0.2"}


@dataclass
class Service:
    url: str
    env: dict[str, str]
    data: Path
    logs: Path
    redis: RedisServer
    api: Process
    workers: list[Process]

    def start_worker(self) -> Process:
        worker = Process(["worker", "--loglevel", "info"], self.env, self.logs / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def submit(self, spec: dict[str, Any]) -> str:
        response = httpx.post(f"{self.url}/v1/jobs", json=spec, timeout=30)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=30).json())

    def wait(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        wait_for(lambda: self.job(job_id)["state"] in ("succeeded", "failed", "cancelled"), timeout, job_id, 0.5)
        return self.job(job_id)

    def debug(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in [self.api, *self.workers])


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    data, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    env = service_env(data, broker_url=redis.url, allowed_roots=str(tmp_path.parent), **FAST)
    api, url = start_api(env, logs / "api.log")
    service = Service(url, env, data, logs, redis, api, [])
    try:
        yield service
    finally:
        for process in [*service.workers, api]:
            process.stop()
        redis.stop()


@pytest.fixture
def slow_model(tmp_path: Path) -> Path:
    """A tiny llama with 16 blocks, calibrated on 128 windows: a job of several seconds, block by block."""
    folder = tmp_path / "llama16"
    tiny_model("llama", num_layers=16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT)
    return path


def _events(url: str, job_id: str, until_block: int | None = None) -> list[dict[str, Any]]:
    """Follow the event stream; stop at the terminal state (or once block ``until_block`` is pruned)."""
    events = []
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=httpx.Timeout(30, read=120)) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                events.append(event)
                block = (event.get("progress") or {}).get("block")
                if until_block is not None and block is not None and block >= until_block:
                    break
    return events


def test_end_to_end_over_redis_and_a_celery_worker(service: Service, tiny_dir: Any, text: Path, tmp_path: Path) -> None:
    worker = service.start_worker()
    job_id = service.submit(job_spec(tiny_dir("qwen2"), text))
    events = _events(service.url, job_id)
    assert [e["state"] for e in events if e["type"] == "state"] == ["queued", "running", "succeeded"], service.debug()
    assert [e["progress"]["block"] for e in events if e["type"] == "progress" and e["progress"]["block"]] == [1, 2]
    job = service.job(job_id)
    assert job["attempts"] == 1 and job["result"]["sparsity_verified"]
    archive = httpx.get(f"{service.url}/v1/jobs/{job_id}/artifacts.tar", timeout=60)
    out = tmp_path / "download"
    out.mkdir()
    (tmp_path / "a.tar").write_bytes(archive.content)
    shutil.unpack_archive(tmp_path / "a.tar", out, filter="data")
    assert json.loads((out / "report.json").read_text())["sparsity"]["verified"]
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    # The job ran in a child; the worker's parent never loaded torch (so no CUDA context before a fork).
    maps = Path(f"/proc/{worker.process.pid}/maps")
    if maps.exists():
        assert "libtorch" not in maps.read_text()


def test_a_worker_killed_mid_job_costs_one_retry_and_nothing_else(
    service: Service, slow_model: Path, text: Path
) -> None:
    first = service.start_worker()
    job_id = service.submit(job_spec(slow_model, text, samples=128))
    _events(service.url, job_id, until_block=3)
    first.kill()  # SIGKILL to the worker's whole process group: parent and the child running the job
    assert service.job(job_id)["state"] == "running"
    service.start_worker()
    job = service.wait(job_id)
    assert job["state"] == "succeeded", service.debug()
    assert job["attempts"] == 2
    states = [e["state"] for e in _events(service.url, job_id) if e["type"] == "state"]
    assert states == ["queued", "running", "queued", "running", "succeeded"]
    artifacts = service.data / "artifacts"
    assert [p.name for p in artifacts.iterdir()] == [job_id]  # one set of artifacts, no temporary folders
    time.sleep(2)  # a late duplicate delivery must not run it again
    assert service.job(job_id)["attempts"] == 2


def test_queued_jobs_survive_a_redis_restart(service: Service, tiny_dir: Any, text: Path) -> None:
    model = tiny_dir("llama")
    ids = [service.submit({**job_spec(model, text), "seed": seed}) for seed in range(3)]
    service.redis.stop()
    service.redis.start()
    service.start_worker()
    for job_id in ids:
        assert service.wait(job_id)["state"] == "succeeded", service.debug()
    assert all(service.job(job_id)["attempts"] == 1 for job_id in ids)


def test_cancel_a_running_job_stops_at_a_block_boundary(service: Service, slow_model: Path, text: Path) -> None:
    service.start_worker()
    job_id = service.submit(job_spec(slow_model, text, samples=128))
    _events(service.url, job_id, until_block=2)
    assert httpx.post(f"{service.url}/v1/jobs/{job_id}/cancel", timeout=30).json()["cancel_requested"]
    job = service.wait(job_id)
    assert job["state"] == "cancelled", service.debug()
    assert "cancelled after block" in job["error"]["message"]
    blocks = [e["progress"]["block"] for e in _events(service.url, job_id) if e["type"] == "progress"]
    assert max(b for b in blocks if b) < 16
    artifacts = service.data / "artifacts"
    assert not artifacts.exists() or list(artifacts.iterdir()) == []


@pytest.mark.slow
def test_embedded_mode_runs_the_three_command_contract_on_smollm2(assets: OfflineAssets, tmp_path: Path) -> None:
    """`secateurs serve` with nothing else running, then `submit`, `wait`, `download` as a user types them."""
    env = service_env(tmp_path / "data")
    api, url = start_api(env, tmp_path / "serve.log")
    try:
        flags = [
            "--method", "sparsegpt", "--pattern", "2:4",
            "--calibration-file", str(assets.c4), "--calibration-samples", "4",
            "--calibration-seqlen", "128", "--seed", "0",
            "--eval-file", str(assets.wiki), "--eval-seqlen", "128", "--eval-windows", "4",
            "--device", "cpu",
        ]  # fmt: skip

        def secateurs(*args: str) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "secateurs", *args]
            return subprocess.run(command, env=env, capture_output=True, text=True, check=False)

        submit = secateurs("submit", str(assets.smollm2), "--server", url, *flags)
        assert submit.returncode == 0, submit.stderr
        job_id = submit.stdout.strip()
        assert job_id.startswith("job_") and "\n" not in job_id
        wait = secateurs("wait", job_id, "--server", url)
        assert wait.returncode == 0, wait.stderr + api.output()[-3000:]
        out = tmp_path / "out"
        download = secateurs("download", job_id, "--server", url, "--output", str(out))
        assert download.returncode == 0, download.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["sparsity"]["verified"] and report["model"]["architecture"] == "LlamaForCausalLM"
        dense, pruned = report["perplexity"]["dense"], report["perplexity"]["pruned"]
        # 4 × 128 calibration tokens is a smoke-test budget: finite, worse than dense, far from magnitude's
        # collapse (magnitude 2:4 is ~57× dense on P-CPU).
        assert math.isfinite(pruned) and dense < pruned < 30 * dense
        assert AutoModelForCausalLM.from_pretrained(out) is not None
    finally:
        api.stop()


@pytest.mark.slow
def test_quickstart_is_the_main_job_through_the_service(assets: OfflineAssets, tmp_path: Path) -> None:
    """The README's second command (with a smaller budget): embedded server, job, live progress, download."""
    env = {**service_env(tmp_path / "data"), "SECATEURS_CACHE_DIR": str(assets.smollm2.parents[1])}
    out = tmp_path / "quick"
    flags = ["--calibration-samples", "4", "--eval-windows", "2", "--device", "cpu", "--output", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "secateurs", "quickstart", *flags],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["verified"] and report["perplexity"]["protocol"]["windows"] == 2
    assert "block 30/30" in done.stderr  # progress came from the job's event stream
    jobs = list((tmp_path / "data" / "artifacts").iterdir())
    assert len(jobs) == 1 and jobs[0].name.startswith("job_")  # it went through the service's job store
