"""The Docker image, built and run for real with Debian's rootful podman
(``make image-test``; marked ``image``, so ``make test`` leaves it out).

Runs the README's Docker lines (``docker`` -> ``podman``; the container name, the
host port and ``$PWD`` become the test's) and checks the container against
``msdnet serve`` outside it: same answers on every sample image, per-exit
counts in /metrics, the HEALTHCHECK, uid 10001 on a read-only root, a drain
on SIGTERM with exit code 0, ``MSDNET_*`` settings and a mounted checkpoint.

Offline build, as on CI machines (no container registry, no PyPI inside
builds): the base is made with ``mmdebstrap`` from the host's Debian sources
and imported as ``BASE_IMAGE`` (skipped when that tag exists); the wheels are
downloaded once into ``build/image/wheels`` by the base image's own Python
through the host's pip configuration; the build runs with ``--network none``.
Podman's settings come from ``deploy/podman/containers.conf`` through
``CONTAINERS_CONF``. Figures (durations, sizes by layer, cold starts, the
drain's stop) are written to ``build/image/report.json``: reported, never
asserted (they depend on the machine and on what else runs on it). The waits
are bounded only as hang guards, far above any expected figure.

Needs (apt, --no-install-recommends; ``make install-image-system``): podman runc
uidmap fuse-overlayfs slirp4netns netavark aardvark-dns conmon
containernetworking-plugins catatonit mmdebstrap. Fails, never skips, without them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from live import LiveServer, free_port

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "image"
SAMPLES = sorted((ROOT / "server" / "samples").glob("*.png"))
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
BASE_IMAGE = "localhost/msdnet-base:bookworm-py3"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
# Debian's own sources only (other files under sources.list.d may name third-party repositories).
APT_SOURCES = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
OFFLINE = "--no-index --find-links /wheels"
READY_HANG_GUARD_S = 120.0  # a container with no /readyz 200 by then is hung (the cold start is reported)
STOP_HANG_GUARD_S = 60.0    # past the README's stop grace: a server still listening by then is hung
REPORT: dict = {}


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


IMAGE = f"msdnet-serve:{version()}"


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def sh(cmd: list[str], timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=podman_env(), **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{shlex.join(cmd)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def readme_docker_lines() -> list[list[str]]:
    """The ``docker ...`` command lines of README.md's Docker section, continuation
    lines joined and comments dropped, as argument lists (``$PWD`` left as is)."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Docker\n(.*?)^## ", text, re.S | re.M).group(1)
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("docker "):
                lines.append(shlex.split(line, comments=True))
    return lines


def readme_line(verb: str, has: str = "", lacks: str | None = None) -> list[str]:
    """The one README line ``docker VERB ...`` that contains ``has`` and not ``lacks``."""
    found = [a for a in readme_docker_lines()
             if a[1] == verb and has in " ".join(a) and (lacks is None or lacks not in " ".join(a))]
    assert len(found) == 1, (verb, has, lacks, found)
    return found[0]


def as_podman(argv: list[str], name: str, port: int, pwd: Path | None = None) -> list[str]:
    """A README ``docker`` line for this test: podman, its own name, host port and $PWD."""
    assert argv[0] == "docker"
    out = ["podman"]
    for a in argv[1:]:
        a = a.replace("127.0.0.1:8000:8000", f"127.0.0.1:{port}:8000")
        if a == "msdnet":
            a = name
        if pwd is not None:
            a = a.replace("$PWD", str(pwd))
        out.append(a)
    return out


# --- setting up: tools, base, wheels, build ---------------------------------------

def require_tools() -> None:
    missing = [t for t in ("podman", "runc", "mmdebstrap") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{missing} not found: make install-image-system (apt-get install --no-install-recommends ...)")


def ensure_base() -> None:
    """BASE_IMAGE from mmdebstrap (Debian minbase + python3), unless it exists."""
    if sh(["podman", "image", "exists", BASE_IMAGE], check=False).returncode == 0:
        REPORT["base_build_s"] = 0.0
        return
    sources = next(p for p in APT_SOURCES if p.is_file())
    WORK.mkdir(parents=True, exist_ok=True)
    tar = WORK / "base.tar"
    t0 = time.monotonic()
    excludes = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")]
    sh(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={BASE_PACKAGES}", *excludes,
        "bookworm", str(tar), str(sources)], timeout=900)
    sh(["podman", "import", "--change", 'CMD ["python3"]', str(tar), BASE_IMAGE])
    tar.unlink()
    REPORT["base_build_s"] = round(time.monotonic() - t0, 1)


def host_pip_config() -> tuple[list[str], list[str]]:
    """The host's pip configuration as ``-e PIP_...=`` options, and ``-v`` options
    that mount (read-only, same path) the local files and folders it names: the
    CA bundle, find-links folders, constraint files, file:// indexes (with the
    folder above, where their links point)."""
    r = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    envs, paths = {}, set()
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")
        value = value.strip().strip("'\"")
        option = key.rsplit(".", 1)[-1]
        envs[f"PIP_{option.upper().replace('-', '_')}"] = value
        for item in value.split():
            path = item.removeprefix("file://")
            if "index-url" in option:   # a local index's pages link to files beside it (../files/)
                path = str(Path(path).parent)
            if path.startswith("/") and Path(path).exists():
                paths.add(path)
    return ([f"-e{k}={v}" for k, v in sorted(envs.items())],
            [f"-v{p}:{p}:ro" for p in sorted(paths)])


