# API image: FastAPI, the job store and the Celery *producer*. No torch, no transformers: the API never imports
# them (GUIDE §2), so this image is a few hundred MB, not several GB. The default install of the package is that
# light side; the engine (torch & co.) is the `engine` extra, installed only in docker/worker.Dockerfile.
# Also runs the one-shot migration step of compose.yaml (`secateurs db upgrade`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/secateurs
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY kernels ./kernels
# secateurs/ is the one import name: its __init__ and links to the three folders above.
COPY secateurs ./secateurs
# `pip install .` (no extras), then prove that no torch came along with it and that the one import name holds
# (run from / so that the source folders are not on the path).
RUN pip install . \
    && cd / && python -c "import importlib.util as u, sys, secateurs; sys.exit('torch found in the API image' if u.find_spec('torch') else 'a bare layer name is importable' if any(u.find_spec(n) for n in ('app', 'workers', 'kernels')) else 0)"

# Same uid as the worker image: both write the shared data volume.
RUN useradd --create-home --uid 1000 secateurs \
    && mkdir -p /data \
    && chown secateurs:secateurs /data
USER secateurs
ENV SECATEURS_DATA_DIR=/data

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "--factory", "secateurs.app.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
