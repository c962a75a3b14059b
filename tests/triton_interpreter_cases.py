"""Runs the Triton 2:4 kernel under Triton's interpreter on CPU tensors and prints one JSON line per case.

Started by tests/test_triton_decode.py in a subprocess with ``TRITON_INTERPRET=1`` (the variable must be set
before Triton is first used, and it must not leak into other tests). Each case compares the kernel with
dense-with-zeros in fp64 (:func:`secateurs.kernels.sparse.triton_decode.check`).
"""

from __future__ import annotations

import itertools
import json
import sys
import traceback
from typing import Any

import torch

from secateurs.kernels.sparse.packing import PackedLinear, pack_nm
from secateurs.kernels.sparse.triton_decode import (
    Config,
    bound_call,
    check,
    interpreting,
    packed24_linear,
    prepare_launch,
    random_24,
)

# (rows, cols): rows not a multiple of any BLOCK_N, kept values (cols/2) not a multiple of any chunk. The first
# three are not word-aligned (in % 32 != 0: the bytes style only), the last two are (every style).
SHAPES = ((37, 72), (8, 24), (130, 200), (37, 64), (130, 320))
TOKENS = (1, 3, 16)
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# The table's own choice; a small chunk (several chunks per row, the last one ragged); split-K over 3 programs
# (a split with fewer chunks than the others, and atomics); the words and tiles styles likewise, with and without
# the prefetch of the next chunk, on word-aligned shapes (an even launch, no masks, on 64 x 1024: the EVEN path).
CONFIGS = {
    "table": None,
    "small": Config(block_n=4, block_kh=16),
    "split3": Config(block_n=8, block_kh=8, split_k=3),
    "words": Config(block_n=4, block_kh=32, style="words"),
    "words_split3": Config(block_n=8, block_kh=16, split_k=3, style="words"),
    "tiles": Config(block_n=16, block_kh=32, style="tiles"),
    "tiles_split3": Config(block_n=16, block_kh=64, split_k=3, style="tiles"),
    "words_prefetch_split3": Config(block_n=8, block_kh=16, split_k=3, style="words", prefetch=True),
    "tiles_prefetch": Config(block_n=16, block_kh=32, style="tiles", prefetch=True),
    "select": Config(block_n=4, block_kh=32, style="select"),  # one token, 16-bit (below)
    "select_prefetch_split3": Config(block_n=8, block_kh=16, split_k=3, style="select", prefetch=True),
}
EVEN_SHAPE = (64, 1024)  # rows % 16 == 0, words per row (32) a multiple of every chunk above


def case_id(shape: tuple[int, int], tokens: int, dtype: str, bias: bool, config: str) -> str:
    return f"{shape[0]}x{shape[1]}-t{tokens}-{dtype}-{'bias' if bias else 'nobias'}-{config}"


def cases() -> list[tuple[str, dict[str, Any]]]:
    """Every shape x token count x dtype x configuration; bias on every other case (each configuration gets both:
    the interpreter takes about a second a case on 2 cores, so the full product with bias would double the time)."""
    out = []
    shapes = (*SHAPES, EVEN_SHAPE)
    for index, (shape, tokens, dtype, config) in enumerate(itertools.product(shapes, TOKENS, DTYPES, CONFIGS)):
        word_aligned = shape[1] % 32 == 0
        if CONFIGS[config] is not None and CONFIGS[config].style != "bytes" and not word_aligned:
            continue
        if shape == EVEN_SHAPE and CONFIGS[config] is not None and CONFIGS[config].split_k != 1:
            continue  # 32 words do not split evenly in 3
        if CONFIGS[config] is not None and CONFIGS[config].style == "select" and (tokens > 1 or dtype == "float32"):
            continue  # the select style: one token of float16/bfloat16 (bfloat16 below)
        bias = index % 2 == 0
        spec = {"shape": shape, "tokens": tokens, "dtype": dtype, "bias": bias, "config": config}
        out.append((case_id(shape, tokens, dtype, bias, config), spec))
    return out


