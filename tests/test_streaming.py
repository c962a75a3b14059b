"""Streamed weights (issue 11 item 1): a job reads each block from the checkpoint only when the driver reaches it
and writes it out as soon as it is pruned. Same numbers and bytes as the in-memory path, bounded memory, bad
input named, nothing partial left behind."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.app.errors import ModelSourceError, StorageError
from secateurs.app.schemas import JobSpec
from secateurs.kernels.measure.perplexity import eval_windows, perplexity
from secateurs.kernels.pruning.driver import PruneConfig, prune_model_
from secateurs.workers import pipeline, streaming, tensorfile
from secateurs.workers.data import calibration_windows, read_text, tokenize
from secateurs.workers.jobs import remove_stale_temps
from secateurs.workers.packed import PACKED_DIR, PACKED_FILE, load_dense_model, rebuild_state_dict, write_packed
from secateurs.workers.pipeline import run_job
from secateurs.workers.storage import TMP_PREFIX
from secateurs.workers.streaming import INDEX_NAME, StreamedModel
from tests.models import job_spec, random_model, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_bytes(
        ("the quick brown fox jumps over the lazy dog while calibration text flows onward " * 200).encode()
    )
    return path


def _sharded_dir(arch: str, path: Path, *, num_layers: int = 3, shard: str = "40KB") -> Path:
    """A tiny model saved as several safetensors shards with the standard index, and the tiny tokenizer."""
    tiny_model(arch, num_layers=num_layers).save_pretrained(path, max_shard_size=shard)
    tiny_tokenizer().save_pretrained(path)
    assert (path / INDEX_NAME).is_file() and len(list(path.glob("*.safetensors"))) > 2
    return path


def _in_memory(folder: Path, spec: JobSpec) -> tuple[dict[str, torch.Tensor], float, float]:
    """Today's path: the whole model in memory, whole-model evaluation, prune, ``state_dict``."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    bos = pipeline._bos_id(spec, tokenizer)
    assert spec.calibration is not None and spec.evaluation is not None
    tokens = tokenize(tokenizer, read_text(spec.calibration).text)
    calibration = calibration_windows(
        tokens, spec.calibration_samples, spec.calibration_seqlen, spec.seed, bos_token_id=bos
    )
    windows = eval_windows(tokenize(tokenizer, read_text(spec.evaluation).text), spec.eval_seqlen, spec.eval_windows)
    dense = perplexity(model, windows, batch_size=spec.eval_batch_size, bos_token_id=bos)
    prune_model_(model, calibration, PruneConfig(), device="cpu")
    pruned = perplexity(model, windows, batch_size=spec.eval_batch_size, bos_token_id=bos)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, dense.value, pruned.value