def requirements() -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return sorted(set(deps) | set(build))


def ensure_wheels() -> Path:
    """build/image/wheels: every wheel the image needs, resolved by the base's own
    Python (its python_full_version decides some markers) through the host's pip
    configuration; reused while the requirements and the base are unchanged."""
    wheels = WORK / "wheels"
    base_id = sh(["podman", "image", "inspect", "--format", "{{.Id}}", BASE_IMAGE]).stdout.strip()
    stamp = hashlib.sha256(json.dumps([requirements(), base_id]).encode()).hexdigest()
    if (WORK / "wheels.stamp").is_file() and (WORK / "wheels.stamp").read_text() == stamp:
        REPORT["wheels_s"] = 0.0
        return wheels
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    envs, mounts = host_pip_config()
    t0 = time.monotonic()
    download = ("python3 -m venv /tmp/venv && /tmp/venv/bin/pip download --quiet --only-binary :all: "
                "--dest /wheels " + shlex.join(requirements()))
    sh(["podman", "run", "--rm", "--network", "host", *envs, *mounts, "-v", f"{wheels}:/wheels",
        BASE_IMAGE, "sh", "-c", download], timeout=900)
    (WORK / "wheels.stamp").write_text(stamp)
    REPORT["wheels_s"] = round(time.monotonic() - t0, 1)
    return wheels


def build_image(wheels: Path) -> None:
    """The README's ``docker build`` line, offline: base and wheels from above."""
    argv = readme_line("build")
    assert argv[:4] == ["docker", "build", "-t", IMAGE] and argv[-1] == ".", argv
    offline = ["--format", "docker", "--pull=never", "--network", "none", "-v", f"{wheels}:/wheels:ro",
               "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"TORCH_PIP_ARGS={OFFLINE}",
               "--build-arg", f"PIP_ARGS={OFFLINE}"]
    t0 = time.monotonic()
    sh(["podman", "build", *offline, *argv[2:]], timeout=1200, cwd=ROOT)
    REPORT["image_build_s"] = round(time.monotonic() - t0, 1)


@pytest.fixture(scope="module")
def image() -> str:
    require_tools()
    t0 = time.monotonic()
    ensure_base()
    build_image(ensure_wheels())
    REPORT["setup_s"] = round(time.monotonic() - t0, 1)
    REPORT["image"] = IMAGE
    REPORT["image_bytes"] = int(sh(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE]).stdout)
    history = json.loads(sh(["podman", "history", "--format", "json", IMAGE]).stdout)
    REPORT["layers"] = [{"bytes": h["size"], "created_by": h["CreatedBy"][:100]} for h in history if h["size"]]
    yield IMAGE
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "report.json").write_text(json.dumps(REPORT, indent=2) + "\n")


# --- running -------------------------------------------------------------------------

class Container:
    """A README ``docker run`` line started under podman; removed on exit."""

    def __init__(self, argv: list[str], pwd: Path | None = None):
        self.name = f"msdnet-test-{os.getpid()}-{free_port()}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = as_podman(argv, self.name, self.port, pwd)

    def __enter__(self) -> Container:
        """Run it and wait for /readyz 200; ``ready_s``: seconds from the container's
        start (podman's State.StartedAt: the server process begins) to that answer,
        a figure for the report. The wait stops at READY_HANG_GUARD_S (a hang guard,
        not a limit on the cold start) or when the container stops running."""
        sh(self.cmd, timeout=120)
        started_ns = int(self.inspect("{{.State.StartedAt.UnixNano}}"))
        t0, checked = time.monotonic(), 0.0
        while time.monotonic() - t0 < READY_HANG_GUARD_S:
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    self.ready_s = (time.time_ns() - started_ns) / 1e9
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() - checked > 1.0:     # podman inspect costs CPU: once a second
                checked = time.monotonic()
                state = self.inspect("{{.State.Status}}")
                assert state == "running", f"container {state}: {self.logs()}"
            time.sleep(0.05)
        pytest.fail(f"hang guard: the container is running but /readyz has not answered 200 after "
                    f"{READY_HANG_GUARD_S:.0f} s (this bounds the wait; it is not a limit on the cold start): "
                    f"{self.logs()}")

    def inspect(self, fmt: str) -> str:
        return sh(["podman", "inspect", "--format", fmt, self.name]).stdout.strip()

    def logs(self) -> str:
        return sh(["podman", "logs", self.name], check=False).stdout[-3000:]

    def __exit__(self, *exc) -> None:
        sh(["podman", "rm", "--force", "--time", "0", self.name], check=False)


