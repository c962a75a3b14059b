"""The packed 2:4 CPU kernel: y = x·Wᵀ (+ b) computed straight from a :class:`PackedWeight`, no dense copy.

Why it wins (GUIDE §6): at decode sizes (1 to a few tokens) a linear layer is memory-bound, and the packed form
moves 17/32 of the dense bytes in fp32 and 9/16 in bf16 (half the values, 2 bits of position per kept value:
NVIDIA's 2:4 pattern, Mishra et al. 2021, arXiv 2104.08378, §3), so a kernel that streams only the packed bytes
can be up to 1.88× / 1.78× faster than the dense product on any CPU. Compute-bound products (prefill, large
batches) cannot gain on a CPU without sparse hardware, so above a token count measured on the machine the layer
hands over to dense: its weight is decompressed tile by tile into a cache-sized buffer and multiplied by the
fastest dense product (``F.linear`` or the project's oneDNN path, whichever the measurement picked).

Two kernels are registered with :func:`~secateurs.kernels.sparse.packing.register_packed_kernel`, so every
:class:`~secateurs.kernels.sparse.packing.PackedLinear` on the CPU uses them and its ``last_path`` names the one
that ran:

* ``cpu_packed`` (:data:`KERNEL_NAME`): the C++ kernel (``csrc/``), for 1..T tokens, T the crossover; on a CPU with
  AMX, bf16 × bf16 products from 5 tokens expand the weight into tiles and run on the tile unit
  (``csrc/amx.cpp``); products with fp32 activations of many tokens (from 8 on AVX2, 32 on AVX-512) run the
  token-vector kernel, which vectorizes over tokens and does one FMA per kept weight (``csrc/tokens.h``): half the
  dense FMAs (:func:`kernel_in_use` says which kernel a product takes);
* ``cpu_dense_tiles`` (:data:`TILES_NAME`): the hand-over above T.

Both take fp32 or bf16 weights and activations (output in the activation dtype, fp32 accumulation; mixed dtypes
compute as if both were fp32). They decline (return None, so the reference forward runs) off the CPU, for other
dtypes or patterns, under autograd or CPU autocast, and when the extension could not be built.

The instruction set is chosen at run time from the CPU's flags (AMX, AVX-512 with BF16, AVX-512, AVX2 + FMA, scalar),
or forced with :func:`configure` (``isa=``). The extension is built on first use, not at import, in the folder
given to :func:`configure` (the workers pass the setting), else in torch's extension folder; see
:mod:`secateurs.kernels.sparse.cpu.build`. The crossover T is measured at the first call for each (shape, dtypes,
threads, instruction set): :func:`describe` reports each one and how it was obtained.

Threads: the C++ side runs a product on the calling thread when it streams less than a work size, else over
torch's threads (``at::parallel_for``, so ``torch.set_num_threads`` governs it), each taking row blocks from a
shared counter, so a thread that starts late finds the work done rather than holding a share. Below
:data:`SERIAL_WORK` it never asks for a thread. Above, whether threads pay is measured with the crossover (one token,
one thread against all, interleaved, median): on a shared 2-vCPU VM a pool thread's wake-up can cost more than the
whole product (GUIDE §6: 0.1–0.4 ms products took 8–16 ms), and then the shape runs on the calling thread.
"""

from __future__ import annotations

import functools
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from secateurs.kernels import matmul
from secateurs.kernels.errors import KernelError
from secateurs.kernels.sparse.cpu.build import BuildError, Built, build
from secateurs.kernels.sparse.packing import (
    KernelDescription,
    PackedLinear,
    bind_fast_call,
    invalidate_fast_calls,
    register_packed_kernel,
)

log = logging.getLogger(__name__)

KERNEL_NAME = "cpu_packed"
TILES_NAME = "cpu_dense_tiles"
ISAS = ("scalar", "avx2", "avx512", "avx512bf16", "amx")  # in order of preference, last best
IsaChoice = Literal["auto", "scalar", "avx2", "avx512", "avx512bf16", "amx"]
ISA_CHOICES: tuple[IsaChoice, ...] = ("auto", "scalar", "avx2", "avx512", "avx512bf16", "amx")
_ISA_NEEDS = {
    "scalar": (),
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f", "avx512bw", "avx512vl"),
    "avx512bf16": ("avx512f", "avx512bw", "avx512vl", "avx512bf16", "avx512vbmi", "avx512vbmi2"),
    "amx": ("avx512f", "avx512bw", "avx512vl", "avx512bf16", "avx512vbmi", "avx512vbmi2", "amx_tile", "amx_bf16"),
}
DTYPES = (torch.float32, torch.bfloat16)