def _saved(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return tensors


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_a_streamed_job_writes_the_in_memory_paths_tensors_bit_for_bit(
    arch: str, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _sharded_dir(arch, tmp_path / "source")
    spec = job_spec(source, text_file)
    state, dense, pruned = _in_memory(source, spec)
    monkeypatch.setattr(streaming, "MAX_SHARD_BYTES", 60_000)  # the output is sharded too
    out = tmp_path / "out"
    report = run_job(spec, output_dir=out)
    saved = _saved(out)
    assert len(list(out.glob("*.safetensors"))) > 2 and (out / INDEX_NAME).is_file()
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(saved)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # transformers reads it as it is
    loaded = model.state_dict()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name  # tied copies included
    assert set(saved) <= set(state) | {k for k in saved if k not in loaded}
    assert report.perplexity.dense == pytest.approx(dense, rel=1e-6)
    assert report.perplexity.pruned == pytest.approx(pruned, rel=1e-6)
    assert report.sparsity.verified and report.packed is not None and report.packed.written


def test_the_streamed_packed_copy_equals_the_one_packed_from_the_finished_folder(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "MAX_SHARD_BYTES", 60_000)
    out = tmp_path / "out"
    run_job(job_spec(_sharded_dir("gpt2", tmp_path / "source"), text_file), output_dir=out)
    streamed = json.loads((out / PACKED_DIR / "manifest.json").read_text())
    targets = {name: bool(record["transposed"]) for name, record in streamed["tensors"].items() if record["packed"]}
    write_packed(out, tmp_path / "again", targets, 2, 4)
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert streamed["tensors"] == again["tensors"]

    def files(manifest: dict[str, Any]) -> list[dict[str, Any]]:  # safe_open lists a file's tensors sorted
        return [{**f, "tensors": sorted(f["tensors"])} for f in manifest["source"]["files"]]

    assert files(streamed) == files(again)
    assert streamed["totals"] == again["totals"]
    assert (out / PACKED_DIR / PACKED_FILE).read_bytes() == (tmp_path / "again" / PACKED_FILE).read_bytes()
    rebuilt = rebuild_state_dict(out / PACKED_DIR)  # sha256-checked, tensor for tensor
    assert all(torch.equal(rebuilt[name], tensor) for name, tensor in _saved(out).items())
    load_dense_model(out / PACKED_DIR)


def test_a_magnitude_job_streams_without_calibration(text_file: Path, tmp_path: Path) -> None:
    source = _sharded_dir("llama", tmp_path / "source")
    report = run_job(job_spec(source, text_file, method="magnitude", evaluation=None), output_dir=tmp_path / "out")
    assert report.sparsity.verified and report.packed is not None and report.packed.written


# --- Bad input ---------------------------------------------------------------------------------------------------


def _no_output(parent: Path, out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(TMP_PREFIX) for p in parent.iterdir())


def test_an_index_naming_a_missing_shard_is_named(text_file: Path, tmp_path: Path) -> None:
    source = _sharded_dir("llama", tmp_path / "source")
    shard = sorted(source.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelSourceError, match=rf"{INDEX_NAME} puts tensor .* in shard {shard.name}, which is not"):
        run_job(job_spec(source, text_file), output_dir=tmp_path / "out")
    assert _no_output(tmp_path, tmp_path / "out")


def test_a_shard_whose_shapes_disagree_with_the_config_is_named(text_file: Path, tmp_path: Path) -> None:
    source = _sharded_dir("llama", tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 128
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=r"model-\d+-of-\d+\.safetensors: tensor model\.layers\.0\.mlp\.") as err:
        run_job(job_spec(source, text_file), output_dir=tmp_path / "out")
    assert "config.json implies [128, 64]" in str(err.value)
    assert _no_output(tmp_path, tmp_path / "out")


def test_a_disk_that_fills_up_mid_write_fails_the_job_and_leaves_nothing(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _sharded_dir("llama", tmp_path / "source")
    monkeypatch.setattr(streaming, "MAX_SHARD_BYTES", 60_000)
    real = tensorfile.TensorWriter._write
    written = [0]

    def filling(self: tensorfile.TensorWriter, data: Any) -> None:
        written[0] += len(data)
        if written[0] > 150_000:  # a few shards in: in the middle of a block
            self._stream.close()
            raise tensorfile.storage_error(self.path, OSError(errno.ENOSPC, "No space left on device"))
        real(self, data)

    monkeypatch.setattr(tensorfile.TensorWriter, "_write", filling)
    out = tmp_path / "out"
    with pytest.raises(StorageError, match=r"could not write .*model-\d+-of-\d+\.safetensors: the disk is full") as err:
        run_job(job_spec(source, text_file), output_dir=out)
    assert err.value.hint and "free disk space" in err.value.hint
    assert _no_output(tmp_path, out)


def test_an_oserror_from_the_file_becomes_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Full:
        def write(self, _data: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    monkeypatch.setattr(Path, "open", lambda *_a, **_k: Full())
    with pytest.raises(StorageError, match="the disk is full"):
        tensorfile.write_tensors(tmp_path / "x.safetensors", [("a", torch.zeros(4))])


def test_a_retried_job_leaves_exactly_one_complete_output(text_file: Path, tmp_path: Path) -> None:
    source = _sharded_dir("llama", tmp_path / "source")
    out = tmp_path / "out"
    stale = tmp_path / f"{TMP_PREFIX}out-killed"  # what a killed attempt leaves: a partial shard
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    remove_stale_temps(out)  # what the worker does before each attempt
    run_job(job_spec(source, text_file, evaluation=None), output_dir=out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)] == []
    AutoModelForCausalLM.from_pretrained(out)
    assert {p.name for p in out.glob("*.safetensors")} == {"model.safetensors"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # untied head; tied head (Conv1D)
def test_the_streamed_model_holds_weights_only_while_the_driver_needs_them(tmp_path: Path, arch: str) -> None:
    """Blocks are real only inside ``weights``; embeddings, final norm and head only inside ``outside`` (read
    equal to the checkpoint and tied as transformers ties them), on the meta device everywhere else."""
    source = _sharded_dir(arch, tmp_path / "source")
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    streamed = StreamedModel(source, torch.float32)
    model = streamed.model
    try:
        assert all(t.device.type == "meta" for t in model.parameters())
        with streamed.weights(1, streamed.blocks[1]):
            assert all(t.device.type == "cpu" for t in streamed.blocks[1].parameters())
            assert all(t.device.type == "meta" for t in streamed.blocks[0].parameters())
        assert all(t.device.type == "meta" for t in streamed.blocks.parameters())
        with streamed.outside(), streamed.outside():  # re-entrant
            outside = {n: t for n, t in model.state_dict().items() if f"{streamed.prefix}." not in n}
            assert outside and all(t.device.type == "cpu" for t in outside.values())
            for name, tensor in outside.items():
                assert torch.equal(tensor, reference[name]), name
            tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
            assert tied == bool(model.config.tie_word_embeddings)
        assert all(t.device.type == "meta" for t in model.parameters())
        with streamed.outside(head=False):  # what the capture enters: an untied head stays released
            assert model.get_input_embeddings().weight.device.type == "cpu"
            assert model.get_output_embeddings().weight.device.type == ("cpu" if tied else "meta")
            if not tied:
                with pytest.raises(RuntimeError, match="head was not read"), streamed.outside():
                    pass
        assert all(t.device.type == "meta" for t in model.parameters())
        written = dict(streamed.read_outside_tensors())  # one at a time, what the job writes
        assert [name for name, _ in streamed.outside_tensors()] == list(written)
        for name, tensor in written.items():
            assert torch.equal(tensor, reference[name]), name
    finally:
        streamed.close()


# --- Memory ------------------------------------------------------------------------------------------------------

_RSS_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from secateurs.app.schemas import JobSpec
    from secateurs.workers.pipeline import run_job
    from secateurs.workers.allocator import trim_heap

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def job(model, out):
        spec = JobSpec(model=model, method="magnitude", calibration=None, evaluation=None, device="cpu",
                       measure_speed=False)
        return run_job(spec, output_dir=Path(out))

    job(sys.argv[2], sys.argv[3] + "-warm")  # every code path once, on a tiny model, before the baseline
    trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    report = job(sys.argv[1], sys.argv[3])  # its peak: the largest of its stages' VmHWM (reset as each starts)
    print(json.dumps({"peak": report.memory.peak_rss_bytes - base}))
    """
)


def test_peak_memory_of_a_streamed_job_does_not_grow_with_the_model(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    # 24 blocks of (4 x 256² + 3 x 256 x 1024) fp32 ≈ 4.2 MB each: 100 MB of blocks, 1 MB outside them.
    # Measured: ~25 MB peak with 12 or 24 blocks (the heap keeps a few blocks' worth between its trims).
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=24,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = random_model(config)
    mid = tmp_path / "mid"
    model.save_pretrained(mid, max_shard_size="8MB")
    tiny_tokenizer().save_pretrained(mid)
    blocks = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." in n)
    del model
    tiny = _sharded_dir("llama", tmp_path / "tiny", num_layers=2)
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(mid), str(tiny), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert probe.returncode == 0, probe.stderr
    peak = json.loads(probe.stdout.strip().splitlines()[-1])["peak"]
    assert peak < 0.5 * blocks, (peak, blocks)  # the whole model would be > blocks; a few blocks fit under half
