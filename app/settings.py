"""The only reader of the environment: every tunable of a secateurs process lives here."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "secateurs"


class Settings(BaseSettings):
    """Process settings, read from ``SECATEURS_*`` environment variables (or a ``.env`` file)."""

    model_config = SettingsConfigDict(env_prefix="SECATEURS_", env_file=".env", extra="ignore")

    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Where offline assets live.")
    log_level: str = Field(default="INFO", description="Python logging level for library code.")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