SERIAL_WORK = 256 << 10  # bytes streamed (weights + the tokens' share) below which one thread runs the product
ONE_THREAD = 1 << 62  # a work size no product reaches: the calling thread runs everything
THREADS_RECHECK = 64  # where threads lose at one token, the token count at which they are timed again
# A shape keeps off torch's threads only where the calling thread alone took under this fraction of the pooled time:
# on a shared VM one timing can catch the other vCPU busy, and a wrong "one thread" costs a whole decode step's worth
# (Xeon family 6 model 167, 2 threads: a process whose probe put SmolLM2's 1536 x 576 on one thread read fp32 greedy
# decode at 1.18x dense, the two before it with the same code 1.36x and 1.46x).
ONE_THREAD_MARGIN = 0.9
# The threads probe flushes weights of at most this many bytes (values and codes) from the caches before each call.
# Larger ones would cost more to flush than to time (LLaMA-7B's 11008 x 4096 fp32, 95 MB: 1.1 s per probe flushed,
# 52 ms a flush), and their one-token products (milliseconds, read from beyond the L2 anyway) outlast a pool
# thread's wake-up many times over.
THREAD_PROBE_FLUSH_BYTES = 8 << 20
BLOCK_ROWS = 16  # output rows a thread takes at a time
# Dense tile of the hand-over. Measured (Xeon, 1 thread, shared machine, best of 8): tiles of 256 KiB and 1 MiB lose
# 20-50% to dense at 128-512 tokens (per-tile overheads, skinny products); 4 MiB and above are within noise of
# decompressing the whole weight on SmolLM2's shapes and better than it on 4096x4096 (the tile stays in cache).
# Re-measured on an AMD EPYC Zen 5 (1 thread, quiet, two weight copies alternated, medians of 7; tiles / dense on the
# LLaMA-7B shapes at 128 and 512 tokens, bf16 and fp32, uncapped tiles of 1 / 2 / 4 / 8 MiB): 2 MiB 0.86-0.98,
# 4 MiB 0.84-0.97, 8 MiB 0.88-0.95 (1 MiB 0.83-0.99, the widest spread), so 2 MiB since 2026-11-30. Where a core's L2
# holds 2 MiB (the Xeons' cores; AMD's hold 0.5-1 MiB) one thread takes 8 MiB: measured on an Intel Xeon (family 6,
# model 207, AVX-512 + AMX, L2 2 MiB; 1 thread, 512 tokens, four weight copies in turn, the sizes alternated call by
# call, medians of the paired ratios over 9-15 rounds on a VM whose products varied 2-5x within seconds), 8 MiB
# against 2 MiB: bf16 1.05 / 1.09 / 1.25x faster on 4096x4096 / 11008x4096 / 4096x11008, 0.97-1.00x on SmolLM2's
# one-tile weights; fp32 1.07 / 1.14 / 0.93x, and 1.09-1.13x on 576x1536 and 1536x576 (one tile instead of two).
# With threads, tiles stay at 2 MiB (8 MiB there: 0.94-1.11x bf16, 0.97-1.09x fp32, paired as above).
TILE_BYTES = 2 << 20
TILE_BYTES_LARGE_L2 = 8 << 20
LARGE_L2_BYTES = 2 << 20
# A weight of at most this many dense bytes is one tile, whatever the tile size: cut in two it ran two products of
# half the rows and copied each into the output. Measured (AMD EPYC Zen 4, family 25 model 17, 2 vCPUs, 2026-12-01;
# SmolLM2's 3.4 MiB fp32 MLP weights 1536x576 and 576x1536, twelve copies rotated past the L3, the three variants
# call by call, medians of 60; tiles / dense at 128 and 512 tokens, oneDNN and F.linear): 2 threads, two tiles
# 0.76-0.91x, one tile 0.90-0.98x; 1 thread 0.87-0.97x and 0.92-0.99x: one tile ahead in all 16 points, as on the
# Xeon above at 1 thread (1.09-1.13x). Larger weights keep their tiles (unmeasured at 3 tiles and more).
ONE_TILE_BYTES = 4 << 20
# Each tile's dense product is one parallel region of the dense library when threads > 1, and on a shared 2-vCPU VM
# any region can stall for milliseconds waiting for a descheduled thread (GUIDE §6). Measured: 11008x4096 fp32,
# 4 tokens, 2 threads, load average 7: 22 tiles of 4 MiB took 340-580 ms against 77-95 ms on one thread. So with
# more than one thread a weight is cut into at most this many tiles (LLaMA-7B's 11008x4096 in fp32: 8 tiles of
# 22.5 MiB, in L3); one thread has no region to wait for, and takes tiles of TILE_BYTES whatever their number.
MAX_TILES = 8
# Token counts the crossover probe may time (within its budget). Up to 256 until 2026-11-29: a kernel that won at 256
# was never timed above it, and every longer prompt took the tiles (on the Xeon, 2 threads, bf16 4096x4096 at 512
# tokens: AMX kernel 11.8 ms, tiles 17.9 ms, dense 9.8 ms).
PROBE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PROBE_BUDGET_S = 0.5  # per distinct shape; the probe stops early and says so
# Token counts up to this are measured whatever the budget: decode and small batches, where the kernels win. (16
# until 2026-11-29: on LLaMA-7B-sized fp32 layers the budget then stopped the probe before 64 tokens, and the layer
# handed over at 0.79-0.84x dense where the token-vector kernel runs 1.3x, Xeon, 1 thread.)
ALWAYS_PROBED = 64
# The AVX-512 general kernel's prefetch of the next rows on long rows (csrc/packed24.h, SEC24_LONG_ROW_BYTES) is timed
# once per process, at the first crossover measurement of a layer with long rows: a one-token product of this weight
# (fp32 [rows, in]), flushed out of the caches before each call, with and without it, alternated. Off only where off
# measured at least LONG_ROW_MARGIN faster; on (as it always was) otherwise.
LONG_ROW_PROBE_SHAPE = (1024, 4096)
LONG_ROW_PROBE_PAIRS = 9
LONG_ROW_MARGIN = 0.95
_ANY_SIZE = (1 << 63) - 1  # no upper bound on a bound call's elements (the extension's int64)
_LAYER_CACHE = "_cpu24_crossover"  # a layer's last crossover lookup, kept in its __dict__ (not in its state_dict)


class CpuKernelError(KernelError, ValueError):
    """The CPU kernel was asked for something this machine or build cannot do (an instruction set it lacks)."""


@dataclass(frozen=True)
class Crossover:
    """Where, for one (shape, dtypes, threads, ISA), the kernel hands over to dense tiles, and how it was found."""

    tokens: int  # the kernel runs for 1..tokens; the dense tiles above
    dense: str  # the dense product the tiles use: "F.linear" or "oneDNN"
    how: str  # what was measured
    seconds: float  # the probe's cost
    # The kernel's work size below which it runs on the calling thread: SERIAL_WORK, the work of THREADS_RECHECK
    # tokens (threads lost at one token, won at that count) or ONE_THREAD (always).
    serial_work: int
    # The smallest count measured as a tiles win (None: none). Probe points between `tokens` and it that the budget
    # left unmeasured are measured when a call first needs them (extend_crossover).
    loses_at: int | None = None


@dataclass(frozen=True)
class LongRowPrefetch:
    """Whether the AVX-512 general kernel prefetches the next rows of long rows, and what decided it."""

    on: bool
    with_seconds: float | None  # median one-token product of the probe's weight, from memory, with the prefetch
    without_seconds: float | None  # the same without it
    seconds: float  # the measurement's cost
    how: str

    def text(self) -> str:
        rows, inputs = LONG_ROW_PROBE_SHAPE
        state = "on" if self.on else "off"
        if self.with_seconds is None or self.without_seconds is None:
            return f"next-row prefetch on long rows {state} ({self.how})"
        return (
            f"next-row prefetch on long rows (>= {_module().long_row_bytes() >> 10} KiB of values a row) {state}: "
            f"measured at first use, one token of a {rows}x{inputs} fp32 weight flushed from the caches, "
            f"{self.with_seconds * 1e3:.3g} ms with, {self.without_seconds * 1e3:.3g} ms without "
            f"(medians of {LONG_ROW_PROBE_PAIRS}, alternated)"
        )


@dataclass
class _State:
    build_root: Path | None = None
    requested: IsaChoice = "auto"
    built: Built | None = None
    failure: str | None = None  # why the extension is unavailable
    isa: str | None = None  # the instruction set in use
    isa_index: int = 0
    crossovers: dict[tuple[Any, ...], Crossover] = field(default_factory=dict)
    long_rows: LongRowPrefetch | None = None  # measured at the first layer with long rows on AVX-512
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATE = _State()


