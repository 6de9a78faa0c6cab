"""Durability against real server processes: SIGKILL, SIGTERM/SIGINT under load, restarts.

SPEC section 2 (signals) and section 6 (an ack only after commit).
"""
from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest

from conftest import make_token, stored_rows

# (user, room) pairs of the conftest gym that may talk.
SENDERS = (("m1", "pt_1"), ("t1", "pt_1"), ("m2", "pt_2"), ("t2", "pt_3"), ("m3", "pt_3"))
SERVER_ARGS = ("--rate-limit", "0", "--log-level", "warning")


def content_of(user_id: str, client_id: str) -> str:
    return f"{user_id} says {client_id}"


class LoadClient:
    """One socket that sends chat frames with unique client_ids and records every ack."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, user_id: str, room_id: str,
                 tag: str) -> None:
        self.ws, self.user_id, self.room_id, self.tag = ws, user_id, room_id, tag
        self.sent: list[str] = []             # client_ids, in sending order
        self.acks: dict[str, int] = {}        # client_id -> acked id
        self.ack_order: list[str] = []
        self.errors: list[dict] = []
        self.close_code: int | None = None
        self.reader_done = asyncio.Event()

    @classmethod
    async def connect(cls, http, port: int, user_id: str, room_id: str, tag: str) -> "LoadClient":
        ws = await http.ws_connect(
            f"ws://127.0.0.1:{port}/distributor/ws/chat/{room_id}",
            headers={"Authorization": f"Bearer {make_token(user_id)}"}, heartbeat=None)
        client = cls(ws, user_id, room_id, tag)
        for expected in ("welcome", "history"):
            frame = await ws.receive_json(timeout=5)
            assert frame["type"] == expected, frame
        return client

    def client_id(self, number: int) -> str:
        return f"{self.tag}-{self.user_id}-{number}"

    async def read(self, timeout_s: float) -> None:
        """Record acks and errors until the socket closes (or the deadline)."""
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                try:
                    message = await self.ws.receive(timeout=deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
                if message.type is aiohttp.WSMsgType.TEXT:
                    frame = json.loads(message.data)
                    if frame["type"] == "ack":
                        assert frame["client_id"] not in self.acks, f"acked twice: {frame}"
                        self.acks[frame["client_id"]] = frame["id"]
                        self.ack_order.append(frame["client_id"])
                    elif frame["type"] == "error":
                        self.errors.append(frame)
                else:
                    if message.type is aiohttp.WSMsgType.CLOSE:
                        self.close_code = message.data
                    break
        finally:
            self.reader_done.set()

    async def send_loop(self, max_frames: int, window: int | None, timeout_s: float) -> None:
        """Send until the socket goes away: at most ``window`` frames waiting for an ack
        (None: no limit, a client that keeps sending), at most ``max_frames``."""
        deadline = time.monotonic() + timeout_s
        for number in range(max_frames):
            if window is not None:
                while len(self.sent) - len(self.acks) - len(self.errors) >= window:
                    if self.reader_done.is_set() or time.monotonic() > deadline:
                        return
                    await asyncio.sleep(0.002)
            if self.reader_done.is_set() or self.ws.closed or time.monotonic() > deadline:
                return
            client_id = self.client_id(number)
            self.sent.append(client_id)
            try:
                await self.ws.send_json({"type": "chat", "client_id": client_id,
                                         "content": content_of(self.user_id, client_id)})
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                return
            await asyncio.sleep(0)


def assert_acked_stored_exactly_once(db_path: Path, clients: list[LoadClient], *,
                                     check_order: bool = True) -> dict:
    """Every acked message is stored once with its acked id; returns client_id -> id."""
    rows = stored_rows(db_path)
    contents = [row["content"] for row in rows]
    assert len(contents) == len(set(contents)), "a message was stored twice"
    stored = {}
    for row in rows:
        key = (row["user_id"], row["client_id"])
        assert key not in stored, f"{row['client_id']} stored twice"
        stored[key] = (row["id"], f"pt_{row['session_id']}", row["content"])
    for client in clients:
        for client_id, acked_id in client.acks.items():
            assert stored.get((client.user_id, client_id)) == (
                acked_id, client.room_id, content_of(client.user_id, client_id)), \
                f"acked {client_id} -> {acked_id} but stored {stored.get((client.user_id, client_id))}"
        if not check_order:
            continue
        # One socket, one frame after the other: ids follow the sending order.
        ids_in_send_order = [stored[(client.user_id, c)][0] for c in client.sent
                             if (client.user_id, c) in stored]
        assert ids_in_send_order == sorted(set(ids_in_send_order)), client.user_id
    return {client_id: value[0] for (_, client_id), value in stored.items()}


async def room_messages(http, base_url: str, room_id: str, user_id: str) -> list[dict]:
    """Every message of a room over HTTP, page by page (bounded)."""
    messages, after = [], 0
    for _ in range(200):
        async with http.get(f"{base_url}/distributor/chat/rooms/{room_id}/messages",
                            params={"after": str(after), "limit": "100"},
                            headers={"Authorization": f"Bearer {make_token(user_id)}"}) as response:
            assert response.status == 200, await response.text()
            page = await response.json()
        messages += page["messages"]
        if not page["has_more"]:
            return messages
        after = page["messages"][-1]["id"]
    raise AssertionError("too many pages")


async def wait_for_exit(process, timeout_s: float) -> int:
    """Wait for a child without blocking the loop (the clients must keep reading)."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        assert time.monotonic() < deadline, f"the server did not exit within {timeout_s} s"
        await asyncio.sleep(0.02)
    return process.returncode


