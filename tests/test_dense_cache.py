"""The dense-perplexity cache (issue 11, item 3): computed once per model bytes, tokens, dtype and device type.

Keys and entries on tiny random models and a fake computation; then whole jobs (``run_job``, ``secateurs prune``,
the service's :func:`~secateurs.workers.jobs.summary`): the second job reads the figure the first computed, and
its report says so and names the first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from secateurs.app.schemas import JobSpec, ProgressEvent, Report, TextSource
from secateurs.app.settings import get_settings
from secateurs.kernels.measure.perplexity import Perplexity
from secateurs.workers import dense_cache as dc
from secateurs.workers import pipeline
from secateurs.workers.cli import cli
from secateurs.workers.dense_cache import DenseCache, DenseKey, cached_dense_perplexity
from secateurs.workers.jobs import summary
from secateurs.workers.pipeline import run_job
from tests.conftest import TinyDir

CPU = torch.device("cpu")
WINDOWS = torch.arange(3 * 8).reshape(3, 8) % 100  # [3 windows, 8 tokens]
TEXT_SHA = "a" * 64


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog while the text flows onward " * 60)
    return path


def _key(cache: DenseCache, folder: Path, **changes: object) -> DenseKey:
    args: dict[str, object] = {
        "text_sha256": TEXT_SHA,
        "windows": WINDOWS,
        "bos_token_id": None,
        "dtype": torch.float32,
        "device": CPU,
    }
    return cache.key(folder, **{**args, **changes})  # type: ignore[arg-type]


class _Compute:
    """A stand-in for the dense evaluation: counts its calls, returns a fixed figure."""

    def __init__(self, value: float = 29.37) -> None:
        self.calls = 0
        self.value = value

    def __call__(self) -> tuple[Perplexity | None, float | None]:
        self.calls += 1
        return Perplexity(self.value, 3.38, 3, 8, 21, False), 1.5


def _lookup(
    cache: DenseCache, folder: Path, compute: _Compute, *, job_id: str | None = "job_a", **changes: object
) -> tuple[Perplexity | None, float | None, object]:
    args: dict[str, object] = {
        "model_folder": folder,
        "text_sha256": TEXT_SHA,
        "windows": WINDOWS,
        "bos_token_id": None,
        "dtype": torch.float32,
        "device": CPU,
        "batch_size": 8,
        "job_id": job_id,
        "output": folder.parent / "out",
        "emit": lambda _event: None,
    }
    return cached_dense_perplexity(cache, compute, **{**args, **changes})  # type: ignore[arg-type]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    path.write_bytes(bytes(data))


def test_a_miss_computes_and_stores_then_the_same_inputs_hit(tiny_dir: TinyDir, tmp_path: Path) -> None:
    cache, folder, compute = DenseCache(tmp_path / "cache"), tiny_dir("llama"), _Compute()
    first = _lookup(cache, folder, compute)
    assert compute.calls == 1 and first[2] is None  # computed here, not cached
    second = _lookup(cache, folder, compute, job_id="job_b", batch_size=2)  # the batch size is not in the key
    assert compute.calls == 1
    assert second[0] == first[0]
    hit = second[2]
    assert hit is not None and hit.job_id == "job_a" and hit.seconds == 1.5 and hit.batch_size == 8  # type: ignore[attr-defined]
    entries = list((tmp_path / "cache").glob("*.json"))
    assert [p.name for p in entries] == [f"{_key(cache, folder).digest}.json"]
    assert json.loads(entries[0].read_text())["value"] == 29.37


def test_what_the_figure_depends_on_misses(tiny_dir: TinyDir, tmp_path: Path) -> None:
    cache, folder = DenseCache(tmp_path / "cache"), tiny_dir("llama")
    base = _key(cache, folder)
    assert _key(cache, folder) == base  # deterministic
    other_tokens = WINDOWS.clone()
    other_tokens[2, 7] += 1  # one token: another tokenizer, or another text
    changed = {
        "text": _key(cache, folder, text_sha256="b" * 64),
        "tokens": _key(cache, folder, windows=other_tokens),
        "windows": _key(cache, folder, windows=WINDOWS[:2]),
        "bos": _key(cache, folder, bos_token_id=1),
        "dtype": _key(cache, folder, dtype=torch.bfloat16),
        "device": _key(cache, folder, device=torch.device("cuda")),
        "model": _key(cache, tiny_dir("llama", seed=1)),
    }
    digests = {name: key.digest for name, key in changed.items()}
    assert base.digest not in digests.values() and len(set(digests.values())) == len(digests), digests


def test_a_changed_text_byte_misses(tiny_dir: TinyDir, text_file: Path, tmp_path: Path) -> None:
    from secateurs.workers.data import read_text

    cache, folder, compute = DenseCache(tmp_path / "cache"), tiny_dir("llama"), _Compute()
    before = read_text(TextSource(file=str(text_file))).sha256
    _lookup(cache, folder, compute, text_sha256=before)
    data = bytearray(text_file.read_bytes())
    data[10] = ord("X")
    text_file.write_bytes(bytes(data))
    after = read_text(TextSource(file=str(text_file))).sha256
    assert after != before
    _, _, hit = _lookup(cache, folder, compute, text_sha256=after)
    assert hit is None and compute.calls == 2


def test_a_changed_weight_byte_misses(tiny_dir: TinyDir, tmp_path: Path) -> None:
    cache, folder, compute = DenseCache(tmp_path / "cache"), tiny_dir("llama"), _Compute()
    _lookup(cache, folder, compute)
    _flip_last_byte(folder / "model.safetensors")
    _, _, hit = _lookup(cache, folder, compute)
    assert hit is None and compute.calls == 2
    _, _, hit = _lookup(cache, folder, compute)  # the new bytes' figure is now stored
    assert hit is not None and compute.calls == 2


def test_a_different_dtype_misses(tiny_dir: TinyDir, tmp_path: Path) -> None:
    cache, folder, compute = DenseCache(tmp_path / "cache"), tiny_dir("llama"), _Compute()
    _lookup(cache, folder, compute, dtype=torch.float32)
    _, _, hit = _lookup(cache, folder, compute, dtype=torch.bfloat16)
    assert hit is None and compute.calls == 2


def test_file_hashes_are_remembered_by_path_size_and_mtime(
    tiny_dir: TinyDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, folder = DenseCache(tmp_path / "cache"), tiny_dir("llama")
    weights = folder / "model.safetensors"
    past = time.time() - 3600
    os.utime(weights, (past, past))
    first = cache.file_sha256(weights)
    assert len(list((tmp_path / "cache" / "files").glob("*.json"))) == 1

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} hashed again")

    with monkeypatch.context() as patch:
        patch.setattr(dc, "_sha256_stream", no_hashing)
        assert cache.file_sha256(weights) == first  # remembered: not read again
    _flip_last_byte(weights)
    os.utime(weights, (past + 1, past + 1))  # another mtime: hashed again
    assert cache.file_sha256(weights) != first


def test_a_just_modified_file_is_hashed_but_not_remembered(tiny_dir: TinyDir, tmp_path: Path) -> None:
    cache, folder = DenseCache(tmp_path / "cache"), tiny_dir("llama")
    cache.file_sha256(folder / "model.safetensors")  # written moments ago: a same-tick write could follow
    assert not list((tmp_path / "cache" / "files").glob("*.json"))


@pytest.mark.parametrize("garbage", [b"{not json", b"", b"\xff\xfe", b'{"format": 1}', b"[]"])
def test_a_corrupt_entry_is_ignored_with_a_warning_and_recomputed(
    garbage: bytes, tiny_dir: TinyDir, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, folder, compute = DenseCache(tmp_path / "cache"), tiny_dir("llama"), _Compute()
    _lookup(cache, folder, compute)
    path = cache.path(_key(cache, folder))
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger=dc.__name__):
        _, _, hit = _lookup(cache, folder, compute)
    assert hit is None and compute.calls == 2
    assert any("ignoring" in r.message and str(path) in r.message for r in caplog.records), caplog.text
    assert cache.load(_key(cache, folder)) is not None  # the recomputed figure replaced it


def test_an_entry_for_other_inputs_is_not_used(tiny_dir: TinyDir, tmp_path: Path) -> None:
    cache, folder, compute = DenseCache(tmp_path / "cache"), tiny_dir("llama"), _Compute()
    _lookup(cache, folder, compute)
    path = cache.path(_key(cache, folder))
    entry = json.loads(path.read_text())
    entry["inputs"]["dtype"] = "bfloat16"  # copied in from elsewhere, or edited by hand
    path.write_text(json.dumps(entry))
    assert cache.load(_key(cache, folder)) is None


def test_concurrent_writers_leave_one_valid_entry(tiny_dir: TinyDir, tmp_path: Path) -> None:
    cache, folder = DenseCache(tmp_path / "cache"), tiny_dir("llama")
    key = _key(cache, folder)
    start = threading.Barrier(9)
    seen: list[float | None] = []
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            start.wait()
            for round_ in range(20):
                result = Perplexity(29.0 + index, 3.0, 3, 8, 21, False)
                cache.store(
                    key,
                    result,
                    batch_size=8,
                    seconds=1.0,
                    job_id=f"job_{index}_{round_}",
                    output=None,
                    device_name=None,
                )
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        start.wait()
        for _ in range(200):
            entry = cache.load(key)  # None before the first write; never a torn entry
            seen.append(entry.value if entry else None)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)] + [threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_file()) == [f"{key.digest}.json"]
    final = cache.load(key)
    assert final is not None and final.value in {29.0 + i for i in range(8)}
    assert all(value is None or value in {29.0 + i for i in range(8)} for value in seen)


def test_an_unwritable_cache_costs_a_warning_not_the_job(
    tiny_dir: TinyDir, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache, folder, compute = DenseCache(blocker / "cache"), tiny_dir("llama"), _Compute()
    with caplog.at_level(logging.WARNING, logger=dc.__name__):
        result, _, hit = _lookup(cache, folder, compute)
    assert result is not None and result.value == 29.37 and hit is None
    assert "could not store" in caplog.text


# --- whole jobs -----------------------------------------------------------------------------------------------


def _spec(model: Path, text: Path, **changes: object) -> JobSpec:
    base: dict[str, object] = {
        "model": str(model),
        "method": "magnitude",
        "evaluation": TextSource(file=str(text)),
        "eval_seqlen": 32,
        "eval_windows": 3,
        "device": "cpu",
        "measure_speed": False,
    }
    return JobSpec(**{**base, **changes})  # type: ignore[arg-type]


def test_the_second_job_reads_the_first_jobs_figure_and_its_report_says_so(
    tiny_dir: TinyDir, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, cache = tiny_dir("llama"), tmp_path / "cache"
    evaluated: list[int] = []
    real = pipeline.perplexity
    monkeypatch.setattr(pipeline, "perplexity", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    first = run_job(_spec(model, text_file), output_dir=tmp_path / "one", dense_cache=cache, job_id="job_one")
    assert len(evaluated) == 2 and first.perplexity.dense_cached is None  # dense and pruned, both computed
    events: list[ProgressEvent] = []
    second = run_job(
        _spec(model, text_file, eval_batch_size=2), events.append, output_dir=tmp_path / "two", dense_cache=cache
    )
    assert len(evaluated) == 3  # only the pruned figure was computed
    assert second.perplexity.dense == first.perplexity.dense
    assert second.perplexity.pruned == pytest.approx(first.perplexity.pruned, rel=1e-6)
    assert second.perplexity.protocol == first.perplexity.protocol.model_copy(update={"batch_size": 2})  # type: ignore[union-attr]
    hit = second.perplexity.dense_cached
    assert hit is not None and hit.job_id == "job_one" and hit.batch_size == 8
    assert any("cached from job job_one" in e.message for e in events if e.stage == "evaluate_dense")
    saved = Report.model_validate_json((tmp_path / "two" / "report.json").read_text())
    assert saved.perplexity.dense_cached == hit
    assert summary(second).perplexity_dense_cached_from == f"job job_one, {hit.created_at}"
    assert summary(first).perplexity_dense_cached_from is None

    # Without a job id the entry names the output folder; dense_cache=false computes and stores nothing.
    third = run_job(_spec(model, text_file, dense_cache=False), output_dir=tmp_path / "three", dense_cache=cache)
    assert third.perplexity.dense_cached is None and len(evaluated) == 5
    assert third.perplexity.dense == pytest.approx(first.perplexity.dense, rel=1e-6)
    no_cache = run_job(_spec(model, text_file), output_dir=tmp_path / "four")  # run_job's default: no cache
    assert no_cache.perplexity.dense_cached is None and len(evaluated) == 7


@pytest.fixture
def cli_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`secateurs prune` with its own dense-perplexity cache folder ($SECATEURS_DENSE_CACHE_DIR)."""
    folder = tmp_path / "cli-cache"
    monkeypatch.setenv("SECATEURS_DENSE_CACHE_DIR", str(folder))
    get_settings.cache_clear()
    yield folder
    get_settings.cache_clear()


