"""Greedy generation through ``model.generate``, timed token by token: decode tokens/s with the prefill kept apart.

``generate`` hands its streamer the prompt, then every generated token right after the step that produced it (its
``.cpu()`` waits for a CUDA device to finish the step). The prefill time is from the call to the first generated
token; the decode time from the first generated token to the last, over ``new_tokens - 1`` steps. Each step is a
whole forward with the KV cache, sampling and stopping checks included, as users run it; both models compared run
through the same code. :func:`compare_greedy` alternates the two models so that slow drifts of a shared machine
hit both alike. This module does no I/O; the device follows the inputs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _StepClock:
    """A ``generate`` streamer that notes when each token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.arrivals: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.arrivals.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class GreedyRun:
    """One timed greedy generation of ``new_tokens`` for every row of the prompt."""

    tokens: torch.Tensor  # [batch, new_tokens] generated ids, on CPU
    prefill_seconds: float  # call to first generated token
    decode_seconds: float  # first generated token to last
    decode_steps: int  # new_tokens - 1

    @property
    def tokens_per_second(self) -> float:
        """Decode tokens/s over the whole batch (prefill excluded)."""
        return self.tokens.shape[0] * self.decode_steps / self.decode_seconds


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> GreedyRun:
    """``model.generate`` greedily, exactly ``new_tokens`` tokens (end-of-sequence held off until then), for the
    prompt ``input_ids`` [batch, prompt] (on the model's device), timed by :class:`_StepClock`."""
    if new_tokens < 2:
        raise ValueError(f"timing decode needs at least 2 new tokens, got {new_tokens}")
    generate: Callable[..., Any] = model.generate  # type: ignore[assignment]
    config: Any = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else 0
    clock = _StepClock()
    out = generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        streamer=clock,
    )
    arrivals = clock.arrivals
    if len(arrivals) != new_tokens:
        raise RuntimeError(f"generate produced {len(arrivals)} tokens, {new_tokens} were asked for")
    generated = out[:, input_ids.shape[1] :].cpu()  # [batch, new_tokens]
    return GreedyRun(generated, arrivals[0] - clock.started, arrivals[-1] - arrivals[0], new_tokens - 1)


@dataclass(frozen=True)
class Spread:
    """Median and spread of repeated measurements."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    samples: tuple[float, ...]


def spread(samples: Sequence[float]) -> Spread:
    ordered = sorted(samples)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) >= 2 else (ordered[0],) * 3
    return Spread(statistics.median(ordered), q1, q3, ordered[0], ordered[-1], tuple(samples))


@dataclass(frozen=True)
class Agreement:
    """How far two greedy generations of the same prompts agree."""

    identical: bool
    matching_tokens: int  # per row, tokens before its first difference, summed
    total_tokens: int
    first_difference: int | None  # earliest generated position where some row differs


def agreement(a: torch.Tensor, b: torch.Tensor) -> Agreement:
    """Compare two [batch, new_tokens] generations row by row, up to each row's first difference."""
    differs = a != b  # [batch, new_tokens]
    positions = torch.arange(a.shape[1]).expand_as(a)  # [batch, new_tokens]
    first = torch.where(differs, positions, a.shape[1]).min(dim=1).values  # [batch]
    earliest = int(first.min())
    return Agreement(
        identical=not bool(differs.any()),
        matching_tokens=int(first.sum()),
        total_tokens=a.numel(),
        first_difference=earliest if earliest < a.shape[1] else None,
    )


@dataclass(frozen=True)
class GreedyComparison:
    """Two models generating greedily from the same prompts, timed alternately."""

    baseline: tuple[GreedyRun, ...]
    candidate: tuple[GreedyRun, ...]
    agreement: Agreement  # of the first timed runs
    warmup: int

    @property
    def baseline_tokens_per_second(self) -> Spread:
        return spread([run.tokens_per_second for run in self.baseline])

    @property
    def candidate_tokens_per_second(self) -> Spread:
        return spread([run.tokens_per_second for run in self.candidate])

    @property
    def speedup(self) -> float:
        """Candidate decode tokens/s over baseline decode tokens/s (medians)."""
        return self.candidate_tokens_per_second.median / self.baseline_tokens_per_second.median


def compare_greedy(
    baseline: nn.Module,
    candidate: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    *,
    warmup: int = 1,
    repetitions: int = 5,
    on_run: Callable[[str, int, GreedyRun], None] | None = None,
) -> GreedyComparison:
    """Generate ``new_tokens`` greedily from ``input_ids`` [batch, prompt] with both models, ``warmup`` untimed
    then ``repetitions`` timed runs each, alternating (baseline first). ``on_run(which, index, run)`` sees every
    timed run."""
    if repetitions < 1:
        raise ValueError(f"repetitions must be at least 1, got {repetitions}")
    for _ in range(warmup):
        greedy_generate(baseline, input_ids, new_tokens)
        greedy_generate(candidate, input_ids, new_tokens)
    runs: dict[str, list[GreedyRun]] = {"baseline": [], "candidate": []}
    for index in range(repetitions):
        for which, model in (("baseline", baseline), ("candidate", candidate)):
            run = greedy_generate(model, input_ids, new_tokens)
            runs[which].append(run)
            if on_run is not None:
                on_run(which, index, run)
    return GreedyComparison(
        baseline=tuple(runs["baseline"]),
        candidate=tuple(runs["candidate"]),
        agreement=agreement(runs["baseline"][0].tokens, runs["candidate"][0].tokens),
        warmup=warmup,
    )
