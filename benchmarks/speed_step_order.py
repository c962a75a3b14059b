"""The job's CPU speed step on a pruned model folder, end to end: dense and the packed path alternating run by run
(the default since 2026-12-01) against one side after the other, with 3 and with 5 runs; prints each variant's
prefill and decode speedups and the whole step's seconds, the variants in turn, twice.

    python benchmarks/speed_step_order.py OUT_DIR [--threads 2]    # OUT_DIR: a `secateurs prune` output folder

Results of 2026-12-01 (AMD EPYC Zen 4, SmolLM2-135M pruned 2:4): benchmarks/results/speed-step-order-epyc-zen4.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

VARIANTS = (
    ("interleaved, 3 runs", {"e2e_interleaved": True, "e2e_repetitions": 3}),
    ("one side after the other, 3 runs", {"e2e_interleaved": False, "e2e_repetitions": 3}),
    ("interleaved, 5 runs", {"e2e_interleaved": True, "e2e_repetitions": 5}),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a pruned HF folder (dense with zeros), as `secateurs prune` writes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="times each variant runs, in turn (default 2)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from secateurs.kernels.measure.speed import sparse_paths
    from secateurs.kernels.patterns import SparsityPattern
    from secateurs.kernels.pruning.driver import PruneConfig, plan_layers
    from secateurs.workers import speed

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    _, _, per_block = plan_layers(model, PruneConfig(method="sparsegpt"))
    names = [layer.name for layers in per_block for layer in layers]
    cpu = torch.device("cpu")
    base = speed._fit_positions(speed.default_settings(cpu, torch.float32, sparse_paths()), model)
    for _ in range(args.rounds):
        for label, changes in VARIANTS:
            started = time.perf_counter()
            report = speed.run_speed_step(
                model, names, SparsityPattern.nm(2, 4), cpu, settings=dataclasses.replace(base, **changes)
            )
            speedups = {
                run.kind: [(p.path, round(p.speedup, 3)) for p in run.paths if p.speedup is not None]
                for run in report.end_to_end
            }
            print(f"{label}: {time.perf_counter() - started:.1f} s, {speedups}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
