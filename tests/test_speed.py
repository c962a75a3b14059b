"""The speed step: its report on CPU, the correctness gate before any timing, the registry of sparse paths, the
physical limits, the CLI flag, and (marked gpu) the semi-structured and packed paths against dense on CUDA."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from secateurs.app.cli import spec_from_options, spec_options
from secateurs.app.schemas import JobSpec, Report, SpeedReport
from secateurs.kernels.measure.speed import (
    PackedReferencePath,
    SemiStructuredPath,
    SparsePath,
    SpeedSettings,
    linear_limit,
    measure_end_to_end,
    mismatch,
    peaks_for,
    register_sparse_path,
    sparse_paths,
    summarize,
    sweep_linear,
    unregister_sparse_path,
)
from secateurs.kernels.patterns import SparsityPattern
from secateurs.kernels.pruning.driver import PruneConfig, plan_layers, prune_model_
from secateurs.kernels.sparse import cpu as cpu_kernel
from secateurs.kernels.sparse.packing import (
    KernelDescription,
    PackedLinear,
    only_packed_kernels,
    register_packed_kernel,
    unregister_packed_kernel,
)
from secateurs.workers.pipeline import run_job
from secateurs.workers.speed import (
    cpu_cache_bytes,
    cpu_isa,
    decode_speedup,
    default_settings,
    run_speed_step,
    speed_enabled,
)
from tests.models import tiny_model, tiny_model_dir

PATTERN = SparsityPattern.nm(2, 4)
CPU = torch.device("cpu")
QUICK = SpeedSettings(
    token_counts=(1, 16),
    warmup=1,
    repetitions=3,
    prefill=((1, 16), (2, 24)),
    decode_batches=(1, 2),
    decode_prompt=8,
    decode_new_tokens=4,
    e2e_warmup=1,
    e2e_repetitions=2,
)


class CountingLinear(nn.Module):
    """y = x (scale·W)ᵀ + b, counting its calls: scale 1 is correct, anything else is a wrong kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, calls: list[int]) -> None:
        super().__init__()
        self.weight, self.bias, self.scale, self.calls = weight, bias, scale, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(1)
        return F.linear(x, self.weight * self.scale, self.bias)


class ScaledPath(SparsePath):
    """A test path; ``scale=1.1`` is deliberately wrong by 10%."""

    def __init__(self, name: str, scale: float) -> None:
        self.name, self.description, self.scale = name, f"F.linear with W x {scale}", scale
        self.calls: list[int] = []

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsityPattern) -> nn.Module:
        return CountingLinear(weight, bias, self.scale, self.calls)


class RaisingPath(ScaledPath):
    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsityPattern) -> nn.Module:
        raise RuntimeError("this kernel does not exist")


@pytest.fixture
def wrong() -> Iterator[ScaledPath]:
    """A deliberately wrong path, registered like any new kernel would be."""
    path = ScaledPath("wrong_by_10_percent", 1.1)
    register_sparse_path(path)
    try:
        yield path
    finally:
        unregister_sparse_path(path.name)


def pruned_tiny(arch: str = "llama") -> tuple[nn.Module, list[str]]:
    model = tiny_model(arch).eval()
    prune_model_(model, None, PruneConfig(method="magnitude"))
    _, _, per_block = plan_layers(model, PruneConfig(method="magnitude"))
    return model, [layer.name for layers in per_block for layer in layers]


# --- The report on CPU ----------------------------------------------------------------------------------------


