"""Server processes for benchmarks, and the server configurations they compare.

- ``ServerProcess.msdnet`` (``msdnet serve``) or ``ServerProcess.naive`` (the
  baseline), each on a free loopback port; the process logic lives in
  :mod:`loadtest.harness` (shared with the tests' ``LiveServer``).
- :class:`TreeServer`: a server whose CPU time, memory and shutdown cover its
  whole process tree (peers' workers, Ray's daemons, msdnet-serve's engine).
- :class:`ServerConfig` and its makers :func:`litserve`, :func:`ray` (the peers,
  ``loadtest/peers/``, whole network) and :func:`msdnet` (msdnet-serve with any
  ``MSDNET_*`` settings): what the capacity grid (``loadtest.parts.capacity``),
  ``loadtest.realbench`` and the bench's parts start.

FLOPs = multiply-accumulates of convs and linears (MSDNet paper convention).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from .harness import ServerProcess, free_port, serve_command

__all__ = ["ServerConfig", "ServerProcess", "TreeServer", "free_port", "litserve", "msdnet", "ray", "serve_command"]


class TreeServer(ServerProcess):
    """A :class:`ServerProcess` whose CPU time and shutdown cover its whole
    process tree (LitServe's API and worker processes outlive a SIGTERM to their
    parent; Ray's daemons are the server's work too)."""

    def _tree(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, AttributeError):
            return []

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) of every live process in the tree."""
        import psutil

        total = 0.0
        for p in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_bytes(self) -> int:
        """Sum of the resident set sizes of every live process in the tree (shared
        pages count once per process, so an upper bound of the memory used)."""
        import psutil

        total = 0
        for p in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += p.memory_info().rss
        return total

    def stop(self) -> int | None:
        """Stop the server (:meth:`ServerProcess.stop`), then every process left of
        its tree (SIGTERM, SIGKILL after 5 s); the server's exit status."""
        import psutil

        children = self._tree()[1:]
        code = super().stop()
        for p in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(children, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        return code


@dataclass(frozen=True)
class ServerConfig:
    """One server in one configuration. ``family``: litserve, ray, msdnet, msdnet-last."""

    key: str
    family: str
    label: str
    config: str
    make: Callable[[], TreeServer] = field(repr=False, compare=False)
    module: str | None = None  # import needed (the bench extra)

    def installed(self) -> bool:
        """Whether the server's package (``module``) can be imported here."""
        return self.module is None or importlib.util.find_spec(self.module) is not None


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def litserve(checkpoint: str, api_servers: int, workers: int, threads: int, runtime: str = "torch") -> ServerConfig:
    """LitServe with the whole network; ``runtime`` ``onnxruntime``: family ``litserve-ort``."""
    cmd = _py("loadtest.peers.litserve_app", "--checkpoint", checkpoint, "--api-servers", str(api_servers),
              "--workers", str(workers), "--threads", str(threads), "--runtime", runtime)
    ort = runtime == "onnxruntime"
    return ServerConfig(f"litserve{'-ort' if ort else ''}-a{api_servers}-w{workers}-t{threads}",
                        "litserve-ort" if ort else "litserve",
                        "LitServe, whole network" + (" in ONNX Runtime" if ort else ""),
                        f"{api_servers} API process(es), {workers} inference worker(s), "
                        f"{'ORT' if ort else 'torch'} {threads} thread(s)",
                        lambda: TreeServer(cmd, ready_path="/health", name="litserve", ready_timeout_s=600),
                        "litserve")


def ray(checkpoint: str, replicas: int, threads: int, runtime: str = "torch") -> ServerConfig:
    """Ray Serve with the whole network; ``runtime`` ``onnxruntime``: family ``ray-ort``."""
    cmd = _py("loadtest.peers.ray_app", "--checkpoint", checkpoint, "--replicas", str(replicas),
              "--threads", str(threads), "--runtime", runtime)
    ort = runtime == "onnxruntime"
    return ServerConfig(f"ray{'-ort' if ort else ''}-r{replicas}-t{threads}", "ray-ort" if ort else "ray",
                        "Ray Serve, whole network" + (" in ONNX Runtime" if ort else ""),
                        f"{replicas} replica(s), {'ORT' if ort else 'torch'} {threads} thread(s)",
                        lambda: TreeServer(cmd, {"RAY_USAGE_STATS_ENABLED": "0"}, ready_path="/readyz", name="ray",
                                           ready_timeout_s=600),
                        "ray.serve")


# Settings a configuration leaves at the server's default unless it sets them (not inherited).
_DEFAULTED = ("MSDNET_TORCH_THREADS", "MSDNET_WORKERS", "MSDNET_TARGET_FLOPS", "MSDNET_BACKEND", "MSDNET_MODEL_THREADS")


def msdnet(checkpoint: str, threads: int | None, last_exit_flops: int | None = None,
           backend: str | None = None, workers: int | None = None, *, target_flops: float | None = None,
           env: dict[str, str] | None = None, tag: str | None = None) -> ServerConfig:
    """msdnet-serve; ``threads`` None: its default threads; with ``last_exit_flops``:
    forced to the last exit (``MSDNET_TARGET_FLOPS``); ``backend``: ``MSDNET_BACKEND``,
    ``workers``: ``MSDNET_WORKERS`` (None: the server's defaults); ``target_flops``:
    the controller's target (``MSDNET_TARGET_FLOPS``, FLOPs per request); ``env``:
    any other ``MSDNET_*`` settings (listed in the configuration's label); ``tag``:
    the key's suffix (default: made from the settings)."""
    extra = dict(env or {})
    env = {"MSDNET_ACCESS_LOG": "false", "MSDNET_LOG_LEVEL": "warning"}
    if workers is not None:
        env["MSDNET_WORKERS"] = str(workers)
    if backend is not None:
        env["MSDNET_BACKEND"] = backend
    if threads is not None:
        env["MSDNET_TORCH_THREADS"] = str(threads)
    family, label = "msdnet", "msdnet-serve, controller on"
    if target_flops is not None:
        env["MSDNET_TARGET_FLOPS"] = str(int(target_flops))
        label += f" (target {target_flops / 1e6:.1f} MFLOPs)"
    if last_exit_flops is not None:
        env["MSDNET_TARGET_FLOPS"] = str(last_exit_flops)
        family, label = "msdnet-last", "msdnet-serve, forced to the last exit"
    config = "defaults" if threads is None else f"{threads} thread(s)"
    if backend is not None:
        config += f", backend {backend}"
    if workers is not None:
        config += f", {workers} HTTP worker(s)" + (" + engine process" if workers > 1 else "")
    for k, v in extra.items():
        config += f", {k}={v}"
    env.update(extra)

    def make() -> TreeServer:
        base = {k: v for k, v in os.environ.items() if k not in _DEFAULTED}
        srv = TreeServer(_py("server.cli", "serve", "--checkpoint", checkpoint), name=family, ready_timeout_s=600)
        srv.env = {**base, **env}
        return srv

    suffix = ("" if backend is None else f"-{backend}") + ("" if workers is None else f"-w{workers}")
    if tag is not None:
        suffix += f"-{tag}"
    return ServerConfig(f"{family}-{'default' if threads is None else f't{threads}'}{suffix}", family, label,
                        config + ", access log off", make)