def configure(*, build_dir: Path | None = None, isa: IsaChoice = "auto") -> None:
    """Where the extension is built and cached (None: torch's extension folder) and which instruction set runs
    (``auto``: the best this CPU has). Takes effect at the next call; a build already loaded stays loaded, and a
    build that failed is tried again only in another folder."""
    if isa not in ISA_CHOICES:
        raise CpuKernelError(f"unknown CPU instruction set {isa!r}: choose one of {', '.join(ISA_CHOICES)}")
    with _STATE.lock:
        if build_dir != _STATE.build_root and _STATE.built is None:
            _STATE.failure = None
        _STATE.build_root = build_dir
        if isa != _STATE.requested:
            _STATE.requested = isa
            _STATE.isa = None
            _STATE.crossovers.clear()
            _STATE.long_rows = None  # measured again for the new instruction set; until then, on
            if _STATE.built is not None:
                _STATE.built.module.set_long_row_prefetch(1)
            invalidate_fast_calls()  # the layers' bound calls hold the old instruction set


def _default_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _choose_isa(built: Built, requested: IsaChoice) -> str:
    runnable = list(built.module.isas_runnable())
    if requested == "auto":
        return runnable[-1]
    if requested in runnable:
        return requested
    flags = list(built.module.cpu_flags())
    if requested not in built.isas:
        why = f"this build has no {requested} kernel (the compiler could not build it; it has {', '.join(built.isas)})"
    else:
        missing = [flag for flag in _ISA_NEEDS[requested] if flag not in flags]
        if missing:
            why = f"this CPU lacks {', '.join(missing)} (it has {', '.join(flags) or 'no SIMD flag the kernels use'})"
        else:  # the flags are there: the OS refused the AMX tile state (ARCH_REQ_XCOMP_PERM)
            why = "the operating system did not grant this process the AMX tile state (Linux 5.16 or later grants it)"
    raise CpuKernelError(
        f"the {requested} CPU kernel was requested, but {why}; request one of: auto, {', '.join(runnable)}"
    )


def ensure() -> bool:
    """Build or load the extension (once per process) and choose the instruction set; True when the kernel can
    run. Raises :class:`CpuKernelError` when a forced instruction set cannot run here."""
    if _STATE.isa is not None:
        return True
    with _STATE.lock:
        if _STATE.failure is None and _STATE.built is None:
            root = _STATE.build_root or _default_root()
            try:
                _STATE.built = build(root)
            except BuildError as exc:
                where = f" (compiler output: {exc.log_path})" if exc.log_path else ""
                _STATE.failure = f"the C++ extension could not be built: {exc}{where}"
                log.warning(
                    "packed 2:4 CPU kernel unavailable: %s; PackedLinear runs the reference path (decompress, then "
                    "the dense product)",
                    _STATE.failure,
                )
                return False
            built = _STATE.built
            log.info(
                "packed 2:4 CPU kernel %s in %.1f s (%s; kernels: %s)",
                "loaded from cache" if built.cached else "built",
                built.seconds,
                built.folder,
                ", ".join(built.isas),
            )
        if _STATE.built is None:
            return False
        if _STATE.isa is None:
            isa = _choose_isa(_STATE.built, _STATE.requested)
            _STATE.isa_index, _STATE.isa = ISAS.index(isa), isa
        return True


def _module() -> Any:
    assert _STATE.built is not None
    return _STATE.built.module


def _supported(x: torch.Tensor, values: torch.Tensor, layer: PackedLinear) -> bool:
    """Whether the kernels compute this call (cheap checks first: this runs on every call of every layer)."""
    return (
        x.is_cpu
        and values.is_cpu
        and x.dtype in DTYPES
        and values.dtype in DTYPES
        and layer.n == 2
        and layer.m == 4
        and x.dim() >= 1
        and x.shape[-1] == layer.in_features
        and not (torch.is_grad_enabled() and (x.requires_grad or values.requires_grad))
        and not torch.is_autocast_enabled("cpu")
    )


# --- The two paths -------------------------------------------------------------------------------------------


def packed_product(
    x: torch.Tensor,
    values: torch.Tensor,
    codes: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    serial_work: int = SERIAL_WORK,
) -> torch.Tensor:
    """The kernel itself: x [..., in] (fp32/bf16, any strides) · W [out, in]ᵀ (+ bias) -> [..., out] in x's dtype,
    for any token count (no hand-over). ``values`` [out, in/2] and ``codes`` [out, ceil(in/8)] are a
    2:4 :class:`PackedWeight`'s tensors. ``serial_work``: below this many bytes streamed, one thread. Call
    :func:`ensure` first."""
    return _module().linear(x, values, codes, bias, _STATE.isa_index, serial_work, BLOCK_ROWS)


def _dense_fn(name: str) -> Callable[..., torch.Tensor]:
    return matmul.linear if name == "oneDNN" else F.linear


def hand_over_tile_bytes(weight_bytes: int = 0) -> int:
    """The hand-over's tile in bytes for this process and a weight of ``weight_bytes`` dense bytes: the whole weight
    up to :data:`ONE_TILE_BYTES`; else :data:`TILE_BYTES_LARGE_L2` on one thread where a core's L2 holds
    :data:`LARGE_L2_BYTES` (as the CPU reports it), else :data:`TILE_BYTES`. Call :func:`ensure` first."""
    if torch.get_num_threads() == 1 and int(_module().l2_bytes()) >= LARGE_L2_BYTES:
        tile = TILE_BYTES_LARGE_L2
    else:
        tile = TILE_BYTES
    return weight_bytes if tile < weight_bytes <= ONE_TILE_BYTES else tile


