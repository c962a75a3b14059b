"""The status page in a real headless browser: Debian's ``chromium`` driven by ``playwright-core`` (npm).

Two real servers: ``secateurs serve`` in embedded mode (API + one worker) and an API with keys and no worker.
``tests/browser/check_status_page.mjs`` does the checking (list, live progress, finished report with its plot,
a failure, a cancel, filter and paging, the API-key flow) and prints one line per check.

``SECATEURS_SCREENSHOT=docs/status-page.png pytest tests/test_browser.py`` refreshes the README's screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from secateurs.app.settings import hash_api_key
from tests.models import bad_model_dir, tiny_model, tiny_tokenizer
from tests.service import TEXT, _unavailable, job_spec, service_env, start_api

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FAST = {"heartbeat_interval": "0.5", "reaper_interval": "1", "event_poll_interval": "0.2"}


def _playwright() -> str:
    """The node binary, with playwright-core installed under tests/browser/node_modules (npm ci if missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node and npm are not installed")
    if not Path(CHROMIUM).exists():
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        done = subprocess.run(
            [str(npm), "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            _unavailable(f"npm ci failed in {BROWSER_DIR}:\n{done.stderr[-2000:]}")
    return str(node)


def test_status_page_in_chromium(tmp_path: Path) -> None:
    node = _playwright()
    slow = tmp_path / "llama16"
    tiny_model("llama", num_layers=16).save_pretrained(slow)
    tiny_tokenizer().save_pretrained(slow)
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    # A model that fails in the worker (a width that 2:4 cannot divide), in a folder whose name is markup.
    hostile = tmp_path / "odd <img src=x id=injected>"
    hostile.mkdir()
    failing = bad_model_dir(hostile, slow, "odd")

    logs = tmp_path / "logs"
    logs.mkdir()
    key = "sk-browser-test"
    main, url = start_api(service_env(tmp_path / "data", **FAST), logs / "serve.log")
    keyed = None
    try:
        keyed, keyed_url = start_api(
            service_env(tmp_path / "keyed", api_keys=hash_api_key(key), **FAST), logs / "keyed.log", "--no-worker"
        )
        config = {
            "url": url,
            "specs": {
                "slow": {**job_spec(slow, text, samples=128), "measure_speed": True},  # on a CPU: no 2:4 hardware
                "failing": job_spec(failing, text, samples=8),
                "cancel": job_spec(slow, text, samples=128),
            },
            "keyed": {"url": keyed_url, "key": key, "spec": job_spec(slow, text, samples=8)},
            "screenshot": str(Path(os.environ.get("SECATEURS_SCREENSHOT") or tmp_path / "status-page.png").resolve()),
        }
        (tmp_path / "config.json").write_text(json.dumps(config))
        started = time.monotonic()
        done = subprocess.run(
            [node, str(BROWSER_DIR / "check_status_page.mjs"), str(tmp_path / "config.json")],
            cwd=BROWSER_DIR,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        print(done.stdout, f"browser checks took {time.monotonic() - started:.1f} s", sep="\n")
        server_log = main.output()[-3000:]
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n--- serve.log\n{server_log}"
        assert Path(config["screenshot"]).stat().st_size > 10_000
    finally:
        main.stop()
        if keyed is not None:
            keyed.stop()
