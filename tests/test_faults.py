"""Faults against real server processes, real sockets and real SQLite files: repeated
SIGKILL under load, SIGTERM under load, storage that cannot take writes (full,
read-only, locked by another process) and a reconnect storm of 1,000 clients.

SPEC section 2 (signals), 5 (ack, error `unavailable`, resume with `after`) and 6
(an ack only after COMMIT). The clients here behave like the page (section 7): an
un-acked message is resent with the same client_id after a reconnect, and a
reconnect resumes with `after` = the newest message id the client has.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType

from conftest import make_token, run_cli, stored_rows

WS_PATH = "/distributor/ws/chat/{}"
MESSAGES_PATH = "/distributor/chat/rooms/{}/messages"
HEALTH_PATH = "/distributor/healthz"
QUIET = ("--log-level", "warning")
# Off where the test is about another fault, so no frame is refused for its pace.
NO_RATE_LIMIT = ("--rate-limit", "0")
CREATED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
CRASH_SEED = 20251125  # SIGKILL moments; a failure names it so a run can be repeated


# ------------------------------------------------------------- the gym ---


def import_gym(tmp_path: Path, db_path: Path, pair_count: int, prefix: str) -> list[tuple]:
    """Rooms of one trainer and one member each, seeded with the CLI's ``import``."""
    # Distinct users: neither the 20-sockets-per-user limit nor a shared rate bucket
    # plays a part. Returns (room_id, trainer_id, member_id) per room.
    users, sessions, rooms = [], [], []
    for number in range(1, pair_count + 1):
        trainer_id, member_id = f"{prefix}t{number}", f"{prefix}m{number}"
        users += [{"id": trainer_id, "name": f"Coach {prefix}{number}", "role": "trainer"},
                  {"id": member_id, "name": f"회원 {prefix}{number}", "role": "member"}]
        sessions.append({"id": 100 + number, "trainer": trainer_id, "member": member_id})
        rooms.append((f"pt_{100 + number}", trainer_id, member_id))
    gym_file = tmp_path / f"{prefix}gym.json"
    gym_file.write_text(json.dumps({"users": users, "sessions": sessions}), encoding="utf-8")
    result = run_cli("import", str(gym_file), db_path=db_path)
    assert result.returncode == 0, result.stderr
    return rooms


def content_for(client_id: str) -> str:
    """The message a client_id carries: its own id, then multi-byte text of varying length."""
    # Derived from the client_id, so a stored row cut short or mixed up is seen.
    repeats = zlib.crc32(client_id.encode()) % 40
    return " ".join([client_id] + ["하체 운동 💪"] * repeats)


# ----------------------------------------------------------- a client ---


