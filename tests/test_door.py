"""Every bad request is caught at the API's door with its own message: never a 5xx (issue 12).

Control characters (NUL first) and lone surrogates in any path or name, paths the file system cannot hold, bodies
that are not UTF-8 or not JSON, non-finite numbers, a file where a folder is expected and the reverse, empty or
whitespace-only texts, unknown cursors. The property tests put control characters into every string field.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secateurs.app.main import create_app
from secateurs.app.migrate import upgrade
from secateurs.app.schemas import JobState
from secateurs.app.settings import Settings
from tests.conftest import TinyDir
from tests.test_api import Api, make_api

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def api(tmp_path: Path, tiny_dir: TinyDir) -> Iterator[Api]:
    yield from make_api(tmp_path, tiny_dir)


def _error(response: Any, status: int, contains: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert contains in error["message"], error
    assert error["hint"], error
    return error


def _post(api: Api, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return api.client.post("/v1/jobs", content=content, headers=JSON if headers is None else headers)


def _files(api: Api) -> dict[str, str]:
    """Files and folders under the allowed root that are each wrong in one way."""
    (api.allowed / "empty.txt").write_bytes(b"")
    (api.allowed / "blank.txt").write_bytes(" \n\t\r\n  \u3000\n".encode())  # U+3000: ideographic space
    (api.allowed / "texts").mkdir(exist_ok=True)
    return {
        "empty": str(api.allowed / "empty.txt"),
        "blank": str(api.allowed / "blank.txt"),
        "folder": str(api.allowed / "texts"),
        "weights": str(api.model / "model.safetensors"),
    }


# --- one request, one status, one message ------------------------------------------------------------------


# Spec changes (strings formatted with the Api's paths and _files' names) and the message each must get: all 422.
SPECS: dict[str, tuple[dict[str, Any], str]] = {
    "NUL outside the roots": ({"model": "/models/smol\u0000lm2"}, "model: contains U+0000 (NUL) at character 13"),
    "NUL in an allowed path": ({"model": "{model}\u0000"}, "model: contains U+0000 (NUL) at character"),
    "NUL in calibration.file": ({"calibration": {"file": "{text}\u0000x"}}, "calibration.file: contains U+0000"),
    "NUL in evaluation.file": ({"evaluation": {"file": "\u0000"}}, "evaluation.file: contains U+0000 (NUL)"),
    "ESC in revision": ({"model": "org/name", "revision": "main\u001b[31m"}, "revision: contains U+001B (ESC)"),
    "newline in exclude": ({"exclude": ["*.down_proj\n"]}, "exclude.0: contains U+000A (LF, a newline)"),
    "DEL in a dataset": ({"calibration": {"dataset": "c4\u007f"}}, "calibration.dataset: contains U+007F (DEL)"),
    "C1 control in a path": ({"model": "{model}\u0085"}, "model: contains U+0085 (a control character)"),
    "TAB in a pattern": ({"pattern": "2:4\t"}, "pattern: contains U+0009 (TAB)"),
    "a name over 255 bytes": ({"model": "{allowed}/" + "a" * 300}, "a file or folder name has at most 255"),
    "a text name over 255 bytes": (
        {"evaluation": {"file": "{allowed}/" + "é" * 150}},
        "evaluation path has a component of 300 bytes",
    ),
    "a path over PATH_MAX": ({"model": "{long_path}"}, "model path is 4096 bytes long; a path has at most 4095"),
    "a path over the field": ({"model": "{longer_path}"}, "model: String should have at most 4096 characters"),
    "NaN dampening": ({"dampening": float("nan")}, "dampening: NaN is not a finite number"),
    "Infinity samples": ({"calibration_samples": float("inf")}, "calibration_samples: Infinity is not a finite"),
    "-Infinity dense target": ({"dense_target": float("-inf")}, "dense_target: -Infinity is not a finite number"),
    "NaN ratio pattern": ({"pattern": "nan"}, "pattern 'nan' is not a finite number"),
    "model is a file": ({"model": "{weights}"}, "model.safetensors is a file, not a folder"),
    "text is a folder": ({"calibration": {"file": "{folder}"}}, "texts is a folder, not a text file"),
    "text is empty": ({"evaluation": {"file": "{empty}"}}, "empty.txt is empty (0 bytes)"),
    "text is whitespace": ({"calibration": {"file": "{blank}"}}, "blank.txt holds only whitespace (11 bytes)"),
    "text is missing": ({"calibration": {"file": "{allowed}/nope.txt"}}, "nope.txt does not exist"),
    "model is missing": ({"model": "{allowed}/nope"}, "nope does not exist"),
}


def _long_path(root: Path, length: int) -> str:
    path = str(root)
    while len(path) < length:
        path += "/" + "d" * min(200, length - len(path) - 1)
    return path[:length]


def _fill(template: Any, names: dict[str, str]) -> Any:
    if isinstance(template, str):
        return template.format(**names) if "{" in template else template
    if isinstance(template, dict):
        return {key: _fill(value, names) for key, value in template.items()}
    if isinstance(template, list):
        return [_fill(value, names) for value in template]
    return template


@pytest.mark.parametrize("case", SPECS.values(), ids=SPECS.keys())
def test_a_bad_spec_is_a_422_with_its_own_message(api: Api, case: tuple[dict[str, Any], str]) -> None:
    template, message = case
    names = {
        **_files(api),
        "model": str(api.model),
        "text": str(api.text),
        "allowed": str(api.allowed),
        "long_path": _long_path(api.allowed, 4096),
        "longer_path": _long_path(api.allowed, 5000),
    }
    error = _error(_post(api, api.spec(**_fill(template, names))), 422, message)
    assert "less than" not in error["message"] and "greater than" not in error["message"]
    assert api.healthy()


def test_the_issue_s_nul_request_on_an_embedded_server(tmp_path: Path) -> None:
    """Issue 12's curl, against the embedded server's settings (every local path allowed: roots = /)."""
    config = Settings(data_dir=tmp_path / "data", allowed_roots=[Path("/")])
    upgrade(config.store_url)
    body = b'{"model": "/models/smol\\u0000lm2", "calibration": {"file": "c4.utf8"}}'
    with TestClient(create_app(config)) as client:
        error = _error(client.post("/v1/jobs", content=body, headers=JSON), 422, "model: contains U+0000 (NUL)")
        assert error["type"] == "invalid_request"
        for field in ("calibration", "evaluation"):
            spec = {"model": "org/x", field: {"file": f"{tmp_path}/c4\u0000.utf8"}}
            _error(client.post("/v1/jobs", json=spec), 422, f"{field}.file: contains U+0000 (NUL)")


def test_door_messages_say_which_of_file_folder_empty_blank(api: Api) -> None:
    """Each of these used to be 'does not exist' (or accepted, to fail 9 s later): now each says what it is."""
    files = _files(api)
    said = {
        "model is a file": _post(api, api.spec(model=files["weights"])).json()["error"]["message"],
        "text is a folder": _post(api, api.spec(calibration={"file": files["folder"]})).json()["error"]["message"],
        "text is empty": _post(api, api.spec(evaluation={"file": files["empty"]})).json()["error"]["message"],
        "text is blank": _post(api, api.spec(calibration={"file": files["blank"]})).json()["error"]["message"],
    }
    assert said["model is a file"].endswith("is a file, not a folder")
    assert said["text is a folder"].endswith("is a folder, not a text file")
    assert said["text is empty"].endswith("is empty (0 bytes)")
    assert "holds only whitespace" in said["text is blank"]
    assert len(set(said.values())) == 4 and not any("does not exist" in m for m in said.values())


def test_an_uploaded_whitespace_text_is_refused_at_the_door(api: Api) -> None:
    upload = api.client.post("/v1/uploads", params={"kind": "text"}, content=b"   \n\n  ")
    assert upload.status_code == 201, upload.text
    spec = api.spec(calibration={"file": f"upload:{upload.json()['id']}"})
    _error(_post(api, spec), 422, "holds only whitespace")


PLAIN, FORM = "text/plain", "application/x-www-form-urlencoded"
MAGNITUDE = b'{"model": "org/x", "method": "magnitude"}'
# Raw bodies, their Content-Type (None: no header), and the status and message each must get.
BODIES: dict[str, tuple[bytes, str | None, int, str]] = {
    "not UTF-8": (b'{"model": "\xff\xfe"}', JSON["Content-Type"], 422, "not UTF-8 text: byte 0xff at position 11"),
    "Latin-1": ('{"model": "café/x"}'.encode("latin-1"), JSON["Content-Type"], 422, "not UTF-8 text: byte 0xe9"),
    "malformed": (b'{"model": "x",\n  "method": magnitude}', JSON["Content-Type"], 422, "at line 2, column 13"),
    "truncated": (b'{"model": ', JSON["Content-Type"], 422, "not valid JSON: Expecting value at line 1, column 11"),
    "trailing comma": (b'{"model": "x",}', JSON["Content-Type"], 422, "in double quotes at line 1, column 15"),
    "lone surrogate": (b'{"model": "\\ud800"}', JSON["Content-Type"], 422, "model: not valid Unicode text"),
    "surrogate key": (b'{"\\udfff": 1, "model": "x"}', JSON["Content-Type"], 422, "not valid Unicode text"),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, JSON["Content-Type"], 422, "nested too deeply"),
    "5000 digits": (b'{"model": "x", "seed": ' + b"7" * 5000 + b"}", JSON["Content-Type"], 422, "(4300 digits)"),
    "text/plain": (MAGNITUDE, PLAIN, 415, "reads a JSON body, and this one was sent as Content-Type: text/plain"),
    "a form (curl -d)": (MAGNITUDE, FORM, 415, f"sent as Content-Type: {FORM}"),
    "no Content-Type": (MAGNITUDE, None, 415, "sent without a Content-Type header"),
    "a JSON list": (b'["a", "list"]', JSON["Content-Type"], 422, "request body: Input should be a valid dictionary"),
}


@pytest.mark.parametrize("case", BODIES.values(), ids=BODIES.keys())
def test_a_bad_body_is_a_4xx_with_its_own_message(api: Api, case: tuple[bytes, str | None, int, str]) -> None:
    body, content_type, status, message = case
    error = _error(_post(api, body, {"Content-Type": content_type} if content_type else {}), status, message)
    assert error["type"] == ("unsupported_media_type" if status == 415 else "invalid_request")
    assert api.healthy()


def test_malformed_json_says_where_and_what_to_do(api: Api) -> None:
    error = _error(_post(api, b'{"model": "org/x",\n "calibration": {file: "c4.utf8"}}'), 422, "line 2, column 18")
    assert "double quotes" in error["hint"]


def test_json_with_a_charset_and_json_subtypes_are_read(api: Api) -> None:
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = _post(api, api.spec(method="magnitude", calibration=None), {"Content-Type": content_type})
        assert response.status_code == 201, (content_type, response.text)


def test_cursors_and_headers(api: Api) -> None:
    _error(api.client.get("/v1/jobs", params={"after": "garbage"}), 422, "after='garbage' is not a job id")
    _error(api.client.get("/v1/jobs", params={"after": "job_\u0000"}), 422, "is not a job id")
    _error(api.client.get("/v1/jobs", params={"after": "job_" + "0" * 20}), 422, "no such job to continue after")
    first = _post(api, api.spec(seed=1)).json()["id"]
    second = _post(api, api.spec(seed=2)).json()["id"]
    page = api.client.get("/v1/jobs", params={"after": second})
    assert page.status_code == 200 and [j["id"] for j in page.json()["data"]] == [first]
    _error(api.client.get("/v1/jobs/job%00x"), 404, "no job")
    _error(
        api.client.post(
            "/v1/jobs",
            content=json.dumps(api.spec()).encode(),
            headers={**JSON, "Idempotency-Key": "k\xe9".encode("latin-1")},
        ),
        422,
        "Idempotency-Key",
    )
    # Event ids: a Unicode digit or an id beyond any real one resumes after everything, never a 500.
    events = api.client.get(f"/v1/jobs/{first}/events", params={"after": 2**60})
    _error(events, 422, "after")
    api.client.post(f"/v1/jobs/{first}/cancel")  # so that the stream ends
    for last in ("²", "9" * 40):
        stream = api.client.get(f"/v1/jobs/{first}/events", headers={"Last-Event-ID": last.encode("latin-1")})
        assert stream.status_code == 200, stream.text
    assert api.healthy()


def test_an_upload_id_with_a_nul_or_too_long_is_not_found(api: Api) -> None:
    for upload_id in ("upl_%00", "upl_" + "a" * 300, "upl_0123456789abcdef0123"):
        _error(api.client.get(f"/v1/uploads/{upload_id}"), 404, "no upload")


def test_an_artifact_path_with_a_nul_is_not_found(api: Api) -> None:
    job = api.run(_post(api, api.spec(method="magnitude", calibration=None, evaluation=None)).json()["id"])
    assert job.state is JobState.SUCCEEDED
    for path in ("con%00fig.json", "a" * 300, "x/" * 2100):
        _error(api.client.get(f"/v1/jobs/{job.id}/artifacts/{path}"), 404, "no artifact")


# --- properties: control characters anywhere --------------------------------------------------------------------

# Where each string field of a spec sits, and how a test value is put there (paths under the allowed root).
FIELDS = {
    "model": lambda a, v: {"model": f"{a.allowed}/{v}"},
    "calibration.file": lambda a, v: {"calibration": {"file": f"{a.allowed}/{v}"}},
    "evaluation.file": lambda a, v: {"evaluation": {"file": f"{a.allowed}/{v}"}},
    "calibration.dataset": lambda a, v: {"calibration": {"dataset": f"c4{v}"}},
    "evaluation.dataset_config": lambda a, v: {"evaluation": {"dataset": "wikitext", "dataset_config": v or "x"}},
    "revision": lambda a, v: {"model": "org/name", "revision": f"main{v}"},
    "exclude.0": lambda a, v: {"exclude": [f"*{v}"]},
    "pattern": lambda a, v: {"pattern": f"2:4{v}"},
    "device": lambda a, v: {"device": f"cpu{v}"},
}
CONTROL = st.characters(categories=["Cc", "Cs"])  # C0, DEL, C1 and lone surrogates
ANY_TEXT = st.text(st.characters(exclude_categories=[]), max_size=12)  # everything Unicode has, surrogates included
PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _send(api: Api, field: str, value: str) -> Any:
    body = json.dumps(api.spec(**FIELDS[field](api, value)), ensure_ascii=True)  # \\uXXXX: surrogates travel too
    return api.client.post("/v1/jobs", content=body.encode(), headers=JSON)


@PROPERTY
@given(field=st.sampled_from(sorted(FIELDS)), before=ANY_TEXT, control=CONTROL, after=ANY_TEXT)
def test_a_control_character_in_any_string_field_is_a_422_naming_the_field(
    api: Api, field: str, before: str, control: str, after: str
) -> None:
    response = _send(api, field, before + control + after)
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith(f"{field}: "), message
    assert "contains U+" in message or "not valid Unicode text" in message or field == "device", message


@PROPERTY
@given(field=st.sampled_from(sorted(FIELDS)), value=ANY_TEXT)
def test_any_text_in_any_string_field_is_never_a_5xx(api: Api, field: str, value: str) -> None:
    response = _send(api, field, value)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["hint"], error
        if any(unicodedata.category(char) in ("Cc", "Cs") for char in value):
            assert response.status_code == 422, response.text
