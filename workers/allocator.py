"""Keep large tensor allocations on the heap while a job runs (glibc only; elsewhere nothing changes).

glibc's malloc serves every allocation above its mmap threshold (32 MiB at most) with a fresh ``mmap``
and gives it back with ``munmap`` on free. A calibration forward allocates and frees tensors of hundreds of
MB many times per block (64 × 512 tokens × 1536 features × 4 bytes = 201 MB for one MLP activation), so
every one of them is page-faulted in, 4 KiB at a time, zero-filled by the kernel, on every block.
Measured on the 2-core AMD EPYC VM (SmolLM2-135M, P-CPU): one block's pruning forward 4.7 s → 3.3 s with
large allocations served from the heap instead (``docs/engine.md``, "CPU allocations").

:func:`heap_allocations` turns ``mmap`` off and raises the trim threshold for its duration, so freed
memory is reused in place rather than returned to the kernel and faulted in again; on exit it sets the thresholds
glibc itself settles on for such a process (``_SETTLED_MMAP_THRESHOLD``: any mallopt ends glibc's own adjustment)
and trims the heap, so the process gives the memory back afterwards.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

# mallopt(3) parameters and glibc's defaults for them
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_MMAP_MAX = 65536
# What a context leaves behind. glibc starts at a 128 KiB mmap threshold and raises it each time a mapped chunk is
# freed (up to 32 MiB on 64-bit, the trim threshold following at twice that), so a process that keeps allocating
# and freeing large tensors soon serves them from its heap. Any mallopt of these parameters turns that adjustment off
# for good, and glibc has no call to turn it on again: restoring the 128 KiB start would pin every allocation above
# 128 KiB to a fresh mmap, page-faulted in on every use. Measured (AVX2 EPYC, SmolLM2 fp32, batch 8, after
# secateurs.prune() in the same process): prefill of 8 x 128 tokens 7.5 s with 128 KiB restored, 3.9 s with these
# (4.4 s in a process that never pruned); benchmarks/decode.py's batch-8 speedup read 0.57x instead of 1.19x.
_SETTLED_MMAP_THRESHOLD = 32 << 20
_SETTLED_TRIM_THRESHOLD = 64 << 20
_LARGE_MAPPED = 1 << 20  # large-block mode: allocations from this size get their own mapping
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: ~2 GiB of free heap top is kept before trimming


@cache
def _glibc() -> Any | None:
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and macOS have mallopt semantics of their own
            return None
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):
        return None


_MAPPING = {"max": _DEFAULT_MMAP_MAX, "threshold": _SETTLED_MMAP_THRESHOLD}  # what this module last set


def _set_mapping(libc: Any, mmap_max: int, threshold: int) -> bool:
    """glibc's M_MMAP_MAX and M_MMAP_THRESHOLD, remembered (mallopt has no getter) for :func:`mapped_allocations`."""
    _MAPPING.update(max=mmap_max, threshold=threshold)
    return bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_bytes() -> int | None:
    """This process's resident set now (Linux ``/proc/self/statm``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


# Between two blocks the heap is trimmed only once the resident set has grown past its level at the end of the first
# block since the last trim by as much as that block itself added, within these bounds (see Heap.between_blocks).
BLOCK_GROWTH_BYTES = 96 << 20
BLOCK_GROWTH_FLOOR = 16 << 20


class Heap:
    """The heap policy of one :func:`heap_allocations` context: :meth:`release` between stages,
    :meth:`between_blocks` between two pruned blocks."""

    def __init__(self, libc: Any | None) -> None:
        self._libc = libc
        self._base = _resident_bytes()  # the resident set after the last trim (or when the context began)
        self._level: int | None = None  # the resident set at the end of the first block since the last trim
        self._growth = BLOCK_GROWTH_BYTES  # how far past that level the heap may grow before the next trim

    @property
    def growth_bound(self) -> int:
        """Bytes past the first block's level the resident set may grow before :meth:`between_blocks` trims."""
        return self._growth

    def map_large_allocations(self) -> None:
        """For the rest of the context (models with large blocks): allocations of 1 MiB and more get their own
        mapping again, given back the moment they are freed; smaller ones keep reusing the heap. Reusing the heap
        in place fragments it by hundreds of MB per block when each block allocates Hessians of 0.5 GB and
        weights of 100+ MB (a LLaMA-7B-shaped job: 4.26 GB peak RSS against 3.2 GB of live tensors), while
        faulting those pages in again costs about a second of a block's minutes.
        Why 1 MiB and not glibc's 32 MiB maximum: on TinyLlama's shape in fp32 the attention's 16.8 MB weights,
        Hessians and solve temporaries stayed on the heap, and at the block's peak 0.47 GB of it was free but
        resident (mallinfo2); the peak RSS then depended on the machine's load (1.40-1.44 GB quiet, 1.63 GB with a
        busy loop on the other core, where more of the OpenMP threads' allocations land in arenas of their own;
        1 MiB: 1.34 and 1.39 GB)."""
        if self._libc is not None:
            _set_mapping(self._libc, _DEFAULT_MMAP_MAX, _LARGE_MAPPED)
            self._libc.malloc_trim(0)

    def release(self) -> None:
        """Between two stages of a job (evaluation, pruning, speed step), and between two pruned blocks when
        :meth:`between_blocks` says so: hand the heap's free pages back to the kernel now. Reusing freed memory in
        place is the point, but the heap also fragments a little per block, and the free pages it keeps add to the
        next block's peak. Measured on SmolLM2
        under P-CPU (Xeon, 2 threads, 2026-11-29, whole job in-process): trimming every 4 blocks 2.38-2.49 GB peak
        RSS, prune 90.4 s; every 2 blocks 2.16 GB; after every block 2.07 GB, 94.3 s (the quick start, a worker
        process, peaked at 2.58 GB with every 4 blocks, over its 2.5 GB bound); the trim's cost is the page faults
        of the next block's first allocations. Each stage allocates tensors of its own sizes, so what one stage
        freed mostly stays unused by the next (SmolLM2 quick start: the dense evaluation left ~1.2 GB of free heap
        that the first pruned block did not reuse)."""
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self._base = _resident_bytes()
        self._level = None

    def between_blocks(self) -> None:
        """Between two pruned blocks: trim the heap (:meth:`release`) only once the resident set has grown past
        what it was at the end of the first block since the last trim by as much as that first block added to it
        (its working set), at least :data:`BLOCK_GROWTH_FLOOR` and at most :data:`BLOCK_GROWTH_BYTES`.

        Each block allocates its activations again, at the same sizes: on a heap kept resident they are reused in
        place, while after a trim every page of them is faulted in and zeroed again. Measured (SmolLM2's first 10
        blocks under P-CPU, AMD EPYC Zen 3, 2 threads, two runs each): trimming after every block 4.2-4.6 s per block,
        peak RSS 1.98 GB; with this bound 3.7-4.4 s, 1.77 and 2.05 GB; never trimming 3.6-4.9 s, 2.21 GB. What the
        heap keeps beyond one block's needs is its fragmentation, which the bound caps at the cost of one trim each
        time it is reached. The bound follows the block's own size so that a small model's job stays small: with a
        fixed 192 MB, a streamed magnitude job on a 100 MB model (24 blocks of 4.2 MB) let its heap fragment by
        37-71 MB before any trim on an AVX2 EPYC (Zen 1; 25 MB on the Xeons); with the bound at one block's working
        set it stays near it. A calibration forward's working set (SmolLM2 under P-CPU: its activations, hundreds
        of MB) takes the ceiling, 96 MB since 2026-12-01 (192 MB before): the same job with its dense evaluation
        (Xeon, family 6 model 167, 2 threads, three runs each way, interleaved) peaked in its prune stage at 1.92,
        2.33 and 2.55 GB with 192 MB (prune 84.0, 87.6, 94.0 s), 1.99, 2.07 and 2.26 GB with 96 MB (81.2, 93.3,
        98.2 s). Where the resident set cannot be read, every block trims."""
        if self._libc is None:
            return
        resident = _resident_bytes()
        if resident is None:
            self.release()
        elif self._level is None:
            self._level = resident  # one block's working set on the heap: the level to keep
            added = resident - self._base if self._base is not None else BLOCK_GROWTH_BYTES
            self._growth = min(BLOCK_GROWTH_BYTES, max(BLOCK_GROWTH_FLOOR, added))
        elif resident >= self._level + self._growth:
            self.release()