class ChatClient:
    """One user's socket in one room that resends un-acked messages and resumes with after."""

    def __init__(self, user_id: str, role: str, room_id: str, tag: str) -> None:
        self.user_id, self.role, self.room_id, self.tag = user_id, role, room_id, tag
        self.token = make_token(user_id, role)
        self.sent: list[str] = []             # every client_id, in first-sending order
        self.pending: dict[str, str] = {}     # client_id -> content, not acked yet
        self.acked: dict[str, int] = {}       # client_id -> the id its ack gave
        self.seen: list[tuple[int, str]] = []  # (id, client_id) of every message received
        self.answers: list[dict] = []         # every ack and error, in arrival order
        self.errors: list[dict] = []
        self.problems: list[str] = []         # protocol breaches the reader saw
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task | None = None
        self.close_code: int | None = None
        self.progress = asyncio.Event()       # set on every ack, error and close

    @property
    def last_seen_id(self) -> int:
        return self.seen[-1][0] if self.seen else 0

    @property
    def is_open(self) -> bool:
        return self.reader is not None and not self.reader.done() and not self.ws.closed

    async def connect(self, http: aiohttp.ClientSession, port: int, timeout_s: float = 30) -> None:
        """Open the socket after the newest message seen; take welcome and history."""
        url = f"ws://127.0.0.1:{port}{WS_PATH.format(self.room_id)}?after={self.last_seen_id}"
        async with asyncio.timeout(timeout_s):
            self.ws = await http.ws_connect(url, heartbeat=None,
                                            headers={"Authorization": f"Bearer {self.token}"})
            welcome, history = await self.next_frame(), await self.next_frame()
        if (welcome["type"], history["type"]) != ("welcome", "history"):
            self.problems.append(f"connect gave {welcome['type']}, {history['type']}")
        if history["has_more"]:  # rounds here are short: a resume never misses 500
            self.problems.append("history has_more on resume")
        self.take_messages(history["messages"])
        self.close_code = None
        self.reader = asyncio.create_task(self.read())

    async def next_frame(self) -> dict:
        message = await self.ws.receive()
        assert message.type is WSMsgType.TEXT, \
            f"{self.user_id} in {self.room_id}: {message.type.name} {message.data} on connect"
        return json.loads(message.data)

    async def read(self) -> None:
        """Take frames until the socket closes."""
        try:
            while True:
                message = await self.ws.receive()
                if message.type is not WSMsgType.TEXT:
                    if message.type is WSMsgType.CLOSE:
                        self.close_code = message.data
                    return
                self.take(json.loads(message.data))
        finally:
            self.progress.set()

    def take(self, frame: dict) -> None:
        kind = frame.get("type")
        if kind in ("chat", "spread"):
            self.take_messages([frame])
        elif kind == "ack":
            client_id, message_id = frame["client_id"], frame["id"]
            if self.acked.get(client_id, message_id) != message_id:
                self.problems.append(f"{client_id} acked as {self.acked[client_id]}, "
                                     f"then as {message_id}")
            self.acked[client_id] = message_id
            self.pending.pop(client_id, None)
            self.answers.append(frame)
            self.progress.set()
        elif kind == "error":
            self.errors.append(frame)
            self.answers.append(frame)
            self.progress.set()

    def take_messages(self, messages: list[dict]) -> None:
        for message in messages:
            if message["id"] <= self.last_seen_id:
                self.problems.append(f"message {message['id']} came after {self.last_seen_id}: "
                                     "repeated or out of order")
            self.seen.append((message["id"], message["client_id"]))

    async def send(self, client_id: str) -> None:
        await self.ws.send_json({"type": "chat", "client_id": client_id,
                                 "content": content_for(client_id)})

    async def send_new(self) -> str:
        # Pending before it is written: a send cut off by a crash is resent later.
        client_id = f"{self.tag}-{self.user_id}-{len(self.sent)}"
        self.sent.append(client_id)
        self.pending[client_id] = content_for(client_id)
        await self.send(client_id)
        return client_id

    async def resend_pending(self) -> None:
        for client_id in list(self.pending):
            await self.send(client_id)

    async def keep_sending(self, window: int | None, timeout_s: float,
                           max_frames: int = 20_000) -> None:
        """New messages, at most ``window`` un-acked, until the socket closes or time is up."""
        deadline = time.monotonic() + timeout_s
        for _ in range(max_frames):
            while window is not None and len(self.pending) >= window:
                self.progress.clear()
                if len(self.pending) < window:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.is_open:
                    return
                try:
                    await asyncio.wait_for(self.progress.wait(), remaining)
                except TimeoutError:
                    return
            if time.monotonic() > deadline or not self.is_open:
                return
            try:
                await self.send_new()
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                return
            await asyncio.sleep(0)

    async def answer(self, client_id: str, timeout_s: float, since: int = 0) -> dict:
        """The first ack or error for ``client_id`` among the answers from ``since`` on."""
        deadline = time.monotonic() + timeout_s
        while True:
            for frame in self.answers[since:]:
                if frame.get("client_id") == client_id:
                    return frame
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self.is_open, f"no answer for {client_id}"
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), remaining)
            except TimeoutError:
                pass

    def drop(self) -> None:
        """The connection goes away without a close frame (a network drop)."""
        self.ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        if self.reader is not None:
            await asyncio.wait_for(self.reader, 5)


def make_clients(rooms: list[tuple], tag: str) -> list[ChatClient]:
    return [client for room_id, trainer_id, member_id in rooms
            for client in (ChatClient(trainer_id, "trainer", room_id, tag),
                           ChatClient(member_id, "member", room_id, tag))]


