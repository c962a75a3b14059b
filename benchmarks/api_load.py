"""Load on ``GET /v1/jobs/{id}`` while a real job runs: latency percentiles under 100 polling clients.

    python benchmarks/api_load.py [--clients 100] [--seconds 60] [--period 1.0] [--output FILE]

What it does, all on this machine:
1. starts ``secateurs serve`` in embedded mode (SQLite store, filesystem broker, one Celery worker) in a
   temporary data folder;
2. submits a SparseGPT 2:4 job on the real SmolLM2-135M (the offline asset; 32 × 512 calibration tokens, so
   the job prunes for about a minute on 2 cores) and waits until it is pruning;
3. the load tool (this script: ``--clients`` asyncio tasks sharing one HTTP/1.1 connection pool, each an open
   loop that polls the job every ``--period`` seconds from a random phase, as a status page or ``secateurs
   status`` loop does) runs for ``--seconds`` and records every request's latency (send to full body);
4. then a closed-loop burst (every client re-polls as soon as it has an answer) for ``--burst-seconds``, to
   show the ceiling;
5. writes percentiles, counts, errors, the job's progress during the run and the environment as JSON.

The job keeps running throughout (the script checks it was ``running`` before and after the measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {
        "p50_ms": pick(0.50),
        "p90_ms": pick(0.90),
        "p99_ms": pick(0.99),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


async def _poll(url: str, clients: int, seconds: float, period: float | None) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        deadline = time.perf_counter() + seconds

        async def one() -> None:
            if period:
                await asyncio.sleep(random.uniform(0, period))
            while time.perf_counter() < deadline:
                tick = time.perf_counter()
                try:
                    response = await client.get(url)
                    if response.status_code != 200:
                        errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                latencies.append(time.perf_counter() - tick)
                if period:
                    await asyncio.sleep(max(0.0, period - (time.perf_counter() - tick)))

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "errors": errors,
        **_percentiles(latencies),
    }


def _job(server: str, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{server}/v1/jobs/{job_id}", timeout=30).json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--period", type=float, default=1.0, help="Seconds between one client's polls.")
    parser.add_argument("--burst-seconds", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=8642)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "api-load.json")
    args = parser.parse_args()

    from workers.assets import fetch_assets

    assets = fetch_assets(args.cache)
    data = Path(tempfile.mkdtemp(prefix="secateurs-load-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env |= {"SECATEURS_DATA_DIR": str(data), "SECATEURS_CACHE_DIR": str(args.cache)}
    server = f"http://127.0.0.1:{args.port}"
    serve = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "serve", "--port", str(args.port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(data / "serve.log").open("wb"),
        start_new_session=True,
    )
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{server}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        spec = {
            "model": str(assets.smollm2),
            "method": "sparsegpt",
            "pattern": "2:4",
            "calibration": {"file": str(assets.c4)},
            "calibration_samples": 32,
            "calibration_seqlen": 512,
            "device": "cpu",
        }
        job_id = httpx.post(f"{server}/v1/jobs", json=spec, timeout=30).json()["id"]
        while (job := _job(server, job_id))["state"] != "running" or not (job["progress"] or {}).get("block"):
            if job["state"] in ("failed", "cancelled", "succeeded"):
                raise SystemExit(f"the job ended before the measurement: {job}")
            time.sleep(0.5)
        before = job["progress"]
        url = f"{server}/v1/jobs/{job_id}"
        polling = asyncio.run(_poll(url, args.clients, args.seconds, args.period))
        burst = asyncio.run(_poll(url, args.clients, args.burst_seconds, None))
        after = _job(server, job_id)
        assert after["state"] == "running", f"the job was not running throughout: {after['state']}"
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=30)

    import torch

    result = {
        "benchmark": "GET /v1/jobs/{id} latency while a job runs",
        "target": "p99 < 50 ms with 100 concurrent polling clients",
        "date": time.strftime("%Y-%m-%d"),
        "setup": {
            "server": "secateurs serve (embedded: uvicorn, SQLite WAL store, filesystem broker, 1 Celery worker)",
            "job": "sparsegpt 2:4 on SmolLM2-135M-Instruct, 32 x 512 calibration tokens, CPU, running throughout",
            "job_progress_before": before,
            "job_progress_after": after["progress"],
            "load_tool": "benchmarks/api_load.py (httpx.AsyncClient, one process, same machine)",
            "clients": args.clients,
        },
        "polling": {"period_seconds": args.period, "seconds": args.seconds, **polling},
        "closed_loop_burst": {"seconds": args.burst_seconds, **burst},
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"polling": result["polling"], "closed_loop_burst": result["closed_loop_burst"]}, indent=2))


if __name__ == "__main__":
    main()