@contextmanager
def heap_allocations() -> Iterator[Heap]:
    """Serve large allocations from the reusable heap for the duration (see the module docstring); the
    :class:`Heap` it yields trims the heap at each :meth:`Heap.release` (between blocks and between stages)."""
    libc = _glibc()
    if libc is None:
        yield Heap(None)
        return
    changed = _set_mapping(libc, 0, _MAPPING["threshold"]) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    if not changed:
        log.debug("mallopt refused the heap settings; large allocations stay on mmap")
    try:
        yield Heap(libc)
    finally:
        _set_mapping(libc, _DEFAULT_MMAP_MAX, _SETTLED_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)
        libc.malloc_trim(0)


@contextmanager
def mapped_allocations() -> Iterator[None]:
    """Allocations from 1 MiB get a mapping of their own for the duration, whatever the job's heap policy; the
    policy is restored after. For code that allocates big tensors it never touches and frees them at once:
    transformers building a model under accelerate's ``init_empty_weights`` allocates every weight on the CPU before
    moving it to the meta device. On the heap (mmap off) those requests grew glibc's arena by about the model's size
    (measured, TinyLlama's shape in fp32: 0.17 -> 3.65 GB of arena for +12 MB in use), and the job's later small
    allocations, scattered over that space, kept more pages resident at each block's peak."""
    libc = _glibc()
    if libc is None:
        yield
        return
    saved = dict(_MAPPING)
    _set_mapping(libc, _DEFAULT_MMAP_MAX, _LARGE_MAPPED)
    try:
        yield
    finally:
        _set_mapping(libc, saved["max"], saved["threshold"])


def trim_heap() -> None:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim``; elsewhere nothing happens).

    After a model is read layer by layer, the transients it freed between the tensors it keeps leave holes that
    the heap would otherwise hold on to.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