async def connect_all(clients: list[ChatClient], http, port: int) -> float:
    """Every client (re)connected at once; the seconds until the last had its history."""
    started = time.monotonic()
    await asyncio.gather(*(client.connect(http, port) for client in clients))
    return time.monotonic() - started


async def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(interval_s)


async def wait_closed(clients: list[ChatClient], timeout_s: float = 10) -> None:
    readers = [client.reader for client in clients if client.reader is not None]
    done, not_done = await asyncio.wait(readers, timeout=timeout_s)
    assert not not_done, f"{len(not_done)} sockets still open"


# --------------------------------------------------------- the storage ---


def check_stored(db_path: Path, clients: list[ChatClient], *,
                 check_order: bool = True) -> dict[str, list[tuple[int, str]]]:
    """Each room's stored (id, client_id) list, checked: whole rows, every ack once at its id."""
    # A row must be a message its sender sent in that room, with all of its content.
    owners = {client_id: client for client in clients for client_id in client.sent}
    stored_at: dict[str, int] = {}
    rooms: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for row in stored_rows(db_path):
        message_id, session_id, user_id, kind, content, client_id, created_at = row.values()
        client = owners.get(client_id)
        assert client is not None, f"stored {client_id!r} was never sent"
        assert (user_id, f"pt_{session_id}", kind) == (client.user_id, client.room_id, "chat"), \
            f"{client_id} stored as {(user_id, session_id, kind)}"
        assert content == content_for(client_id), \
            f"{client_id} stored {len(content)} of {len(content_for(client_id))} characters"
        assert CREATED_AT.fullmatch(created_at), created_at
        assert client_id not in stored_at, f"{client_id} stored twice"
        stored_at[client_id] = message_id
        rooms[client.room_id].append((message_id, client_id))
    for client in clients:
        for client_id, acked_id in client.acked.items():
            assert stored_at.get(client_id) == acked_id, \
                f"{client_id} acked as {acked_id}, stored as {stored_at.get(client_id)}"
        if check_order:  # one socket, one write at a time: ids follow the sending order
            ids = [stored_at[c] for c in client.sent if c in stored_at]
            assert ids == sorted(ids), f"{client.user_id}: stored out of sending order"
    return rooms


def integrity(db_path: Path) -> str:
    uri = f"{db_path.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


async def http_room(http, base_url: str, room_id: str, user_id: str, role: str) -> list[tuple]:
    """A room's (id, client_id) list over HTTP, page by page."""
    messages, after_id = [], 0
    headers = {"Authorization": f"Bearer {make_token(user_id, role)}"}
    for _ in range(500):
        async with http.get(base_url + MESSAGES_PATH.format(room_id), headers=headers,
                            params={"after": str(after_id), "limit": "100"}) as response:
            assert response.status == 200, await response.text()
            page = await response.json()
        messages += [(m["id"], m["client_id"]) for m in page["messages"]]
        if not page["has_more"]:
            return messages
        after_id = page["messages"][-1]["id"]
    raise AssertionError("too many pages")


async def check_http_matches(http, base_url: str, clients: list[ChatClient],
                             rooms: dict[str, list[tuple]]) -> None:
    """Over HTTP each room reads as stored: ids strictly increasing, none missing."""
    readers = {client.room_id: client for client in clients}  # one participant per room
    for room_id, reader in readers.items():
        listed = await http_room(http, base_url, room_id, reader.user_id, reader.role)
        ids = [message_id for message_id, _ in listed]
        assert ids == sorted(set(ids)), f"{room_id}: ids not strictly increasing"
        assert listed == rooms.get(room_id, []), f"{room_id}: HTTP and the file differ"


async def health(http, base_url: str) -> tuple[int, object]:
    async with http.get(base_url + HEALTH_PATH) as response:
        return response.status, await response.json()


def no_problems(clients: list[ChatClient]) -> None:
    problems = [f"{c.user_id}: {p}" for c in clients for p in c.problems]
    assert not problems, problems[:10]


