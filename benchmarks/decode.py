"""End-to-end decode benchmark: SmolLM2-135M pruned 2:4, dense versus packed, greedy generation through
``model.generate`` (the same code as ``secateurs bench``), plus the memory ``secateurs.load`` adds.

    python benchmarks/decode.py                               # fp32 and bf16, batch 1 and 8, memory; writes JSON
    python benchmarks/decode.py --dtypes float32 --batches 1 --repetitions 5 --no-memory   # a quick look

What it does, each figure with its conditions in the JSON (CPU model and instruction sets or GPU, threads, torch,
transformers, load average, the kernels registered and the ones that ran):

* **The model**: SmolLM2-135M-Instruct (the offline asset) pruned 2:4 by magnitude (``--pruned DIR`` reuses an
  output folder; otherwise one is written to a temporary folder and removed). The weights' values do not change
  the speed; both models generate from the same prompt, and the report says whether their tokens agree.
* **Decode** (``--dtypes`` x ``--batches``): :func:`secateurs.workers.bench.run_bench`: dense = the HF folder
  (pruned weights stored as zeros), packed = ``secateurs.load`` (``PackedLinear`` on the fastest registered
  path); ``--warmup`` untimed runs each, then ``--repetitions`` timed runs alternating; decode tokens/s from the
  first generated token to the last (prefill excluded), median and spread. Every dense linear (the dense
  model's, the packed one's ``lm_head``) runs through secateurs' faster dense products (oneDNN or MKL, as measured
  on this CPU); ``--dense-linears torch`` leaves them on transformers' ``F.linear``, which flatters the packed
  model where MKL's fp32 products are slow (AMD CPUs; the JSONs before 2026-11-30 were measured that way).
* **Memory** (fp32): in a fresh subprocess each, the peak RSS that loading adds (over a baseline taken after every
  import), for the dense folder (``from_pretrained``, whose weights are memory-mapped: pages count once read) and
  for the packed form (``secateurs.load``), (a) after loading and reading every weight once, (b) after that and
  one 8-token forward. The issue's bound: packed <= 0.7x dense.

Targets (issue 10): batch 1 >= 1.3x tokens/s in fp32 and in bf16; batch 8 >= 1.15x; memory <= 0.7x. The JSON
says which were met on this machine. Writes ``benchmarks/results/decode-<device>.json`` unless ``--output``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"batch 1": 1.3, "batch 8": 1.15, "memory": 0.7}

_MEMORY_PROBE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
import secateurs
from secateurs.workers.runtime import load_pruned  # every import before the baseline

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

kind, folder, warm = sys.argv[1], sys.argv[2], sys.argv[3]

def load(path):
    if kind == "dense":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return secateurs.load(path, device="cpu")

with torch.no_grad():  # a tiny model of the same kind, loaded and run once: the loader's and the kernels' code
    load(warm)(input_ids=torch.arange(8).unsqueeze(0))  # pages (tens of MB, CPU-dependent) before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from the current RSS
base = status("VmRSS")
model = load(folder)
with torch.no_grad():
    total = sum(float(t.float().sum()) for t in (*model.parameters(), *model.buffers()))  # every weight read once
    loaded = {"peak": status("VmHWM") - base, "after": status("VmRSS") - base}
    model(input_ids=torch.arange(8).unsqueeze(0))
print(json.dumps({"loaded": loaded, "forward": {"peak": status("VmHWM") - base, "after": status("VmRSS") - base}}))
"""


def _say(message: str) -> None:
    print(f"[decode] {message}", file=sys.stderr, flush=True)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _tiny_pruned(folder: Path) -> Path:
    """A tiny LLaMA cut 2:4 by magnitude, saved dense and packed (the probes' warm-up)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from secateurs.workers.packed import PACKED_DIR, write_packed

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=128
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    targets = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                weight = module.weight.view(-1, 4)  # [out·in/4, 4]
                weight.scatter_(-1, weight.abs().argsort(dim=-1)[:, :2], 0.0)  # the 2 smallest of every 4
                targets[f"{name}.weight"] = False
    model.save_pretrained(folder, safe_serialization=True)
    write_packed(folder, folder / PACKED_DIR, targets, 2, 4)
    return folder


def pruned_smollm2(folder: Path | None, scratch: Path, cache: Path | None, say: Any) -> Path:
    """``folder`` when given, else SmolLM2-135M-Instruct (the offline asset, from ``cache`` or the settings' cache
    folder) pruned 2:4 by magnitude into ``scratch``: the weights' values do not change the speed."""
    if folder is not None:
        return folder
    from secateurs import prune
    from secateurs.app.settings import get_settings
    from secateurs.workers.assets import fetch_assets

    smollm2 = fetch_assets(cache or get_settings().cache_dir).smollm2
    folder = scratch / "smollm2-magnitude-2of4"
    say(f"pruning {smollm2} 2:4 by magnitude into {folder}")
    prune(smollm2, method="magnitude", output=folder, device="cpu", measure_speed=False)
    return folder


