"""run_job and the `secateurs prune` CLI on tiny models: outputs, reports, bad input, atomicity."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from secateurs.app.errors import DataSourceError, ModelSourceError, OutputExistsError
from secateurs.app.schemas import ProgressEvent, Report, TextSource
from secateurs.app.sources import check_model_folder
from secateurs.kernels.patterns import satisfies_nm
from secateurs.workers.cli import cli
from secateurs.workers.pipeline import JobCancelled, run_job
from secateurs.workers.storage import TMP_PREFIX
from tests.conftest import TinyDir
from tests.models import bad_model_dir, job_spec

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    words = "the quick brown fox jumps over the lazy dog while calibration text flows onward "
    path.write_bytes((words * 200).encode() + b"\r\nsecond line\r\n")
    return path


def _no_leftovers(parent: Path) -> bool:
    return not any(p.name.startswith(TMP_PREFIX) for p in parent.iterdir())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_run_job_writes_a_loadable_2_4_checkpoint_and_a_full_report(
    arch: str, tiny_dir: TinyDir, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    events = []
    report = run_job(job_spec(tiny_dir(arch), text_file), events.append, output_dir=out)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    names = {layer.name for layer in report.layers}
    for name, module in model.named_modules():
        if name in names:
            weight = module.weight if isinstance(module, torch.nn.Linear) else module.weight.T
            assert satisfies_nm(weight, 2, 4), name
    saved = json.loads((out / "report.json").read_text())
    assert Report.model_validate(saved) == report
    assert saved["sparsity"]["verified"] is True and saved["sparsity"]["pattern"] == "2:4"
    assert saved["perplexity"]["dense"] > 1 and saved["perplexity"]["pruned"] > 1
    protocol = saved["perplexity"]["protocol"]
    assert protocol["window"] == 32 and protocol["windows"] == 3 and protocol["predicted_tokens"] == 3 * 31
    assert len(protocol["text_sha256"]) == 64
    assert saved["calibration"] == {
        "source": str(text_file),
        "sha256": protocol["text_sha256"],
        "samples": 4,
        "seqlen": 32,
        "seed": 0,
        "text_tokens": saved["calibration"]["text_tokens"],
        "bos": False,
        "batch_size": None,
        "precision": "fp32",
    }
    assert {"name", "shape", "sparsity", "error"} <= set(saved["layers"][0])
    assert (
        saved["timings"]["prune_seconds"] > 0 and saved["timings"]["total_seconds"] >= saved["timings"]["prune_seconds"]
    )
    assert {"torch", "transformers", "device", "threads"} <= set(saved["environment"])
    assert saved["environment"]["cpu_capability"] and set(saved["environment"]["cpu_products"]) == {"linear", "gram"}
    memory = saved["memory"]  # measured in this (test) process: more than the model, less than the machine
    assert 10 * 2**20 < memory["peak_rss_bytes"] < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory["peak_device_bytes"] is None and "reset as each stage of the job started" in memory["peak_rss_source"]
    stages = memory["peak_rss_by_stage"]  # each stage's own peak; the job's is the largest
    assert list(stages) == ["load", "calibrate", "evaluate_dense", "prune", "evaluate_pruned", "measure_speed"]
    assert max(stages.values()) == memory["peak_rss_bytes"] and min(stages.values()) > 10 * 2**20
    blocks = [e for e in events if e.block is not None]
    assert [e.block for e in blocks] == [1, 2] and all(e.layers for e in blocks)
    assert events[-1].stage == "done"
    assert _no_leftovers(tmp_path)


def test_evaluation_streams_one_block_at_a_time(tiny_dir: TinyDir, text_file: Path, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    run_job(job_spec(tiny_dir("llama"), text_file), events.append, output_dir=tmp_path / "out")
    evaluations = [e for e in events if e.stage in ("evaluate_dense", "evaluate_pruned") and "windows" in e.message]
    assert len(evaluations) == 2 and all("one block at a time" in e.message for e in evaluations)


def test_zeros_are_stored_in_place_in_safetensors(tiny_dir: TinyDir, text_file: Path, tmp_path: Path) -> None:
    run_job(job_spec(tiny_dir("qwen2"), text_file, evaluation=None), output_dir=tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert satisfies_nm(q, 2, 4) and float((q == 0).float().mean()) == pytest.approx(0.5)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_an_existing_output_is_refused_before_any_work_unless_overwrite(
    tiny_dir: TinyDir, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    spec = job_spec(tiny_dir("llama"), text_file, evaluation=None)
    with pytest.raises(OutputExistsError, match="not empty"):
        run_job(spec, output_dir=out)
    assert (out / "keep.txt").read_text() == "mine"
    run_job(spec, output_dir=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()
    assert _no_leftovers(tmp_path)


def test_cancel_between_blocks_leaves_nothing(tiny_dir: TinyDir, text_file: Path, tmp_path: Path) -> None:
    with pytest.raises(JobCancelled, match="after block 1 of 2"):
        run_job(job_spec(tiny_dir("llama"), text_file), output_dir=tmp_path / "out", should_stop=lambda: True)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_too_short_evaluation_text_fails_before_pruning(tiny_dir: TinyDir, text_file: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(DataSourceError, match="fewer than one window"):
        run_job(
            job_spec(tiny_dir("llama"), text_file, evaluation=TextSource(file=str(short))),
            output_dir=tmp_path / "o",
        )


# --- the CLI --------------------------------------------------------------------------------------------------


def _prune_args(model: Path, text: Path, out: Path) -> list[str]:
    return [
        "prune", str(model), "--method", "sparsegpt", "--pattern", "2:4",
        "--calibration-file", str(text), "--calibration-samples", "4", "--calibration-seqlen", "32", "--seed", "0",
        "--eval-file", str(text), "--eval-seqlen", "32", "--eval-windows", "2", "--device", "cpu",
        "--no-measure-speed", "--output", str(out),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "pickle"}, "no *.safetensors weights (found pickle weights: pytorch_model.bin)"),
        ({"model": "shardless"}, "model.safetensors.index.json names model-00001-of-00002.safetensors, which is not"),
        ({"model": "remote"}, "needs remote code"),
        ({"model": "encoder"}, "not a causal language model"),
        ({"model": "odd"}, "has 250 input features, not a multiple of M=4"),
        ({"model": "mismatch"}, "weights match config.json"),
        ({"model": "missing"}, "does not exist"),
        ({"--pattern": "3:2"}, "not a valid N:M pattern"),
        ({"--pattern": "0:4"}, "not a valid N:M pattern"),
        ({"--pattern": "1.5"}, "strictly between 0 and 1"),
        ({"--calibration-file": "empty"}, "is empty"),
        ({"--calibration-file": "short"}, "needs at least 33"),
        ({"--device": "cuda:7"}, "does not exist"),
        ({"--device": "tpu"}, "device"),
        # a spec field out of range is named by the option that set it, not by the schema's field name
        ({"--eval-windows": "0"}, "--eval-windows: Input should be greater than or equal to 1"),
        ({"--calibration-seqlen": "1"}, "--calibration-seqlen: Input should be greater than or equal to 2"),
    ],
)
def test_bad_input_gets_one_clear_message_and_no_output(
    change: dict[str, str], message: str, tiny_dir: TinyDir, text_file: Path, tmp_path: Path
) -> None:
    tiny = tiny_dir("llama")
    (tmp_path / "empty").write_text("")
    (tmp_path / "short").write_text("too short to calibrate")
    out = tmp_path / "out"
    args = _prune_args(tiny, text_file, out)
    for key, value in change.items():
        if key == "model":
            args[1] = str(bad_model_dir(tmp_path, tiny, value)) if value != "missing" else str(tmp_path / "nope")
        else:
            args[args.index(key) + 1] = str(tmp_path / value) if key.endswith("file") else value
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not out.exists() and _no_leftovers(tmp_path)


def test_a_folder_without_safetensors_names_the_first_missing_shard_of_its_index(
    tiny_dir: TinyDir, tmp_path: Path
) -> None:
    """The door names what the index promises (the streamed loader's own message would come later); with no index,
    or one that is no safetensors index, the folder simply has no *.safetensors weights."""
    folder = bad_model_dir(tmp_path, tiny_dir("llama"), "shardless")
    with pytest.raises(ModelSourceError) as err:
        check_model_folder(folder)
    assert err.value.message == (
        f"{folder}: model.safetensors.index.json names model-00001-of-00002.safetensors, which is not there"
    )
    assert err.value.hint and "download it again" in err.value.hint
    for index in ("not json", json.dumps({"weight_map": []}), None):
        if index is None:
            (folder / "model.safetensors.index.json").unlink()
        else:
            (folder / "model.safetensors.index.json").write_text(index)
        with pytest.raises(ModelSourceError, match=r"has no \*\.safetensors weights; secateurs never loads pickle"):
            check_model_folder(folder)


def test_the_documented_prune_command_works_as_a_console_script(tiny_dir: TinyDir, tmp_path: Path) -> None:
    """The exact flag set of the contract, through the installed `secateurs` entry point."""
    out = tmp_path / "out"
    text = WIKI if WIKI.exists() else None
    if text is None:
        pytest.skip("../shared WikiText-2 not present")
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run(
        ["secateurs", *_prune_args(tiny_dir("gpt_neox"), text, out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["verified"] and report["perplexity"]["protocol"]["windows"] == 2
    assert AutoModelForCausalLM.from_pretrained(out) is not None
