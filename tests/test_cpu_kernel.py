"""The packed 2:4 CPU kernel (secateurs.kernels.sparse.cpu): every instruction set this CPU runs equals the dense
product with zeros, the dispatch runs what was asked, the hand-over above the measured crossover, the build's
cache and its failure fallback, and the speed sweep's path."""

from __future__ import annotations

import copy
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from secateurs.app.errors import DeviceError
from secateurs.app.settings import Settings
from secateurs.kernels.measure.speed import SpeedSettings, mismatch, sparse_paths, sweep_linear
from secateurs.kernels.patterns import SparsityPattern, nm_prune_mask
from secateurs.kernels.sparse import cpu, packing
from secateurs.kernels.sparse.cpu import build as cpu_build
from secateurs.kernels.sparse.cpu import kernel
from secateurs.kernels.sparse.packing import (
    REFERENCE_PATH,
    PackedLinear,
    describe_packed_kernels,
    pack_nm,
    unpack_nm,
)
from secateurs.workers import cpu_kernel as worker_side
from tests.conftest import KERNEL_DIR

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 20), (13, 36), (67, 100), (13, 4100)]  # (out, in): in not a multiple of any SIMD width; odd rows
TOKENS = [1, 3, 16, 17]


def weight_24(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A random 2:4 weight [out, in] (dense with zeros), with one group holding a single non-zero."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    weight = weight.masked_fill(nm_prune_mask(weight.abs(), 2, 4), 0.0)
    weight[0, :4] = torch.tensor([0.0, 0.0, 0.0, 2.5])
    return weight.to(dtype)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dense with zeros; mixed dtypes compute in fp32 (what the kernel promises), output in x's dtype."""
    if x.dtype == weight.dtype:
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def dense_mismatches(
    shapes: list[tuple[int, int]], token_counts: list[int], w_dtype: torch.dtype, x_dtype: torch.dtype
) -> list[str]:
    """The kernel in use against dense-with-zeros over every shape and token count, with and without bias, x not
    contiguous (every other column of a wider tensor): one line per mismatch."""
    failures = []
    for seed, shape in enumerate(shapes):
        weight = weight_24(shape, w_dtype, seed)
        packed = pack_nm(weight)
        bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed)).to(w_dtype)
        for tokens in token_counts:
            for b in (None, bias):
                wide = torch.randn(tokens, 2 * shape[1], generator=torch.Generator().manual_seed(tokens)).to(x_dtype)
                x = wide[:, ::2]  # [tokens, in], every other column: not contiguous
                y = cpu.packed_product(x, packed.values, packed.indices, b)
                assert y.dtype == x_dtype and y.shape == (tokens, shape[0])
                problem = mismatch(y, reference(x, weight, b))
                if problem is not None:
                    failures.append(f"{shape} x {tokens} tokens, bias {b is not None}: {problem}")
    return failures


@pytest.fixture(scope="session")
def built() -> cpu_build.Built:
    """The extension, built once per session into the checkout's kernel folder (a cache hit after the first)."""
    cpu.configure(build_dir=KERNEL_DIR)
    assert cpu.ensure(), cpu.describe().detail
    assert kernel._STATE.built is not None
    return kernel._STATE.built


@pytest.fixture
def isa(request: pytest.FixtureRequest, built: cpu_build.Built) -> Iterator[str]:
    """Force the instruction set named by the test's parameter; skip it when this CPU does not run it."""
    name: str = request.param
    if name not in built.module.isas_runnable():
        pytest.skip(f"this CPU does not run the {name} kernel (flags: {', '.join(built.module.cpu_flags())})")
    cpu.configure(build_dir=KERNEL_DIR, isa=name)  # type: ignore[arg-type]
    assert cpu.ensure() and cpu.isa_in_use() == name
    yield name
    cpu.configure(build_dir=KERNEL_DIR, isa="auto")


# --- Every kernel equals dense-with-zeros ---------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x-{str(d)[6:]}")
@pytest.mark.parametrize("w_dtype", DTYPES, ids=lambda d: f"w-{str(d)[6:]}")
@pytest.mark.parametrize("isa", list(kernel.ISAS), indirect=True)
def test_each_kernel_equals_the_dense_product(isa: str, w_dtype: torch.dtype, x_dtype: torch.dtype) -> None:
    failures = dense_mismatches(SHAPES, TOKENS, w_dtype, x_dtype)
    assert not failures, "\n".join(failures)


@pytest.fixture
def token_vectors_from_one(built: cpu_build.Built) -> Iterator[None]:
    """Every product with fp32 activations takes the token-vector kernel, from one token up (the measured defaults
    again after the test)."""
    built.module.set_token_vector_min(1)
    yield
    built.module.set_token_vector_min(0)


@pytest.fixture(params=[0, 1], ids=["short-blocks", "tall-blocks"])
def tokens_tall(request: pytest.FixtureRequest, built: cpu_build.Built) -> Iterator[int]:
    """The token-vector kernel's full AVX-512 chunks in 16-row blocks, then in 64-row ones, whatever this CPU's L1d
    would choose (the rule again after the test)."""
    built.module.set_tokens_tall(request.param)
    yield request.param
    built.module.set_tokens_tall(-1)


def token_vector_cases(test: Callable[..., None]) -> Callable[..., None]:
    """Every pair of x and weight dtypes on each instruction set that has a token-vector kernel."""
    test = pytest.mark.parametrize("isa", ["avx2", "avx512"], indirect=True)(test)
    test = pytest.mark.parametrize("w_dtype", DTYPES, ids=lambda d: f"w-{str(d)[6:]}")(test)
    return pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: f"x-{str(d)[6:]}")(test)


