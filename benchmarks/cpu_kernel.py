"""The packed 2:4 CPU kernel against dense, layer by layer: LLaMA-7B-sized and SmolLM2-135M-sized linears.

    python benchmarks/cpu_kernel.py                                   # the full protocol (tens of minutes)
    python benchmarks/cpu_kernel.py --shapes smollm2 --tokens 1,16 --threads 1 --repetitions 20   # a quick look

For every (threads, dtype, shape, tokens): the dense product (the faster of ``F.linear`` and the project's own dense
route, ``kernels/matmul.py``'s ``linear``: oneDNN for fp32; for bf16, where the CPU has no bf16 arithmetic and fp32
products of fp32 copies measured faster at first use, those) against a :class:`PackedLinear` on the CPU, which runs the
packed kernel (``cpu_packed``) up to the shape's crossover and the dense tiles (``cpu_dense_tiles``) above it, the
crossover measured by the kernel at its first call, as in real use (``secateurs.kernels.sparse.cpu``). Each point:

* weights (and their packed forms) in enough copies to span 1.5× the last-level cache, used in turn, so no call
  reads its weight from cache (the dense and the packed sets each span it; the two dense variants read copies half
  the rotation apart, never the one the other just read);
* the packed output checked against the dense-with-zeros output (``mismatch``: the dtype's rtol, atol = rtol × RMS)
  before anything is timed;
* every packed copy called once, untimed (a decoding model's layers have all run after its first step: per-layer
  state such as the crossover lookup and the kernel's bound call exists), ``--warmup`` untimed calls, then
  ``--repetitions`` (≥ 20) timed with ``time.perf_counter``, the variants interleaved call by call (dense F.linear,
  dense oneDNN or fp32 copies, packed) so a noisy neighbour hits them alike;
* median, quartiles, min and max; speedup = dense median / packed median; the memory-bound limit of the point
  (weight + activation bytes, dense / packed: 1.88× fp32 and 1.78× bf16 at one token) and the fraction reached.

Writes JSON with the environment: CPU model, the flags the kernels look at, the instruction set the kernel ran,
threads, torch version, last-level cache, load average before and after. Targets (issue 10): 1 token ≥ 1.6×,
16 tokens ≥ 1.3×, ≥ 128 tokens never below 0.95×.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama7b": [(4096, 4096), (11008, 4096), (4096, 11008)],  # (out, in): q/k/v/o, gate/up, down
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],  # q/o, k/v, gate/up, down
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _say(message: str) -> None:
    print(f"[cpu-kernel] {message}", file=sys.stderr, flush=True)


def last_level_cache() -> tuple[int, str]:
    """Bytes of the largest cache level of cpu0 (``/sys``), and where the figure came from."""
    best, level = 0, 0
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            lvl = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        size = int(text.rstrip("KMG")) * scale
        if lvl >= level and size > best:
            best, level = size, lvl
    return (best, f"/sys/devices/system/cpu/cpu0/cache: L{level}") if best else (32 << 20, "unknown: assumed 32 MiB")


def cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vbmi", "avx512_bf16", "amx_bf16", "asimd")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [flag for flag in wanted if flag in have]
    except OSError:
        pass
    return []


def load_average() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def timing(samples: list[float]) -> dict[str, float]:
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {
        "median_ms": statistics.median(samples),
        "q1_ms": q1,
        "q3_ms": q3,
        "min_ms": min(samples),
        "max_ms": max(samples),
    }


def interleaved(variants: dict[str, Callable[[int], object]], warmup: int, repetitions: int) -> dict[str, list[float]]:
    """Milliseconds of each variant's calls: ``warmup`` untimed rounds, then ``repetitions`` timed rounds of one
    call each, the order rotating every round; call i uses weight copy i (modulo the copies)."""
    names = list(variants)
    for i in range(warmup):
        for key in names:
            variants[key](i)
    samples: dict[str, list[float]] = {key: [] for key in names}
    for i in range(repetitions):
        for j in range(len(names)):
            key = names[(i + j) % len(names)]
            begun = time.perf_counter()
            variants[key](warmup + i)
            samples[key].append((time.perf_counter() - begun) * 1e3)
    return samples


def shape_points(
    shape: tuple[int, int], dtype: Any, threads: int, args: argparse.Namespace, *, span: int, generator: Any
) -> list[dict[str, Any]]:
    """Every token count of one (threads, dtype, shape)."""
    import torch
    import torch.nn.functional as F

    from secateurs.kernels import matmul
    from secateurs.kernels.measure.speed import mismatch
    from secateurs.kernels.patterns import nm_prune_mask
    from secateurs.kernels.sparse import cpu
    from secateurs.kernels.sparse.packing import PackedLinear, PackedWeight, pack_nm

    out, inp = shape
    base = torch.randn(shape, generator=generator)
    base = base.masked_fill(nm_prune_mask(base.abs(), 2, 4), 0.0).to(dtype)  # [out, in]
    packed = pack_nm(base)
    n_dense = max(2, min(args.max_copies, -(-span // (out * inp * base.element_size()))))
    n_packed = max(2, min(args.max_copies, -(-span // packed.nbytes)))
    weights = [base.clone() for _ in range(n_dense)]  # each [out, in]
    layers = [
        PackedLinear(PackedWeight(packed.values.clone(), packed.indices.clone(), shape, 2, 4)) for _ in range(n_packed)
    ]
    points = []
    for tokens in args.tokens:
        x = torch.randn(tokens, inp, generator=generator).to(dtype)  # [tokens, in]
        point: dict[str, Any] = {
            "threads": threads,
            "dtype": str(dtype).removeprefix("torch."),
            "shape": [out, inp],
            "tokens": tokens,
            "copies": {"dense": n_dense, "packed": n_packed},
        }
        problem = mismatch(layers[0](x), F.linear(x, base))
        if problem is not None:
            point.update(status="failed", reason=f"packed output differs from dense: {problem}")
            points.append(point)
            _say(f"{threads}t {point['dtype']} {out}x{inp} x {tokens}: FAILED {problem}")
            continue
        variants: dict[str, Callable[[int], object]] = {
            "F.linear": lambda i, x=x: F.linear(x, weights[i % n_dense]),
            "packed": lambda i, x=x: layers[i % n_packed](x),
        }
        project_dense = _project_dense(dtype, tokens, base)
        if project_dense is not None:
            # Half the rotation away from F.linear's copy: both dense variants read copy i in the same round would
            # let the second read it from cache (a 576x576 fp32 weight fits a 2 MB L2), flattering dense.
            variants[project_dense] = lambda i, x=x: matmul.linear(x, weights[(i + n_dense // 2) % n_dense])
        for layer in layers:  # each copy called once, untimed, as every layer of a model is after its first step
            layer(x)
        timings = {key: timing(values) for key, values in interleaved(variants, args.warmup, args.repetitions).items()}
        dense_name = min((k for k in timings if k != "packed"), key=lambda k: timings[k]["median_ms"])
        speedup = timings[dense_name]["median_ms"] / timings["packed"]["median_ms"]
        activations = tokens * (inp + out) * base.element_size()
        memory_limit = (out * inp * base.element_size() + activations) / (packed.nbytes + activations)
        point.update(
            status="measured",
            path=layers[0].last_path,
            isa=cpu.isa_in_use(),
            kernel=cpu.kernel_in_use(dtype, dtype, tokens) if layers[0].last_path == cpu.KERNEL_NAME else None,
            dense=dense_name,
            timings=timings,
            speedup=speedup,
            memory_limit=memory_limit,
            fraction_of_memory_limit=speedup / memory_limit,
            packed_gb_per_s=(packed.nbytes + activations) / timings["packed"]["median_ms"] / 1e6,
        )
        points.append(point)
        _say(
            f"{threads}t {point['dtype']} {out}x{inp} x {tokens}: dense ({dense_name}) "
            f"{timings[dense_name]['median_ms']:.4f} ms, packed ({point['path']}, {point['kernel'] or point['isa']}) "
            f"{timings['packed']['median_ms']:.4f} ms: {speedup:.2f}x (memory limit {memory_limit:.2f}x)"
        )
    return points


def _project_dense(dtype: torch.dtype, tokens: int, weight: torch.Tensor) -> str | None:
    """The name of the project's own dense route for ``dtype`` (``kernels/matmul.py``'s ``linear``, what a decoding
    model's dense linears run) where it is not ``F.linear`` itself: oneDNN for fp32 wherever this build has it;
    fp32 products of fp32 copies for bf16 where those were measured faster than the CPU's own bf16 product and the
    call has the tokens to repay the weight's copy (``upcast_min_tokens``)."""
    import torch

    from secateurs.kernels import matmul

    if dtype == torch.float32:
        return "oneDNN" if matmul._onednn_linear_op() is not None else None
    upcast = matmul.linear_route(dtype) == "upcast" and tokens >= matmul.upcast_min_tokens(weight)
    return "fp32 copies" if upcast else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama7b,smollm2", help="llama7b, smollm2, or OUTxIN,... (comma list)")
    parser.add_argument("--tokens", type=_ints, default=(1, 4, 16, 64, 512))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=_ints, default=(1, 2))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--span", type=float, default=1.5, help="weight copies span this many last-level caches")
    parser.add_argument("--max-copies", type=int, default=16384)
    parser.add_argument("--isa", default="auto", help="auto, scalar, avx2, avx512, avx512bf16, amx")
    parser.add_argument("--kernel-dir", type=Path, default=None, help="build cache (default: the settings')")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.repetitions < 20:
        _say(f"note: {args.repetitions} repetitions is below the protocol's 20; fine for a look, not for a report")

    import torch

    from secateurs.app.settings import get_settings
    from secateurs.kernels.sparse import cpu
    from secateurs.workers.speed import cpu_name

    settings = get_settings()
    cpu.configure(build_dir=args.kernel_dir or settings.kernel_build_dir, isa=args.isa)
    if not cpu.ensure():
        _say(f"the kernel is unavailable: {cpu.describe().detail}")
    llc, llc_source = last_level_cache()
    span = int(args.span * llc)
    shapes: list[tuple[int, int]] = []
    for part in args.shapes.split(","):
        shapes += SHAPES.get(part.strip(), [])
        if part.strip() not in SHAPES and "x" in part:
            out, inp = part.lower().split("x")
            shapes.append((int(out), int(inp)))
    dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",") if name.strip()]
    name = cpu_name()
    output = args.output or ROOT / "benchmarks" / "results" / "cpu-kernel.json"
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "packed 2:4 CPU kernel vs dense, per layer (benchmarks/cpu_kernel.py)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": {
            "cpu": name,
            "cpu_flags": cpu_flags(),
            "logical_cpus": os.cpu_count(),
            "last_level_cache_bytes": llc,
            "last_level_cache_source": llc_source,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_average_before": load_average(),
        },
        "protocol": {
            "warmup": args.warmup,
            "repetitions": args.repetitions,
            "rotation_span_bytes": span,
            "timer": "perf_counter",
            "interleaved": "dense F.linear, the project's dense (oneDNN for fp32, fp32 copies for bf16 where they "
            "pay), packed: one call each in turn",
            "dense": "the faster (median) of F.linear and the project's dense route (kernels/matmul.py linear)",
            "packed": "PackedLinear on CPU: cpu_packed up to the crossover measured at its first call, "
            "cpu_dense_tiles above",
            "weights": "random normal, pruned 2:4 by magnitude, no bias",
        },
        "points": [],
    }
    generator = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype in dtypes:
            for shape in shapes:
                result["points"] += shape_points(shape, dtype, threads, args, span=span, generator=generator)
    kernel = cpu.describe()
    result["kernel"] = {
        "name": kernel.name,
        "available": kernel.available,
        "detail": kernel.detail,
        "crossovers": cpu.measured_crossovers(),  # measured at each shape's first call, with their cost
    }
    result["environment"]["load_average_after"] = load_average()
    result["seconds"] = round(time.perf_counter() - started, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    _say(f"wrote {output} in {result['seconds']} s")


if __name__ == "__main__":
    main()
