"""P-CPU prune time of the reference SparseGPT code, for the side-by-side ratio of issue 11 item 4.

    python benchmarks/reference_sparsegpt.py --reference DIR [--output FILE] [--skip-ours]

``DIR`` is a checkout of IST-DASLab/sparsegpt (github.com/IST-DASLab/sparsegpt; not part of this
repository, nothing of it is copied here: its ``sparsegpt.py`` is imported from ``DIR`` unchanged). The
script runs, each in a fresh process and back to back: secateurs' P-CPU SparseGPT prune
(``benchmarks/quality_cpu.py``'s row), the reference, and secateurs again, and writes the three times, the
ratios and the environment to ``--output``.

The reference run follows ``llama.py``'s ``llama_sequential`` (the reference's own driver, default options:
not ``--true-sequential``): the inputs of block 0 are caught for each of the 64 windows, then per block a
``SparseGPT`` object per linear, forward hooks calling ``add_batch`` while every window runs through the
block one at a time ([1, 512, hidden]), ``fasterprune(0.5, prunen=2, prunem=4, blocksize=128,
percdamp=0.01)`` per linear, and a second pass over the windows for the next block's inputs. Adapted only
where transformers 5 requires it: every keyword argument block 0 receives (rotary ``position_embeddings``,
the attention mask, ...) is replayed, not only ``attention_mask``; ``torch.cuda.synchronize`` is a no-op on a
machine without CUDA. Same model (SmolLM2-135M fp32), same 64 × 512 calibration windows, same thread count.
The timed span, as for secateurs' ``prune_seconds``: from catching block 0's inputs to the last block pruned.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_reference(reference: Path, cache: Path) -> dict[str, object]:
    """The reference's SparseGPT over SmolLM2 in this process; its prune seconds and what it ran."""
    import torch
    import transformers
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateurs.app.schemas import TextSource
    from secateurs.workers.assets import fetch_assets
    from secateurs.workers.data import calibration_windows, read_text, tokenize

    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None  # fasterprune calls it unconditionally
    sys.path.insert(0, str(reference))
    from sparsegpt import SparseGPT  # type: ignore[import-not-found]

    assets = fetch_assets(cache)
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2)
    model = AutoModelForCausalLM.from_pretrained(assets.smollm2, dtype=torch.float32).eval()
    model.config.use_cache = False
    calibration = calibration_windows(tokenize(tokenizer, read_text(TextSource(file=str(assets.c4))).text), 64, 512, 0)
    layers = model.model.layers
    samples = calibration.shape[0]

    class Caught(Exception):
        pass

    inputs: list[torch.Tensor] = []
    kwargs_of_block0: dict[str, Any] = {}

    class Catcher(nn.Module):  # llama_sequential's Catcher, keeping every keyword argument
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, inp: torch.Tensor, **kwargs: Any) -> None:
            inputs.append(inp)
            kwargs_of_block0.update(kwargs)
            raise Caught

    started = time.perf_counter()
    with torch.no_grad():
        layers[0] = Catcher(layers[0])
        for j in range(samples):
            with contextlib.suppress(Caught):
                model(calibration[j : j + 1])
        layers[0] = layers[0].module
        inps = torch.cat(inputs)  # [samples, 512, hidden]
        outs = torch.zeros_like(inps)
        for i in range(len(layers)):
            layer = layers[i]
            full = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            gpts = {name: SparseGPT(module) for name, module in full.items()}

            def add_batch(name: str, gpts: dict[str, Any] = gpts) -> Any:
                def hook(_module: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                    gpts[name].add_batch(inp[0].data, out.data)

                return hook

            handles = [full[name].register_forward_hook(add_batch(name)) for name in full]
            for j in range(samples):
                outs[j] = layer(inps[j].unsqueeze(0), **kwargs_of_block0)[0]
            for handle in handles:
                handle.remove()
            for name in full:
                gpts[name].fasterprune(0.5, prunen=2, prunem=4, blocksize=128, percdamp=0.01)
                gpts[name].free()
            for j in range(samples):
                outs[j] = layer(inps[j].unsqueeze(0), **kwargs_of_block0)[0]
            del gpts
            inps, outs = outs, inps
            print(f"[reference] block {i + 1}/{len(layers)} {time.perf_counter() - started:.1f} s", file=sys.stderr)
    seconds = time.perf_counter() - started
    for name, module in model.named_modules():  # the result is 2:4: two zeros in every group of four
        if isinstance(module, nn.Linear) and ".layers." in name:
            groups = module.weight.reshape(-1, 4)
            assert bool(((groups == 0).sum(dim=1) >= 2).all()), f"{name} is not 2:4 after the reference ran"
    return {
        "prune_seconds": round(seconds, 2),
        "load_average_after": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _ours(cache: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality_cpu.py"), "--one", "sparsegpt", "--cache", str(cache)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu() -> tuple[str, str]:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    field = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in reversed(info) if ":" in ln}
    flags = set(field.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2 + FMA, no AVX-512" if "avx2" in flags else "no AVX2"
    name = field.get("model name", platform.processor())
    return f"{name} (family {field.get('cpu family')} model {field.get('model')})", isa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "p-cpu-avx2.json")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: the reference, JSON out
    args = parser.parse_args()
    if not (args.reference / "sparsegpt.py").is_file():
        parser.error(f"--reference {args.reference}: no sparsegpt.py there; clone IST-DASLab/sparsegpt and name it")
    if args.one:
        print(json.dumps(run_reference(args.reference, args.cache)))
        return
    commit = subprocess.run(
        ["git", "-C", str(args.reference), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    rows = []
    print("[p-cpu] secateurs ...", file=sys.stderr, flush=True)
    rows.append(_ours(args.cache))
    print(f"[p-cpu] secateurs: {rows[-1]['prune_seconds']} s; reference ...", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, __file__, "--one", "--reference", str(args.reference), "--cache", str(args.cache)],
        stdout=subprocess.PIPE, text=True, check=True,
    )  # fmt: skip
    reference = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[p-cpu] reference: {reference['prune_seconds']} s; secateurs again ...", file=sys.stderr, flush=True)
    rows.append(_ours(args.cache))
    print(f"[p-cpu] secateurs: {rows[-1]['prune_seconds']} s", file=sys.stderr, flush=True)
    cpu, isa = _cpu()
    import torch
    import transformers

    out = {
        "benchmark": "P-CPU SparseGPT 2:4 prune time beside the reference code (issue 11 item 4)",
        "date": time.strftime("%Y-%m-%d"),
        "environment": {
            "cpu": cpu,
            "isa": isa,
            "cores": os.cpu_count(),
            "threads": reference["threads"],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "conditions": "the three runs back to back, each in a fresh process: secateurs, reference, secateurs",
        },
        "results": rows,
        "reference": {
            "code": f"IST-DASLab/sparsegpt sparsegpt.py (commit {commit or 'unknown'}, unchanged), driven as "
            "benchmarks/reference_sparsegpt.py describes; same model, same 64 x 512 calibration windows",
            **reference,
        },
        "ratio": [round(float(row["prune_seconds"]) / float(reference["prune_seconds"]), 3) for row in rows],
        "target": "<= 0.5x the reference, ppl <= 116",
    }
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["ratio"]), file=sys.stderr)


if __name__ == "__main__":
    main()