@token_vector_cases
def test_the_token_vector_kernel_equals_the_dense_product(
    isa: str, w_dtype: torch.dtype, x_dtype: torch.dtype, token_vectors_from_one: None, tokens_tall: int
) -> None:
    """The token-vector kernel (csrc/tokens.h) over token counts that fill a vector, a chunk (64 tokens on AVX2, 128
    on AVX-512) or spill into the next, rows that are not a register tile or a block of 16 or 64 (150: two blocks
    of 64 and a short one, the next block's prefetch cut at the end), inputs that end in half a code byte
    (in % 8 == 4) or span several blocks of x, with and without bias, x not contiguous; full AVX-512 chunks in both
    of their row blocks."""
    if isa == "avx2" and tokens_tall:
        pytest.skip("AVX2 chunks always take the 16-row blocks: the tall ones are AVX-512's")
    module = kernel._module()
    assert module.kernel_name(kernel._STATE.isa_index, False, w_dtype == torch.bfloat16, 1) == f"{isa}_tokens"
    shapes = [(1, 20), (13, 36), (67, 100), (150, 68), (13, 4100), (37, 1540)]
    failures = dense_mismatches(shapes, [1, 3, 17, 64, 65, 129, 300], w_dtype, x_dtype)
    assert not failures, "\n".join(failures)


@pytest.fixture
def token_spans(built: cpu_build.Built) -> Iterator[None]:
    """Products of 2,048 tokens and more run in spans of 256 tokens whatever the rule would choose (the rule again
    after the test)."""
    built.module.set_token_spans(1)
    yield
    built.module.set_token_spans(-1)


