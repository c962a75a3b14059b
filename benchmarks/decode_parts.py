"""Where a greedy decode step goes, dense against packed: SmolLM2-135M 2:4 at batch 1 on this machine.

    python benchmarks/decode_parts.py [--threads N] [--dtype float32] [--pruned DIR] [--output FILE]

``benchmarks/decode.py`` says how much faster the packed model decodes; this says where the step's time goes in each
model, and which thread choice the kernel made for each packed shape. Both models are loaded as ``secateurs bench``
loads them (the dense HF folder and ``secateurs.load``), their dense linears on secateurs' faster dense products in
both. After a ``--prompt-tokens`` prompt, ``--steps`` one-token steps run through the model's forward with a
``DynamicCache`` (no ``generate``: its own per-step work is common to both and included in ``decode.py``'s figures),
and the median step is timed in four variants, every variant of both models once per round, ``--rounds`` rounds:

* ``whole``: the model as users run it;
* ``no block linears``: every linear inside the decoder blocks replaced by a stub returning zeros of its output
  shape (inside a context manager, restored after);
* ``no head``: the ``lm_head`` replaced by such a stub;
* ``neither``: both; what is left is attention, norms, rotary embeddings, the cache and transformers' Python.

From the medians over the rounds: block linears ≈ whole − no block linears, head ≈ whole − no head, rest = neither
(estimates: differences of medians on a shared machine, and a stub changes what stays in the caches; the JSON keeps
every round). The stubs' zeros make the later steps' attention run on other values, not on fewer.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("whole", "no block linears", "no head", "neither")


def _say(message: str) -> None:
    print(f"[decode-parts] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="one-token steps per timing (the first 4 untimed)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pruned", type=Path, default=None, help="a pruned SmolLM2 output folder to reuse")
    parser.add_argument("--cache", type=Path, default=None, help="offline assets (default: the settings' cache dir)")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON here (default: print only)")
    args = parser.parse_args()
    if args.steps < 8 or args.rounds < 1:
        parser.error("--steps must be at least 8 and --rounds at least 1")

    import torch
    import transformers
    from decode import pruned_smollm2  # benchmarks/decode.py, beside this script
    from torch import nn
    from transformers import AutoModelForCausalLM, DynamicCache

    import secateurs
    from secateurs.kernels.matmul import fast_linears
    from secateurs.kernels.measure.speed import _cache_keyword
    from secateurs.kernels.sparse.cpu import measured_crossovers
    from secateurs.kernels.sparse.packing import PackedLinear, describe_packed_kernels
    from secateurs.workers.pipeline import quiet_libraries
    from secateurs.workers.speed import cpu_isa, cpu_name

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    class _Zeros(nn.Module):
        """A linear's stand-in: zeros of its output shape, no product."""

        def __init__(self, out_features: int) -> None:
            super().__init__()
            self.out_features = out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
            return x.new_zeros(*x.shape[:-1], self.out_features)

    @contextmanager
    def stubbed(model: nn.Module, variant: str) -> Iterator[None]:
        """``model`` with the variant's linears replaced by :class:`_Zeros`, restored on exit."""
        head = variant in ("no head", "neither")
        blocks = variant in ("no block linears", "neither")
        swapped = []
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear | PackedLinear):
                    continue
                if (child is model.get_output_embeddings() and head) or (
                    child is not model.get_output_embeddings() and blocks
                ):
                    swapped.append((parent, name, child))
                    setattr(parent, name, _Zeros(child.out_features))
        try:
            yield
        finally:
            for parent, name, child in swapped:
                setattr(parent, name, child)

    def step_ms(model: nn.Module, prompt: torch.Tensor) -> float:
        """Median one-token step after the prompt, ms (the first 4 steps untimed)."""
        cache = {_cache_keyword(model): DynamicCache(config=model.config)}  # `cache` in newer transformers
        times = []
        with torch.inference_mode():
            out = model(input_ids=prompt, **cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)  # [1, 1]
            for index in range(args.steps):
                started = time.perf_counter()
                out = model(input_ids=token, **cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)
                if index >= 4:
                    times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e3

    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "where a greedy decode step goes, dense vs packed (benchmarks/decode_parts.py)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": {
            "device": "cpu",
            "device_name": cpu_name(),
            "isa": cpu_isa(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()),
        },
        "protocol": {
            "dtype": args.dtype,
            "batch": 1,
            "prompt_tokens": args.prompt_tokens,
            "steps": args.steps,
            "timed_steps": args.steps - 4,
            "rounds": args.rounds,
            "timer": "perf_counter around each one-token forward (logits_to_keep=1, argmax); median per timing",
        },
    }
    with tempfile.TemporaryDirectory(prefix="secateurs-decode-parts-") as scratch, ExitStack() as stack:
        folder = pruned_smollm2(args.pruned, Path(scratch), args.cache, _say)
        result["model"] = {"folder": str(folder), "pruning": "SmolLM2-135M-Instruct 2:4 (fp32 checkpoint)"}
        models = {
            "dense": AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval(),
            "packed": secateurs.load(folder, device="cpu", dtype=args.dtype).eval(),
        }
        for model in models.values():
            stack.enter_context(fast_linears(model))
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(100, 1000, (1, args.prompt_tokens), generator=generator)  # [1, prompt]
        for model in models.values():  # first use: the kernels' probes and the dense routes are measured here
            step_ms(model, prompt)
        rounds: dict[str, dict[str, list[float]]] = {side: {v: [] for v in VARIANTS} for side in models}
        for index in range(args.rounds):
            for side, model in models.items() if index % 2 == 0 else reversed(models.items()):
                for variant in VARIANTS:
                    with stubbed(model, variant):
                        rounds[side][variant].append(step_ms(model, prompt))
            _say(
                f"round {index + 1}/{args.rounds}: "
                + ", ".join(f"{side} {rounds[side]['whole'][-1]:.2f} ms" for side in models)
            )
        parts: dict[str, dict[str, float]] = {}
        for side in models:
            median = {variant: statistics.median(rounds[side][variant]) for variant in VARIANTS}
            parts[side] = {
                "step_ms": median["whole"],
                "block_linears_ms": median["whole"] - median["no block linears"],
                "head_ms": median["whole"] - median["no head"],
                "rest_ms": median["neither"],
            }
        result["rounds_ms"] = rounds
        result["parts_ms"] = parts
        result["step_speedup"] = parts["dense"]["step_ms"] / parts["packed"]["step_ms"]
        result["block_linears_speedup"] = parts["dense"]["block_linears_ms"] / parts["packed"]["block_linears_ms"]
        result["thread_choices"] = [
            {key: entry[key] for key in ("shape", "weights", "threads", "kernel_threads", "kernel_one_thread_below")}
            for entry in measured_crossovers()
        ]
        result["kernels"] = [
            {"name": d.name, "available": d.available, "detail": d.detail} for d in describe_packed_kernels()
        ]
    result["seconds"] = round(time.perf_counter() - started, 1)

    print(f"{'ms per step (medians)':<22} {'dense':>8} {'packed':>8}")
    for key, label in (("step_ms", "step"), ("block_linears_ms", "block linears"), ("head_ms", "lm_head"),
                       ("rest_ms", "rest")):  # fmt: skip
        print(f"{label:<22} {parts['dense'][key]:>8.2f} {parts['packed'][key]:>8.2f}")
    print(f"step speedup {result['step_speedup']:.3f}x, block linears {result['block_linears_speedup']:.3f}x")
    for choice in result["thread_choices"]:
        below = choice["kernel_one_thread_below"]
        where = f"{choice['kernel_threads']} threads" + (f", one thread below {below} tokens" if below else "")
        print(f"  {choice['shape'][0]}x{choice['shape'][1]} {choice['weights']}: {where}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        _say(f"wrote {args.output} in {result['seconds']} s")


if __name__ == "__main__":
    main()
