"""Benchmark: Distributor Chat against a peer server, one table side by side.

    python bench/run.py            full run (many minutes)
    python bench/run.py --quick    every scenario, smaller counts (under a minute)
    python bench/run.py --only ours       (or --servers ours / peer / ours,peer)

Each server (ours: distributor_chat.py; the peer: bench/peers/seed_fastapi.py, a
FastAPI + SQLAlchemy build of the same protocol subset) runs each scenario in a
temporary directory on a fresh copy of a database that holds only the scenarios'
users and sessions (scenario 4: plus its bulk messages; scenario 6: empty), started
with `--rate-limit 0 --no-demo` and a secret this program mints its tokens with.
Users and sessions go in through each server's `import` subcommand, bulk history
through SQL (ours) or the peer's `load-messages`; everything else is the SPEC
protocol over 127.0.0.1. The load generator runs on uvloop when it is installed.

Scenarios: 1 throughput (1b closed loop at the maximum, then 1a open loop at a
fixed offered rate), 2 idle sockets, 3 spread, 4 room list and room open on a big
database, 5 reconnect storm, 6 startup. Every loop is bounded in count and time;
every server started is stopped, also on failure. Progress goes to stderr, the
report to stdout. Exit status 1 when one of our checks fails (lost, repeated or
dropped messages) or one of our scenarios errors; the peer's problems are reported
but do not fail the run. The peer is skipped, with a line saying so, when its
file or its dependencies (fastapi, uvicorn, sqlalchemy) are missing.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
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
    tp_rooms: int = 500
    tp_rate: int = 2000          # offered msg/s, open loop
    tp_seconds: float = 30
    tp_window: int = 4           # messages in flight per member, closed loop
    drain_s: float = 30          # longest wait for outstanding acks after sending stops
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
# Quick: every scenario, both servers, under a minute on 2 cores (the peer needs
# ~13 ms a WebSocket handshake, so socket counts and phases are shorter than FULL's).
QUICK = Sizes(tp_rooms=100, tp_seconds=3, drain_s=1.5, idle_sockets=500, idle_seconds=2,
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
        Metric("tp_ack_p50", "1a throughput: ack p50", "ms", "lower"),
        Metric("tp_ack_p99", "1a throughput: ack p99", "ms", "lower"),
        Metric("tp_delivery_p99", "1a throughput: send->delivery p99", "ms", "lower"),
        Metric("tp_unacked", f"1a throughput: unacked {s.drain_s:g} s after sending stopped",
               "msgs", "info"),
        Metric("tp_max", f"1b max sustained ({s.tp_window} in flight per member): acked",
               "msg/s", "higher"),
        Metric("tp_max_ack_p50", "1b max sustained: ack p50", "ms", "lower"),
        Metric("tp_lost", "1 throughput check: acked but lost, undelivered or repeated",
               "msgs", "check"),
        Metric("idle_kib", f"2 idle sockets ({s.idle_sockets} for {s.idle_seconds:g} s): "
               "RSS per socket (peak)", "KiB", "lower"),
        Metric("idle_dropped", "2 idle sockets check: failed or dropped", "sockets", "check"),
        Metric("spread_p50", f"3 spread to {s.spread_rooms} rooms ({s.spreads} spreads): "
               "send->last receipt p50", "ms", "lower"),
        Metric("spread_p99", "3 spread: send->last receipt p99", "ms", "lower"),
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
async def scenario_throughput(server: Server, s: Sizes, run: Run, meter: Meter) -> None:
    """1: both participants of every room connected; members send, trainers receive.
    (b) closed loop first: its backlog is bounded by the windows, so it drains; then
    (a) open loop, whose backlog on an overloaded server may not drain (nothing runs
    after it: the server is stopped). Client ids start with the phase letter."""
    rooms = s.tp_rooms
    server.start()
    sent_at: dict[str, float] = {}
    ack_ms: dict[str, float] = {}
    delivery_ms: dict[str, float] = {}
    tally = {"repeats": 0, "errors": 0, "acks_in_window": 0}
    windows = [asyncio.Semaphore(s.tp_window) for _ in range(rooms)]
    window_end = [math.inf]

    def on_member(frame):
        kind = frame["type"]
        if kind == "ack":
            client_id = frame["client_id"]
            now = time.perf_counter()
            ack_ms[client_id] = (now - sent_at[client_id]) * 1000
            if now <= window_end[0]:
                tally["acks_in_window"] += 1
            if client_id[0] == "b":
                windows[int(client_id[1:].split("-")[0])].release()
        elif kind == "error":
            tally["errors"] += 1

    def on_trainer(frame):
        if frame["type"] == "chat":
            client_id = frame["client_id"]
            if client_id in delivery_ms:
                tally["repeats"] += 1
            delivery_ms[client_id] = (time.perf_counter() - sent_at[client_id]) * 1000

    async def drain(sent: int) -> float:
        """Waits for every ack (at most drain_s), then for the acked ones' deliveries."""
        await wait_until(lambda: len(ack_ms) >= len(sent_at), s.drain_s)
        drained = time.perf_counter()
        acked = set(ack_ms)
        await wait_until(lambda: delivery_ms.keys() >= acked, 5)
        return drained

    def phase_values(phase: str) -> list[float]:
        return [ms for client_id, ms in ack_ms.items() if client_id[0] == phase]

    async with client_session() as http:
        trainers = opened(await connect_many(
            http, server, [(n, f"t{n}", "trainer") for n in range(1, rooms + 1)]))
        members = opened(await connect_many(
            http, server, [(n, f"m{n}", "member") for n in range(1, rooms + 1)]))
        readers = [read_forever(ws, on_trainer) for ws in trainers]
        readers += [read_forever(ws, on_member) for ws in members]
        try:
            with meter(server):
                window_end[0] = time.perf_counter() + s.tp_seconds
                sent = await closed_loop(members, windows, sent_at, window_end[0])
                await drain(sent)
                run.values["tp_max"] = tally["acks_in_window"] / s.tp_seconds
                run.values["tp_max_ack_p50"] = median(phase_values("b"))
                if len(ack_ms) < len(sent_at):
                    run.note(f"1b: {len(sent_at) - len(ack_ms)} of {sent} unacked "
                             f"{s.drain_s:g} s after sending stopped")

                tally["acks_in_window"] = 0
                started = time.perf_counter()
                window_end[0] = started + s.tp_seconds
                sent = await open_loop(members, sent_at, s.tp_rate, s.tp_seconds)
                send_s = time.perf_counter() - started
                await drain(sent)
                values = phase_values("a")
                run.values["tp_offered"] = sent / send_s
                run.values["tp_acked"] = tally["acks_in_window"] / s.tp_seconds
                run.values["tp_ack_p50"] = median(values)
                run.values["tp_ack_p99"] = percentile(values, 0.99)
                run.values["tp_delivery_p99"] = percentile(
                    [ms for client_id, ms in delivery_ms.items() if client_id[0] == "a"], 0.99)
                run.values["tp_unacked"] = sum(1 for c in sent_at if c[0] == "a") - len(values)
        finally:
            await cancel(readers)
    unacked = len(sent_at) - len(ack_ms)
    if unacked:  # an overloaded server is just killed: committed rows survive that
        server.kill_expected = True
        run.note(f"1: {unacked} messages still unacked: the server is stopped with SIGKILL")
    server.stop(grace_s=10 if unacked == 0 else 0.2)
    # Every ack is a stored row, stored once, delivered once; all acked: rows == acks.
    undelivered = len(ack_ms.keys() - delivery_ms.keys())
    stored = stored_client_ids(server)
    missing = len(ack_ms.keys() - stored.keys())
    doubled = sum(1 for count in stored.values() if count > 1)
    total = sum(stored.values())
    if undelivered or missing or doubled or tally["repeats"] or tally["errors"]:
        run.note(f"1: {undelivered} acked but not delivered, {tally['repeats']} delivered "
                 f"twice, {missing} acked but not stored, {doubled} stored twice, "
                 f"{tally['errors']} error frames")
    run.note(f"1: {len(ack_ms)} acks, {total} stored rows"
             + ("" if total == len(ack_ms) else
                f" ({unacked} sent but unacked when the server was stopped)"))
    run.values["tp_lost"] = undelivered + missing + doubled + tally["repeats"]