def test_the_cpu_report_shows_only_what_was_measured_and_says_there_is_no_2_4_hardware() -> None:
    model, names = pruned_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = run_speed_step(model, names, PATTERN, CPU, settings=QUICK)
    assert SpeedReport.model_validate_json(report.model_dump_json()) == report
    conditions = report.conditions
    assert conditions.device == "cpu" and not conditions.sparse_hardware and conditions.torch == torch.__version__
    assert "no 2:4 sparse hardware" in conditions.sparse_hardware_note and conditions.threads >= 1
    assert any("no 2:4 hardware path ran here" in note for note in report.notes)
    assert report.dtype == "float32" and report.runtime_mode == "eager" and report.settings["token_counts"] == [1, 16]
    paths = {p.name: p for p in report.paths}
    assert not paths["semi_structured_cusparselt"].available and "CUDA" in (
        paths["semi_structured_cusparselt"].reason or ""
    )
    assert paths["packed_reference"].available
    # Every distinct linear shape of the model, at every token count.
    shapes = {(64, 64), (32, 64), (256, 64), (64, 256)}  # q/o, k/v (2 KV heads), gate/up, down
    assert {(p.shape, p.tokens) for p in report.linear} == {(s, t) for s in shapes for t in (1, 16)}
    assert sum(p.layers for p in report.linear if p.tokens == 1) == len(names)
    for point in report.linear + [e for e in report.end_to_end if e.status == "measured"]:
        assert point.dense is not None and point.dense.repetitions > 0 and point.dense.timer == "perf_counter"
        assert (
            point.dense.min_ms <= point.dense.q1_ms <= point.dense.median_ms <= point.dense.q3_ms <= point.dense.max_ms
        )
        assert point.physical_limit is not None and point.limit_basis
        for result in point.paths:
            if result.status == "measured":
                assert result.path in {"packed_reference", "cpu_packed"} and result.timing is not None
                assert result.speedup is not None and result.fraction_of_limit is not None
            else:  # never a number for something that did not run
                assert result.status == "unavailable" and result.reason
                assert result.timing is None and result.speedup is None and result.fraction_of_limit is None
    kinds = [(e.kind, e.batch, e.status) for e in report.end_to_end]
    assert kinds == [
        ("prefill", 1, "measured"),
        ("prefill", 2, "measured"),
        ("decode", 1, "measured"),
        ("decode", 2, "measured"),
    ]
    decode = report.end_to_end[2]
    assert decode.new_tokens == 4 and decode.dense_tokens_per_second and decode.physical_limit
    assert 1.7 < decode.physical_limit < 16 / 9 + 0.2 and report.end_to_end[0].physical_limit <= 2
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # left as it came


