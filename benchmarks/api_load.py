"""Load on ``GET /v1/jobs/{id}`` while a real job runs: latency percentiles under 100 polling clients.

    python benchmarks/api_load.py [--clients 100] [--seconds 60] [--period 1.0] [--output FILE]

The load tool is wrk (``apt-get install wrk``): C, one thread, one connection per client, so the
measurement costs the 2-core machine little; without it the script falls back to its own asyncio client
(recorded as such in the result).

What it does, all on this machine:
1. starts ``secateurs serve`` in embedded mode (SQLite store, filesystem broker, one Celery worker) in a
   temporary data folder;
2. submits a SparseGPT 2:4 job on the real SmolLM2-135M (the offline asset; 64 × 512 calibration tokens, so
   the job prunes for two minutes or more on 2 cores) and waits until it is pruning;
3. ``--clients`` clients, each on its own keep-alive connection, poll the job every ``--period`` seconds
   (wrk: a Lua ``delay()`` after each answer, uniform in [0.5, 1.5] periods so that clients do not fall into
   lock-step; the asyncio fallback: an open loop from a random phase), as a status page or a
   ``secateurs status`` loop does, for ``--seconds``; every request's latency (request sent to response
   read) is recorded;
4. wrk only: the same polling without jitter for ``--lockstep-seconds`` (clients fall into step: the worst case
   of synchronized pollers);
5. then a closed-loop burst (every client re-polls as soon as it has an answer) for ``--burst-seconds``, to
   show the ceiling;
6. writes percentiles, counts, errors, the job's progress during the run and the environment as JSON.

The job keeps running throughout (the script checks it was ``running`` before and after the measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
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


_WRK_SCRIPT = """
local period_ms = tonumber(os.getenv("PERIOD_MS"))
local jitter = os.getenv("JITTER") == "1"
math.randomseed(os.time())
-- Each client waits a period after every answer, jittered uniformly in [0.5, 1.5] periods (mean: one period),
-- as independent pollers do; without jitter, one slow answer would lock all clients into step.
function delay()
  if period_ms == 0 then return 0 end
  if not jitter then return period_ms end
  return math.random(math.floor(period_ms / 2), math.floor(period_ms * 3 / 2))
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d %.3f %.3f %.3f %.3f %.3f %.3f\\n",
    summary.requests, summary.duration, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, summary.errors.status, latency.min, latency.max, latency.mean,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.stdev))
end
"""


def _wrk(url: str, clients: int, seconds: float, period: float | None, *, jitter: bool = True) -> dict[str, Any]:
    """wrk with ``clients`` connections; each waits ``period`` after every answer (None: closed loop)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT)
    env = {**os.environ, "PERIOD_MS": str(int((period or 0) * 1000)), "JITTER": "1" if jitter else "0"}
    command = ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--timeout", "10s", "-s", script.name, url]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    fields = next(line for line in output.splitlines() if line.startswith("RESULT")).split()[1:]
    requests, duration_us, errors, bad_status = (int(v) for v in fields[:4])
    lo, hi, mean, p50, p90, p99, p999, _stdev = (float(v) / 1000 for v in fields[4:])  # microseconds -> ms
    return {
        "requests": requests,
        "requests_per_second": round(requests / (duration_us / 1e6), 1),
        "errors": {"socket": errors, "non_2xx": bad_status},
        "p50_ms": round(p50, 2),
        "p90_ms": round(p90, 2),
        "p99_ms": round(p99, 2),
        "p99_9_ms": round(p999, 2),
        "max_ms": round(hi, 2),
        "min_ms": round(lo, 2),
        "mean_ms": round(mean, 2),
    }


def _job(server: str, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{server}/v1/jobs/{job_id}", timeout=30).json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--period", type=float, default=1.0, help="Seconds between one client's polls.")
    parser.add_argument("--burst-seconds", type=float, default=10.0)
    parser.add_argument("--lockstep-seconds", type=float, default=30.0, help="wrk only: polling without jitter.")
    parser.add_argument("--port", type=int, default=8642)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "api-load.json")
    args = parser.parse_args()

    from secateurs.workers.assets import fetch_assets

    assets = fetch_assets(args.cache)
    data = Path(tempfile.mkdtemp(prefix="secateurs-load-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env |= {"SECATEURS_DATA_DIR": str(data), "SECATEURS_CACHE_DIR": str(args.cache)}
    server = f"http://127.0.0.1:{args.port}"
    serve = subprocess.Popen(
        [sys.executable, "-m", "secateurs", "serve", "--port", str(args.port)],
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
            "calibration_samples": 64,
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
        if shutil.which("wrk"):
            version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split()[1]
            tool = f"wrk ({version}), 1 thread, jittered per-client delay"
            polling = _wrk(url, args.clients, args.seconds, args.period)
            lockstep = _wrk(url, args.clients, args.lockstep_seconds, args.period, jitter=False)
            burst = _wrk(url, args.clients, args.burst_seconds, None)
        else:
            tool = "benchmarks/api_load.py's asyncio client (httpx.AsyncClient, one process)"
            polling = asyncio.run(_poll(url, args.clients, args.seconds, args.period))
            lockstep = None
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
            "job": "sparsegpt 2:4 on SmolLM2-135M-Instruct, 64 x 512 calibration tokens, CPU, running throughout",
            "job_progress_before": before,
            "job_progress_after": after["progress"],
            "load_tool": f"{tool}, on the same machine",
            "clients": args.clients,
        },
        "polling": {"period_seconds": args.period, "seconds": args.seconds, **polling},
        "lockstep_polling": None
        if lockstep is None
        else {
            "note": "every client waits exactly one period after its answer: one slow answer locks all clients "
            "into step, and they arrive as one burst per period",
            "period_seconds": args.period,
            "seconds": args.lockstep_seconds,
            **lockstep,
        },
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
    keys = ("polling", "lockstep_polling", "closed_loop_burst")
    print(json.dumps({key: result[key] for key in keys}, indent=2))


if __name__ == "__main__":
    main()
