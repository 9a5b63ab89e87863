# msdnet-serve: the FastAPI server with the shipped Fashion-MNIST model, CPU only.
#   docker build -t msdnet-serve .
#   docker run -p 8000:8000 msdnet-serve
# Settings are MSDNET_* environment variables (docs/DEPLOY.md).

# --- builder: a venv with the CPU torch wheel and the project ---------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: about 200 MB that changes less often than the code.
# The CPU index keeps the CUDA build (several GB) out of the image.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
# Not editable: the packages and their data (model/weights/*.pt, server/samples)
# land in the venv, so the final stage needs no source tree.
# -I: import the installed copy, not ./model, to prove the weights were packaged.
RUN pip install --no-cache-dir . \
    && python -I -c "import model.checkpoint as c; assert c.DEFAULT_CHECKPOINT.is_file(), c.DEFAULT_CHECKPOINT"

# --- final: the venv on a clean slim image, run as a non-root user ----------
FROM python:3.11-slim

# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it without a name lookup.
RUN groupadd --system --gid 10001 msdnet \
    && useradd --system --no-log-init --uid 10001 --gid msdnet --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin msdnet

COPY --from=builder /opt/venv /opt/venv

# MPLCONFIGDIR: matplotlib (a dependency) wants a writable config dir; the user has no home.
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