async def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


# ------------------------------------------------------------ SIGKILL ---


async def test_sigkill_loses_no_acked_message_and_resends_store_once(server_process):
    server = server_process(*SERVER_ARGS)
    async with aiohttp.ClientSession() as http:
        clients = [await LoadClient.connect(http, server.port, user_id, room_id, "kill")
                   for user_id, room_id in SENDERS]
        tasks = [asyncio.create_task(task) for client in clients
                 for task in (client.read(timeout_s=20),
                              client.send_loop(max_frames=3000, window=8, timeout_s=20))]
        await wait_for(lambda: sum(len(c.acks) for c in clients) >= 300, 15,
                       "not enough acks before the kill")
        server.process.kill()  # SIGKILL while every client has frames in flight
        server.process.wait(timeout=5)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        for client in clients:
            await client.ws.close()

        acked_total = sum(len(c.acks) for c in clients)
        assert acked_total >= 300
        assert not [e for c in clients for e in c.errors], "errors while sending"
        for client in clients:
            acked_ids = [client.acks[c] for c in client.ack_order]
            assert acked_ids == sorted(set(acked_ids)), "acks out of order"
        assert any(len(c.sent) > len(c.acks) for c in clients), "nothing was in flight"

        restarted = server_process(*SERVER_ARGS)  # same database, new port
        before_resend = assert_acked_stored_exactly_once(restarted.db_path, clients)

        # Ids per room strictly increasing, the HTTP view equal to the file.
        for room_id, reader in (("pt_1", "m1"), ("pt_2", "m2"), ("pt_3", "m3")):
            ids = [m["id"] for m in await room_messages(http, restarted.base_url, room_id, reader)]
            assert ids == sorted(set(ids))
            assert len(ids) == sum(1 for row in stored_rows(restarted.db_path)
                                   if f"pt_{row['session_id']}" == room_id)

        # Resend everything not acked, plus a few that were, with the same client_ids.
        resent: list[tuple[LoadClient, LoadClient, list[str]]] = []
        for client in clients:
            again = await LoadClient.connect(http, restarted.port, client.user_id,
                                             client.room_id, "kill")
            unacked = [c for c in client.sent if c not in client.acks]
            replay = unacked + client.ack_order[:3]
            resent.append((client, again, replay))
        readers = [asyncio.create_task(again.read(timeout_s=15)) for _, again, _ in resent]
        for client, again, replay in resent:
            for client_id in replay:
                again.sent.append(client_id)
                await again.ws.send_json({"type": "chat", "client_id": client_id,
                                          "content": content_of(client.user_id, client_id)})
        await wait_for(lambda: all(set(again.acks) | {e.get("client_id") for e in again.errors}
                                   >= set(replay) for _, again, replay in resent),
                       10, "not every resend was answered")
        for _, again, _ in resent:
            await again.ws.close()
        await asyncio.wait_for(asyncio.gather(*readers), timeout=5)

        max_before = max(before_resend.values())
        for client, again, replay in resent:
            assert not again.errors, again.errors
            for client_id in replay:
                if client_id in client.acks:
                    assert again.acks[client_id] == client.acks[client_id], \
                        "a resend of an acked message must get its first id"
                elif client_id in before_resend:  # committed, never acked
                    assert again.acks[client_id] == before_resend[client_id]
                else:
                    assert again.acks[client_id] > max_before
        after_resend = assert_acked_stored_exactly_once(
            restarted.db_path, [again for _, again, _ in resent] + clients, check_order=False)
        expected = set(before_resend) | {c for _, _, replay in resent for c in replay}
        assert set(after_resend) == expected
        for room_id, reader in (("pt_1", "m1"), ("pt_2", "m2"), ("pt_3", "m3")):
            ids = [m["id"] for m in await room_messages(http, restarted.base_url, room_id, reader)]
            assert ids == sorted(set(ids))
        assert restarted.stop() == 0


