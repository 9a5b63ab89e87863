"""The Markdown section of one ``loadtest.realbench`` run (to be merged into docs/BENCHMARKS.md).

``python3 -m loadtest.realreport DIR/realbench-NAME.json --out DIR/REALBENCH-NAME.md`` renders it again.

FLOPs = multiply-accumulates of convs and linears (MSDNet paper convention),
cumulative per exit; effective GMAC/s = mean FLOPs per answer x requests/s.
"""

from __future__ import annotations

from .common import fmt, table

ENC_LABEL = {"png": "raw image body", "json": "JSON base64"}


def _best(servers: dict, family: str, enc: str) -> tuple[str | None, float]:
    best = (None, 0.0)
    for key, s in servers.items():
        run = s.get("encodings", {}).get(enc)
        if s["family"] == family and run and run["capacity_rps"] > best[1]:
            best = (key, run["capacity_rps"])
    return best


def _mflops(run: dict) -> float | None:
    t = run.get("at_capacity") or {}
    return None if t.get("mean_flops") is None else t["mean_flops"] / 1e6


def _batches(run: dict) -> str:
    b = run.get("batches")
    if not b:
        return ""
    parts = []
    for block in sorted(b, key=lambda k: int(k) if str(k).isdigit() else 0):
        v = b[block]
        mean = v["images"] / v["steps"] if v["steps"] else None
        parts.append(f"{block}: {fmt(mean, '{:.1f}')}")
    top = max((v["largest_bucket_since_start"] or 0 for v in b.values()), default=None)
    return ", ".join(parts) + f"; largest ≤ {fmt(top, '{:g}')}"


def capacity_rows(res: dict) -> list[list[str]]:
    """One row per configuration and encoding."""
    rows = []
    for s in res["capacity"]["servers"].values():
        if s.get("error"):
            rows.append([s["label"], s["config"], "–", "–", "–", "–", "–", "–", "–", s["error"][:120]])
            continue
        for enc, run in s["encodings"].items():
            t = run.get("at_capacity") or {}
            mf = _mflops(run)
            gmacs = None if mf is None else mf * run["capacity_rps"] / 1e3
            rows.append([s["label"], s["config"], ENC_LABEL[enc], f"**{fmt(run['capacity_rps'])}**",
                         fmt(t.get("p99_ms")), fmt(mf, "{:.1f}"), fmt(gmacs, "{:.1f}"),
                         fmt(t.get("server_cores"), "{:.2f}"),
                         f"{fmt(t.get('server_rss_peak_mib'), '{:.0f}')} / {fmt(run.get('rss_peak_mib'), '{:.0f}')}",
                         _batches(run)])
    return rows


def ratios(res: dict) -> list[str]:
    """Goals 2 and 3 of issue 22 as sentences per encoding: early-exit gain against
    the FLOPs ratio, and msdnet-serve against the best whole-network ORT peer."""
    servers = res["capacity"]["servers"]
    last_flops = res["costs"][-1]["flops_lazy"] / 1e6
    out = []
    encs = sorted({e for s in servers.values() for e in s.get("encodings", {})})
    for enc in encs:
        forced = [(k, s) for k, s in servers.items() if s["family"] == "msdnet-last" and enc in s["encodings"]]
        if not forced:
            continue
        fk, fs = max(forced, key=lambda kv: kv[1]["encodings"][enc]["capacity_rps"])
        c_last = fs["encodings"][enc]["capacity_rps"]
        peer_key, peer = max((_best(servers, f, enc) for f in ("litserve-ort", "ray-ort", "litserve", "ray")),
                             key=lambda kv: kv[1])
        for k, s in servers.items():
            run = s.get("encodings", {}).get(enc)
            if s["family"] != "msdnet" or not run or not run["capacity_rps"]:
                continue
            mf = _mflops(run)
            fr = last_flops / mf if mf else None
            gain = run["capacity_rps"] / c_last if c_last else None
            line = (f"{ENC_LABEL[enc]}, {k}: {fmt(run['capacity_rps'])} req/s at {fmt(mf, '{:.0f}')} MFLOPs per "
                    f"answer; against forced last exit ({fk}, {fmt(c_last)} req/s) **{fmt(gain, '{:.2f}')}×** for "
                    f"a FLOPs ratio of {fmt(fr, '{:.2f}')}× = {fmt(None if not (gain and fr) else gain / fr, '{:.2f}')}"
                    " of it")
            if peer:
                vs = run["capacity_rps"] / peer
                line += (f"; against the best peer ({peer_key}, {fmt(peer)} req/s) **{vs:.2f}×** = "
                         f"{fmt(None if not fr else vs / fr, '{:.2f}')} of the FLOPs ratio")
            out.append(line + ".")
        if peer and c_last:
            out.append(f"{ENC_LABEL[enc]}: forced to the last exit / best peer = **{c_last / peer:.2f}×**.")
    return out