def non_contiguous() -> float:
    """x a strided view [2, 3, K] (every other column of a wider tensor): the kernel follows the strides; and codes
    at an odd byte offset."""
    generator = torch.Generator().manual_seed(1)
    dense = random_24(20, 40, torch.float32, "cpu", generator)  # [20, 40]
    packed = pack_nm(dense)
    wide = torch.randn(2, 3, 80, generator=generator)  # [2, 3, 80]
    x = wide[..., ::2]  # [2, 3, 40], stride 2 along K
    y = packed24_linear(x, packed.values, packed.indices, config=Config(block_n=4, block_kh=8))  # [2, 3, 20]
    reference = torch.nn.functional.linear(x.double(), dense.double())
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5)
    single = wide[0, 0, ::2]  # [40], one token, strided
    torch.testing.assert_close(
        packed24_linear(single, packed.values, packed.indices).double(), reference[0, 0], rtol=1e-5, atol=1e-5
    )
    # Codes that are a view at an odd byte offset of a larger buffer (as a memory-mapped file can hand them over):
    # the word-aligned styles read them as int32 words, which need 4-byte alignment, so the launcher copies them.
    dense64 = random_24(12, 64, torch.float32, "cpu", generator)  # [12, 64]
    packed64 = pack_nm(dense64)
    buffer = torch.cat([torch.zeros(1, dtype=torch.uint8), packed64.indices.flatten()])
    codes = buffer[1:].view(packed64.indices.shape)  # storage offset 1
    x64 = torch.randn(3, 64, generator=generator)
    for style in ("words", "tiles"):
        y64 = packed24_linear(x64, packed64.values, codes, config=Config(16, 32, style=style))
        torch.testing.assert_close(
            y64.double(), torch.nn.functional.linear(x64.double(), dense64.double()), rtol=1e-5, atol=1e-5
        )
    # The select style, float16: one strided token, and values, codes and x each a view at an offset that the
    # wider words it reads (int32 pairs and codes, int64 quads of x) do not divide: the launcher copies them.
    values16 = torch.cat([torch.zeros(1, dtype=torch.float16), packed64.values.half().flatten()])
    values16 = values16[1:].view(packed64.values.shape)  # storage offset 2 bytes
    x16 = torch.randn(2, 64 + 1, generator=generator).half()[0, 1:]  # [64] at an offset of 2 bytes
    x16_strided = torch.randn(128, generator=generator).half()[::2]  # [64], stride 2
    for x1 in (x16, x16_strided):
        y16 = packed24_linear(x1, values16, codes, config=Config(4, 32, style="select"))
        reference16 = torch.nn.functional.linear(x1.double(), dense64.half().double())
        torch.testing.assert_close(y16.double(), reference16, rtol=2e-3, atol=2e-3 * float(reference16.abs().max()))
    return float((y.double() - reference).norm() / reference.norm())


def select_bfloat16() -> float:
    """The select style in bfloat16 (it reads bf16 values and x as raw bits, which the interpreter runs): the
    worst relative error over word-aligned shapes, with and without bias, split and prefetch."""
    worst = 0.0
    for shape in ((37, 64), (130, 320), EVEN_SHAPE):
        for bias, config in ((True, "select"), (False, "select_prefetch_split3")):
            worst = max(worst, check(*shape, 1, torch.bfloat16, "cpu", bias=bias, config=CONFIGS[config]))
    return worst


def bound() -> float:
    """A layer's bound call (what PackedLinear runs after its first dispatch to the kernel) computes exactly what
    the launcher computes, for later inputs of the same kind, and declines the others: 1/3/16 tokens, float32 and
    float16, with and without bias, ragged and even shapes, strided inputs."""
    generator = torch.Generator().manual_seed(2)
    worst = 0.0
    for (rows, cols), tokens, dtype in itertools.product(
        ((37, 64), (130, 320), EVEN_SHAPE), (1, 3, 16), (torch.float32, torch.float16)
    ):
        dense = random_24(rows, cols, dtype, "cpu", generator)  # [rows, cols]
        bias = torch.randn(rows, generator=generator).to(dtype) if tokens != 3 else None
        layer = PackedLinear.from_dense(dense, bias)
        first = torch.randn(tokens, cols, generator=generator).to(dtype)  # [tokens, cols]
        call = bound_call(prepare_launch(first, layer.values, layer.indices, layer.bias), first)
        wide = torch.randn(1, tokens, 2 * cols, generator=generator).to(dtype)
        for x in (first, torch.randn(1, tokens, cols, generator=generator).to(dtype), wide[..., ::2]):
            y = call(x)
            assert y is not None and y.shape == (*x.shape[:-1], rows), (rows, cols, tokens, dtype, x.shape)
            expected = packed24_linear(x, layer.values, layer.indices, layer.bias)
            assert torch.equal(y, expected), (rows, cols, tokens, dtype, x.shape)
            reference = torch.nn.functional.linear(x.double(), dense.double(), None if bias is None else bias.double())
            worst = max(worst, float((y.double() - reference).norm() / reference.norm()))
        other = 2 if tokens == 1 else 1
        for declined in (
            torch.randn(other, cols, generator=generator).to(dtype),  # another token count
            first.double() if dtype == torch.float32 else first.float(),  # another dtype
            torch.randn(tokens, cols, generator=generator).to(dtype).requires_grad_(),  # autograd
        ):
            assert call(declined) is None, (rows, cols, tokens, dtype, declined.shape, declined.dtype)
    return worst


def main() -> None:
    import triton

    print(json.dumps({"id": "interpreter", "ok": interpreting(), "triton": triton.__version__}), flush=True)
    for ident, spec in cases():
        try:
            rel = check(
                *spec["shape"],
                spec["tokens"],
                DTYPES[spec["dtype"]],
                "cpu",
                bias=spec["bias"],
                config=CONFIGS[spec["config"]],
            )
            print(json.dumps({"id": ident, "ok": True, "relative_error": rel}), flush=True)
        except Exception as exc:  # reported to the test, which fails with the message
            print(json.dumps({"id": ident, "ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
            traceback.print_exc(file=sys.stderr)
    for ident, run in (("non_contiguous", non_contiguous), ("select_bfloat16", select_bfloat16), ("bound", bound)):
        try:
            print(json.dumps({"id": ident, "ok": True, "relative_error": run()}), flush=True)
        except Exception as exc:
            print(json.dumps({"id": ident, "ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
            traceback.print_exc(file=sys.stderr)


if __name__ == "__main__":
    main()
