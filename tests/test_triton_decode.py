"""The Triton 2:4 decode kernel: equal to dense-with-zeros under Triton's interpreter on CPU (CI), its
configuration rule, its registration and the calls it declines; and (marked gpu) on CUDA in float16/bfloat16,
through PackedLinear, inside a CUDA graph and in the speed sweep."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from secateurs.kernels.measure.speed import SpeedSettings, mismatch, sparse_paths, sweep_linear
from secateurs.kernels.patterns import SparsityPattern
from secateurs.kernels.sparse import packing, triton_decode
from secateurs.kernels.sparse.packing import PackedLinear, describe_packed_kernels, pack_nm, packed_kernels
from secateurs.kernels.sparse.triton_decode import (
    MAX_TOKENS,
    Config,
    block_m,
    bound_call,
    check,
    decline_reason,
    packed24_linear,
    pick_config,
    random_24,
    triton_kernel,
)
from tests.triton_interpreter_cases import cases

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="Triton is not installed (the dev extra installs it on Linux x86-64)"
)
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and Triton")


# --- Under the interpreter (CPU, CI) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, Any]]:
    """Every case of tests/triton_interpreter_cases.py, run once in a subprocess with TRITON_INTERPRET=1 (the
    variable must be set before Triton is first used, and must not reach the other tests of this process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.triton_interpreter_cases"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            results[entry["id"]] = entry
    assert done.returncode == 0 and results, f"interpreter run failed ({done.returncode}): {done.stderr[-3000:]}"
    return results


@needs_triton
def test_the_interpreter_ran(interpreted: dict[str, dict[str, Any]]) -> None:
    assert interpreted["interpreter"]["ok"], "the kernel was not built for Triton's interpreter"


@needs_triton
@pytest.mark.parametrize("case", [ident for ident, _ in cases()])
def test_interpreted_kernel_equals_dense_with_zeros(case: str, interpreted: dict[str, dict[str, Any]]) -> None:
    """Odd shapes (rows not a multiple of BLOCK_N, kept values not a multiple of the chunk), 1/3/16 tokens,
    float32/float16, with and without bias, the table's configuration, small chunks and split-K."""
    entry = interpreted[case]
    assert entry["ok"], entry.get("error")
    assert entry["relative_error"] < 5e-3


@needs_triton
def test_interpreted_kernel_follows_strides(interpreted: dict[str, dict[str, Any]]) -> None:
    entry = interpreted["non_contiguous"]
    assert entry["ok"], entry.get("error")


@needs_triton
def test_interpreted_bound_call_equals_the_launcher(interpreted: dict[str, dict[str, Any]]) -> None:
    """The layer's bound call: bit for bit the launcher's output for later inputs like the first (contiguous,
    with leading dimensions, strided), None for another token count, dtype or an input that needs autograd."""
    entry = interpreted["bound"]
    assert entry["ok"], entry.get("error")
    assert entry["relative_error"] < 5e-3


@needs_triton
def test_interpreted_select_style_in_bfloat16(interpreted: dict[str, dict[str, Any]]) -> None:
    """The select style takes bf16 apart bit by bit (values and x read as int32/int64 words): in bf16 too."""
    entry = interpreted["select_bfloat16"]
    assert entry["ok"], entry.get("error")
    assert entry["relative_error"] < 1.6e-2


# --- Configuration, validation, registration (no Triton needed) ---------------------------------------------


def test_token_tile_is_the_next_power_of_two() -> None:
    assert [block_m(t) for t in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]


def test_split_k_only_when_rows_leave_the_gpu_idle() -> None:
    assert pick_config(1, 4096, 2048, 132).split_k == 1  # 1024 row blocks: plenty
    assert pick_config(1, 11008, 2048, 132).split_k == 1
    few = pick_config(1, 64, 8192, 132)  # 8 row blocks, 8 chunks per row
    assert few.split_k > 1
    assert -(-8192 // few.block_kh) // few.split_k >= 2  # each split keeps at least two chunks
    assert pick_config(1, 64, 512, 132).split_k == 1  # one chunk per row: nothing to split
    # split_chunks (a tuning option): also split long rows, each program then walking at most that many chunks
    long_rows = Config(1, 512, num_warps=2, style="select", split_chunks=6)
    assert triton_decode.with_split(long_rows, 4096, 5504, 132).split_k == 2  # 4096 x 11008: 11 chunks -> 2 x 6
    assert triton_decode.with_split(long_rows, 4096, 2048, 132).split_k == 1  # 4096 x 4096: 4 chunks
    assert triton_decode.with_split(dataclasses.replace(long_rows, split_chunks=2), 4096, 2048, 132).split_k == 2
    assert triton_decode.with_split(dataclasses.replace(long_rows, split_chunks=1), 4096, 1024, 132).split_k == 1
    assert "+split6" in str(long_rows)
    with pytest.raises(ValueError, match="split_chunks"):
        Config(1, 512, split_chunks=-1)
    for tokens in range(1, MAX_TOKENS + 1):
        config = pick_config(tokens, 4096, 2048, 132)
        if config.style == "tiles" and tokens > 1:  # tensor-core tiles: the accumulator is [BLOCK_N, 16 tokens]
            assert config.block_n * max(16, block_m(tokens)) <= 4096
        else:  # CUDA cores: one fp32 accumulator per product in flight, at most 64 per thread at 8 warps
            assert config.block_n * config.block_kh * block_m(tokens) <= 64 * 32 * config.num_warps


def test_layers_without_whole_code_words_take_the_bytes_style() -> None:
    assert pick_config(1, 4096, 2048, 132).style != "bytes"  # in = 4096: 128 words per row
    assert pick_config(1, 37, 36, 132).style == "bytes"  # in = 72: not a multiple of 32
    packed = pack_nm(random_24(8, 72, torch.float32, "cpu", torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="in_features % 32 == 0"):
        packed24_linear(torch.randn(1, 72), packed.values, packed.indices, config=Config(4, 32, style="words"))
    with pytest.raises(ValueError, match="block_kh % 16 == 0"):
        Config(4, 24, style="words")
    with pytest.raises(ValueError, match="style 'dot'"):
        Config(4, 32, style="dot")
    with pytest.raises(ValueError, match="prefetch is a words/select/tiles option"):
        Config(4, 32, prefetch=True)
    assert str(Config(8, 512, num_warps=8, style="words", prefetch=True)).startswith("words+prefetch BLOCK_N=8")


def test_a_tuning_run_replaces_table_entries() -> None:
    before = triton_decode.table()
    try:
        triton_decode.set_table({1: Config(2, 256, 4, 8, 3, style="words")})
        assert pick_config(1, 4096, 2048, 132) == Config(2, 256, 1, 8, 3, style="words")  # split_k per call
        with pytest.raises(ValueError, match="token tile 3"):
            triton_decode.set_table({3: Config(2, 256)})
    finally:
        triton_decode.set_table(before)


def test_launcher_refuses_tensors_that_do_not_fit() -> None:
    packed = pack_nm(random_24(8, 32, torch.float32, "cpu", torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="does not fit inputs of width 40"):
        packed24_linear(torch.randn(1, 40), packed.values, packed.indices)
    with pytest.raises(ValueError, match=r"x is torch\.float16"):
        packed24_linear(torch.randn(1, 32).half(), packed.values, packed.indices)
    with pytest.raises(ValueError, match="does not fit"):
        packed24_linear(torch.randn(1, 32), packed.values, packed.indices.to(torch.int32))
    select = Config(4, 16, style="select")
    with pytest.raises(ValueError, match=r"float16/bfloat16, not torch\.float32"):
        packed24_linear(torch.randn(1, 32), packed.values, packed.indices, config=select)
    half = packed.values.half()
    with pytest.raises(ValueError, match="computes one token, not 2"):
        packed24_linear(torch.randn(2, 32).half(), half, packed.indices, config=select)
    with pytest.raises(ValueError, match="select style computes one token, not a tile of 4"):
        triton_decode.set_table({4: select})


@needs_triton
def test_launcher_refuses_cpu_tensors_outside_the_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("this process runs Triton's interpreter")
    packed = pack_nm(random_24(8, 32, torch.float32, "cpu", torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="CUDA tensors"):
        packed24_linear(torch.randn(1, 32), packed.values, packed.indices)


def test_triton_is_registered_and_declines_cpu_calls() -> None:
    assert "triton" in packed_kernels()
    layer = PackedLinear(pack_nm(random_24(16, 32, torch.float32, "cpu", torch.Generator().manual_seed(0))))
    x = torch.randn(2, 32)
    assert triton_kernel(x, layer) is None
    reason = decline_reason(x, layer)
    assert reason is not None and ("CUDA" in reason or "Triton" in reason)
    y = layer(x)
    assert layer.last_path != "triton"
    torch.testing.assert_close(y, F.linear(x, layer.dense_weight()))


def test_bound_call_takes_only_inputs_like_the_one_it_was_bound_from() -> None:
    """The guards of the bound call, with a stand-in launch (no Triton): same device, dtype, width and token count,
    no autograd; leading dimensions may differ."""

    class Launch:
        tokens = 2

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((1,), float(x.numel()))

    call = bound_call(Launch(), torch.randn(2, 32))  # type: ignore[arg-type]
    assert call(torch.randn(2, 32)) is not None
    assert call(torch.randn(1, 2, 32)) is not None  # the same two tokens under another leading shape
    for declined in (
        torch.randn(1, 32),  # another token count
        torch.randn(4, 16),  # the same elements, another width
        torch.randn(2, 32).half(),  # another dtype
        torch.randn(2, 32, requires_grad=True),  # autograd
    ):
        assert call(declined) is None, (declined.shape, declined.dtype)
    with torch.no_grad():
        assert call(torch.randn(2, 32, requires_grad=True)) is not None


def test_a_new_table_drops_the_bound_calls() -> None:
    before = packing._VERSION[0]
    triton_decode.set_table(triton_decode.table())
    assert packing._VERSION[0] > before  # every layer's bound call is re-bound by its next dispatch


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without CUDA")
def test_description_says_why_it_cannot_run() -> None:
    described = {d.name: d for d in describe_packed_kernels()}["triton"]
    assert not described.available
    assert "CUDA" in described.detail or "Triton" in described.detail


def test_without_triton_the_kernel_declines_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        triton_decode.importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )
    triton_decode._missing.cache_clear()
    try:
        described = triton_decode.describe()
        assert not described.available and "not installed" in described.detail
        layer = PackedLinear(pack_nm(random_24(8, 16, torch.float32, "cpu", torch.Generator().manual_seed(0))))
        assert triton_kernel(torch.randn(1, 16), layer) is None
    finally:
        triton_decode._missing.cache_clear()


def test_speed_sweep_lists_the_triton_path_and_says_why_not_here() -> None:
    path = next(p for p in sparse_paths() if p.name == "packed_triton")
    assert path.unavailable(torch.device("cpu"), torch.float32) is not None
    assert path.unsupported((64, 64), torch.bfloat16, SparsityPattern.nm(1, 4)) is not None
    assert path.declines(MAX_TOKENS) is None
    assert path.declines(MAX_TOKENS + 1) is not None


@needs_triton
@pytest.mark.parametrize(
    ("style", "dtype", "tokens", "split_k", "bias"),
    [
        *((style, "bf16", 1, 1, False) for style in ("bytes", "words", "select", "tiles")),
        *((style, "fp16", 16, 2, True) for style in ("bytes", "words", "tiles")),
        ("select", "fp16", 1, 2, True),  # the select style computes one token
    ],
)
def test_kernel_compiles_for_hopper_without_a_gpu(
    style: str, dtype: str, tokens: int, split_k: int, bias: bool
) -> None:
    """Triton's ahead-of-time path (ptxas from Triton's wheel) catches what the interpreter cannot: code the GPU
    compiler rejects, and register spills (local memory)."""
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("this process runs Triton's interpreter")
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.triton_aot import compile_kernel

    result = compile_kernel(arch=90, dtype=dtype, tokens=tokens, style=style, split_k=split_k, bias=bias)
    assert result["global_loads"], result
    assert result.get("local_bytes", 0) == 0 and result.get("stack_bytes", 0) == 0, result


# --- On a GPU ------------------------------------------------------------------------------------------------

GPU_SHAPES = [(37, 72), (576, 576), (1536, 576), (576, 1536), (1000, 200), (4096, 4096), (4096, 11008)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_kernel_equals_dense_with_zeros(shape: tuple[int, int], dtype: torch.dtype) -> None:
    for tokens in (1, 3, 8, 16):  # the token tiles 1, 4, 8, 16 (each a compile; the interpreter covers more)
        check(*shape, tokens, dtype, "cuda", bias=tokens % 2 == 1, seed=tokens)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_select_style(dtype: torch.dtype) -> None:
    """One token through the select style: even launches, ragged rows and words (37 x 96: 3 words per row),
    split-K with the prefetch."""
    configs = (
        Config(8, 512, 1, 8, style="select"),
        Config(4, 64, 3, style="select", prefetch=True),
        Config(16, 256, 2, 8, style="select", prefetch=True),
    )
    for config in configs:
        for shape in ((64, 1024), (4096, 4096), (576, 1536), (37, 96)):
            check(*shape, 1, dtype, "cuda", config=config, bias=shape[0] % 2 == 1)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_split_k_and_small_chunks(dtype: torch.dtype) -> None:
    for config in (Config(4, 16, 3), Config(8, 64, 4), Config(2, 128, 1, num_warps=2), Config(16, 256, 2, 8, 3)):
        for tokens in (1, 16):
            check(64, 1024, tokens, dtype, "cuda", config=config, seed=tokens)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_packed_linear_runs_triton_for_decode_only(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    dense = random_24(1536, 576, dtype, "cuda", g)  # [1536, 576]
    bias = torch.randn(1536, generator=g).to("cuda", dtype)
    layer = PackedLinear.from_dense(dense, bias)
    for shape, expected in [((1, 576), True), ((2, 8, 576), True), ((16, 576), True), ((17, 576), False)]:
        x = torch.randn(*shape, generator=g).to("cuda", dtype)
        y = layer(x)
        assert (layer.last_path == "triton") is expected, (shape, layer.last_path)
        assert mismatch(y, F.linear(x, dense, bias)) is None, shape
        if expected:  # the next call like it goes through the layer's bound call, to the same bits
            assert layer.__dict__["_fast_call"][2] == "triton"
            assert torch.equal(layer(x), y) and layer.last_path == "triton"
    strided = torch.randn(3, 1152, generator=g).to("cuda", dtype)[:, ::2]  # [3, 576], not contiguous
    assert mismatch(layer(strided), F.linear(strided, dense, bias)) is None
    trained = torch.randn(1, 576, generator=g).to("cuda", dtype).requires_grad_()
    layer(trained).sum().backward()  # the kernel has no backward: autograd calls go to the reference forward
    assert layer.last_path != "triton" and trained.grad is not None
    layer32 = PackedLinear.from_dense(dense.float(), bias.float())
    layer32(torch.randn(1, 576, device="cuda"))
    assert layer32.last_path != "triton"  # float32 is not a decode dtype of this kernel


@pytest.mark.gpu
@needs_cuda
def test_gpu_kernel_replays_in_a_cuda_graph() -> None:
    g = torch.Generator().manual_seed(0)
    dense = random_24(4096, 4096, torch.bfloat16, "cuda", g)
    packed = pack_nm(dense)
    x = torch.randn(1, 4096, generator=g).to("cuda", torch.bfloat16)
    packed24_linear(x, packed.values, packed.indices)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = packed24_linear(x, packed.values, packed.indices)
    x.copy_(torch.randn(1, 4096, generator=g).to("cuda", torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert mismatch(y, F.linear(x, dense)) is None


@pytest.mark.gpu
@needs_cuda
def test_gpu_sweep_times_triton_at_decode_and_not_beyond() -> None:
    path = next(p for p in sparse_paths() if p.name == "packed_triton")
    settings = SpeedSettings(token_counts=(1, 16, 64), warmup=3, repetitions=10)
    results = sweep_linear(
        {(1536, 576): 1}, SparsityPattern.nm(2, 4), torch.bfloat16, torch.device("cuda"), settings, paths=[path]
    )
    statuses = {point.tokens: point.paths[0] for point in results}
    assert statuses[1].status == "measured" and statuses[16].status == "measured", statuses
    assert statuses[64].status == "unavailable" and "1..16" in (statuses[64].reason or "")