# ----------------------------------------------------- SIGTERM / SIGINT ---


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_shutdown_signal_closes_every_socket_1001_and_keeps_acked(server_process,
                                                                       signal_number):
    server = server_process(*SERVER_ARGS)
    async with aiohttp.ClientSession() as http:
        windowed = [await LoadClient.connect(http, server.port, user_id, room_id, "term")
                    for user_id, room_id in (("m1", "pt_1"), ("t2", "pt_3"))]
        # Keeps sending frames in a loop, never waiting for acks: mid-send at the signal.
        flooding = await LoadClient.connect(http, server.port, "m2", "pt_2", "term")
        idle = [await LoadClient.connect(http, server.port, user_id, room_id, "term")
                for user_id, room_id in (("t1", "pt_1"), ("t1", "pt_2"), ("m3", "pt_3"))]
        clients = windowed + [flooding] + idle
        readers = [asyncio.create_task(client.read(timeout_s=20)) for client in clients]
        senders = [asyncio.create_task(client.send_loop(3000, window=4, timeout_s=20))
                   for client in windowed]
        senders.append(asyncio.create_task(flooding.send_loop(50_000, window=None, timeout_s=20)))
        await wait_for(lambda: all(len(c.acks) >= 20 for c in windowed + [flooding]), 10,
                       "no load before the signal")
        assert not flooding.reader_done.is_set() and len(flooding.sent) > len(flooding.acks)

        signalled_at = time.monotonic()
        server.process.send_signal(signal_number)
        return_code = await wait_for_exit(server.process, timeout_s=5)
        took = time.monotonic() - signalled_at
        await asyncio.wait_for(asyncio.gather(*readers), timeout=5)
        await asyncio.wait_for(asyncio.gather(*senders), timeout=5)

        assert return_code == 0, server.output()
        assert took < 5
        codes = {f"{c.user_id}@{c.room_id}": c.close_code for c in clients}
        assert set(codes.values()) == {1001}, codes
        for client in clients:
            await client.ws.close()
    assert not [e for c in clients for e in c.errors if e["code"] != "unavailable"]
    assert_acked_stored_exactly_once(server.db_path, clients)