async def resend_and_read_to_the_end(http, server, db_path: Path,
                                     clients: list[ChatClient]) -> dict:
    """Resumed clients resend what they hold un-acked (a committed one gets its first
    id back), then each ends with exactly its stored room: no gap, no repeat."""
    for client in clients:
        await client.resend_pending()
    await wait_for(lambda: not any(c.pending for c in clients), 15, "resends not acked")
    stored = check_stored(db_path, clients)
    await wait_for(lambda: all(len(c.seen) >= len(stored[c.room_id]) for c in clients), 15,
                   "a resumed client is missing messages")
    for client in clients:
        assert client.seen == stored[client.room_id], f"{client.user_id}: gap or repeat"
    await check_http_matches(http, server.base_url, clients, stored)
    no_problems(clients)
    return stored


# -------------------------------------------------- 1. SIGKILL, 5 rounds ---


async def test_sigkill_rounds_lose_nothing_acked_and_resumed_clients_see_all(server_process,
                                                                             tmp_path):
    """Killed at any moment, every acked message survives once and resumed clients see all."""
    db_path = tmp_path / "chat.db"
    rooms = import_gym(tmp_path, db_path, pair_count=25, prefix="k")
    clients = make_clients(rooms, "kill")
    assert len(clients) == 50
    rng = random.Random(CRASH_SEED)
    args = (*QUIET, *NO_RATE_LIMIT)
    figures = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        server = server_process(*args, db_path=db_path, seed=False)
        stored: dict[str, list[tuple[int, str]]] = {}
        for round_number in range(5):
            resumed_s = await connect_all(clients, http, server.port)
            for client in clients:  # nobody has sent since the restart: history completes it
                assert client.seen == stored.get(client.room_id, []), \
                    f"round {round_number}: {client.user_id} resumed with a gap or a repeat"
            for client in clients:
                await client.resend_pending()
            acks_before = sum(len(c.acked) for c in clients)
            senders = [asyncio.create_task(client.keep_sending(window=4, timeout_s=30))
                       for client in clients]
            await wait_for(lambda: sum(len(c.acked) for c in clients) >= acks_before + 200, 15,
                           f"round {round_number}: no load")
            await asyncio.sleep(rng.uniform(0.0, 0.5))  # the random moment of the kill
            server.process.kill()
            server.process.wait(timeout=5)
            await wait_closed(clients)
            await asyncio.wait_for(asyncio.gather(*senders), 10)
            in_flight = sum(len(c.pending) for c in clients)

            server = server_process(*args, db_path=db_path, seed=False)  # same file
            stored = check_stored(db_path, clients)
            stored_ids = {c for room in stored.values() for _, c in room}
            committed_unacked = sum(c in stored_ids for cl in clients for c in cl.pending)
            for client in clients:  # a client saw only committed messages, in order
                assert client.seen == stored[client.room_id][:len(client.seen)], \
                    f"round {round_number}, seed {CRASH_SEED}: {client.user_id} saw a message " \
                    "that is not stored, or stored in another order"
            await check_http_matches(http, server.base_url, clients, stored)
            no_problems(clients)
            figures.append((round_number, sum(len(c.acked) for c in clients), in_flight,
                            committed_unacked, round(resumed_s, 2)))

        # After the last kill: resume, resend what is still un-acked, and read to the end.
        resumed_s = await connect_all(clients, http, server.port)
        for client in clients:
            assert client.seen == stored[client.room_id], f"{client.user_id}: resumed with a gap"
        stored = await resend_and_read_to_the_end(http, server, db_path, clients)
        assert not [e for c in clients for e in c.errors], "errors while sending"
        assert sum(len(c.acked) for c in clients) == sum(len(r) for r in stored.values())
        for client in clients:
            await client.close()
        assert server.stop() == 0
    print(f"\nSIGKILL rounds (seed {CRASH_SEED}) (round, acked so far, in flight at the kill, "
          f"of them committed, resume s): {figures}; final resume {resumed_s:.2f} s, "
          f"{sum(len(r) for r in stored.values())} stored")


# ------------------------------------------------- 2. SIGTERM under load ---