def test_the_dense_side_is_the_faster_of_f_linear_and_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per layer the dense product is timed as F.linear and, in fp32 on CPU where oneDNN exists, as oneDNN's; the
    faster median is the baseline (each computes the same product)."""
    from secateurs.kernels import matmul
    from secateurs.kernels.measure import speed as speed_module

    weights, inputs = [torch.randn(8, 16)], [torch.randn(3, 16)]
    outputs, medians = [], iter([2.0, 1.0])

    def fake_time_calls(call: Any, device: torch.device, **kwargs: Any) -> Any:
        outputs.append(call(0))
        return dataclasses.replace(real(lambda i: None, device, warmup=0, repetitions=1), median_ms=next(medians))

    real = speed_module.time_calls
    monkeypatch.setattr(speed_module, "time_calls", fake_time_calls)
    settings = dataclasses.replace(default_settings(torch.device("cpu"), torch.float32, []), warmup=0, repetitions=1)
    timing = speed_module._dense_timing(weights, inputs, torch.device("cpu"), settings)
    if matmul._onednn_linear_op() is None:
        assert len(outputs) == 1 and timing.median_ms == 2.0
        return
    assert len(outputs) == 2 and timing.median_ms == 1.0  # F.linear, then oneDNN: the faster kept
    for y in outputs:
        torch.testing.assert_close(y, F.linear(inputs[0], weights[0]))
    outputs.clear()
    medians = iter([2.0])
    speed_module._dense_timing(
        [w.bfloat16() for w in weights], [x.bfloat16() for x in inputs], torch.device("cpu"), settings
    )
    assert len(outputs) == 1  # 16-bit: F.linear only


def test_end_to_end_points_the_model_cannot_hold_are_skipped_with_the_reason() -> None:
    model, names = pruned_tiny("gpt2")
    results = measure_end_to_end(
        model, names, PATTERN, SpeedSettings(prefill=((1, 512),), decode_batches=(), e2e_repetitions=1)
    )
    assert [(r.status, r.reason) for r in results] == [("skipped", "needs 512 positions, the model has 64")]
    assert results[0].dense is None and not results[0].paths


def test_end_to_end_dense_and_the_first_path_alternate_repetition_by_repetition() -> None:
    """Each model forward records which side sits in the model: with interleaving, dense and the first path take
    turns run by run (warm-up included) on every plan, later paths run after them; without it, dense runs first."""
    model, names = pruned_tiny()
    first, second = ScaledPath("first_path", 1.0), ScaledPath("second_path", 1.0)
    order: list[str] = []

    def record(module: nn.Module, args: Any, kwargs: Any) -> None:
        layer = model.get_submodule(names[0])
        side = "dense"
        if isinstance(layer, CountingLinear):
            side = "first" if layer.calls is first.calls else "second"
        if not order or order[-1] != side:
            order.append(side)

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        settings = dataclasses.replace(QUICK, prefill=((1, 16),), decode_batches=(1,))
        results = measure_end_to_end(model, names, PATTERN, settings, [first, second])
        runs = settings.e2e_warmup + settings.e2e_repetitions
        assert order[: 4 * runs] == ["dense", "first"] * (2 * runs)  # prefill's runs, then decode's
        assert set(order[4 * runs :]) == {"second"}
        assert all(r.dense is not None and r.dense.repetitions == settings.e2e_repetitions for r in results)
        assert all(p.status == "measured" for r in results for p in r.paths)
        order.clear()
        measure_end_to_end(model, names, PATTERN, dataclasses.replace(settings, e2e_interleaved=False), [first])
        assert order == ["dense", "first"]  # every dense run first, then the path's
    finally:
        handle.remove()
    assert not any(isinstance(m, CountingLinear) for m in model.modules())  # the swaps were undone


# --- The correctness gate -------------------------------------------------------------------------------------


def test_a_wrong_sparse_path_is_reported_failed_and_never_timed(wrong: ScaledPath) -> None:
    settings = SpeedSettings(token_counts=(1, 16), warmup=2, repetitions=5)
    results = sweep_linear({(32, 64): 1, (64, 128): 1}, PATTERN, torch.float32, CPU, settings)
    for point in results:
        (result,) = [r for r in point.paths if r.path == wrong.name]
        assert result.status == "failed" and result.timing is None and result.speedup is None
        assert "differs from dense-with-zeros" in (result.reason or "") and "Mismatched elements" in (
            result.reason or ""
        )
        (reference,) = [r for r in point.paths if r.path == "packed_reference"]
        assert reference.status == "measured"
    assert len(wrong.calls) == len(results)  # one failed check per point; warm-up and repetitions never ran


def test_a_wrong_path_is_also_caught_before_end_to_end_timing(wrong: ScaledPath) -> None:
    model, names = pruned_tiny()
    results = measure_end_to_end(model, names, PATTERN, QUICK, [wrong, PackedReferencePath()])
    for point in results:
        failed, reference = point.paths
        assert failed.status == "failed" and failed.timing is None and names[0] in (failed.reason or "")
        assert reference.status == "measured" and reference.tokens_per_second
    assert len(wrong.calls) == 1  # the first layer's gate; the model was never run with it


def test_a_correct_new_path_plugs_in_without_schema_changes() -> None:
    exact = ScaledPath("exact_copy", 1.0)
    register_sparse_path(exact)
    try:
        assert exact in sparse_paths()
        model, names = pruned_tiny()
        report = run_speed_step(model, names, PATTERN, CPU, settings=QUICK)
    finally:
        unregister_sparse_path(exact.name)
    assert exact not in sparse_paths()
    assert {p.name for p in report.paths} >= {"exact_copy", "packed_reference"}
    for point in report.linear:
        (result,) = [r for r in point.paths if r.path == "exact_copy"]
        assert result.status == "measured" and result.timing is not None and result.speedup


def test_a_path_that_raises_is_reported_as_an_error_and_not_timed() -> None:
    path = RaisingPath("raises", 1.0)
    results = sweep_linear({(32, 64): 1}, PATTERN, torch.float32, CPU, QUICK, paths=[path])
    assert all(r.paths[0].status == "error" and "does not exist" in (r.paths[0].reason or "") for r in results)
    assert all(r.paths[0].timing is None for r in results)


def test_the_gate_tolerance_follows_the_dtype() -> None:
    expected = torch.randn(64, 128)
    assert mismatch(expected.clone(), expected) is None
    assert mismatch(expected * (1 + 1e-4), expected) is not None  # fp32: 1e-4 is far off
    half = expected.to(torch.bfloat16)
    assert mismatch((half.float() * (1 + 4e-3)).to(torch.bfloat16), half) is None  # within one bf16 step
    assert mismatch(half * 1.1, half) is not None


# --- Limits, statistics, the step's switch and the flag -------------------------------------------------------


def test_physical_limits_follow_guide_section_3() -> None:
    h100 = peaks_for("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert h100 is not None and h100.bandwidth == 3.35e12
    decode, basis = linear_limit(1, (4096, 4096), torch.bfloat16, PATTERN, h100)
    assert decode == pytest.approx(16 / 9, rel=2e-3) and "memory-bound" in basis
    prefill, basis = linear_limit(2048, (11008, 4096), torch.bfloat16, PATTERN, h100)
    assert prefill == pytest.approx(2.0) and "compute-bound" in basis
    unknown, basis = linear_limit(1, (4096, 4096), torch.float32, PATTERN, None)
    assert unknown == 2.0 and "no datasheet peaks" in basis
    assert peaks_for("NVIDIA H100 80GB HBM3", torch.float32) is None


def test_timing_statistics() -> None:
    timing = summarize([5.0, 1.0, 3.0, 2.0, 4.0], warmup=2, rotation=3, timer="perf_counter")
    assert (timing.min_ms, timing.q1_ms, timing.median_ms, timing.q3_ms, timing.max_ms) == (1, 2, 3, 4, 5)
    assert timing.repetitions == 5 and timing.warmup == 2 and timing.rotation == 3


def test_the_step_is_on_by_default_everywhere() -> None:
    spec = JobSpec(model="m", method="magnitude")
    assert speed_enabled(spec, CPU) and speed_enabled(spec, torch.device("cuda"))
    assert speed_enabled(JobSpec(model="m", method="magnitude", measure_speed=True), CPU)
    assert not speed_enabled(JobSpec(model="m", method="magnitude", measure_speed=False), torch.device("cuda"))


def test_the_cpu_default_is_the_short_sweep() -> None:
    settings = default_settings(CPU, torch.float32, sparse_paths())
    assert settings.token_counts == (1, 16) and settings.prefill == ((1, 512),) and settings.decode_batches == (1,)
    assert settings.repetitions >= 20 and settings.rotation_bytes >= cpu_cache_bytes()
    # None: every path end to end; with the CPU kernel available, it alone (the reference is not run e2e)
    assert settings.e2e_paths is None or (settings.e2e_paths and "packed_reference" not in settings.e2e_paths)
    exact = ScaledPath("exact_copy", 1.0)  # a path faster than the reference exists: the reference is not run e2e
    assert default_settings(CPU, torch.float32, [exact, PackedReferencePath()]).e2e_paths == ("exact_copy",)
    isa = cpu_isa()
    assert isa is None or isa.strip()


@pytest.mark.parametrize(("flag", "value"), [([], None), (["--measure-speed"], True), (["--no-measure-speed"], False)])
def test_the_measure_speed_flag(flag: list[str], value: bool | None) -> None:
    seen: list[JobSpec] = []

    @click.command()
    @spec_options
    def command(**options: Any) -> None:
        seen.append(spec_from_options(options))

    result = CliRunner().invoke(command, ["some/model", "--method", "magnitude", *flag])
    assert result.exit_code == 0, result.output
    assert seen[0].measure_speed is value


@pytest.fixture(scope="module")
def default_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, Path, dict[str, str]]:
    """A tiny llama job with the speed step left at its default: (report, output folder, the spec's fields)."""
    base = {
        "model": str(tiny_model_dir("llama", tmp_path_factory.mktemp("tiny"))),
        "method": "magnitude",
        "device": "cpu",
    }
    out = tmp_path_factory.mktemp("default") / "on"
    return run_job(JobSpec(**base), output_dir=out), out, base  # type: ignore[arg-type]


def test_run_job_measures_speed_by_default_and_leads_with_the_decode_speedup(
    default_job: tuple[Report, Path, dict[str, str]], tmp_path: Path
) -> None:
    # The CLI and the job store (SQLAlchemy) are imported here, not at the top: the GPU check runs this module's
    # gpu tests on a machine that has neither (benchmarks/gpu_check.py carries only what those need).
    from secateurs.workers.cli import decode_text
    from secateurs.workers.jobs import summary

    report, out, base = default_job
    speed, decode = report.speed, report.decode
    assert speed is not None and speed.seconds is not None and speed.linear
    assert speed.settings["token_counts"] == [1, 16] and speed.conditions.isa == cpu_isa()
    # The tiny model has 64 positions: the decode prompt shrinks to fit, the 512-token prefill is skipped.
    assert [(e.kind, e.status) for e in speed.end_to_end] == [("prefill", "skipped"), ("decode", "measured")]
    # The CPU kernel where it built (CI, and any machine with a compiler); the decompressing reference otherwise.
    kernel_runs = cpu_kernel.describe().available
    assert decode is not None and decode.measured
    assert decode.path == ("cpu_packed" if kernel_runs else "packed_reference")
    assert set(decode.kernels) <= ({"cpu_packed", "cpu_dense_tiles"} if kernel_runs else {"reference"})
    assert decode.batch == 1 and decode.prompt_tokens + decode.new_tokens <= 64
    assert decode.speedup == speed.end_to_end[1].paths[-1].speedup and decode.dense_tokens_per_second
    assert decode.device == "cpu" and decode.dtype == "float32" and decode.threads == torch.get_num_threads()
    assert decode.isa == cpu_isa() and decode.torch == torch.__version__ and decode.repetitions
    saved = (out / "report.json").read_text()
    assert Report.model_validate_json(saved) == report
    assert next(iter(json.loads(saved))) == "format" and list(json.loads(saved))[1] == "decode"  # it leads
    line = decode_text(json.loads(saved))  # the CLI summary's first row
    assert line.startswith(f"{decode.speedup:.2f}x dense (sparse ") and f"path {decode.path} -> " in line
    assert summary(report).decode == decode  # the job's REST result leads with it too

    off = run_job(JobSpec(**base, measure_speed=False), output_dir=tmp_path / "off")  # type: ignore[arg-type]
    assert off.speed is None and off.decode is not None and not off.decode.measured
    assert "turned off" in (off.decode.reason or "") and off.decode.speedup is None and off.decode.device == "cpu"
    assert decode_text(off.model_dump(mode="json")).startswith("not measured: turned off for this job")
    unstructured = run_job(JobSpec(**base, pattern="0.5"), output_dir=tmp_path / "unstructured")  # type: ignore[arg-type]
    assert unstructured.speed is None and "unstructured" in (unstructured.decode.reason or "")  # type: ignore[union-attr]


def test_reports_written_before_the_decode_summary_stay_readable(
    default_job: tuple[Report, Path, dict[str, str]],
) -> None:
    old = json.loads(default_job[0].model_dump_json())
    del old["decode"], old["speed"]["conditions"]["isa"]
    for run in old["speed"]["end_to_end"]:
        for result in run["paths"]:
            del result["kernels"]
    legacy = Report.model_validate(old)
    assert legacy.decode is None and legacy.speed is not None and legacy.speed.conditions.isa is None
    assert Report.model_validate({**old, "speed": None}).speed is None


class _ExactKernel:
    """A packed kernel (for PackedLinear) that computes from the dense weight and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        self.calls += 1
        return F.linear(x, layer.dense_weight(), layer.bias)


class _KernelPath(PackedReferencePath):
    """PackedLinear with its registered kernels on: what ``secateurs.load`` runs."""

    name = "packed_kernels"

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, pattern: SparsityPattern) -> nn.Module:
        module = super().build(weight, bias, pattern)
        assert isinstance(module, PackedLinear)
        module.use_kernels = True
        return module


def test_the_decode_summary_names_the_fastest_path_and_the_kernels_that_ran() -> None:
    kernel = _ExactKernel()
    register_packed_kernel(
        "exact_kernel", kernel, lambda: KernelDescription("exact_kernel", True, "test ISA, 1 thread")
    )
    try:
        model, names = pruned_tiny()
        settings = dataclasses.replace(QUICK, prefill=(), decode_batches=(1,), e2e_paths=("packed_kernels",))
        with only_packed_kernels("exact_kernel"):
            report = run_speed_step(
                model, names, PATTERN, CPU, settings=settings, paths=[PackedReferencePath(), _KernelPath()]
            )
            decode = decode_speedup(report)  # while the kernel is registered: it describes itself
    finally:
        unregister_packed_kernel("exact_kernel")
    (run,) = report.end_to_end
    reference, kernels = run.paths
    assert reference.status == "skipped" and reference.timing is None
    assert "not timed end to end" in (reference.reason or "")
    assert kernels.status == "measured" and kernels.kernels == ["exact_kernel"] and kernel.calls
    assert decode.measured and decode.path == "packed_kernels" and decode.kernels == ["exact_kernel"]
    assert decode.kernel_details == ["exact_kernel: test ISA, 1 thread"] and decode.speedup == kernels.speedup
    failed = report.model_copy(deep=True)
    failed.end_to_end[0].paths = [p.model_copy(update={"status": "failed", "speedup": None}) for p in run.paths]
    missing = decode_speedup(failed)
    assert not missing.measured and "no sparse path ran end to end" in (missing.reason or "")


# --- On a GPU -------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "path", [SemiStructuredPath("cusparselt"), SemiStructuredPath("cutlass"), PackedReferencePath()]
)
def test_gpu_paths_equal_dense_with_zeros(path: SparsePath, dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    reason = path.unavailable(device, dtype)
    if reason is not None:
        pytest.skip(reason)
    g = torch.Generator(device=device).manual_seed(0)
    for shape in [(128, 256), (576, 1536), (1536, 576)]:
        weight = torch.randn(shape, generator=g, device=device) * 0.02
        weight = torch.where(_keep_two(weight), weight, 0.0).to(dtype)  # [out, in], exactly 2:4
        bias = torch.randn(shape[0], generator=g, device=device).to(dtype)
        module = path.build(weight, bias, PATTERN)
        for tokens in (1, 16, 128):
            x = torch.randn(tokens, shape[1], generator=g, device=device).to(dtype)
            assert mismatch(module(x), F.linear(x, weight, bias)) is None, (path.name, shape, tokens)


def _keep_two(weight: torch.Tensor) -> torch.Tensor:
    """Keep the two largest |w| of every group of 4 (exactly 2:4)."""
    groups = weight.abs().reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(weight.shape)


@pytest.mark.gpu
@needs_cuda
def test_gpu_sweep_measures_the_hardware_path() -> None:
    device = torch.device("cuda")
    settings = SpeedSettings(token_counts=(1, 128), warmup=3, repetitions=10)
    results = sweep_linear({(1536, 576): 2}, PATTERN, torch.bfloat16, device, settings)
    for point in results:
        assert point.dense.timer == "cuda_events"
        statuses = {r.path: r.status for r in point.paths}
        assert statuses["packed_reference"] == "measured"
        if torch.cuda.get_device_capability(device) >= (8, 0) and torch.backends.cusparselt.is_available():
            assert statuses["semi_structured_cusparselt"] == "measured", point.paths


def test_the_cpu_name_carries_family_and_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A cloud VM's model name ("AMD EPYC") does not tell a Zen 3 from a Zen 5: every report names the family and
    model numbers beside it, read from the first processor's block of /proc/cpuinfo."""
    from secateurs.workers import speed as worker_speed

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n"
        "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 1\nmodel name\t: other\n",
        encoding="utf-8",
    )
    real_open = open
    monkeypatch.setattr(worker_speed, "open", lambda path, *a, **k: real_open(info, *a, **k), raising=False)
    assert worker_speed.cpu_name() == "AMD EPYC (family 25, model 17)"
    info.write_text("model name\t: Some CPU\n", encoding="utf-8")
    assert worker_speed.cpu_name() == "Some CPU"