# ------------------------------------------------------------ restart ---


async def test_messages_and_read_pointers_survive_a_clean_restart(server_process):
    server = server_process(*SERVER_ARGS)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.base_url}/distributor/healthz") as response:
            assert response.status == 200 and await response.json() == {"status": "ok"}
        member = await LoadClient.connect(http, server.port, "m1", "pt_1", "keep")
        trainer = await LoadClient.connect(http, server.port, "t1", "pt_1", "keep")
        readers = [asyncio.create_task(c.read(timeout_s=10)) for c in (member, trainer)]
        for number in range(3):
            member.sent.append(member.client_id(number))
            await member.ws.send_json({"type": "chat", "client_id": member.client_id(number),
                                       "content": content_of("m1", member.client_id(number))})
        await wait_for(lambda: len(member.acks) == 3, 5, "member's messages not acked")
        trainer.sent.append(trainer.client_id(0))
        await trainer.ws.send_json({"type": "chat", "client_id": trainer.client_id(0),
                                    "content": content_of("t1", trainer.client_id(0))})
        await wait_for(lambda: len(trainer.acks) == 1, 5, "trainer's message not acked")
        member_last = member.acks[member.client_id(2)]
        trainer_id = trainer.acks[trainer.client_id(0)]
        # The trainer has read up to the member's last message; the member read nothing.
        await trainer.ws.send_json({"type": "read", "message_id": member_last})
        before = await room_messages(http, server.base_url, "pt_1", "t1")
        await wait_for(lambda: _last_read(server.db_path, "t1") == member_last, 5,
                       "read pointer not stored")
        for client in (member, trainer):
            await client.ws.close()
        await asyncio.wait_for(asyncio.gather(*readers), timeout=5)
        assert server.stop() == 0

        restarted = server_process(*SERVER_ARGS)
        async with http.get(f"{restarted.base_url}/distributor/healthz") as response:
            assert response.status == 200 and await response.json() == {"status": "ok"}
        assert await room_messages(http, restarted.base_url, "pt_1", "m1") == before
        assert [m["id"] for m in before] == [member.acks[member.client_id(n)] for n in range(3)] \
            + [trainer_id]

        ws = await http.ws_connect(f"ws://127.0.0.1:{restarted.port}/distributor/ws/chat/pt_1",
                                   headers={"Authorization": f"Bearer {make_token('m1')}"})
        welcome = await ws.receive_json(timeout=5)
        history = await ws.receive_json(timeout=5)
        pointers = {p["user_id"]: p["last_read_id"] for p in welcome["participants"]}
        assert pointers == {"t1": member_last, "m1": 0}
        assert history["messages"] == before
        for user_id, unread in (("t1", 0), ("m1", 1)):
            async with http.get(f"{restarted.base_url}/distributor/chat/rooms?format=json",
                                headers={"Authorization": f"Bearer {make_token(user_id)}"}) as r:
                rooms = {room["id"]: room for room in (await r.json())["chat_rooms"]}
            assert rooms["pt_1"]["unread_count"] == unread, (user_id, rooms["pt_1"])
        # New messages carry on after the old ids.
        await ws.send_json({"type": "chat", "client_id": "after-restart", "content": "again"})
        ack = None
        deadline = time.monotonic() + 5
        while ack is None:
            frame = await ws.receive_json(timeout=max(0.01, deadline - time.monotonic()))
            if frame["type"] == "ack":
                ack = frame
        assert ack["id"] > trainer_id
        await ws.close()
        assert restarted.stop() == 0


def _last_read(db_path: Path, user_id: str) -> int | None:
    with closing(sqlite3.connect(db_path)) as db:
        row = db.execute("SELECT last_read_id FROM read_state WHERE session_id = 1 "
                         "AND user_id = ?", (user_id,)).fetchone()
    return row[0] if row else None
