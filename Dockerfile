# reglab image: the package installed in /opt/venv with CPU PyTorch (default) or a CUDA build.
#   docker build -t reglab --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .      # CPU torch
#   docker build -t reglab:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run --rm reglab make test
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/mlruns:/app/mlruns" reglab python scripts/train.py \
#     model=mlp data=digits                                   # files in ./mlruns owned by you, not root
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

# make runs the README's commands (Debian's current version is fine). No git: .git stays out of the build context;
# runs record the commit given as GIT_COMMIT (tag git_commit; "unknown" without it; set last, below, so a new
# commit does not rebuild the torch and dependency layers).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.3,<2.15" "torchvision>=0.18,<0.30"

# Dependencies first (cached while only the code changes), then the project itself.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install -e ".[dev]"
COPY . .
# The Makefile's install step is done: mark it so `make test` / `make run` use /opt/venv as it is. Not root: a
# user that owns /app; the folders runs write (outputs/, multirun/, results/, mlruns/, data/) are writable by any
# uid, so `--user "$(id -u):$(id -g)"` (files on mounted folders owned by you) works too.
RUN touch /opt/venv/.installed \
    && useradd --create-home --uid 1000 reglab \
    && mkdir -p outputs multirun results mlruns data \
    && chown -R reglab /app \
    && chmod 1777 outputs multirun results mlruns data
ARG GIT_COMMIT=""
ENV REGLAB_GIT_COMMIT=${GIT_COMMIT}
USER 1000

CMD ["make", "run"]
