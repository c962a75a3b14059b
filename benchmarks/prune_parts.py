"""Where P-CPU's SparseGPT prune time goes, block by block, on this machine.

    python benchmarks/prune_parts.py [--blocks N] [--output FILE]

The same prune as ``benchmarks/quality_cpu.py``'s SparseGPT row (SmolLM2-135M fp32, 64 × 512 c4 calibration
tokens, 2:4, the ``prune_model_`` call of ``secateurs prune``, inside ``heap_allocations`` as a job runs it), over
the first ``--blocks`` decoder blocks (default: all), with wall-clock timers around the parts of a block:

* ``forward linears``: the calibration forward's matrix products (``secateurs.kernels.matmul.linear`` and
  ``torch.nn.functional.linear``: MKL or oneDNN, whichever was measured faster at first use);
* ``hessians``: the upper-triangle products X Xᵀ (``gram_upper_``, SparseGPT §3);
* ``attention``: ``torch.nn.functional.scaled_dot_product_attention``;
* ``factorization``: the dampened inverse Cholesky factor, once per group of layers sharing an input (§3);
* ``sweep``: the 2:4 column sweep with its lazy updates (§3.3–3.4);
* ``layer errors``: the two quadratic forms of each layer's reported reconstruction error;
* ``rest``: everything else in the blocks (norms, rotary embeddings, SiLU, residual adds, the hooks' bookkeeping).

A timer nested in another (a product inside the factorization) counts for the outer one only. No profiler: its
overhead on the large element-wise kernels had misattributed them before (``docs/engine.md``, seventh round).
Prints a table and writes the seconds (total and per block), each block's time, the peak RSS (``ru_maxrss``: model,
calibration and prune), the heap's trim bound between blocks and the environment as JSON.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=None, help="prune only the first N decoder blocks")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON here (default: print only)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateurs.app.schemas import TextSource
    from secateurs.kernels import matmul
    from secateurs.kernels.patterns import SparsityPattern
    from secateurs.kernels.pruning import driver, hessian, native
    from secateurs.workers.allocator import heap_allocations
    from secateurs.workers.assets import fetch_assets
    from secateurs.workers.data import calibration_windows, read_text, tokenize
    from secateurs.workers.speed import cpu_isa, cpu_name

    assets = fetch_assets(args.cache)
    native.configure(build_dir=args.cache / "kernels")
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2)
    model = AutoModelForCausalLM.from_pretrained(assets.smollm2, dtype=torch.float32).eval()
    blocks = model.model.layers
    count = len(blocks) if args.blocks is None else max(1, min(args.blocks, len(blocks)))
    model.model.layers = blocks[:count]
    calibration = calibration_windows(tokenize(tokenizer, read_text(TextSource(file=str(assets.c4))).text), 64, 512, 0)

    seconds: dict[str, float] = collections.defaultdict(float)
    inside = [0]

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            if inside[0]:
                return fn(*a, **k)
            inside[0] += 1
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - started
                inside[0] -= 1

        return wrapper

    # each patched where it is looked up when called (module globals)
    matmul.linear = timed("forward linears", matmul.linear)
    driver.linear = matmul.linear
    F.linear = timed("forward linears", F.linear)  # nn.Linear's own forward, where MKL was measured the faster
    hessian.gram_upper_ = timed("hessians", hessian.gram_upper_)
    F.scaled_dot_product_attention = timed("attention", F.scaled_dot_product_attention)
    driver.dampened_inverse_cholesky = timed("factorization", driver.dampened_inverse_cholesky)
    driver.sparsegpt_ = timed("sweep", driver.sparsegpt_)
    driver._quadratic_form = timed("layer errors", driver._quadratic_form)

    per_block: list[float] = []
    config = driver.PruneConfig(method="sparsegpt", pattern=SparsityPattern.nm(2, 4))
    load_before = os.getloadavg()
    with heap_allocations() as heap:

        def on_block(progress: driver.BlockProgress) -> None:
            per_block.append(progress.seconds)
            heap.between_blocks()
            print(f"[parts] block {progress.index + 1}/{progress.total} {progress.seconds:.2f} s", file=sys.stderr)

        result = driver.prune_model_(model, calibration, config, on_block=on_block)
        growth_bound = heap.growth_bound
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    in_blocks = sum(per_block)
    seconds["rest"] = in_blocks - sum(seconds.values())
    parts = {name: round(value, 2) for name, value in sorted(seconds.items(), key=lambda kv: -kv[1])}
    out = {
        "benchmark": "P-CPU SparseGPT 2:4 prune time by part (benchmarks/prune_parts.py)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "blocks": count,
        "prune_seconds": round(result.seconds, 2),
        "block_seconds": [round(value, 2) for value in per_block],
        "parts_seconds": parts,
        "parts_seconds_per_block": {name: round(value / count, 3) for name, value in parts.items()},
        "peak_rss_gb": round(peak_rss / 1e9, 3),
        "heap_growth_bound_mb": round(growth_bound / 2**20, 1),
        "first_block_note": "block 1's time includes catching the blocks' inputs (embeddings of 64 x 512 tokens)",
        "environment": {
            "cpu": cpu_name(),
            "isa": cpu_isa(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "gemm": {kind: matmul.cpu_gemm_backend(kind) for kind in ("linear", "gram")},
            "cpu_sweep": native.describe(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
    }
    print(
        f"{count} blocks, {result.seconds:.1f} s ({in_blocks / count:.2f} s per block), "
        f"peak RSS {peak_rss / 1e9:.2f} GB, heap trimmed past {growth_bound / 2**20:.0f} MiB of growth"
    )
    for name, value in parts.items():
        print(f"  {name:16s} {value:8.2f} s  {value / count:6.3f} s/block  {100 * value / in_blocks:5.1f} %")
    if args.output:
        args.output.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
