"""Everything GPU in one command: the gpu-marked tests, the Triton 2:4 kernel against dense, kernel-level and
sweep timings on the LLaMA-7B layers, the speed step on a SmolLM2-shaped random 2:4 model, and SparseGPT jobs
on ``cuda`` with their peak device memory. Results go to one JSON file, written again after every section.

    bash benchmarks/gpu_check.sh OUT_DIR              # on the GPU machine (installs the wheels carried in .whl/)
    bash benchmarks/gpu_check.sh OUT_DIR --budget 200 --only environment,kernel_configs,kernel_timing,decode_graph \
        --tiles 1                                      # a short rerun in the same lease: tune one token only
    python benchmarks/gpu_check.py OUT_DIR --smoke     # on a CPU: every section's logic at toy sizes (tested)

OUT_DIR receives ``gpu_check.json`` (environment + one entry per section: status, seconds, data or error),
``pytest-gpu.xml`` and ``pytest-gpu.log`` (the gpu-marked tests), and ``gpu_check.log`` (from the .sh). Sections
run in order of importance and each is skipped (status ``skipped``, with the reason) when fewer seconds remain of
``--budget`` than it needs, so the whole run ends within the budget (default 420 s: under 8 minutes on an
H100/H200 with the start-up). Nothing here needs the offline assets or the network: the models are random,
built from configs.

Sections, in this order:

* ``environment``: GPU name, capability, multiprocessors, L2, memory, driver, CUDA, torch, Triton, transformers.
* ``kernel_check``: the Triton kernel against dense-with-zeros in fp64, float16 and bfloat16, LLaMA-7B, SmolLM2
  and odd shapes, 1-16 tokens, with and without bias, split-K, every style, outputs poisoned with NaN.
* ``kernel_configs``: the tuning step. Candidate configurations per token tile (:data:`CANDIDATES`: style, block
  sizes, warps, stages) on the LLaMA-7B shapes, each checked against dense, then timed by CUDA-graph replay; the
  best per tile goes into the kernel's table for every later section of this run (``table_after``).
* ``kernel_timing``: measured copy bandwidth (the ceiling); then per LLaMA-7B and SmolLM2 shape and token count,
  dense ``F.linear`` (cuBLAS) against the Triton kernel, weights rotated over more than 3x the L2 cache, timed
  two ways: replaying a CUDA graph of the calls (kernel time, no launch overhead) and eager back-to-back calls
  between two events (what an eager decode step pays, launch overhead included); achieved GB/s for each.
* ``eager_calls``: what one eager one-token call costs, launch included (``benchmarks/triton_call.py``): dense
  ``F.linear`` against the Triton kernel through its launcher (every check on every call) and through a layer's
  bound call (``PackedLinear`` after its first dispatch), back to back, bf16, SmolLM2's and LLaMA-7B's shapes.
* ``decode_graph``: batch-1 greedy decode with a static KV cache, one step per CUDA-graph replay, dense versus
  the Triton kernel in every pruned linear, on a SmolLM2-shaped and a 4-block LLaMA-7B-shaped random 2:4 model.
* ``speed_llama``: the project's speed sweep (:func:`secateurs.kernels.measure.speed.sweep_linear`: correctness
  gate, then timed) on the LLaMA-7B layers, 1, 4, 16, 64 and 512 tokens, bfloat16, every registered path.
* ``pytest_gpu``: ``pytest -m gpu`` on the test files that have gpu-marked tests (junit XML + log).
* ``prune_cuda``: SparseGPT jobs (``run_job``) on ``cuda`` for a tiny random LLaMA and a SmolLM2-shaped random
  one: peak device memory (``torch.cuda.max_memory_allocated``; ``device_bytes_before``: what earlier sections
  still held) and the report's timings and environment.
* ``speed_smollm2``: the job's speed step (:func:`secateurs.workers.speed.run_speed_step`) on a SmolLM2-shaped
  random model pruned 2:4 by magnitude, bfloat16: every shape at 1/16/128/512 tokens, prefill 1x512, decode
  batch 1 and 16, dense versus every path, all eager.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:  # the kernel runs on CPU under Triton's interpreter: set before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LLAMA_7B_SHAPES = {(4096, 4096): 128, (11008, 4096): 64, (4096, 11008): 32}  # (out, in) -> layers in the model
SMOLLM2_SHAPES = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30}
# SmolLM2-135M's architecture (its config.json), for a random model of the same shape.
SMOLLM2_CONFIG: dict[str, Any] = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SMOKE_CONFIG: dict[str, Any] = {
    **SMOLLM2_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 1024,
}


# What the GPU machine lacks of what the check imports (its image has torch, Triton, transformers, numpy, pytest,
# accelerate, safetensors, tokenizers, ...: /work/.library/device/KINDS.md), as wheels for Python 3.12 x86-64,
# carried in .whl/ (README "GPU check" has the download command). click and rich are listed there as installed
# but carried anyway (small, and an older note said they were missing). tests/test_gpu_check.py checks that
# every distribution the check imports is either on the image or here.
CARRIED_WHEELS = {
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",
    "pydantic-settings": "2.16.3",
    "python-dotenv": "1.2.4",
    "click": "8.5.1",
    "rich": "15.0.0",
    "markdown-it-py": "4.3.0",
    "mdurl": "0.1.2",
    "pygments": "2.21.0",
}


def say(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def json_safe(value: Any) -> Any:
    """dataclasses, tuples, dtypes, devices, non-finite floats -> plain JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class Check:
    """The run: sections in order, each skipped when the budget cannot hold it; the JSON rewritten after each."""

    def __init__(self, out: Path, budget_s: float, smoke: bool) -> None:
        self.out, self.smoke = out, smoke
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
        self.results: dict[str, Any] = {
            "benchmark": "secateurs GPU check (benchmarks/gpu_check.py)",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "smoke": smoke,
            "budget_s": budget_s,
            "sections": {},
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, needs_s: float, run: Callable[[], Any]) -> None:
        if self.left() < needs_s:
            reason = f"{self.left():.0f} s of the budget left, the section needs about {needs_s:.0f} s"
            self.results["sections"][name] = {"status": "skipped", "reason": reason}
            say(f"{name}: skipped ({reason})")
            self.write()
            return
        say(f"{name}: start ({self.left():.0f} s left)")
        started = time.monotonic()
        entry: dict[str, Any]
        try:
            entry = {"status": "ok", "data": json_safe(run())}
        except Exception as exc:  # a broken section must not lose the others' results
            entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            say(f"{name}: ERROR {type(exc).__name__}: {exc}")
        entry["seconds"] = round(time.monotonic() - started, 1)
        self.results["sections"][name] = entry
        say(f"{name}: {entry['status']} in {entry['seconds']} s")
        self.write()

    def write(self) -> None:
        self.results["seconds"] = round(time.monotonic() - self.started, 1)
        path = self.out / "gpu_check.json"
        path.write_text(json.dumps(self.results, indent=1) + "\n", encoding="utf-8")


