"""Benchmark: Distributor Chat, the bare limit of its design and a FastAPI peer, one table.

    python bench/run.py            full run (many minutes)
    python bench/run.py --quick    every scenario, smaller counts (about two minutes)
    python bench/run.py --only ours       (or --servers ours,bare / bare / peer ...)

Three servers speak the same protocol subset: ours (distributor_chat.py); the bare
limit (bench/peers/bare_limit.py: our design with everything but the durable write
path and the hub taken away, a yardstick of what this architecture can do on this
machine); the peer (bench/peers/seed_fastapi.py: a FastAPI + SQLAlchemy build, as a
typical team writes it). Each runs each scenario in a temporary directory on a fresh
copy of a database that holds only the scenarios' users and sessions (scenario 4:
plus its bulk messages; scenario 6: empty), started with `--rate-limit 0 --no-demo`
and a secret this program mints its tokens with (ours also with a per-address
connection cap of 1,000,000: every client is 127.0.0.1). All three store with
SQLite WAL and `synchronous = FULL` and ack only after COMMIT. Users and sessions go
in through each server's `import` subcommand, bulk history through SQL (ours, bare)
or the peer's `load-messages`; everything else is the SPEC protocol over 127.0.0.1.

The load generator is this one process (one event loop, uvloop when installed) on
the same CPUs as the server; the report gives its CPU share in every scenario and
flags a scenario where it neared a full core (then the figure is partly the
generator's limit). Each scenario states the load it offers.

Scenarios: 1a open loop at a fixed offered rate, 1b closed-loop capacity, 1c
overload (an open loop meant to exceed the servers' capacity, then a drain), each on
a fresh server; 2 idle sockets, 3 spread, 4 room list and room open on a big database, 5
reconnect storm, 6 startup. Every loop is bounded in count and time; every server
started is stopped, also on failure. Progress goes to stderr, the report to stdout.
Exit status 1 when one of our checks fails (lost, repeated or dropped messages) or
one of our scenarios errors; the peers' problems are reported but do not fail the
run. The FastAPI peer is skipped, with a line saying so, when its file or its
dependencies (fastapi, uvicorn, sqlalchemy) are missing.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import dataclasses
import importlib.util
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import aiohttp

from load import (SCRIPTS, Server, auth, chat_frame, client_session, coach_gym, loads, median,
                  open_room, pairs_gym, percentile, raise_fd_limit, self_cpu_seconds)

PEER_DEPS = ("fastapi", "uvicorn", "sqlalchemy")
SPREAD_ROOM0 = 100_000  # coach1's rooms (scenario 3) are 100001..
LIST_ROOM0 = 200_000    # coach2's rooms (scenario 4) are 200001..
STORM_ROOM0 = 300_000   # scenario 5's rooms are 300001.., trainers storm1, storm2, ...
STORM_ROOMS_PER_TRAINER = 50
IDLE_SOCKETS_PER_USER = 10


@dataclasses.dataclass(frozen=True)
class Sizes:
    tp_rooms: int = 500          # 1a and 1c
    tp_rate: int = 2000          # 1a: offered msg/s, open loop
    tp_seconds: float = 30
    cap_rooms: int = 300         # 1b: closed loop
    cap_window: int = 16         # 1b: messages in flight per member
    cap_seconds: float = 20      # 1b: the measured window
    drain_s: float = 30          # 1a, 1b: longest wait for outstanding acks after sending stops
    ov_rate: int = 8000          # 1c: offered msg/s, open loop
    ov_seconds: float = 15
    ov_drain_s: float = 30
    idle_sockets: int = 10_000
    idle_seconds: float = 60
    spread_rooms: int = 300
    spreads: int = 50
    list_rooms: int = 300
    list_messages: int = 1_000_000
    list_requests: int = 200
    list_opens: int = 100
    storm_clients: int = 2000
    loop_budget_s: float = 60    # longest time for one latency loop (requests, opens, spreads)
    scenario_timeout_s: float = 900


FULL = Sizes()
# Quick: every scenario, every server, in about two minutes on 2 cores (the FastAPI
# peer needs ~13 ms a WebSocket handshake, so socket counts and phases are shorter
# than FULL's; the offered rates stay).
QUICK = Sizes(tp_rooms=100, tp_seconds=3, cap_rooms=100, cap_seconds=2, drain_s=1.5,
              ov_seconds=2, ov_drain_s=2, idle_sockets=500, idle_seconds=2,
              spread_rooms=100, spreads=10, list_messages=50_000, list_requests=50,
              list_opens=30, storm_clients=300, loop_budget_s=1.5, scenario_timeout_s=60)


# ------------------------------------------------------------------ report ---
@dataclasses.dataclass
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "higher", "lower", "check" (must be 0) or "info"


def metrics(s: Sizes) -> list[Metric]:
    return [
        Metric("tp_offered", f"1a throughput, {s.tp_rate} msg/s offered to {s.tp_rooms} rooms "
               f"for {s.tp_seconds:g} s: sent", "msg/s", "info"),
        Metric("tp_acked", "1a throughput: acked", "msg/s", "higher"),
        Metric("tp_ack_p50", "1a throughput: ack p50 (never acked = inf)", "ms", "lower"),
        Metric("tp_ack_p99", "1a throughput: ack p99 (never acked = inf)", "ms", "lower"),
        Metric("tp_delivery_p99", "1a throughput: send->delivery p99 (never delivered = inf)",
               "ms", "lower"),
        Metric("tp_unacked", f"1a throughput: unacked {s.drain_s:g} s after sending stopped",
               "msgs", "info"),
        Metric("tp_max", f"1b max sustained, closed loop, {s.cap_rooms} rooms, {s.cap_window} "
               f"in flight per member, {s.cap_seconds:g} s: acked", "msg/s", "higher"),
        Metric("tp_max_ack_p50", "1b max sustained: ack p50 (never acked = inf)", "ms", "lower"),
        Metric("tp_max_ack_p99", "1b max sustained: ack p99 (never acked = inf)", "ms", "lower"),
        Metric("ov_offered", f"1c overload, {s.ov_rate} msg/s offered to {s.tp_rooms} rooms "
               f"for {s.ov_seconds:g} s: sent", "msg/s", "info"),
        Metric("ov_sent", "1c overload: messages sent", "msgs", "info"),
        Metric("ov_acked", f"1c overload: acked by {s.ov_drain_s:g} s after sending stopped",
               "msgs", "info"),
        Metric("ov_acked_pct", "1c overload: acked, share of sent (compared: the counts "
               "sent differ)", "%", "higher"),
        Metric("ov_refused", "1c overload: refused (error frame or socket closed)", "msgs",
               "info"),
        Metric("ov_unanswered", "1c overload: neither acked nor refused at the end", "msgs",
               "info"),
        Metric("ov_ack_p99", "1c overload: ack p99 of the acked", "ms", "lower"),
        Metric("ov_drain_s", "1c overload: sending stopped->last answer (nan: not drained)",
               "s", "lower"),
        Metric("tp_lost", "1 throughput check (1a-1c): acked but lost, undelivered or "
               "repeated, or refused but stored", "msgs", "check"),
        Metric("idle_kib", f"2 idle sockets ({s.idle_sockets} for {s.idle_seconds:g} s): "
               "RSS per socket (peak)", "KiB", "lower"),
        Metric("idle_dropped", "2 idle sockets check: failed or dropped", "sockets", "check"),
        Metric("spread_p50", f"3 spread to {s.spread_rooms} rooms ({s.spreads} spreads): "
               "send->last receipt p50", "ms", "lower"),
        Metric("spread_p99", "3 spread: send->last receipt p99", "ms", "lower"),
        Metric("spread_ack_p50", "3 spread: send->trainer's ack p50", "ms", "lower"),
        Metric("spread_ack_p99", "3 spread: send->trainer's ack p99", "ms", "lower"),
        Metric("spread_bad", "3 spread check: not stored/received once per room", "spreads",
               "check"),
        Metric("list_p50", f"4 room list ({s.list_rooms} rooms, {s.list_messages} msgs, "
               f"{s.list_requests} GETs): p50", "ms", "lower"),
        Metric("list_p99", "4 room list: p99", "ms", "lower"),
        Metric("open_p50", f"4 open room with after ({s.list_opens} opens): "
               "connect->history p50", "ms", "lower"),
        Metric("open_p99", "4 open room with after: connect->history p99", "ms", "lower"),
        Metric("storm_ms", f"5 reconnect storm ({s.storm_clients} clients): all histories in",
               "ms", "lower"),
        Metric("storm_bad", "5 reconnect storm check: lost or repeated + failed", "msgs",
               "check"),
        Metric("start_empty", "6 startup to healthz, empty database", "ms", "lower"),
        Metric("start_big", f"6 startup to healthz, {s.list_messages}-message database", "ms",
               "lower"),
        Metric("rss_rest", "6 RSS at rest after startup", "MiB", "lower"),
    ]


def offered_load(s: Sizes) -> list[str]:
    """What each scenario asks of a server, as the report states it."""
    return [
        f"1a  open loop: {s.tp_rate} msg/s for {s.tp_seconds:g} s, round robin over "
        f"{s.tp_rooms} members (trainers receive), sent whatever the answers",
        f"1b  closed loop: {s.cap_rooms} members x {s.cap_window} in flight = "
        f"{s.cap_rooms * s.cap_window} messages outstanding, a new one per answer, "
        f"{s.cap_seconds:g} s window",
        f"1c  open loop: {s.ov_rate} msg/s for {s.ov_seconds:g} s over {s.tp_rooms} members, "
        f"then up to {s.ov_drain_s:g} s for the answers",
        f"2   {s.idle_sockets} sockets opened 200 handshakes at a time, then idle "
        f"{s.idle_seconds:g} s",
        f"3   {s.spreads} spreads to {s.spread_rooms} rooms, one at a time (the next after "
        "every member has the last)",
        f"4   {s.list_requests} room-list GETs, then {s.list_opens} room opens, one at a time",
        f"5   {s.storm_clients} members reconnect with `after` all at once while "
        f"{math.ceil(s.storm_clients / STORM_ROOMS_PER_TRAINER)} trainers spread",
        "6   none: spawn to the first healthz 200, RSS 0.5 s later",
    ]


class Run:
    """Results of one server: metrics, CPU shares per scenario, notes."""

    def __init__(self, kind: str):
        self.kind = kind
        self.values: dict[str, float] = {}
        self.cpu: dict[str, tuple[float, float, float]] = {}  # scenario: wall, bench, server
        self.notes: list[str] = []
        self.failed = False

    def note(self, text: str) -> None:
        self.notes.append(text)
        progress(f"  {self.kind}: {text}")


class Meter:
    """CPU seconds of the bench process and of one server over a measured phase."""

    def __init__(self, run: Run, scenario: str):
        self.run, self.scenario = run, scenario

    def __call__(self, server: Server) -> "Meter":
        self.server = server
        return self

    def __enter__(self) -> "Meter":
        self.wall0, self.bench0 = time.perf_counter(), self_cpu_seconds()
        self.server0 = self.server.cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        wall, bench, server = self.run.cpu.get(self.scenario, (0.0, 0.0, 0.0))
        self.run.cpu[self.scenario] = (
            wall + time.perf_counter() - self.wall0, bench + self_cpu_seconds() - self.bench0,
            server + self.server.cpu_seconds() - self.server0)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------- helpers ---
async def connect_many(http, server: Server, specs: list[tuple], parallel: int = 100,
                       after: dict | None = None) -> list:
    """Opens sockets for (room, user_id, role) specs, `parallel` handshakes at a time;
    returns [(ws, history)] in order, or an exception in place of a failed one."""
    gate = asyncio.Semaphore(parallel)

    async def one(spec):
        async with gate:
            return await open_room(http, server, *spec)

    return await asyncio.gather(*(one(spec) for spec in specs), return_exceptions=True)


def opened(results: list) -> list:
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(results)} sockets failed to open, "
                           f"first: {failures[0]!r}")
    return [ws for ws, _ in results]


def read_forever(ws, handle) -> asyncio.Task:
    """A task handing every text frame of `ws` to `handle` until the socket closes."""
    async def reader():
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                handle(loads(msg.data))
    return asyncio.create_task(reader())


async def wait_until(condition, timeout_s: float, step_s: float = 0.01) -> bool:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        if time.perf_counter() >= deadline:
            return False
        await asyncio.sleep(step_s)
    return True


async def cancel(tasks) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def stored_client_ids(server: Server) -> dict[str, int]:
    return dict(server.query("SELECT client_id, count(*) FROM messages GROUP BY client_id"))


# ------------------------------------------------------------- scenarios ---
class ChatLoad:
    """Scenario 1's bookkeeping: both participants of rooms 1..n connected, members
    send, trainers receive. Every message is known by its client_id, whose first
    letter is the phase (a, b, c) and whose number before the dash is the room."""

    def __init__(self, rooms: int, window: int = 0):
        self.sent_at: dict[str, float] = {}
        self.ack_ms: dict[str, float] = {}
        self.delivery_ms: dict[str, float] = {}
        self.refused: dict[str, str] = {}  # client_id: error code
        self.repeats = 0
        self.acks_in_window = 0
        self.window_end = math.inf
        self.closed_by_server: list = []  # close codes of sockets the server closed
        self.send_blocked_s = 0.0  # open loop: time spent waiting in sends (back-pressure)
        self.windows = [asyncio.Semaphore(window) for _ in range(rooms)] if window else []

    def on_member(self, frame) -> None:
        kind = frame["type"]
        if kind == "ack":
            client_id = frame["client_id"]
            now = time.perf_counter()
            self.ack_ms[client_id] = (now - self.sent_at[client_id]) * 1000
            if now <= self.window_end:
                self.acks_in_window += 1
            if self.windows:
                self.windows[int(client_id[1:].split("-")[0])].release()
        elif kind == "error":
            client_id = frame.get("client_id")
            self.refused[client_id] = frame.get("code")
            if self.windows and client_id in self.sent_at:
                self.windows[int(client_id[1:].split("-")[0])].release()

    def on_trainer(self, frame) -> None:
        if frame["type"] == "chat":
            client_id = frame["client_id"]
            if client_id in self.delivery_ms:
                self.repeats += 1
            self.delivery_ms[client_id] = (time.perf_counter() - self.sent_at[client_id]) * 1000

    def answered(self) -> int:
        return len(self.ack_ms) + len(self.refused.keys() & self.sent_at.keys())

    def latencies(self, done_ms: dict[str, float]) -> list[float]:
        """Every message sent, one latency each: a message without one (unacked,
        refused, undelivered) counts as infinite, so a server that answers only some
        is not measured on the ones it answered."""
        return [done_ms.get(client_id, math.inf) for client_id in self.sent_at]

    async def drain(self, timeout_s: float) -> None:
        """Waits for an answer (ack or error) to every message sent (at most timeout_s),
        then (at most 5 s) for the acked ones' deliveries."""
        await wait_until(lambda: self.answered() >= len(self.sent_at), timeout_s)
        acked = set(self.ack_ms)
        await wait_until(lambda: self.delivery_ms.keys() >= acked, 5)

    def watch(self, ws, handle) -> asyncio.Task:
        """read_forever, noting a socket that ends before it is cancelled."""
        def ended(task: asyncio.Task) -> None:
            if not task.cancelled():
                error = task.exception()
                self.closed_by_server.append(repr(error) if error else ws.close_code)

        task = read_forever(ws, handle)
        task.add_done_callback(ended)
        return task


