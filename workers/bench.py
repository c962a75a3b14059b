"""``secateurs bench``: the same greedy generation through a pruned output's dense model (the HF folder, zeros
stored) and its packed model (``secateurs.load``: ``PackedLinear`` on the fastest registered path), timed with
:func:`secateurs.kernels.measure.decode.compare_greedy`, with the conditions of every figure.

Same process, same threads, same dtype, same prompt tokens, both eager; the runs alternate. By default
(``dense_linears="fast"``) every linear that is dense, all of the dense model's and the packed model's ``lm_head``
and the like, computes through :func:`secateurs.kernels.matmul.fast_linears` (oneDNN or MKL's ``F.linear``,
whichever measured faster on this CPU); ``"torch"`` leaves them as transformers runs them (``F.linear``: MKL for
fp32 on x86 builds). On an AMD Zen 5 F.linear's fp32 products took 1.2-2.2x oneDNN's time from 16 to 512 tokens on
SmolLM2's shapes, so there the torch baseline flatters the packed model (decode fp32 batch 1: 1.75x against it,
1.65x against the default, 1 thread, 2026-11-30) and the default does not. The tokens the two
generate are compared: in float32 they must agree (the kernels compute the same sums in another order, so a
near-tie could in principle flip, which the report would show), in 16-bit dtypes the count that agree is reported.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from secateurs.app.errors import InvalidSpecError, ModelSourceError
from secateurs.app.schemas import BenchConditions, BenchReport, BenchSide, BenchSpread
from secateurs.kernels.matmul import fast_linears, linear_route
from secateurs.kernels.measure.decode import GreedyRun, Spread, compare_greedy
from secateurs.kernels.sparse.packing import describe_packed_kernels
from secateurs.workers.packed import MANIFEST_NAME, PACKED_DIR, load_dense_model
from secateurs.workers.runtime import load_dense, load_packed, packed_folder, parse_device, parse_dtype, paths_that_ran
from secateurs.workers.speed import cpu_isa, cpu_name

log = logging.getLogger(__name__)

DenseLinears = Literal["torch", "fast"]

# The prompt's source when the folder has a tokenizer: a fixed English text, repeated as needed.
PROMPT_TEXT = (
    "The history of gardening begins with the first people who saved seeds and planted them near their homes. "
    "Over centuries, gardeners learned which plants grew well together, how to prune fruit trees so that they "
    "bear more, and how to keep the soil rich from one season to the next. Today a garden can be a few pots on a "
    "balcony or several acres of orchards, but the basic work is the same: watch the plants, cut away what is not "
    "needed, and give the rest room to grow."
)
PROMPT_SEED = 0


def _prompt(folder: Path, model: nn.Module, batch: int, tokens: int, source: str) -> tuple[torch.Tensor, str]:
    """[batch, tokens] prompt ids and where they came from: the folder's tokenizer on :data:`PROMPT_TEXT`
    (consecutive windows of the repeated text, one per row), or random ids (seed 0) with ``source='random'``
    or without a tokenizer."""
    if source == "text":
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("no tokenizer in %s (%s): random prompt ids instead", folder, exc)
        else:
            ids = tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
            repeats = -(-batch * tokens // max(len(ids), 1))
            stream = torch.tensor(ids * repeats, dtype=torch.long)[: batch * tokens]
            return stream.reshape(batch, tokens), f"text: a fixed {len(ids)}-token English paragraph, repeated"
    config: Any = getattr(model, "config", None)
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    ids = torch.randint(0, int(config.vocab_size), (batch, tokens), generator=generator)
    return ids, f"random ids in [0, {int(config.vocab_size)}), seed {PROMPT_SEED}"


def _check_lengths(model: nn.Module, prompt_tokens: int, new_tokens: int) -> None:
    config: Any = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and prompt_tokens + new_tokens > positions:
        raise InvalidSpecError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the model's {positions} positions",
            hint=f"keep their sum at most {positions}",
        )


def _spread(value: Spread, scale: float = 1.0) -> BenchSpread:
    return BenchSpread(
        median=value.median * scale,
        q1=value.q1 * scale,
        q3=value.q3 * scale,
        min=value.min * scale,
        max=value.max * scale,
    )


def _side(source: str, seconds: float, runs: tuple[GreedyRun, ...], speed: Spread, paths: dict[str, int]) -> BenchSide:
    from secateurs.kernels.measure.decode import spread

    prefill = spread([run.prefill_seconds for run in runs])
    return BenchSide(
        source=source,
        load_seconds=seconds,
        decode_tokens_per_second=_spread(speed),
        prefill_ms=_spread(prefill, 1e3),
        paths=paths,
    )


def run_bench(
    path: Path,
    *,
    device: str = "auto",
    dtype: str | None = None,
    batch: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    warmup: int = 1,
    repetitions: int = 5,
    prompt: str = "text",
    threads: int | None = None,
    dense_linears: DenseLinears = "fast",
    say: Callable[[str], None] = log.info,
) -> BenchReport:
    """Load ``path``'s dense and packed models and time the same greedy generation through both (module docstring).

    ``path`` is a pruned output folder with its ``packed/`` copy (or a packed folder: the dense model is then
    rebuilt from it, bit for bit). ``threads`` sets torch's thread count for the run (restored afterwards).
    ``dense_linears``: how the linears that stay dense compute, in both models (module docstring).
    Errors a user can act on are :class:`SecateursError` subclasses naming the option.
    """
    if threads is not None and threads < 1:
        raise InvalidSpecError(f"--threads must be at least 1, got {threads}", hint="pass --threads 1 or more")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_bench(
            path,
            device=device,
            dtype=dtype,
            batch=batch,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            warmup=warmup,
            repetitions=repetitions,
            prompt=prompt,
            dense_linears=dense_linears,
            say=say,
        )
    finally:
        torch.set_num_threads(before)


def _run_bench(
    path: Path,
    *,
    device: str,
    dtype: str | None,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    warmup: int,
    repetitions: int,
    prompt: str,
    dense_linears: DenseLinears,
    say: Callable[[str], None],
) -> BenchReport:
    if dense_linears not in ("torch", "fast"):
        raise InvalidSpecError(
            f"--dense-linears must be 'torch' or 'fast', got {dense_linears!r}", hint="pass --dense-linears torch"
        )
    for name, value, low in (
        ("--batch", batch, 1),
        ("--prompt-tokens", prompt_tokens, 1),
        ("--new-tokens", new_tokens, 2),
        ("--repetitions", repetitions, 1),
        ("--warmup", warmup, 0),
    ):
        if value < low:
            raise InvalidSpecError(
                f"{name} must be at least {low}, got {value}", hint=f"pass {name} {max(low, 1)} or more"
            )
    if prompt not in ("text", "random"):
        raise InvalidSpecError(f"--prompt must be 'text' or 'random', got {prompt!r}", hint="pass --prompt text")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelSourceError(f"{folder} is not a folder", hint="pass the folder `secateurs prune --output` wrote")
    target = parse_device(device)
    chosen = parse_dtype(dtype)
    packed_dir = packed_folder(folder)
    if packed_dir is None:
        raise ModelSourceError(
            f"{folder} has no packed copy ({PACKED_DIR}/{MANIFEST_NAME}): there is no sparse model to compare",
            hint="N:M jobs write one (secateurs prune --pattern 2:4); download the packed/ folder too",
        )
    say(f"loading the packed model from {packed_dir}")
    started = time.perf_counter()
    packed, source = load_packed(packed_dir, device=target, dtype=chosen)
    packed_seconds = time.perf_counter() - started
    dtype_used = getattr(torch, source.dtype)
    started = time.perf_counter()
    if (folder / "config.json").is_file() and packed_dir != folder:
        say(f"loading the dense model from {folder}")
        dense: nn.Module = load_dense(folder, device=target, dtype=dtype_used)
        dense_source = f"{folder} (HF folder, pruned weights stored as zeros)"
    else:
        say(f"rebuilding the dense model from {packed_dir} (no HF folder beside it)")
        dense = load_dense_model(packed_dir).to(device=target, dtype=dtype_used)
        dense_source = f"{packed_dir} unpacked (pruned weights as zeros)"
    dense_seconds = time.perf_counter() - started
    if dense_linears == "fast":
        backend = linear_route(dtype_used) if target.type == "cpu" else "F.linear (not on CPU)"
        dense_source += f"; linears through secateurs' faster dense products ({backend})"
    _check_lengths(packed, prompt_tokens, new_tokens)
    ids, prompt_source = _prompt(packed_dir, packed, batch, prompt_tokens, prompt)
    ids = ids.to(target)
    load_average = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    say(
        f"greedy generation: batch {batch}, {prompt_tokens} prompt + {new_tokens} new tokens, "
        f"{warmup} warm-up + {repetitions} timed runs each, alternating"
    )

    def on_run(which: str, index: int, run: GreedyRun) -> None:
        label = "dense" if which == "baseline" else "packed"
        say(f"  {label} run {index + 1}/{repetitions}: {run.tokens_per_second:.1f} tokens/s")

    with ExitStack() as stack:
        if dense_linears == "fast":  # both sides: the packed model's dense linears (lm_head) too
            stack.enter_context(fast_linears(dense))
            stack.enter_context(fast_linears(packed))
        comparison = compare_greedy(
            dense, packed, ids, new_tokens, warmup=warmup, repetitions=repetitions, on_run=on_run
        )
    ran = paths_that_ran(packed)
    agree = comparison.agreement
    notes = []
    if not agree.identical:
        notes.append(
            f"the packed model's greedy tokens differ from the dense model's from position {agree.first_difference}"
            + (
                " (float32: they should agree; a near-tie in the logits can flip)"
                if dtype_used == torch.float32
                else ""
            )
        )
    if "reference" in ran:
        notes.append(
            "some packed layers ran the reference path (decompress, then dense), which is slower than dense by design"
        )
    return BenchReport(
        folder=str(folder),
        speedup=comparison.speedup,
        tokens_agree=agree.identical,
        matching_tokens=agree.matching_tokens,
        total_tokens=agree.total_tokens,
        first_difference=agree.first_difference,
        dense=_side(dense_source, dense_seconds, comparison.baseline, comparison.baseline_tokens_per_second, {}),
        packed=_side(
            f"{packed_dir} ({source.format}, {source.packed_layers} packed {source.pattern} layers)",
            packed_seconds,
            comparison.candidate,
            comparison.candidate_tokens_per_second,
            ran,
        ),
        conditions=BenchConditions(
            device=str(target),
            device_name=cpu_name() if target.type == "cpu" else torch.cuda.get_device_name(target),
            isa=cpu_isa() if target.type == "cpu" else None,
            threads=torch.get_num_threads(),
            dtype=source.dtype,
            torch=torch.__version__,
            transformers=_transformers_version(),
            load_average=load_average,
            prompt=prompt_source,
            batch=batch,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            warmup=warmup,
            repetitions=repetitions,
            timer="perf_counter at each generated token (generate's streamer; CUDA synchronizes on .cpu())",
        ),
        kernel_details=[
            f"{d.name}: {'' if d.available else 'unavailable: '}{d.detail}" for d in describe_packed_kernels()
        ],
        notes=notes,
    )


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