# --- environment ---------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    from secateurs.kernels.sparse.packing import describe_packed_kernels
    from secateurs.workers.speed import cpu_name, driver_release

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "packed_kernels": [dataclasses.asdict(d) for d in describe_packed_kernels()],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            gpu=torch.cuda.get_device_name(device),
            compute_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            multiprocessors=props.multi_processor_count,
            l2_bytes=int(getattr(props, "L2_cache_size", 0)),
            memory_bytes=props.total_memory,
            driver=driver_release(),
            cusparselt=torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            done = subprocess.run(
                [smi, "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu",
                 "--format=csv"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            facts["nvidia_smi"] = done.stdout.strip()
    return facts


# --- kernel_check ---------------------------------------------------------------------------------------------


def kernel_check(device: torch.device, smoke: bool) -> dict[str, Any]:
    """Every case through :func:`~secateurs.kernels.sparse.triton_decode.check` (fp64 reference, assert_close at
    the dtype's tolerance), plus a NaN-poisoned output check (every element must be written)."""
    from secateurs.kernels.sparse.packing import pack_nm
    from secateurs.kernels.sparse.triton_decode import Config, check, packed24_linear, random_24

    configs = [
        Config(4, 16, 3), Config(8, 64, 4), Config(2, 128, num_warps=2), Config(16, 256, 2, 8, 3),
        Config(4, 64, 3, style="words"), Config(8, 32, 1, 8, 3, style="words"), Config(16, 64, 2, style="tiles"),
        Config(32, 128, 1, 4, 3, style="tiles"), Config(8, 256, 1, 8, style="words", prefetch=True),
        Config(32, 128, 2, 4, 3, style="tiles", prefetch=True), Config(8, 512, 1, 8, style="select"),
        Config(4, 64, 3, style="select", prefetch=True), Config(16, 256, 2, 8, style="select"),
    ]  # fmt: skip
    # (shapes, dtypes, token counts, bias): every shape at the tiles 1, 4 and 16; every tile on one shape; odd
    # shapes with bias. Few distinct specializations: each costs a compile (about a second).
    plan: list[tuple[list[tuple[int, int]], list[torch.dtype], tuple[int, ...], bool | None]] = [
        ([*LLAMA_7B_SHAPES, *SMOLLM2_SHAPES], [torch.float16, torch.bfloat16], (1, 3, 16), False),
        ([(4096, 4096)], [torch.bfloat16], (1, 2, 3, 5, 8, 16), None),  # None: bias on odd token counts
        ([(37, 72), (1000, 200), (64, 8192)], [torch.float16, torch.bfloat16], (1, 16), True),
    ]
    config_shape, config_tokens, config_dtype = (64, 1024), (1, 16), torch.bfloat16
    if smoke:  # the interpreter takes about a second a call
        plan = [([(37, 72)], [torch.float16], (1, 3), None)]
        configs, config_shape, config_tokens, config_dtype = configs[::4], (64, 128), (3,), torch.float16
    cases, worst = [], 0.0
    for shapes, dtypes, token_counts, with_bias in plan:
        for dtype in dtypes:
            for shape in shapes:
                for tokens in token_counts:
                    bias = tokens % 2 == 1 if with_bias is None else with_bias
                    rel = check(*shape, tokens, dtype, device, bias=bias, seed=tokens)
                    worst = max(worst, rel)
                    cases.append({"shape": shape, "tokens": tokens, "dtype": str(dtype), "bias": bias, "rel_err": rel})
    for config in configs:
        for tokens in config_tokens if config.style != "select" else (1,):  # select: one token
            rel = check(*config_shape, tokens, config_dtype, device, config=config, seed=tokens)
            worst = max(worst, rel)
            cases.append({"shape": config_shape, "tokens": tokens, "config": str(config), "rel_err": rel})
    # Poisoned output: run into a NaN-filled buffer's worth of memory (the allocator hands it back) and require
    # every element finite and equal to the reference.
    g = torch.Generator().manual_seed(7)
    dense = random_24(1000, 200, config_dtype, device, g)
    packed = pack_nm(dense)
    for tokens in (1,) if smoke else (1, 16):
        poison = torch.full((tokens, 1000), float("nan"), dtype=config_dtype, device=device)
        del poison  # the next allocation of this size reuses its block
        x = torch.randn(tokens, 200, generator=g).to(device, config_dtype)
        y = packed24_linear(x, packed.values, packed.indices)
        assert torch.isfinite(y).all(), "an output element was not written"
        torch.testing.assert_close(y.double(), F.linear(x.double(), dense.double()), rtol=1.6e-2, atol=1e-2)
    return {"cases": len(cases), "worst_relative_error": worst, "all": cases}


# --- pytest_gpu -----------------------------------------------------------------------------------------------


def pytest_gpu(out: Path, timeout_s: float) -> dict[str, Any]:
    files = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").glob("test_*.py")
        if "mark.gpu" in path.read_text(encoding="utf-8")
    )
    command = [
        sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
        "--continue-on-collection-errors", f"--junitxml={out / 'pytest-gpu.xml'}", *files,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        log, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        log, code = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout_s:.0f} s", None
    (out / "pytest-gpu.log").write_text(log if isinstance(log, str) else str(log), encoding="utf-8")
    lines = str(log).splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)), "")
    counts: dict[str, Any] = {}
    junit = out / "pytest-gpu.xml"
    if junit.exists():
        text = junit.read_text(encoding="utf-8")
        match = re.search(r'<testsuite [^>]*?errors="(\d+)" failures="(\d+)" skipped="(\d+)" tests="(\d+)"', text)
        if match:
            counts = dict(zip(("errors", "failures", "skipped", "tests"), map(int, match.groups()), strict=True))
    return {"files": files, "exit_code": code, "summary": summary, **counts}


