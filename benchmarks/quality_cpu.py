"""Protocol P-CPU: quality and prune time of dense, magnitude, Wanda and SparseGPT 2:4 on SmolLM2-135M.

    python benchmarks/quality_cpu.py [--methods dense,magnitude,wanda,sparsegpt] [--output FILE]
                                     [--calibration-precision fp32|bf16] [--refine-iterations N]
                                     [--dense-target ALPHA]

P-CPU: SmolLM2-135M-Instruct (the offline asset), fp32 on CPU; calibration 64 windows × 512 tokens of
exllamav2's ``c4.utf8`` (tokenized whole; ``rng = random.Random(0)``, window k starts at
``rng.randint(0, n_tokens - 513)``, in order); every linear inside the decoder blocks pruned; evaluation on
the first 64 non-overlapping 512-token windows of WikiText-2 raw test (exact bytes, CRLF kept), tokenized
whole with ``add_special_tokens=False``, no BOS. Each method runs in a fresh process so that its peak RSS
is its own. The pruning is the same ``secateurs.kernels.pruning.driver.prune_model_`` call that ``secateurs
prune`` makes.
``--calibration-precision bf16`` runs the calibration forwards under bf16 autocast (Hessians and the solve
stay fp32): a variant of the protocol, recorded as ``protocol.calibration_precision`` in every row. Each row
also records the load average before and after its run (the 2-core VM is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_one(
    method: str, cache: Path, precision: str = "fp32", refine: int = 0, dense_target: float = 0.0
) -> dict[str, object]:
    """One method in this process: prune (unless dense), evaluate, report time and peak RSS."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateurs.app.schemas import TextSource
    from secateurs.kernels.measure.perplexity import eval_windows, perplexity
    from secateurs.kernels.patterns import SparsityPattern
    from secateurs.kernels.pruning import native
    from secateurs.kernels.pruning.driver import PruneConfig, prune_model_
    from secateurs.workers.allocator import heap_allocations
    from secateurs.workers.assets import fetch_assets
    from secateurs.workers.data import calibration_windows, read_text, tokenize

    assets = fetch_assets(cache)
    native.configure(build_dir=cache / "kernels")  # where jobs build the C++ sweep (SECATEURS_KERNEL_DIR's default)
    assert assets.wikitext2_test is not None, "P-CPU needs ../shared/data/wikitext-2-raw/wiki.test.raw"
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2)
    model = AutoModelForCausalLM.from_pretrained(assets.smollm2, dtype=torch.float32).eval()
    calib_text = read_text(TextSource(file=str(assets.c4)))
    calibration = calibration_windows(tokenize(tokenizer, calib_text.text), 64, 512, 0)
    wiki = read_text(TextSource(file=str(assets.wikitext2_test)))
    wiki_tokens = tokenize(tokenizer, wiki.text)
    result: dict[str, object] = {"method": method, "load_average_before": os.getloadavg()}
    if method != "dense":
        config = PruneConfig(
            method=method,  # type: ignore[arg-type]
            pattern=SparsityPattern.nm(2, 4),
            calibration_precision=precision,  # type: ignore[arg-type]
            refine_iterations=refine if method in ("wanda", "sparsegpt") else 0,
            dense_target=dense_target if method == "sparsegpt" else 0.0,
        )
        started = time.perf_counter()
        with heap_allocations() as heap:  # as run_job does
            tokens = None if method == "magnitude" else calibration
            pruned = prune_model_(model, tokens, config, on_block=lambda _block: heap.between_blocks())
        result["prune_seconds"] = round(time.perf_counter() - started, 2)
        result["layers_pruned"] = len(pruned.layers)
        errors = [layer.error for layer in pruned.layers if layer.error is not None]
        result["mean_layer_error"] = sum(errors) / len(errors) if errors else None
        result["load_average_after_prune"] = os.getloadavg()
    result["peak_rss_gb_after_prune"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
    started = time.perf_counter()
    with heap_allocations():
        ppl = perplexity(model, eval_windows(wiki_tokens, 512, 64), batch_size=8)
    result["eval_seconds"] = round(time.perf_counter() - started, 2)
    result["perplexity"] = round(ppl.value, 3)
    result["protocol"] = {
        "eval_text": "wikitext-2-raw wiki.test.raw", "eval_sha256": wiki.sha256,
        "eval_text_tokens": wiki_tokens.numel(),
        "window": ppl.seqlen, "windows": ppl.windows, "predicted_tokens": ppl.predicted_tokens, "bos": ppl.bos,
        "calibration_text": "exllamav2 c4.utf8", "calibration_sha256": calib_text.sha256,
        "calibration_samples": 64, "calibration_seqlen": 512, "seed": 0, "dtype": "float32",
        "calibration_precision": precision if method in ("wanda", "sparsegpt") else None,
        "refine_iterations": refine if method in ("wanda", "sparsegpt") else None,
        "dense_target": dense_target if method == "sparsegpt" else None,
    }  # fmt: skip
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    result["cpu_sweep"] = native.describe()
    result["threads"] = torch.get_num_threads()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "p-cpu.json")
    parser.add_argument(
        "--calibration-precision", choices=("fp32", "bf16"), default="fp32",
        help="calibration forward's matrix products (P-CPU proper is fp32)",
    )  # fmt: skip
    parser.add_argument(
        "--refine-iterations", type=int, default=0,
        help="conjugate-gradient re-solve steps after the mask (kernels/pruning/refine.py; P-CPU proper: 0)",
    )  # fmt: skip
    parser.add_argument(
        "--dense-target", type=float, default=0.0,
        help="SparseGPT's dense-target step fraction (kernels/pruning/driver.py; P-CPU proper: 0)",
    )  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single method, print JSON
    args = parser.parse_args()
    if args.one:
        print(
            json.dumps(
                run_one(args.one, args.cache, args.calibration_precision, args.refine_iterations, args.dense_target)
            )
        )
        return
    rows = []
    for method in args.methods.split(","):
        print(f"[p-cpu] {method} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--one", method, "--cache", str(args.cache),
             "--calibration-precision", args.calibration_precision,
             "--refine-iterations", str(args.refine_iterations), "--dense-target", str(args.dense_target)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"[p-cpu] {method}: {row}", file=sys.stderr, flush=True)
        rows.append(row)
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    out = {
        "benchmark": "P-CPU quality and prune time (benchmarks/quality_cpu.py)",
        "date": time.strftime("%Y-%m-%d"),
        "environment": {
            "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": rows,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"[p-cpu] wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
