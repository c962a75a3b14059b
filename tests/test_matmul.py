"""The CPU fp32 products (secateurs.kernels.matmul), through oneDNN and through ATen alike, against their references;
the run-time choice between them; and the heap allocation context."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from secateurs.kernels import matmul
from secateurs.kernels.matmul import (
    _onednn_linear_op,
    _upcast_linear,
    cross_,
    fast_linears,
    gram_upper_,
    linear,
    upcast_min_tokens,
    upcast_pays,
    use_cpu_gemm,
    use_upcast,
)
from secateurs.workers.allocator import _glibc
from tests.conftest import REPO_ROOT
from tests.models import tiny_model

needs_onednn = pytest.mark.skipif(_onednn_linear_op() is None, reason="this PyTorch build has no oneDNN linear")
BACKENDS = [pytest.param("onednn", marks=needs_onednn), "aten"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each product test runs through both libraries, whichever this machine would choose."""
    with use_cpu_gemm(request.param):
        yield request.param


@needs_onednn
def test_the_backend_is_measured_once_per_kind_and_can_be_forced() -> None:
    matmul._measured_backend.cache_clear()
    choices = {kind: matmul.cpu_gemm_backend(kind) for kind in ("linear", "gram")}
    assert set(choices.values()) <= {"onednn", "aten"}
    assert matmul._measured_backend.cache_info().currsize == 2
    with use_cpu_gemm("aten"):
        with use_cpu_gemm("onednn"):
            assert matmul.cpu_gemm_backend("gram") == "onednn"  # the innermost wins
        assert matmul.cpu_gemm_backend("linear") == "aten"
    assert {kind: matmul.cpu_gemm_backend(kind) for kind in choices} == choices


@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12), (2, 3, 4, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(shape: tuple[int, ...], bias: bool, backend: str) -> None:
    x, weight = torch.randn(shape), torch.randn(20, 12)
    b = torch.randn(20) if bias else None
    torch.testing.assert_close(linear(x, weight, b), F.linear(x, weight, b))


def test_linear_on_strided_operands_and_a_weight_changed_in_place(backend: str) -> None:
    x, weight = torch.randn(12, 9).T, torch.randn(12, 16).T  # [9, 12] and [16, 12], both transposed views
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    weight.mul_(0.5)[:, ::2] = 0  # no cached copy of the old weight may be used
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))


def test_linear_falls_back_where_onednn_does_not_apply() -> None:
    x, weight = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    assert torch.equal(linear(x, weight), F.linear(x, weight))  # not fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps its bf16 product
        assert linear(x.float(), weight.float()).dtype == torch.bfloat16
    w = weight.float().requires_grad_()
    linear(x.float(), w).sum().backward()  # autograd goes through F.linear
    assert w.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fp32: oneDNN in token chunks; fp64: addmm_