@contextlib.asynccontextmanager
async def connected_rooms(server: Server, rooms: int, load: ChatLoad):
    """Starts the server, connects trainer tn and member mn of rooms 1..rooms with
    readers feeding `load`; yields the members' sockets (index n-1: room n)."""
    server.start()
    async with client_session() as http:
        trainers = opened(await connect_many(
            http, server, [(n, f"t{n}", "trainer") for n in range(1, rooms + 1)]))
        members = opened(await connect_many(
            http, server, [(n, f"m{n}", "member") for n in range(1, rooms + 1)]))
        readers = [load.watch(ws, load.on_trainer) for ws in trainers]
        readers += [load.watch(ws, load.on_member) for ws in members]
        try:
            yield members
        finally:
            await cancel(readers)


def stop_and_check(server: Server, run: Run, load: ChatLoad, phase: str) -> None:
    """Stops the server (SIGKILL when messages are still unanswered: an overloaded
    server may never drain) and checks that every ack is one stored row, delivered
    once; adds the problems to tp_lost (the "1 throughput check" row)."""
    unanswered = len(load.sent_at) - load.answered()
    if unanswered:  # committed rows survive a SIGKILL
        server.kill_expected = True
        run.note(f"{phase}: {unanswered} messages unanswered: the server is stopped with SIGKILL")
    server.stop(grace_s=10 if unanswered == 0 else 0.2)
    undelivered = len(load.ack_ms.keys() - load.delivery_ms.keys())
    stored = stored_client_ids(server)
    missing = len(load.ack_ms.keys() - stored.keys())
    doubled = sum(1 for count in stored.values() if count > 1)
    refused_stored = len(load.refused.keys() & stored.keys())
    if undelivered or missing or doubled or load.repeats or refused_stored:
        run.note(f"{phase}: {undelivered} acked but not delivered, {load.repeats} delivered "
                 f"twice, {missing} acked but not stored, {doubled} stored twice, "
                 f"{refused_stored} refused but stored")
    if load.refused:
        codes = collections.Counter(load.refused.values())
        run.note(f"{phase}: {len(load.refused)} refused (error code, or closed: sent on a "
                 f"socket the server had closed): {dict(codes)}")
    if load.closed_by_server:
        codes = collections.Counter(load.closed_by_server)
        run.note(f"{phase}: {len(load.closed_by_server)} sockets ended before the phase did "
                 f"(close code, or the reader's error): {dict(codes)}")
    run.note(f"{phase}: {len(load.sent_at)} sent, {len(load.ack_ms)} acks, "
             f"{sum(stored.values())} stored rows")
    run.values["tp_lost"] = (run.values.get("tp_lost", 0) + undelivered + missing + doubled
                             + load.repeats + refused_stored)


