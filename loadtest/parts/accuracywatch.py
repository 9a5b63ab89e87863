"""Issue 24's benchmark part: does the accuracy watch flag shifted images, and at what cost?

    python3 -m loadtest.accuracywatch --out docs                     # 10 min clean, 5 min per shift
    python3 -m loadtest.accuracywatch --out docs --clean-s 1800      # the goal's 30 minutes of clean traffic
    python3 -m loadtest.accuracywatch --out /tmp/aw --smoke          # seconds: does it run

The shipped model served with its defaults (``MSDNET_AGREEMENT_SAMPLE`` 0.02) and a
real Prometheus (Debian's) scraping it every second with ``deploy/prometheus/alerts.yml``.
Open-loop Poisson traffic at ``--rate`` (``loadtest.openloop``): Fashion-MNIST test
images as they are for ``--clean-s``, then each shift of :mod:`loadtest.shifts` for
``--shift-s``, each followed by ``--recover-s`` of clean images (the alert windows
empty again). A share of the requests is labelled afterwards (``POST /feedback``, 2 s
after it was sent). Reported:

- offline, per shift: how far it moves served-vs-last top-1 and agreement (which
  shifts the goal says must be flagged);
- per shift: requests (and seconds) from its start until an accuracy-watch alert is
  pending (the signal left its band) and firing; alerts raised on clean images;
- the audits' FLOPs over the FLOPs served (goal: at most 5%);
- capacity at p99 <= 100 ms with sampling at its default and off (``--capacity``).

Writes ``accuracywatch.json`` and ``accuracywatch.png``. FLOPs are multiply-accumulates
of convs and linears (MSDNet paper convention). Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

from .. import openloop as ol
from .. import servers, shifts
from ..common import FULL
from ..promlocal import LocalPrometheus
from ..samples import encode_png, load_test_set
from . import capacity as cap

WATCH_ALERTS = ("MsdnetAgreementBelowCalibration", "MsdnetThresholdsOffCalibration")
W = "5m"  # the agreement alert's window (deploy/prometheus/alerts.yml)
SIGNALS = {  # what the plot draws, as the alert rules compute it
    "agreement_live": f'sum(increase(msdnet_agreement_total{{agree="true"}}[{W}])) / '
                      f"sum(increase(msdnet_agreement_total[{W}]))",
    "agreement_expected": f"sum(increase(msdnet_agreement_expected_total[{W}])) / "
                          f"sum(increase(msdnet_agreement_total[{W}]))",
    "audited_in_window": f"sum(increase(msdnet_agreement_total[{W}]))",
    "residual_ratio": "max(avg_over_time(msdnet_curve_residual_flops_per_request[1m]) "
                  "/ msdnet_target_in_force_flops_per_request)",
    "confidence_exit1": 'sum(rate(msdnet_exit_confidence_sum{exit="1"}[30s])) '
                        '/ sum(rate(msdnet_exit_confidence_count{exit="1"}[30s]))',
    "confidence_exit1_calibrated": 'max(msdnet_calibrated_mean_confidence{exit="1"})',
    "feedback_served_top1": 'sum(increase(msdnet_feedback_total{served="correct"}[1m])) '
                            "/ sum(increase(msdnet_feedback_total[1m]))",
}


def log(msg: str) -> None:
    print(f"[accuracywatch {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def phases(clean_s: float, shift_s: float, recover_s: float, names: list[str]) -> list[tuple[str, float]]:
    """``(shift name, seconds)`` in order: clean, then each shift followed by clean."""
    out = [(shifts.CLEAN, clean_s)]
    for name in names:
        out += [(name, shift_s), (shifts.CLEAN, recover_s)]
    return out


def encoded(images: np.ndarray, names: list[str]) -> dict[str, list[bytes]]:
    """PNG bytes of every image under each shift."""
    return {name: [encode_png(x) for x in shifts.apply(name, images)] for name in {shifts.CLEAN, *names}}


class Labeller:
    """Posts ``POST /feedback`` with the true label of every ``every``-th request,
    ``delay_s`` after it was due (labels arrive later), on a thread; counts answers by status."""

    def __init__(self, url: str, times: np.ndarray, labels: list[int], every: int, delay_s: float = 2.0):
        self.url, self.times, self.labels, self.every, self.delay_s = url, times, labels, every, delay_s
        self.statuses: dict[int, int] = {}
        self.t0: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=5.0, trust_env=False) as client:
            for i in range(0, len(self.times), self.every):
                while self.t0 is None or time.monotonic() < self.t0 + self.times[i] + self.delay_s:
                    if self._stop.wait(0.05):
                        return
                try:
                    r = client.post(self.url + "/feedback", json={"request_id": f"aw{i}", "label": self.labels[i]})
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                except Exception:  # noqa: BLE001 - a lost label is a gap, not a failure
                    self.statuses[0] = self.statuses.get(0, 0) + 1

    def __enter__(self) -> Labeller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def first_time(series: list[dict], after: float, before: float) -> float | None:
    """The first sample time in [after, before) of any series (Unix seconds), None if none."""
    ts = [float(t) for s in series for t, _ in s["values"] if after <= float(t) < before]
    return min(ts) if ts else None


def spans(series: list[dict], after: float, before: float, step_s: float = 1.0) -> list[list[float]]:
    """The stretches of [after, before) in which any series has samples (an alert firing),
    as ``[start, end]`` seconds from ``after``; samples ``step_s`` apart belong together."""
    ts = sorted({float(t) for s in series for t, _ in s["values"] if after <= float(t) < before})
    out: list[list[float]] = []
    for t in ts:
        if out and t - (out[-1][1] + after) <= 1.5 * step_s:
            out[-1][1] = t - after
        else:
            out.append([t - after, t - after])
    return out


def stream(checkpoint: str, plan: list[tuple[str, float]], bodies: dict[str, list[bytes]], labels: np.ndarray,
           rate: float, folder: Path, label_every: int, seed: int = 0) -> dict:
    """Serve ``plan`` at ``rate`` with Prometheus watching; the figures per phase and the signals."""
    times = ol.phased_schedule([(s, rate) for _, s in plan], max_requests=int(sum(s for _, s in plan) * rate * 1.3)
                               + 100, seed=seed)
    bounds = np.cumsum([0.0] + [s for _, s in plan])
    phase_of = np.searchsorted(bounds, times, side="right") - 1
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(labels), len(times))

    def make(i: int) -> ol.Request:
        name = plan[phase_of[i]][0]
        return ol.Request("/classify", bodies[name][pick[i]], "image/png", int(labels[pick[i]]), tag=name,
                          request_id=f"aw{i}")

    cfg = servers.msdnet(checkpoint, None, tag="watch")
    with cfg.make() as srv, LocalPrometheus([srv.url], folder / "prometheus") as prom:
        with Labeller(srv.url, times, [int(labels[p]) for p in pick], label_every) as labeller:
            started = time.time()
            labeller.t0 = time.monotonic()
            run = ol.run(srv.url, make, rate, float(bounds[-1]), timeout_s=10.0, times=times)
        time.sleep(3.0)  # the last scrape and rule evaluation
        t0 = run.started_unix
        end = t0 + float(bounds[-1])
        signals = {k: prom.query_range(q, t0, end, 5.0) for k, q in SIGNALS.items()}
        alert_sel = "|".join(WATCH_ALERTS)
        firing = prom.query_range(f'ALERTS{{alertname=~"{alert_sel}", alertstate="firing"}}', t0, end, 1.0)
        pending = prom.query_range(f'ALERTS{{alertname=~"{alert_sel}"}}', t0, end, 1.0)
        others = prom.query_range('ALERTS{alertstate="firing"}', t0, end, 5.0)
        rows = []
        for k, (name, seconds) in enumerate(plan):
            a, b = t0 + bounds[k], t0 + bounds[k + 1]
            recs = [r for r in run.records if bounds[k] <= r.scheduled_s < bounds[k + 1]]
            ok = [r for r in recs if r.status == 200]
            audit = prom.query(f"sum(increase(msdnet_audit_flops_total[{seconds:g}s]))", at=b)
            served = prom.query(f'sum(increase(msdnet_flops_total{{endpoint="/classify"}}[{seconds:g}s]))', at=b)
            fired, pend = first_time(firing, a, b), first_time(pending, a, b)
            by_alert = {s["metric"]["alertname"]: first_time([s], a, b) for s in firing}
            rows.append({
                "phase": name, "seconds": seconds, "requests": len(recs), "ok": len(ok),
                "served_top1": float(np.mean([bool(r.correct) for r in ok])) if ok else None,
                "mean_flops": float(np.mean([r.flops for r in ok])) if ok else None,
                "p99_ms": ol.percentile([r.latency_s * 1e3 for r in ok], 99) if ok else None,
                "audit_flops_share": (float(audit[0]["value"][1]) / float(served[0]["value"][1])
                                      if audit and served and float(served[0]["value"][1]) > 0 else None),
                "pending_after_s": None if pend is None else pend - a,
                "pending_after_requests": None if pend is None else sum(r.scheduled_s < pend - t0 for r in recs),
                "firing_after_s": None if fired is None else fired - a,
                "firing_after_requests": None if fired is None else sum(r.scheduled_s < fired - t0 for r in recs),
                "firing_by_alert_s": {k2: (None if v is None else v - a) for k2, v in by_alert.items()},
                "firing_at_start": first_time(firing, a - 2.0, a) is not None,  # still firing from before
                "firing_seconds": sum(1 for s in firing for t, _ in s["values"] if a <= float(t) < b),
                "firing_spans_s": spans(firing, a, b)})
        rules = prom.rules()
    return {"started_unix": started, "run_started_unix": t0, "bounds_s": bounds.tolist(), "phases": rows,
            "signals": {name: [[float(t), float(x)] for series in result for t, x in series["values"]]
                        for name, result in signals.items()},
            "other_alerts": sorted({s["metric"]["alertname"] for s in others}),
            "rules_health": {r["name"]: r["health"] for r in rules}, "feedback_statuses": labeller.statuses,
            "statuses": ol.summarise(run.records)["statuses"], "server": cfg.label + ", " + cfg.config}


def capacity(checkpoint: str, samples, plan, slo_ms: float) -> dict:
    """Capacity (requests/s at p99 <= ``slo_ms``) with sampling at its default and off."""
    make = ol.classify_requests(samples)
    out = {}
    for key, env in (("sampling 0.02 (default)", {}), ("sampling off", {"MSDNET_AGREEMENT_SAMPLE": "0"})):
        log(f"capacity, {key}")
        with servers.msdnet(checkpoint, None, env=env, tag=key.split()[1]).make() as srv:
            found = cap.find_capacity(srv, make, plan, slo_ms, key)
        out[key] = {"capacity_rps": found["capacity_rps"], "first_fail_rps": found["first_fail_rps"]}
    return out


def main(argv: list[str] | None = None) -> int:
    from model import DEFAULT_CHECKPOINT
    from model.checkpoint import load

    from ..machine import machine_info
    from ..samples import to_samples

    p = argparse.ArgumentParser(prog="python3 -m loadtest.accuracywatch", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--out", required=True)
    p.add_argument("--rate", type=float, default=20.0, help="requests/s, open loop (Poisson)")
    p.add_argument("--clean-s", type=float, default=600.0, help="seconds of clean images first (goal: 1800)")
    p.add_argument("--shift-s", type=float, default=300.0, help="seconds of each shift")
    p.add_argument("--recover-s", type=float, default=300.0, help="seconds of clean images after each shift")
    p.add_argument("--label-every", type=int, default=10, help="POST /feedback for every N-th request")
    p.add_argument("--capacity", action=argparse.BooleanOptionalAction, default=True,
                   help="capacity with sampling at its default and off")
    p.add_argument("--smoke", action="store_true", help="seconds per phase; no capacity search")
    p.add_argument("--benchmarks", help="merge the section into this BENCHMARKS.md (e.g. docs/BENCHMARKS.md)")
    p.add_argument("--capacity-only", action="store_true", help="add the capacity figures to OUT/accuracywatch.json "
                   "of an earlier run (on a quiet machine) and merge again")
    a = p.parse_args(argv)
    ck = load(a.checkpoint, calibrated=True)
    test = load_test_set()
    out = Path(a.out)
    if a.capacity_only:
        path = out / "accuracywatch.json"
        res = json.loads(path.read_text())
        res["capacity"] = capacity(a.checkpoint, to_samples(test, limit=2000), FULL, 100.0)
        res["capacity_machine"] = machine_info()
        path.write_text(json.dumps(res, indent=1, default=float))
        log(f"capacity: {res['capacity']}; wrote {path}")
        if a.benchmarks:
            from ..accuracyreport import merge_into

            merge_into(a.benchmarks, out)
        return 0
    images, labels = test.images.numpy(), test.labels.numpy()
    names = [n for n in shifts.SHIFTS if n != shifts.CLEAN]
    out.mkdir(parents=True, exist_ok=True)
    if a.smoke:
        a.rate, a.clean_s, a.shift_s, a.recover_s, a.capacity = 10.0, 20.0, 15.0, 5.0, False
        images, labels = images[:500], labels[:500]
    res: dict = {"checkpoint": a.checkpoint, "machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "rate_rps": a.rate, "clean_s": a.clean_s, "shift_s": a.shift_s, "recover_s": a.recover_s,
                 "target_flops": ck.calibration.target_flops, "exit_flops": ck.exit_flops(lazy=True),
                 "images": f"Fashion-MNIST test split, {len(labels)} images"}
    log("offline: every test image through every exit, per shift")
    res["offline"] = shifts.offline(ck, images, labels, [shifts.CLEAN, *names])
    for name, f in res["offline"].items():
        log(f"  {name:16s} last {f['last_top1']:.2%} served {f['served_top1']:.2%} agreement {f['agreement']:.2%}"
            f" must flag: {f.get('must_flag')}")
    if a.capacity:
        res["capacity"] = capacity(a.checkpoint, to_samples(test, limit=2000), FULL, 100.0)
    plan = phases(a.clean_s, a.shift_s, a.recover_s, names)
    log(f"stream at {a.rate:g} req/s: " + " -> ".join(f"{n} {s:g} s" for n, s in plan))
    res["stream"] = stream(a.checkpoint, plan, encoded(images, names), labels, a.rate, out, a.label_every)
    for row in res["stream"]["phases"]:
        log(f"  {row['phase']:16s} {row['requests']:6d} requests, pending after {row['pending_after_requests']}, "
            f"firing after {row['firing_after_requests']} requests ({row['firing_by_alert_s']}), audit share "
            f"{row['audit_flops_share']}")
    res["label_every"] = a.label_every
    path = out / ("accuracywatch-smoke.json" if a.smoke else "accuracywatch.json")
    path.write_text(json.dumps(res, indent=1, default=float))
    plot(res, path.with_suffix(".png"))
    log(f"wrote {path}")
    if a.benchmarks and not a.smoke:
        from ..accuracyreport import merge_into

        merge_into(a.benchmarks, out)
        log(f"merged the section into {a.benchmarks}")
    return 0


def plot(res: dict, path: Path) -> None:
    """The signals across the phases: agreement live vs expected, the controller's
    curve's residual, exit 1's mean confidence, labelled top-1; shifts shaded, alerts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["stream"]
    t0 = s["run_started_unix"]
    sig = {k: (np.array([(t - t0) / 60 for t, _ in v]), np.array([x for _, x in v])) for k, v in s["signals"].items()}
    fig, axes = plt.subplots(4, 1, figsize=(12, 10), sharex=True)
    panels = [(("agreement_live", "live"), ("agreement_expected", "calibration expects"), "agreement with the\n"
               f"last exit ({W} window)"),
              (("residual_ratio", "curve residual / target"), None, "thresholds off the curve\n(residual / target)"),
              (("confidence_exit1", "live"), ("confidence_exit1_calibrated", "calibration"), "mean confidence\nexit 1"),
              (("feedback_served_top1", "served top-1 (labels)"), None, "labelled top-1\n(1 min)")]
    for ax, (first, second, ylabel) in zip(axes, panels):
        for key, name in (first, second) if second else (first,):
            t, v = sig.get(key, ([], []))
            ax.plot(t, v, lw=1, label=name)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="lower left")
    axes[1].axhspan(-0.1, 0.1, color="green", alpha=0.08)  # MsdnetThresholdsOffCalibration's band
    for k, row in enumerate(s["phases"]):
        a, b = s["bounds_s"][k] / 60, s["bounds_s"][k + 1] / 60
        for ax in axes:
            if row["phase"] != shifts.CLEAN:
                ax.axvspan(a, b, color="orange", alpha=0.12)
            if row["firing_after_s"] is not None:
                ax.axvline(a + row["firing_after_s"] / 60, color="red", lw=0.8, ls="--")
        if row["phase"] != shifts.CLEAN:
            axes[0].text(a, axes[0].get_ylim()[0], row["phase"], fontsize=7, va="bottom")
    axes[-1].set_xlabel(f"minutes at {res['rate_rps']:g} requests/s "
                        "(shifts shaded; red: an accuracy-watch alert fires)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