async def wait_for_exit(process: subprocess.Popen, timeout_s: float) -> int:
    """Wait for a child without blocking the loop: the clients must keep reading."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        assert time.monotonic() < deadline, f"the server did not exit within {timeout_s} s"
        await asyncio.sleep(0.01)
    return process.returncode


async def test_sigterm_under_load_closes_1001_and_stores_only_whole_sent_messages(
        server_process, tmp_path):
    """SIGTERM under load: 1001 for all, exit 0 in 5 s, acked kept, only whole messages."""
    db_path = tmp_path / "chat.db"
    clients = make_clients(import_gym(tmp_path, db_path, pair_count=25, prefix="s"), "term")
    idle, flooding = clients[0::10], clients[1::10]
    windowed = [c for c in clients if c not in idle and c not in flooding]
    args = (*QUIET, *NO_RATE_LIMIT)
    server = server_process(*args, db_path=db_path, seed=False)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await connect_all(clients, http, server.port)
        senders = [asyncio.create_task(c.keep_sending(window=4, timeout_s=30)) for c in windowed]
        # These keep 32 un-acked: frames are on the wire when the signal comes.
        senders += [asyncio.create_task(c.keep_sending(window=32, timeout_s=30))
                    for c in flooding]
        await wait_for(lambda: all(len(c.acked) >= 5 for c in windowed + flooding)
                       and sum(len(c.acked) for c in clients) >= 500, 15, "no load")

        signalled_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        return_code = await wait_for_exit(server.process, timeout_s=5)
        took_s = time.monotonic() - signalled_at
        await wait_closed(clients, timeout_s=5)
        await asyncio.wait_for(asyncio.gather(*senders), 5)
        assert return_code == 0, server.output()[-2000:]
        codes = {client.user_id: client.close_code for client in clients}
        assert set(codes.values()) == {1001}, codes
        assert {e["code"] for c in clients for e in c.errors} <= {"unavailable"}

        stored = check_stored(db_path, clients)
        stored_at = {client_id: message_id for room in stored.values()
                     for message_id, client_id in room}
        committed_unacked = [client_id for client in clients for client_id in client.pending
                             if client_id in stored_at]
        acked_before = sum(len(c.acked) for c in clients)
        unacked_before = sum(len(c.pending) for c in clients)
        assert unacked_before > 0, "nothing was in flight at the signal"

        # Restart: every client resumes and resends what it holds un-acked.
        server = server_process(*args, db_path=db_path, seed=False)
        await connect_all(clients, http, server.port)
        stored = await resend_and_read_to_the_end(http, server, db_path, clients)
        for client in clients:
            await client.close()
        assert server.stop() == 0
    print(f"\nSIGTERM: exit 0 in {took_s:.2f} s, 50 of 50 closed 1001, {acked_before} acked kept, "
          f"{unacked_before} un-acked ({len(committed_unacked)} of them committed), "
          f"{sum(len(r) for r in stored.values())} stored once each after the resends")


# ------------------------------------------------------ 3. storage faults ---
#
# How each fault reaches the running server's writer from outside, with no hook
# in the server:
# - full: the server's own file-size limit (RLIMIT_FSIZE, set on its pid) is put just
#   above the write-ahead log's present size, so the file cannot grow, as on a full disk.
#   Python ignores SIGXFSZ, so SQLite sees the failed write (SQLITE_IOERR_WRITE; a
#   real ENOSPC is SQLITE_FULL), not a dead process. `PRAGMA max_page_count` would
#   give SQLITE_FULL itself, but it holds per connection and the server offers no
#   setting that applies it to its writer.
# - read-only: chmod stops nobody here: permissions are checked at open() and the
#   server keeps its files open (and root passes them anyway). The immutable
#   attribute (chattr +i) refuses every write, also through open descriptors and to
#   root; it needs CAP_LINUX_IMMUTABLE and a file system that has it, else a skip.
#   The -shm file is left alone: writes through its memory map would be SIGBUS.
# - locked: another process holds BEGIN EXCLUSIVE until told to let go.

LOCKER_SCRIPT = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()  # held until the test ends the fault
db.execute("ROLLBACK")
"""