async def open_loop(load: ChatLoad, members, phase: str, rate: float, seconds: float) -> int:
    """Sends `rate` msg/s in total, round robin over members, regardless of answers.
    A generator that falls behind sends fewer: the caller reports what was sent. A
    message whose socket the server has closed counts as refused ("closed")."""
    sent, total, started = 0, int(rate * seconds), time.perf_counter()
    while sent < total:
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
        due = min(total, int(rate * elapsed) + 1)
        while sent < due:
            room = sent % len(members)
            client_id = f"{phase}{room}-{sent}"
            load.sent_at[client_id] = begun = time.perf_counter()
            try:
                await members[room].send_str(chat_frame(f"open loop {sent}", client_id))
            except ConnectionError:
                load.refused[client_id] = "closed"
            if (waited := time.perf_counter() - begun) > 0.001:
                load.send_blocked_s += waited
            sent += 1
        await asyncio.sleep(0.002)
    return sent


async def closed_loop(members, windows, sent_at, t_end: float) -> int:
    """Every member keeps its window of messages in flight until t_end: a new one
    as each answer comes back."""
    counts = [0] * len(members)

    async def pump(room: int, ws) -> None:
        window = windows[room]
        while True:
            remaining = t_end - time.perf_counter()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(window.acquire(), remaining)
            except asyncio.TimeoutError:
                return
            if time.perf_counter() >= t_end:
                return
            client_id = f"b{room}-{counts[room]}"
            sent_at[client_id] = time.perf_counter()
            try:
                await ws.send_str(chat_frame(f"closed loop {counts[room]}", client_id))
            except ConnectionError:  # closed by the server: in the notes, unanswered
                return
            counts[room] += 1

    await asyncio.gather(*(pump(room, ws) for room, ws in enumerate(members)))
    return sum(counts)