@pytest.mark.parametrize("threads", [1, 2])
@token_vector_cases
def test_token_spans_equal_the_dense_product(
    isa: str, w_dtype: torch.dtype, x_dtype: torch.dtype, threads: int, token_spans: None
) -> None:
    """Many tokens in spans (dispatch.cpp's token_spans: each thread lays out its own 256 tokens of x and runs every
    row over them): whole spans, a short last one, rows and inputs as in the test above, bias and strided x."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        failures = dense_mismatches([(13, 36), (150, 68), (37, 1540)], [2048, 2200], w_dtype, x_dtype)
    finally:
        torch.set_num_threads(before)
    assert not failures, "\n".join(failures)


def test_the_token_spans_rule(built: cpu_build.Built) -> None:
    """Spans from 2,048 tokens on more than one thread once x outgrows the packed values (2 · tokens > out); rows
    split below, and always on one thread (measured, dispatch.cpp)."""
    module = built.module
    assert module.token_spans(2048, 4000, 2) and not module.token_spans(2048, 4096, 2)
    assert not module.token_spans(2047, 100, 2) and not module.token_spans(4096, 100, 1)
    module.set_token_spans(0)
    try:
        assert not module.token_spans(4096, 100, 2)
    finally:
        module.set_token_spans(-1)


def test_the_token_vector_blocks_follow_the_l1d(built: cpu_build.Built) -> None:
    """Full AVX-512 chunks take the 64-row blocks only where a core's L1d holds their 32 KiB of sums beside 16 KiB of
    x (tokens.h: on a 32 KiB L1d they ran at half the speed of 16-row blocks); the CPU's answer is the one sysconf
    gives (Linux's sysfs says the same where it lists the caches), and the kernel's description names both."""
    module = built.module
    l1d = module.l1d_bytes()
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        if (index / "level").read_text().strip() == "1" and (index / "type").read_text().strip() == "Data":
            assert l1d == int((index / "size").read_text().strip().removesuffix("K")) << 10
    assert module.tokens_tall() == (l1d >= 48 << 10)
    module.set_tokens_tall(1)
    try:
        assert module.tokens_tall()
    finally:
        module.set_tokens_tall(-1)
    assert module.tokens_tall() == (l1d >= 48 << 10)
    detail = kernel.describe().detail
    assert f"blocks of {64 if module.tokens_tall() else 16} rows" in detail
    assert (f"L1d {l1d >> 10} KiB" if l1d else "L1d size not reported") in detail


def test_the_token_vector_kernel_takes_many_tokens_by_default(built: cpu_build.Built) -> None:
    """Without an override, AVX2 takes the token-vector kernel from 8 tokens and AVX-512 from 32 (measured,
    dispatch.cpp); the scalar build never."""
    module = built.module
    names = list(kernel.ISAS)
    for isa in ("avx2", "avx512"):
        if isa not in module.isas_runnable():
            continue
        index = names.index(isa)
        first = module.token_vector_min(index)
        assert first == {"avx2": 8, "avx512": 32}[isa]
        assert module.kernel_name(index, False, False, first) == f"{isa}_tokens"
        assert module.kernel_name(index, False, False, first - 1) == isa
    assert module.kernel_name(names.index("scalar"), False, False, 512) == "scalar"


@pytest.mark.parametrize("isa", ["amx"], indirect=True)
def test_the_amx_kernel_over_token_tiles_and_passes(isa: str) -> None:
    """bf16 × bf16 from 5 tokens runs on the tile unit, in tiles of 16 tokens and passes of 64 (from 256 tokens on
    rows of 4096+ inputs, in blocks of inputs): token counts that end a tile or a pass, or start a new one, over rows
    that are not a whole tile and inputs that are not a whole step of 32; 1-3 tokens take the bf16-pair kernel, 4 and
    other dtypes the AVX-512 one."""
    module = kernel._module()
    names = {tokens: module.kernel_name(kernel._STATE.isa_index, True, True, tokens) for tokens in (1, 3, 4, 5, 80)}
    assert names == {1: "avx512bf16", 3: "avx512bf16", 4: "avx512", 5: "amx", 80: "amx"}
    assert module.kernel_name(kernel._STATE.isa_index, False, True, 16) == "avx512"
    failures = []

    def check(shape: tuple[int, int], tokens_list: tuple[int, ...], seed: int, with_bias: bool, what: str = "") -> None:
        weight = weight_24(shape, torch.bfloat16, seed)
        packed = pack_nm(weight)
        bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        b = bias if with_bias else None
        for tokens in tokens_list:
            x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
            problem = mismatch(cpu.packed_product(x, packed.values, packed.indices, b), reference(x, weight, b))
            if problem is not None:
                failures.append(f"{shape} x {tokens} tokens{what}: {problem}")

    for seed, shape in enumerate([(37, 100), (16, 64), (40, 1540)]):
        check(shape, (5, 15, 16, 33, 64, 65, 130), seed, True)
    # Above one pass, panels shared by groups of token tiles: 2560 inputs take groups of 12 tiles (192 tokens), so
    # 400 tokens are three groups, the last of one tile
    check((20, 2560), (400,), 7, False)
    # From 256 tokens on rows of 4096+ inputs, blocks of 32 steps of inputs, sums kept between them (amx.cpp): 4100
    # inputs end in a block of one partial step, 70 rows are two 32-row blocks and 6 left to the passes, 272 tokens
    # end in an odd token tile; with and without bias; one thread, whose range of rows is all 70 (two threads would
    # take runs of 16 rows here, too few for the blocks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check((70, 4100), (256,), 8, True)
        check((70, 4100), (272,), 8, False)
        # Forced where the rule would not take them: 1540 inputs (a block of 32 steps, then 17), 33 tokens (3 tiles)
        module.set_amx_input_blocks(1)
        check((40, 1540), (33,), 9, False, ", input blocks forced")
        # Sums capped to 8 KiB: two 32-row blocks hold 2 token tiles a group, so 272 tokens are 9 groups, the last odd
        module.set_amx_input_blocks(1, 8 << 10)
        check((70, 4100), (272,), 10, True, ", sums in groups of 2 token tiles")
    finally:
        module.set_amx_input_blocks(-1)
        torch.set_num_threads(threads)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("isa", ["avx512bf16"], indirect=True)
def test_without_amx_bf16_takes_the_pair_kernel_at_every_token_count(isa: str) -> None:
    """Under avx512bf16 (no AMX) bf16 × bf16 takes the pair kernel at any token count (measured faster than the
    AVX-512 kernel at 16 tokens on AMD Zen 5, dispatch.cpp), and agrees with dense across its token tiles; other
    dtypes take the AVX-512 kernel."""
    module = kernel._module()
    names = {tokens: module.kernel_name(kernel._STATE.isa_index, True, True, tokens) for tokens in (1, 3, 4, 16, 80)}
    assert set(names.values()) == {"avx512bf16"}, names
    assert module.kernel_name(kernel._STATE.isa_index, False, True, 16) == "avx512"
    failures = []
    for seed, shape in enumerate([(37, 100), (40, 1540)]):
        weight = weight_24(shape, torch.bfloat16, seed)
        packed = pack_nm(weight)
        for tokens in (4, 5, 8, 33):
            x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
            problem = mismatch(cpu.packed_product(x, packed.values, packed.indices), reference(x, weight, None))
            if problem is not None:
                failures.append(f"{shape} x {tokens} tokens: {problem}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("isa", list(kernel.ISAS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decompression_is_bit_exact(isa: str, dtype: torch.dtype) -> None:
    # (3, 1060): the AVX-512 decompressions make masks 64 code bytes at a time; here two whole runs and a partial one
    for seed, shape in enumerate([*SHAPES, (5, 4), (3, 1060)]):
        weight = weight_24(shape, dtype, seed)
        weight[-1, int(weight[-1].nonzero()[0])] = -0.0  # a kept -0.0 must stay -0.0
        packed = pack_nm(weight)
        dense = torch.full((shape[0] + 2, shape[1]), 9.0, dtype=dtype)  # larger than needed: rows beyond untouched
        kernel._module().decompress(packed.values, packed.indices, 1, shape[0], dense, kernel._STATE.isa_index, 0)
        view = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(dense[: shape[0] - 1].view(view), weight[1:].contiguous().view(view)), shape
        assert bool((dense[shape[0] - 1 :] == 9.0).all())


@pytest.mark.parametrize("isa", list(kernel.ISAS), indirect=True)
def test_packed_linear_runs_the_forced_kernel(isa: str) -> None:
    weight = weight_24((67, 100), torch.float32, 0)
    layer = PackedLinear.from_dense(weight)
    x = torch.randn(2, 1, 100)  # decode: [batch, 1 token, in]
    assert mismatch(layer(x), F.linear(x, weight)) is None
    assert layer.last_path == cpu.KERNEL_NAME and cpu.isa_in_use() == isa
    general = isa if isa in ("scalar", "avx2", "avx512") else "avx512"  # the bf16 kernels take bf16 × bf16 only
    assert cpu.kernel_in_use(torch.float32, torch.float32, 2) == general
    described = {d.name: d for d in describe_packed_kernels()}[cpu.KERNEL_NAME]
    assert described.available and f"instruction set {isa} (forced" in described.detail


def test_threads_split_the_rows_and_agree(built: cpu_build.Built, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # blocks of 16 rows, a short last one; 597 rows: 38 blocks, taken 2 at a time (a run of 1/8 of a share)
        for seed, shape in enumerate([(67, 100), (13, 4100), (1, 36), (597, 36)]):
            weight = weight_24(shape, torch.float32, seed)
            packed = pack_nm(weight)
            for tokens in (1, 17):
                x = torch.randn(tokens, shape[1])
                y = cpu.packed_product(x, packed.values, packed.indices, serial_work=0)  # always through the pool
                assert mismatch(y, F.linear(x, weight)) is None, (shape, tokens)
        if torch.backends.openmp.is_available():  # the pool really runs: one piece per thread, not one in all
            assert built.module.parallel_pieces(8) == 2
            assert "-fopenmp" in cpu_build.dispatch_flags()
        big = pack_nm(weight_24((512, 1024), torch.float32, 9))  # 1.1 MB: above the one-thread size
        found = cpu.measure_crossover(big.values, big.indices, torch.float32)
        rechecked = kernel._work(big.values, big.indices, kernel.THREADS_RECHECK)
        assert found.serial_work in {kernel.SERIAL_WORK, rechecked, kernel.ONE_THREAD}
        assert "1 token: 2 threads" in found.how
        if built.module.evict(torch.ones(1)):  # timed as a model's forward finds a weight: flushed from the caches
            assert "weight flushed from the caches" in found.how
        # above THREAD_PROBE_FLUSH_BYTES a weight is timed as it lies (flushing it would cost more than the timing)
        monkeypatch.setattr(kernel, "THREAD_PROBE_FLUSH_BYTES", big.values.numel() * 4 - 1)
        assert kernel._thread_timings(big.values, big.indices, torch.float32, 1)[2] is False
        # where threads lost at one token they were timed again at THREADS_RECHECK tokens, and that decided
        assert (found.serial_work != kernel.SERIAL_WORK) == (f"{kernel.THREADS_RECHECK} tokens: 2 threads" in found.how)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("alone_at_1", "alone_at_recheck", "expected"),
    [
        (0.95, None, "pool"),  # one thread faster, but within the margin: the pool keeps the shape
        (0.85, 0.95, "recheck"),  # one thread clearly faster at one token, not at THREADS_RECHECK tokens
        (0.85, 0.85, "one thread"),  # clearly faster at both
    ],
)
def test_a_shape_leaves_the_pool_only_where_one_thread_wins_by_the_margin(
    monkeypatch: pytest.MonkeyPatch, alone_at_1: float, alone_at_recheck: float | None, expected: str
) -> None:
    """The decision rule of the threads probe, its timings stubbed (pooled 1.0 at every count): a shape keeps off
    torch's threads only where the calling thread took under ONE_THREAD_MARGIN of the pooled time."""
    timed: list[int] = []

    def timings(
        values: torch.Tensor, codes: torch.Tensor, x_dtype: torch.dtype, tokens: int
    ) -> tuple[float, float | None, bool]:
        timed.append(tokens)
        return 1.0, alone_at_1 if tokens == 1 else alone_at_recheck, True

    monkeypatch.setattr(kernel, "_thread_timings", timings)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    packed = pack_nm(weight_24((512, 1024), torch.float32, 3))  # 1.1 MB: above the one-thread size
    notes: list[str] = []
    work = kernel._measure_threads(packed.values, packed.indices, torch.float32, notes)
    rechecked = kernel._work(packed.values, packed.indices, kernel.THREADS_RECHECK)
    assert work == {"pool": kernel.SERIAL_WORK, "recheck": rechecked, "one thread": kernel.ONE_THREAD}[expected]
    assert timed == ([1] if expected == "pool" else [1, kernel.THREADS_RECHECK])
    assert all("weight flushed from the caches" in note for note in notes)


def test_the_environment_variable_forces_the_scalar_kernel(
    monkeypatch: pytest.MonkeyPatch, built: cpu_build.Built
) -> None:
    monkeypatch.setenv("SECATEURS_CPU_ISA", "scalar")
    worker_side.configure_cpu_kernel(Settings())
    try:
        layer = PackedLinear.from_dense(weight_24((13, 36), torch.float32, 5))
        x = torch.randn(2, 36)
        assert mismatch(layer(x), F.linear(x, layer.dense_weight())) is None
        assert layer.last_path == cpu.KERNEL_NAME and cpu.isa_in_use() == "scalar"
        assert "instruction set scalar (forced" in cpu.describe().detail
    finally:
        cpu.configure(build_dir=KERNEL_DIR, isa="auto")


def test_auto_takes_the_best_instruction_set_this_cpu_runs(built: cpu_build.Built) -> None:
    assert cpu.ensure() and cpu.isa_in_use() == built.module.isas_runnable()[-1]
    assert "chosen from the CPU's flags" in cpu.describe().detail


def test_a_forced_instruction_set_the_cpu_lacks_is_refused_with_what_it_has() -> None:
    fake = SimpleNamespace(
        module=SimpleNamespace(isas_runnable=lambda: ["scalar", "avx2"], cpu_flags=lambda: ["avx2", "fma"]),
        isas=("scalar", "avx2", "avx512", "avx512bf16"),
    )
    with pytest.raises(cpu.CpuKernelError, match=r"avx512 CPU kernel was requested.*lacks avx512f, avx512bw"):
        kernel._choose_isa(fake, "avx512")  # type: ignore[arg-type]
    with pytest.raises(cpu.CpuKernelError, match="request one of: auto, scalar, avx2"):
        kernel._choose_isa(fake, "avx512bf16")  # type: ignore[arg-type]
    with pytest.raises(cpu.CpuKernelError, match="unknown CPU instruction set"):
        cpu.configure(isa="neon")  # type: ignore[arg-type]
    amx_flags = list(kernel._ISA_NEEDS["amx"])  # every flag there, yet not runnable: the OS refused the tile state
    refused = SimpleNamespace(
        module=SimpleNamespace(isas_runnable=lambda: ["scalar", "avx512"], cpu_flags=lambda: amx_flags),
        isas=tuple(kernel.ISAS),
    )
    with pytest.raises(cpu.CpuKernelError, match="did not grant this process the AMX tile state"):
        kernel._choose_isa(refused, "amx")  # type: ignore[arg-type]


def test_the_worker_side_passes_the_settings_down_and_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, built: cpu_build.Built, tmp_path: Path
) -> None:
    assert Settings(cache_dir=tmp_path, kernel_dir=None).kernel_build_dir == tmp_path / "kernels"
    seen: dict[str, object] = {}
    monkeypatch.setattr(cpu, "configure", lambda **kwargs: seen.update(kwargs))
    worker_side.configure_cpu_kernel(Settings(kernel_dir=tmp_path / "k", cpu_isa="auto"))
    assert seen == {"build_dir": tmp_path / "k", "isa": "auto"}

    def refuse() -> bool:
        raise cpu.CpuKernelError("the avx512 CPU kernel was requested, but this CPU lacks avx512f")

    monkeypatch.setattr(cpu, "ensure", refuse)
    with pytest.raises(DeviceError, match="lacks avx512f") as caught:
        worker_side.configure_cpu_kernel(Settings(cpu_isa="avx512"))
    assert "SECATEURS_CPU_ISA" in (caught.value.hint or "")


