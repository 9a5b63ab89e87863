"""docs/BENCHMARKS.md from the measurements of ``python -m loadtest.bench``: one
function per section, each returning its Markdown lines; tables built by
:func:`table`. FLOPs = multiply-accumulates of convs and linears (MSDNet paper),
cumulative per exit; 1 MFLOPs = 10⁶ of them."""

from __future__ import annotations

from . import capacityreport
from .common import ENCODING_LABELS, PNGS, TARGET_DEADLINE_SHARE, TARGET_FLOPS_ERROR, exit_shares, fmt, pct, table, yes
from .goals import MF, figures, goals_section
from .goals import ratio as _ratio
from .parts import stages
from .parts.accuracy import TARGET_POINTS


def _server_met(row: dict) -> str:
    """Share met by the server's own clock (its ``latency_ms``, from the handler's start), 504 = miss."""
    v = row.get("server_met")
    if v is None and row.get("per_deadline"):  # older JSON: from the per-deadline shares
        per = [d for d in row["per_deadline"].values() if d.get("server_met") is not None and d["n"]]
        v = sum(d["server_met"] * d["n"] for d in per) / sum(d["n"] for d in per) if per else None
    return fmt(None if v is None else 100 * v, "{:.2f}%")


# ---------------------------------------------------------------------------- sections
def header_section(res: dict) -> list[str]:
    """Title, the FLOPs convention, the machine and run table, how latency is measured."""
    m = res["machine"]
    out = ["# Benchmarks", ""]
    if res["smoke"]:
        out += ["> **Smoke run** (`--smoke`): every part tiny, to show the scripts work. The numbers mean nothing.",
                ""]
    out += ["FLOPs in this report = multiply-accumulates (MACs) of convolutions and linear layers, as the MSDNet "
            "paper counts them, cumulative per exit, at batch size 1; served costs use lazy evaluation. "
            "1 MFLOPs = 10⁶ of them.", ""]
    rows = [
        ["machine", f"{m['cpu']}; {m['logical_cpus']} logical CPUs, {m.get('cpus', '?')} usable (threads per core "
         f"{m.get('Thread(s) per core', '?')}, cores per socket {m.get('Core(s) per socket', '?')}, sockets "
         f"{m.get('Socket(s)', '?')})"],
        ["software", f"Python {m['python']}, torch {m['torch']}, onnxruntime {m.get('onnxruntime', '–')}; "
         f"{m['platform']}"],
        ["date", f"{res['started']} to {res['finished']} (UTC), {res['wall_s'] / 60:.1f} min"],
        ["command", f"`{res['command']}`"],
        ["code", f"git {m.get('git', '?')}"],
    ]
    if res.get("rendered"):
        rows.append(["report", res["rendered"]])
    rows += [
        ["checkpoint", f"`{res['checkpoint']}`"],
        ["load average at start", f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])} (1, 5, 15 min)"],
        ["servers", f"msdnet-serve with its defaults on this machine ({res['workers_default']} HTTP worker "
         "process(es) + the engine process, ONNX Runtime per-block backend, max batch 64) except access log off; "
         "LitServe and Ray Serve run the same checkpoint's whole network in torch with their dynamic batching "
         "(max batch 64, 2 ms); the load client runs in the benchmark process on the same CPUs"],
    ]
    out += table(["", ""], rows)
    out += ["", "Latency is measured by an open-loop client (`loadtest/openloop.py`, aiohttp): Poisson arrivals at a "
            "fixed rate, each request timed from its *scheduled* send time to its answer, so queueing anywhere "
            "(server or client) counts and a slow server cannot hide its tail (no coordinated omission). Requests "
            "are real Fashion-MNIST test images (`POST /classify`, body `image/png`, or JSON `{\"image\": base64}` "
            "where the table says so). A failed request (non-200, timeout) counts as infinitely slow in "
            "percentiles.", ""]
    return out