def note_shortfall(run: Run, phase: str, load: ChatLoad, sent: int, send_s: float,
                   rate: float) -> None:
    """Says so when the generator sent less than it meant to offer, and why it may be."""
    if sent / send_s < 0.95 * rate:
        run.note(f"{phase}: the generator sent {sent / send_s:.0f} msg/s, not {rate}: "
                 f"{load.send_blocked_s:.1f} s of its {send_s:.1f} s went waiting in sends "
                 "(socket back-pressure); the rest is its own CPU or the machine's (see the "
                 "CPU shares)")


async def scenario_offered(server: Server, s: Sizes, run: Run, meter: Meter) -> None:
    """1a: tp_rate msg/s offered open loop to tp_rooms rooms for tp_seconds."""
    load = ChatLoad(s.tp_rooms)
    async with connected_rooms(server, s.tp_rooms, load) as members:
        with meter(server):
            started = time.perf_counter()
            load.window_end = started + s.tp_seconds
            sent = await open_loop(load, members, "a", s.tp_rate, s.tp_seconds)
            send_s = time.perf_counter() - started
            await load.drain(s.drain_s)
    acks = load.latencies(load.ack_ms)
    run.values["tp_offered"] = sent / send_s
    run.values["tp_acked"] = load.acks_in_window / s.tp_seconds
    run.values["tp_ack_p50"] = percentile(acks, 0.5)
    run.values["tp_ack_p99"] = percentile(acks, 0.99)
    run.values["tp_delivery_p99"] = percentile(load.latencies(load.delivery_ms), 0.99)
    run.values["tp_unacked"] = sent - len(load.ack_ms)
    note_shortfall(run, "1a", load, sent, send_s, s.tp_rate)
    stop_and_check(server, run, load, "1a")


async def scenario_capacity(server: Server, s: Sizes, run: Run, meter: Meter) -> None:
    """1b: closed loop, cap_window messages in flight per member of cap_rooms rooms;
    acked msg/s over the cap_seconds window."""
    load = ChatLoad(s.cap_rooms, window=s.cap_window)
    async with connected_rooms(server, s.cap_rooms, load) as members:
        with meter(server):
            load.window_end = time.perf_counter() + s.cap_seconds
            sent = await closed_loop(members, load.windows, load.sent_at, load.window_end)
            await load.drain(s.drain_s)
    acks = load.latencies(load.ack_ms)
    run.values["tp_max"] = load.acks_in_window / s.cap_seconds
    run.values["tp_max_ack_p50"] = percentile(acks, 0.5)
    run.values["tp_max_ack_p99"] = percentile(acks, 0.99)
    stop_and_check(server, run, load, "1b")


async def scenario_overload(server: Server, s: Sizes, run: Run, meter: Meter) -> None:
    """1c: ov_rate msg/s offered open loop to tp_rooms rooms for ov_seconds, meant to
    be more than a server takes; then up to ov_drain_s for the answers. Counts what
    was acked, refused (error frames, closed sockets) and left unanswered."""
    load = ChatLoad(s.tp_rooms)
    async with connected_rooms(server, s.tp_rooms, load) as members:
        with meter(server):
            started = time.perf_counter()
            load.window_end = started + s.ov_seconds
            sent = await open_loop(load, members, "c", s.ov_rate, s.ov_seconds)
            send_s = time.perf_counter() - started
            stopped = time.perf_counter()
            await load.drain(s.ov_drain_s)
            drained_s = time.perf_counter() - stopped
    acked = len(load.ack_ms)
    refused = len(load.refused.keys() & load.sent_at.keys())
    run.values["ov_offered"] = sent / send_s
    run.values["ov_sent"] = sent
    run.values["ov_acked"] = acked
    run.values["ov_acked_pct"] = 100 * acked / max(1, sent)
    run.values["ov_refused"] = refused
    run.values["ov_unanswered"] = sent - acked - refused
    run.values["ov_ack_p99"] = percentile(list(load.ack_ms.values()), 0.99)
    run.values["ov_drain_s"] = drained_s if load.answered() >= sent else math.nan
    note_shortfall(run, "1c", load, sent, send_s, s.ov_rate)
    stop_and_check(server, run, load, "1c")


