"""Dense perplexity computed once: an entry per (model bytes, evaluation tokens, protocol, dtype, device type).

Every job on the same model and evaluation text used to recompute the same dense perplexity (issue 11 measured
96 s of dense evaluation in a P-CPU job on its machine). The first job stores its figure here; a later job whose
inputs hash the same reads it back and its report says so, naming the job (or output folder) it came from.

What the key covers, and why:

- **the model's bytes**: sha256 of ``config.json``, every ``*.safetensors`` file and the shard index, each by
  name. A file's sha256 is computed streaming, once, and remembered under ``files/`` by (resolved path,
  inode, size, mtime in ns), so a 100 GB checkpoint is hashed on its first job only;
- **the evaluation tokens**: the evaluation text's sha256 (:func:`secateurs.workers.data.read_text`) and the
  sha256 of the token windows actually evaluated, which also covers the tokenizer, the window length and
  the number of windows; the BOS id put before every window;
- **the arithmetic**: dtype, device type (``cpu``/``cuda``: fp32 and bf16, CPU and GPU, give different figures)
  and the torch and transformers versions (a new attention kernel moves the last digits).

The batch size does not change the value (every window is scored on its own), so it is recorded, not keyed.

Entries are small JSON files (``<key>.json``), written to a temporary file in the same folder and moved into place
with :func:`os.replace`: two workers that compute the same key at once both write, one wins, and a reader never
sees a torn file. An entry that cannot be read or does not validate is ignored (with a warning) and recomputed.
The cache is an optimization: a folder that cannot be written costs a warning, never the job.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from secateurs.app.schemas import DenseCacheHit, ProgressEvent, Stage
from secateurs.kernels.measure.perplexity import Perplexity

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the perplexity convention or the entry's layout changes: older entries then miss
CHUNK = 8 << 20  # bytes read per step while hashing a file
FILES_DIR = "files"  # remembered file hashes, by (path, inode, size, mtime)
RACY_SECONDS = 2  # a file modified this recently is hashed but its hash not remembered


def _write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` via a temporary file in the same folder and one :func:`os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide entries from workers running as other users
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256_stream(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _FileHash(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ident: str  # resolved path, inode, size, mtime in ns
    sha256: str


def model_files(folder: Path) -> list[Path]:
    """The files whose bytes decide a checkpoint's outputs: config.json, the shard index, every safetensors file."""
    names = ["config.json", "model.safetensors.index.json"]
    files = [folder / name for name in names if (folder / name).is_file()]
    return files + sorted(folder.glob("*.safetensors"))


@dataclass(frozen=True)
class DenseKey:
    """The inputs a dense perplexity depends on; :attr:`digest` names its entry."""

    model_sha256: str
    text_sha256: str
    tokens_sha256: str
    window: int
    windows: int
    bos_token_id: int | None
    dtype: str
    device_type: str
    torch: str
    transformers: str

    @property
    def digest(self) -> str:
        fields = {"format": FORMAT, **self.__dict__}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class DenseEntry(BaseModel):
    """One cached dense perplexity (``<digest>.json``): the figure, its inputs, and who computed it when."""

    model_config = ConfigDict(extra="forbid")

    format: int
    key: str
    inputs: dict[str, str | int | None]
    value: float
    nll: float
    windows: int
    seqlen: int
    predicted_tokens: int
    bos: bool
    batch_size: int
    seconds: float | None
    job_id: str | None
    output: str | None
    device_name: str | None
    created_at: str

    def perplexity(self) -> Perplexity:
        return Perplexity(
            value=self.value,
            nll=self.nll,
            windows=self.windows,
            seqlen=self.seqlen,
            predicted_tokens=self.predicted_tokens,
            bos=self.bos,
        )

    def hit(self) -> DenseCacheHit:
        return DenseCacheHit(
            key=self.key,
            job_id=self.job_id,
            output=self.output,
            created_at=self.created_at,
            seconds=self.seconds,
            batch_size=self.batch_size,
        )