def offline_section(res: dict) -> list[str]:
    """Test top-1 per exit and at the calibrated thresholds; per-class exit-1 top-1."""
    off = res["offline"]
    cal = off["calibrated"]
    rows = [[str(k), f"{fl / MF:.2f}", f"{100 * acc:.2f}%"]
            for k, (fl, acc) in enumerate(zip(off["exit_flops"], off["exit_top1"]), start=1)]
    rows.append(["calibrated thresholds", f"mean {cal['mean_flops'] / MF:.2f} (validation target "
                 f"{cal['target_flops'] / MF:.2f})", f"{100 * cal['top1']:.2f}%"])
    classes = off["per_class"]
    return ["## The model (offline, test split)", "",
            f"Test top-1 on {off['n']:,} images, computed in-process from the checkpoint (the reference for the "
            "served numbers above):", "",
            *table(["exit", "cumulative MFLOPs (lazy)", "top-1"], rows), "",
            f"Calibration rule: {cal['rule']}. Per-class exit-1 accuracy picks the traffic of section 7: easy = "
            f"{', '.join(res['easy_names'])}; hard = {', '.join(res['hard_names'])}.", "",
            *table(["class", *(r["name"] for r in classes)],
                   [["exit-1 top-1", *(f"{100 * r['exit1_top1']:.1f}%" for r in classes)]]), ""]


def controller_section(res: dict) -> list[str]:
    """Part b: realised mean FLOPs per phase and the worst window errors."""
    b, plan = res["b"], res["plan"]
    out = ["### Tracking", "",
           f"msdnet-serve with its defaults (`MSDNET_BUDGET_TOKEN` set) at {b['rate']:g} requests/s "
           f"({plan['controller_load']:.0%} of its capacity), {plan['controller_phase']:,} requests per phase: easy "
           "classes only, then hard classes only at the calibrated target T0, then `PUT /budget` to T1, then hard "
           "and easy again. Error of a window = its mean FLOPs per request / the mean target of its requests − 1, "
           f"over every window of {b['window']:,} consecutive answers (completion order).", ""]
    rows = [[str(r["phase"]), r["mix"], f"{r['target'] / MF:.3f}", f"{r['ok']}/{r['requests']}",
             fmt(r["mean_flops"] / MF if r["mean_flops"] else None, "{:.3f}"),
             f"{fmt(100 * r['mean_error'] if r['mean_error'] is not None else None, '{:+.2f}')}%",
             f"{pct(r['accuracy'], '{:.1f}')}%", ", ".join(f"{k}: {v}" for k, v in r["exits"].items())]
            for r in b["phases"]]
    out += table(["phase", "traffic", "target (MFLOPs)", "requests", "realised mean (MFLOPs)", "error", "accuracy",
                  "exits"], rows)
    out += ["", f"Max |error| of {b['window']:,}-request windows: **{pct(b['max_abs_error_constant'])}%** "
            "over windows under one target (these include the easy→hard and hard→easy switches); "
            f"{pct(b['max_abs_error_all'])}% over all windows, including those spanning the PUT; "
            f"{pct(b.get('max_abs_error_disjoint'))}% over disjoint windows. "
            f"Target ±{TARGET_FLOPS_ERROR:.0%}: {yes(b['target_met'])}."]
    if b.get("worst_window_start") is not None:
        ph = b["series"]["phase"]
        i = b["worst_window_start"]
        k = ph[i]
        out += ["", f"The worst window under one target starts {i - ph.index(k):,} requests into phase {k + 1} "
                f"({b['phases'][k]['mix']} @ {b['phases'][k]['target'] / MF:.3f} MFLOPs) and ends in phase "
                f"{ph[i + b['window'] - 1] + 1}."]
    return out + ["", f"![controller]({PNGS['controller']})", ""]