def test_the_cli_summary_names_where_a_cached_dense_figure_came_from(
    tiny_dir: TinyDir, text_file: Path, tmp_path: Path, cli_cache: Path
) -> None:
    model = tiny_dir("llama")
    args = [
        "prune",
        str(model),
        "--method",
        "magnitude",
        "--eval-file",
        str(text_file),
        "--eval-seqlen",
        "32",
        "--eval-windows",
        "3",
        "--device",
        "cpu",
        "--no-measure-speed",
    ]
    first = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "one")])
    assert first.exit_code == 0, first.output
    assert "cached from" not in first.output
    assert len(list(cli_cache.glob("*.json"))) == 1
    second = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "two")])
    assert second.exit_code == 0, second.output
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["perplexity"]["dense_cached"]["output"] == str((tmp_path / "one").resolve())
    line = next(line for line in second.output.splitlines() if "perplexity dense" in line)
    assert f"{report['perplexity']['dense']:.3f} (cached from" in line, second.output
    off = CliRunner().invoke(cli, [*args, "--no-dense-cache", "--output", str(tmp_path / "three")])
    assert off.exit_code == 0 and "cached from" not in off.output


def test_a_service_job_names_the_job_that_computed_its_dense_figure(
    tiny_dir: TinyDir, text_file: Path, tmp_path: Path
) -> None:
    from secateurs.app.migrate import upgrade
    from secateurs.app.settings import Settings
    from secateurs.app.store import JobStore
    from secateurs.workers.jobs import execute_job

    settings = Settings(data_dir=tmp_path / "data", dense_cache_dir=None)
    assert settings.service_dense_cache_dir == tmp_path / "data" / "dense-perplexity"
    upgrade(settings.store_url)
    store = JobStore(settings.store_url)
    spec = _spec(tiny_dir("llama"), text_file)
    first, _ = store.create(spec, max_attempts=1)
    second, _ = store.create(spec, max_attempts=1)
    assert execute_job(first.id, store, settings, worker="test:1") == "succeeded"
    assert execute_job(second.id, store, settings, worker="test:2") == "succeeded"
    one, two = store.get(first.id).result, store.get(second.id).result
    assert one is not None and two is not None
    assert one.perplexity_dense_cached_from is None
    assert two.perplexity_dense == one.perplexity_dense
    assert two.perplexity_dense_cached_from is not None and two.perplexity_dense_cached_from.startswith(
        f"job {first.id}, "
    )
    report = json.loads((settings.artifacts_dir / second.id / "report.json").read_text())
    assert report["perplexity"]["dense_cached"]["job_id"] == first.id
    assert len(list(settings.service_dense_cache_dir.glob("*.json"))) == 1


def test_the_python_api_uses_the_settings_cache(
    tiny_dir: TinyDir, text_file: Path, tmp_path: Path, cli_cache: Path
) -> None:
    import secateurs

    options = {"method": "magnitude", "evaluation": text_file, "eval_seqlen": 32, "eval_windows": 3, "device": "cpu"}
    model = tiny_dir("llama")
    first = secateurs.prune(model, output=tmp_path / "one", measure_speed=False, **options)
    second = secateurs.prune(model, output=tmp_path / "two", measure_speed=False, **options)
    assert first.perplexity.dense_cached is None and len(list(cli_cache.glob("*.json"))) == 1
    assert second.perplexity.dense_cached is not None
    assert second.perplexity.dense_cached.output == str((tmp_path / "one").resolve())
    assert second.perplexity.dense == first.perplexity.dense
