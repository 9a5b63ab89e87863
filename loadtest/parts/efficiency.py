"""Part d: compute efficiency. Attained multiply-accumulates per second per block
of the staged forward at batch 1 and 64, against a large float32 matrix multiply
(the practical peak) and against ONNX Runtime on the full all-exits forward.
FLOPs = multiply-accumulates of convs and linears (MSDNet paper), per block from
the checkpoint's lazy cumulative costs."""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import time
import warnings

import numpy as np

from ..common import Plan, log


def _median_time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def efficiency(ck, test, threads: int, plan: Plan) -> dict:
    """Per block: attained MAC/s of the staged forward at batch 1 and 64; the
    practical peak (a large float32 matmul); the full all-exits forward in torch
    and in ONNX Runtime."""
    import torch

    from model.data import normalise

    torch.set_num_threads(threads)
    model = ck.model.eval()
    t = ck.transforms
    lazy = ck.exit_flops(lazy=True)
    block = [lazy[0]] + [lazy[k] - lazy[k - 1] for k in range(1, len(lazy))]
    full_flops = ck.exit_flops(lazy=False)[-1]  # the plain forward computes every node
    out = {"threads": threads, "block_flops": block, "exit_flops": lazy, "full_flops": full_flops, "batches": {}}
    with torch.inference_mode():
        for b, reps in ((1, plan.eff_repeats_b1), (64, plan.eff_repeats_b64)):
            x = normalise(test.images[:b], t.mean, t.std)
            if x.shape[0] < b:
                x = x.repeat(math.ceil(b / x.shape[0]), 1, 1, 1)[:b]
            times = np.zeros((reps, model.num_exits))
            for r in range(reps + 1):
                state = model.start(x)
                for k in range(model.num_exits):
                    t0 = time.perf_counter()
                    _, state = model.advance(state)
                    if r:
                        times[r - 1, k] = time.perf_counter() - t0
            med = np.median(times, axis=0)
            full_s = _median_time(lambda x=x: model(x), reps)
            out["batches"][b] = {"block_s": med.tolist(),
                                 "block_macs_per_s": [block[k] * b / med[k] for k in range(len(block))],
                                 "staged_total_s": float(med.sum()),
                                 "staged_macs_per_s": lazy[-1] * b / float(med.sum()),
                                 "torch_full_s": full_s, "torch_full_macs_per_s": full_flops * b / full_s,
                                 "x": x}
        n = plan.peak_n
        a, bm = torch.randn(n, n), torch.randn(n, n)
        mm_s = _median_time(lambda: torch.mm(a, bm), max(5, plan.eff_repeats_b64 // 3))
        out["peak"] = {"n": n, "seconds": mm_s, "macs_per_s": n ** 3 / mm_s}
    out["onnx"] = onnx_bench(model, out["batches"], threads, plan, full_flops)
    for v in out["batches"].values():
        v.pop("x")
    return out


def onnx_bench(model, batches: dict, threads: int, plan: Plan, full_flops: int) -> dict:
    """The full all-exits forward exported to ONNX (TorchScript exporter, else dynamo)
    and timed in ONNX Runtime's CPU provider at batch 1 and 64 on the inputs
    ``batches[b]["x"]``: seconds (median), MACs per second and the max abs difference
    of the logits against torch. ``{"error": ...}`` when onnxruntime is missing or
    the export fails."""
    try:
        import onnxruntime as ort
        import torch
    except ImportError as exc:
        return {"error": f"onnxruntime not installed ({exc}); pip install onnx onnxruntime"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "msdnet.onnx")
        x1 = batches[1]["x"].clone()  # a normal tensor: the timed ones were made in inference mode
        names = [f"exit{k + 1}" for k in range(model.num_exits)]
        exporter = "torch.onnx.export (TorchScript exporter, opset 17)"
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x1,), path, dynamo=False, opset_version=17, input_names=["x"],
                                  output_names=names, dynamic_axes={"x": {0: "n"}, **{k: {0: "n"} for k in names}})
        except Exception as first:
            exporter = "torch.onnx.export (dynamo exporter)"
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (x1,), path, dynamo=True, input_names=["x"], output_names=names,
                                      dynamic_shapes={"x": {0: torch.export.Dim("n", min=1, max=4096)}})
            except Exception as second:
                return {"error": f"ONNX export failed: {first!r}; {second!r}"}
            log(f"  TorchScript ONNX exporter failed ({first!r}); used the dynamo exporter")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        res = {"exporter": exporter, "batches": {}}
        for b, reps in ((1, plan.eff_repeats_b1), (64, plan.eff_repeats_b64)):
            x = batches[b]["x"]
            xn = x.numpy()
            outs = sess.run(None, {"x": xn})
            with torch.inference_mode():
                ref = [o.numpy() for o in model(x)]
            diff = max(float(np.abs(o - r).max()) for o, r in zip(outs, ref))
            s = _median_time(lambda xn=xn: sess.run(None, {"x": xn}), reps)
            res["batches"][b] = {"seconds": s, "macs_per_s": full_flops * b / s, "max_abs_diff": diff}
        return res