def _memory(folder: Path) -> dict[str, Any]:
    """Peak RSS added by loading the dense folder and the packed form, each in a fresh subprocess."""
    sides = {}
    with tempfile.TemporaryDirectory(prefix="secateurs-warm-") as scratch:
        warm = _tiny_pruned(Path(scratch) / "tiny")
        for kind in ("dense", "packed"):
            sides[kind] = _probe(kind, folder, warm)
    return {
        "protocol": "fresh subprocess each; a tiny model of the same kind loaded and run once first, so that code "
        "pages (the loader's, the kernels') are resident; then the baseline RSS, VmHWM reset via "
        "/proc/self/clear_refs; 'loaded' = after loading and reading every weight once (the dense weights are "
        "memory-mapped and count once read), 'forward' = after one more 8-token forward; bytes",
        "dense": sides["dense"],
        "packed": sides["packed"],
        "ratio_loaded_peak": sides["packed"]["loaded"]["peak"] / sides["dense"]["loaded"]["peak"],
        "ratio_forward_peak": sides["packed"]["forward"]["peak"] / sides["dense"]["forward"]["peak"],
    }


def _probe(kind: str, folder: Path, warm: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, kind, str(folder), str(warm)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    _say(f"  memory {kind}: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--batches", type=_ints, default=(1, 8))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--pruned", type=Path, default=None, help="a pruned SmolLM2 output folder to reuse")
    parser.add_argument("--no-memory", action="store_true", help="skip the load-memory measurement")
    parser.add_argument("--cache", type=Path, default=None, help="offline assets (default: the settings' cache dir)")
    parser.add_argument(
        "--dense-linears",
        choices=("fast", "torch"),
        default="fast",
        help="the dense linears (the dense model's, the packed one's lm_head): fast (secateurs' faster dense "
        "products, kernels/matmul.py) or torch (F.linear, as transformers runs them)",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    import torch
    import transformers

    from secateurs.kernels.sparse.packing import describe_packed_kernels
    from secateurs.workers.bench import run_bench
    from secateurs.workers.pipeline import quiet_libraries
    from secateurs.workers.speed import cpu_isa, cpu_name

    quiet_libraries()
    if args.threads and args.threads > 0:  # before the kernels describe themselves (they name the threads)
        torch.set_num_threads(args.threads)

    device = args.device
    name = cpu_name() if device == "cpu" else torch.cuda.get_device_name(torch.device(device))
    slug = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    output = args.output or ROOT / "benchmarks" / "results" / f"decode-{slug}.json"
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "secateurs end-to-end greedy decode, dense vs packed (benchmarks/decode.py)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": {
            "device": device,
            "device_name": name,
            "isa": cpu_isa() if device == "cpu" else None,
            "threads": args.threads or torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()),
            "kernels": [
                {"name": d.name, "available": d.available, "detail": d.detail} for d in describe_packed_kernels()
            ],
        },
        "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="secateurs-decode-") as scratch:
        folder = pruned_smollm2(args.pruned, Path(scratch), args.cache, _say)
        result["model"] = {"folder": str(folder), "pruning": "SmolLM2-135M-Instruct, magnitude 2:4 (fp32 checkpoint)"}
        runs = []
        for dtype in args.dtypes.split(","):
            for batch in args.batches:
                _say(f"{dtype}, batch {batch}")
                report = run_bench(
                    folder,
                    device=device,
                    dtype=dtype,
                    batch=batch,
                    prompt_tokens=args.prompt_tokens,
                    new_tokens=args.new_tokens,
                    warmup=args.warmup,
                    repetitions=args.repetitions,
                    threads=args.threads,
                    dense_linears=args.dense_linears,
                    say=lambda line: _say(f"  {line}"),
                )
                target = TARGETS.get(f"batch {batch}")
                _say(f"  {dtype} batch {batch}: {report.speedup:.3f}x (target {target}), ran {report.packed.paths}")
                runs.append(
                    {
                        "dtype": dtype,
                        "batch": batch,
                        "dense_linears": args.dense_linears,
                        "target": target,
                        "met": None if target is None else report.speedup >= target,
                        **report.model_dump(mode="json"),
                    }
                )
        result["decode"] = runs
        if not args.no_memory and device == "cpu":
            _say("memory that loading adds (fp32)")
            memory = _memory(folder)
            memory["met"] = memory["ratio_loaded_peak"] <= TARGETS["memory"]
            result["memory"] = memory
    result["seconds"] = round(time.perf_counter() - started, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    _say(f"wrote {output} in {result['seconds']} s")


if __name__ == "__main__":
    main()
