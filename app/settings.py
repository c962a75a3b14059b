"""The only reader of the environment: every tunable of a secateurs process lives here.

Two modes, chosen by ``SECATEURS_BROKER_URL``:

* **embedded** (unset): ``secateurs serve`` runs the API and one Celery worker on this machine; the broker is
  Kombu's filesystem transport and the job store a SQLite file, both under ``data_dir``. No server needed.
* **distributed** (``redis://…``): API and ``secateurs worker`` processes run apart, on as many machines as
  wanted; the store is then usually PostgreSQL (``SECATEURS_DATABASE_URL``) and ``data_dir`` shared storage.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

QUEUE = "gpu"  # the one Celery queue jobs go to: one worker process per GPU consumes it
TASK_NAME = "secateurs.run_job"  # the API sends this by name; it never imports the worker code


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "secateurs"


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "secateurs"


def hash_api_key(key: str) -> str:
    """How API keys are stored in settings: ``sha256:<hex>`` of the key (``secateurs api-key`` makes one)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _split(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Process settings, read from ``SECATEURS_*`` environment variables (or a ``.env`` file)."""

    model_config = SettingsConfigDict(env_prefix="SECATEURS_", env_file=".env", extra="ignore")

    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Where offline assets live.")
    log_level: str = Field(default="INFO", description="Python logging level for library code.")

    # --- the service ----------------------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Job artifacts, uploads, and in embedded mode the SQLite store and the broker's folders.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the job store; default sqlite:///<data_dir>/secateurs.db."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker (redis://host:6379/0); unset: embedded filesystem broker."
    )
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated folders under which the API may read local models and texts "
        "(resolved, symlinks followed). Empty: local paths are refused. `secateurs serve` in embedded mode "
        "allows '/' (the caller's own files) unless this is set.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated 'sha256:<hex>' hashes of accepted API keys; empty: no key needed.",
    )
    max_upload_bytes: int = Field(default=8 * 2**30, ge=1, description="Cap on one upload, counted as it streams.")
    job_time_limit: int = Field(default=12 * 3600, ge=60, description="Hard limit of one job attempt (s).")
    heartbeat_timeout: float = Field(
        default=600.0, gt=0, description="A running job whose heartbeat is older than this is requeued (s)."
    )
    heartbeat_interval: float = Field(default=10.0, gt=0, description="How often a running job heartbeats (s).")
    reaper_interval: float = Field(default=30.0, gt=0, description="How often the API looks for dead jobs (s).")
    max_attempts: int = Field(default=3, ge=1, description="Attempts before a job whose worker died fails.")
    worker_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness of a job's process: the API and event streams on the same machine stay responsive.",
    )
    event_poll_interval: float = Field(default=0.5, gt=0, description="How often an event stream polls (s).")

    dense_cache_dir: Path | None = Field(
        default=None,
        description="Where dense perplexities are cached, to be computed once per model, text and protocol; "
        "default <data_dir>/dense-perplexity for the service's workers, <cache_dir>/dense-perplexity for "
        "`secateurs prune` and secateurs.prune().",
    )

    # --- the packed 2:4 CPU kernel (secateurs.kernels.sparse.cpu) ------------------------------------------
    kernel_dir: Path | None = Field(
        default=None,
        description="Where the packed 2:4 CPU kernel is compiled on first use and cached; default <cache_dir>/kernels.",
    )
    cpu_isa: Literal["auto", "scalar", "avx2", "avx512", "avx512bf16", "amx"] = Field(
        default="auto",
        description="Instruction set of the packed 2:4 CPU kernel: auto (the best this CPU has), or one forced "
        "(refused when the CPU lacks it).",
    )

    # --- the batch CLI (a client of the REST API) --------------------------------------------------------
    server_url: str = Field(
        default="http://127.0.0.1:8000",
        validation_alias=AliasChoices("SECATEURS_SERVER", "SECATEURS_SERVER_URL", "server_url"),
        description="Where `secateurs submit/wait/...` find the REST API ($SECATEURS_SERVER).",
    )
    api_key: SecretStr | None = Field(default=None, description="Key the batch CLI sends (Authorization: Bearer).")

    @field_validator("allowed_roots", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split(value)

    @field_validator("api_keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not key.startswith("sha256:") or len(key) != 71:
                raise ValueError(
                    "SECATEURS_API_KEYS holds hashes, not keys: 'sha256:<64 hex>' (make one with `secateurs api-key`)"
                )
        return keys

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'secateurs.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def service_dense_cache_dir(self) -> Path:
        """The dense-perplexity cache of the service's workers: beside the artifacts, shared by every worker."""
        return self.dense_cache_dir or self.data_dir / "dense-perplexity"

    @property
    def local_dense_cache_dir(self) -> Path:
        """The dense-perplexity cache of ``secateurs prune`` and ``secateurs.prune()`` (no service)."""
        return self.dense_cache_dir or self.cache_dir / "dense-perplexity"

    @property
    def kernel_build_dir(self) -> Path:
        return self.kernel_dir or self.cache_dir / "kernels"

    @property
    def visibility_timeout(self) -> int:
        """Above the hard time limit, so Redis never redelivers a message whose job is still running."""
        return self.job_time_limit + 3600


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