def machine_rate(res: dict) -> float | None:
    """Whole-network ONNX Runtime GMAC/s of all usable CPUs: the best 1-thread rate over
    the measured batch sizes (``res["blocks"]``) times the usable CPUs; None without it."""
    b = res.get("blocks") or {}
    one = (b.get("results") or {}).get(1) or (b.get("results") or {}).get("1")
    if not one:
        return None
    best = max(r["ORT, whole network"]["gmacs"] for r in one.values())
    return best * (res["machine"].get("cpus") or 1)


def machine_use(res: dict) -> list[str]:
    """Goal 4 of issue 22 per msdnet-serve configuration: effective GMAC/s at capacity
    against :func:`machine_rate`."""
    rate = machine_rate(res)
    if not rate or not res.get("capacity"):
        return []
    out = []
    for key, s in res["capacity"]["servers"].items():
        for enc, run in s.get("encodings", {}).items():
            mf = _mflops(run)
            if s["family"].startswith("msdnet") and mf and run["capacity_rps"]:
                eff = mf * run["capacity_rps"] / 1e3
                out.append(f"{ENC_LABEL[enc]}, {key}: effective {eff:.1f} GMAC/s = **{eff / rate:.2f}×** the "
                           f"whole-network ONNX Runtime rate of all {res['machine'].get('cpus')} CPUs "
                           f"({rate:.1f} GMAC/s: best 1-thread batch × CPUs).")
    return out