def deadlines_section(res: dict) -> list[str]:
    """Part c: deadlines met (overall, per deadline, by the server's clock), misses, exits."""
    c, plan = res["c"], res["plan"]
    out = ["## 3. Deadlines", "",
           f"msdnet-serve with its defaults at shares of its PNG capacity from section 1 ({c['capacity']:g} "
           "requests/s); every request carries a "
           f"deadline drawn uniformly from {', '.join(f'{x:g}' for x in c['deadlines'])} ms "
           "(`?deadline_ms=`). Met = answered 200 within the deadline measured by the client from the scheduled "
           f"send time; 504 and 503 are misses. {plan['deadline_s']:g} s scored per level. \"By the server's "
           "clock\": the answer's own `latency_ms` (from the handler's start, which is where the server starts the "
           "deadline) within the deadline; the difference is time spent before the handler (socket, event loop, "
           "client).", ""]
    rows = [[f"{r['load']:.0%}", f"{r['rate']:.1f}", str(r["requests"]), f"**{pct(r['met'])}%**",
             *(fmt(None if r["per_deadline"][f"{x:g}"]["met"] is None else 100 * r["per_deadline"][f"{x:g}"]["met"],
                   "{:.2f}%") for x in c["deadlines"]),
             _server_met(r), str(r["statuses"].get("504", 0)), str(r["statuses"].get("503", 0)), fmt(r["p99_ms"]),
             exit_shares(r["exits"]), fmt(r["mean_flops"] / MF if r["mean_flops"] else None, "{:.2f}")]
            for r in c["rows"]]
    out += table(["load", "rate (req/s)", "requests", "**met**", *(f"met, {x:g} ms" for x in c["deadlines"]),
                  "met by the server's clock", "504", "503", "p99 (ms)", "exits of answered", "mean MFLOPs"], rows)
    return out + ["", f"Target: ≥ {TARGET_DEADLINE_SHARE:.1%} met at 80% of capacity: {yes(c.get('target_met'))}.",
                  "", f"![deadlines]({PNGS['deadlines']})", ""]




def capacity_section(res: dict) -> list[str]:
    """Section 1: the tables of ``loadtest.capacity`` (``loadtest.capacityreport``) and its two plots."""
    a = res["a"]
    out = ["## 1. Capacity against LitServe and Ray Serve", "",
           "Each server in each configuration starts alone on the machine; the search runs once per request "
           "encoding. Peers: `loadtest/peers/` (the checkpoint's whole network in torch eager, each peer's own "
           "dynamic batching, max batch 64, 2 ms wait). msdnet-serve forced to the last exit: "
           "`MSDNET_TARGET_FLOPS` = the last exit's cost, so every image runs every block.", ""]
    out += capacityreport.report(a).splitlines()
    if a.get("failures"):
        out += ["", "Failures: " + "; ".join(a["failures"])]
    return out + ["", f"![capacity per server]({PNGS['capacity']})", "",
                  f"![latency against load]({PNGS['latency']})", ""]


def machine_section(res: dict) -> list[str]:
    """Section 2: cores busy at capacity and the CPU per request by stage."""
    fig = figures(res)
    out = ["## 2. Machine use and CPU per request by stage", ""]
    rows = [[ENCODING_LABELS[enc], fmt(r["msdnet"][1], "{:g}"), fmt(r.get("server_cores"), "{:.2f}"),
             fmt(r.get("client_cores"), "{:.2f}"), fmt(r["msdnet"][2].get("server_cpu_ms"), "{:.2f}")]
            for enc, r in fig.items() if r.get("msdnet")]
    if rows:
        out += ["At capacity (the passing trial at the capacity rate of section 1), msdnet-serve with its defaults:",
                "", *table(["encoding", "capacity (req/s)", "server cores busy (process tree)", "client cores busy",
                            "server CPU ms per request"], rows), ""]
    s = res.get("s")
    if s:
        out += [f"CPU per request by stage: py-spy samples every process of the server ({s['spy_rate']} Hz, non-idle "
                f"threads) while the open-loop client sends {s['rate']:g} requests/s for {s['seconds']:g} s; each "
                "sample goes to the stage of its innermost frame that names one (`loadtest/parts/stages.py`); a "
                "stage's share of the samples times the process tree's measured CPU per answered request is its "
                "CPU per request. \"event loop\": uvloop's native code (socket reads and writes, epoll, wake-ups) and "
                "asyncio bookkeeping; \"ipc\": the engine socket and msgpack; \"schedule\": service, scheduler, "
                "runner and controller. A runnable thread waiting for a core counts as busy.", "",
                *stages.report(s["rows"]).splitlines(), "", f"![CPU per request by stage]({PNGS['stages']})", ""]
    return out


