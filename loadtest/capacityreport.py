"""The Markdown of a capacity run (``python3 -m loadtest.capacity``'s CAPACITY.md,
section 1 of docs/BENCHMARKS.md): the best configuration per server, the ratios
between them, every configuration with its trials. Reads a run as
``loadtest.parts.capacity`` stores it (capacity.json, or ``res["a"]`` of the
bench's JSON); rates in requests/s, latencies in ms, FLOPs = multiply-accumulates
of convs and linears (MSDNet paper convention), cumulative per exit.
"""

from __future__ import annotations

from .common import ENCODING_LABELS, ENCODINGS, fmt


def best_per_family(res: dict) -> dict:
    """``{family: {encoding: (key, capacity)}}``: the configuration of each server family
    with the highest capacity (requests/s) per encoding; ``res``: a capacity run."""
    out: dict = {}
    for key, srv in res["servers"].items():
        for enc, run in srv.get("encodings", {}).items():
            cur = out.setdefault(srv["family"], {}).get(enc)
            if cur is None or run["capacity_rps"] > cur[1]:
                out[srv["family"]][enc] = (key, run["capacity_rps"])
    return out


FAMILY_ORDER = ("litserve-ort", "litserve", "ray-ort", "ray", "msdnet", "msdnet-last")


def report(res: dict) -> str:
    """The Markdown of a capacity run (``res`` as written to capacity.json): the header
    line, the best configuration per server (capacity in requests/s, p99 in ms, MFLOPs
    per image, CPU cores busy and CPU ms per request), the ratios, every configuration."""
    plan, lines = res["plan"], []
    w = lines.append
    la0 = ", ".join(f"{x:.2f}" for x in res["loadavg_at_start"])
    la1 = ", ".join(f"{x:.2f}" for x in res.get("loadavg_at_end", []))
    w(f"Command: `{res['command']}` ({res['started']} UTC{', smoke: numbers mean nothing' if res['smoke'] else ''}); "
      f"{res['machine']['cpus']} CPUs (affinity), load average at start {la0}, at end {la1} (1, 5, 15 min).")
    w("")
    w(f"Capacity = highest Poisson rate with p99 ≤ {res['slo_ms']:g} ms and no failed request; each trial "
      f"{plan['warmup_s']:g} s warm-up + {plan['trial_s']:g} s scored; search from {plan['start']:g} req/s, doubling, "
      f"then geometric bisection to a ratio < {plan['stop_ratio']:g} (≤ {plan['max_trials']} trials). Client and "
      f"servers share the CPUs. Accuracy: the answers of the trial at capacity ({res['images']} "
      f"{res.get('images_source', 'Fashion-MNIST test images')} cycled). CPU: cores busy over that trial, "
      "server = its whole process tree (psutil), client = this process. MFLOPs per image = multiply-accumulates "
      "of convs and linears (MSDNet paper convention), mean over the answers.")
    w("")
    best = best_per_family(res)
    w("### Best configuration per server")
    w("")
    w("| server | encoding | best configuration | capacity (req/s) | p99 at capacity (ms) | accuracy served | "
      "MFLOPs per image | CPU cores busy: server + client | CPU ms per request: server / client |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fam in FAMILY_ORDER:
        for enc in ENCODINGS:
            if enc not in best.get(fam, {}):
                continue
            key, cap = best[fam][enc]
            srv = res["servers"][key]
            t = srv["encodings"][enc]["at_capacity"] or {}
            w(f"| {srv['label']} | {ENCODING_LABELS[enc]} | {srv['config']} | **{fmt(cap)}** | "
              f"{fmt(t.get('p99_ms'))} | "
              f"{fmt(None if t.get('accuracy') is None else 100 * t['accuracy'], '{:.2f}%')} ({t.get('scored', 0)}) | "
              f"{fmt(None if t.get('mean_flops') is None else t['mean_flops'] / 1e6, '{:.2f}')} | "
              f"{fmt(t.get('server_cores'), '{:.2f}')} + {fmt(t.get('client_cores'), '{:.2f}')} | "
              f"{fmt(t.get('server_cpu_ms'), '{:.2f}')} / {fmt(t.get('client_cpu_ms'), '{:.2f}')} |")
    w("")
    ratios = []
    for enc in ENCODINGS:
        m = best.get("msdnet", {}).get(enc, (None, 0))[1]
        ml = best.get("msdnet-last", {}).get(enc, (None, 0))[1]
        for fam, name in (("litserve", "LitServe"), ("ray", "Ray Serve")):
            p = best.get(fam, {}).get(enc, (None, 0))[1]
            if p:
                ratios.append(f"{ENCODING_LABELS[enc]}: controller on / {name} = **{m / p:.2f}×**, forced last "
                              f"exit / {name} = {ml / p:.2f}×")
    if ratios:
        w("Ratios of the best configurations (issue 12 judges msdnet-serve by its defaults, in the goals table; "
          "goal: controller on ≥ 2.5× each peer; forced last exit ≥ 1× the best peer): "
          + "; ".join(ratios) + ".")
        w("")
    w("### Every configuration")
    w("")
    w("| server | configuration | " + " | ".join(f"capacity, {ENCODING_LABELS[e]} (req/s)" for e in ENCODINGS)
      + " | trials |")
    w("| --- | --- | " + " | ".join("---" for _ in ENCODINGS) + " | --- |")
    for srv in res["servers"].values():
        if srv.get("error"):
            w(f"| {srv['label']} | {srv['config']} | " + " | ".join("–" for _ in ENCODINGS) + f" | {srv['error']} |")
            continue
        caps = [fmt(srv["encodings"].get(e, {}).get("capacity_rps")) for e in ENCODINGS]
        trials = "; ".join(f"{e}: " + ", ".join(f"{t['rate']:g}{'✓' if t['passed'] else '✗'}"
                                                for t in srv["encodings"].get(e, {}).get("trials", []))
                           for e in ENCODINGS)
        w(f"| {srv['label']} | {srv['config']} | " + " | ".join(caps) + f" | {trials} |")
    w("")
    return "\n".join(lines)
