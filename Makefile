# msdnet-serve. FLOPs everywhere = multiply-accumulates of convs and linears (MSDNet paper).
PYTHON ?= python3
CKPT ?= model/weights/fashion-mnist.pt
PORT ?= 8000

.PHONY: install install-system install-image-system image-test serve test mutants lint train calibrate evaluate e2e-full bench bench-smoke soak bench-real bench-real-smoke

install-system:  ## Debian packages: the data set; Prometheus, Redis and Chromium (/docs) for the integration tests
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist prometheus redis-server \
		chromium

# Debian's podman and what it needs on CI machines (tests/test_image.py; found on bookworm VMs).
IMAGE_PACKAGES = podman runc uidmap fuse-overlayfs slirp4netns netavark aardvark-dns conmon \
	containernetworking-plugins catatonit mmdebstrap

install-image-system:  ## Debian packages for the image test: rootful podman and mmdebstrap
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(IMAGE_PACKAGES)

image-test: install-image-system  ## build the Docker image with podman and run the README's docker lines against it
	$(PYTHON) -m pytest -q -m image tests/test_image.py
	@cat build/image/report.json

install:  ## Python packages (torch pinned to the CPU build)
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,bench]"

serve: install  ## set up and start the server on 127.0.0.1:$(PORT) with the shipped model
	msdnet serve --port $(PORT)

test:  ## the test suite (tiny configs, real processes; a few minutes)
	$(PYTHON) -m pytest -q

mutants:  ## curated breaks of the code, each against the fast tests of its area: all must be killed (minutes)
	$(PYTHON) -m tests.mutants --jobs 2

lint:
	ruff check .

train:  ## retrain the shipped model (about 50 minutes on 2 CPU cores)
	msdnet train --preset fashion-mnist --data fashion-mnist --epochs 15 --batch-size 128 \
		--gradient-equilibrium --distill 0.5 --threads 2 --out $(CKPT)
	msdnet calibrate --checkpoint $(CKPT)

calibrate:
	msdnet calibrate --checkpoint $(CKPT)

evaluate:  ## model card figures: anytime table and budgeted curve on the test split
	msdnet evaluate --checkpoint $(CKPT) --json docs/evaluation.json --plot docs/evaluation.png

e2e-full:  ## all 10,000 Fashion-MNIST test images over HTTP against a real server
	MSDNET_E2E_IMAGES=10000 $(PYTHON) -m pytest -q tests/test_e2e.py -s

bench:  ## docs/BENCHMARKS.md and plots: issue 12's goals against LitServe and Ray Serve, in one run (about 30 min)
	$(PYTHON) -m loadtest.bench --out docs --json docs/bench.json

bench-smoke:
	$(PYTHON) -m loadtest.bench --out /tmp/msdnet-bench-smoke --smoke

# Real-size networks (issue 22): SIZE = a loadtest.realsize name (speed-only checkpoint, made and cached in
# build/realsize/), or CHECKPOINT=FILE for any checkpoint. Capacity grid against LitServe and Ray Serve (whole
# network in ONNX Runtime and in torch eager), per-block GMAC/s, decode cost, peak RSS; about 30-40 min per size.
SIZE ?= cifar100-7
REAL_OUT ?= docs
REAL_ARGS ?=
bench-real:  ## real-size benchmark: make bench-real SIZE=cifar100-7|imagenet-5 (or CHECKPOINT=FILE), ~30 min; into $(REAL_OUT)/BENCHMARKS.md
	$(PYTHON) -m loadtest.realbench $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),--size $(SIZE)) --out $(REAL_OUT) $(REAL_ARGS)
	$(PYTHON) -m loadtest.realreport --docs $(REAL_OUT)

bench-real-smoke:  ## the real-size path end to end on the CIFAR size, in well under a minute (after the first make)
	$(PYTHON) -m loadtest.realbench --size cifar100-7 --out /tmp/msdnet-bench-real-smoke --smoke

SOAK_MINUTES ?= 30
SOAK_ARGS ?=
soak:  ## server RSS under steady load at 80% of capacity for $(SOAK_MINUTES) min: docs/SOAK.md, soak.csv, soak.png
	$(PYTHON) -m loadtest.soak --minutes $(SOAK_MINUTES) --out docs $(SOAK_ARGS)