async def scenario_idle(server: Server, s: Sizes, run: Run, meter: Meter) -> None:
    """2: many idle sockets held open: server RSS per socket, and none dropped."""
    per_user = IDLE_SOCKETS_PER_USER
    rooms = idle_rooms(s)
    server.start()
    specs = [(n, f"{who}{n}", role) for n in range(1, rooms + 1)
             for who, role in (("t", "trainer"), ("m", "member")) for _ in range(per_user)]
    specs = specs[:s.idle_sockets]
    close_codes: list = []

    def watch(ws) -> asyncio.Task:
        task = read_forever(ws, lambda frame: None)
        task.add_done_callback(lambda done: done.cancelled() or close_codes.append(ws.close_code))
        return task

    async with client_session() as http:
        ws, _ = await open_room(http, server, 1, "t1", "trainer")  # warm the socket path
        await ws.close()
        await asyncio.sleep(0.3)
        before = server.rss_kib()
        results = await connect_many(http, server, specs, parallel=200)
        failed = [r for r in results if isinstance(r, BaseException)]
        sockets = [r[0] for r in results if not isinstance(r, BaseException)]
        readers = [watch(ws) for ws in sockets]
        progress(f"  {server.kind}: {len(sockets)} idle sockets open, holding "
                 f"{s.idle_seconds:g} s")
        with meter(server):
            rss = [server.rss_kib()]
            held_until = time.perf_counter() + s.idle_seconds
            while time.perf_counter() < held_until:  # the hold, sampling RSS
                await asyncio.sleep(min(1.0, max(0.0, held_until - time.perf_counter())))
                rss.append(server.rss_kib())
        await cancel(readers)
    if failed:
        run.note(f"2: {len(failed)} sockets failed to open, first: {failed[0]!r}")
    if close_codes:
        codes = {code: close_codes.count(code) for code in set(close_codes)}
        run.note(f"2: {len(close_codes)} sockets closed while idle, close codes {codes}")
    run.values["idle_kib"] = (max(rss) - before) / max(1, len(sockets))
    run.values["idle_dropped"] = len(failed) + len(close_codes)
    server.stop()


async def scenario_spread(server: Server, s: Sizes, run: Run, meter: Meter) -> None:
    """3: one trainer, every member connected; spreads one after the other."""
    rooms = s.spread_rooms
    room_ids = range(SPREAD_ROOM0 + 1, SPREAD_ROOM0 + rooms + 1)
    server.start()
    waiting: dict[str, int] = {}
    done_at: dict[str, float] = {}
    received: dict[str, int] = {}
    ack_rooms: dict[str, int] = {}
    sent_at: dict[str, float] = {}
    ack_at: dict[str, float] = {}
    all_in = asyncio.Event()

    def on_member(frame):
        if frame["type"] == "spread":
            client_id = frame["client_id"]
            received[client_id] = received.get(client_id, 0) + 1
            waiting[client_id] -= 1
            if waiting[client_id] == 0:
                done_at[client_id] = time.perf_counter()
                all_in.set()

    def on_trainer(frame):
        if frame["type"] == "ack":
            ack_at[frame["client_id"]] = time.perf_counter()
            ack_rooms[frame["client_id"]] = frame.get("rooms")

    times: list[float] = []
    async with client_session() as http:
        members = opened(await connect_many(
            http, server, [(n, f"c{n}", "member") for n in room_ids]))
        trainer, _ = await open_room(http, server, room_ids[0], "coach1", "trainer")
        readers = [read_forever(ws, on_member) for ws in members]
        readers.append(read_forever(trainer, on_trainer))
        await asyncio.sleep(0.2)  # let the join frames settle
        try:
            with meter(server):
                budget_end = time.perf_counter() + s.loop_budget_s
                for number in range(s.spreads):
                    if time.perf_counter() > budget_end and times:
                        run.note(f"3: {len(times)} of {s.spreads} spreads within the "
                                 f"{s.loop_budget_s:g} s budget")
                        break
                    client_id = f"s{number}"
                    waiting[client_id] = rooms
                    all_in.clear()
                    started = sent_at[client_id] = time.perf_counter()
                    await trainer.send_str(
                        f'{{"type": "spread", "content": "class moved {number}", '
                        f'"client_id": "{client_id}"}}')
                    await asyncio.wait_for(all_in.wait(), 30)
                    times.append((done_at[client_id] - started) * 1000)
                await wait_until(lambda: len(ack_rooms) >= len(times), 5)
        finally:
            await cancel(readers)
    server.stop()
    stored = {client_id: (count, distinct) for client_id, count, distinct in server.query(
        "SELECT client_id, count(*), count(DISTINCT session_id) FROM messages "
        "WHERE type = 'spread' GROUP BY client_id")}
    bad = 0
    for number in range(len(times)):
        client_id = f"s{number}"
        if (stored.get(client_id) != (rooms, rooms) or received.get(client_id) != rooms
                or ack_rooms.get(client_id) != rooms):
            bad += 1
            run.note(f"3: {client_id}: stored (rows, rooms) {stored.get(client_id)}, received "
                     f"{received.get(client_id)}, ack rooms {ack_rooms.get(client_id)}; "
                     f"expected {rooms}")
    ack_ms = [(ack_at[c] - sent_at[c]) * 1000 for c in sent_at if c in ack_at]
    run.values["spread_ack_p50"] = median(ack_ms)
    run.values["spread_ack_p99"] = percentile(ack_ms, 0.99)
    run.values["spread_p50"] = median(times)
    run.values["spread_p99"] = percentile(times, 0.99)
    run.values["spread_bad"] = bad


