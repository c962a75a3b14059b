# GPU worker image: the CUDA build of torch from the base image, secateurs on top (no pip-resolved torch).
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
WORKDIR /opt/secateurs
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY kernels ./kernels
RUN pip install --no-cache-dir .
ENV SECATEURS_CACHE_DIR=/cache
ENTRYPOINT ["secateurs"]
CMD ["--help"]