def tile_rows(out: int, row_bytes: int, tile_bytes: int, max_tiles: int | None = None) -> int:
    """Rows per tile: tiles of about ``tile_bytes`` (at least one row), at most ``max_tiles`` of them (None: the
    :data:`MAX_TILES` cap when torch runs more than one thread, no cap on one), equal in size, a multiple of 16 rows
    when they are that large (the kernel's row blocks)."""
    if max_tiles is None:
        max_tiles = MAX_TILES if torch.get_num_threads() > 1 else out
    tiles = min(max_tiles, out, max(1, -(-out * row_bytes // max(tile_bytes, 1))))
    rows = -(-out // tiles)  # equal tiles: never one full tile and a sliver
    return min(out, -(-rows // 16) * 16) if rows >= 16 and tiles > 1 else max(1, rows)


def dense_tiles_product(
    x: torch.Tensor,
    values: torch.Tensor,
    codes: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    dense: str = "F.linear",
    tile_bytes: int | None = None,
    serial_work: int = SERIAL_WORK,
) -> torch.Tensor:
    """The hand-over: W decompressed a tile of rows at a time into one reused cache-sized buffer, each tile
    multiplied by the dense product ``dense`` ("F.linear" or "oneDNN"). x [tokens, in] -> [tokens, out] in x's
    dtype (mixed dtypes compute in fp32). Call :func:`ensure` first.

    With more than one thread, a weight of more than one tile per thread and a product ``F.linear`` computes (every
    bf16 one; fp32 where F.linear was chosen), each thread takes its own tiles and multiplies them on its own core
    (``tiles_linear`` in ``dispatch.cpp``). Otherwise the tiles run one after the other, each product over all
    threads, at most :data:`MAX_TILES` of them with more than one thread. Measured (AMD EPYC Zen 4, 2 threads, bf16,
    512 tokens, interleaved with dense, two weight copies alternated, three rounds; tiles / dense, before -> after):
    4096x4096 0.82-0.94 -> 0.89-0.95, 11008x4096 0.87-0.88 -> 0.91-0.98, 4096x11008 0.92-0.93 -> 0.92-0.95; on a
    noisy VM (±5 % between rounds). SmolLM2's one-tile weights split into a tile per thread measured no better
    (0.85-0.91 against 0.85-0.94), so they keep their single tile."""
    out, in_features = values.shape[0], values.shape[1] * 2
    compute = x.dtype if x.dtype == values.dtype else torch.float32
    threads, row_bytes = torch.get_num_threads(), in_features * values.element_size()
    tile_bytes = hand_over_tile_bytes(out * row_bytes) if tile_bytes is None else tile_bytes
    if threads > 1 and out * row_bytes > threads * tile_bytes and not (compute == torch.float32 and dense == "oneDNN"):
        rows = tile_rows(out, row_bytes, tile_bytes, max_tiles=out)
        return _module().tiles_linear(x, values, codes, bias, _STATE.isa_index, rows)  # [tokens, out]
    xc = x.to(compute).contiguous()  # [tokens, in]; oneDNN copies strided inputs on every call
    b = bias.to(compute) if bias is not None else None
    rows = tile_rows(out, in_features * values.element_size(), tile_bytes)
    buffer = torch.empty(rows, in_features, dtype=values.dtype)  # [rows, in], reused by every tile
    product = _dense_fn(dense)
    module, isa = _module(), _STATE.isa_index
    if rows == out:  # one tile: no copy into the output
        module.decompress(values, codes, 0, out, buffer, isa, serial_work)
        return product(xc, buffer.to(compute), b).to(x.dtype)  # [tokens, out]
    y = torch.empty(x.shape[0], out, dtype=compute)  # [tokens, out]
    for start in range(0, out, rows):
        stop = min(out, start + rows)
        module.decompress(values, codes, start, stop, buffer, isa, serial_work)
        tile = buffer[: stop - start]  # [stop-start, in]
        if tile.dtype != compute:
            tile = tile.to(compute)
        y[:, start:stop] = product(xc, tile, None if b is None else b[start:stop])  # [tokens, stop-start]
    return y.to(x.dtype)


# --- The crossover, measured ---------------------------------------------------------------------------------


def _best_of(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def _dense_choices(x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[str, ...]:
    """The dense products the tiles may use, the project's default first: oneDNN for fp32 where this torch has
    it (``kernels/matmul.py``), F.linear otherwise."""
    fp32 = x_dtype == torch.float32 or x_dtype != w_dtype
    return ("oneDNN", "F.linear") if fp32 and matmul._onednn_linear_op() is not None else ("F.linear",)


@torch.no_grad()
def measure_crossover(
    values: torch.Tensor,
    codes: torch.Tensor,
    x_dtype: torch.dtype,
    *,
    tokens: tuple[int, ...] = PROBE_TOKENS,
    budget_s: float = PROBE_BUDGET_S,
) -> Crossover:
    """The largest token count in ``tokens`` at which the kernel beats the dense tiles on this layer's packed
    weight, found by timing both: galloping over ``tokens`` (1, 4, 16, 64, ...: the cheap decode sizes first), then
    bisecting between the last win and the first loss (assuming the kernel that wins at T also wins below T). Each
    point is the best of 3 calls after one warm-up per path (1 call for paths slower than 20 ms), and of as many more
    of the kernel and the faster tiles, interleaved call by call.

    The dense tiles cost at least their decompression, timed once: where the kernel is faster than that alone, it
    wins without the tiles being timed. Where the tiles are timed, each dense product they may use is, and the
    faster is kept (the second is not timed when the first takes over 1.5× the kernel's time); the faster of kernel
    and tiles takes the count. The tiles keep the dense product measured faster at the smallest loss, the nearest
    count where they run. (Until 2026-11-29 the tiles had to be 10 % faster, so that timing noise near the
    crossover would not decide. But the probe times the layer's weight hot in cache, where the kernel's smaller
    reads count for less: on an AMD Zen 5 that margin alone kept the kernel at 64 or 128 tokens on 7 of 14 shapes,
    where the tiles probed 2-10 % faster, and with cold weights it then ran 0.70-0.94× dense at 64 tokens on five
    of them.) Points up to :data:`ALWAYS_PROBED` tokens are always measured; a larger one is not started when, at
    the previous point's cost per token, it would end past ``budget_s``. The crossover is the largest count measured
    as a kernel win (0: none), with the smallest measured as a loss (``loses_at``; points the budget left between
    the two are measured by :func:`extend_crossover` when a call needs them).
    """
    started = time.perf_counter()
    notes: list[str] = []
    probe = _Probe(values, codes, x_dtype, _measure_threads(values, codes, x_dtype, notes), notes)
    # Gallop (1, 4, 16, 64, ... tokens: the cheap decode sizes first), then bisect between the last win and the
    # first loss, until the budget is spent.
    # Decode and small-batch sizes (up to ALWAYS_PROBED tokens) are always measured; a larger point is not started
    # when, at the last point's cost per token, it would end past the budget.
    won, lost = -1, len(tokens)  # indices: tokens[won] a measured kernel win, tokens[lost] a measured loss
    per_token = 0.0  # seconds the last point cost, per token
    while lost - won > 1:
        if won < 0:
            index = 0  # one token
        elif lost == len(tokens):
            index = min(won + 2, lost - 1)  # gallop: 4x the tokens
        else:
            index = (won + lost) // 2  # bisect
        elapsed = time.perf_counter() - started
        if tokens[index] > ALWAYS_PROBED and elapsed + per_token * tokens[index] > budget_s:
            notes.append(f"probe budget {budget_s:g} s: {tokens[index]} tokens not measured")
            break
        point_started = time.perf_counter()
        if probe.kernel_wins(tokens[index]):
            won = index
        else:
            lost = index
        per_token = (time.perf_counter() - point_started) / tokens[index]
    won_tokens = tokens[won] if won >= 0 else 0
    loses_at = tokens[lost] if lost < len(tokens) else None
    # The tiles run above the crossover, so their dense product is the one measured faster at the smallest loss, the
    # nearest count where they run, rather than at the last point timed (a bisection's last is often a kernel win).
    dense = probe.dense_at.get(loses_at) if loses_at is not None else None
    dense = dense or probe.dense
    if dense is None:
        dense = probe.choices[0]
        notes.append(f"tiles' dense product not timed: {dense}, the project's default")
    return Crossover(won_tokens, dense, "; ".join(notes), time.perf_counter() - started, probe.serial_work, loses_at)


class _Probe:
    """Times the kernel against the dense tiles on one layer's packed weight at given token counts (one per
    :meth:`kernel_wins` call), for :func:`measure_crossover` and :func:`extend_crossover`."""

    def __init__(
        self,
        values: torch.Tensor,
        codes: torch.Tensor,
        x_dtype: torch.dtype,
        serial_work: int,
        notes: list[str],
        *,
        choices: tuple[str, ...] | None = None,
    ) -> None:
        self.values, self.codes, self.x_dtype, self.serial_work, self.notes = values, codes, x_dtype, serial_work, notes
        self.generator = torch.Generator().manual_seed(0)
        self.in_features = values.shape[1] * 2
        self.choices = choices or _dense_choices(x_dtype, values.dtype)  # the dense products the tiles may use
        self.dense: str | None = None  # the faster dense product of the tiles, once they are timed
        self.dense_at: dict[int, str] = {}  # the same at each token count where the tiles were timed
        self.repeats: dict[str, int] = {}
        row_bytes = self.in_features * values.element_size()
        rows = tile_rows(values.shape[0], row_bytes, hand_over_tile_bytes(values.shape[0] * row_bytes))
        buffer = torch.empty(rows, self.in_features, dtype=values.dtype)  # [rows, in]
        module, isa = _module(), _STATE.isa_index

        def decompress_all() -> None:
            for start in range(0, values.shape[0], rows):
                module.decompress(values, codes, start, min(values.shape[0], start + rows), buffer, isa, serial_work)

        self.floor = self.timed("decompression", decompress_all)

    def timed(self, name: str, run: Callable[[], object]) -> float:
        if name not in self.repeats:  # warm-up, which also sets how many calls are affordable
            self.repeats[name] = 3 if _best_of(run, 1) < 0.02 else 1
        return _best_of(run, self.repeats[name])

    def kernel_wins(self, count: int) -> bool:
        values, codes, serial_work = self.values, self.codes, self.serial_work
        x = torch.randn(count, self.in_features, generator=self.generator).to(self.x_dtype)  # [count, in]

        def run_kernel() -> torch.Tensor:
            return packed_product(x, values, codes, serial_work=serial_work)

        def run_tiles(name: str) -> Callable[[], torch.Tensor]:
            return functools.partial(dense_tiles_product, x, values, codes, dense=name, serial_work=serial_work)

        kernel = self.timed("kernel", run_kernel)
        if kernel < self.floor:
            self.notes.append(f"{count}: kernel {kernel * 1e3:.3g} ms < decompression alone {self.floor * 1e3:.3g} ms")
            return True
        tiles: dict[str, float] = {}
        for name in self.choices:  # the project's default first; another only while the tiles are in the running
            if tiles and min(tiles.values()) > 1.5 * kernel:
                break
            tiles[name] = self.timed(name, run_tiles(name))
        self.dense = min(tiles, key=lambda name: tiles[name])
        # One more round of each, call by call: on a shared VM a slow spell (seconds long; on an AMD Zen 4 the token-
        # vector kernel ran at about half its speed in such spells) can fall on one path's calls above and not on
        # the other's; here it falls on both, and each keeps its best call.
        for _ in range(self.repeats["kernel"]):
            kernel = min(kernel, _best_of(run_kernel, 1))
            tiles[self.dense] = min(tiles[self.dense], _best_of(run_tiles(self.dense), 1))
        self.dense_at[count] = self.dense
        self.notes.append(
            f"{count}: kernel {kernel * 1e3:.3g} ms, tiles ({self.dense}) {tiles[self.dense] * 1e3:.3g} ms"
        )
        return tiles[self.dense] > kernel


def _unmeasured(found: Crossover, point: int) -> bool:
    """Whether probe point ``point`` lies between ``found.tokens`` and ``found.loses_at``: not yet measured."""
    return found.tokens < point and (found.loses_at is None or point < found.loses_at)


def _open(found: Crossover) -> bool:
    """Whether probe points between ``found.tokens`` and ``found.loses_at`` are still unmeasured."""
    return any(_unmeasured(found, p) for p in PROBE_TOKENS)


def _point_for(found: Crossover, count: int) -> int | None:
    """The probe point a call of ``count`` tokens needs measured: the smallest of :data:`PROBE_TOKENS` at or above
    ``count``, when it is still unmeasured; else None."""
    point = next((p for p in PROBE_TOKENS if p >= count), None)
    return point if point is not None and _unmeasured(found, point) else None


@torch.no_grad()
def extend_crossover(
    found: Crossover, values: torch.Tensor, codes: torch.Tensor, x_dtype: torch.dtype, count: int
) -> Crossover:
    """``found`` after measuring the probe point a call of ``count`` tokens needs, when the first probe's budget
    left it unmeasured: the smallest point of :data:`PROBE_TOKENS` at or above ``count``, when it lies between
    ``found.tokens`` and ``found.loses_at``; ``found`` itself when there is none. The tiles are timed with the dense
    product the first probe chose (a point of a LLaMA-7B-sized layer at 512 tokens costs about a second per
    product timed). (Decode-sized calls keep their
    quick first probe; a long prompt pays for its own size once. Measured on an AMD Zen 5, fp32: with the token-
    vector kernel faster than the tiles at 128-1024 tokens on the LLaMA-7B shapes, the first probe's 0.5 s stopped
    at 64 tokens, and above it those layers took tiles that ran 0.88-0.98× dense at 128 and 512 tokens, where the
    kernel ran 1.05-1.19×.)"""
    point = _point_for(found, count)
    if point is None:
        return found
    started = time.perf_counter()
    notes: list[str] = []
    probe = _Probe(values, codes, x_dtype, found.serial_work, notes, choices=(found.dense,))  # the one it chose
    wins = probe.kernel_wins(point)
    return Crossover(
        point if wins else found.tokens,
        probe.dense or found.dense,
        f"{found.how}; at a first call of {count} tokens: {'; '.join(notes)}",
        found.seconds + time.perf_counter() - started,
        found.serial_work,
        found.loses_at if wins else point,
    )


def _work(values: torch.Tensor, codes: torch.Tensor, tokens: int) -> int:
    """The work size the kernel compares with ``serial_work`` for a product of ``tokens`` tokens (as ``linear`` in
    dispatch.cpp counts it: the packed bytes streamed, plus the tokens' share)."""
    out = values.shape[0]
    return out * (values.shape[1] * values.element_size() + codes.shape[1]) + tokens * out * values.shape[1]


def _thread_timings(
    values: torch.Tensor, codes: torch.Tensor, x_dtype: torch.dtype, tokens: int
) -> tuple[float, float, bool]:
    """Medians of 9 interleaved calls of ``tokens`` tokens, through torch's threads and on the calling thread, the
    weight flushed from the caches before each call where the CPU can and it is at most
    :data:`THREAD_PROBE_FLUSH_BYTES` (a model's forward finds a layer's weight in memory, the other layers having run
    since: a hot weight favours the calling thread, whose product then costs less than waking the pool's threads).

    Measured (Xeon family 6 model 167, 2 threads, SmolLM2 fp32 greedy decode, the 576 x 576 layers alone switched,
    8 rounds interleaved): with the hot probe's answer (one thread below 64 tokens) a step took 34.0 ms, on both
    threads 32.1 ms, faster in every round; the hot probe had timed 25.4 µs pooled against 19.9 µs alone. Returns
    (pooled, alone, whether the weight was flushed)."""
    module = _module()
    x = torch.randn(tokens, values.shape[1] * 2).to(x_dtype)  # [tokens, in]
    samples: dict[int, list[float]] = {SERIAL_WORK: [], ONE_THREAD: []}
    for work in samples:  # warm-up: the pool's threads exist after this
        packed_product(x, values, codes, serial_work=work)
    flushed = values.numel() * values.element_size() + codes.numel() <= THREAD_PROBE_FLUSH_BYTES
    for round_ in range(9):
        for work in (SERIAL_WORK, ONE_THREAD) if round_ % 2 == 0 else (ONE_THREAD, SERIAL_WORK):
            if flushed:  # evict is False (nothing flushed) where the CPU has no cache flush: then timed as it lies
                flushed = bool(module.evict(values)) and bool(module.evict(codes))
            started = time.perf_counter()
            packed_product(x, values, codes, serial_work=work)
            samples[work].append(time.perf_counter() - started)
    pooled, alone = (statistics.median(samples[work]) for work in (SERIAL_WORK, ONE_THREAD))
    return pooled, alone, flushed


def _measure_threads(values: torch.Tensor, codes: torch.Tensor, x_dtype: torch.dtype, notes: list[str]) -> int:
    """The work size to pass the kernel for this weight: :data:`SERIAL_WORK` unless the calling thread alone made a
    one-token product faster by the :data:`ONE_THREAD_MARGIN`; where it did, the work of a
    :data:`THREADS_RECHECK`-token product unless the calling thread won that one too (fewer tokens then run on the
    calling thread), else :data:`ONE_THREAD`. (Until 2026-11-30 one
    token decided for every count: on an AMD Zen 4, 2 threads, SmolLM2's 192 x 576 then ran 512-token products on
    one thread, 0.60-0.67x dense, where both threads run them at 1.05-1.10x.)"""
    threads = torch.get_num_threads()
    weight_bytes = values.numel() * values.element_size() + codes.numel()
    if threads == 1 or weight_bytes < SERIAL_WORK:
        return SERIAL_WORK
    for tokens in (1, THREADS_RECHECK):
        pooled, alone, flushed = _thread_timings(values, codes, x_dtype, tokens)
        what = "1 token" if tokens == 1 else f"{tokens} tokens"
        weight = (
            "weight flushed from the caches"
            if flushed
            else f"weight not flushed: over {THREAD_PROBE_FLUSH_BYTES >> 20} MiB, or no cache flush on this CPU"
        )
        notes.append(
            f"{what}: {threads} threads {pooled * 1e3:.3g} ms, 1 thread {alone * 1e3:.3g} ms (medians of 9, {weight})"
        )
        if not alone < ONE_THREAD_MARGIN * pooled:
            return SERIAL_WORK if tokens == 1 else _work(values, codes, tokens)
    return ONE_THREAD


def measure_long_row_prefetch(pairs: int = LONG_ROW_PROBE_PAIRS) -> LongRowPrefetch:
    """Time the AVX-512 general kernel's one-token product of a long-row weight (:data:`LONG_ROW_PROBE_SHAPE`, fp32)
    with and without its prefetch of the next rows, the weight flushed from every cache before each call (a decode
    step finds a large layer in memory, not in cache), alternated, on the calling thread; keep the prefetch unless
    it measured slower by more than :data:`LONG_ROW_MARGIN`, and set the extension accordingly.

    Why measured: on the Xeon of 2026-11-30 (family 6 model 167), 1 thread, weights rotated over 400 MB, LLaMA-7B's
    fp32 layers ran 20-25 % faster without it, SmolLM2's short rows 25-35 % slower (they keep it: rows of fewer
    bytes always prefetch); the measurement that introduced it, on another machine, had found it ~10 % faster on
    4096 x 4096 (docs/kernels.md, "Prefetch")."""
    module = _module()
    started = time.perf_counter()
    if not _chooses_long_row_prefetch():
        return LongRowPrefetch(True, None, None, 0.0, f"not measured: the {_STATE.isa} kernels do not choose it")
    rows, inputs = LONG_ROW_PROBE_SHAPE
    values = torch.ones(rows, inputs // 2)  # fp32 [rows, in/2]
    codes = torch.full((rows, inputs // 8), 0xE4, dtype=torch.uint8)  # every group keeps its inputs (0, 1), (2, 3)
    x = torch.randn(1, inputs)  # [1, in]
    times: dict[bool, list[float]] = {True: [], False: []}
    decided = True  # the prefetch stays on unless measured slower
    try:
        for i in range(pairs + 1):  # the first pair warms up, untimed
            for on in (True, False) if i % 2 == 0 else (False, True):
                module.set_long_row_prefetch(int(on))
                if not (module.evict(values) and module.evict(codes)):
                    return LongRowPrefetch(True, None, None, 0.0, "not measured: this CPU has no cache flush")
                begun = time.perf_counter()
                module.linear(x, values, codes, None, _STATE.isa_index, ONE_THREAD, BLOCK_ROWS)
                if i:
                    times[on].append(time.perf_counter() - begun)
        with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
        decided = not without_s < with_s * LONG_ROW_MARGIN
        return LongRowPrefetch(decided, with_s, without_s, time.perf_counter() - started, "measured")
    finally:
        module.set_long_row_prefetch(int(decided))


def _chooses_long_row_prefetch() -> bool:
    """Whether the instruction set in use has the long-row prefetch choice (the AVX-512 general kernel's)."""
    return _STATE.isa_index >= ISAS.index("avx512")


def _ensure_long_row_prefetch(values: torch.Tensor) -> None:
    """Measure the long-row prefetch (once per process and instruction set) when ``values`` has long rows."""
    if _STATE.long_rows is not None or not _chooses_long_row_prefetch():
        return
    if values.shape[1] * values.element_size() < int(_module().long_row_bytes()):
        return
    with _STATE.lock:
        if _STATE.long_rows is None:
            _STATE.long_rows = measure_long_row_prefetch()
            log.info("packed 2:4 CPU kernel: %s [%.2f s]", _STATE.long_rows.text(), _STATE.long_rows.seconds)


def crossover_for(x: torch.Tensor, layer: PackedLinear, values: torch.Tensor | None = None) -> Crossover:
    """The crossover of ``layer`` for inputs like ``x`` on this machine: measured at the first call per (shape,
    dtypes, threads, instruction set), then looked up; extended (:func:`extend_crossover`) when ``x`` has more tokens
    than it reaches and the probe point for them was left unmeasured."""
    values = _tensors(layer)[0] if values is None else values
    threads = torch.get_num_threads()
    count = x.numel() // max(1, x.shape[-1])  # tokens
    cached = layer.__dict__.get(_LAYER_CACHE)  # the last answer for this layer, if the conditions still hold
    if cached is not None and cached[:4] == (x.dtype, values.dtype, threads, _STATE.isa):
        found: Crossover = cached[4]
        if count <= found.tokens or _point_for(found, count) is None:
            return found
    key = (layer.out_features, layer.in_features, values.dtype, x.dtype, threads, _STATE.isa)
    known = _STATE.crossovers.get(key)
    if known is None:
        _ensure_long_row_prefetch(values)
        found = measure_crossover(values, _tensors(layer)[1], x.dtype)
        _log_crossover(key, found)
    else:
        found = known
    if count > found.tokens:
        extended = extend_crossover(found, values, _tensors(layer)[1], x.dtype, count)
        if extended is not found:
            found = extended
            _log_crossover(key, found)
    _STATE.crossovers[key] = found
    layer.__dict__[_LAYER_CACHE] = (x.dtype, values.dtype, threads, _STATE.isa, found)
    return found


def _log_crossover(key: tuple[Any, ...], found: Crossover) -> None:
    out, inp, w_dtype, x_dtype, threads, isa = key
    log.info(
        "packed 2:4 CPU kernel, %dx%d %s weights x %s inputs, %d threads, %s: kernel up to %d tokens, dense tiles "
        "(%s) above [%s; %.2f s]",
        out,
        inp,
        str(w_dtype).removeprefix("torch."),
        str(x_dtype).removeprefix("torch."),
        threads,
        isa,
        found.tokens,
        found.dense,
        found.how,
        found.seconds,
    )


def _tensors(layer: PackedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """values, indices, bias of ``layer``, read from the module's own dictionaries: ``layer.values`` goes through
    ``nn.Module.__getattr__``, measured at 1-4 µs a lookup, which a decode call of a small layer cannot afford."""
    buffers = layer._buffers
    values, indices = buffers["values"], buffers["indices"]
    assert values is not None and indices is not None
    bias = layer._parameters.get("bias")
    return values, indices, bias


def cpu_packed_kernel(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor | None:
    """The registered kernel: the C++ product for up to the crossover's token count, else None. x [..., in] ->
    [..., out]: the C++ side flattens the leading dimensions (cheaper there than two reshapes here)."""
    values, indices, bias = _tensors(layer)
    if not _supported(x, values, layer) or (_STATE.isa is None and not ensure()):
        return None
    found = crossover_for(x, layer, values)
    limit = found.tokens * layer.in_features
    if x.numel() > limit:  # more tokens than the crossover
        return None
    isa, serial_work = _STATE.isa_index, found.serial_work
    call = _bound(
        values, indices, bias, isa=isa, serial_work=serial_work, x_dtype=x.dtype, limit=limit, width=x.shape[-1]
    )
    bind_fast_call(layer, KERNEL_NAME, call)
    return _module().linear(x, values, indices, bias, isa, serial_work, BLOCK_ROWS)


def _bound(
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    isa: int,
    serial_work: int,
    x_dtype: torch.dtype,
    limit: int,
    width: int,
) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """This layer's product with everything :func:`cpu_packed_kernel` looked up bound: it declines what that would
    decline or decide differently (x off the CPU or of another width, another dtype, more tokens than the crossover,
    autograd, autocast, another thread count), so such inputs get the dispatch's answer and its errors.

    The checks run in C++ (``bound_linear``, through ``bound_takes``; x last), so the bound call is a
    ``functools.partial`` of the extension's function, with no Python frame of its own. Measured (AMD Zen 4, 1 thread,
    a 16 x 32 fp32 layer, hot, medians of 20,000 calls): the call as a Python closure 2.03 µs, the product alone
    1.26 µs (the closure's ``torch.is_autocast_enabled("cpu")`` alone 0.40 µs)."""
    return functools.partial(
        _module().bound_linear,
        values,
        indices,
        bias,
        isa,
        serial_work,
        BLOCK_ROWS,
        x_dtype == torch.bfloat16,
        width,
        limit,
        torch.get_num_threads(),
    )


def cpu_dense_tiles_kernel(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor | None:
    """The registered hand-over: dense tiles above the crossover's token count, else None."""
    values, indices, bias = _tensors(layer)
    if not _supported(x, values, layer) or (_STATE.isa is None and not ensure()):
        return None
    crossover = crossover_for(x, layer, values)
    if x.numel() <= crossover.tokens * layer.in_features:  # no more tokens than the crossover
        return None
    call = _bound_tiles(
        values, indices, bias, crossover, x_dtype=x.dtype, width=layer.in_features, out=layer.out_features
    )
    bind_fast_call(layer, TILES_NAME, call)
    return _tiles_call(x, values, indices, bias, found=crossover, out=layer.out_features)


def _tiles_call(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    found: Crossover,
    out: int,
) -> torch.Tensor:
    x2 = x.reshape(-1, values.shape[1] * 2)  # [tokens, in]
    y = dense_tiles_product(x2, values, indices, bias, dense=found.dense, serial_work=found.serial_work)
    return y.reshape(*x.shape[:-1], out)  # [..., out]


def _bound_tiles(
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    found: Crossover,
    *,
    x_dtype: torch.dtype,
    width: int,
    out: int,
) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """The hand-over with what :func:`cpu_dense_tiles_kernel` looked up bound, as :func:`_bound` binds the kernel's
    call: it declines what the dispatch would decline or decide differently (x off the CPU or of another width,
    another dtype, no more tokens than the crossover, a token count whose probe point is still unmeasured, autograd,
    autocast, another thread count). Why: above the crossover, each call through the dispatch first asked the kernel
    (which declined) and looked the crossover up twice, 10-15 µs of Python. Measured (AMD Zen 4, 1 thread, bf16
    192x576 at 512 tokens, medians of 400 calls interleaved with dense ``F.linear``, three processes each way in
    turn): dense / ``layer(x)`` 0.88-0.90 unbound, 0.90-0.92 bound. The checks it shares with :func:`_bound` are the
    extension's ``bound_takes``, the same code."""
    threads, floor = torch.get_num_threads(), found.tokens * width
    takes = functools.partial(_module().bound_takes, x_dtype == torch.bfloat16, width, floor, _ANY_SIZE, threads)

    def call(x: torch.Tensor) -> torch.Tensor | None:
        if not takes(x) or _point_for(found, x.numel() // width) is not None:  # the dispatch measures that point first
            return None
        return _tiles_call(x, values, indices, bias, found=found, out=out)

    return call


# --- Descriptions --------------------------------------------------------------------------------------------


def _crossovers_text() -> str:
    if not _STATE.crossovers:
        return "crossover: measured at the first call per (shape, dtypes, threads); none measured yet"
    parts = []
    for (out, inp, w_dtype, x_dtype, threads, isa), found in _STATE.crossovers.items():
        if isa != _STATE.isa:
            continue
        dtypes = str(w_dtype).removeprefix("torch.") + (
            "" if w_dtype == x_dtype else f" x {str(x_dtype).removeprefix('torch.')}"
        )
        pool = ""
        if threads > 1 and found.serial_work == ONE_THREAD:
            pool = "on 1 thread (measured faster)"
        elif threads > 1 and found.serial_work != SERIAL_WORK:
            pool = f"on 1 thread below {THREADS_RECHECK} tokens (measured faster)"
        later = " (larger counts not yet measured: at their first call)" if _open(found) else ""
        parts.append(
            f"{out}x{inp} {dtypes} {threads} threads: kernel <= {found.tokens} tokens{' ' + pool if pool else ''}, "
            f"tiles ({found.dense}) above{later}"
        )
    how = "crossover measured at first use per shape (kernel vs dense tiles timed, galloping then bisecting): "
    return how + "; ".join(parts)


def describe() -> KernelDescription:
    """What ``cpu_packed`` runs on: instruction set, threads, crossovers; or why it is unavailable (this builds the
    extension when it is not built yet)."""
    try:
        available = ensure()
    except CpuKernelError as exc:
        return KernelDescription(KERNEL_NAME, False, str(exc))
    if not available:
        return KernelDescription(KERNEL_NAME, False, _STATE.failure or "unavailable")
    assert _STATE.built is not None
    flags = ", ".join(_module().cpu_flags()) or "none"
    how = "forced" if _STATE.requested != "auto" else "chosen from the CPU's flags"
    detail = (
        f"instruction set {_STATE.isa} ({how}; CPU flags: {flags}; compiled: {', '.join(_STATE.built.isas)}); "
        f"threads {torch.get_num_threads()} (one thread below {SERIAL_WORK >> 10} KiB streamed, and for shapes where "
        f"one thread measured faster by more than {1 - ONE_THREAD_MARGIN:.0%} at one token, weights of at most "
        f"{THREAD_PROBE_FLUSH_BYTES >> 20} MiB flushed); "
        f"{_token_blocks_text()}; {_long_rows_text()}{_crossovers_text()}"
    )
    return KernelDescription(KERNEL_NAME, True, detail)


def _long_rows_text() -> str:
    if not _chooses_long_row_prefetch():
        return ""
    if _STATE.long_rows is None:
        return "next-row prefetch on long rows: on until measured (at the first layer with long rows); "
    return _STATE.long_rows.text() + "; "


def _token_blocks_text() -> str:
    module = _module()
    l1d = int(module.l1d_bytes())
    cache = f"L1d {l1d >> 10} KiB" if l1d else "L1d size not reported"
    rows = 64 if module.tokens_tall() else 16
    return f"token-vector kernel: full chunks in blocks of {rows} rows ({cache})"


def describe_tiles() -> KernelDescription:
    """What ``cpu_dense_tiles`` does, or why it cannot run."""
    kernel = describe()
    if not kernel.available:
        return KernelDescription(TILES_NAME, False, kernel.detail)
    return KernelDescription(
        TILES_NAME,
        True,
        f"above each layer's measured crossover: the weight decompressed {hand_over_tile_bytes() >> 10} KiB of rows "
        f"at a time, whole up to {ONE_TILE_BYTES >> 10} KiB ({_STATE.isa}; L2 {int(_module().l2_bytes()) >> 10} KiB, "
        f"{torch.get_num_threads()} threads), "
        "each tile multiplied by the faster dense product measured (F.linear or oneDNN); with more "
        "than one thread, a weight of several tiles a thread on F.linear has each thread multiply its own tiles, "
        f"else at most {MAX_TILES} tiles, each product over all threads",
    )


def measured_crossovers() -> list[dict[str, Any]]:
    """Every crossover measured in this process, with its conditions and what was timed (for reports)."""
    return [
        {
            "shape": [out, inp],
            "weights": str(w_dtype).removeprefix("torch."),
            "inputs": str(x_dtype).removeprefix("torch."),
            "threads": threads,
            "isa": isa,
            "tokens": found.tokens,
            "loses_at": found.loses_at,
            "dense": found.dense,
            "kernel_threads": 1 if found.serial_work == ONE_THREAD else threads,
            # below this many tokens the kernel runs on the calling thread (threads measured slower there)
            "kernel_one_thread_below": (
                None if threads == 1 or found.serial_work in (SERIAL_WORK, ONE_THREAD) else THREADS_RECHECK
            ),
            "how": found.how,
            "seconds": round(found.seconds, 3),
        }
        for (out, inp, w_dtype, x_dtype, threads, isa), found in _STATE.crossovers.items()
    ]


def isa_in_use() -> str | None:
    """The instruction set the kernel runs (None before the first call, or when unavailable)."""
    return _STATE.isa


def kernel_in_use(x_dtype: torch.dtype, w_dtype: torch.dtype, tokens: int) -> str | None:
    """Which kernel of the instruction set in use computes such a product: ``amx`` (bf16 × bf16 from 5 tokens on an
    AMX CPU), ``avx512bf16`` (bf16 × bf16, up to 3 tokens), ``<isa>_tokens`` (the token-vector kernel: fp32
    activations, many tokens), else the instruction set's own; None when unavailable."""
    if _STATE.isa is None:
        return None
    bf16 = torch.bfloat16
    return str(_module().kernel_name(_STATE.isa_index, x_dtype == bf16, w_dtype == bf16, tokens))


register_packed_kernel(KERNEL_NAME, cpu_packed_kernel, describe)
register_packed_kernel(TILES_NAME, cpu_dense_tiles_kernel, describe_tiles)