class DiskFull:
    """The server's files cannot grow past a limit just above the log's present size."""

    @staticmethod
    def skip_unless_possible(tmp_path: Path) -> None:
        """Skip where a process's file-size limit cannot be set from outside (not Linux)."""
        if not hasattr(resource, "prlimit"):
            pytest.skip("full storage: resource.prlimit is Linux only")

    def __init__(self, server) -> None:
        self.pid, self.wal_path = server.process.pid, Path(f"{server.db_path}-wal")
        self.limits = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)

    async def start(self) -> None:
        size = self.wal_path.stat().st_size
        assert size > 0, "the log is empty: nothing to fill"
        # Room for two pages more: the next commit (several pages) fails half-written,
        # frames on disk but no commit frame, which must count for nothing.
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (size + 10_000, self.limits[1]))

    async def end(self) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, self.limits)


def chattr(flag: str, *paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)


class ReadOnly:
    """The database and its log are immutable: every write fails, root's included."""

    def __init__(self, server) -> None:
        self.paths = [server.db_path, Path(f"{server.db_path}-wal")]

    @staticmethod
    def skip_unless_possible(tmp_path: Path) -> None:
        """Skip unless the immutable attribute stops a write through an open descriptor here."""
        why_not_chmod = "chmod does not stop a process that already has the file open"
        probe = tmp_path / "immutable-probe"
        descriptor = os.open(probe, os.O_CREAT | os.O_WRONLY)
        result = None
        try:
            try:
                result = chattr("+i", probe)
            except FileNotFoundError:
                pytest.skip(f"read-only storage: no chattr here (e2fsprogs); {why_not_chmod}")
            if result.returncode != 0:
                pytest.skip("read-only storage: the immutable attribute needs "
                            "CAP_LINUX_IMMUTABLE and a file system that has it; "
                            f"{why_not_chmod} ({result.stderr.strip()})")
            try:
                os.write(descriptor, b"probe")
            except PermissionError:
                return
            pytest.skip("read-only storage: this file system lets an open descriptor write "
                        f"to an immutable file; {why_not_chmod}")
        finally:
            os.close(descriptor)
            if result is not None and result.returncode == 0:
                chattr("-i", probe)

    async def start(self) -> None:
        result = chattr("+i", *self.paths)
        assert result.returncode == 0, result.stderr

    async def end(self) -> None:
        result = chattr("-i", *self.paths)  # also in the finally: tmp_path must stay removable
        assert result.returncode == 0, result.stderr


