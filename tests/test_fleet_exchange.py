"""One fleet exchange against a real redis-server, with stub services: the
figures each replica hands its controller, computed here by hand. FLOPs are
multiply-accumulates of convs and linears (toy values)."""

from __future__ import annotations

import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest
import redis

from server.budget.controller import FleetView
from server.budget.fleet import Fleet
from server.budget.keeper import ControllerSnapshot
from tests.live import free_port


class StubKeeper:
    """The :class:`server.budget.keeper.BudgetKeeper` interface the fleet uses, recording calls."""

    def __init__(self, deficit, bias, window_sum, window_n, target=100.0):
        self.snap = ControllerSnapshot(deficit, bias, window_sum, window_n, target)
        self.views, self.targets = [], []

    def snapshot(self):
        return self.snap

    def set_fleet(self, view, own_rate, horizon=None):
        self.views.append((view, own_rate, horizon))

    def set_target(self, target):
        self.targets.append(target)


@pytest.fixture
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server missing: apt-get install -y redis-server (.ci/run does)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait()


SETTINGS = SimpleNamespace(fleet_publish_interval_s=0.2, fleet_stale_after_s=5.0, fleet_horizon=200.0)


def test_each_replica_steers_on_the_others_figures(redis_url):
    a = Fleet(redis_url, StubKeeper(10.0, 2.0, 500.0, 5), SETTINGS)
    b = Fleet(redis_url, StubKeeper(-4.0, 6.0, 900.0, 3), SETTINGS)
    c = Fleet(redis_url, StubKeeper(1.0, 1.0, 100.0, 2), SETTINGS)
    a._rate, b._rate, c._rate = 2.0, 3.0, 5.0
    for f in (a, b, c, a):
        f._exchange()
    view, own_rate, horizon = a.keeper.views[-1]
    assert own_rate == 2.0 and horizon == 200.0
    assert view == FleetView(deficit=-4.0 + 1.0, bias_rate=6.0 * 3.0 + 1.0 * 5.0, rate=3.0 + 5.0)
    a.connected = True
    assert a.fleet_mean() == pytest.approx((500 + 900 + 100) / (5 + 3 + 2))
    a.connected = False
    assert a.fleet_mean() is None


def test_stale_replicas_leave_and_targets_spread(redis_url):
    a = Fleet(redis_url, StubKeeper(10.0, 2.0, 500.0, 5), SETTINGS)
    b = Fleet(redis_url, StubKeeper(-4.0, 6.0, 900.0, 3), SETTINGS)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.sadd("msdnet:replicas", "ghost")
    r.hset("msdnet:replica:ghost", mapping={"deficit": "1e9", "bias": "0", "rate": "1", "window_sum": "0",
                                            "window_n": "0", "ts": repr(time.time() - 60), "target": "100"})
    b._rate = 1.0
    b._exchange()
    a._exchange()
    assert a.keeper.views[-1][0] == FleetView(-4.0, 6.0, 1.0)
    assert r.smembers("msdnet:replicas") == {a.id, b.id}  # the silent one was dropped
    a.publish_target(123.0)
    a._exchange()
    b._exchange()
    assert a.keeper.targets == [] and b.keeper.targets == [123.0]  # adopted (the keeper does not publish)
    # An adopted target is not published back: a later change on another replica reaches b unharmed.
    a.publish_target(200.0)
    a._exchange()
    b._exchange()
    assert b.keeper.targets == [123.0, 200.0] and r.get("msdnet:target") == repr(200.0)
    a.record()
    a.record()
    assert a._requests == 2
