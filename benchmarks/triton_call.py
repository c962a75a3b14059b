"""What one eager call of the Triton 2:4 decode kernel costs the host: the launcher with its checks
(``packed24_linear``, the path of every call until 2026-12-01) against a layer's bound call (``PackedLinear`` after
its first dispatch to the kernel, ``triton_decode.bound_call``).

    python benchmarks/triton_call.py [--calls 5000] [--rounds 7] [--json OUT]

On CUDA it times real eager calls back to back, one token, bf16, on SmolLM2's and LLaMA-7B's shapes: dense
``F.linear`` (cuBLAS), the launcher, and the layer's bound call, per call (CUDA events around ``--calls`` calls, one
weight, hot): what a decode step outside a CUDA graph pays per linear, the launch included. Without CUDA it times
the Python part alone, on CPU tensors with Triton's launch replaced by a no-op (the kernels' ``__getitem__`` returns
a function that does nothing): the host's work before Triton's own launch path, which is not timed there. The
variants alternate round by round; medians of the rounds' per-call times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008))


class _NoLaunch:
    """A Triton kernel's stand-in: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextmanager
def launches_stubbed() -> Iterator[None]:
    """Triton's launch replaced by a no-op, and CPU tensors accepted as under the interpreter (CPU timing only)."""
    from secateurs.kernels.sparse import triton_decode as td

    saved = {name: getattr(td, name) for name in ("_kernel", "_words_kernel", "_select_kernel", "interpreting")}
    stub = _NoLaunch()
    td._kernel = td._words_kernel = td._select_kernel = lambda: stub  # type: ignore[assignment]
    td.interpreting = lambda: True  # type: ignore[assignment]
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(td, name, value)


def _per_call_us(call: Callable[[], object], calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / calls
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) * 1e6 / calls


def time_shape(
    shape: tuple[int, int], dtype: torch.dtype, device: torch.device, *, tokens: int, calls: int, rounds: int
) -> dict[str, Any]:
    """Per-call microseconds of each variant on one layer (medians over ``rounds``, variants alternating)."""
    from secateurs.kernels.sparse.packing import PackedLinear, bind_fast_call
    from secateurs.kernels.sparse.triton_decode import bound_call, packed24_linear, prepare_launch, random_24

    g = torch.Generator(device=device).manual_seed(shape[0] + shape[1])
    dense = random_24(*shape, dtype, device, g)  # [out, in]
    layer = PackedLinear.from_dense(dense)
    x = torch.randn(tokens, shape[1], generator=g, device=device).to(dtype)  # [tokens, in]
    if device.type != "cuda":  # the dispatch never takes CPU calls: bind as triton_kernel would on CUDA
        bind_fast_call(layer, "triton", bound_call(prepare_launch(x, layer.values, layer.indices), x))
    variants: dict[str, Callable[[], object]] = {
        "launcher": lambda: packed24_linear(x, layer.values, layer.indices),
        "bound": lambda: layer(x),
    }
    if device.type == "cuda":
        variants = {"dense": lambda: F.linear(x, dense), **variants}
    with torch.no_grad():
        for call in variants.values():  # compile (CUDA), bind, warm up
            for _ in range(3):
                call()
        if device.type == "cuda":
            torch.testing.assert_close(layer(x).float(), F.linear(x, dense).float(), rtol=2e-2, atol=2e-2)
            assert layer.last_path == "triton", layer.last_path
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, call in variants.items():
                samples[name].append(_per_call_us(call, calls, device))
    point: dict[str, Any] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "tokens": tokens}
    for name, values in samples.items():
        point[f"{name}_us"] = statistics.median(values)
        point[f"{name}_us_range"] = [min(values), max(values)]
    point["launcher_over_bound"] = point["launcher_us"] / point["bound_us"]
    return point


def environment(device: torch.device) -> dict[str, Any]:
    import datetime as dt
    import os
    import platform

    from secateurs.workers.speed import cpu_isa, cpu_name

    facts: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_name(),
        "isa": cpu_isa(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000, help="calls per round and variant (default 5000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds, the variants alternating (default 7)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float16
    mode = "eager calls on CUDA, launch included" if cuda else "the Python part on CPU, Triton's launch a no-op"
    print(f"{mode}: per call, medians of {args.rounds} rounds of {args.calls} calls", flush=True)
    points = []
    for tokens in (1, 4):
        for shape in SHAPES if tokens == 1 else SHAPES[:1]:
            if cuda:
                point = time_shape(shape, dtype, device, tokens=tokens, calls=args.calls, rounds=args.rounds)
            else:
                with launches_stubbed():
                    point = time_shape(shape, dtype, device, tokens=tokens, calls=args.calls, rounds=args.rounds)
            points.append(point)
            dense = f"dense {point['dense_us']:.1f} us, " if "dense_us" in point else ""
            print(
                f"  {shape[0]} x {shape[1]}, {tokens} token(s): {dense}launcher {point['launcher_us']:.1f} us, "
                f"bound {point['bound_us']:.1f} us ({point['launcher_over_bound']:.2f}x)",
                flush=True,
            )
    result = {"mode": mode, "calls": args.calls, "rounds": args.rounds, "environment": environment(device)}
    result["points"] = points
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
