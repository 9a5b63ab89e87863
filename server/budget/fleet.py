"""Fleet mode: replicas share their FLOPs accounting through Redis.

Each replica, on its own thread every ``fleet_publish_interval_s`` seconds:

1. writes its figures to the hash ``msdnet:replica:<id>`` (deficit and bias of
   its controller, request rate, window sum and count, wall-clock time) and adds
   its id to the set ``msdnet:replicas``;
2. reads the other replicas' hashes, dropping those older than
   ``fleet_stale_after_s`` (gone replicas leave the fleet figures);
3. adopts the fleet target in ``msdnet:target`` (``PUT /budget`` on any replica
   writes it) and hands the fleet view to its controller.

Requests never touch Redis: they only update in-memory counters, so an
unreachable or restarting Redis neither fails nor slows them. On a Redis error
the replica falls back to local mode (logged once, ``msdnet_fleet_mode`` 0) and
rejoins when Redis answers again. FLOPs: multiply-accumulates of convs and
linears (MSDNet paper convention).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import redis

from ..settings import Settings
from .controller import FleetView
from .keeper import BudgetKeeper

log = logging.getLogger("msdnet.fleet")
PREFIX = "msdnet"


class Fleet:
    """The Redis side of one replica.

    Args:
        url: Redis URL, e.g. ``redis://127.0.0.1:6379/0``.
        keeper: the replica's :class:`server.budget.keeper.BudgetKeeper`.
        settings: for the publish interval, staleness timeout and fleet horizon.
        on_mode: called with True when steering on the fleet, False in local mode.
    """

    def __init__(self, url: str, keeper: BudgetKeeper, settings: Settings,
                 on_mode: Callable[[bool], None] | None = None):
        self.redis = redis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25,
                                          decode_responses=True)
        self.keeper = keeper
        self.on_mode = on_mode
        self.interval = settings.fleet_publish_interval_s
        self.stale_after = settings.fleet_stale_after_s
        self.horizon = settings.fleet_horizon
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.connected = False
        self._was_connected: bool | None = None
        self._requests = 0  # since the last publish
        self._count_lock = threading.Lock()  # counted on the model thread, read on the fleet thread
        self._rate = 0.0
        self._fleet_mean: float | None = None
        self._target_seen: float | None = None
        self._target_to_publish: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="msdnet-fleet", daemon=True)

    # ---- request path (no I/O) ------------------------------------------
    def record(self) -> None:
        """Count one answered /classify request (for this replica's request rate)."""
        with self._count_lock:
            self._requests += 1

    def fleet_mean(self) -> float | None:
        """Fleet-wide mean FLOPs per request over the replicas' windows."""
        return self._fleet_mean if self.connected else None

    def publish_target(self, target: float) -> None:
        """Make ``target`` the fleet's at the next exchange (no I/O here)."""
        self._target_to_publish = float(target)

    # ---- thread -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        try:
            self.redis.srem(f"{PREFIX}:replicas", self.id)
            self.redis.delete(f"{PREFIX}:replica:{self.id}")
        except redis.RedisError:
            pass

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            with self._count_lock:
                n, self._requests = self._requests, 0
            alpha = min(1.0, (now - last) / 5.0)  # rate smoothed over about 5 s
            self._rate += alpha * (n / max(now - last, 1e-3) - self._rate)
            last = now
            try:
                self._exchange()
                self._set_connected(True)
            except redis.RedisError as exc:
                self._set_connected(False, exc)

    def _set_connected(self, ok: bool, exc: Exception | None = None) -> None:
        self.connected = ok
        if ok != self._was_connected:
            if ok:
                log.info("fleet mode: steering on the fleet-wide mean (replica %s)", self.id)
            else:
                log.warning("Redis unreachable (%s): local mode until it answers again", exc)
                self.keeper.set_fleet(None, 0.0)
            if self.on_mode is not None:
                self.on_mode(ok)
            self._was_connected = ok

    def _exchange(self) -> None:
        mine = dataclasses.asdict(self.keeper.snapshot())
        now = mine["ts"] = time.time()
        mine["rate"] = self._rate
        pipe = self.redis.pipeline()
        publish = self._target_to_publish
        if publish is not None:
            pipe.set(f"{PREFIX}:target", repr(publish))
        pipe.hset(f"{PREFIX}:replica:{self.id}", mapping={k: repr(float(v)) for k, v in mine.items()})
        pipe.expire(f"{PREFIX}:replica:{self.id}", max(1, int(2 * self.stale_after)))
        pipe.sadd(f"{PREFIX}:replicas", self.id)
        pipe.get(f"{PREFIX}:target")
        pipe.smembers(f"{PREFIX}:replicas")
        *_, target, members = pipe.execute()
        if publish is not None:
            self._target_to_publish = None
            self._target_seen = publish
        others = sorted(m for m in members if m != self.id)
        pipe = self.redis.pipeline()
        for m in others:
            pipe.hgetall(f"{PREFIX}:replica:{m}")
        rows = pipe.execute() if others else []
        deficit = bias_rate = rate = 0.0
        total_sum, total_n = mine["window_sum"], mine["window_n"]
        for member, row in zip(others, rows):
            if not row or now - float(row.get("ts", 0)) > self.stale_after:
                self.redis.srem(f"{PREFIX}:replicas", member)
                continue
            deficit += float(row["deficit"])
            bias_rate += float(row["bias"]) * float(row["rate"])
            rate += float(row["rate"])
            total_sum += float(row["window_sum"])
            total_n += float(row["window_n"])
        if target is not None and float(target) != self._target_seen:
            self._target_seen = float(target)
            if float(target) != mine["target"]:
                self.keeper.set_target(float(target))
        self._fleet_mean = total_sum / total_n if total_n else None
        self.keeper.set_fleet(FleetView(deficit, bias_rate, rate), self._rate, self.horizon)
