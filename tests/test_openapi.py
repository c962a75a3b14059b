"""Schemathesis over the OpenAPI schema: generated requests to every route find no 5xx and no schema violation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from secateurs.app.main import create_app
from secateurs.app.migrate import upgrade
from secateurs.app.settings import Settings, hash_api_key

KEY = "sk-schemathesis"


def _app(root: Path) -> Any:
    config = Settings(
        data_dir=root / "data",
        allowed_roots=[root / "allowed"],
        max_upload_bytes=100_000,
        api_keys=[hash_api_key(KEY)],  # so that "invalid authentication is rejected" is checked too
    )
    (root / "allowed").mkdir(parents=True, exist_ok=True)
    upgrade(config.store_url)
    return create_app(config)


def _schema() -> Any:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="secateurs-openapi-"))
    return schemathesis.openapi.from_asgi("/openapi.json", _app(root))


schema = _schema()


@pytest.fixture(scope="module", autouse=True)
def _lifespan() -> Any:
    """Run the app's startup (store, Celery producer) once; schemathesis then calls it in process."""
    from fastapi.testclient import TestClient

    with TestClient(schema.app):
        yield


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_responses_match_the_schema(case: Any) -> None:
    # Every check but one: "a schema-valid request is accepted" cannot hold for a pruning job, whose
    # acceptance depends on files (the model folder, the texts) that no schema can describe.
    case.call_and_validate(
        headers={"Authorization": f"Bearer {KEY}"}, excluded_checks=[schemathesis.checks.positive_data_acceptance]
    )
