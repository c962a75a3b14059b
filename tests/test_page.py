"""The status page's routes, in process: HTML and static files served without a key, data still guarded.

The page itself runs in a real browser in ``test_browser.py``; here are the fast properties: what is served,
with which headers, that nothing outside ``app/static`` is reachable, that no script builds HTML from strings
or loads anything from another origin, that the files ship in the package, and that torch never loads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from secateurs.app.main import create_app
from secateurs.app.migrate import upgrade
from secateurs.app.page import ASSETS, STATIC
from secateurs.app.settings import Settings, hash_api_key

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["/", "/jobs/job_01a20000000000000000"]
UNGUARDED = {"/", "/jobs/{job_id}", "/static/{name}", "/healthz", "/readyz"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", api_keys=[hash_api_key("sk-page")])
    upgrade(settings.store_url)
    with TestClient(create_app(settings)) as client:
        yield client


def _references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize("path", PAGES)
def test_pages_are_html_without_a_key(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert '<html lang="en">' in response.text and 'name="viewport"' in response.text
    for reference in _references(response.text):  # everything the page loads comes from this server
        assert reference.startswith(("/", "#")) and not reference.startswith("//"), reference
        if reference.startswith("/static/"):
            assert client.get(reference).status_code == 200, reference


def test_every_static_file_is_served_with_its_type(client: TestClient) -> None:
    names = {p.name for p in STATIC.iterdir() if p.suffix != ".html"}
    assert names == set(ASSETS) and {"common.js", "list.js", "job.js", "plot.js", "style.css"} <= names
    for name, media_type in ASSETS.items():
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"] == media_type
        assert response.content == (STATIC / name).read_bytes()
    for script in STATIC.glob("*.js"):  # every module a script imports is served too
        for module in re.findall(r'from "\./([^"]+)"', script.read_text()):
            assert module in ASSETS, f"{script.name} imports {module}, which is not served"


@pytest.mark.parametrize(
    "path", ["/static/page.py", "/static/..%2Fpage.py", "/static/%2e%2e/settings.py", "/static/index.html", "/static/"]
)
def test_nothing_else_is_reachable(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404, response.text
    assert "error" in response.json()


def test_data_routes_stay_guarded(client: TestClient) -> None:
    """Every route of the REST API except the health checks answers 401 without a key; the page's need none."""
    schema = client.get("/openapi.json").json()
    assert not set(schema["paths"]) & {"/", "/jobs/{job_id}", "/static/{name}"}  # the page is no API
    checked = 0
    for template, operations in schema["paths"].items():
        if template in UNGUARDED:
            continue
        path = re.sub(r"\{[^}]+\}", "job_01a20000000000000000", template)
        for method in operations:
            response = client.request(method.upper(), path)
            assert response.status_code == 401, f"{method} {template}: {response.status_code}"
            checked += 1
    assert checked >= 8
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer sk-page"}).status_code == 200
    assert client.get("/", headers={"Authorization": "Bearer sk-wrong"}).status_code == 200  # a page has no data


def test_scripts_never_build_html_from_strings() -> None:
    """Job specs hold user strings: scripts insert text with textContent / text nodes, never as markup."""
    forbidden = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|srcdoc")
    for script in STATIC.glob("*.js"):
        source = script.read_text()
        assert not forbidden.search(source), f"{script.name}: {forbidden.search(source)}"
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", source), f"{script.name} names another origin"
    for sheet in STATIC.glob("*.css"):
        assert "url(" not in sheet.read_text() and "@import" not in sheet.read_text()


def test_static_files_ship_in_the_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = config["tool"]["setuptools"]["package-data"]["secateurs.app"]
    assert "static/*" in shipped and "migrations/*.mako" in shipped


def test_the_page_never_needs_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from fastapi.testclient import TestClient; import secateurs.app.page, secateurs.app.main; "
        "c = TestClient(secateurs.app.main.create_app()); "
        "assert all(c.get(p).status_code == 200 for p in ('/', '/jobs/x', '/static/job.js')); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**env, "SECATEURS_DATA_DIR": str(tmp_path)})
