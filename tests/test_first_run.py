"""A new user's first run (issue 12): the quick start's evaluation text is WikiText-2 wherever it can be had and
named truthfully everywhere when it is not; results go to stdout, progress to stderr; downloads take one part;
`secateurs serve` logs nothing that looks like a fault."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import sys
import tarfile
import types
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import secateurs.workers.assets as assets_module
from secateurs.app.client import SecateursClient
from secateurs.app.errors import DataSourceError
from secateurs.app.schemas import JobState, TextSource
from secateurs.app.settings import get_settings
from secateurs.app.texts import EXLLAMAV2_WIKI_SHA256, WIKITEXT2_TEST_SHA256, describe_text
from secateurs.workers import evaltext
from secateurs.workers.assets import WIKITEXT2_RELPATH, OfflineAssets
from secateurs.workers.cli import cli
from secateurs.workers.data import read_text
from tests.conftest import TinyDir
from tests.test_api import Api, make_api

TEXT = "the quick brown fox jumps over the lazy dog while calibration text flows onward " * 400


def _closed_port() -> str:
    """An address where nothing listens: the hub, unreachable for certain (it is unreachable here anyway)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def texts(tmp_path: Path) -> dict[str, Path]:
    """A substitute text, a workspace holding shared/data/... and a folder without one."""
    substitute = tmp_path / "cache" / "wiki.utf8"
    substitute.parent.mkdir()
    substitute.write_text("Wikipedia article text. " * 50, encoding="utf-8")
    workspace = tmp_path / "workspace"
    shared = workspace / WIKITEXT2_RELPATH
    shared.parent.mkdir(parents=True)
    shared.write_text(" = Robert Boulter = \r\n Robert Boulter is an English actor . \r\n", encoding="utf-8")
    (workspace / "clone").mkdir()
    (tmp_path / "elsewhere" / "clone").mkdir(parents=True)
    return {
        "substitute": substitute,
        "shared": shared,
        "workspace": workspace / "clone",
        "elsewhere": tmp_path / "elsewhere" / "clone",
    }


# --- the order: --eval-file, ../shared, the hub, the named substitute ------------------------------------------


def test_an_explicit_eval_file_comes_first_and_is_used_as_it_is(texts: dict[str, Path]) -> None:
    mine = texts["substitute"].with_name("mine.txt")
    mine.write_text(TEXT, encoding="utf-8")
    chosen = evaltext.quickstart_eval_text(texts["substitute"], eval_file=str(mine), search_from=[texts["workspace"]])
    assert chosen.source == TextSource(file=str(mine.resolve()))
    assert chosen.sha256 == hashlib.sha256(mine.read_bytes()).hexdigest()
    assert chosen.wikitext2 is None and chosen.notice is None  # the user's file: no claim either way
    with pytest.raises(DataSourceError, match="is a folder, not a text file"):
        evaltext.quickstart_eval_text(texts["substitute"], eval_file=str(mine.parent))
    with pytest.raises(DataSourceError, match="does not exist"):
        evaltext.quickstart_eval_text(texts["substitute"], eval_file=str(mine.parent / "nope.raw"))


def test_the_shared_wikitext2_comes_next(texts: dict[str, Path]) -> None:
    chosen = evaltext.quickstart_eval_text(texts["substitute"], search_from=[texts["workspace"]])
    assert chosen.source == TextSource(file=str(texts["shared"]))
    assert chosen.wikitext2 is True and chosen.notice is None


def test_the_hub_comes_next_as_the_papers_join_it(texts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaltext, "wikitext2_from_hub", lambda endpoint, timeout: ("f" * 64, ""))
    chosen = evaltext.quickstart_eval_text(texts["substitute"], search_from=[texts["elsewhere"]])
    assert chosen.source == TextSource(dataset="Salesforce/wikitext", dataset_config="wikitext-2-raw-v1", split="test")
    assert chosen.wikitext2 is True and chosen.notice is None and "Hugging Face hub" in chosen.label


def test_without_shared_and_hub_the_substitute_is_named_and_said_loudly(texts: dict[str, Path]) -> None:
    chosen = evaltext.quickstart_eval_text(
        texts["substitute"], search_from=[texts["elsewhere"]], hub_endpoint=_closed_port(), hub_timeout=2
    )
    assert chosen.source == TextSource(file=str(texts["substitute"]))
    assert chosen.wikitext2 is False
    notice = chosen.notice or ""
    assert "NOT WikiText-2 figures" in notice and chosen.sha256 and chosen.sha256 in notice
    assert str(texts["substitute"]) in notice
    tried = "\n".join(chosen.tried)
    assert "--eval-file: not given" in tried
    assert f"{WIKITEXT2_RELPATH} in {texts['elsewhere']} or a folder above: not found" in tried
    assert "the Hugging Face hub (Salesforce/wikitext/wikitext-2-raw-v1:test): http://127.0.0.1:" in tried
    assert "is unreachable (ConnectError" in tried