def section(res: dict) -> str:
    """The whole section: header, network, capacity, blocks, decode."""
    from .decodecost import table as decode_table
    from .parts.blocks import table as blocks_table

    m = res["machine"]
    speed = " (speed-only: random weights; answers meaningless)" if res.get("speed_only") else ""
    w: list[str] = [f"## Real size: {res['name']}{speed}", ""]
    smoke = "; smoke: numbers mean nothing" if res["smoke"] else ""
    w.append(f"Command: `{res['command']}` ({res['started']} UTC{smoke}); {m.get('cpu')}, {m.get('cpus')} usable "
             "CPUs, load average at start "
             f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_start', []))}; git {m.get('git', '?')}.")
    w.append("")
    if res.get("official_args"):
        w.append(f"Network: official arguments `{res['official_args']}`; input: {res['contract']}.")
    else:
        w.append(f"Network: {res['checkpoint']}; input: {res['contract']}.")
    w.append("")
    w += table(["exit"] + [str(c["exit"]) for c in res["costs"]],
               [["MFLOPs, lazy (served)"] + [f"{c['flops_lazy'] / 1e6:.1f}" for c in res["costs"]],
                ["MFLOPs, all nodes"] + [f"{c['flops'] / 1e6:.1f}" for c in res["costs"]],
                ["MFLOPs, official counter"] + [f"{c['flops_official'] / 1e6:.2f}" for c in res["costs"]]])
    w += ["", "FLOPs = multiply-accumulates of convs and linears (MSDNet paper convention), cumulative per exit, "
          "batch 1.", ""]
    c = res.get("capacity")
    if c:
        p = c["plan"]
        w += ["### Capacity", "",
              f"Capacity = highest Poisson rate with p99 ≤ {res['slo_ms']:g} ms and no failed request (open loop, "
              f"same client, same {m.get('cpus')} CPUs as the servers); trials {p['warmup_s']:g} s + {p['trial_s']:g}"
              f" s from {p['start']:g} req/s, doubling then bisecting, ≤ {p['max_trials']} trials or "
              f"{p['max_search_s']:g} s per search. Images: {c['images']} {c['images_source']}. Effective GMAC/s = "
              "mean MFLOPs per answer × req/s. RSS: sum over the server's process tree, peak at capacity / over the "
              "search (MiB). Batches: msdnet-serve's mean images per block step over the search, per block.", ""]
        w += table(["server", "configuration", "encoding", "capacity (req/s)", "p99 (ms)", "MFLOPs per answer",
                    "effective GMAC/s", "server cores", "peak RSS (MiB)", "batches per block"], capacity_rows(res))
        w.append("")
        for line in ratios(res) + machine_use(res):
            w.append(f"- {line}")
        for line in c.get("skipped", []):
            w.append(f"- {line}")
        w.append("")
    if res.get("blocks"):
        w += ["### Per-block engine against the whole network (ONNX Runtime), GMAC/s", "",
              blocks_table(res["blocks"]), ""]
    if res.get("decode"):
        w += ["### Decode + preprocessing per image: full JPEG decode against Pillow's draft mode", "",
              f"Contract: {res['decode']['contract']}. Difference = draft − full of the preprocessed float32 tensor.",
              "", decode_table(res["decode"]), ""]
    if res.get("failures"):
        w += ["Failures: " + "; ".join(res["failures"][:10]), ""]
    return "\n".join(w) + "\n"


MARKER = "<!-- real sizes: rendered by python3 -m loadtest.realreport --docs DIR from DIR/realbench-*.json -->"


def docs_part(folder) -> str:
    """The real-size part of ``folder/BENCHMARKS.md``: a heading, then :func:`section` of every
    ``folder/realbench-*.json`` (by name), then the overload part
    (:func:`loadtest.overloadreport.docs_part`, from ``folder/overload-*.json``); "" when there is none."""
    import json
    from pathlib import Path

    from .overloadreport import docs_part as overload_part

    files = sorted(Path(folder).glob("realbench-*.json"))
    if not files:
        return overload_part(folder) and "\n".join(["", MARKER, ""]) + overload_part(folder)
    head = ["", MARKER, "", "# Real sizes (issue 22)", "",
            "The paper's networks at their real sizes, made from the official arguments with random weights "
            "(speed-only: `loadtest/realsize.py`), one `make bench-real` run per size; what the figures mean and "
            "where the CPU goes: `docs/REALSIZES.md`.", ""]
    return ("\n".join(head) + "\n" + "\n".join(section(json.loads(f.read_text())) for f in files)
            + overload_part(folder))


def merge_into(benchmarks, folder) -> None:
    """Replace the real-size part of the file ``benchmarks`` (from :data:`MARKER` on, or append)
    with :func:`docs_part` of ``folder``."""
    from pathlib import Path

    path = Path(benchmarks)
    text = path.read_text() if path.exists() else ""
    if MARKER in text:
        text = text[:text.index(MARKER)].rstrip("\n") + "\n"
    path.write_text(text + docs_part(folder))


def main(argv: list[str] | None = None) -> int:
    """``python3 -m loadtest.realreport realbench-NAME.json [--out FILE.md]``: the section again from the figures;
    ``--docs DIR``: every DIR/realbench-*.json into DIR/BENCHMARKS.md (its real-size part)."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python3 -m loadtest.realreport", description=main.__doc__)
    p.add_argument("json", nargs="?")
    p.add_argument("--out", help="write here (default: print)")
    p.add_argument("--docs", help="folder holding BENCHMARKS.md and realbench-*.json")
    a = p.parse_args(argv)
    if a.docs:
        merge_into(Path(a.docs) / "BENCHMARKS.md", a.docs)
        return 0
    if not a.json:
        p.error("a realbench JSON file, or --docs DIR")
    md = section(json.loads(Path(a.json).read_text()))
    if a.out:
        Path(a.out).write_text(md)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
