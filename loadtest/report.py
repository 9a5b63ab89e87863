"""docs/BENCHMARKS.md from the measurements of ``python -m loadtest.bench``: one
function per section, each returning its Markdown lines; tables built by
:func:`table`. FLOPs = multiply-accumulates of convs and linears (MSDNet paper),
cumulative per exit; 1 MFLOPs = 10⁶ of them."""

from __future__ import annotations

from .common import (
    PNGS,
    TARGET_ACC_DROP_POINTS,
    TARGET_DEADLINE_SHARE,
    TARGET_FLOPS_ERROR,
    TARGET_SPEEDUP,
    fmt,
    pct,
)

MF = 1e6  # MACs per MFLOPs


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table: the header row, the ``---`` row, then ``rows`` (each as many
    cells as ``header``; ``ValueError`` otherwise). An empty cell is written ``| |``."""
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row of {len(r)} cells under a header of {len(header)}: {r}")

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"

    return [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]


def _yes(ok) -> str:
    return "**met**" if ok else "**not met**"


def _exit_shares(exits: dict) -> str:
    """``{"1": n1, ...}`` as '1: 40%, 2: 60%' (shares of the answered requests)."""
    tot = sum(exits.values()) or 1
    return ", ".join(f"{k}: {100 * v / tot:.0f}%" for k, v in exits.items())


def _capacity_trial(r: dict) -> dict | None:
    """The passing search trial at a server's capacity rate, if any."""
    return next((s for s in r["search"]["trials"] if s["rate"] == r["capacity_rps"] and s["passed"]), None)


def _cpu_cells(r: dict) -> list[str]:
    """CPU ms per request (server / client) and cores busy (server + client) in the
    search trial at the capacity rate."""
    t = _capacity_trial(r)
    if t is None or t.get("server_cpu_ms") is None:
        return ["–", "–"]
    srv, cli, rate = t["server_cpu_ms"], t["client_cpu_ms"], t["rate"]
    return [f"{srv:.2f} / {cli:.2f}", f"{srv * rate / 1e3:.2f} + {cli * rate / 1e3:.2f}"]


def _server_met(row: dict) -> str:
    """Share met by the server's own clock (its ``latency_ms``, from the handler's start), 504 = miss."""
    v = row.get("server_met")
    if v is None and row.get("per_deadline"):  # older JSON: from the per-deadline shares
        per = [d for d in row["per_deadline"].values() if d.get("server_met") is not None and d["n"]]
        v = sum(d["server_met"] * d["n"] for d in per) / sum(d["n"] for d in per) if per else None
    return fmt(None if v is None else 100 * v, "{:.2f}%")


def where_time_goes(res: dict) -> str:
    """A two-point fit of server CPU per request against mean FLOPs, from the
    capacity trials of the two msdnet-serve servers ('' when it cannot be made)."""
    a, d = res["a"], res.get("d")
    pts = []
    for key in ("msdnet", "last_exit"):
        t = _capacity_trial(a["servers"][key])
        if t is None or t.get("server_cpu_ms") is None or not t.get("mean_flops"):
            return ""
        pts.append((t["mean_flops"] / 1e6, t["server_cpu_ms"], t["server_cpu_ms"] * t["rate"] / 1e3))
    (f1, c1, u1), (f2, c2, u2) = pts
    if abs(f2 - f1) < 1e-9:
        return ""
    if c1 <= 0 or f2 == f1:  # no CPU figure (smoke runs)
        return ""
    slope = (c2 - c1) / (f2 - f1)  # ms per MFLOP
    if slope <= 0:  # noise swamps the FLOPs' share (short or smoke runs): no line to draw
        return ""
    fixed = c1 - slope * f1
    text = (f"Where the time goes: at capacity each msdnet-serve process keeps about {u1:.2f} and {u2:.2f} CPU cores "
            f"busy (of {res['machine']['logical_cpus']}; the event loop and the model thread share one interpreter), "
            f"so the two saturate alike and the throughput ratio tracks "
            f"the ratio of server CPU per request ({c2:.2f} / {c1:.2f} ms = {c2 / c1:.2f}). A straight line through "
            f"the two points gives ≈ {fixed:.2f} ms per request whatever the FLOPs (HTTP, PNG decoding, scheduling, "
            f"JSON) plus {slope:.3f} ms per MFLOP, i.e. the model part runs at ≈ {1 / slope:.1f} GMAC/s")
    if d:
        b1 = d["batches"][1]["staged_macs_per_s"] / 1e9
        b64 = d["batches"][64]["staged_macs_per_s"] / 1e9
        text += (f", close to the staged forward at batch 1 ({b1:.1f} GMAC/s in part d) rather than at batch 64 "
                 f"({b64:.1f} GMAC/s), which suggests the block steps run on small batches at these arrival rates")
    return text + ". (A two-point estimate, not a profile.)\n"


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
        ["machine", f"{m['cpu']}; {m['logical_cpus']} logical CPUs (threads per core "
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
        ["servers", f"uvicorn, 1 process each, torch threads {res['torch_threads']}; msdnet-serve with its "
         "defaults (max batch 64, block-1 queue delay 2 ms, queue 1,024) except access log off; the load client "
         "runs in the benchmark process on the same CPUs"],
    ]
    out += table(["", ""], rows)
    out += ["", "Latency is measured by an open-loop client (`loadtest/openloop.py`, aiohttp): Poisson arrivals at a "
            "fixed rate, each request timed from its *scheduled* send time to its answer, so queueing anywhere "
            "(server or client) counts and a slow server cannot hide its tail (no coordinated omission). Requests "
            "are real Fashion-MNIST test images sent as PNG (`POST /classify`, body `image/png`). A failed request "
            "(non-200, timeout) counts as infinitely slow in percentiles.", ""]
    return out


