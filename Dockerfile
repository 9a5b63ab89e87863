# msdnet-serve: the FastAPI server with the shipped Fashion-MNIST model, CPU only.
#   docker build -t msdnet-serve:0.1.0 .
#   docker run --rm -p 8000:8000 msdnet-serve:0.1.0
# Settings are MSDNET_* environment variables (docs/DEPLOY.md). The build
# arguments below let the same file build where python:3.11-slim or PyTorch's
# index cannot be reached (tests/test_image.py builds it offline that way).

# Base of both stages: any Debian-like image with python3 (3.11) and its venv module.
ARG BASE_IMAGE=python:3.11-slim

# --- builder: a venv with the CPU torch wheel and the project ---------------
FROM ${BASE_IMAGE} AS builder

# Where pip finds torch==2.13.0: PyTorch's CPU index keeps the CUDA build
# (several GB) out of the image. Offline: "--no-index --find-links /wheels".
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# Where pip finds the other dependencies: PyPI by default.
ARG PIP_ARGS=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: most of the image, and it changes less often than the code.
# Unquoted on purpose: TORCH_PIP_ARGS holds several options (hence SC2086, and
# DL3013 mistaking it for an unpinned package).
# hadolint ignore=SC2086,DL3013
RUN pip install --no-cache-dir $TORCH_PIP_ARGS torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
# Not editable: the packages and their data (model/weights/*.pt, server/samples)
# land in the venv, so the final stage needs no source tree.
# -I: import the installed copy, not ./model, to prove the weights were packaged.
# Then drop what serving never uses (about 200 MB): pip and setuptools; torch's C++
# headers, C++ test binaries and tools other than torch_shm_manager; every
# package's tests/. The .pyc files stay: the root filesystem is read-only at run
# time, so Python could not cache them, and every start would recompile torch.
# hadolint ignore=SC2086
RUN pip install --no-cache-dir $PIP_ARGS . \
    && python -I -c "import model.checkpoint as c; assert c.DEFAULT_CHECKPOINT.is_file(), c.DEFAULT_CHECKPOINT" \
    && pip uninstall --yes pip setuptools \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && rm -rf "$site/torch/include" "$site/torch/test" \
    && find "$site/torch/bin" -type f ! -name torch_shm_manager -delete \
    && find "$site" -depth -type d -name tests -exec rm -rf {} +

# --- final: the venv on a clean base, run as a non-root user -----------------
FROM ${BASE_IMAGE}

# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it without a name lookup.
RUN groupadd --system --gid 10001 msdnet \
    && useradd --system --no-log-init --uid 10001 --gid msdnet --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin msdnet

COPY --from=builder /opt/venv /opt/venv

# MPLCONFIGDIR: matplotlib (a dependency) wants a writable config dir; the user has no
# home and the root filesystem may be read-only: mount a tmpfs on /tmp.
# MSDNET_*: the server's defaults, listed so `docker inspect` shows the knobs; override
# with -e. Host and port are fixed by CMD: EXPOSE and the HEALTHCHECK assume 8000.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    MSDNET_LOG_LEVEL=info \
    MSDNET_DRAIN_TIMEOUT_S=10

USER 10001:10001
EXPOSE 8000

# Liveness only (/healthz); /readyz is for load balancers. python, since slim has no curl.
# start-period 60 s: loading and warming the model on a busy CPU.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]

CMD ["msdnet", "serve", "--host", "0.0.0.0", "--port", "8000"]
