"""The REST API in process (store on SQLite, embedded broker): contract, bad input, auth, uploads, artifacts.

Jobs are run here by :func:`secateurs.workers.jobs.execute_job`, the plain function the Celery task calls; the real
broker and worker processes are exercised in ``test_service.py``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from secateurs.app.main import create_app
from secateurs.app.migrate import upgrade
from secateurs.app.schemas import Job, JobState
from secateurs.app.settings import Settings, hash_api_key
from secateurs.app.store import JobStore
from secateurs.workers.jobs import execute_job
from tests.conftest import TinyDir
from tests.models import bad_model_dir

TEXT = ("the quick brown fox jumps over the lazy dog while calibration text flows onward " * 300).encode()


@dataclass
class Api:
    client: TestClient
    settings: Settings
    store: JobStore
    allowed: Path  # the allow-listed root
    model: Path  # a tiny llama under it
    text: Path  # a text file under it

    def spec(self, **changes: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "model": str(self.model),
            "calibration": {"file": str(self.text)},
            "calibration_samples": 4,
            "calibration_seqlen": 32,
            "evaluation": {"file": str(self.text)},
            "eval_seqlen": 32,
            "eval_windows": 2,
            "device": "cpu",
            "measure_speed": False,  # on by default; tested in test_speed.py
        }
        spec.update(changes)
        return spec

    def run(self, job_id: str) -> Job:
        execute_job(job_id, self.store, self.settings, worker="test:1")
        return self.store.get(job_id)

    def healthy(self) -> bool:
        return self.client.get("/healthz").status_code == 200


def make_api(tmp_path: Path, tiny_dir: TinyDir, **settings: Any) -> Iterator[Api]:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    model = tiny_dir("llama")
    (allowed / "llama").symlink_to(model)  # a symlink *inside* the root that stays inside is fine
    model = allowed / "llama"
    model_copy = allowed / "model"
    model_copy.mkdir()
    for item in model.iterdir():
        (model_copy / item.name).write_bytes(item.read_bytes())
    text = allowed / "text.txt"
    text.write_bytes(TEXT)
    config = Settings(
        data_dir=tmp_path / "data", allowed_roots=[allowed, model.resolve()], max_upload_bytes=2_000_000, **settings
    )
    upgrade(config.store_url)
    with TestClient(create_app(config)) as client:
        yield Api(client, config, JobStore(config.store_url), allowed, model_copy, text)


@pytest.fixture
def api(tmp_path: Path, tiny_dir: TinyDir) -> Iterator[Api]:
    yield from make_api(tmp_path, tiny_dir)


def _error(response: Any, status: int, contains: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert contains in error["message"], error
    assert error["hint"], error


def test_a_job_runs_and_serves_report_artifacts_archive_and_events(api: Api) -> None:
    created = api.client.post("/v1/jobs", json=api.spec())
    assert created.status_code == 201, created.text
    job = Job.model_validate(created.json())
    assert job.state is JobState.QUEUED and job.attempts == 0
    done = api.run(job.id)
    assert done.state is JobState.SUCCEEDED and done.attempts == 1 and done.result is not None
    assert done.result.sparsity_verified and done.result.perplexity_pruned is not None

    served = api.client.get(f"/v1/jobs/{job.id}").json()
    assert served["state"] == "succeeded" and served["result"]["pruned_fraction"] == pytest.approx(0.5)
    report = api.client.get(f"/v1/jobs/{job.id}/report").json()
    assert report["format"] == "secateurs.report/1" and report["sparsity"]["verified"]

    listing = api.client.get(f"/v1/jobs/{job.id}/artifacts").json()
    names = {a["path"] for a in listing["data"]}
    assert {"config.json", "model.safetensors", "report.json"} <= names
    one = api.client.get(f"/v1/jobs/{job.id}/artifacts/config.json")
    assert one.status_code == 200 and json.loads(one.content)["model_type"] == "llama"
    _error(api.client.get(f"/v1/jobs/{job.id}/artifacts/..%2F..%2Fsecateurs.db"), 404, "no artifact")

    archive = api.client.get(listing["archive"])
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/x-tar"
    folder = api.settings.artifacts_dir / job.id
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == names
        for name in names:
            extracted = tar.extractfile(members[name])
            assert extracted is not None and extracted.read() == (folder / name).read_bytes()

    stream = api.client.get(f"/v1/jobs/{job.id}/events")
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = _parse_sse(stream.text)
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    states = [e["data"]["state"] for e in events if e["event"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    blocks = [
        e["data"]["progress"]["block"] for e in events if e["data"]["progress"] and e["data"]["progress"]["block"]
    ]
    assert blocks == [1, 2]
    resumed = _parse_sse(api.client.get(f"/v1/jobs/{job.id}/events", headers={"Last-Event-ID": "3"}).text)
    assert [e["id"] for e in resumed] == [e["id"] for e in events[3:]]


def _parse_sse(text: str) -> list[dict[str, Any]]:
    events = []
    for chunk in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in chunk.splitlines() if not line.startswith(":"))
        if fields:
            events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


def test_idempotency_key(api: Api) -> None:
    headers = {"Idempotency-Key": "batch-1/entry-0"}
    first = api.client.post("/v1/jobs", json=api.spec(), headers=headers)
    again = api.client.post("/v1/jobs", json=api.spec(), headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    _error(api.client.post("/v1/jobs", json=api.spec(seed=1), headers=headers), 409, "different request body")


def test_paging_filtering_and_cancel(api: Api) -> None:
    ids = [api.client.post("/v1/jobs", json=api.spec(seed=i)).json()["id"] for i in range(3)]
    page = api.client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = api.client.get("/v1/jobs", params={"limit": 2, "after": page["next_after"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    cancelled = api.client.post(f"/v1/jobs/{ids[0]}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert api.run(ids[0]).state is JobState.CANCELLED  # a worker that gets the message later does nothing
    _error(api.client.post(f"/v1/jobs/{ids[0]}/cancel"), 409, "already cancelled")
    only = api.client.get("/v1/jobs", params={"state": "cancelled"}).json()["data"]
    assert [j["id"] for j in only] == [ids[0]]
    _error(api.client.get(f"/v1/jobs/{ids[1]}/report"), 409, "is queued")
    _error(api.client.get("/v1/jobs/job_missing"), 404, "no job")


# --- bad input: a 4xx that says what to change, or a failed job that does; never a 5xx ------------------------


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (lambda api, tmp: {"model": str(api.allowed / ".." / "x")}, 403, "contains '..'"),
        (lambda api, tmp: {"model": str(tmp)}, 403, "not under the server's allowed roots"),
        (lambda api, tmp: {"model": _escape(api, tmp)}, 403, "symlink that leads outside"),
        (lambda api, tmp: {"model": "relative/dir/model"}, 422, "neither a hub id"),
        (lambda api, tmp: {"model": _bad(api, "pickle")}, 422, "found pickle weights: pytorch_model.bin"),
        (lambda api, tmp: {"model": _bad(api, "remote")}, 422, "needs remote code"),
        (lambda api, tmp: {"pattern": "5:4"}, 422, "not a valid N:M pattern"),
        (lambda api, tmp: {"calibration_samples": 0}, 422, "calibration_samples"),
        (lambda api, tmp: {"calibration": {"file": str(api.allowed / "nope.txt")}}, 422, "does not exist"),
        (lambda api, tmp: {"colour": "blue"}, 422, "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_specs_get_a_clear_4xx(api: Api, tmp_path: Path, make: Any, status: int, message: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    _error(api.client.post("/v1/jobs", json=api.spec(**make(api, outside))), status, message)
    assert api.healthy()


def _bad(api: Api, kind: str) -> str:
    return str(bad_model_dir(api.allowed, api.model, kind))


def _escape(api: Api, outside: Path) -> str:
    link = api.allowed / "escape"
    link.symlink_to(outside, target_is_directory=True)
    return str(link)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "encoder"}, "not a causal language model"),
        ({"model": "odd"}, "not a multiple of M=4"),
        # The API does not tokenize: a text too short for one window is the job's failure, with the minimum.
        ({"calibration": "short"}, "but a window of 32 needs at least 33"),
        ({"evaluation": "short"}, "fewer than one window of 32"),
    ],
)
def test_bad_models_and_data_end_as_failed_jobs_with_a_reason(api: Api, change: dict[str, str], message: str) -> None:
    spec = api.spec()
    if "model" in change:
        spec["model"] = _bad(api, change["model"])
    else:
        (api.allowed / "short.txt").write_bytes(b"a few words only")
        spec[next(iter(change))] = {"file": str(api.allowed / "short.txt")}
    created = api.client.post("/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    job = api.run(created.json()["id"])
    assert job.state is JobState.FAILED and job.error is not None, job
    assert message in job.error.message and job.error.hint
    assert not (api.settings.artifacts_dir / job.id).exists()
    assert not list(api.settings.artifacts_dir.glob(".secateurs-tmp-*"))


def test_an_unknown_hub_model_fails_with_a_reason(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here; online, the hub answers 404 the same way
    created = api.client.post("/v1/jobs", json=api.spec(model="no-such-org/no-such-model"))
    assert created.status_code == 201
    job = api.run(created.json()["id"])
    assert job.state is JobState.FAILED and job.error is not None
    assert "could not fetch 'no-such-org/no-such-model'" in job.error.message
    assert job.error.hint is not None and "check the model id" in job.error.hint


def test_malformed_json_is_a_422_not_a_500(api: Api) -> None:
    response = api.client.post("/v1/jobs", content=b'{"model": ', headers={"Content-Type": "application/json"})
    _error(response, 422, "not valid JSON")
    _error(api.client.post("/v1/jobs", json=["a", "list"]), 422, "request body")
    assert api.healthy()


# --- uploads ---------------------------------------------------------------------------------------------------


def _tar(files: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def test_uploaded_model_and_text_run_as_a_job(api: Api) -> None:
    files = {f"my-model/{p.name}": p.read_bytes() for p in api.model.iterdir()}
    model = api.client.post("/v1/uploads", params={"kind": "model"}, content=_tar(files))
    assert model.status_code == 201, model.text
    text = api.client.post("/v1/uploads", params={"kind": "text"}, content=TEXT)
    assert text.status_code == 201 and text.json()["size"] == len(TEXT)
    spec = api.spec(model=f"upload:{model.json()['id']}", calibration={"file": f"upload:{text.json()['id']}"})
    created = api.client.post("/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    assert api.run(created.json()["id"]).state is JobState.SUCCEEDED


def test_bad_uploads_are_refused_and_leave_nothing(api: Api) -> None:
    config = (api.model / "config.json").read_bytes()
    weights = (api.model / "model.safetensors").read_bytes()
    _error(
        api.client.post("/v1/uploads", params={"kind": "model"}, content=_tar({"../evil/config.json": config})),
        422,
        "escapes the folder",
    )
    _error(
        api.client.post(
            "/v1/uploads", params={"kind": "model"}, content=_tar({"config.json": config}, "x.safetensors")
        ),
        422,
        "is a link",
    )
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("config.json", config)
        zf.writestr("pytorch_model.bin", b"pickle")
    _error(api.client.post("/v1/uploads", params={"kind": "model"}, content=zipped.getvalue()), 422, "pickle")
    big = _tar({"config.json": config, "model.safetensors": weights * 4})  # over the 2 MB cap once extracted
    _error(api.client.post("/v1/uploads", params={"kind": "model"}, content=big), 413, "cap")
    _error(api.client.post("/v1/uploads", params={"kind": "text"}, content=b"x" * 2_000_001), 413, "cap")
    _error(api.client.post("/v1/uploads", params={"kind": "text"}, content=b"\xff\xfe"), 422, "not UTF-8")
    _error(api.client.post("/v1/jobs", json=api.spec(model="upload:upl_00000000000000000000")), 422, "no model upload")
    assert [p.name for p in api.settings.uploads_dir.iterdir()] == []
    assert api.healthy()


# --- auth, health, layering ------------------------------------------------------------------------------------


def test_api_keys(tmp_path: Path, tiny_dir: TinyDir) -> None:
    for api in make_api(tmp_path, tiny_dir, api_keys=[hash_api_key("sk-right")]):
        _error(api.client.get("/v1/jobs"), 401, "needs an API key")
        _error(api.client.get("/v1/jobs", headers={"Authorization": "Bearer sk-wrong"}), 401, "not valid")
        assert api.client.get("/v1/jobs", headers={"Authorization": "Bearer sk-right"}).status_code == 200
        assert api.client.get("/v1/jobs", headers={"X-API-Key": "sk-right"}).status_code == 200
        assert api.client.get("/healthz").status_code == 200 and api.client.get("/readyz").status_code == 200


def test_settings_refuse_plain_keys() -> None:
    with pytest.raises(ValueError, match="holds hashes, not keys"):
        Settings(api_keys=["sk-plain"])


def test_the_api_process_never_imports_torch() -> None:
    code = (
        "import sys, secateurs.app.main, secateurs.app.client_cli, secateurs.app.server_cli; "
        "create = secateurs.app.main.create_app; " + ("assert 'torch' not in sys.modules, 'torch imported'")
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_pruned_weights_downloaded_equal_the_stored_ones(api: Api) -> None:
    job = api.run(api.client.post("/v1/jobs", json=api.spec(method="magnitude", calibration=None)).json()["id"])
    assert job.state is JobState.SUCCEEDED
    data = api.client.get(f"/v1/jobs/{job.id}/artifacts/model.safetensors").content
    stored = load_file(api.settings.artifacts_dir / job.id / "model.safetensors")
    path = api.allowed / "downloaded.safetensors"
    path.write_bytes(data)
    downloaded = load_file(path)
    assert downloaded.keys() == stored.keys()
    assert all(downloaded[k].equal(stored[k]) for k in stored)