def targets_section(res: dict) -> list[str]:
    """One row per target of the parts that ran: the result and whether it is met."""
    a, b, c = res.get("a"), res.get("b"), res.get("c")
    rows = []
    if a:
        sp, drop = a.get("speedup_vs_last_exit"), a.get("accuracy_drop_points")
        ok = sp is not None and drop is not None and sp >= TARGET_SPEEDUP and drop <= TARGET_ACC_DROP_POINTS
        rows.append([f"throughput at p99 ≤ {res['slo_ms']:g} ms ≥ {TARGET_SPEEDUP}× the forced-last-exit server's, "
                     f"at accuracy within {TARGET_ACC_DROP_POINTS} points",
                     f"{fmt(sp, '{:.2f}')}×, accuracy {fmt(None if drop is None else -drop, '{:+.2f}')} points vs "
                     f"the forced last exit (on the {a['common']['images']:,} test images both answered)", _yes(ok)])
    if c:
        r80 = next((r for r in c["rows"] if abs(r["load"] - 0.8) < 1e-9), None)
        if r80:
            ok = r80["met"] is not None and r80["met"] >= TARGET_DEADLINE_SHARE
            rows.append([f"≥ {TARGET_DEADLINE_SHARE:.1%} of deadlines met at 80% of capacity (504 = miss)",
                         f"{pct(r80['met'])}% of {r80['requests']}", _yes(ok)])
    if b:
        e = b["max_abs_error_constant"]
        ok = e is not None and e <= TARGET_FLOPS_ERROR
        rows.append([f"mean FLOPs within ±{TARGET_FLOPS_ERROR:.0%} of target (every {b['window']}-request window)",
                     f"max \\|error\\| {pct(e)}%", _yes(ok)])
    return ["## Targets", "", *table(["target", "result", ""], rows), ""]


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
            f"Test top-1 on {off['n']:,} images, computed in-process from the checkpoint (reference for the served "
            "numbers below):", "",
            *table(["exit", "cumulative MFLOPs (lazy)", "top-1"], rows), "",
            f"Calibration rule: {cal['rule']}. Per-class exit-1 accuracy picks the traffic of part b: easy = "
            f"{', '.join(res['easy_names'])}; hard = {', '.join(res['hard_names'])}.", "",
            *table(["class", *(r["name"] for r in classes)],
                   [["exit-1 top-1", *(f"{100 * r['exit1_top1']:.1f}%" for r in classes)]]), ""]