# --- kernel_timing / kernel_configs ---------------------------------------------------------------------------


def _graph_ms(calls: Sequence[Callable[[], object]], replays: int) -> list[float]:
    """Per-call milliseconds of each replay of a CUDA graph that holds every call once (launch overhead out)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs recommends
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    events = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    del graph
    return [start.elapsed_time(end) / len(calls) for start, end in events]


def _loop_ms(calls: Sequence[Callable[[], object]], rounds: int, device: torch.device) -> list[float]:
    """Per-call milliseconds of ``rounds`` passes over the calls, eager and back to back (launch overhead in)."""
    for call in calls:
        call()
    samples = []
    if device.type != "cuda":
        for _ in range(rounds):
            started = time.perf_counter()
            for call in calls:
                call()
            samples.append((time.perf_counter() - started) * 1e3 / len(calls))
        return samples
    torch.cuda.synchronize()
    events = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / len(calls) for start, end in events]


def _stats(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else (ordered[0],) * 3
    return {"median_ms": statistics.median(ordered), "q1_ms": q1, "q3_ms": q3, "min_ms": ordered[0], "n": len(ordered)}


def copy_bandwidth(device: torch.device, smoke: bool) -> dict[str, Any]:
    """Device-to-device copy of 1 GiB (bytes read + written per second): the memory ceiling, measured."""
    size = (1 << 20) if smoke else (1 << 30)
    src = torch.randn(size // 4, device=device)
    dst = torch.empty_like(src)
    samples = _loop_ms([lambda: dst.copy_(src)], 10, device)
    median = statistics.median(samples)
    return {"bytes": size, "median_ms": median, "bytes_per_s": 2 * size / (median * 1e-3)}


class _Layer:
    """``copies`` random 2:4 weights of one shape, dense and packed, and inputs for ``tokens``."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, copies: int) -> None:
        from secateurs.kernels.sparse.packing import pack_nm
        from secateurs.kernels.sparse.triton_decode import random_24

        g = torch.Generator(device=device).manual_seed(shape[0] * 7 + shape[1])  # on the device: fast
        self.shape, self.dtype = shape, dtype
        self.dense = [random_24(*shape, dtype, device, g) for _ in range(copies)]  # each [out, in]
        self.packed = [pack_nm(w) for w in self.dense]
        size = torch.empty((), dtype=dtype).element_size()
        self.dense_bytes = shape[0] * shape[1] * size
        self.packed_bytes = self.packed[0].nbytes

    def inputs(self, tokens: int, count: int) -> list[torch.Tensor]:
        device = self.dense[0].device
        g = torch.Generator(device=device).manual_seed(tokens)
        return [torch.randn(tokens, self.shape[1], generator=g, device=device).to(self.dtype) for _ in range(count)]


def _copies(layer_bytes: int, l2_bytes: int, smoke: bool) -> int:
    """Enough weight copies that one pass spans more than 3x the L2 cache (so weights stream from memory)."""
    return 2 if smoke else max(2, min(256, math.ceil(3 * max(l2_bytes, 1) / layer_bytes)))


def _time_both(
    dense_calls: list[Callable[[], object]], sparse_calls: list[Callable[[], object]], device: torch.device
) -> dict[str, Any]:
    times: dict[str, Any] = {}
    if device.type == "cuda":
        try:
            times["graph_dense"] = _stats(_graph_ms(dense_calls, 30))
            times["graph_triton"] = _stats(_graph_ms(sparse_calls, 30))
        except RuntimeError as exc:  # the eager figures still stand; the reason is kept
            torch.cuda.synchronize()
            times.pop("graph_dense", None)
            times["graph_error"] = " ".join(str(exc).split())[:300]
    rounds = 1 if device.type != "cuda" else 30
    times["eager_dense"] = _stats(_loop_ms(dense_calls, rounds, device))
    times["eager_triton"] = _stats(_loop_ms(sparse_calls, rounds, device))
    return times