async def scenario_room_list(server: Server, s: Sizes, run: Run, meter: Meter) -> None:
    """4: a trainer's room list and room opens over a big database; 6: startup on it."""
    rooms = s.list_rooms  # the database came with list_messages in these rooms
    # "after" near the end: each open's history is the room's newest 20 messages.
    afters = {room: after for room, after in server.query(
        "SELECT session_id, (SELECT id FROM messages m WHERE m.session_id = s.session_id "
        " ORDER BY id DESC LIMIT 1 OFFSET 20) FROM (SELECT DISTINCT session_id FROM messages) s")}
    run.values["start_big"] = server.start()
    list_ms: list[float] = []
    open_ms: list[float] = []
    headers = auth("coach2", "trainer", server.secret)
    async with client_session() as http:
        with meter(server):
            url = f"{server.http_base}/chat/rooms?format=json"
            budget_end = time.perf_counter() + s.loop_budget_s
            for _ in range(s.list_requests):
                if time.perf_counter() > budget_end and list_ms:
                    run.note(f"4: {len(list_ms)} of {s.list_requests} room-list GETs within "
                             f"the {s.loop_budget_s:g} s budget")
                    break
                begun = time.perf_counter()
                async with http.get(url, headers=headers) as response:
                    body = await response.json()
                list_ms.append((time.perf_counter() - begun) * 1000)
                if response.status != 200 or len(body["chat_rooms"]) != rooms:
                    raise RuntimeError(f"room list: {response.status}, "
                                       f"{len(body.get('chat_rooms', ()))} rooms")
            budget_end = time.perf_counter() + s.loop_budget_s
            for number in range(s.list_opens):
                if time.perf_counter() > budget_end and open_ms:
                    run.note(f"4: {len(open_ms)} of {s.list_opens} room opens within the "
                             f"{s.loop_budget_s:g} s budget")
                    break
                room = LIST_ROOM0 + number % rooms + 1
                begun = time.perf_counter()
                # As each room's member: a user opens at most 10 sockets a second
                # (burst 40), so one trainer opening hundreds would be refused.
                ws, history = await open_room(http, server, room, f"c{room}", "member",
                                              after=afters[room])
                open_ms.append((time.perf_counter() - begun) * 1000)
                await ws.close()
                if len(history["messages"]) != 20:
                    raise RuntimeError(f"history after {afters[room]} in pt_{room}: "
                                       f"{len(history['messages'])} messages, expected 20")
    server.stop()
    run.values["list_p50"] = median(list_ms)
    run.values["list_p99"] = percentile(list_ms, 0.99)
    run.values["open_p50"] = median(open_ms)
    run.values["open_p99"] = percentile(open_ms, 0.99)


async def scenario_storm(server: Server, s: Sizes, run: Run, meter: Meter) -> None:
    """5: every member drops at once and reconnects with `after` while the trainers
    spread (one socket per trainer, STORM_ROOMS_PER_TRAINER rooms each); every member
    must end with every spread exactly once."""
    clients = s.storm_clients
    server.start()
    room_ids = list(range(STORM_ROOM0 + 1, STORM_ROOM0 + clients + 1))
    coaches = storm_coaches(s)
    got: dict[int, list[str]] = {room: [] for room in room_ids}     # client ids received
    last_id: dict[int, int] = {room: 0 for room in room_ids}
    acks: set[str] = set()

    def coach_of(room: int) -> int:
        return (room - STORM_ROOM0 - 1) // STORM_ROOMS_PER_TRAINER + 1

    def on_trainer(frame):
        if frame["type"] == "ack":
            acks.add(frame["client_id"])

    def on_member(room):
        def handle(frame):
            if frame["type"] == "spread":
                got[room].append(frame["client_id"])
                last_id[room] = max(last_id[room], frame["id"])
        return handle

    async def spread_round(tag: str) -> None:
        for coach, ws in enumerate(trainers, start=1):
            await ws.send_str(f'{{"type": "spread", "content": "{tag} note", '
                              f'"client_id": "{tag}-{coach}"}}')
        if not await wait_until(lambda: sum(a.startswith(tag) for a in acks) >= coaches, 30):
            raise RuntimeError(f"round {tag}: only {sum(a.startswith(tag) for a in acks)} acks")

    failed: list = []
    back: list = []
    async with client_session() as http:
        trainers = opened(await connect_many(http, server, [
            (STORM_ROOM0 + 1 + (k - 1) * STORM_ROOMS_PER_TRAINER, f"storm{k}", "trainer")
            for k in range(1, coaches + 1)]))
        members = opened(await connect_many(
            http, server, [(room, f"c{room}", "member") for room in room_ids]))
        readers = [read_forever(ws, on_trainer) for ws in trainers]
        member_readers = [read_forever(ws, on_member(room)) for room, ws in zip(room_ids, members)]
        try:
            await spread_round("before")
            if not await wait_until(lambda: all(got[room] for room in room_ids), 30):
                raise RuntimeError("members did not receive the first spread")
            # The drop: every member closes at once; spreads go out while they are away.
            await asyncio.gather(*(ws.close() for ws in members), return_exceptions=True)
            await cancel(member_readers)
            after = dict(last_id)
            await spread_round("dropped")
            with meter(server):
                started = time.perf_counter()
                history_at: list[float] = []

                async def rejoin(room: int):
                    ws, history = await open_room(http, server, room, f"c{room}", "member",
                                                  after=after[room])
                    history_at.append(time.perf_counter())
                    got[room].extend(m["client_id"] for m in history["messages"])
                    return ws

                # All at once, and the trainers spread again while the members come back.
                results, _ = await asyncio.gather(
                    asyncio.gather(*(rejoin(room) for room in room_ids), return_exceptions=True),
                    spread_round("during"))
                failed = [r for r in results if isinstance(r, BaseException)]
                back = [(room, ws) for room, ws in zip(room_ids, results)
                        if not isinstance(ws, BaseException)]
                member_readers = [read_forever(ws, on_member(room)) for room, ws in back]
                storm_ms = (max(history_at) - started) * 1000 if history_at else math.nan
            expected = {room: {f"{tag}-{coach_of(room)}" for tag in ("before", "dropped", "during")}
                        for room, _ in back}
            await wait_until(lambda: all(expected[room] <= set(got[room]) for room, _ in back), 10)
        finally:
            await cancel(readers + member_readers)
    server.stop()
    lost = sum(len(expected[room] - set(got[room])) for room in expected)
    repeated = sum(len(got[room]) - len(set(got[room])) for room in expected)
    extra = sum(len(set(got[room]) - expected[room]) for room in expected)
    if lost or repeated or extra or failed:
        run.note(f"5: {lost} lost, {repeated} repeated, {extra} unexpected, {len(failed)} "
                 f"reconnects failed" + (f", first: {failed[0]!r}" if failed else ""))
    run.values["storm_ms"] = storm_ms
    run.values["storm_bad"] = lost + repeated + extra + len(failed)