def throughput_section(res: dict) -> list[str]:
    """Part a: capacity, latency, accuracy and CPU per server; ratios; every rate tried."""
    a, plan, off = res["a"], res["plan"], res["offline"]
    slo = res["slo_ms"]
    servers = list(a["servers"].values())
    out = [f"## a. Throughput at an SLO (p99 ≤ {slo:g} ms)", "",
           f"Search: start at {plan['search_start']:g} requests/s, double until p99 > {slo:g} ms (or a "
           f"request fails), then bisect geometrically ({plan['bisect_steps']} steps); each rate "
           f"{plan['warmup_s']:g} s warm-up + {plan['trial_s']:g} s scored. Capacity = the highest passing rate. "
           "Accuracy: a second run at that rate sends each test image once, all servers in the same shuffled "
           f"order (as many as fit in {plan['confirm_max_s']:g} s; {plan['confirm_max_s_naive']:g} s for the naive "
           "baseline, whose answers are the last exit's anyway); its p50/p99 (after the warm-up) are a longer check "
           "of the capacity.", ""]
    rows = []
    for r in servers:
        acc = r["accuracy_run"]
        ge = "≥ " if r["search"]["hit_search_max"] else ""
        rows.append([r["label"], f"**{ge}{r['capacity_rps']:g}**", f"{fmt(acc['p50_ms'])} / {fmt(acc['p99_ms'])}",
                     f"{pct(acc['accuracy'])}% ({acc['images']:,})",
                     fmt(acc["mean_flops"] / MF if acc["mean_flops"] else None, "{:.2f}"), _exit_shares(acc["exits"]),
                     *_cpu_cells(r)])
    out += table(["server", "capacity (req/s)", "p50 / p99 at capacity (ms)", "accuracy served (images)",
                  "mean MFLOPs per request", "exits (share)", "CPU ms per request: server / client",
                  "CPU cores busy: server + client"], rows)
    out.append("")
    slow = [r["label"] for r in servers if r["accuracy_run"]["p99_ms"] > slo]
    if slow:
        out += [f"Over the SLO in the longer accuracy run at the capacity found: {'; '.join(slow)}. The capacity "
                f"from {plan['trial_s']:g}-s trials is optimistic there; p99 at rates near capacity varies from run "
                "to run by tens of ms.", ""]
    cm, cal = a["common"], off["calibrated"]
    drop = a.get("accuracy_drop_points")
    out += [f"Accuracy on the {cm['images']:,} test images both msdnet-serve servers answered: controller on "
            f"{pct(cm['msdnet'])}%, forced last exit {pct(cm['last_exit'])}% (offline, all {off['n']:,}: last exit "
            f"{100 * off['exit_top1'][-1]:.2f}%, calibrated thresholds {100 * cal['top1']:.2f}%).", "",
            f"Ratios: msdnet-serve / forced last exit = **{fmt(a.get('speedup_vs_last_exit'), '{:.2f}')}×**; "
            f"msdnet-serve / naive = **{fmt(a.get('speedup_vs_naive'), '{:.2f}')}×**; forced last exit / naive = "
            f"{fmt(a.get('last_exit_vs_naive'), '{:.2f}')}×. Accuracy of msdnet-serve minus forced last exit: "
            f"{fmt(-drop if drop is not None else None, '{:+.2f}')} "
            f"points (target: no worse than −{TARGET_ACC_DROP_POINTS}). Target: ≥ {TARGET_SPEEDUP}× at that "
            f"accuracy: {_yes(a.get('target_met'))}.", ""]
    out += [f"- {r['label']}: {r['how']}" for r in servers]
    out += ["", where_time_goes(res)]
    if any(r["search"]["hit_search_max"] for r in servers):
        out += [f"≥: the search stopped at its highest rate ({plan['search_max']:g} requests/s) without failing.", ""]
    out += [f"![throughput]({PNGS['throughput']})", "", "<details><summary>Every rate tried</summary>", ""]
    trials = [[r["label"], f"{s['rate']:g}", str(s["requests"]), str(s["ok"]), fmt(s["p50_ms"]), fmt(s["p99_ms"]),
               fmt(s["p999_ms"]), fmt(s["send_lag_p99_ms"]),
               f"{fmt(s.get('server_cpu_ms'), '{:.2f}')} / {fmt(s.get('client_cpu_ms'), '{:.2f}')}",
               fmt(s["mean_flops"] / MF if s["mean_flops"] else None, "{:.2f}"), "pass" if s["passed"] else "fail"]
              for r in servers for s in r["search"]["trials"]]
    out += table(["server", "rate (req/s)", "requests", "ok", "p50 (ms)", "p99 (ms)", "p99.9 (ms)",
                  "client send lag p99 (ms)", "CPU ms per request: server / client", "mean MFLOPs", "SLO"], trials)
    return out + ["", "</details>", ""]


def controller_section(res: dict) -> list[str]:
    """Part b: realised mean FLOPs per phase and the worst window errors."""
    b, plan = res["b"], res["plan"]
    out = ["## b. Controller tracking", "",
           f"msdnet-serve (the server of a(i), `MSDNET_BUDGET_TOKEN` set) at {b['rate']:g} requests/s "
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
            f"Target ±{TARGET_FLOPS_ERROR:.0%}: {_yes(b['target_met'])}."]
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
    out = ["## c. Deadlines", "",
           f"msdnet-serve (a(i)) at shares of its capacity ({c['capacity']:g} requests/s); every request carries a "
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
             _exit_shares(r["exits"]), fmt(r["mean_flops"] / MF if r["mean_flops"] else None, "{:.2f}")]
            for r in c["rows"]]
    out += table(["load", "rate (req/s)", "requests", "**met**", *(f"met, {x:g} ms" for x in c["deadlines"]),
                  "met by the server's clock", "504", "503", "p99 (ms)", "exits of answered", "mean MFLOPs"], rows)
    return out + ["", f"Target: ≥ {TARGET_DEADLINE_SHARE:.1%} met at 80% of capacity: {_yes(c.get('target_met'))}.",
                  "", f"![deadlines]({PNGS['deadlines']})", ""]


