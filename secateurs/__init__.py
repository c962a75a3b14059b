"""secateurs: one-shot 2:4 (N:M) SparseGPT pruning of Hugging Face causal language models, with measured
perplexity, size and speed.

The Python API (the same jobs as the ``secateurs`` command line and the REST service)::

    import secateurs

    report = secateurs.prune("path/to/model", calibration="c4.utf8", evaluation="wiki.test.raw", output="out")
    model = secateurs.load("out", device="cpu")          # a transformers model, ready for generate()
    with secateurs.Client("http://gpu-box:8000") as client:  # a secateurs server's REST API
        job = client.wait(client.submit(spec).id)

Importing this package imports no torch: :func:`prune` and :func:`load` bring the engine in on first use,
so the API side (the REST client, the schemas) stays light. The code lives in three layers mapped below
this one name: :mod:`secateurs.kernels` (tensor math), :mod:`secateurs.workers` (the pipeline and I/O),
:mod:`secateurs.app` (settings, schemas, the service and the CLI).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from secateurs.app import __version__

if TYPE_CHECKING:
    from secateurs.app.client import SecateursClient as Client
    from secateurs.app.errors import SecateursError
    from secateurs.app.schemas import JobSpec, Report, TextSource
    from secateurs.workers.library import load, prune

__all__ = ["Client", "JobSpec", "Report", "SecateursError", "TextSource", "__version__", "load", "prune"]

# name -> (module, attribute): imported on first use, so ``import secateurs`` stays light.
_LAZY = {
    "prune": ("secateurs.workers.library", "prune"),
    "load": ("secateurs.workers.library", "load"),
    "Client": ("secateurs.app.client", "SecateursClient"),
    "JobSpec": ("secateurs.app.schemas", "JobSpec"),
    "Report": ("secateurs.app.schemas", "Report"),
    "TextSource": ("secateurs.app.schemas", "TextSource"),
    "SecateursError": ("secateurs.app.errors", "SecateursError"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'secateurs' has no attribute {name!r}") from None
    value = getattr(import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