def stall_section(res: dict) -> list[str]:
    """Section 4: the probes' latency under the two floods."""
    f = res["f"]
    rows = [[name, str(f[key].get("n", 0)), fmt(f[key].get("p50_ms")), fmt(f[key].get("p99_ms")),
             fmt(f[key].get("max_ms"))] for name, key in (("GET /healthz every 20 ms", "healthz"),
                                                        ("POST /classify (28x28 PNG) every 50 ms", "classify"))]
    return ["## 4. No stall under floods", "",
            f"msdnet-serve with its defaults ({f.get('workers', '?')} HTTP workers) for {f['seconds']:g} s: "
            f"{f['batch_clients']} clients send `/batch` requests of 4 RGBA 4096x4096 PNGs (64 MB of pixels each) "
            "back to back; bursts of 50 `/classify` requests of a 2048x2048 PNG with an already-passed "
            "`deadline_ms=1` arrive every ~0.2 s; two probes, each in its own process, time their requests "
            "from the send (`loadtest/parts/stall.py`).", "",
            *table(["probe", "requests", "p50 (ms)", "p99 (ms)", "max (ms)"], rows), "",
            f"Statuses: {', '.join(f'{k}: {v:,}' for k, v in sorted(f['statuses'].items()))}; the server counted "
            f"{f['rejected_deadline']:.0f} requests as `msdnet_rejected_requests_total{{reason=\"deadline\"}}`, "
            "refused before their body was read or decoded.", ""]


def blocks_section(res: dict) -> list[str]:
    """Section 5: ``loadtest.blocks``'s table."""
    from .parts import blocks

    d = res["d"]
    mi = d["macs_per_image"]
    load = "; ".join(f"{t} thread(s): export {v['export_s']:.2f} s, sessions {v['sessions_s']:.2f} s, parity check "
                     f"{v['parity_s']:.2f} s" for t, v in d.get("ort_load", {}).items())
    return ["## 5. The per-block engine against the whole network", "",
            "In-process, same model, same images: torch eager one block at a time (the reference), the ONNX "
            "Runtime per-block backend the server runs (one session per block and its classifier, the multi-scale "
            "state as named inputs and outputs), and ONNX Runtime running the whole network in one session. "
            f"GMAC/s = multiply-accumulates per image × batch / time: {mi['per_block'] / MF:.2f} MFLOPs through "
            f"every block with lazy evaluation, {mi['whole'] / MF:.2f} for the whole-network graph (it computes "
            "every node). Per-block logits are checked against torch eager at load (the backend refuses to start "
            f"otherwise). ORT load: {load}.", "", blocks.table(d), ""]


def gain_section(res: dict) -> list[str]:
    """Section 6: early-exit gain beside the FLOPs ratio, and where the difference goes."""
    fig, rows = figures(res), []
    for enc, r in fig.items():
        if not r.get("msdnet") or not r.get("last"):
            continue
        m, last = r["msdnet"][2], r["last"][2]
        rows.append([ENCODING_LABELS[enc], f"{r['msdnet'][1]:g}", f"{r['last'][1]:g}",
                     f"**{_ratio(r.get('gain'))}**",
                     fmt(m.get("mean_flops") and m["mean_flops"] / MF, "{:.2f}"),
                     fmt(last.get("mean_flops") and last["mean_flops"] / MF, "{:.2f}"), _ratio(r.get("flops_ratio")),
                     f"{fmt(m.get('server_cpu_ms'), '{:.2f}')} / {fmt(last.get('server_cpu_ms'), '{:.2f}')}"])
    out = ["## 6. Early-exit gain", "",
           *table(["encoding", "capacity, controller on (req/s)", "capacity, forced last exit (req/s)",
                   "gain", "MFLOPs per image, controller on", "MFLOPs per image, last exit", "FLOPs ratio",
                   "server CPU ms per request: on / last"], rows), ""]
    s = res.get("s")
    if s:
        net = "; ".join(f"{row['encoding']}: network {row['cpu_ms_per_stage']['network']:.2f} ms of "
                        f"{row['cpu_ms_per_request']:.2f}" for row in s["rows"])
        out += [f"Where the difference goes: the FLOPs saved are saved in the network only, and the network is a "
                f"small part of each request's CPU (section 2, controller on: {net}); HTTP, decoding, the event "
                "loops and the hand-offs between processes cost the same at every exit. With the client on the same "
                "two cores, both servers hit the same ceiling when the per-request work outside the network "
                "dominates.", ""]
    return out


