"""Speed sweep: dense versus every 2:4 path of this device, on SmolLM2-135M and on LLaMA-7B-sized 2:4 layers.

    python benchmarks/speed.py                       # the full protocol on a CUDA GPU (auto-detected)
    python benchmarks/speed.py --device cpu --prefill 1x512 --llama-tokens 1,16,128,512,2048 \\
        --warmup 2 --repetitions 7                    # the short CPU run committed in speed-cpu.json

Two parts, each the same code the job's speed step runs (``secateurs.kernels.measure.speed``), with the conditions
of every figure (device, driver, CUDA, torch, cuSPARSELt, dtype, warm-up, repetitions, rotation,
median/IQR/min/max, the physical limit and its basis):

* **SmolLM2-135M-Instruct** (the offline asset), pruned 2:4 by magnitude (the weights' values do not change the
  speed; every sparse path is still checked against the dense-with-zeros output before it is timed): every
  distinct linear shape at each token count, then end to end (prefill latency, decode tokens/s), both eager.
* **LLaMA-7B-sized random 2:4 layers**, bf16: (out, in) = (4096, 4096) ×128, (11008, 4096) ×64,
  (4096, 11008) ×32 (q/k/v/o, gate/up, down of 32 blocks).

Writes ``benchmarks/results/speed-<device>.json`` (``speed-cpu.json`` on a CPU; the GPU's name otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_7B_SHAPES = {(4096, 4096): 128, (11008, 4096): 64, (4096, 11008): 32}  # (out, in) -> layers in the model


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for part in text.split(","):
        if part.strip():
            batch, tokens = part.lower().split("x")
            pairs.append((int(batch), int(tokens)))
    return tuple(pairs)


def _say(message: str) -> None:
    print(f"[speed] {message}", file=sys.stderr, flush=True)


def _point(point: Any) -> None:
    paths = ", ".join(
        f"{r.path} {r.status}" + (f" {r.speedup:.3f}x" if r.speedup is not None else "") for r in point.paths
    )
    _say(f"  {point.shape} x {point.tokens} tokens: dense {point.dense.median_ms:.4f} ms; {paths}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    parser.add_argument("--tokens", type=_ints, default=(1, 16, 128, 512, 2048), help="token counts per shape")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per point (device default)")
    parser.add_argument("--repetitions", type=int, default=None, help="timed calls per point (device default)")
    parser.add_argument("--e2e-warmup", type=int, default=None)
    parser.add_argument("--e2e-repetitions", type=int, default=None)
    parser.add_argument("--prefill", type=_pairs, default=((1, 512), (8, 2048)), help="BATCHxTOKENS,...")
    parser.add_argument("--decode-batches", type=_ints, default=(1, 16))
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--decode-new-tokens", type=int, default=None)
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end measurements")
    parser.add_argument("--smollm2-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--llama-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--llama-tokens", type=_ints, default=None, help="token counts for the LLaMA layers")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache", help="offline assets (fetch-assets)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    import torch
    import transformers

    from secateurs.kernels.measure.speed import (
        SpeedResult,
        SpeedSettings,
        device_facts,
        path_infos,
        sparse_paths,
        sweep_linear,
    )
    from secateurs.kernels.patterns import SparsityPattern
    from secateurs.workers.pipeline import resolve_device, resolve_dtype
    from secateurs.workers.speed import cpu_name, driver_release, run_speed_step, to_report

    device = resolve_device(args.device)
    defaults = SpeedSettings.for_device(device)
    settings = dataclasses.replace(
        defaults,
        token_counts=args.tokens,
        warmup=defaults.warmup if args.warmup is None else args.warmup,
        repetitions=defaults.repetitions if args.repetitions is None else args.repetitions,
        e2e_warmup=defaults.e2e_warmup if args.e2e_warmup is None else args.e2e_warmup,
        e2e_repetitions=defaults.e2e_repetitions if args.e2e_repetitions is None else args.e2e_repetitions,
        prefill=args.prefill,
        decode_batches=args.decode_batches,
        decode_prompt=args.decode_prompt,
        decode_new_tokens=defaults.decode_new_tokens if args.decode_new_tokens is None else args.decode_new_tokens,
        end_to_end=not args.no_e2e,
    )
    pattern = SparsityPattern.nm(2, 4)
    name = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    output = args.output or ROOT / "benchmarks" / "results" / f"speed-{slug}.json"
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "secateurs speed sweep (benchmarks/speed.py)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": {
            "device_name": name,
            "driver": driver_release() if device.type == "cuda" else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
    }

    if not args.skip_smollm2:
        from transformers import AutoModelForCausalLM

        from secateurs.kernels.pruning.driver import PruneConfig, plan_layers, prune_model_
        from secateurs.workers.assets import fetch_assets

        dtype = resolve_dtype(args.smollm2_dtype, device)
        folder = fetch_assets(args.cache).smollm2
        _say(f"SmolLM2-135M from {folder}, {dtype}, magnitude 2:4, on {name}")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        config = PruneConfig(method="magnitude", pattern=pattern)
        prune_model_(model, None, config)
        _, _, per_block = plan_layers(model, config)
        names = [layer.name for layers in per_block for layer in layers]
        report = run_speed_step(model, names, pattern, device, settings=settings, on_point=_point)
        for e2e in report.end_to_end:
            figures = ", ".join(
                f"{r.path} {r.status}" + (f" {r.speedup:.3f}x" if r.speedup is not None else "") for r in e2e.paths
            )
            dense = f"dense {e2e.dense.median_ms:.1f} ms" if e2e.dense else e2e.reason
            _say(f"  {e2e.kind} batch {e2e.batch} x {e2e.prompt_tokens}: {dense}; {figures}")
        result["smollm2"] = {"model": str(folder), "pruning": "magnitude 2:4", **report.model_dump(mode="json")}
        del model

    if not args.skip_llama:
        dtype = getattr(torch, args.llama_dtype)
        layer_settings = dataclasses.replace(settings, token_counts=args.llama_tokens or settings.token_counts)
        _say(f"LLaMA-7B-sized random 2:4 layers, {dtype}, on {name}")
        paths = sparse_paths()
        layer_started = time.perf_counter()
        linear = sweep_linear(
            LLAMA_7B_SHAPES,
            pattern,
            dtype,
            device,
            layer_settings,
            paths=paths,
            device_name=name if device.type == "cuda" else "",
            on_point=_point,
        )
        facts = device_facts(device, name)
        layers = SpeedResult(
            conditions=facts,
            dtype=args.llama_dtype,
            pattern=str(pattern),
            runtime_mode="eager",
            settings=dataclasses.asdict(dataclasses.replace(layer_settings, end_to_end=False)),
            paths=path_infos(paths, device, dtype),
            linear=tuple(linear),
            end_to_end=(),
            notes=(facts.sparse_hardware_note, "random weights pruned 2:4 by magnitude; no bias"),
        )
        result["llama7b_layers"] = to_report(layers, time.perf_counter() - layer_started).model_dump(mode="json")

    result["seconds"] = round(time.perf_counter() - started, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    _say(f"wrote {output} in {result['seconds']} s")


if __name__ == "__main__":
    main()