class DenseCache:
    """Dense perplexities under ``folder`` (``<digest>.json``) and remembered file hashes (``files/``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    # --- keys ---------------------------------------------------------------------------------------------

    def file_sha256(self, path: Path) -> str:
        """sha256 of ``path``'s bytes, remembered by (resolved path, inode, size, mtime): computed once per version.

        A hash is not remembered when the file changed while it was read, or was modified within
        :data:`RACY_SECONDS` before (a write in the same clock tick would leave size and mtime as they were).
        """
        resolved = path.resolve()
        before = resolved.stat()
        ident = f"{resolved}\0{before.st_ino}\0{before.st_size}\0{before.st_mtime_ns}"
        memo = self.folder / FILES_DIR / f"{hashlib.sha256(ident.encode()).hexdigest()}.json"
        try:
            known = _FileHash.model_validate_json(memo.read_text(encoding="utf-8"))
            if known.ident == ident:
                return known.sha256
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # ValidationError is a ValueError
            log.warning("ignoring unreadable file-hash entry %s (%s); hashing %s again", memo, exc, resolved)
        sha = _sha256_stream(resolved)
        after = resolved.stat()
        racy = time.time_ns() - before.st_mtime_ns < RACY_SECONDS * 1e9
        if racy or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return sha
        try:
            _write_atomic(memo, _FileHash(ident=ident, sha256=sha).model_dump_json() + "\n")
        except OSError as exc:
            log.warning("could not remember the hash of %s in %s: %s", resolved, memo.parent, exc)
        return sha

    def model_sha256(self, folder: Path) -> str:
        """One sha256 over the checkpoint's files (:func:`model_files`), each named and hashed."""
        lines = [f"{path.name}\0{self.file_sha256(path)}\n" for path in model_files(folder)]
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def key(
        self,
        model_folder: Path,
        *,
        text_sha256: str,
        windows: torch.Tensor,
        bos_token_id: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> DenseKey:
        """The key of the dense perplexity of ``model_folder`` on ``windows`` [count, seqlen] (module docstring)."""
        import transformers

        ids = windows.detach().to("cpu", torch.int64).contiguous()  # [count, seqlen]
        return DenseKey(
            model_sha256=self.model_sha256(model_folder),
            text_sha256=text_sha256,
            tokens_sha256=hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            window=int(windows.shape[1]),
            windows=int(windows.shape[0]),
            bos_token_id=bos_token_id,
            dtype=str(dtype).removeprefix("torch."),
            device_type=device.type,
            torch=torch.__version__,
            transformers=transformers.__version__,
        )

    # --- entries ------------------------------------------------------------------------------------------

    def path(self, key: DenseKey) -> Path:
        return self.folder / f"{key.digest}.json"

    def load(self, key: DenseKey) -> DenseEntry | None:
        """The entry for ``key``, or None when there is none or it is unusable (then with a warning)."""
        path = self.path(key)
        try:
            entry = DenseEntry.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValidationError) as exc:
            log.warning("ignoring unreadable dense-perplexity entry %s (%s); computing it again", path, exc)
            return None
        if entry.format != FORMAT or entry.key != key.digest or entry.inputs != key.__dict__:
            log.warning("ignoring dense-perplexity entry %s: it was written for other inputs", path)
            return None
        return entry

    def store(
        self,
        key: DenseKey,
        result: Perplexity,
        *,
        batch_size: int,
        seconds: float | None,
        job_id: str | None,
        output: Path | None,
        device_name: str | None,
    ) -> DenseEntry | None:
        """Write the entry for ``key`` atomically (last writer wins); None, with a warning, if it cannot."""
        entry = DenseEntry(
            format=FORMAT,
            key=key.digest,
            inputs=dict(key.__dict__),
            value=result.value,
            nll=result.nll,
            windows=result.windows,
            seqlen=result.seqlen,
            predicted_tokens=result.predicted_tokens,
            bos=result.bos,
            batch_size=batch_size,
            seconds=seconds,
            job_id=job_id,
            output=str(output) if output is not None else None,
            device_name=device_name,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        try:
            _write_atomic(self.path(key), entry.model_dump_json(indent=2) + "\n")
        except OSError as exc:
            log.warning("could not store the dense perplexity in %s: %s", self.folder, exc)
            return None
        return entry


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def cached_dense_perplexity(
    cache: DenseCache | None,
    compute: Callable[[], tuple[Perplexity | None, float | None]],
    *,
    model_folder: Path,
    text_sha256: str | None,
    windows: torch.Tensor | None,
    bos_token_id: int | None,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
    job_id: str | None,
    output: Path,
    emit: Callable[[ProgressEvent], None],
) -> tuple[Perplexity | None, float | None, DenseCacheHit | None]:
    """The dense perplexity and the seconds it took: read from ``cache`` when an earlier run stored it (then
    with where it came from), else ``compute()``-d and stored there. Without a cache or evaluation windows,
    ``compute()`` as it is.

    ``job_id`` (else the resolved ``output`` folder) names this run in the entry it stores.
    """
    if cache is None or windows is None or text_sha256 is None:
        return (*compute(), None)
    started = time.perf_counter()
    try:
        key = cache.key(
            model_folder,
            text_sha256=text_sha256,
            windows=windows,
            bos_token_id=bos_token_id,
            dtype=dtype,
            device=device,
        )
    except OSError as exc:  # the checkpoint was readable a moment ago; computing the figure still works
        log.warning("no dense-perplexity cache for this job: hashing %s failed: %s", model_folder, exc)
        return (*compute(), None)
    entry = cache.load(key)
    if entry is not None:
        hit, looked_up = entry.hit(), time.perf_counter() - started
        message = f"dense perplexity {entry.value:.3f} (cached from {hit.source()})"
        log.info("%s: %s", key.digest[:12], message)
        emit(ProgressEvent(stage=Stage.EVALUATE_DENSE, message=message, seconds=looked_up))
        return entry.perplexity(), looked_up, hit
    result, seconds = compute()
    if result is not None and math.isfinite(result.value):  # a NaN or inf figure is reported, never reused
        cache.store(
            key,
            result,
            batch_size=batch_size,
            seconds=seconds,
            job_id=job_id,
            output=None if job_id else output.resolve(),
            device_name=_device_name(device),
        )
    return result, seconds, None
