"""``secateurs bench`` on a tiny pruned model: the same greedy generation through the dense and the packed model,
tokens/s of each with their ratio and conditions, token agreement, JSON on stdout, and options a user gets wrong
named with exit code 2; plus the token-by-token timing of ``generate`` it rests on."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from secateurs.app.cli import cli
from secateurs.app.schemas import BenchReport, JobSpec
from secateurs.kernels import matmul
from secateurs.kernels.measure.decode import agreement, compare_greedy, greedy_generate
from secateurs.kernels.sparse.packing import (
    PackedLinear,
    only_packed_kernels,
    packed_kernels,
    register_packed_kernel,
    unregister_packed_kernel,
)
from secateurs.workers.packed import MANIFEST_NAME, PACKED_DIR
from secateurs.workers.pipeline import run_job
from tests.models import tiny_model_dir

QUICK = ["--device", "cpu", "--prompt-tokens", "8", "--new-tokens", "5", "--repetitions", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tiny_model_dir("llama", tmp_path_factory.mktemp("tiny"))
    folder = tmp_path_factory.mktemp("pruned") / "out"
    run_job(JobSpec(model=str(source), method="magnitude", device="cpu", measure_speed=False), output_dir=folder)
    return folder


def _bench(*args: str) -> tuple[int, str, str]:
    import secateurs.workers.cli  # noqa: F401  (registers the engine commands)

    result = CliRunner().invoke(cli, ["bench", *args])
    return result.exit_code, result.stdout, result.stderr


def test_bench_prints_the_speedup_and_its_conditions_first(out: Path) -> None:
    code, stdout, stderr = _bench(str(out), *QUICK)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("decode speedup ") and "x: packed " in lines[0] and "tokens/s, dense" in lines[0]
    ran = re.search(r"packed layers ran: (\w+) \(14 layers\)", stdout)  # the fastest registered kernel, or reference
    assert ran is not None and ran.group(1) in {*packed_kernels(), "reference"}
    assert "device: cpu (" in stdout and "threads, float32, torch" in stdout
    assert "batch 1, 8 prompt tokens (text: a fixed" in stdout and "5 new tokens, 0 warm-up + 2 timed runs" in stdout
    assert "tokens agree: yes, all 5 tokens" in stdout
    assert "loading the packed model" in stderr and "dense run 2/2" in stderr  # progress on stderr only
    assert "loading" not in stdout


def test_bench_json_is_one_object_on_stdout(out: Path) -> None:
    threads = torch.get_num_threads()
    with only_packed_kernels():  # the reference path: a known path, and the note that says it is slow
        code, stdout, stderr = _bench(
            str(out), *QUICK, "--batch", "2", "--prompt", "random", "--threads", "1", "--json"
        )
    assert code == 0, stderr
    report = BenchReport.model_validate_json(stdout)
    assert json.loads(stdout)["format"] == "secateurs.bench/1"
    c = report.conditions
    assert (c.batch, c.prompt_tokens, c.new_tokens, c.repetitions, c.warmup) == (2, 8, 5, 2, 0)
    assert c.prompt.startswith("random ids") and c.device == "cpu" and c.dtype == "float32"
    assert c.threads == 1 and torch.get_num_threads() == threads and c.torch == torch.__version__
    assert report.tokens_agree and report.matching_tokens == report.total_tokens == 10
    assert report.first_difference is None and report.packed.paths == {"reference": 14} and not report.dense.paths
    for side in (report.dense, report.packed):
        speed = side.decode_tokens_per_second
        assert 0 < speed.min <= speed.q1 <= speed.median <= speed.q3 <= speed.max
        assert side.prefill_ms.median > 0 and side.load_seconds > 0
    assert report.speedup == pytest.approx(
        report.packed.decode_tokens_per_second.median / report.dense.decode_tokens_per_second.median
    )
    assert any("reference path" in note for note in report.notes)


def test_bench_in_bfloat16_counts_the_tokens_that_agree_and_names_the_kernel_that_ran(out: Path) -> None:
    def one_token(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor | None:
        return F.linear(x, layer.dense_weight(), layer.bias) if x.reshape(-1, x.shape[-1]).shape[0] == 1 else None

    register_packed_kernel("fake_decode", one_token)
    try:
        with only_packed_kernels("fake_decode"):
            code, stdout, stderr = _bench(str(out), *QUICK, "--dtype", "bfloat16", "--json")
    finally:
        unregister_packed_kernel("fake_decode")
    assert code == 0, stderr
    report = BenchReport.model_validate_json(stdout)
    assert report.conditions.dtype == "bfloat16" and report.packed.paths == {"fake_decode": 14}
    assert 0 <= report.matching_tokens <= report.total_tokens == 5
    assert any(detail.startswith("fake_decode: ") for detail in report.kernel_details)


def test_bench_rebuilds_the_dense_model_from_a_packed_folder_alone(out: Path, tmp_path: Path) -> None:
    packed = tmp_path / "packed"
    shutil.copytree(out / PACKED_DIR, packed)
    code, stdout, stderr = _bench(str(packed), *QUICK, "--json")
    assert code == 0, stderr
    report = BenchReport.model_validate_json(stdout)
    assert "unpacked" in report.dense.source and report.tokens_agree


def test_bench_runs_every_dense_linear_through_the_faster_dense_products_by_default(out: Path) -> None:
    """By default the dense linears of both models (all of the dense one's, the packed one's lm_head) go through
    kernels/matmul.py's products for the timed runs (said in the dense side's source) and come back to their own
    forward afterwards; --dense-linears torch leaves them on F.linear."""
    from secateurs.workers import bench as bench_module

    seen: list[tuple[bool, bool]] = []
    compare = bench_module.compare_greedy

    def routed(model: torch.nn.Module) -> bool:
        return any("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))

    def spying(dense: torch.nn.Module, packed: torch.nn.Module, *args: object, **kwargs: object) -> object:
        seen.append((routed(dense), routed(packed)))
        return compare(dense, packed, *args, **kwargs)  # type: ignore[arg-type]

    bench_module.compare_greedy = spying  # type: ignore[assignment]
    try:
        code, stdout, stderr = _bench(str(out), *QUICK, "--json")
        code_torch, stdout_torch, _stderr = _bench(str(out), *QUICK, "--dense-linears", "torch", "--json")
    finally:
        bench_module.compare_greedy = compare
    assert code == 0 and code_torch == 0, stderr
    report, plain = BenchReport.model_validate_json(stdout), BenchReport.model_validate_json(stdout_torch)
    backend = matmul.linear_route(torch.float32)
    assert f"linears through secateurs' faster dense products ({backend})" in report.dense.source
    assert "faster dense products" not in plain.dense.source
    onednn = backend == "onednn"  # routed where oneDNN is the faster; F.linear itself is MKL's route
    assert seen == [(onednn, onednn), (False, False)]
    assert report.tokens_agree  # fp32: another summation order, the same greedy tokens here
    code, _stdout, stderr = _bench(str(out), *QUICK, "--dense-linears", "mkl")
    assert code == 2 and "'mkl' is not one of" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cuda"], "device 'cuda' does not exist: this machine has no CUDA device"),
        (["--device", "tpu"], "'tpu' is not a device name"),
        (["--new-tokens", "1"], "--new-tokens must be at least 2"),
        (["--prompt-tokens", "60", "--new-tokens", "10"], "exceed the model's 64 positions"),
    ],
)
def test_bench_names_the_option_that_is_wrong(out: Path, args: list[str], message: str) -> None:
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, stdout, stderr = _bench(str(out), *QUICK, *args)  # the last of a repeated option wins
    assert code == 2 and message in " ".join(stderr.split()) and not stdout, stderr


def test_bench_refuses_what_it_cannot_compare(out: Path, tmp_path: Path) -> None:
    code, _stdout, stderr = _bench(str(out), *QUICK, "--dtype", "float64")
    assert code == 2 and "'float64' is not one of" in stderr
    plain = tmp_path / "plain"
    shutil.copytree(out, plain, ignore=shutil.ignore_patterns(PACKED_DIR))
    code, _stdout, stderr = _bench(str(plain), *QUICK)
    assert code == 2 and "has no packed copy" in " ".join(stderr.split())
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    manifest = json.loads((damaged / PACKED_DIR / MANIFEST_NAME).read_text())
    manifest["format"] = "secateurs.packed/0"
    (damaged / PACKED_DIR / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, _stdout, stderr = _bench(str(damaged), *QUICK)
    assert code == 2 and "secateurs.packed/0" in stderr and "Traceback" not in stderr


# --- Timing generate token by token ---------------------------------------------------------------------------


def test_greedy_generation_is_timed_per_token_and_compared(out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    run = greedy_generate(model, ids, 6)
    assert run.tokens.shape == (2, 6) and run.decode_steps == 5
    assert run.prefill_seconds > 0 and run.decode_seconds > 0
    assert run.tokens_per_second == pytest.approx(2 * 5 / run.decode_seconds)
    with torch.no_grad():  # the same tokens as a plain greedy generate
        expected = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(run.tokens, expected[:, 4:])
    comparison = compare_greedy(model, model, ids, 4, warmup=1, repetitions=3)
    assert len(comparison.baseline) == len(comparison.candidate) == 3 and comparison.agreement.identical
    assert comparison.speedup > 0
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        greedy_generate(model, ids, 1)


def test_agreement_counts_tokens_before_each_rows_first_difference() -> None:
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = torch.tensor([[1, 2, 0, 4], [5, 6, 7, 8]])
    result = agreement(a, b)
    assert not result.identical and result.matching_tokens == 2 + 4 and result.first_difference == 2
    assert agreement(a, a.clone()).identical and agreement(a, a.clone()).first_difference is None
