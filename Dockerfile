# memfit: build stage shrinks and approves the models; runtime stage serves only the approved artifacts.
# The build stage installs the CPU build of torch 2.13.0 from PyTorch's CPU wheel index (PyPI's default
# build pulls CUDA, several GB); override PIP_EXTRA_INDEX_URL to use a mirror.

FROM python:3.11-slim AS build
ARG PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/cpu"
ARG SERVICE=configs/service.yaml
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml Makefile README.md ./
COPY pipeline pipeline
COPY serve serve
COPY configs configs
COPY benchmarks/memory-baseline.json benchmarks/memory-baseline.json
RUN make optimize PYTHON=python3.11 SERVICE=${SERVICE} && .venv/bin/memfit verify --service ${SERVICE}

FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=10000 WORKERS=1 SERVICE_CONFIG=configs/service.yaml
WORKDIR /app
# Only the service's dependency set (the `serve` extra): no torch, no transformers.
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY serve serve
RUN pip install --no-cache-dir '.[serve]' && rm -rf pipeline build *.egg-info
COPY configs configs
COPY --from=build /src/artifacts artifacts
RUN useradd --create-home --uid 10001 memfit && chown -R memfit /app
USER memfit
EXPOSE 10000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"10000\")}/api/health', timeout=4)"
CMD ["gunicorn", "-c", "serve/gunicorn.conf.py", "serve.app:create_app()"]
