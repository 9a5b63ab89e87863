"""Per-block engine benchmark: ``python3 -m loadtest.blocks [--threads 1 2] [--batches 1 64]``.

In one run, on the checkpoint (default: the shipped Fashion-MNIST model; any
other is fed images at its own input contract, generated when no data is at hand), for
each intra-op thread count and batch size it times

- torch eager per block: ``server.engine.backends.eager.TorchBackend`` (= ``MSDNet.advance``),
  exits 1..4 in turn from the images, lazy evaluation;
- ONNX Runtime per block: ``server.engine.backends.ort.OrtBackend`` (one session per block
  and its classifier), the same steps;
- ONNX Runtime whole network: one session of ``MSDNet.forward`` (all exits, no
  early exit), as ``loadtest.bench`` part d measures it,

and prints attained GMAC/s. MACs = FLOPs in this project's unit (multiply-
accumulates of convs and linears, MSDNet paper convention): the per-block
engines do the lazy cost of the last exit per image, the whole network its full
cost (for MSDNet both are every node once: 21.14 MFLOPs for the shipped model).
Times are medians per call; the engines take turns in 0.2 s windows, so a
neighbour's load on a shared machine hits all three alike. Both wall time and
process CPU time are reported (with 1 thread, CPU time is the engine's own work
whatever the neighbours do).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import DEFAULT_CHECKPOINT, load
from server.engine.backends.eager import TorchBackend
from server.engine.backends.ort import OrtBackend, session_options


def _images(checkpoint, ck, n: int) -> torch.Tensor:
    """n images at the checkpoint's input contract, decoded as msdnet-serve decodes them:
    float32 (N, C, H, W). Fashion-MNIST test images for the 28x28 model, generated
    images otherwise (``loadtest.samples.samples_for``; cycled when fewer than n);
    N(0, 1) noise when neither can be had (the timing does not depend on pixel values)."""
    cfg = ck.config
    try:
        from loadtest.samples import samples_for
        from server.images import decode

        samples, _ = samples_for(checkpoint, limit=min(n, 32), camera_share=0.0)
        arrays = [decode(s.data, ck.transforms, 4096 * 4096) for s in samples]
        x = torch.from_numpy(np.stack([arrays[i % len(arrays)] for i in range(n)]))
        if x.shape == (n, cfg.in_channels, cfg.image_size, cfg.image_size):
            return x
    except Exception:  # noqa: BLE001 - no images to be had: noise
        pass
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))


def whole_network_session(model, threads: int, directory: str):
    """ONNX Runtime session of the all-exits forward (input ``x``, outputs ``exit1..``), dynamic batch,
    with the engine's session options (``server.engine.backends.ort.session_options``)."""
    import onnxruntime as ort

    from loadtest.peers import export_onnx

    path = str(Path(directory) / "msdnet.onnx")
    export_onnx(model, path, last_only=False)
    return ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])