# --- What the kernel takes and declines -------------------------------------------------------------------------


def test_inputs_of_any_leading_shape_and_layout(built: cpu_build.Built) -> None:
    weight, bias = weight_24((13, 36), torch.float32, 1), torch.randn(13)
    layer = PackedLinear.from_dense(weight, bias)
    for x in (torch.randn(36), torch.randn(3, 4, 36), torch.randn(4, 3, 36).transpose(0, 1), torch.randn(0, 36)):
        y = layer(x)
        assert y.shape == (*x.shape[:-1], 13) and layer.last_path == cpu.KERNEL_NAME
        assert mismatch(y, F.linear(x, weight, bias)) is None


def test_the_kernel_declines_what_it_does_not_compute(built: cpu_build.Built) -> None:
    weight = weight_24((8, 16), torch.float16, 0)
    layer = PackedLinear.from_dense(weight)
    layer(torch.randn(2, 16).half())
    assert layer.last_path == REFERENCE_PATH  # fp16: not a dtype of this kernel
    layer = PackedLinear.from_dense(weight_24((8, 16), torch.float32, 0))
    x = torch.randn(2, 16, requires_grad=True)
    layer(x).sum().backward()  # autograd: the reference forward has a backward, the kernel none
    assert layer.last_path == REFERENCE_PATH and x.grad is not None
    one_of_eight = PackedLinear.from_dense(torch.eye(8, 16), n=1, m=8)
    one_of_eight(torch.randn(2, 16))
    assert one_of_eight.last_path == REFERENCE_PATH  # 1:8 is packed, but the kernel computes 2:4