def kernel_timing(device: torch.device, smoke: bool, l2_bytes: int) -> dict[str, Any]:
    from secateurs.kernels.sparse.triton_decode import packed24_linear, pick_config

    ceiling = copy_bandwidth(device, smoke)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    plan: list[tuple[dict[tuple[int, int], int], torch.dtype, tuple[int, ...]]]
    if smoke:
        plan = [({(64, 128): 1}, torch.float16, (1, 3))]
    else:
        plan = [
            (LLAMA_7B_SHAPES, torch.bfloat16, (1, 4, 16)),
            (LLAMA_7B_SHAPES, torch.float16, (1,)),
            (SMOLLM2_SHAPES, torch.bfloat16, (1, 16)),
        ]
    points = []
    for shapes, dtype, token_counts in plan:
        for shape in shapes:
            size = torch.empty((), dtype=dtype).element_size()
            layer = _Layer(shape, dtype, device, _copies(shape[0] * shape[1] * size * 9 // 16, l2_bytes, smoke))
            for tokens in token_counts:
                xs = layer.inputs(tokens, len(layer.dense))
                dense_calls: list[Callable[[], object]] = [
                    (lambda x=x, w=w: F.linear(x, w)) for x, w in zip(xs, layer.dense, strict=True)
                ]
                sparse_calls: list[Callable[[], object]] = [
                    (lambda x=x, p=p: packed24_linear(x, p.values, p.indices))
                    for x, p in zip(xs, layer.packed, strict=True)
                ]
                for x, w, p in zip(xs[:2], layer.dense[:2], layer.packed[:2], strict=True):  # gate before timing
                    torch.testing.assert_close(
                        packed24_linear(x, p.values, p.indices).float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2
                    )
                times = _time_both(dense_calls, sparse_calls, device)
                activations = tokens * (shape[0] + shape[1]) * size
                point: dict[str, Any] = {
                    "shape": shape,
                    "dtype": str(dtype).removeprefix("torch."),
                    "tokens": tokens,
                    "copies": len(layer.dense),
                    "config": str(pick_config(tokens, shape[0], shape[1] // 2, sms)),
                    "dense_bytes": layer.dense_bytes + activations,
                    "packed_bytes": layer.packed_bytes + activations,
                    "limit": (layer.dense_bytes + activations) / (layer.packed_bytes + activations),
                    **times,
                }
                for mode in ("graph", "eager"):
                    if f"{mode}_dense" not in times:
                        continue
                    dense_ms, triton_ms = times[f"{mode}_dense"]["median_ms"], times[f"{mode}_triton"]["median_ms"]
                    point[f"{mode}_speedup"] = dense_ms / triton_ms
                    point[f"{mode}_dense_GBps"] = point["dense_bytes"] / (dense_ms * 1e-3) / 1e9
                    point[f"{mode}_triton_GBps"] = point["packed_bytes"] / (triton_ms * 1e-3) / 1e9
                    point[f"{mode}_triton_of_copy_bw"] = (
                        point["packed_bytes"] / (triton_ms * 1e-3) / ceiling["bytes_per_s"]
                    )
                points.append(point)
                say(
                    f"  {shape} {point['dtype']} x{tokens}: "
                    + ", ".join(
                        f"{mode} dense {times[f'{mode}_dense']['median_ms'] * 1e3:.1f} us / triton "
                        f"{times[f'{mode}_triton']['median_ms'] * 1e3:.1f} us = {point[f'{mode}_speedup']:.2f}x"
                        for mode in ("graph", "eager")
                        if f"{mode}_dense" in times
                    )
                )
            del layer
    return {"copy_bandwidth": ceiling, "points": points}


def eager_calls(device: torch.device, smoke: bool) -> dict[str, Any]:
    """benchmarks/triton_call.py's timing: per shape, microseconds per eager call of dense, the launcher and the
    bound call (smoke: on CPU, Triton's launch stubbed out, a toy shape)."""
    from benchmarks.triton_call import SHAPES, launches_stubbed, time_shape

    if smoke:
        with launches_stubbed():
            points = [time_shape((64, 128), torch.float16, device, tokens=1, calls=20, rounds=2)]
        return {"points": points}
    points = []
    for shape in SHAPES:
        point = time_shape(shape, torch.bfloat16, device, tokens=1, calls=2000, rounds=5)
        points.append(point)
        say(
            f"  {shape} bf16 x1 eager: dense {point['dense_us']:.1f} us, launcher {point['launcher_us']:.1f} us, "
            f"bound {point['bound_us']:.1f} us"
        )
    return {"calls": 2000, "rounds": 5, "points": points}


# Token tile -> candidate (style, BLOCK_N, BLOCK_KH, warps, stages); split-K follows the table's rule per shape
# ("+splitN": also split rows whose programs would walk more than N chunks; untimed before 2026-12-01: on an H200 the
# 4096-row layers reached 0.56-0.60 of the copy bandwidth in about one wave of programs, 11008 x 4096 0.72 in 2.7).
CANDIDATES: dict[int, list[tuple[str, int, int, int, int]]] = {
    1: [("select", 1, 512, 2, 2), ("select", 1, 1024, 4, 2), ("select", 1, 256, 1, 2), ("select", 1, 2048, 8, 2),
        ("select", 2, 512, 2, 2), ("select", 2, 1024, 4, 2), ("select", 8, 512, 8, 2),
        ("select+prefetch", 1, 512, 2, 2), ("select+prefetch", 1, 1024, 4, 2), ("words", 8, 512, 8, 2),
        ("select+split6", 1, 512, 2, 2), ("select+split2", 1, 512, 2, 2),
        ("words+prefetch", 8, 256, 8, 2), ("words", 4, 512, 4, 2)],
    2: [("words+prefetch", 8, 256, 8, 2), ("words", 4, 256, 4, 2), ("words", 4, 512, 8, 2), ("words", 8, 256, 8, 2),
        ("words", 2, 512, 4, 2), ("words", 2, 1024, 8, 2), ("tiles", 32, 64, 4, 2), ("tiles", 64, 64, 4, 2),
        ("tiles", 16, 128, 4, 2)],
    4: [("words+prefetch", 8, 128, 8, 2), ("tiles+prefetch", 32, 128, 4, 3), ("bytes", 4, 128, 4, 2),
        ("words", 4, 128, 4, 2), ("words", 4, 256, 8, 2), ("words", 8, 128, 8, 2), ("words", 2, 256, 4, 2),
        ("words", 8, 64, 4, 2), ("words", 16, 64, 8, 2), ("tiles", 16, 64, 4, 2), ("tiles", 32, 64, 4, 2),
        ("tiles", 64, 64, 4, 2), ("tiles", 32, 128, 4, 2), ("tiles", 64, 128, 8, 2), ("tiles", 128, 64, 8, 2),
        ("tiles", 16, 128, 4, 2), ("tiles", 64, 32, 4, 2), ("tiles", 32, 128, 4, 3), ("tiles", 64, 64, 4, 3)],
    8: [("tiles+prefetch", 32, 128, 4, 3), ("tiles+prefetch", 64, 64, 4, 2), ("words", 4, 64, 4, 2),
        ("words", 4, 128, 8, 2), ("words", 8, 64, 8, 2), ("words", 2, 128, 4, 2), ("tiles", 16, 64, 4, 2),
        ("tiles", 32, 64, 4, 2), ("tiles", 64, 64, 4, 2), ("tiles", 32, 128, 4, 3), ("tiles", 64, 128, 8, 2)],
    16: [("tiles+prefetch", 32, 128, 4, 3), ("tiles+prefetch", 64, 64, 4, 2), ("tiles+prefetch", 32, 128, 4, 2),
         ("bytes", 4, 32, 4, 2), ("words", 2, 64, 4, 2), ("words", 4, 64, 8, 2), ("words", 4, 32, 4, 2),
         ("words", 8, 32, 8, 2), ("tiles", 16, 64, 4, 2), ("tiles", 32, 64, 4, 2), ("tiles", 64, 64, 4, 2),
         ("tiles", 32, 128, 4, 2), ("tiles", 64, 128, 8, 2), ("tiles", 128, 64, 8, 2), ("tiles", 16, 128, 4, 2),
         ("tiles", 64, 32, 4, 2), ("tiles", 32, 128, 4, 3), ("tiles", 64, 64, 4, 3), ("tiles", 64, 128, 4, 3)],
}  # fmt: skip
SMOKE_CANDIDATES: dict[int, list[tuple[str, int, int, int, int]]] = {
    1: [
        ("bytes", 4, 32, 4, 2),
        ("words", 4, 32, 4, 2),
        ("words+prefetch", 4, 32, 4, 2),
        ("tiles", 4, 32, 4, 2),
        ("select", 4, 32, 4, 2),
        ("select+prefetch", 4, 32, 4, 2),
        ("select+split2", 4, 32, 4, 2),
    ],
    16: [("words", 4, 16, 4, 2), ("tiles", 16, 32, 4, 2), ("tiles+prefetch", 16, 32, 4, 2)],
}


def _candidate(option: tuple[str, int, int, int, int]) -> Any:
    """A :data:`CANDIDATES` entry as the kernel's Config ("words+prefetch": the words style with the prefetch)."""
    from secateurs.kernels.sparse.triton_decode import Config

    style, block_n, block_kh, warps, stages = option
    base, *extras = style.split("+")
    split = next((int(extra.removeprefix("split")) for extra in extras if extra.startswith("split")), 0)
    return Config(block_n, block_kh, 1, warps, stages, base, prefetch="prefetch" in extras, split_chunks=split)


def kernel_configs(
    device: torch.device, smoke: bool, l2_bytes: int, budget_s: float, tiles: Sequence[int] = ()
) -> dict[str, Any]:
    """Times every candidate configuration per token tile on the LLaMA-7B shapes (CUDA graphs, weights rotated
    over more than the L2), each first checked against dense; then puts the best of each tile (the lowest
    geometric mean over the shapes of its time over the fastest candidate's) into the kernel's table for the rest
    of this process (:func:`~secateurs.kernels.sparse.triton_decode.set_table`), and returns both: the data to
    write the committed table from."""
    from secateurs.kernels.sparse.triton_decode import packed24_linear, set_table, table, with_split

    started = time.monotonic()
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    shapes = {(64, 128): 1, (128, 256): 1} if smoke else LLAMA_7B_SHAPES
    candidates = SMOKE_CANDIDATES if smoke else CANDIDATES
    if tiles:  # the other tiles keep the table's entries
        candidates = {tile: options for tile, options in candidates.items() if tile in tiles}
    dtype = torch.float16 if smoke else torch.bfloat16
    layers = {shape: _Layer(shape, dtype, device, _copies(shape[0] * shape[1], l2_bytes, smoke)) for shape in shapes}
    before = {tile: str(config) for tile, config in table().items()}
    results, chosen = [], {}
    for tile, options in candidates.items():
        scores: dict[tuple[str, int, int, int, int], list[float]] = {option: [] for option in options}
        for shape, layer in layers.items():
            xs = layer.inputs(tile, len(layer.dense))
            timed = []
            for option in options:
                config = with_split(_candidate(option), shape[0], shape[1] // 2, sms)
                if time.monotonic() - started > budget_s:
                    timed.append({"config": str(config), "status": "skipped: out of time"})
                    scores[option].append(math.inf)
                    continue
                try:
                    reference = F.linear(xs[0], layer.dense[0]).float()
                    got = packed24_linear(xs[0], layer.packed[0].values, layer.packed[0].indices, config=config)
                    torch.testing.assert_close(got.float(), reference, rtol=2e-2, atol=2e-2)
                    calls: list[Callable[[], object]] = [
                        (lambda x=x, p=p, c=config: packed24_linear(x, p.values, p.indices, config=c))
                        for x, p in zip(xs, layer.packed, strict=True)
                    ]
                    samples = _graph_ms(calls, 20) if device.type == "cuda" else _loop_ms(calls, 1, device)
                    timed.append({"config": str(config), "status": "ok", **_stats(samples)})
                    scores[option].append(statistics.median(samples))
                except Exception as exc:  # a configuration that does not compile or fit is a result, not a stop
                    timed.append({"config": str(config), "status": f"error: {type(exc).__name__}: {exc}"[:300]})
                    scores[option].append(math.inf)
            dense_ms = (
                _stats(_graph_ms([(lambda x=x, w=w: F.linear(x, w)) for x, w in zip(xs, layer.dense, strict=True)], 20))
                if device.type == "cuda"
                else None
            )
            ok = [t for t in timed if t["status"] == "ok"]
            best = min(ok, key=lambda t: t["median_ms"]) if ok else None
            results.append({"shape": shape, "tokens": tile, "dense": dense_ms, "best": best, "all": timed})
            if best is not None:
                dense_text = f"dense {dense_ms['median_ms'] * 1e3:.1f} us, " if dense_ms else ""
                say(f"  {shape} x{tile}: {dense_text}best {best['median_ms'] * 1e3:.1f} us ({best['config']})")
        fastest = [min(times[i] for times in scores.values()) for i in range(len(layers))]

        def score(times: list[float], fastest: list[float] = fastest) -> float:
            if any(not math.isfinite(t) for t in times):
                return math.inf
            return math.exp(statistics.fmean(math.log(t / f) for t, f in zip(times, fastest, strict=True)))

        option, times = min(scores.items(), key=lambda item: score(item[1]))
        if math.isfinite(score(times)):
            chosen[tile] = _candidate(option)
            say(f"  tile {tile}: chosen {chosen[tile]} ({score(times):.3f}x the fastest per shape, geometric mean)")
    set_table(chosen)
    del layers
    return {
        "timer": "cuda_graph" if device.type == "cuda" else "perf_counter",
        "rule": "per token tile, the lowest geometric mean over the shapes of time / fastest candidate's time",
        "table_before": before,
        "table_after": {tile: str(config) for tile, config in table().items()},
        "results": results,
    }


# --- speed_llama / speed_smollm2 -----------------------------------------------------------------------------


def _point(point: Any) -> None:
    paths = ", ".join(
        f"{r.path} {r.status}" + (f" {r.speedup:.3f}x" if r.speedup is not None else "") for r in point.paths
    )
    say(f"  {point.shape} x {point.tokens}: dense {point.dense.median_ms * 1e3:.1f} us; {paths}")


def speed_llama(device: torch.device, smoke: bool) -> dict[str, Any]:
    from secateurs.kernels.measure.speed import (
        SpeedResult,
        SpeedSettings,
        device_facts,
        path_infos,
        sparse_paths,
        sweep_linear,
    )
    from secateurs.kernels.patterns import SparsityPattern
    from secateurs.workers.speed import to_report

    pattern = SparsityPattern.nm(2, 4)
    defaults = SpeedSettings.for_device(device)
    if smoke:
        shapes, settings = {(64, 128): 1, (128, 64): 1}, dataclasses.replace(defaults, token_counts=(1, 4, 16, 64))
    else:
        shapes, settings = LLAMA_7B_SHAPES, dataclasses.replace(defaults, token_counts=(1, 4, 16, 64, 512))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = dataclasses.replace(settings, end_to_end=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    started = time.perf_counter()
    paths = sparse_paths()
    linear = sweep_linear(shapes, pattern, dtype, device, settings, paths=paths, device_name=name, on_point=_point)
    facts = device_facts(device, name)
    result = SpeedResult(
        conditions=facts,
        dtype=str(dtype).removeprefix("torch."),
        pattern=str(pattern),
        runtime_mode="eager",
        settings=dataclasses.asdict(settings),
        paths=path_infos(paths, device, dtype),
        linear=tuple(linear),
        end_to_end=(),
        notes=(facts.sparse_hardware_note, "random weights pruned 2:4 by magnitude; no bias"),
    )
    return to_report(result, time.perf_counter() - started).model_dump(mode="json")


def _random_model(config: dict[str, Any], dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> Any:
    """A random LLaMA of this config, built (and initialized) on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype).eval()


# --- decode_graph ---------------------------------------------------------------------------------------------

# LLaMA-7B's block shapes with 4 blocks (about 1.07 B parameters): weight bytes dominate a decode step there.
LLAMA_7B_4_BLOCKS: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 4,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def _graph_decode(
    model: Any, prompt: torch.Tensor, steps: int, rounds: int, device: torch.device
) -> tuple[list[int], list[float], str]:
    """Greedy decode with a static KV cache; one step captured in a CUDA graph and replayed (CPU, or a capture
    that fails: the step runs eagerly, and the returned mode says so).

    Returns the first ``steps`` generated tokens, the milliseconds per step of each timed round, and the mode.
    """
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps * (rounds + 1) + 16)
    with torch.no_grad():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)  # [1, 1], the step's input, at a fixed address

        def step() -> None:
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits  # [1, 1, vocab]
            token.copy_(logits[:, -1:].argmax(-1))

        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: compiles the kernels, allocates outside the capture
                step()
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    step()
                run: Callable[[], None] = graph.replay
                mode = "cuda_graph"
            except RuntimeError as exc:  # something in the step cannot be captured: measure it eagerly instead
                torch.cuda.synchronize()
                run, mode = step, f"eager (CUDA-graph capture failed: {' '.join(str(exc).split())[:300]})"
        else:
            run, mode = step, "eager"
        generated = []
        for _ in range(steps):  # untimed: the tokens, one host read per step
            run()
            generated.append(int(token.item()))
        per_step = []
        for _ in range(rounds):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    run()
                end.record()
                end.synchronize()
                per_step.append(start.elapsed_time(end) / steps)
            else:
                started = time.perf_counter()
                for _ in range(steps):
                    run()
                per_step.append((time.perf_counter() - started) * 1e3 / steps)
    return generated, per_step, mode


def decode_graph(device: torch.device, smoke: bool) -> dict[str, Any]:
    """Batch-1 greedy decode, dense versus the Triton kernel in every pruned linear, each step a CUDA-graph replay
    (static KV cache): the end-to-end effect of the kernel without Python's launch overhead."""
    from secateurs.kernels.measure.speed import mismatch, sparse_paths
    from secateurs.kernels.patterns import SparsityPattern
    from secateurs.kernels.pruning.driver import PruneConfig, plan_layers, prune_model_

    pattern = SparsityPattern.nm(2, 4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = next(p for p in sparse_paths() if p.name == "packed_triton")
    if smoke and path.unavailable(device, dtype):  # the swap and the static cache still run, through the reference
        path = next(p for p in sparse_paths() if p.name == "packed_reference")
    models = (
        [("smoke", SMOKE_CONFIG)]
        if smoke
        else [("smollm2-shaped", SMOLLM2_CONFIG), ("llama7b-4-blocks", LLAMA_7B_4_BLOCKS)]
    )
    steps, rounds = (4, 2) if smoke else (64, 5)
    results = []
    for label, config in models:
        model = _random_model(config, dtype, device=str(device))
        prune = PruneConfig(method="magnitude", pattern=pattern)
        prune_model_(model, None, prune)
        _, _, per_block = plan_layers(model, prune)
        names = [layer.name for layers in per_block for layer in layers]
        g = torch.Generator(device=device).manual_seed(0)
        prompt = torch.randint(0, config["vocab_size"], (1, 32), generator=g, device=device)  # [1, 32]
        entry: dict[str, Any] = {"model": label, "dtype": str(dtype).removeprefix("torch."), "steps": steps}
        tokens, per_step, mode = _graph_decode(model, prompt, steps, rounds, device)
        entry["dense"] = {**_stats(per_step), "tokens_per_s": 1e3 / statistics.median(per_step), "mode": mode}
        reason = path.unavailable(device, dtype)
        if reason is not None:
            entry[path.name] = {"status": "unavailable", "reason": reason}
        else:
            originals = {}
            for name in names:  # swap every pruned linear for the path's module, gated first
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                module = getattr(parent, child)
                replacement = path.build(module.weight, module.bias, pattern)
                x = torch.randn(1, module.weight.shape[1], generator=g, device=device).to(dtype)
                problem = mismatch(replacement(x), F.linear(x, module.weight, module.bias))
                if problem is not None:
                    raise AssertionError(f"{name}: the Triton path differs from dense: {problem}")
                originals[name] = module
                setattr(parent, child, replacement)
            sparse_tokens, sparse_per_step, sparse_mode = _graph_decode(model, prompt, steps, rounds, device)
            agree = next((i for i, (a, b) in enumerate(zip(tokens, sparse_tokens, strict=True)) if a != b), steps)
            entry[path.name] = {
                **_stats(sparse_per_step),
                "tokens_per_s": 1e3 / statistics.median(sparse_per_step),
                "speedup": statistics.median(per_step) / statistics.median(sparse_per_step),
                "tokens_agree_first": agree,
                "tokens_equal": sum(a == b for a, b in zip(tokens, sparse_tokens, strict=True)),
                "mode": sparse_mode,
            }
            for name, module in originals.items():
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
            say(
                f"  {label}: dense {entry['dense']['tokens_per_s']:.0f} tok/s, {path.name} "
                f"{entry[path.name]['tokens_per_s']:.0f} tok/s = {entry[path.name]['speedup']:.2f}x"
            )
        results.append(entry)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "timer": (
            "CUDA events around rounds of steps; each step one CUDA-graph replay unless its mode says otherwise"
            if device.type == "cuda"
            else "perf_counter, eager"
        ),
        "protocol": f"batch 1, 32-token random prompt, greedy, static KV cache, {rounds} rounds of {steps} steps",
        "results": results,
    }


def speed_smollm2(device: torch.device, smoke: bool) -> dict[str, Any]:
    from secateurs.kernels.measure.speed import SpeedSettings
    from secateurs.kernels.patterns import SparsityPattern
    from secateurs.kernels.pruning.driver import PruneConfig, plan_layers, prune_model_
    from secateurs.workers.speed import run_speed_step

    pattern = SparsityPattern.nm(2, 4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _random_model(SMOKE_CONFIG if smoke else SMOLLM2_CONFIG, dtype).to(device)
    config = PruneConfig(method="magnitude", pattern=pattern)
    prune_model_(model, None, config)
    _, _, per_block = plan_layers(model, config)
    names = [layer.name for layers in per_block for layer in layers]
    defaults = SpeedSettings.for_device(device)
    if smoke:
        settings = dataclasses.replace(
            defaults, token_counts=(1, 16), prefill=((1, 32),), decode_batches=(1,), decode_prompt=8,
            decode_new_tokens=4, warmup=1, repetitions=3, e2e_warmup=1, e2e_repetitions=2,
        )  # fmt: skip
    else:
        settings = dataclasses.replace(
            defaults, token_counts=(1, 16, 128, 512), prefill=((1, 512),), decode_batches=(1, 16),
            decode_prompt=128, decode_new_tokens=32, e2e_warmup=1, e2e_repetitions=5,
        )  # fmt: skip
    report = run_speed_step(model, names, pattern, device, settings=settings, on_point=_point)
    for e2e in report.end_to_end:
        figures = ", ".join(
            f"{r.path} {r.status}" + (f" {r.speedup:.3f}x" if r.speedup is not None else "") for r in e2e.paths
        )
        dense = f"dense {e2e.dense.median_ms:.1f} ms" if e2e.dense else e2e.reason
        say(f"  {e2e.kind} batch {e2e.batch} x {e2e.prompt_tokens}: {dense}; {figures}")
    return {"model": "random LLaMA with SmolLM2-135M's config, magnitude 2:4", **report.model_dump(mode="json")}


# --- prune_cuda -----------------------------------------------------------------------------------------------


def _text(words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    vocabulary = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "as", "with", "by", "at", "from")
    return " ".join(rng.choice(vocabulary) for _ in range(words)) + "\n"


def _prune_job(folder: Path, device: torch.device, samples: int, seqlen: int, work: Path) -> dict[str, Any]:
    from secateurs.app.schemas import JobSpec, TextSource
    from secateurs.workers.pipeline import run_job

    text = work / f"{folder.name}.txt"
    text.write_text(_text(samples * seqlen * 2, 0), encoding="utf-8")
    spec = JobSpec(
        model=str(folder),
        method="sparsegpt",  # type: ignore[arg-type]
        calibration=TextSource(file=str(text)),
        calibration_samples=samples,
        calibration_seqlen=seqlen,
        evaluation=TextSource(file=str(text)),
        eval_seqlen=seqlen,
        eval_windows=4,
        device=device.type,
        measure_speed=False,  # timed in its own sections
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # What the check's earlier sections still hold in this process: the job's peak below includes it (a worker
    # process starts from none).
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    started = time.perf_counter()
    report = run_job(spec, output_dir=work / f"{folder.name}-out")
    seconds = time.perf_counter() - started
    data = report.model_dump(mode="json")
    entry: dict[str, Any] = {
        "model": folder.name,
        "calibration": f"{samples} x {seqlen} tokens",
        "seconds": seconds,
        "device_bytes_before": before,
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_device_memory_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
        # Whatever the report carries under these names (the fields change as the report grows).
        **{key: data[key] for key in ("timings", "environment", "memory", "perplexity") if key in data},
    }
    peak = entry["peak_device_memory_bytes"]
    say(f"  {folder.name}: {seconds:.1f} s" + (f", peak device memory {peak / 2**20:.1f} MiB" if peak else ""))
    return entry


def prune_cuda(device: torch.device, smoke: bool) -> dict[str, Any]:
    from tests.models import tiny_model_dir, tiny_tokenizer

    jobs = []
    with tempfile.TemporaryDirectory(prefix="secateurs-gpu-check-") as tmp:
        work = Path(tmp)
        tiny = tiny_model_dir("llama", work / "tiny-llama")
        jobs.append(_prune_job(tiny, device, 8, 32, work))
        shaped = work / ("smoke-shaped" if smoke else "smollm2-shaped")
        _random_model(SMOKE_CONFIG if smoke else SMOLLM2_CONFIG, torch.float32).save_pretrained(shaped)
        tiny_tokenizer().save_pretrained(shaped)
        jobs.append(_prune_job(shaped, device, 4 if smoke else 16, 32 if smoke else 256, work))
    return {"device": str(device), "jobs": jobs}


# --- main -----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and the test logs (created)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: check the script's logic")
    parser.add_argument("--only", default="", help="comma-separated section names to run (default: all)")
    parser.add_argument(
        "--tiles", default="", help="comma-separated token tiles the tuning step times (default: all; the rest keep "
        "the committed table's entries)"
    )  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run = Check(args.out, args.budget, args.smoke)
    device, smoke = run.device, args.smoke
    if device.type != "cuda" and not smoke:
        say("no CUDA GPU: nothing to check (use --smoke to run the logic on CPU)")
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) if device.type == "cuda" else 0
    only = {name for name in args.only.split(",") if name}
    tiles = [int(tile) for tile in args.tiles.split(",") if tile]
    sections: list[tuple[str, float, Callable[[], Any]]] = [
        ("environment", 5, lambda: environment(device)),
        ("kernel_check", 30, lambda: kernel_check(device, smoke)),
        # First the tuning: every later section runs the table it measured.
        ("kernel_configs", 30, lambda: kernel_configs(device, smoke, l2, min(120.0, run.left() - 150), tiles)),
        ("kernel_timing", 30, lambda: kernel_timing(device, smoke, l2)),
        ("eager_calls", 20, lambda: eager_calls(device, smoke)),
        ("decode_graph", 30, lambda: decode_graph(device, smoke)),
        ("speed_llama", 30, lambda: speed_llama(device, smoke)),
        ("pytest_gpu", 60, lambda: pytest_gpu(args.out, min(150.0, max(run.left() - 60, 60)))),
        ("prune_cuda", 40, lambda: prune_cuda(device, smoke)),
        ("speed_smollm2", 100, lambda: speed_smollm2(device, smoke)),
    ]
    unknown = only - {name for name, _, _ in sections}
    if unknown:
        names = ", ".join(name for name, _, _ in sections)
        parser.error(f"--only: no section {', '.join(sorted(unknown))}; the sections: {names}")
    for name, needs, section in sections:
        if only and name not in only:
            continue
        if device.type != "cuda" and not smoke and name != "environment":
            run.results["sections"][name] = {"status": "skipped", "reason": "no CUDA GPU"}
            continue
        run.section(name, needs, section)
    run.write()
    statuses = {name: entry["status"] for name, entry in run.results["sections"].items()}
    say(f"done in {run.results['seconds']} s: {statuses}; wrote {args.out / 'gpu_check.json'}")
    if any(status == "error" for status in statuses.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