def _time(fns: dict, seconds: float, window_s: float = 0.2) -> dict:
    """Median wall and process-CPU seconds per call of each function. The functions take
    turns in windows of ``window_s`` (the first call of a window is not counted: another
    engine's threads may still be spinning), for ``seconds`` in all."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(len(v) for v in wall.values()) < 5:
        for name, fn in fns.items():
            fn()
            end = time.perf_counter() + window_s
            while True:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                t1, c1 = time.perf_counter(), time.process_time()
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
                if t1 >= end:
                    break
    return {k: {"wall_s": float(np.median(wall[k])), "cpu_s": float(np.median(cpu[k])), "calls": len(wall[k])}
            for k in fns}


def _staged(backend, model, x):
    def run():
        state = model.start(x, lazy=True)
        for _ in range(model.num_exits):
            _, state = backend.advance(state)
    return run


def measure(checkpoint: str | Path = DEFAULT_CHECKPOINT, threads: tuple[int, ...] = (1, 2),
            batches: tuple[int, ...] = (1, 64), seconds: float = 3.0) -> dict:
    """Time the three engines; returns {threads: {batch: {engine: {"ms", "gmacs"}}}} plus
    metadata (export and load seconds, MACs per image, parity figures)."""
    ck = load(checkpoint)
    model = ck.model.eval()
    macs_staged = ck.exit_flops(lazy=True)[-1]
    macs_whole = ck.exit_flops(lazy=False)[-1]
    out: dict = {"checkpoint": str(checkpoint), "macs_per_image": {"per_block": macs_staged, "whole": macs_whole},
                 "torch": torch.__version__, "results": {}}
    xs = {b: _images(checkpoint, ck, b) for b in batches}
    with tempfile.TemporaryDirectory(prefix="msdnet-blocks-") as tmp:
        for t in threads:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            ort_blocks = OrtBackend(model, threads=t, cache_dir=None)
            total_s = time.perf_counter() - t0
            whole = whole_network_session(model, t, tmp)
            eager = TorchBackend(model)
            out.setdefault("ort_load", {})[t] = {"export_s": ort_blocks.export_s, "sessions_s": ort_blocks.load_s,
                                                 "parity_s": ort_blocks.check_s, "total_s": total_s}
            res = out["results"][t] = {}
            with torch.inference_mode():
                for b in batches:
                    x = xs[b]
                    xn = x.numpy()
                    fns = {"torch eager, per block": _staged(eager, model, x),
                           "ORT, per block": _staged(ort_blocks, model, x),
                           "ORT, whole network": lambda xn=xn, whole=whole: whole.run(None, {"x": xn})}
                    res[b] = _time(fns, seconds)
                    for name, r in res[b].items():
                        macs = (macs_whole if "whole" in name else macs_staged) * b
                        r["gmacs"] = macs / r["wall_s"] / 1e9
                        r["gmacs_cpu"] = macs / r["cpu_s"] / 1e9
                    w = res[b]["ORT, whole network"]
                    res[b]["per-block ORT / whole ORT"] = {
                        "wall": res[b]["ORT, per block"]["gmacs"] / w["gmacs"],
                        "cpu": res[b]["ORT, per block"]["gmacs_cpu"] / w["gmacs_cpu"]}
    return out


def table(d: dict) -> str:
    """The measurement as a Markdown table: GMAC/s from wall time (ms per call), and
    from process CPU time, which a busy shared machine disturbs less."""
    engines = ("torch eager, per block", "ORT, per block", "ORT, whole network")
    lines = ["| threads | batch | " + " | ".join(f"{e}: GMAC/s wall (ms) / GMAC/s CPU" for e in engines)
             + " | per-block ORT / whole ORT: wall / CPU |", "| --- " * 6 + "|"]
    for t, by_b in d["results"].items():
        for b, r in by_b.items():
            cells = [f"{r[k]['gmacs']:.2f} ({1e3 * r[k]['wall_s']:.3f}) / {r[k]['gmacs_cpu']:.2f}" for k in engines]
            ratio = r["per-block ORT / whole ORT"]
            lines.append(f"| {t} | {b} | " + " | ".join(cells) + f" | {ratio['wall']:.2f}x / {ratio['cpu']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--seconds", type=float, default=3.0, help="timing per (threads, batch)")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    d = measure(a.checkpoint, tuple(a.threads), tuple(a.batches), a.seconds)
    print(f"MACs per image (FLOPs, MSDNet paper convention): per block (lazy, last exit) "
          f"{d['macs_per_image']['per_block'] / 1e6:.2f} M, whole network {d['macs_per_image']['whole'] / 1e6:.2f} M")
    for t, v in d["ort_load"].items():
        print(f"ORT per-block backend, {t} thread(s): export {v['export_s']:.2f} s, sessions {v['sessions_s']:.2f} s, "
              f"parity check {v['parity_s']:.2f} s")
    print(table(d))
    if a.json:
        Path(a.json).write_text(json.dumps(d, indent=1))


if __name__ == "__main__":
    main()