async def scenario_startup(server: Server, s: Sizes, run: Run, meter: Meter) -> None:
    """6: startup on an empty database and RSS at rest (the big database: scenario 4)."""
    run.values["start_empty"] = server.start()
    await asyncio.sleep(0.5)
    run.values["rss_rest"] = server.rss_kib() / 1024
    server.stop()


def idle_rooms(s: Sizes) -> int:
    return math.ceil(s.idle_sockets / (2 * IDLE_SOCKETS_PER_USER))


def storm_coaches(s: Sizes) -> int:
    return math.ceil(s.storm_clients / STORM_ROOMS_PER_TRAINER)


def bench_gym(s: Sizes) -> dict:
    """Pairs tn/mn in rooms 1..N (scenarios 1, 2), coach1 with scenario 3's rooms,
    coach2 with scenario 4's, storm1.. with scenario 5's."""
    parts = [pairs_gym(max(s.tp_rooms, idle_rooms(s))),
             coach_gym(s.spread_rooms, SPREAD_ROOM0 + 1, "coach1"),
             coach_gym(s.list_rooms, LIST_ROOM0 + 1, "coach2")]
    for k in range(1, storm_coaches(s) + 1):
        first = STORM_ROOM0 + 1 + (k - 1) * STORM_ROOMS_PER_TRAINER
        rooms = min(STORM_ROOMS_PER_TRAINER, STORM_ROOM0 + s.storm_clients + 1 - first)
        parts.append(coach_gym(rooms, first, f"storm{k}"))
    return {key: [item for part in parts for item in part[key]] for key in ("users", "sessions")}


SCENARIOS = [("1a offered", scenario_offered, "seeded"),
             ("1b capacity", scenario_capacity, "seeded"),
             ("1c overload", scenario_overload, "seeded"),
             ("2 idle sockets", scenario_idle, "seeded"),
             ("3 spread", scenario_spread, "seeded"),
             ("4 room list", scenario_room_list, "big"),
             ("5 reconnect storm", scenario_storm, "seeded"),
             ("6 startup", scenario_startup, "empty")]


def prepare(kind: str, s: Sizes, workdir: Path) -> dict[str, Path]:
    """The databases scenarios start from: "seeded" has the users and sessions of every
    scenario (one import), "big" also scenario 4's messages. Each scenario runs on
    its own copy; scenario 6 first on an empty database."""
    started = time.perf_counter()
    seeded = Server(kind, workdir / kind / "seeded")
    seeded.import_gym(bench_gym(s))
    seeded.query("PRAGMA wal_checkpoint(TRUNCATE)")
    big = Server(kind, workdir / kind / "big", template=seeded.db_path)
    big.load_messages(LIST_ROOM0 + 1, LIST_ROOM0 + s.list_rooms, s.list_messages // s.list_rooms)
    big.query("PRAGMA wal_checkpoint(TRUNCATE)")
    progress(f"{kind}: imported the gym and loaded {s.list_messages} messages in "
             f"{time.perf_counter() - started:.1f} s")
    return {"seeded": seeded.db_path, "big": big.db_path, "empty": None}


async def run_server(kind: str, s: Sizes, workdir: Path, databases: dict[str, Path]) -> Run:
    run = Run(kind)
    for name, scenario, database in SCENARIOS:
        progress(f"{kind}: {name}")
        server = Server(kind, workdir / kind / name.split()[0], template=databases[database])
        started = time.perf_counter()
        try:
            await asyncio.wait_for(scenario(server, s, run, Meter(run, name)),
                                   s.scenario_timeout_s)
        except Exception as error:  # reported in the table; the next scenario still runs
            run.failed = True
            detail = "timed out" if isinstance(error, asyncio.TimeoutError) else repr(error)
            run.note(f"scenario {name} failed: {detail}")
            tail = server.log_tail(400)
            if tail:
                run.note(f"{name} server log: {tail}")
            if not isinstance(error, (asyncio.TimeoutError, RuntimeError)):
                traceback.print_exc()
        finally:
            server.stop()
            if server.exit_code == -signal.SIGKILL:
                if not server.kill_expected:
                    run.note(f"{name}: the server was killed (did not stop within its grace time)")
            elif server.exit_code not in (None, 0, -signal.SIGTERM):
                run.note(f"{name}: server exited with {server.exit_code}")
        progress(f"  {kind}: {name} took {time.perf_counter() - started:.1f} s")
    return run


# ---------------------------------------------------------------- output ---
def machine() -> list[str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text()
                           .splitlines() if line.startswith("MemTotal:")))
        ram = f"{mem_kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        ram = "unknown"
    return [f"date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}, "
            f"RAM {ram}",
            f"python: {platform.python_version()} ({platform.python_implementation()}), "
            f"aiohttp {aiohttp.__version__}, client loop: {loop_name()}"]


def loop_name() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan: not measured; inf: a percentile that fell on unanswered
    if unit in ("msgs", "sockets", "spreads"):
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def ratio(value: float | None, bare: float | None) -> str:
    if value is None or bare is None or bare <= 0 or not math.isfinite(bare):
        return "-"
    if math.isnan(value):
        return "-"
    return f"{value / bare:.2f}" if math.isfinite(value) else "inf"


KINDS = ("ours", "bare", "peer")
SERVER_NAMES = {"ours": "ours = distributor_chat.py",
                "bare": "bare = bench/peers/bare_limit.py, the bare limit of our design",
                "peer": "peer = bench/peers/seed_fastapi.py, FastAPI + SQLAlchemy"}