def test_the_bound_call_repeats_the_dispatch_and_declines_what_it_would_not_decide_alike(
    built: cpu_build.Built,
) -> None:
    """After a kernel call, a layer's next calls go through the call the kernel bound (no dispatch); it gives the
    same output, and any input the dispatch would treat differently goes back through the dispatch."""
    weight, bias = weight_24((67, 100), torch.float32, 4), torch.randn(67)
    layer = PackedLinear.from_dense(weight, bias)
    x = torch.randn(1, 100)
    first = layer(x)
    assert layer.last_path == cpu.KERNEL_NAME and packing._FAST in layer.__dict__
    calls = []
    bound = layer.__dict__[packing._FAST]
    layer.__dict__[packing._FAST] = (bound[0], lambda x: calls.append(x) or bound[1](x), bound[2])
    assert torch.equal(layer(x), first) and len(calls) == 1 and layer.last_path == cpu.KERNEL_NAME
    with pytest.raises(ValueError, match=r"width 20 .*in_features = 100"):
        layer(torch.randn(1, 20))  # the wrong width: declined, so the reference path's error, as for an unbound layer
    key = (67, 100, torch.float32, torch.float32, torch.get_num_threads(), cpu.isa_in_use())
    kernel._STATE.crossovers[key] = cpu.Crossover(3, "F.linear", "set by the test", 0.0, kernel.SERIAL_WORK, loses_at=4)
    try:
        layer = PackedLinear.from_dense(weight, bias)
        layer(x)  # binds, with the crossover's 3 tokens as its limit
        five = torch.randn(5, 100)
        tiled = layer(five)
        assert mismatch(tiled, F.linear(five, weight, bias)) is None and layer.last_path == cpu.TILES_NAME
        bound = layer.__dict__[packing._FAST]  # the hand-over bound its own call
        assert bound[2] == cpu.TILES_NAME
        calls.clear()
        layer.__dict__[packing._FAST] = (bound[0], lambda x: calls.append(x) or bound[1](x), bound[2])
        assert torch.equal(layer(five), tiled) and len(calls) == 1 and layer.last_path == cpu.TILES_NAME
        assert torch.equal(layer(five.reshape(1, 5, 100)), tiled.reshape(1, 5, 67))  # leading dimensions kept
        assert torch.equal(layer(x), first) and layer.last_path == cpu.KERNEL_NAME  # the path is named again
        assert layer.__dict__[packing._FAST][2] == cpu.KERNEL_NAME  # 1 token: declined, the kernel bound again
        # An open crossover (no loss measured yet): the bound hand-over declines a count whose probe point is
        # unmeasured, so the dispatch measures that point first; counts past every probe point are decided.
        open_crossover = cpu.Crossover(3, "F.linear", "set by the test", 0.0, kernel.SERIAL_WORK)
        values, indices, _ = kernel._tensors(layer)
        call = kernel._bound_tiles(values, indices, bias, open_crossover, x_dtype=torch.float32, width=100, out=67)
        assert call(five) is None  # 5 tokens: probe point 8 unmeasured
        assert call(torch.tensor(1.0)) is None  # no last dimension: declined, not an error
        many = torch.randn(kernel.PROBE_TOKENS[-1] + 1, 100)
        assert mismatch(call(many), F.linear(many, weight, bias)) is None
    finally:
        del kernel._STATE.crossovers[key]
    y16 = layer(x.bfloat16())  # another dtype: the dispatch, which binds for bf16
    assert mismatch(y16, reference(x.bfloat16(), weight, bias)) is None
    needs_grad = x.clone().requires_grad_()
    layer(needs_grad).sum().backward()  # autograd: declined, the reference forward's backward runs
    assert layer.last_path == REFERENCE_PATH and needs_grad.grad is not None
    layer(x)
    assert layer.__dict__[packing._FAST][2] == cpu.KERNEL_NAME
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast: declined, the reference runs under it
        assert layer(x).dtype == torch.bfloat16 and layer.last_path == REFERENCE_PATH
    assert layer.__dict__[packing._FAST][1](torch.tensor(1.0)) is None  # no last dimension: declined, not an error
    threads = torch.get_num_threads()
    layer(x)
    with packing.only_packed_kernels():  # the registry changed: no bound call is tried
        assert torch.allclose(layer(x), first, atol=1e-5) and layer.last_path == REFERENCE_PATH
    torch.set_num_threads(threads + 1)  # another thread count: declined (the crossover is per thread count)
    try:
        before = layer.__dict__[packing._FAST]
        assert torch.equal(layer(x), first) and layer.__dict__[packing._FAST] is not before
    finally:
        torch.set_num_threads(threads)
    copied = copy.deepcopy(layer)  # a copy never calls through the original's tensors
    assert packing._FAST not in copied.__dict__
    copied.values.zero_()
    assert torch.equal(layer(x), first) and not torch.equal(copied(x), first)
    layer.to(torch.bfloat16)  # new tensors: the bound call is dropped
    assert packing._FAST not in layer.__dict__
    assert mismatch(layer(x.bfloat16()), reference(x.bfloat16(), weight.bfloat16(), bias.bfloat16())) is None