def test_the_hub_probe_is_quick_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    sha, why = evaltext.wikitext2_from_hub(_closed_port(), timeout=2)
    assert sha is None and "unreachable" in why
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    assert evaltext.wikitext2_from_hub("http://127.0.0.1:9") == (None, "HF_HUB_OFFLINE is set")


def test_dataset_rows_are_joined_as_sparsegpt_and_gptq_join_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """``"\\n\\n".join(testdata["text"])``: every row, the empty ones too (IST-DASLab/sparsegpt datautils.py)."""
    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film actor . \n", ""]

    class Table:
        column_names = ("text",)

        def __getitem__(self, column: str) -> list[str]:
            return rows

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split: Table()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    loaded = read_text(evaltext.WIKITEXT2_HUB)
    assert loaded.text == "\n\n".join(rows)
    assert loaded.sha256 == hashlib.sha256(loaded.text.encode()).hexdigest()
    assert loaded.source == "Salesforce/wikitext/wikitext-2-raw-v1:test"


def test_texts_are_named_by_their_bytes_never_by_their_names() -> None:
    assert "NOT WikiText-2" in describe_text("/cache/text/wiki.utf8", EXLLAMAV2_WIKI_SHA256)
    assert describe_text("/x/wiki.test.raw", "0" * 64) == "/x/wiki.test.raw"  # the name proves nothing
    assert "WikiText-2 raw test split" in describe_text("/x/any-name.txt", WIKITEXT2_TEST_SHA256)
    shared = assets_module.find_wikitext2()
    if shared is not None:  # this workspace: the table's sha256 is the shared copy's
        assert hashlib.sha256(shared.read_bytes()).hexdigest() == WIKITEXT2_TEST_SHA256


# --- the quick start, end to end on a tiny model: notice first, summary on stdout, clean serve log ----------