def accuracy_section(res: dict) -> list[str]:
    """Section 7, second half: part e."""
    e = res["e"]
    if e.get("fixed_top1") is None:
        return ["### Accuracy on steady traffic", "", f"No answers ({e['failed']} failed).", ""]
    cal = e["calibrated"]
    return ["### Accuracy on steady traffic", "",
            f"msdnet-serve with its defaults (controller on, target {e['target_flops'] / MF:.3f} MFLOPs) answered "
            f"{e['answered']:,} test images, each once in a shuffled order, at {e['rate']:.0f} requests/s "
            f"({e['failed']} failed): **{100 * e['served_top1']:.2f}%** at {e['served_mean_flops'] / MF:.3f} "
            f"MFLOPs per image; exits {exit_shares(e['exits'])}. Fixed thresholds on the same images, interpolated "
            f"at the same mean FLOPs along the checkpoint's budgeted-batch curve ({e['curve_points']} points, "
            f"thresholds fitted on the validation split): **{100 * e['fixed_top1']:.2f}%**. Difference "
            f"**{e['difference_points']:+.3f} points** (bar: ≥ −{TARGET_POINTS}): {yes(e.get('target_met'))}. "
            f"For reference, the calibrated thresholds alone give {100 * cal['top1']:.2f}% at "
            f"{cal['mean_flops'] / MF:.3f} MFLOPs on these images, the last exit {100 * e['last_exit_top1']:.2f}%.",
            ""]


def reproduce_section(res: dict) -> list[str]:
    """The commands that make this report and its parts alone."""
    return ["## Reproduce", "", "```sh",
            "pip install -e '.[test,bench]'    # LitServe, Ray Serve, py-spy, psutil",
            f"{res['command']}   # this report (make bench)",
            "python -m loadtest.bench --out /tmp/bench-smoke --smoke   # every part tiny, seconds each",
            "python3 -m loadtest.capacity --out DIR [--only msdnet-default litserve]   # section 1 alone",
            "python3 -m loadtest.stages --out DIR --workers 2        # section 2's profile alone",
            "python3 -m loadtest.parts.deadlines --capacity R --out DIR   # section 3 alone",
            "python3 -m loadtest.stall --out DIR                      # section 4 alone",
            "python3 -m loadtest.blocks                               # section 5 alone",
            "```", ""]


def report(res: dict) -> str:
    """The whole BENCHMARKS.md for the measurements ``res`` (the parts present)."""
    parts = [header_section(res), goals_section(res)]
    for key, section in (("a", capacity_section), ("s", machine_section), ("c", deadlines_section),
                         ("f", stall_section), ("d", blocks_section)):
        if res.get(key):
            parts.append(section(res))
    if res.get("a"):
        parts.append(gain_section(res))
    if res.get("b") or res.get("e"):
        parts.append(["## 7. Budget controller", ""])
        if res.get("b"):
            parts.append(controller_section(res))
        if res.get("e"):
            parts.append(accuracy_section(res))
    parts += [offline_section(res), reproduce_section(res)]
    return "\n".join(line for p in parts for line in p)