GENERATOR_SATURATED = 0.9  # CPU share of the load generator flagged in the report


def report(s: Sizes, mode: str, runs: list[Run], skipped: list[str]) -> str:
    by_kind = {run.kind: run for run in runs}
    kinds = [k for k in KINDS if k in by_kind]
    lines = [f"Distributor Chat bench ({mode})", *machine()]
    lines += ["servers: " + "; ".join(SERVER_NAMES[k] for k in kinds)]
    lines += skipped
    lines.append(f"load generator: 1 process (this one, one {loop_name()} event loop) on the "
                 f"same {len(os.sched_getaffinity(0))} CPUs as the server")
    lines.append("")
    lines.append("offered load:")
    lines += [f"  {line}" for line in offered_load(s)]
    lines.append("")
    lines.append("CPU share over each scenario's measured phase (user+sys CPU s / wall s; "
                 "1.00 = one core busy):")
    saturated = []
    for run in runs:
        for name, (wall, bench, server) in run.cpu.items():
            flag = ""
            if bench / wall >= GENERATOR_SATURATED:
                flag = "   <- generator near a full core"
                saturated.append(f"{run.kind} {name}")
            lines.append(f"  {run.kind:<4} {name:<18} wall {wall:6.1f} s   load generator "
                         f"{bench / wall:4.2f}   server {server / wall:4.2f}{flag}")
    phases = [phase for run in runs for phase in run.cpu.values()]
    if phases:
        wall, bench = sum(p[0] for p in phases), sum(p[1] for p in phases)
        lines.append(f"  load generator over every measured phase: {bench:.1f} CPU s in "
                     f"{wall:.1f} s = {bench / wall:.2f}")
    if saturated:
        lines.append(f"  the generator neared a full core in: {', '.join(saturated)}; there "
                     "the figure is partly the generator's limit, not the server's")
    lines.append("")
    # Ratios to the bare limit; without it, ours to the FastAPI peer.
    base = "bare" if "bare" in kinds else "peer" if len(kinds) > 1 else None
    ratio_kinds = [k for k in kinds if k != base] if base else []
    if base:
        lines.append(f"x/{base} = the figure divided by the {base}'s, whichever way is better "
                     "(column 'better'): for msg/s and % below 1 is short of it, for ms, s, KiB "
                     "and MiB above 1 is; checks must be 0")
    header = ["metric", "unit", *kinds, *(f"{k}/{base}" for k in ratio_kinds), "better"]
    rows = [header]
    for metric in metrics(s):
        values = [by_kind[k].values.get(metric.key) for k in kinds]
        compared = metric.better in ("higher", "lower")
        row = [metric.label, metric.unit, *(fmt(v, metric.unit) for v in values)]
        row += [ratio(by_kind[k].values.get(metric.key), by_kind[base].values.get(metric.key))
                if compared else "-" for k in ratio_kinds]
        row.append(metric.better)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row):
        cells = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                 for i, cell in enumerate(row)]
        return "| " + " | ".join(cells) + " |"

    lines.append(line(rows[0]))
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [line(row) for row in rows[1:]]
    for run in runs:
        if run.notes:
            lines.append("")
            lines.append(f"notes ({run.kind}):")
            lines += [f"  - {note}" for note in run.notes]
    return "\n".join(lines)


def our_checks_failed(run: Run, s: Sizes) -> list[str]:
    problems = [f"{m.key} = {run.values.get(m.key)}" for m in metrics(s)
                if m.better == "check" and run.values.get(m.key) != 0]
    return problems + (["a scenario failed"] if run.failed else [])


# ------------------------------------------------------------------ main ---
def peer_missing() -> str | None:
    if not SCRIPTS["peer"].exists():
        return "bench/peers/seed_fastapi.py is missing"
    absent = [name for name in PEER_DEPS if importlib.util.find_spec(name) is None]
    if absent:
        return f"{', '.join(absent)} not importable (pip install -r bench/requirements.txt)"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller counts, about two minutes")
    parser.add_argument("--servers", "--only", default=",".join(KINDS),
                        help="comma-separated: ours, bare, peer (default all three)")
    args = parser.parse_args()
    kinds = [k for k in KINDS if k in {k.strip() for k in args.servers.split(",")}]
    if not kinds or any(k.strip() not in KINDS for k in args.servers.split(",") if k.strip()):
        parser.error("--servers takes a comma-separated list of ours, bare, peer")
    sizes, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    skipped = []
    if "peer" in kinds and (why := peer_missing()):
        kinds.remove("peer")
        skipped.append(f"peer: skipped: {why}")
        progress(skipped[-1])
    raise_fd_limit()
    atexit.register(Server.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = []
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="distributor-bench-") as workdir:
            # Setup (imports, bulk messages) for every server at once, before any
            # measurement; then one server at a time.
            def setup(kind: str):
                try:
                    return prepare(kind, sizes, Path(workdir))
                except Exception as error:  # noqa: BLE001 - reported below
                    return error

            with ThreadPoolExecutor(len(kinds)) as pool:
                databases = dict(zip(kinds, pool.map(setup, kinds)))
            for kind, result in list(databases.items()):
                if isinstance(result, Exception):
                    if kind == "ours":
                        raise result
                    kinds.remove(kind)
                    skipped.append(f"{kind}: skipped: setup failed: {result}")
                    progress(skipped[-1])
            for kind in kinds:
                runs.append(asyncio_run(run_server(kind, sizes, Path(workdir), databases[kind])))
    finally:
        Server.stop_all()
    print(report(sizes, mode, runs, skipped))
    print(f"\ntotal wall time {time.perf_counter() - started:.1f} s")
    ours = next((run for run in runs if run.kind == "ours"), None)
    problems = our_checks_failed(ours, sizes) if ours else []
    if problems:
        print(f"FAILED (ours): {'; '.join(problems)}")
        return 1
    return 0


def asyncio_run(coroutine):
    if loop_name() == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    return asyncio.run(coroutine)


if __name__ == "__main__":
    sys.exit(main())