@pytest.fixture
def quick_env(tmp_path: Path, tiny_dir: TinyDir, monkeypatch: pytest.MonkeyPatch) -> Iterator[OfflineAssets]:
    """Offline assets that are a tiny model and two texts; no shared/data above; an unreachable hub."""
    text = tmp_path / "c4.utf8"
    text.write_text(TEXT, encoding="utf-8")
    substitute = tmp_path / "wiki.utf8"
    substitute.write_text(TEXT.upper(), encoding="utf-8")
    fake = OfflineAssets(tiny_dir("llama"), text, substitute, text, text, None)
    monkeypatch.setattr(assets_module, "fetch_assets", lambda *args, **kwargs: fake)
    monkeypatch.setattr(assets_module, "search_starts", lambda: (tmp_path,))
    monkeypatch.setattr(evaltext, "search_starts", lambda: (tmp_path,))
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "ENDPOINT", _closed_port())
    monkeypatch.setenv("SECATEURS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield fake
    get_settings.cache_clear()


def test_quickstart_without_wikitext2_says_so_first_and_names_the_text_in_the_summary(
    quick_env: OfflineAssets, tmp_path: Path
) -> None:
    out = tmp_path / "quick"
    flags = ["--calibration-samples", "2", "--eval-windows", "2", "--device", "cpu", "--output", str(out)]
    result = CliRunner().invoke(cli, ["quickstart", *flags], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    sha = hashlib.sha256(quick_env.wiki.read_bytes()).hexdigest()
    # Loudly, before the job starts: on stderr, above the job's first line.
    assert "NOT WikiText-2" in result.stderr and result.stderr.index("NOT WikiText-2") < result.stderr.index("job job_")
    assert "downloading job_" in result.stderr and " files, " in result.stderr  # the size, before the download
    # The result on stdout: the summary names the text actually used and its sha256.
    assert "evaluation text" in result.stdout and str(quick_env.wiki) in result.stdout and sha in result.stdout
    assert "job_" not in result.stdout and "block" not in result.stdout  # no progress on stdout
    report = json.loads((out / "report.json").read_text())
    assert report["perplexity"]["protocol"]["text"] == str(quick_env.wiki)
    assert report["perplexity"]["protocol"]["text_sha256"] == sha
    log = (tmp_path / "data" / "embedded-serve.log").read_text(errors="replace")
    for fault in ("WARNING", "Warning", "ERROR", "Traceback", "No hostname was supplied", "superuser"):
        assert fault not in log, log


def test_prune_json_prints_the_report_on_stdout_alone(tiny_dir: TinyDir, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    flags = ["--method", "magnitude", "--eval-file", str(text), "--eval-seqlen", "32", "--eval-windows", "2"]
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["prune", str(tiny_dir("llama")), *flags, "--device", "cpu", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == json.loads((out / "report.json").read_text())
    table = CliRunner().invoke(
        cli, ["prune", str(tiny_dir("llama")), *flags, "--device", "cpu", "-o", str(tmp_path / "b")]
    )
    assert table.exit_code == 0 and "evaluation text" in table.stdout and str(text) in table.stdout


# --- downloads by part ----------------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path, tiny_dir: TinyDir) -> Iterator[Api]:
    yield from make_api(tmp_path, tiny_dir)


def test_artifacts_api_and_download_take_one_part(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created = api.client.post("/v1/jobs", json=api.spec(method="magnitude", calibration=None, evaluation=None))
    job = api.run(created.json()["id"])
    assert job.state is JobState.SUCCEEDED
    everything = api.client.get(f"/v1/jobs/{job.id}/artifacts").json()
    paths = {a["path"] for a in everything["data"]}
    assert "report.json" in paths and any(p.startswith("packed/") for p in paths) and "model.safetensors" in paths
    assert everything["size"] == sum(a["size"] for a in everything["data"]) and everything["parts"] == []
    seen: set[str] = set()
    for part in ("dense", "packed", "report"):
        listing = api.client.get(f"/v1/jobs/{job.id}/artifacts", params={"part": part}).json()
        names = {a["path"] for a in listing["data"]}
        assert names and not names & seen and listing["parts"] == [part]
        assert listing["archive"] == f"/v1/jobs/{job.id}/artifacts.tar?part={part}"
        with tarfile.open(fileobj=io.BytesIO(api.client.get(listing["archive"]).content)) as tar:
            assert set(tar.getnames()) == names
        seen |= names
    assert seen == paths
    assert {
        a["path"] for a in api.client.get(f"/v1/jobs/{job.id}/artifacts?part=report&part=dense").json()["data"]
    } == (paths - {p for p in paths if p.startswith("packed/")})
    bad = api.client.get(f"/v1/jobs/{job.id}/artifacts", params={"part": "weights"})
    assert bad.status_code == 422 and "part" in bad.json()["error"]["message"]

    # The CLI: the size first (stderr), the result on stdout, only the part asked for on disk.
    def through_the_app(request: httpx.Request) -> httpx.Response:
        answer = api.client.request(request.method, str(request.url), headers=dict(request.headers))
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    transport = httpx.MockTransport(through_the_app)
    monkeypatch.setattr(
        "secateurs.app.client_cli.open_client", lambda server, key: SecateursClient("http://t", transport=transport)
    )
    out = tmp_path / "packed-only"
    result = CliRunner().invoke(cli, ["download", job.id, "--output", str(out), "--only", "packed", "--json"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    written = json.loads(result.stdout)
    assert written["parts"] == ["packed"] and written["size"] == sum(f["size"] for f in written["files"])
    assert f"downloading {job.id} (packed): {len(written['files'])} files, " in result.stderr
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == {f["path"] for f in written["files"]} and all(p.startswith("packed/") for p in on_disk)

    dense = tmp_path / "dense-only"
    result = CliRunner().invoke(cli, ["download", job.id, "-o", str(dense), "--only", "dense"])
    assert result.exit_code == 0 and result.stdout.startswith(f"{dense}: ")
    assert (dense / "model.safetensors").is_file() and not (dense / "report.json").exists()
    assert not (dense / "packed").exists()


def test_only_the_embedded_root_warning_is_silenced() -> None:
    import warnings

    from celery.exceptions import SecurityWarning

    from secateurs.workers.cli import quiet_embedded_root_warning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_embedded_root_warning()
        warnings.warn(SecurityWarning("You're running the worker with superuser privileges: ..."), stacklevel=1)
        warnings.warn(SecurityWarning("insecure content type 'pickle'"), stacklevel=1)
        warnings.warn(UserWarning("You're running the worker with superuser privileges"), stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "insecure content type 'pickle'",
        "You're running the worker with superuser privileges",
    ]