def test_bad_arguments_raise_instead_of_crashing(built: cpu_build.Built) -> None:
    packed = pack_nm(weight_24((8, 16), torch.float32, 0))
    with pytest.raises(RuntimeError, match="do not hold 2 of every 4"):
        cpu.packed_product(torch.randn(2, 20), packed.values, packed.indices)
    with pytest.raises(RuntimeError, match="codes must be"):
        cpu.packed_product(torch.randn(2, 16), packed.values, packed.indices[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="bias must be"):
        cpu.packed_product(torch.randn(2, 16), packed.values, packed.indices, torch.randn(3))


# --- The hand-over above the measured crossover ------------------------------------------------------------------


def test_above_the_crossover_the_dense_tiles_run_and_agree(built: cpu_build.Built) -> None:
    weight, bias = weight_24((67, 100), torch.float32, 2), torch.randn(67)
    layer = PackedLinear.from_dense(weight, bias)
    x = torch.randn(5, 100)
    assert cpu.ensure()
    key = (67, 100, torch.float32, torch.float32, torch.get_num_threads(), cpu.isa_in_use())
    kernel._STATE.crossovers[key] = cpu.Crossover(3, "F.linear", "set by the test", 0.0, kernel.SERIAL_WORK, loses_at=4)
    try:
        assert mismatch(layer(x[:3]), F.linear(x[:3], weight, bias)) is None
        assert layer.last_path == cpu.KERNEL_NAME
        assert mismatch(layer(x), F.linear(x, weight, bias)) is None
        assert layer.last_path == cpu.TILES_NAME
    finally:
        del kernel._STATE.crossovers[key]


def test_a_crossover_the_budget_left_open_is_extended_by_the_call_that_needs_it(built: cpu_build.Built) -> None:
    """A first probe stopped by its budget while the kernel still won leaves the larger counts unmeasured: the first
    call of more tokens measures the probe point it needs (once; later calls look it up), and its result decides."""
    weight = weight_24((67, 100), torch.float32, 5)
    layer = PackedLinear.from_dense(weight)
    assert cpu.ensure()
    key = (67, 100, torch.float32, torch.float32, torch.get_num_threads(), cpu.isa_in_use())
    stopped = cpu.Crossover(64, "F.linear", "probe budget 0 s: 256 tokens not measured", 0.0, kernel.SERIAL_WORK)
    kernel._STATE.crossovers[key] = stopped
    try:
        assert "67x100 float32" in cpu.describe().detail and "larger counts not yet measured" in cpu.describe().detail
        x = torch.randn(100, 100)
        assert mismatch(layer(x), F.linear(x, weight)) is None
        found = kernel._STATE.crossovers[key]
        assert "at a first call of 100 tokens: 128: kernel" in found.how and found.how.startswith(stopped.how)
        assert (found.tokens, found.loses_at) in {(128, None), (64, 128)}  # the point 128 measured, one way or other
        assert layer.last_path == (cpu.KERNEL_NAME if found.tokens == 128 else cpu.TILES_NAME)
        assert mismatch(layer(x[:90]), F.linear(x[:90], weight)) is None
        assert kernel._STATE.crossovers[key] is found  # nothing measured again
        closed = cpu.Crossover(64, "F.linear", "closed", 0.0, kernel.SERIAL_WORK, loses_at=128)
        assert kernel.extend_crossover(closed, layer.values, layer.indices, torch.float32, 100) is closed
        assert kernel.extend_crossover(stopped, layer.values, layer.indices, torch.float32, 5000) is stopped  # > 1024
    finally:
        del kernel._STATE.crossovers[key]


@pytest.mark.parametrize(("w_dtype", "x_dtype"), [(w, x) for w in DTYPES for x in DTYPES])
@pytest.mark.parametrize("dense", ["F.linear", "oneDNN"])
@pytest.mark.parametrize("threads", [1, 2])
def test_dense_tiles_equal_the_dense_product(
    built: cpu_build.Built, w_dtype: torch.dtype, x_dtype: torch.dtype, dense: str, threads: int
) -> None:
    """One thread: tiles one after the other. Two: each thread its own tiles (``tiles_linear``), except fp32 on
    oneDNN, which keeps the sequence; with and without bias, x not contiguous, from 1-row tiles to one tile."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight, bias = weight_24((67, 100), w_dtype, 3), torch.randn(67).to(w_dtype)
        packed = pack_nm(weight)
        x = torch.randn(9, 200).to(x_dtype)[:, ::2]
        for tile_bytes in (1, 10 * 100 * 4, 1 << 20):  # the most tiles (1 row, or 9 under the cap), 10 rows, one
            for b in (bias, None):
                y = cpu.dense_tiles_product(x, packed.values, packed.indices, b, dense=dense, tile_bytes=tile_bytes)
                assert y.dtype == x_dtype and mismatch(y, reference(x, weight, b)) is None, (tile_bytes, b is None)
    finally:
        torch.set_num_threads(saved)


def test_the_hand_over_tile_follows_the_l2_and_the_threads(built: cpu_build.Built) -> None:
    """8 MiB tiles on one thread where a core's L2 holds 2 MiB, 2 MiB otherwise and with threads (measured,
    kernel.py); whatever the CPU reports, the description names the size in use."""
    saved = torch.get_num_threads()
    large_l2 = built.module.l2_bytes() >= kernel.LARGE_L2_BYTES
    try:
        torch.set_num_threads(1)
        assert kernel.hand_over_tile_bytes() == (kernel.TILE_BYTES_LARGE_L2 if large_l2 else kernel.TILE_BYTES)
        assert f"decompressed {kernel.hand_over_tile_bytes() >> 10} KiB" in kernel.describe_tiles().detail
        torch.set_num_threads(2)
        assert kernel.hand_over_tile_bytes() == kernel.TILE_BYTES
        # a weight of up to ONE_TILE_BYTES is one tile (SmolLM2's 3.4 MiB fp32 MLP weights: measured faster whole)
        whole = 1536 * 576 * 4
        assert kernel.hand_over_tile_bytes(whole) == whole
        assert kernel.tile_rows(1536, 576 * 4, kernel.hand_over_tile_bytes(whole)) == 1536
        assert kernel.hand_over_tile_bytes(kernel.ONE_TILE_BYTES + 1) == kernel.TILE_BYTES
        assert kernel.hand_over_tile_bytes(1 << 10) == kernel.TILE_BYTES  # smaller than a tile: one tile anyway
    finally:
        torch.set_num_threads(saved)


def test_the_work_size_is_counted_as_the_kernel_counts_it(built: cpu_build.Built) -> None:
    """_work mirrors dispatch.cpp's count (packed bytes + tokens × out × in/2): a serial_work just above a product's
    work keeps it on the calling thread, just at it lets the threads take it."""
    packed = pack_nm(weight_24((597, 68), torch.float32, 2))
    assert kernel._work(packed.values, packed.indices, 3) == 597 * (34 * 4 + 9) + 3 * 597 * 34
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(3, 68)
        work = kernel._work(packed.values, packed.indices, 3)
        for serial_work in (work, work + 1):  # both compute the same product, on the pool or on this thread
            y = cpu.packed_product(x, packed.values, packed.indices, serial_work=serial_work)
            assert mismatch(y, F.linear(x, unpack_nm(packed))) is None
    finally:
        torch.set_num_threads(threads)


def test_tiles_are_capped_in_number_only_with_threads() -> None:
    """One thread takes tiles of the asked size however many; more threads at most MAX_TILES (each tile's product is
    a parallel region that can wait on a descheduled thread), equal tiles in multiples of 16 rows."""
    row = 4096 * 4  # one fp32 row of 4096 inputs
    assert kernel.tile_rows(11008, row, 2 << 20, max_tiles=11008) == 128  # 86 tiles of 2 MiB
    assert kernel.tile_rows(11008, row, 2 << 20, max_tiles=8) == 1376  # 8 tiles of 22 MiB
    assert kernel.tile_rows(100, row, 1, max_tiles=100) == 1 and kernel.tile_rows(10, row, 1 << 30) == 10
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert kernel.tile_rows(11008, row, 2 << 20) == 128
        torch.set_num_threads(2)
        assert kernel.tile_rows(11008, row, 2 << 20) == 1376
    finally:
        torch.set_num_threads(threads)


def test_the_crossover_is_measured_quickly_and_reported(built: cpu_build.Built) -> None:
    packed = pack_nm(weight_24((192, 576), torch.float32, 4))
    found = cpu.measure_crossover(packed.values, packed.indices, torch.float32)
    assert found.tokens in {0, *kernel.PROBE_TOKENS} and found.dense in {"F.linear", "oneDNN"}
    assert found.seconds < 1.0 and "ms" in found.how  # what was timed, with the times
    no_time = cpu.measure_crossover(packed.values, packed.indices, torch.float32, budget_s=0.0)
    assert no_time.tokens <= kernel.ALWAYS_PROBED  # decode and small batches whatever the budget, nothing beyond
    assert no_time.tokens < kernel.ALWAYS_PROBED or "probe budget 0 s: 256 tokens not measured" in no_time.how
    layer = PackedLinear(packed)
    layer(torch.randn(2, 576))
    assert "192x576 float32" in cpu.describe().detail  # the first call measured this shape's crossover
    (entry,) = [c for c in cpu.measured_crossovers() if c["shape"] == [192, 576] and c["inputs"] == "float32"]
    assert entry["isa"] == cpu.isa_in_use() and entry["seconds"] < 1.0 and entry["how"]


@pytest.mark.parametrize("isa", ["avx512"], indirect=True)
@pytest.mark.parametrize("w_dtype", DTYPES, ids=lambda d: f"w-{str(d)[6:]}")
def test_the_long_row_prefetch_changes_nothing_but_speed(isa: str, w_dtype: torch.dtype) -> None:
    """The AVX-512 general kernel with and without its next-row prefetch on long rows (a row's values of 8 KiB or
    more: 4100 fp32 or 8200 bf16 inputs here; 600 inputs stay short) gives the same bits, equal to dense, at one token
    (the 8-row tile the choice applies to) and beyond; the setting is restored."""
    module = kernel._STATE.built.module  # type: ignore[union-attr]
    before = module.long_row_prefetch()
    shapes = [(37, 8200 if w_dtype == torch.bfloat16 else 4100), (19, 600)]
    assert shapes[0][1] // 2 * (2 if w_dtype == torch.bfloat16 else 4) >= module.long_row_bytes()
    try:
        outputs = []
        for on in (1, 0):
            module.set_long_row_prefetch(on)
            assert module.long_row_prefetch() == bool(on)
            failures = dense_mismatches(shapes, [1, 2, 5], w_dtype, torch.float32)
            assert not failures, "\n".join(failures)
            packed = pack_nm(weight_24(shapes[0], w_dtype, 7))
            x = torch.randn(1, shapes[0][1], generator=torch.Generator().manual_seed(3))
            outputs.append(cpu.packed_product(x, packed.values, packed.indices))
        assert torch.equal(outputs[0], outputs[1])
    finally:
        module.set_long_row_prefetch(int(before))


def test_the_long_row_prefetch_is_measured_once_and_reported(built: cpu_build.Built) -> None:
    """On AVX-512 the first layer with long rows measures the prefetch (the weight flushed from the caches before each
    call), sets the extension to the faster and the description says which with both times; shorter rows and other
    instruction sets measure nothing."""
    module = built.module
    before, saved = module.long_row_prefetch(), kernel._STATE.long_rows
    try:
        kernel._STATE.long_rows = None
        short = PackedLinear(pack_nm(weight_24((16, 576), torch.float32, 1)))
        short(torch.randn(1, 576))
        assert kernel._STATE.long_rows is None  # 576 inputs: short rows, nothing to measure
        if kernel.ISAS.index(cpu.isa_in_use() or "scalar") < kernel.ISAS.index("avx512"):
            assert "next-row prefetch" not in cpu.describe().detail
            pytest.skip(f"the {cpu.isa_in_use()} kernels have no long-row prefetch to choose")
        assert "next-row prefetch on long rows: on until measured" in cpu.describe().detail
        long = PackedLinear(pack_nm(weight_24((16, 4104), torch.float32, 2)))  # a shape no other test measures
        long(torch.randn(1, 4104))
        found = kernel._STATE.long_rows
        assert found is not None and found.how == "measured" and found.seconds < 2.0
        assert found.with_seconds and found.without_seconds and module.long_row_prefetch() == found.on
        assert found.on == (not found.without_seconds < found.with_seconds * kernel.LONG_ROW_MARGIN)
        assert f"next-row prefetch on long rows (>= 8 KiB of values a row) {'on' if found.on else 'off'}" in (
            cpu.describe().detail
        )
        assert module.evict(torch.ones(100))  # x86: the cache flush exists
        long(torch.randn(1, 4104))
        assert kernel._STATE.long_rows is found  # once per process and instruction set
    finally:
        kernel._STATE.long_rows = saved
        module.set_long_row_prefetch(int(before))


def test_the_tiles_take_the_dense_product_measured_where_they_run(
    built: cpu_build.Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the crossover the tiles multiply with the dense product measured faster at the smallest loss (the
    nearest count where they run), not at the last point the bisection timed (here a kernel win)."""

    def kernel_wins(probe: kernel._Probe, count: int) -> bool:  # the timings scripted: oneDNN faster below 256
        probe.dense = "F.linear" if count >= 256 else "oneDNN"
        probe.dense_at[count] = probe.dense
        return count < 256

    monkeypatch.setattr(kernel._Probe, "kernel_wins", kernel_wins)
    packed = pack_nm(weight_24((192, 576), torch.float32, 4))
    found = cpu.measure_crossover(packed.values, packed.indices, torch.float32, budget_s=60.0)
    assert (found.tokens, found.loses_at, found.dense) == (128, 256, "F.linear")  # 256 lost; 128, timed last, won


