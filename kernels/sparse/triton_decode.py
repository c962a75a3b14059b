"""A Triton kernel for 2:4 decode on CUDA: y = x·Wᵀ (+ b) straight from the packed tensors, no dense copy.

The packed 2:4 form (:mod:`secateurs.kernels.sparse.packing`) keeps, for every group of 4 inputs, 2 values and
their 2-bit positions: ``values`` [out, in/2] and ``indices`` [out, in/8] uint8, 4 codes per byte, the first in the
low bits. At decode (1-16 tokens) the product is memory-bound: the time is the weight bytes over the memory
bandwidth, and the packed form moves 9/16 of the dense bytes in 16-bit, so a kernel that reads it directly can be
up to 16/9 = 1.78× faster than dense cuBLAS with no sparse tensor core at all (GUIDE §6; NVIDIA's 2:4 pattern:
Mishra et al. 2021, arXiv 2104.08378, §3). Sparse tensor cores (cuSPARSELt) only pay off in the compute-bound
regime, from hundreds of tokens on (pytorch#111339), which is why this kernel stops at 16 tokens.

How it computes, in the style of the Triton tutorials (the kernel, its launcher, its check against torch):

* Each program owns ``BLOCK_N`` output rows and walks that block's kept values in chunks of ``BLOCK_KH``. Per
  chunk it loads the kept values (contiguous per row: coalesced) and the code byte of each (``kh // 4``), takes
  the 2-bit code ``(byte >> 2·(kh % 4)) & 3``, and gathers x at input position ``4·(kh // 2) + code``: x is a few
  KB and stays in cache, only the packed weight streams from memory. Products accumulate in fp32.
* Layers of whole code words (in % 32 == 0) read the codes as int32 words; for one token (the ``select`` style,
  the table's choice on an H200) x is read as int64 quads, a group's four inputs, and each kept value takes its
  input out of its quad by its code in registers, with no gather (:func:`_select_kernel`).
* Tokens are the innermost tile axis: for more than one token x is passed transposed ([in, tokens] in memory) so
  one gathered position loads all tokens at once.
* Split-K: when the row blocks alone cannot fill the GPU (few output rows), the kept values of a row are split
  over ``SPLIT_K`` programs that add their partial sums into an fp32 buffer with atomics; the launcher casts it.
* Configurations come from a small table per token class (:func:`pick_config`), measured by the GPU check's tuning
  step (benchmarks/gpu_check.py), not from autotuning at run time.
* A layer's first call prepares its :class:`Launch` (checks, configuration, grid, the weight's views) and binds it
  to the layer (:func:`bound_call`): the eager calls like it that follow skip the dispatch and the preparation,
  which cost more host time than a decode-size kernel runs (docs/gpu-kernel.md, "The bound call").

Triton is optional: it is imported on first use; without it, or without CUDA, or for a call it does not take
(dtype, more than 16 tokens, a pattern other than 2:4), the registered kernel declines (returns None) and
:class:`secateurs.kernels.sparse.packing.PackedLinear` runs its reference forward; :func:`describe` says why.
Under ``TRITON_INTERPRET=1`` the launcher also runs on CPU tensors (fp32/fp16), which is how CI checks it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from secateurs.kernels.sparse.packing import (
    FastCall,
    KernelDescription,
    PackedLinear,
    bind_fast_call,
    invalidate_fast_calls,
    pack_nm,
    register_packed_kernel,
)

log = logging.getLogger(__name__)

NAME = "triton"
MAX_TOKENS = 16  # beyond this, decode is no longer memory-bound enough to win: the call goes to dense/cuSPARSELt
CUDA_DTYPES = (torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32, torch.float16)  # the interpreter computes with numpy: no bf16


# --- The kernel ----------------------------------------------------------------------------------------------


# The jitted helpers below, set on first use: the kernels call them by these global names.
program_rows: Any = None
program_span: Any = None
store_rows: Any = None


@functools.cache
def _helpers() -> None:
    """The kernels' common start and end, jitted helpers (inlined by Triton). ``program_rows``: this program's
    BLOCK_N output rows, which of them exist, and their int64 copy (row offsets of large layers overflow int32).
    ``program_span``: this program's share of a row, a whole number of BLOCK-sized chunks, so only the row's end
    is ragged (the last split may run a few fully masked chunks: the loop bound is the same for every split).
    ``store_rows``: y [BN, BM] fp32 plus the bias (added once, by the first split) written to out [M, N] at
    (tokens, rows): a store in out's dtype, or an atomic add into the fp32 buffer when the row is split
    (SPLIT_K > 1). Kernels reach them as module globals (Triton resolves a kernel's callees among its globals,
    also in the interpreter), which this sets."""
    global program_rows, program_span, store_rows  # Triton resolves callees among the kernel's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _rows(N, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        return rows, rows < N, rows.to(tl.int64)

    @triton.jit
    def _span(total, BLOCK: tl.constexpr, SPLIT_K: tl.constexpr):  # type: ignore[no-untyped-def]
        chunks = tl.cdiv(tl.cdiv(total, BLOCK), SPLIT_K)
        begin = tl.program_id(1) * chunks * BLOCK
        return chunks, begin, tl.minimum(begin + chunks * BLOCK, total)

    @triton.jit
    def _store(  # type: ignore[no-untyped-def]  # noqa: PLR0917
        y,
        pid_k,
        rows,
        row_ok,
        tokens,
        token_ok,
        bias_ptr,
        out_ptr,
        stride_om,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # [BN]
            y += tl.where(pid_k == 0, bias, 0.0)[:, None]
        out = out_ptr + tokens[None, :] * stride_om + rows[:, None]  # [BN, BM]
        out_mask = row_ok[:, None] & token_ok[None, :]
        if SPLIT_K == 1:
            tl.store(out, y.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.atomic_add(out, y, mask=out_mask)

    program_rows, program_span, store_rows = _rows, _span, _store


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, built on first use so that importing this module never imports Triton."""
    import triton
    import triton.language as tl

    _helpers()  # defines the globals the kernel calls

    @triton.jit
    def packed24_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0917 (Triton kernels take flat arguments)
        x_ptr,  # [M, K] activations, any strides; for BLOCK_M > 1, BLOCK_M tokens stored [K, BLOCK_M] (padded)
        values_ptr,  # [N, KH] kept values, row-major
        indices_ptr,  # [N, ceil(KH / 4)] uint8, 4 two-bit codes per byte, first in the low bits
        bias_ptr,  # [N] (unused unless HAS_BIAS)
        out_ptr,  # [M, N]: x's dtype, or fp32 when SPLIT_K > 1 (atomics)
        M,
        N,
        KH,  # kept values per row = in_features / 2
        stride_xm,
        stride_xk,
        stride_vn,
        stride_in,
        stride_om,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_KH: tl.constexpr,
    ):
        pid_k = tl.program_id(1)
        rows, row_ok, rows64 = program_rows(N, BLOCK_N)  # [BN] each
        tokens = tl.arange(0, BLOCK_M)  # [BM]
        token_ok = tokens < M
        chunks, k_begin, k_end = program_span(KH, BLOCK_KH, SPLIT_K)  # this program's share of the row
        # One token: everything stays in the [BN, BKH] layout of the values (no layout change inside the loop).
        # More tokens: a [BN, BKH, BM] tile, tokens innermost so that one gathered position loads them all.
        if BLOCK_M == 1:
            acc = tl.zeros([BLOCK_N, BLOCK_KH], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_KH, BLOCK_M], dtype=tl.float32)
        for chunk in range(0, chunks):
            kh = k_begin + chunk * BLOCK_KH + tl.arange(0, BLOCK_KH)  # [BKH] index of the kept value in its row
            mask = row_ok[:, None] & (kh < k_end)[None, :]  # [BN, BKH]
            vals = tl.load(values_ptr + rows64[:, None] * stride_vn + kh[None, :], mask=mask, other=0.0)
            byte = tl.load(indices_ptr + rows64[:, None] * stride_in + (kh // 4)[None, :], mask=mask, other=0)
            code = (byte.to(tl.int32) >> ((kh % 4) * 2)[None, :]) & 3  # [BN, BKH] position inside the group
            col = (kh // 2 * 4)[None, :] + code  # [BN, BKH] input position: 4·group + code
            if BLOCK_M == 1:
                xv = tl.load(x_ptr + col * stride_xk, mask=mask, other=0.0)  # [BN, BKH]
                acc += vals.to(tl.float32) * xv.to(tl.float32)
            else:
                xv = tl.load(
                    x_ptr + col[:, :, None] * stride_xk + tokens[None, None, :] * stride_xm,
                    mask=mask[:, :, None],  # x holds BLOCK_M tokens (zero-padded): no token mask, vector loads
                    other=0.0,
                )  # [BN, BKH, BM]
                acc += vals.to(tl.float32)[:, :, None] * xv.to(tl.float32)
        if BLOCK_M == 1:  # noqa: SIM108 (a static branch of the kernel, like the two above)
            y = tl.sum(acc, axis=1)[:, None]  # [BN, 1]
        else:
            y = tl.sum(acc, axis=1)  # [BN, BM]
        store_rows(y, pid_k, rows, row_ok, tokens, token_ok, bias_ptr, out_ptr, stride_om, HAS_BIAS, SPLIT_K)

    return packed24_kernel


@functools.cache
def _words_kernel() -> Any:
    """The kernel of the word-aligned styles (in_features % 32 == 0). The codes are read as int32 words (16 codes
    each: one load per 16 kept values instead of one byte gather per value) beside tiles of values shaped
    [BLOCK_N, BLOCK_W, 16] (word-aligned, so the value loads are 16-byte vectors), and nothing is masked when the
    launch divides the layer evenly (``EVEN``). Then, by ``EXPAND``:

    * ``words`` (False): x gathered at each kept value's input, one FMA per kept value and token (CUDA cores);
    * ``tiles`` (True): each [BLOCK_N, 32·BLOCK_W] tile of the weight expanded in registers (a kept value lands
      where its code says, zeros elsewhere), then multiplied with x: for several tokens on the tensor cores
      (``tl.dot`` with a [32·BLOCK_W, BLOCK_M] tile of x, BLOCK_M >= 16, zero-padded), for one token by FMAs with
      x read as contiguous vectors (no gather, twice the FMAs of the kept values).

    Either way the memory traffic is the packed bytes."""
    import triton
    import triton.language as tl

    _helpers()  # defines the globals the kernel calls

    @triton.jit
    def packed24_words_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0917
        x_ptr,  # [M, K] (BLOCK_M == 1: any stride) or BLOCK_M tokens stored [K, BLOCK_M] (zero-padded)
        values_ptr,  # [N, KH] kept values, row-major
        words_ptr,  # [N, KH / 16] int32: 16 two-bit codes per word, first in the low bits
        bias_ptr,  # [N]
        out_ptr,  # [M, N]
        M,
        N,
        W,  # words per row = KH / 16
        stride_xm,
        stride_xk,
        stride_vn,
        stride_wn,
        stride_om,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EVEN: tl.constexpr,  # N % BLOCK_N == 0 and W % (BLOCK_W * SPLIT_K) == 0: no masks
        EXPAND: tl.constexpr,  # the tiles style
        PREFETCH: tl.constexpr,  # load the next chunk's codes and values before computing this one's
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        pid_k = tl.program_id(1)
        rows, row_ok, rows64 = program_rows(N, BLOCK_N)  # [BN] each
        tokens = tl.arange(0, BLOCK_M)  # [BM]
        token_ok = tokens < M
        j = tl.arange(0, 16)  # kept value inside its word
        g = tl.arange(0, 8)  # group inside the word
        position = tl.arange(0, 4)[None, None, None, :]  # [1, 1, 1, 4] input inside the group
        chunks, w_begin, w_end = program_span(W, BLOCK_W, SPLIT_K)  # in code words
        value_rows = values_ptr + rows64[:, None, None] * stride_vn  # [BN, 1, 1]
        word_rows = words_ptr + rows64[:, None] * stride_wn  # [BN, 1]
        if EXPAND and BLOCK_M == 1:
            acc = tl.zeros([BLOCK_N, BLOCK_W * 32], dtype=tl.float32)
        elif EXPAND:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        elif BLOCK_M == 1:
            acc = tl.zeros([BLOCK_N, BLOCK_W, 16], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_W, 16, BLOCK_M], dtype=tl.float32)
        if PREFETCH:  # the first chunk, loaded before the loop (each iteration then loads the next one)
            w_ahead = w_begin + tl.arange(0, BLOCK_W)  # [BW]
            ahead = row_ok[:, None] & (w_ahead < w_end)[None, :]  # [BN, BW]: constant along the 16 values
            word_next = tl.load(word_rows + w_ahead[None, :], mask=ahead, other=0)
            vals_next = tl.load(
                value_rows + ((w_ahead * 16)[None, :, None] + j[None, None, :]), mask=ahead[:, :, None], other=0.0
            )
        for chunk in range(0, chunks):
            w = w_begin + chunk * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW] word index in the row
            value_offsets = (w * 16)[None, :, None] + j[None, None, :]  # [1, BW, 16]
            if not EVEN:
                mask2 = row_ok[:, None] & (w < w_end)[None, :]  # [BN, BW]
            if PREFETCH:  # this chunk's codes and values arrived during the last one; ask for the next now
                word = word_next
                vals = vals_next
                w_ahead = w + BLOCK_W
                ahead = row_ok[:, None] & (w_ahead < w_end)[None, :]
                word_next = tl.load(word_rows + w_ahead[None, :], mask=ahead, other=0)
                vals_next = tl.load(value_rows + (value_offsets + BLOCK_W * 16), mask=ahead[:, :, None], other=0.0)
            elif EVEN:
                word = tl.load(word_rows + w[None, :])  # [BN, BW]
                vals = tl.load(value_rows + value_offsets)  # [BN, BW, 16]
            else:
                word = tl.load(word_rows + w[None, :], mask=mask2, other=0)
                vals = tl.load(value_rows + value_offsets, mask=mask2[:, :, None], other=0.0)
            if EXPAND:
                k = (w_begin + chunk * BLOCK_W) * 32 + tl.arange(0, BLOCK_W * 32)  # [BK] inputs of this chunk
                if BLOCK_M == 1:
                    x_offsets = k[None, :] * stride_xk  # [1, BK]
                else:
                    x_offsets = k[:, None] * stride_xk + tokens[None, :] * stride_xm  # [BK, BM]
                if EVEN:
                    xt = tl.load(x_ptr + x_offsets)  # [1, BK] or [BK, BM]
                elif BLOCK_M == 1:
                    xt = tl.load(x_ptr + x_offsets, mask=(k < w_end * 32)[None, :], other=0.0)
                else:
                    xt = tl.load(x_ptr + x_offsets, mask=(k < w_end * 32)[:, None], other=0.0)
                v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_W, 8, 2)))  # [BN, BW, 8] each
                c0 = (word[:, :, None] >> (4 * g)[None, None, :]) & 3  # [BN, BW, 8]
                c1 = (word[:, :, None] >> (4 * g + 2)[None, None, :]) & 3
                dense = tl.where(
                    c0[:, :, :, None] == position,
                    v0[:, :, :, None],
                    tl.where(c1[:, :, :, None] == position, v1[:, :, :, None], 0.0),
                )  # [BN, BW, 8, 4]
                tile = tl.reshape(dense, (BLOCK_N, BLOCK_W * 32))  # [BN, BK] the dense weight tile
                if BLOCK_M == 1:  # one token: FMAs on the CUDA cores, x read as contiguous vectors (no gather)
                    acc += tile.to(tl.float32) * xt.to(tl.float32)  # [BN, BK]
                else:
                    acc = tl.dot(tile.to(xt.dtype), xt, acc)  # [BN, BM]
            else:
                code = (word[:, :, None] >> (2 * j)[None, None, :]) & 3  # [BN, BW, 16]
                col = (w * 32)[None, :, None] + ((j // 2) * 4)[None, None, :] + code  # [BN, BW, 16] input position
                if BLOCK_M == 1:
                    if EVEN:
                        xv = tl.load(x_ptr + col * stride_xk)
                    else:
                        xv = tl.load(x_ptr + col * stride_xk, mask=mask2[:, :, None], other=0.0)
                    acc += vals.to(tl.float32) * xv.to(tl.float32)  # [BN, BW, 16]
                else:
                    x_offsets = col[:, :, :, None] * stride_xk + tokens[None, None, None, :] * stride_xm
                    if EVEN:
                        xv = tl.load(x_ptr + x_offsets)  # [BN, BW, 16, BM]
                    else:
                        xv = tl.load(x_ptr + x_offsets, mask=mask2[:, :, None, None], other=0.0)
                    acc += vals.to(tl.float32)[:, :, :, None] * xv.to(tl.float32)
        if EXPAND and BLOCK_M == 1:
            y = tl.sum(acc, axis=1)[:, None]  # [BN, 1]
        elif EXPAND:
            y = acc  # [BN, BM]
        elif BLOCK_M == 1:
            y = tl.sum(tl.sum(acc, axis=2), axis=1)[:, None]  # [BN, 1]
        else:
            y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BN, BM]
        store_rows(y, pid_k, rows, row_ok, tokens, token_ok, bias_ptr, out_ptr, stride_om, HAS_BIAS, SPLIT_K)

    return packed24_words_kernel


@functools.cache
def _select_kernel() -> Any:
    """The ``select`` style: one token, 16-bit weights and x, in_features % 32 == 0. The ``words`` kernel gathers
    x with one 2-byte load per kept value (16 loads per code word, each warp-wide load touching as many cache lines
    as it has lanes' words); this one reads x as it reads the weight, in whole 8-byte groups: a group's four
    inputs are one int64 (x viewed as [in/4] int64) and its two kept values one int32 (values viewed as
    [out, in/4] int32), both loaded as [BLOCK_N, BLOCK_W, 8 groups] tiles of 16-byte vectors, and each kept value
    takes its input out of the group's word by its 2-bit code (a select and a shift in registers). Every tensor of
    the loop has that one shape, so there is no layout change inside it. Same FMAs as ``words``, same bytes
    from memory (the packed weight; x stays in cache)."""
    import triton
    import triton.language as tl

    _helpers()  # defines the globals the kernel calls

    @triton.jit
    def packed24_select_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0917
        x_ptr,  # [K / 4] int64: one token's inputs, a group's four 16-bit inputs per word (the first lowest)
        pairs_ptr,  # [N, KH / 2] int32: a group's two kept 16-bit values per word (the first lowest)
        words_ptr,  # [N, KH / 16] int32: 16 two-bit codes per word, first in the low bits
        bias_ptr,  # [N]
        out_ptr,  # [1, N]
        N,
        W,  # code words per row = KH / 16 (8 groups each)
        stride_pn,
        stride_wn,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EVEN: tl.constexpr,  # N % BLOCK_N == 0 and W % (BLOCK_W * SPLIT_K) == 0: no masks
        PREFETCH: tl.constexpr,  # load the next chunk's words before computing this one's
        BF16: tl.constexpr,  # bfloat16 (else float16) bits
        BLOCK_N: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        pid_k = tl.program_id(1)
        rows, row_ok, rows64 = program_rows(N, BLOCK_N)  # [BN] each
        tokens = tl.arange(0, 1)  # [1]
        g = tl.arange(0, 8)  # group inside the code word
        chunks, w_begin, w_end = program_span(W, BLOCK_W, SPLIT_K)  # in code words
        pair_rows = pairs_ptr + rows64[:, None, None] * stride_pn  # [BN, 1, 1]
        word_rows = words_ptr + rows64[:, None, None] * stride_wn  # [BN, 1, 1]
        acc = tl.zeros([BLOCK_N, BLOCK_W, 8], dtype=tl.float32)
        if PREFETCH:
            w_next = w_begin + tl.arange(0, BLOCK_W)[None, :, None]  # [1, BW, 1]
            ok_next = row_ok[:, None, None] & (w_next < w_end)  # [BN, BW, 1]
            word_next = tl.load(word_rows + w_next, mask=ok_next, other=0)  # [BN, BW, 1]
            pair_next = tl.load(pair_rows + (w_next * 8 + g[None, None, :]), mask=ok_next, other=0)  # [BN, BW, 8]
        for chunk in range(0, chunks):
            w = w_begin + chunk * BLOCK_W + tl.arange(0, BLOCK_W)[None, :, None]  # [1, BW, 1] code word in the row
            group = w * 8 + g[None, None, :]  # [1, BW, 8] group index in the row (= x's int64 index)
            if PREFETCH:
                word = word_next
                pair = pair_next
                ok_next = row_ok[:, None, None] & (w + BLOCK_W < w_end)
                word_next = tl.load(word_rows + (w + BLOCK_W), mask=ok_next, other=0)
                pair_next = tl.load(pair_rows + (group + BLOCK_W * 8), mask=ok_next, other=0)
            elif EVEN:
                word = tl.load(word_rows + w)  # [BN, BW, 1]
                pair = tl.load(pair_rows + group)  # [BN, BW, 8]
            else:
                ok = row_ok[:, None, None] & (w < w_end)  # [BN, BW, 1]
                word = tl.load(word_rows + w, mask=ok, other=0)
                pair = tl.load(pair_rows + group, mask=ok, other=0)
            # x's quads loaded as a [BN, BW, 8] tile (the same address on every row: cache hits), not [1, BW, 8]:
            # on sm_90 (Triton 3.9) that keeps them in the layout of the pairs, 16-byte loads and about half the
            # shared-memory traffic of layout changes (19 shared-memory operations per iteration against 35)
            quad_offsets = group + (rows * 0)[:, None, None]  # [BN, BW, 8]
            if EVEN:  # noqa: SIM108 (a static branch of the kernel)
                quad = tl.load(x_ptr + quad_offsets)  # [BN, BW, 8] int64: the group's four inputs
            else:
                quad = tl.load(x_ptr + quad_offsets, mask=w < w_end, other=0)
            codes = word >> (4 * g)[None, None, :]  # [BN, BW, 8]: the group's two codes in bits 0-3
            c0 = codes & 3
            c1 = (codes >> 2) & 3
            low = quad.to(tl.int32)  # inputs 0, 1 of the group (truncating keeps the low word)
            high = (quad >> 32).to(tl.int32)  # inputs 2, 3
            x0 = tl.where(c0 >= 2, high, low) >> ((c0 & 1) * 16)  # [BN, BW, 8]: input c0 in the low 16 bits
            x1 = tl.where(c1 >= 2, high, low) >> ((c1 & 1) * 16)
            if BF16:  # a bfloat16 is the high half of the float32 of the same value
                v0 = (pair << 16).to(tl.float32, bitcast=True)
                v1 = (pair & -65536).to(tl.float32, bitcast=True)
                acc += v0 * (x0 << 16).to(tl.float32, bitcast=True) + v1 * (x1 << 16).to(tl.float32, bitcast=True)
            else:
                v0 = pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                v1 = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                acc += v0 * x0.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                acc += v1 * x1.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        y = tl.sum(tl.sum(acc, axis=2), axis=1)[:, None]  # [BN, 1]
        store_rows(y, pid_k, rows, row_ok, tokens, tokens < 1, bias_ptr, out_ptr, 0, HAS_BIAS, SPLIT_K)

    return packed24_select_kernel


# --- Configurations ------------------------------------------------------------------------------------------


STYLES = ("bytes", "words", "select", "tiles")


@dataclass(frozen=True)
class Config:
    """One launch configuration: rows per program, kept values per chunk, K splits, warps, pipeline stages, and
    the kernel style (``bytes``: one code byte gathered per value, any width; ``words``: int32 code words and x
    gathered per kept value, on the CUDA cores; ``select``: one token, int32 code words and x read as contiguous
    vectors, each kept value's input picked in registers; ``tiles``: weight tiles expanded in registers, then
    tensor cores for 2-16 tokens (x padded to 16) or vector FMAs for one). ``words``, ``select`` and ``tiles`` need
    in_features % 32 == 0 (whole code words per row); ``tiles`` for more than one token needs block_n >= 16."""

    block_n: int
    block_kh: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    style: str = "bytes"
    prefetch: bool = False  # words/select/tiles: the next chunk's loads issued before this chunk's products
    # 0: split-K only where the row blocks leave the GPU idle (:func:`with_split`); n > 0: also split a row whose
    # programs would each walk more than n chunks (long rows, few of them: 4096 x 11008). An option for the tuning
    # step to time; no table entry uses it yet.
    split_chunks: int = 0

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style {self.style!r}: one of {', '.join(STYLES)}")
        if self.prefetch and self.style == "bytes":
            raise ValueError("prefetch is a words/select/tiles option (the bytes kernel has none)")
        if self.style != "bytes" and self.block_kh % 16:
            raise ValueError(f"the {self.style} style reads whole code words: block_kh % 16 == 0, not {self.block_kh}")
        if self.split_chunks < 0:
            raise ValueError(f"split_chunks: 0 (off) or the most chunks a program walks, not {self.split_chunks}")

    def __str__(self) -> str:
        extra = ("+prefetch" if self.prefetch else "") + (f"+split{self.split_chunks}" if self.split_chunks else "")
        return (
            f"{self.style}{extra} BLOCK_N={self.block_n} BLOCK_KH={self.block_kh} "
            f"SPLIT_K={self.split_k} warps={self.num_warps} stages={self.num_stages}"
        )


def block_m(tokens: int) -> int:
    """The token tile: the next power of two (1, 2, 4, 8, 16)."""
    return 1 << max(0, (tokens - 1).bit_length())


# Per token tile, for layers whose rows hold whole code words (in_features % 32 == 0: every LLaMA/SmolLM2 layer):
# the best of its candidates timed on an NVIDIA H200 (CUDA graphs, LLaMA-7B's three shapes, bf16; the lowest
# geometric mean of time over the fastest candidate per shape) by benchmarks/gpu_check.py, section kernel_configs:
# tiles 1 and 2 on 2026-11-30 (benchmarks/results/gpu-check-h200-{c,d,e,f}/; tile 1's entry won runs d, e and f,
# its pipeline stages 2, 3 and 4 within 0.1 us of each other), tiles 4-16 on 2026-11-29 (gpu-check-h200-b/). Other
# GPUs: run that check, whose tuning step replaces this table in its process (set_table) and reports its choice.
_TABLE: dict[int, Config] = {
    1: Config(1, 512, num_warps=2, style="select"),
    2: Config(8, 256, num_warps=8, style="words", prefetch=True),
    4: Config(8, 128, num_warps=8, style="words"),
    8: Config(32, 128, num_stages=3, style="tiles"),
    16: Config(32, 128, num_stages=3, style="tiles"),
}
# Any width (the codes gathered byte by byte): (BLOCK_N, BLOCK_KH) holding about 2048 products per program (16
# per thread at 4 warps), so the fp32 accumulator stays in registers whatever the token count; one token at 8
# warps (measured on the H200 above: 15.0 against 19.4 us on 4096 x 4096).
_BYTES_TABLE: dict[int, Config] = {
    1: Config(4, 512, num_warps=8),
    2: Config(4, 256),
    4: Config(4, 128),
    8: Config(4, 64),
    16: Config(4, 32),
}


def set_table(configs: dict[int, Config]) -> None:
    """Replace table entries (token tile -> configuration; split_k is chosen per call): what a tuning run measured."""
    for tile, config in configs.items():
        if tile not in _TABLE:
            raise ValueError(f"token tile {tile}: one of {sorted(_TABLE)}")
        if config.style == "select" and tile > 1:
            raise ValueError(f"the select style computes one token, not a tile of {tile}")
        _TABLE[tile] = dataclasses.replace(config, split_k=1)
    pick_config.cache_clear()
    invalidate_fast_calls()  # the layers' bound calls hold launches of the old table


def table() -> dict[int, Config]:
    return dict(_TABLE)


@functools.lru_cache(maxsize=1024)
def pick_config(tokens: int, rows: int, kept: int, multiprocessors: int) -> Config:
    """The configuration for ``tokens`` x [tokens, 2·kept] times a [rows, 2·kept] packed weight.

    Split-K only when the row blocks would leave most multiprocessors idle and each split keeps at least two
    chunks of the row (the fp32 buffer, the atomics and the final cast cost more than they give otherwise).
    """
    tile = block_m(tokens)
    return with_split(_TABLE[tile] if kept % 16 == 0 else _BYTES_TABLE[tile], rows, kept, multiprocessors)


def with_split(base: Config, rows: int, kept: int, multiprocessors: int) -> Config:
    """``base`` with the split-K that :func:`pick_config` gives it for a [rows, 2·kept] layer: doubled while the
    programs number at most 2 × the multiprocessors, or (``base.split_chunks``) while a program would walk more
    than that many chunks, each split keeping at least two chunks."""
    programs = -(-rows // base.block_n)
    chunks = -(-kept // base.block_kh)
    split = 1
    while chunks // (split * 2) >= 2 and (
        programs * split * 2 <= 2 * multiprocessors or 0 < base.split_chunks < chunks / split
    ):
        split *= 2
    return dataclasses.replace(base, split_k=split)


# --- The launcher ----------------------------------------------------------------------------------------------


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def interpreting() -> bool:
    """Whether the kernel was built for Triton's interpreter (``TRITON_INTERPRET=1`` when it was first used)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernel(), InterpretedFunction)


def packed24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: Config | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b for the 2:4 packed W (``values`` [N, K/2], ``indices`` [N, K/8] uint8): x [..., K] -> [..., N].

    No policy here (the registered kernel decides which calls to take): any token count and the dtype of x,
    which must equal the values' dtype. ``config`` overrides :func:`pick_config` (benchmarks use it).
    """
    rows = values.shape[0]
    tokens = x.numel() // max(x.shape[-1], 1)
    launch = prepare_launch(x, values, indices, bias, config=config)
    if not tokens:
        return x.new_empty(*x.shape[:-1], rows)  # [..., N]
    return launch(x)


def prepare_launch(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: Config | None = None,
) -> Launch:
    """The :class:`Launch` of :func:`packed24_linear` for inputs like ``x`` (its dtype, device and token count):
    the checks, the configuration and the weight's views, done once. Raises ValueError for what does not fit."""
    rows, kept = values.shape
    k = x.shape[-1]
    if k != 2 * kept or indices.shape != (rows, -(-kept // 4)) or indices.dtype != torch.uint8:
        raise ValueError(
            f"2:4 packed weight with values {tuple(values.shape)} and indices {tuple(indices.shape)} "
            f"({indices.dtype}) does not fit inputs of width {k}: values must be [out, in/2], indices "
            f"[out, ceil(in/8)] uint8"
        )
    if x.dtype != values.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x is {x.dtype}, the weight {values.dtype}, the bias {getattr(bias, 'dtype', None)}")
    if config is not None and config.style != "bytes" and kept % 16:
        raise ValueError(f"the {config.style} style needs in_features % 32 == 0 (whole code words), not {k}")
    if config is not None and config.style == "select":
        if x.element_size() != 2:
            raise ValueError(
                f"the select style reads 16-bit values and x as wider words: float16/bfloat16, not {x.dtype}"
            )
        if x.numel() > k:
            raise ValueError(f"the select style computes one token, not {x.numel() // k}: use words or tiles")
    if not x.is_cuda and not interpreting():
        raise ValueError(f"the Triton kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not {x.device}")
    tokens = max(1, x.numel() // k)
    if config is None:
        config = pick_config(tokens, rows, kept, _multiprocessors(x.device) if x.is_cuda else 1)
        if config.style == "select" and x.element_size() != 2:  # the interpreter's float32: same blocks, words
            config = dataclasses.replace(config, style="words")
    tile = block_m(tokens)
    if config.style == "tiles" and tokens > 1:  # tensor-core tiles: 16 tokens at least, a 16-row block at least
        if config.block_n < 16:
            raise ValueError(f"the tiles style needs block_n >= 16 for more than one token, not {config.block_n}")
        tile = max(16, tile)
    values, indices = values.contiguous(), indices.contiguous()
    constants: dict[str, Any] = {
        "HAS_BIAS": bias is not None,
        "SPLIT_K": config.split_k,
        "BLOCK_N": config.block_n,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    if config.style == "select":
        words = kept // 16
        kernel, weight = _select_kernel(), _aligned(values, 4).view(torch.int32)  # [N, K/4]: a group's 2 values
        codes, width = _aligned(indices, 4).view(torch.int32), words  # [N, K/32]
        constants |= {
            "EVEN": _even(config, rows, words),
            "PREFETCH": config.prefetch,
            "BF16": x.dtype == torch.bfloat16,
            "BLOCK_W": config.block_kh // 16,
        }
    elif config.style == "bytes":
        kernel, weight, codes, width = _kernel(), values, indices, kept
        constants |= {"BLOCK_M": tile, "BLOCK_KH": config.block_kh}
    else:
        words = kept // 16
        kernel, weight = _words_kernel(), values
        codes, width = _aligned(indices, 4).view(torch.int32), words  # [N, KH/16]: 16 codes per word
        constants |= {
            "BLOCK_M": tile,
            "BLOCK_W": config.block_kh // 16,
            "EVEN": _even(config, rows, words),
            "EXPAND": config.style == "tiles",
            "PREFETCH": config.prefetch,
        }
    return Launch(
        kernel=kernel,
        grid=(-(-rows // config.block_n), config.split_k),
        select=config.style == "select",
        tokens=tokens,
        tile=tile,
        rows=rows,
        width=width,
        weight=weight,
        codes=codes,
        bias=bias if bias is not None else values,  # any pointer: not read without HAS_BIAS
        out_dtype=x.dtype if config.split_k == 1 else torch.float32,
        constants=constants,
        config=config,
    )


@dataclass(frozen=True, eq=False)
class Launch:
    """One layer's kernel launch for one token count, everything but x prepared: the kernel and its constants,
    the grid, the weight's views (the select style reads values as int32 pairs, and the word styles codes as int32
    words, copied when a view's start is not aligned for that), the output's dtype (fp32 partial sums with
    split-K). ``launch(x)`` takes x [..., K] of that token count and dtype and returns y [..., N]; nothing is
    checked there (the caller did: :func:`packed24_linear`, or the layer's bound call of :func:`triton_kernel`)."""

    kernel: Any
    grid: tuple[int, int]
    select: bool
    tokens: int
    tile: int  # the token tile BLOCK_M (1 for select)
    rows: int
    width: int  # kept values per row (bytes style) or code words per row
    weight: torch.Tensor  # [N, K/2] values, or [N, K/4] int32 pairs (select)
    codes: torch.Tensor  # [N, K/8] uint8, or [N, K/32] int32 words
    bias: torch.Tensor  # [N], or any tensor when the constants say HAS_BIAS=False
    out_dtype: torch.dtype
    constants: dict[str, Any]
    config: Config
    out_shapes: dict[torch.Size, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # memo by x's shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        rows, tokens = self.rows, self.tokens
        shape = self.out_shapes.get(x.shape)  # x's leading dimensions, then N: allocated as returned
        if shape is None:
            if len(self.out_shapes) >= 8:
                self.out_shapes.clear()
            shape = self.out_shapes[x.shape] = (*x.shape[:-1], rows)
        make = torch.empty if self.config.split_k == 1 else torch.zeros  # split-K's partial sums start at zero
        out = make(shape, dtype=self.out_dtype, device=x.device)  # [..., N], contiguous: token stride N
        if self.select:
            if x.is_contiguous() and not x.data_ptr() % 8:
                quads = x.view(torch.int64)  # [..., K/4]: a group's four inputs (one token: the pointer is all)
            else:
                quads = _aligned(x.reshape(-1), 8).view(torch.int64)  # [K/4]
            self.kernel[self.grid](
                quads,
                self.weight,
                self.codes,
                self.bias,
                out,
                rows,
                self.width,
                self.weight.stride(0),
                self.codes.stride(0),
                **self.constants,
            )
        else:
            if self.tile > 1:  # stored [K, BLOCK_M], zero-padded: one gathered position loads every token
                x2 = x.reshape(tokens, -1).t()  # [K, M]
                pad = self.tile - tokens
                x2 = (x2.contiguous() if not pad else F.pad(x2, (0, pad))).t()  # [BLOCK_M, K], strides (1, BLOCK_M)
                strides = x2.stride()
            elif x.is_contiguous():  # one token, read in place
                x2, strides = x, (x.shape[-1], 1)
            else:
                x2 = x.reshape(1, -1)  # [1, K], any stride along K
                strides = x2.stride()
            self.kernel[self.grid](
                x2,
                self.weight,
                self.codes,
                self.bias,
                out,
                tokens,
                rows,
                self.width,
                strides[0],
                strides[1],
                self.weight.stride(0),
                self.codes.stride(0),
                rows,
                **self.constants,
            )
        return out.to(x.dtype) if self.config.split_k > 1 else out


def _even(config: Config, rows: int, words: int) -> bool:
    """Whether a word-aligned launch divides the layer evenly (rows by BLOCK_N, code words by BLOCK_W x splits), so
    the words and select kernels run without masks (their ``EVEN``)."""
    return rows % config.block_n == 0 and words % (config.block_kh // 16 * config.split_k) == 0


def _aligned(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """``tensor`` (contiguous), copied when its data does not start on a multiple of ``size`` bytes (a view into a
    larger buffer, as a memory-mapped file can hand over): the select and words styles read wider words."""
    tensor = tensor.contiguous()
    return tensor.clone() if tensor.data_ptr() % size else tensor


# --- Registration: the kernel PackedLinear tries -------------------------------------------------------------


@functools.cache
def _missing() -> str | None:
    """Why the kernel cannot run in this process at all, or None (cached: it does not change)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton; Linux x86-64 with a CUDA GPU)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    try:
        import triton
    except ImportError as exc:  # a broken install: say so once, never fail the forward
        return f"Triton does not import: {exc}"
    del triton
    return None


def decline_reason(x: torch.Tensor, layer: PackedLinear) -> str | None:  # noqa: PLR0911 (one guard per rule)
    """Why the registered kernel does not take this call, or None when it does."""
    missing = _missing()
    if missing is not None:
        return missing
    if not x.is_cuda or not layer.values.is_cuda:
        return f"runs on CUDA tensors, got {x.device.type}"
    if (layer.n, layer.m) != (2, 4):
        return f"runs 2:4 only, not {layer.n}:{layer.m}"
    if x.dtype not in CUDA_DTYPES or x.dtype != layer.values.dtype:
        return f"takes float16 and bfloat16 (x and weight alike), got x {x.dtype}, weight {layer.values.dtype}"
    tokens = x.numel() // max(x.shape[-1], 1)
    if not 1 <= tokens <= MAX_TOKENS:
        return f"decode only: 1..{MAX_TOKENS} tokens, got {tokens}"
    if torch.is_grad_enabled() and x.requires_grad:
        return "inference only: the kernel has no backward (the reference forward keeps autograd)"
    return None


def triton_kernel(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor | None:
    """The :data:`secateurs.kernels.sparse.packing.PackedKernel` registered as ``"triton"``. It leaves the layer a
    bound call (:func:`bound_call`) for the calls like this one that follow."""
    if decline_reason(x, layer) is not None:
        return None
    if x.device.index not in (None, torch.cuda.current_device()):
        with torch.cuda.device(x.device):
            return packed24_linear(x, layer.values, layer.indices, layer.bias)
    launch = prepare_launch(x, layer.values, layer.indices, layer.bias)
    bind_fast_call(layer, NAME, bound_call(launch, x))
    return launch(x)


def bound_call(launch: Launch, x: torch.Tensor) -> FastCall:
    """``launch`` for the inputs like ``x`` only: it declines (returns None) x of another device (or a CUDA device
    that is not the current one), dtype, width or token count, and x that needs autograd, so those get the
    dispatch's answer. Why: an eager one-token call through the dispatch ran its checks, the configuration's lookup
    and the weight's views on every call, 22 µs of Python before Triton's own launch (docs/gpu-kernel.md); the
    bound call keeps four comparisons, the input's view and the output's allocation."""
    device, dtype, width, size = x.device, x.dtype, x.shape[-1], launch.tokens * x.shape[-1]
    cuda = device.type == "cuda"
    current_device = torch.cuda.current_device

    def call(x: torch.Tensor) -> torch.Tensor | None:
        if x.device != device or x.dtype != dtype or x.shape[-1] != width or x.numel() != size:
            return None
        if (x.requires_grad and torch.is_grad_enabled()) or (cuda and current_device() != device.index):
            return None
        return launch(x)

    return call


def describe() -> KernelDescription:
    missing = _missing()
    if missing is not None:
        return KernelDescription(NAME, False, missing)
    import triton

    return KernelDescription(
        NAME,
        True,
        f"Triton {triton.__version__} on {torch.cuda.get_device_name()}: 2:4 packed, float16/bfloat16, "
        f"1-{MAX_TOKENS} tokens (more go to the next path); fp32 accumulation; configurations from a fixed table",
    )


register_packed_kernel(NAME, triton_kernel, describe)


# --- The check against torch ---------------------------------------------------------------------------------


def random_24(
    rows: int, cols: int, dtype: torch.dtype, device: torch.device | str, generator: torch.Generator
) -> torch.Tensor:
    """A random exactly-2:4 weight [rows, cols] (the two largest |w| of each group of 4 kept)."""
    weight = torch.randn(rows, cols, generator=generator, device=generator.device).to(device)  # [rows, cols]
    groups = weight.abs().reshape(rows, cols // 4, 4)  # [rows, cols/4, 4]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return torch.where(keep.reshape(rows, cols), weight, 0.0).to(dtype)


def check(
    rows: int,
    cols: int,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    bias: bool = True,
    config: Config | None = None,
    seed: int = 0,
) -> float:
    """Run the kernel on a random 2:4 layer and return ‖y − y_ref‖ / ‖y_ref‖ against dense-with-zeros in fp64.

    Raises AssertionError when the output is not finite or misses torch's tolerance for ``dtype``.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    dense = random_24(rows, cols, dtype, device, generator)  # [rows, cols]
    packed = pack_nm(dense, 2, 4)
    b = torch.randn(rows, generator=generator, device=device).to(dtype) if bias else None  # [rows]
    x = torch.randn(tokens, cols, generator=generator, device=device).to(dtype)  # [tokens, cols]
    y = packed24_linear(x, packed.values, packed.indices, b, config=config)  # [tokens, rows]
    reference = F.linear(x.double(), dense.double(), b.double() if b is not None else None)  # [tokens, rows]
    assert torch.isfinite(y).all(), "non-finite output"
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = float(reference.pow(2).mean().sqrt())
    torch.testing.assert_close(y.double(), reference, rtol=tolerance, atol=tolerance * scale)
    return float((y.double() - reference).norm() / reference.norm().clamp_min(1e-30))
