# GPU worker image: the CUDA build of torch from the base image, secateurs' engine on top (pip sees the base
# image's torch as satisfying `torch>=2.4` and does not resolve another one). Runs `secateurs worker` in
# compose.yaml, or a one-off `secateurs prune` on a GPU.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

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
RUN pip install '.[engine]'

# Same uid as the API image: both write the shared data volume.
RUN useradd --create-home --uid 1000 secateurs \
    && mkdir -p /data /cache \
    && chown secateurs:secateurs /data /cache
USER secateurs
ENV SECATEURS_DATA_DIR=/data \
    SECATEURS_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface

ENTRYPOINT ["secateurs"]
CMD ["worker"]