async def open_loop(members, sent_at, rate: float, seconds: float) -> int:
    """Sends `rate` msg/s in total, round robin over members, regardless of acks."""
    sent, total, started = 0, int(rate * seconds), time.perf_counter()
    while sent < total:
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
        due = min(total, int(rate * elapsed) + 1)
        while sent < due:
            room = sent % len(members)
            client_id = f"a{room}-{sent}"
            sent_at[client_id] = time.perf_counter()
            await members[room].send_str(chat_frame(f"open loop {sent}", client_id))
            sent += 1
        await asyncio.sleep(0.002)
    return sent


async def closed_loop(members, windows, sent_at, t_end: float) -> int:
    """Every member keeps its window of messages in flight until t_end."""
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
            await ws.send_str(chat_frame(f"closed loop {counts[room]}", client_id))
            counts[room] += 1

    await asyncio.gather(*(pump(room, ws) for room, ws in enumerate(members)))
    return sum(counts)


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
                    started = time.perf_counter()
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


SCENARIOS = [("1 throughput", scenario_throughput, "seeded"),
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
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if unit in ("msgs", "sockets", "spreads"):
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def ratio(metric: Metric, ours: float | None, peer: float | None) -> str:
    if metric.better not in ("higher", "lower") or ours is None or peer is None:
        return "-"
    top, bottom = (ours, peer) if metric.better == "higher" else (peer, ours)
    if any(math.isnan(v) for v in (top, bottom)) or bottom <= 0:
        return "-"
    return f"{top / bottom:.2f}x"


def report(s: Sizes, mode: str, runs: list[Run], skipped: list[str]) -> str:
    lines = [f"Distributor Chat bench ({mode})", *machine()]
    lines += ["servers: ours = distributor_chat.py; peer = bench/peers/seed_fastapi.py"]
    lines += skipped
    lines.append("")
    lines.append("CPU share over each scenario's measured phase (user+sys CPU s / wall s; "
                 "1.00 = one core busy):")
    for run in runs:
        for name, (wall, bench, server) in run.cpu.items():
            lines.append(f"  {run.kind:<4} {name:<18} wall {wall:6.1f} s   load generator "
                         f"{bench / wall:4.2f}   server {server / wall:4.2f}")
    lines.append("")
    lines.append("ratio = how many times better ours is: ours/peer for msg/s, peer/ours for "
                 "ms, KiB and MiB (>1 = ours better); checks must be 0")
    by_kind = {run.kind: run for run in runs}
    kinds = [k for k in ("ours", "peer") if k in by_kind]
    rows = [["metric", "unit", *kinds, *(["ratio"] if len(kinds) == 2 else [])]]
    for metric in metrics(s):
        values = [by_kind[k].values.get(metric.key) for k in kinds]
        row = [metric.label, metric.unit, *(fmt(v, metric.unit) for v in values)]
        if len(kinds) == 2:
            row.append(ratio(metric, *values))
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
    parser.add_argument("--quick", action="store_true", help="smaller counts, under a minute")
    parser.add_argument("--servers", "--only", default="ours,peer",
                        help="comma-separated: ours, peer (default both)")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    if not kinds or any(k not in SCRIPTS for k in kinds):
        parser.error("--servers takes ours, peer or ours,peer")
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
            # Setup (imports, bulk messages) for both servers at once, before any
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