# --- The build: cache, and the fallback when it fails -------------------------------------------------------------


def test_the_cache_key_names_what_went_into_the_build(built: cpu_build.Built) -> None:
    assert built.folder.parent == KERNEL_DIR and (built.folder / "build.json").is_file()
    assert {"scalar"} <= set(built.isas) <= set(kernel.ISAS)
    key = cpu_build.cache_key(built.compiler)
    assert built.folder.name.endswith(key) and cpu_build.cache_key("g++ (another) 99.1") != key
    again = cpu_build.build(KERNEL_DIR)  # a second process finds it: no compiler run
    assert again.cached and again.folder == built.folder


def _fresh_state(monkeypatch: pytest.MonkeyPatch, build_dir: Path) -> None:
    monkeypatch.setattr(kernel, "_STATE", kernel._State(build_root=build_dir))


def test_no_compiler_one_log_line_and_the_reference_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _fresh_state(monkeypatch, tmp_path / "kernels")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    layer = PackedLinear.from_dense(weight_24((13, 36), torch.float32, 0))
    x = torch.randn(3, 36)
    with caplog.at_level(logging.INFO, logger="secateurs.kernels.sparse.cpu"):
        for _ in range(3):
            assert mismatch(layer(x), F.linear(x, layer.dense_weight())) is None
            assert layer.last_path == REFERENCE_PATH
    lines = [r for r in caplog.records if r.name.startswith("secateurs.kernels.sparse.cpu")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "no working C++ compiler" in lines[0].getMessage() and "reference path" in lines[0].getMessage()
    described = cpu.describe()
    assert not described.available and "no working C++ compiler" in described.detail


def test_a_failing_compile_leaves_its_output_in_a_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken-c++"
    broken.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo "broken c++ 1.0"; exit 0; fi\necho nope >&2\nexit 1\n'
    )
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    _fresh_state(monkeypatch, tmp_path / "kernels")
    monkeypatch.setenv("CXX", str(broken))
    with caplog.at_level(logging.WARNING, logger="secateurs.kernels.sparse.cpu"):
        assert not cpu.ensure()
    (line,) = [r.getMessage() for r in caplog.records if r.name.startswith("secateurs.kernels.sparse.cpu")]
    assert "compiling scalar.cpp failed" in line and "reference path" in line
    (log_file,) = (tmp_path / "kernels").glob("*.log")
    assert str(log_file) in line and "nope" in log_file.read_text()
    assert not [p for p in (tmp_path / "kernels").iterdir() if p.is_dir()]  # no half-built folder left behind


