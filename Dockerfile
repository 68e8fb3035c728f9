# reglab image: the package installed in /opt/venv with CPU PyTorch (default) or a CUDA build.
#   docker build -t reglab .                                   # CPU torch
#   docker build -t reglab:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run --rm reglab make test
#   docker run --rm -v "$PWD/mlruns:/app/mlruns" reglab python scripts/train.py model=mlp data=digits
#   docker run --rm --gpus all -v "$PWD/data:/app/data" reglab:cuda python scripts/train.py +exp=double_descent
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# make runs the README's commands; git lets runs record their commit. Debian's current versions are fine for both.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.3,<2.15" "torchvision>=0.18,<0.30"

# Dependencies first (cached while only the code changes), then the project itself.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install -e ".[dev]"
COPY . .
# The Makefile's install step is done: mark it so `make test` / `make run` use /opt/venv as it is.
RUN touch /opt/venv/.installed

CMD ["make", "run"]