def classify(url: str, path: Path) -> dict:
    r = httpx.post(url + "/classify", files={"file": (path.name, path.read_bytes(), "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def exit_counts(metrics_text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r'^msdnet_exits_total\{exit="(\d+)"\} (\S+)$', metrics_text, re.M)}


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    """Answers of ``msdnet serve`` outside the container, same checkpoint, same request
    order (the budget controller moves thresholds per request), the same default
    backend and threads as the image (Settings' defaults on this machine)."""
    from server.settings import Settings

    default = Settings()
    with LiveServer(env={"MSDNET_TORCH_THREADS": str(default.torch_threads), "MSDNET_BACKEND": default.backend}) as srv:
        return [classify(srv.url, p) for p in SAMPLES]


def slow_request_started(port: int, body: bytes) -> socket.socket:
    """A POST /classify whose headers and first half of the body are sent: the
    server has the request in flight until the rest arrives."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
              + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[: len(body) // 2])
    return s


def listening(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=2.0)
        return True
    except httpx.HTTPError:
        return False


def test_image_serves_like_msdnet_serve(image, reference):
    stop = readme_line("stop")
    grace_s = float(stop[stop.index("-t") + 1])
    with Container(readme_line("run", lacks="MSDNET_CHECKPOINT")) as c:
        REPORT["cold_start_s"] = round(c.ready_s, 2)  # reported, not asserted

        answers = [classify(c.url, p) for p in SAMPLES]
        for p, got, want in zip(SAMPLES, answers, reference):
            assert (got["class_id"], got["label"], got["exit"], got["flops"]) == \
                (want["class_id"], want["label"], want["exit"], want["flops"]), p.name
            assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-6), p.name
        assert len({a["exit"] for a in answers}) > 1, "samples should leave at different exits"

        counts = exit_counts(httpx.get(c.url + "/metrics", timeout=10).text)
        expected = {k: float(sum(a["exit"] == k for a in answers)) for k in range(1, answers[0]["num_exits"] + 1)}
        assert {k: v for k, v in counts.items() if v} == {k: v for k, v in expected.items() if v}, counts

        assert sh(["podman", "healthcheck", "run", c.name], check=False).returncode == 0, c.logs()
        assert sh(["podman", "exec", c.name, "id", "-u"]).stdout.strip() == "10001"
        assert c.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
        denied = sh(["podman", "exec", c.name, "touch", "/opt/venv/x"], check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied.stderr

        # SIGTERM with a request in flight: the server stops listening, finishes it, exits 0. Had it not
        # finished within the README's stop grace, podman would have killed it (exit code 137, not 0).
        body = SAMPLES[0].read_bytes()
        sock = slow_request_started(c.port, body)
        t0 = time.monotonic()
        stopper = threading.Thread(target=lambda: sh(as_podman(stop, c.name, c.port), timeout=grace_s + 30))
        stopper.start()
        while listening(c.url):
            if time.monotonic() - t0 > grace_s + STOP_HANG_GUARD_S:
                pytest.fail(f"hang guard: still accepting connections {grace_s + STOP_HANG_GUARD_S:.0f} s after "
                            f"SIGTERM (the stop grace is {grace_s:.0f} s): {c.logs()}")
            time.sleep(0.05)
        sock.sendall(body[len(body) // 2:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
        sock.close()
        stopper.join()
        stop_s = time.monotonic() - t0
        status_line, _, rest = response.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 200"), response[:500]
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["label"] == reference[0]["label"]
        assert c.inspect("{{.State.ExitCode}}") == "0", c.logs()
        REPORT["drain_stop_s"] = round(stop_s, 2)  # reported, not asserted


def test_image_honours_settings_and_a_mounted_checkpoint(image, reference, tmp_path):
    from model.checkpoint import load

    ckpt = load()
    ckpt.classes = tuple(f"renamed-{c}" for c in ckpt.classes)
    ckpt.save(tmp_path / "model.pt")
    (tmp_path / "model.pt").chmod(0o644)     # read by uid 10001 in the container

    argv = readme_line("run", has="MSDNET_CHECKPOINT")
    env = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-e")
    assert env["MSDNET_CHECKPOINT"] == "/models/model.pt"
    with Container(argv, pwd=tmp_path) as c:
        REPORT["cold_start_mounted_checkpoint_s"] = round(c.ready_s, 2)  # reported, not asserted
        got = classify(c.url, SAMPLES[0])
        assert got["label"] == f"renamed-{reference[0]['label']}"
        assert got["class_id"] == reference[0]["class_id"]

        budget = httpx.get(c.url + "/budget", timeout=10).json()
        assert budget["target_flops"] == float(env["MSDNET_TARGET_FLOPS"])

        limit = int(env["MSDNET_MAX_BATCH_IMAGES"])
        png = base64.b64encode(SAMPLES[0].read_bytes()).decode()
        r = httpx.post(c.url + "/batch", json={"images": [png] * (limit + 1)}, timeout=60)
        assert r.status_code == 413 and f"at most {limit} per /batch" in r.text, r.text
