"""The quick start's evaluation text: the WikiText-2 test split wherever it can be had, else a named substitute.

Published perplexities (SparseGPT, Wanda, ...) are on the WikiText-2 raw test split, so the quick start looks for
it, in this order:

1. an explicit file (``secateurs quickstart --eval-file``): the user's choice, used as it is;
2. ``shared/data/wikitext-2-raw/wiki.test.raw`` beside the working directory or the repository (this project's
   workspace: CRLF line ends, empty rows dropped; the README's figures are measured on it);
3. the Hugging Face hub: ``Salesforce/wikitext``, ``wikitext-2-raw-v1``, split ``test``, its rows joined with
   ``"\\n\\n"`` as SparseGPT's and GPTQ's ``datautils.get_wikitext2`` do (every row, empty ones included; the
   ``datasets`` package, ``secateurs[hub]``). ``Salesforce/wikitext`` is the dataset's current name; the papers'
   code says ``wikitext``, which the hub redirects to it.
4. else exllamav2's ``wiki.utf8`` from the offline assets: Wikipedia articles, *not* WikiText-2. The quick start
   then says so loudly before it starts, and every summary and report names the file and its sha256.

Nothing here calls a text WikiText-2 because of its name: :mod:`secateurs.app.texts` names texts by their bytes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from secateurs.app.errors import DataSourceError
from secateurs.app.schemas import TextSource
from secateurs.app.sources import check_text_file
from secateurs.app.texts import describe_text
from secateurs.workers.assets import WIKITEXT2_RELPATH, find_wikitext2, search_starts

log = logging.getLogger(__name__)

WIKITEXT2_HUB = TextSource(dataset="Salesforce/wikitext", dataset_config="wikitext-2-raw-v1", split="test")
HUB_PROBE_TIMEOUT = 5.0  # seconds: the hub either answers at once or is not there (datasets retries for ~30 s)


@dataclass(frozen=True)
class EvalText:
    """The text a quick start evaluates on, what it is, and where WikiText-2 was looked for first."""

    source: TextSource
    label: str
    """What the text is, in words: its path or dataset, and what its bytes are when known."""
    sha256: str | None
    """Of the exact bytes (None for a hub dataset until the worker joins its rows)."""
    wikitext2: bool | None
    """True: the WikiText-2 test split; False: the offline substitute; None: the user's own file."""
    tried: tuple[str, ...] = ()
    """Each place WikiText-2 was looked for before, with why it was not used."""

    @property
    def notice(self) -> str | None:
        """What to say, loudly, before a run that does not evaluate on WikiText-2 by default; None otherwise."""
        if self.wikitext2 is not False:
            return None
        tried = "\n".join(f"  - {line}" for line in self.tried)
        return (
            "WikiText-2 is not available here, so this run's perplexities are NOT WikiText-2 figures and do not "
            "compare with published ones. It evaluates on the offline substitute instead:\n"
            f"  {self.label}\n  sha256 {self.sha256}\n"
            f"Looked for WikiText-2's test split:\n{tried}\n"
            "The README gives this text's figures beside WikiText-2's. To evaluate on WikiText-2, pass "
            "--eval-file PATH/wiki.test.raw, or reach huggingface.co with the 'datasets' package installed "
            "(pip install 'secateurs[hub]')."
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file(path: Path, wikitext2: bool | None, tried: Sequence[str] = ()) -> EvalText:
    sha = sha256_file(path)
    return EvalText(TextSource(file=str(path)), describe_text(str(path), sha), sha, wikitext2, tuple(tried))


def wikitext2_from_hub(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT) -> tuple[str | None, str]:
    """The WikiText-2 test split from the hub as the worker will read it: ``(sha256, "")``, or ``(None, why not)``.

    The hub is probed first with a short timeout, so an unreachable hub costs seconds, not the ``datasets``
    client's half a minute of retries. ``endpoint`` defaults to huggingface_hub's (``HF_ENDPOINT``).
    """
    import huggingface_hub.constants as hf

    if hf.HF_HUB_OFFLINE:
        return None, "HF_HUB_OFFLINE is set"
    base = (endpoint or hf.ENDPOINT).rstrip("/")
    url = f"{base}/api/datasets/{WIKITEXT2_HUB.dataset}"
    try:
        answer = httpx.get(url, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as exc:
        return None, f"{base} is unreachable ({type(exc).__name__}: {exc})"
    if answer.status_code >= 400:
        return None, f"{url} answered HTTP {answer.status_code}"
    if importlib.util.find_spec("datasets") is None:
        return None, "the 'datasets' package is not installed (pip install 'secateurs[hub]')"
    from secateurs.workers.data import read_text

    try:
        loaded = read_text(WIKITEXT2_HUB)
    except DataSourceError as exc:
        return None, exc.message
    return loaded.sha256, ""


def quickstart_eval_text(
    substitute: Path,
    *,
    eval_file: str | None = None,
    search_from: Sequence[Path] | None = None,
    hub_endpoint: str | None = None,
    hub_timeout: float = HUB_PROBE_TIMEOUT,
) -> EvalText:
    """Where the quick start's evaluation text comes from (the order of the module docstring).

    ``search_from`` replaces the folders whose ``shared/data`` is searched (default: the working directory and
    the repository, and their parents); ``hub_endpoint`` the hub's address. Raises :class:`DataSourceError`
    when ``eval_file`` is not a readable text file.
    """
    if eval_file is not None:
        path = Path(eval_file).expanduser().resolve()
        check_text_file(path, "evaluation", eval_file)
        return _file(path, None)
    tried = ["--eval-file: not given"]
    shared = find_wikitext2(search_from=search_from)
    if shared is not None:
        return _file(shared, True)
    starts = " or ".join(str(start) for start in (search_from or search_starts()))
    tried.append(f"{WIKITEXT2_RELPATH} in {starts} or a folder above: not found")
    sha, why = wikitext2_from_hub(hub_endpoint, hub_timeout)
    if sha is not None:
        label = f"{WIKITEXT2_HUB.describe()}: the WikiText-2 raw test split from the Hugging Face hub"
        return EvalText(WIKITEXT2_HUB, label, sha, True, tuple(tried))
    tried.append(f"the Hugging Face hub ({WIKITEXT2_HUB.describe()}): {why}")
    log.info("no WikiText-2 here; evaluating on the substitute %s", substitute)
    return _file(substitute, False, tried)