@pytest.mark.skipif(sys.platform != "linux", reason="file locks and the build as on the CI machine")
def test_a_concurrent_build_waits_for_the_lock_and_finds_the_build(built: cpu_build.Built, tmp_path: Path) -> None:
    # A second process asking for the same build while the first holds the lock: it waits, then loads the result.
    name = built.folder.name
    import fcntl
    import subprocess

    lock = (KERNEL_DIR / f"{name}.lock").open("a+")
    fcntl.flock(lock, fcntl.LOCK_EX)
    code = (
        "import sys; from pathlib import Path; from secateurs.kernels.sparse.cpu import build; "
        f"b = build.build(Path({str(KERNEL_DIR)!r})); print(b.cached, b.folder.name)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""}
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=3)  # blocked on the lock
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    output, _ = process.communicate(timeout=120)
    assert output.split() == ["True", name]


# --- The speed sweep's path ----------------------------------------------------------------------------------------


def test_the_sweep_gates_and_times_the_cpu_path(built: cpu_build.Built) -> None:
    (path,) = [p for p in sparse_paths() if p.name == cpu.KERNEL_NAME]
    assert path.unavailable(torch.device("cpu"), torch.float32) is None
    assert "needs" not in path.description and "instruction set" in path.description
    assert path.unavailable(torch.device("cpu"), torch.float16) is not None
    assert path.unsupported((8, 16), torch.float32, SparsityPattern.nm(1, 4)) is not None
    quick = SpeedSettings(token_counts=(1, 16), warmup=1, repetitions=3, end_to_end=False)
    for dtype in DTYPES:
        for point in sweep_linear({(67, 100): 1}, SparsityPattern.nm(2, 4), dtype, torch.device("cpu"), quick,
                                  paths=[path]):  # fmt: skip
            (result,) = point.paths
            assert result.status == "measured" and result.timing is not None, result.reason