@pytest.mark.parametrize("width", [8, 100, 900])
def test_gram_upper_accumulates_the_upper_triangle_of_xtx(dtype: torch.dtype, width: int, backend: str) -> None:
    x = torch.randn(300, width, dtype=dtype)
    start = torch.randn(width, width, dtype=dtype)
    out = start.clone()
    gram_upper_(out, x, alpha=0.25, panel=64, chunk=128)  # several panels and chunks
    expected = start + 0.25 * (x.T @ x)
    torch.testing.assert_close(torch.triu(out), torch.triu(expected), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_accumulates_atb(dtype: torch.dtype, backend: str) -> None:
    a, b = torch.randn(300, 40, dtype=dtype), torch.randn(300, 24, dtype=dtype)
    out = torch.randn(40, 24, dtype=dtype)
    expected = out + 0.5 * (a.T @ b)
    cross_(out, a, b, alpha=0.5, chunk=128)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_fast_linears_gives_the_same_logits_hooks_still_run_and_forwards_are_restored(backend: str) -> None:
    model = tiny_model("llama", num_layers=2).eval()
    ids = torch.randint(4, 128, (2, 16))
    seen: list[str] = []
    first = model.model.layers[0].self_attn.q_proj
    handle = first.register_forward_pre_hook(lambda _m, _a: seen.append("pre-hook"))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        seen.clear()
        with fast_linears(model):
            fast = model(input_ids=ids).logits
    handle.remove()
    torch.testing.assert_close(fast, reference)
    assert seen == ["pre-hook"]
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fast_linears_covers_gpt2_conv1d(backend: str) -> None:
    layer = Conv1D(24, 12)  # nf=24 outputs, nx=12 inputs; weight [12, 24]
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        reference = layer(x)
        with fast_linears(nn.Sequential(layer)):
            torch.testing.assert_close(layer(x), reference)
    assert "forward" not in layer.__dict__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_16_bit_linears_as_fp32_products_equal_the_native_product(dtype: torch.dtype, bias: bool) -> None:
    """The same products with fp32 accumulation, rounded to the input's dtype: equal to the fp32 product of
    the same 16-bit values rounded once, slice by slice of tokens (several slices here)."""
    x = torch.randn(3, 37, 64).to(dtype)
    weight = torch.randn(48, 64).to(dtype)
    b = torch.randn(48).to(dtype) if bias else None
    expected = F.linear(x.float(), weight.float(), b.float() if b is not None else None).to(dtype)
    sliced = _upcast_linear(x, weight, b, chunk_bytes=16 * 4 * 64)  # 16 tokens a slice: 7 slices
    assert sliced.dtype == dtype and sliced.shape == (3, 37, 48)
    torch.testing.assert_close(sliced, expected)  # to rounding: the fp32 library may sum in its own order
    with use_upcast(True):
        torch.testing.assert_close(linear(x, weight, b), expected)
    with use_upcast(False):
        assert torch.equal(linear(x, weight, b), F.linear(x, weight, b))
    torch.testing.assert_close(linear(x, weight, b), F.linear(x, weight, b))  # whichever is measured faster


def test_16_bit_linears_of_few_tokens_stay_native() -> None:
    """The fp32 copy of the weight is made per call: a decode step (one token) or a large weight with a few tokens
    keeps the native product, even where fp32 copies are forced."""
    weight = torch.randn(48, 64).bfloat16()
    assert upcast_min_tokens(weight) == 4
    assert upcast_min_tokens(torch.empty(1536, 576, dtype=torch.bfloat16)) == 4
    assert upcast_min_tokens(torch.empty(4096, 4096, dtype=torch.bfloat16)) == 32
    with use_upcast(True), patch.object(matmul, "_upcast_linear", side_effect=AssertionError("upcast")) as upcast:
        for x in (torch.randn(1, 64).bfloat16(), torch.randn(3, 1, 64).bfloat16()):  # 1 and 3 tokens
            assert torch.equal(linear(x, weight), F.linear(x, weight))
        upcast.assert_not_called()
        with pytest.raises(AssertionError, match="upcast"):
            linear(torch.randn(4, 64).bfloat16(), weight)


def test_the_16_bit_choice_is_measured_once_per_dtype_and_never_for_fp32() -> None:
    matmul._measured_upcast.cache_clear()
    first = upcast_pays(torch.bfloat16)
    assert upcast_pays(torch.bfloat16) is first
    assert matmul._measured_upcast.cache_info().currsize == 1
    assert not upcast_pays(torch.float32)
    with use_upcast(not first):
        assert upcast_pays(torch.bfloat16) is (not first)


def test_fast_linears_computes_a_bf16_model_as_fp32_products_where_forced() -> None:
    model = tiny_model("llama", num_layers=2).eval().to(torch.bfloat16)
    ids = torch.randint(4, 128, (2, 16))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with use_upcast(True), fast_linears(model):
            assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear))
            fast = model(input_ids=ids).logits
        with use_upcast(False), use_cpu_gemm("aten"), fast_linears(model):
            assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(fast.float(), reference.float(), rtol=0.05, atol=0.05)  # bf16 rounding per layer
    assert not any("forward" in m.__dict__ for m in model.modules())


# What both heap probes below need: where the heap lies and how much is resident.
_PROBE = """
import resource, torch
from secateurs.workers.allocator import heap_allocations

def heap_range():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            return [int(part, 16) for part in line.split()[0].split("-")]

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
"""

_HEAP = (
    _PROBE
    + """
with heap_allocations():
    tensor = torch.ones(16 << 20)  # 64 MiB, above glibc's largest mmap threshold
    low, high = heap_range()
    on_heap = low <= tensor.data_ptr() < high
    del tensor
    kept = resident()  # freed, but its pages stay with the process for the next tensor
released = kept - resident()  # the heap was trimmed on exit
print(int(on_heap), released)
"""
)


@pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")
def test_heap_allocations_keep_large_tensors_on_the_heap_and_give_the_pages_back_on_exit() -> None:
    # in a fresh interpreter, so that nothing else in this test process shapes the heap
    done = subprocess.run([sys.executable, "-c", _HEAP], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    on_heap, released = map(int, done.stdout.split())
    assert on_heap == 1
    assert released > 48 << 20


_AFTER = (
    _PROBE
    + """
with heap_allocations():
    pass
placed = []
for _ in range(3):  # a 4 MiB activation allocated and freed over and over, as a model's forward does
    tensor = torch.ones(1 << 20)
    low, high = heap_range()
    placed.append(int(low <= tensor.data_ptr() < high))
    del tensor
print(*placed)
"""
)


@pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")
def test_after_the_job_large_tensors_come_from_the_heap_again() -> None:
    """Once a context has set glibc's thresholds, glibc no longer raises its mmap threshold by itself: leaving it at
    its 128 KiB start made every later allocation above that a fresh mapping, faulted in on every use (prefill after
    secateurs.prune() in the same process ran 1.9x slower). Below the 32 MiB glibc settles on, tensors reuse the
    heap."""
    done = subprocess.run([sys.executable, "-c", _AFTER], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert done.stdout.split() == ["1", "1", "1"]


_LARGE = (
    _PROBE
    + """
with heap_allocations() as heap:
    heap.map_large_allocations()
    small = torch.ones(1 << 16)  # 256 KiB: still served by the heap
    low, high = heap_range()
    small_on_heap = low <= small.data_ptr() < high
    medium = torch.ones(1 << 20)  # 4 MiB: above the 1 MiB bound, mapped
    low, high = heap_range()
    medium_on_heap = low <= medium.data_ptr() < high
    tensor = torch.ones(16 << 20)  # 64 MiB: a mapping of its own
    large_on_heap = medium_on_heap or low <= tensor.data_ptr() < high
    before = resident()
    del tensor
    released = before - resident()  # given back at once, no trim needed
print(int(small_on_heap), int(large_on_heap), released)
"""
)


@pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")
def test_large_block_mode_maps_large_tensors_and_gives_them_back_when_freed() -> None:
    done = subprocess.run([sys.executable, "-c", _LARGE], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    small_on_heap, large_on_heap, released = map(int, done.stdout.split())
    assert (small_on_heap, large_on_heap) == (1, 0)
    assert released > 48 << 20


_MAPPED = (
    _PROBE
    + """
from secateurs.workers.allocator import mapped_allocations

def on_heap(tensor):
    low, high = heap_range()
    return int(low <= tensor.data_ptr() < high)

with heap_allocations():
    with mapped_allocations():
        inside = torch.empty(1 << 20)  # 4 MiB, never touched: what a model built on the meta device allocates
    after = torch.empty(1 << 20)  # the job's policy again: mmap off, on the heap
    print(on_heap(inside), on_heap(after))
"""
)


@pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")
def test_mapped_allocations_map_inside_and_restore_the_job_policy_after() -> None:
    done = subprocess.run([sys.executable, "-c", _MAPPED], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert done.stdout.split() == ["0", "1"]


_BETWEEN = (
    _PROBE
    + """
from secateurs.workers import allocator

with heap_allocations() as heap:
    def block(mib):  # a block's activations: allocated, written, freed
        tensor = torch.ones(mib << 18)
        del tensor
    block(64)
    heap.between_blocks()  # the first block sets the level
    block(64)
    heap.between_blocks()  # the same sizes again: under the bound, nothing trimmed
    kept = resident()
    heap.release()
    kept -= resident()  # what the block left resident for the next one
    block(64)
    heap.between_blocks()  # a new level after a trim
    block(64 + (allocator.BLOCK_GROWTH_BYTES >> 20) + 64)  # a block needing far more
    grown = resident()
    heap.between_blocks()  # past the bound: trimmed
    trimmed = grown - resident()
print(int(kept > 48 << 20), int(trimmed > allocator.BLOCK_GROWTH_BYTES))
"""
)


@pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")
def test_between_blocks_keeps_the_heap_until_it_grows_past_the_bound() -> None:
    """Trimming after every block made every block fault its activations in again (~0.4 s of a SmolLM2 block's
    4.4 s on an AVX2 EPYC); between blocks the heap is trimmed only once it has grown past the bound."""
    done = subprocess.run([sys.executable, "-c", _BETWEEN], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert done.stdout.split() == ["1", "1"]


_BOUND = (
    _PROBE
    + """
from secateurs.workers import allocator

def block(mib):  # a block's activations: allocated, written, freed
    tensor = torch.ones(mib << 18)
    del tensor

with heap_allocations() as heap:  # a small model's blocks: the bound follows them down to the floor
    block(4)
    heap.between_blocks()
    small = heap.growth_bound
    block(4 + 48)  # 48 MiB more than the first block: past a 16 MiB bound, far under 192
    grown = resident()
    heap.between_blocks()
    trimmed_small = grown - resident()
with heap_allocations() as heap:  # a calibration forward's working set: the bound stays at its ceiling
    block(256)
    heap.between_blocks()
    large = heap.growth_bound  # (whether a larger block then reuses the freed pages is up to glibc: not asserted)
floor, ceiling = allocator.BLOCK_GROWTH_FLOOR, allocator.BLOCK_GROWTH_BYTES
print(int(small == floor), int(trimmed_small > 32 << 20), int(large == ceiling))
"""
)


@pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")
def test_between_blocks_bound_follows_the_first_blocks_working_set() -> None:
    """A streamed job on a small model (blocks of a few MB) fragmented its heap by 37-71 MB before a fixed 192 MB
    bound trimmed it (AMD Zen 1); the bound is the first block's own growth, between a floor and a ceiling."""
    done = subprocess.run([sys.executable, "-c", _BOUND], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert done.stdout.split() == ["1", "1", "1"]