def _rate_cells(seconds: float, macs_per_s: float, peak: float | None, ms_spec: str) -> list[str]:
    """ms, GMAC/s and (with ``peak``, MACs/s) the share of the peak."""
    cells = [ms_spec.format(1e3 * seconds), f"{macs_per_s / 1e9:.2f}"]
    return cells + ([f"{100 * macs_per_s / peak:.1f}%"] if peak else [])


def efficiency_section(res: dict) -> list[str]:
    """Part d: attained MACs/s per block against the matmul peak; torch vs ONNX Runtime."""
    d, plan = res["d"], res["plan"]
    pk = d["peak"]["macs_per_s"]
    b1, b64 = d["batches"][1], d["batches"][64]
    out = ["## d. Compute efficiency", "",
           f"In-process, {d['threads']} torch thread(s) (as the servers), real test images. Staged forward "
           "(`model.start`/`model.advance`, lazy evaluation, classifier included) timed per block, median of "
           f"{plan['eff_repeats_b1']} (batch 1) and {plan['eff_repeats_b64']} (batch 64) passes; MACs per block "
           "from the checkpoint's `costs` (`flops_lazy` differences). Practical peak: a float32 "
           f"{d['peak']['n']}×{d['peak']['n']} matrix multiply, {d['peak']['n']}³ MACs.", ""]
    rows = [[str(k + 1), f"{fl / MF:.2f}",
             *_rate_cells(b1["block_s"][k], b1["block_macs_per_s"][k], pk, "{:.3f}"),
             *_rate_cells(b64["block_s"][k], b64["block_macs_per_s"][k], pk, "{:.2f}")]
            for k, fl in enumerate(d["block_flops"])]
    rows.append(["all (staged)", f"{d['exit_flops'][-1] / MF:.2f}",
                 *_rate_cells(b1["staged_total_s"], b1["staged_macs_per_s"], pk, "{:.3f}"),
                 *_rate_cells(b64["staged_total_s"], b64["staged_macs_per_s"], pk, "{:.2f}")])
    out += table(["block", "MFLOPs (MACs)", "batch 1: ms", "GMAC/s", "% of peak", "batch 64: ms", "GMAC/s",
                  "% of peak"], rows)
    out += ["", f"Practical peak (matmul): **{pk / 1e9:.1f} GMAC/s** ({1e3 * d['peak']['seconds']:.1f} ms).", "",
            f"Full all-exits forward ({d['full_flops'] / MF:.2f} MFLOPs per image), torch vs ONNX Runtime "
            f"({d['onnx'].get('exporter', '')}; CPU provider, {d['threads']} intra-op thread(s), all graph "
            "optimisations):", ""]
    rows = []
    for bb in (1, 64):
        tb = d["batches"][bb]
        ob = d["onnx"].get("batches", {}).get(bb)
        torch_cells = _rate_cells(tb["torch_full_s"], tb["torch_full_macs_per_s"], None, "{:.3f}")
        if ob:
            rows.append([str(bb), *torch_cells, *_rate_cells(ob["seconds"], ob["macs_per_s"], None, "{:.3f}"),
                         f"{ob['macs_per_s'] / tb['torch_full_macs_per_s']:.2f}×", f"{ob['max_abs_diff']:.1e}"])
        else:
            rows.append([str(bb), *torch_cells, "–", "–", "–", "–"])
    out += table(["batch", "torch ms", "torch GMAC/s", "ONNX Runtime ms", "ONNX Runtime GMAC/s", "ORT / torch",
                  "max abs diff of logits"], rows)
    if "error" in d["onnx"]:
        out += ["", f"ONNX: {d['onnx']['error']}"]
    return out + ["", f"![efficiency]({PNGS['efficiency']})", ""]


def reproduce_section(res: dict) -> list[str]:
    """The commands that make this report and run the other load tests."""
    return ["## Reproduce", "", "```sh",
            "pip install -e '.[test]'           # locust, onnx, onnxruntime, aiohttp (via tritonclient[http])",
            f"{res['command']}   # this report",
            "python -m loadtest.bench --out /tmp/bench-smoke --smoke   # every part tiny, seconds each",
            "locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s --host http://127.0.0.1:8000 \\",
            "    --csv /tmp/msdnet-locust --only-summary            # mixed traffic against a running server",
            "python -m loadtest.openloop --url http://127.0.0.1:8000 --rate 200 --duration 10 --deadline-ms 50 100",
            "```", ""]


def report(res: dict) -> str:
    """The whole BENCHMARKS.md for the measurements ``res`` (parts a-d as present)."""
    parts = [header_section(res), targets_section(res), offline_section(res)]
    for key, section in (("a", throughput_section), ("b", controller_section), ("c", deadlines_section),
                         ("d", efficiency_section)):
        if res.get(key):
            parts.append(section(res))
    parts.append(reproduce_section(res))
    return "\n".join(line for p in parts for line in p)