class Locked:
    """Another process holds the database's write lock until the fault ends."""

    @staticmethod
    def skip_unless_possible(tmp_path: Path) -> None:
        """Another process can always lock the file."""

    def __init__(self, server) -> None:
        self.db_path = server.db_path
        self.locker: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.locker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LOCKER_SCRIPT, str(self.db_path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        line = await asyncio.wait_for(self.locker.stdout.readline(), 10)
        assert line == b"locked\n", line

    async def end(self) -> None:
        if self.locker is None or self.locker.returncode is not None:
            return
        self.locker.stdin.write(b"release\n")
        await self.locker.stdin.drain()
        assert await asyncio.wait_for(self.locker.wait(), 10) == 0


FAULTS = {"full": DiskFull, "read_only": ReadOnly, "locked": Locked}
# What SQLite told the writer, as the server logs it: the fault is the one meant.
FAULT_ERRORS = {"full": "disk I/O error", "read_only": "disk I/O error",
                "locked": "database is locked"}
# Refusals each client waits for: many where they come at once, two (4 s) for the lock,
# whose every refusal waits out the writer's busy timeout.
REFUSALS = {"full": 20, "read_only": 20, "locked": 2}


async def send_until_refused(client: ChatClient, refusals: int, max_frames: int) -> list[str]:
    """New messages one at a time until ``refusals`` were refused; their client_ids."""
    refused = []
    for _ in range(max_frames):
        since = len(client.answers)
        client_id = await client.send_new()
        answer = await client.answer(client_id, timeout_s=10, since=since)
        if answer["type"] == "error":
            assert answer["code"] == "unavailable", answer
            refused.append(client_id)
            if len(refused) == refusals:
                return refused
    raise AssertionError(f"{client.user_id}: only {len(refused)} refused of {max_frames}")


async def send_until_acked(client: ChatClient, client_id: str, timeout_s: float) -> int:
    """Send ``client_id`` again until it is acked; its id."""
    deadline = time.monotonic() + timeout_s
    while True:
        since = len(client.answers)
        await client.send(client_id)
        answer = await client.answer(client_id, max(0.1, deadline - time.monotonic()), since)
        if answer["type"] == "ack":
            return answer["id"]
        assert answer["code"] == "unavailable", answer
        assert time.monotonic() < deadline, f"{client_id} still refused after {timeout_s} s"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fault_name", list(FAULTS))
async def test_storage_fault_refuses_with_unavailable_and_recovers_by_itself(
        server_process, tmp_path, fault_name):
    """Storage that cannot write: `unavailable`, nothing stored, server up, then stores again."""
    FAULTS[fault_name].skip_unless_possible(tmp_path)
    db_path = tmp_path / "chat.db"
    clients = make_clients(import_gym(tmp_path, db_path, pair_count=4, prefix="f"), "fault")
    server = server_process(*QUIET, *NO_RATE_LIMIT, db_path=db_path, seed=False)
    fault = FAULTS[fault_name](server)
    async with aiohttp.ClientSession() as http:
        await connect_all(clients, http, server.port)
        for client in clients:  # stored before the fault: the log has frames
            assert (await client.answer(await client.send_new(), 5))["type"] == "ack"
        try:
            await fault.start()
            fault_started = time.monotonic()
            refused = await asyncio.gather(*(
                send_until_refused(c, REFUSALS[fault_name], max_frames=REFUSALS[fault_name] + 10)
                for c in clients))
            # Up while refusing: health, and reads of what is stored.
            assert await health(http, server.base_url) == (200, {"status": "ok"})
            reader = clients[0]
            assert len(await http_room(http, server.base_url, reader.room_id, reader.user_id,
                                       reader.role)) >= 2
            assert server.process.poll() is None
            assert FAULT_ERRORS[fault_name] in server.output(), server.output()[-2000:]
            fault_s = time.monotonic() - fault_started
        finally:
            await fault.end()
        cleared_at = time.monotonic()

        stored = {c for room in check_stored(db_path, clients, check_order=False).values()
                  for _, c in room}
        assert not stored & {c for ids in refused for c in ids}, "a refused message was stored"
        # Recovery by itself: the same client_ids go through once the fault is gone.
        first_ack = await send_until_acked(clients[0], refused[0][0], timeout_s=10)
        recovered_s = time.monotonic() - cleared_at
        for client, client_ids in zip(clients, refused):
            for client_id in client_ids:
                acked_id = await send_until_acked(client, client_id, timeout_s=10)
                assert await send_until_acked(client, client_id, 5) == acked_id  # not again
            assert (await client.answer(await client.send_new(), 5))["type"] == "ack"
        assert clients[0].acked[refused[0][0]] == first_ack
        rooms = check_stored(db_path, clients, check_order=False)
        assert sum(len(r) for r in rooms.values()) == sum(len(c.acked) for c in clients)
        assert not any(c.pending for c in clients)
        await check_http_matches(http, server.base_url, clients, rooms)
        assert integrity(db_path) == "ok"
        assert await health(http, server.base_url) == (200, {"status": "ok"})
        no_problems(clients)
        for client in clients:
            await client.close()
    assert server.stop() == 0
    refused_count = sum(map(len, refused))
    # Acks beyond one before the fault, one after it and one per refused resend.
    acked_in_fault = sum(len(c.acked) for c in clients) - 2 * len(clients) - refused_count
    print(f"\n{fault_name}: {refused_count} refused with unavailable over {fault_s:.2f} s, "
          f"none stored, {acked_in_fault} acked in the fault; first ack {recovered_s:.2f} s "
          f"after it ended; {sum(len(r) for r in rooms.values())} stored once each, "
          "integrity ok")


# --------------------------------------------------- 4. reconnect storm ---


def raise_open_file_limit(needed: int) -> tuple[int, int]:
    """Room for the sockets on both ends (the server inherits the limit); the old limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the open-file limit is {hard}; a storm of 1,000 needs {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return soft, hard


async def talk_through(desk: ChatClient, storm_over: asyncio.Event) -> None:
    """A message every quarter second (the trainer's rate limit) until the storm is over."""
    for _ in range(12):
        if storm_over.is_set():
            return
        await desk.send_new()
        await asyncio.sleep(0.25)


async def test_reconnect_storm_of_1000_clients_resumes_all_with_nothing_lost_or_repeated(
        server_process, tmp_path):
    """1,000 clients dropped at once resume with `after`: all back, nothing lost or twice."""
    old_limits = raise_open_file_limit(4096)  # 1,500 sockets here, 1,500 in the server
    try:
        db_path = tmp_path / "chat.db"
        clients = make_clients(import_gym(tmp_path, db_path, pair_count=500, prefix="r"), "storm")
        assert len(clients) == 1000
        # Each trainer also has the room open on a desk that stays connected and talks
        # through the storm, so resumed sockets get live messages while their history is read.
        desks = [ChatClient(c.user_id, c.role, c.room_id, "desk") for c in clients
                 if c.role == "trainer"]
        # The default rate limit stays on: each user sends a few messages.
        # 1,500 phones, here all on one address: above the default per-address cap.
        server = server_process(*QUIET, "--max-connections-per-ip", "4000", db_path=db_path,
                                seed=False)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            connected_s = await connect_all(clients, http, server.port)
            await connect_all(desks, http, server.port)
            for client in clients:
                await client.send_new()
            await wait_for(lambda: all(len(c.seen) == 2 and not c.pending for c in clients), 30,
                           "first messages not acked and seen", interval_s=0.05)

            # A second message each, then every connection drops before an answer is read.
            for client in clients:
                await client.send_new()
            for client in clients:
                client.drop()
            await wait_closed(clients)
            in_flight = sum(len(c.pending) for c in clients)

            # All come back at once; each resends and says something new as soon as it is in.
            async def resume(client: ChatClient) -> float:
                await client.connect(http, server.port)
                resumed_at = time.monotonic()
                await client.resend_pending()
                await client.send_new()
                return resumed_at

            storm_over = asyncio.Event()
            talking = [asyncio.create_task(talk_through(desk, storm_over)) for desk in desks]
            storm_started = time.monotonic()
            resumed_s = max(await asyncio.gather(*map(resume, clients))) - storm_started
            storm_over.set()
            await asyncio.wait_for(asyncio.gather(*talking), 5)
            everyone = clients + desks
            await wait_for(lambda: not any(c.pending for c in everyone), 30, "sends not acked",
                           interval_s=0.05)
            stored = check_stored(db_path, everyone)
            storm_counts = {room_id: sum(c.startswith("storm-") for _, c in room)
                            for room_id, room in stored.items()}
            assert sorted(storm_counts.values()) == [6] * 500, "lost or stored twice"
            await wait_for(lambda: all(len(c.seen) >= len(stored[c.room_id]) for c in everyone),
                           30, "a resumed client is missing messages", interval_s=0.05)
            whole_s = time.monotonic() - storm_started
            for client in everyone:
                assert client.seen == stored[client.room_id], f"{client.user_id}: gap or repeat"
            no_problems(everyone)
            assert not [e for c in everyone for e in c.errors], "errors while sending"
            assert await health(http, server.base_url) == (200, {"status": "ok"})
            await asyncio.gather(*(client.close() for client in everyone))
        assert server.stop() == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old_limits)
    desk_messages = sum(len(d.sent) for d in desks)
    print(f"\nstorm: 1,000 connected in {connected_s:.2f} s; {in_flight} un-acked at the drop; "
          f"all 1,000 resumed in {resumed_s:.2f} s while desks sent {desk_messages}; every room "
          f"whole ({sum(map(len, stored.values()))} stored, none twice, no gap) "
          f"{whole_s:.2f} s after the drop")
