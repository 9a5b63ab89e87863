"""The accuracy watch's alert rule, evaluated by a real Prometheus (Debian's) on the
series a real server exports while it is fed shifted images (issue 24).

The shipped model with every early answer audited (``MSDNET_AGREEMENT_SAMPLE=1``)
gets Fashion-MNIST test images with their contrast halved (``loadtest.shifts``):
its early exits then disagree with its last exit far more often than calibration
says. Prometheus scrapes every second with ``deploy/prometheus/alerts.yml`` whose
time windows only are shortened (5 minutes to 20 s, ``for`` 1 minute to 5 s), so
the same expressions (bands, significance, minimum count) fire within a test's
time; ``MsdnetAgreementBelowCalibration`` must fire.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from loadtest import shifts
from loadtest.promlocal import ALERT_RULES, LocalPrometheus, prometheus_binary
from loadtest.samples import encode_png, load_test_set
from tests.live import LiveServer

pytestmark = pytest.mark.integration

SHORTER = {"[5m]": "[20s]", "[1m]": "[10s]", "for: 1m": "for: 5s"}


def shortened_rules(folder):
    """alerts.yml with the accuracy watch's windows shortened (its rules come last; the others unchanged)."""
    text = ALERT_RULES.read_text()
    cut = text.index("# --- The accuracy watch")
    head, watch = text[:cut], text[cut:]
    for old, new in SHORTER.items():
        assert old in watch, old
        watch = watch.replace(old, new)
    path = folder / "alerts-short.yml"
    path.write_text(head + watch)
    return path


def test_agreement_alert_fires_on_shifted_images(tmp_path):
    if prometheus_binary() is None:
        pytest.fail("prometheus not found: apt-get install -y prometheus")
    test = load_test_set()
    shifted = [encode_png(x) for x in shifts.apply("contrast halved", test.images[:600].numpy())]
    env = {"MSDNET_AGREEMENT_SAMPLE": "1", "MSDNET_AGREEMENT_MAX_FLOPS_SHARE": "1", "MSDNET_ACCESS_LOG": "false"}
    with LiveServer(env=env) as srv, \
            LocalPrometheus([srv.url], tmp_path / "prom", rules=shortened_rules(tmp_path)) as prom, \
            httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as client, ThreadPoolExecutor(2) as pool:
        rules = {r["name"]: r for r in prom.rules()}
        assert {"MsdnetAgreementBelowCalibration", "MsdnetThresholdsOffCalibration"} <= set(rules)

        def send(i: int) -> int:
            return client.post("/classify", content=shifted[i % len(shifted)],
                               headers={"content-type": "image/png"}).status_code

        state, sent, end = "inactive", 0, time.monotonic() + 120.0
        while state != "firing":
            assert time.monotonic() < end, f"not firing after {sent} shifted images: {rules}"
            assert set(pool.map(send, range(sent, sent + 20))) == {200}
            sent += 20
            time.sleep(0.2)  # spare capacity between the bursts: the audits run then
            rules = {r["name"]: r for r in prom.rules()}
            assert all(r["health"] in ("ok", "unknown") for r in rules.values()), rules  # unknown: not yet evaluated
            state = rules["MsdnetAgreementBelowCalibration"]["state"]
        alert = rules["MsdnetAgreementBelowCalibration"]["alerts"][0]
        assert float(alert["value"]) > 0.05  # points of agreement below what calibration expects
        firing = prom.query('ALERTS{alertname="MsdnetAgreementBelowCalibration", alertstate="firing"}')
        assert firing and firing[0]["metric"]["job"] == "msdnet"
