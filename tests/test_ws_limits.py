"""The chat WebSocket's limits and lifetimes (SPEC sections 2 and 5): bad frames,
frame size, rate limit, sockets per user, token expiry, storage refusals, management
changes and server shutdown. Real app, real sockets, a fresh database."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time

import jwt
import pytest
from aiohttp import WSMsgType

from conftest import (
    ack_of, auth, make_token, marker, next_error, open_room, receive_until,
    run_cli, send_chat, messages_over_http,
)

WS_PATH = "/distributor/ws/chat/{}"
FRAME_LIMIT_BYTES = 64 * 1024
DEFAULT_RATE = 5
DEFAULT_BURST = 20


# ------------------------------------------------------------ helpers ---


async def expect_close(ws, code: int, timeout_s: float = 5.0) -> float:
    """Skip text frames until the close; it must carry ``code``. When it came."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no close in time"
        message = await ws.receive(timeout=remaining)
        if message.type is not WSMsgType.TEXT:
            closed_at = time.time()
            assert message.type is WSMsgType.CLOSE, message
            assert message.data == code, message
            return closed_at


async def burst(sockets_and_ids: list[tuple[object, list[str]]],
                frame_type: str = "chat") -> tuple[dict[str, dict], float]:
    """Send every client_id on its socket at once; each one's answer, and the seconds
    from the first send to the last answer."""
    started = time.monotonic()

    async def run(ws, client_ids):
        for client_id in client_ids:
            await send_chat(ws, f"burst {client_id}", client_id, frame_type)
        answers, pending = {}, set(client_ids)
        while pending:
            frame = await receive_until(
                ws, lambda f: f["type"] in ("ack", "error") and f.get("client_id") in pending)
            pending.discard(frame["client_id"])
            answers[frame["client_id"]] = frame
        return answers

    results = await asyncio.gather(*(run(ws, ids) for ws, ids in sockets_and_ids))
    return {k: v for answers in results for k, v in answers.items()}, time.monotonic() - started


def check_rate_limited(answers: dict[str, dict], elapsed_s: float, rate: float,
                       burst_size: int) -> set[str]:
    """At most burst + rate × elapsed (+1 for the token being refilled) go through;
    the rest are rate_limited. The acked client_ids."""
    acked = {cid for cid, frame in answers.items() if frame["type"] == "ack"}
    limited = {cid for cid, frame in answers.items() if frame["type"] == "error"}
    for client_id in limited:
        assert answers[client_id]["code"] == "rate_limited", answers[client_id]
    allowed = burst_size + int(rate * elapsed_s) + 1
    assert burst_size <= len(acked) <= allowed, (len(acked), elapsed_s)
    assert len(limited) == len(answers) - len(acked) > 0
    return acked


def cli(settings, *args: str):
    return asyncio.to_thread(run_cli, *args, db_path=settings.db_path)


# --------------------------------------------------------- bad frames ---


@pytest.mark.parametrize("raw", [
    "not json",
    "{",
    "",
    "[]",
    '[{"type":"chat","content":"hi","client_id":"x"}]',
    '"chat"',
    "42",
    "null",
    "true",
    "{}",
    '{"type":"nope"}',
    '{"type":"CHAT","content":"hi","client_id":"x"}',
    '{"type":5,"content":"hi","client_id":"x"}',
    '{"type":null}',
    '{"type":["chat"]}',
    '{"type":"system","event":"join","content":"fake join"}',
    '{"type":"ack","client_id":"x","id":1}',
    '{"type":"chat","content":"hi","client_id":"x","room_id":1}',
    '{"type":"chat","content":"hi","client_id":"x","user_id":null}',
    "[" * 5000 + "]" * 5000,
], ids=["text", "broken", "empty-text", "array", "array-of-chat", "string", "number", "null",
        "true", "no-type", "unknown-type", "upper-case-type", "number-type", "null-type",
        "list-type", "system", "ack", "number-room-id", "null-user-id", "nested-5000-deep"])
async def test_bad_frame_gets_an_error_and_the_socket_stays_open(client, raw):
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    await ws_m1.send_str(raw)
    assert (await next_error(ws_m1))["code"] == "invalid_message"
    await marker(ws_m1, "after")
    assert [m["client_id"] for m in await messages_over_http(client)] == ["after"]
    trainer_frames = await marker(ws_t1, "t-marker")
    presence = [f for f in trainer_frames if f["type"] == "system"]
    assert [(f["event"], f["user_id"]) for f in presence] == [("join", "m1")]  # no fake relayed
    assert [f["type"] for f in trainer_frames if f["type"] != "system"] == ["chat", "chat", "ack"]


async def test_binary_frame_gets_an_error_and_the_socket_stays_open(client):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    await ws.send_bytes(b'{"type":"chat","content":"hi","client_id":"bin"}')
    assert (await next_error(ws))["code"] == "invalid_message"
    await marker(ws, "after")
    assert [m["client_id"] for m in await messages_over_http(client)] == ["after"]


# --------------------------------------------------------- frame size ---


def chat_frame_of_size(size_bytes: int) -> str:
    head, tail = '{"type":"chat","client_id":"big","content":"', '"}'
    return head + "a" * (size_bytes - len(head) - len(tail)) + tail


async def test_frame_over_64_kib_closes_with_1009(client):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    other_tab, _, _ = await open_room(client, "pt_1", "m1")
    await ws.send_str(chat_frame_of_size(FRAME_LIMIT_BYTES + 1))
    await expect_close(ws, 1009)
    await marker(other_tab, "other-tab")
    assert [m["client_id"] for m in await messages_over_http(client)] == ["other-tab"]


async def test_frame_of_exactly_64_kib_is_read(client):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    frame = chat_frame_of_size(FRAME_LIMIT_BYTES)
    assert len(frame.encode()) == FRAME_LIMIT_BYTES
    await ws.send_str(frame)
    error = await next_error(ws)
    assert (error["code"], error["client_id"]) == ("too_long", "big")
    await marker(ws, "after")
    assert [m["client_id"] for m in await messages_over_http(client)] == ["after"]


# --------------------------------------------------------- rate limit ---


async def test_rate_limit_refuses_the_excess_and_stores_none_of_it(client):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    client_ids = [f"c{number:02}" for number in range(40)]
    answers, elapsed_s = await burst([(ws, client_ids)])
    acked = check_rate_limited(answers, elapsed_s, DEFAULT_RATE, DEFAULT_BURST)
    assert set(client_ids[:DEFAULT_BURST]) <= acked  # the burst goes through
    assert {m["client_id"] for m in await messages_over_http(client)} == acked
    assert len(await messages_over_http(client)) == len(acked)

    # the socket stays open and the bucket refills at the configured rate
    deadline = time.monotonic() + 2 / DEFAULT_RATE + 1
    for attempt in range(100):
        assert time.monotonic() < deadline, "the rate limit did not let a message through"
        await send_chat(ws, "later", f"later-{attempt}")
        frame = await receive_until(
            ws, lambda f: f["type"] in ("ack", "error") and f["client_id"] == f"later-{attempt}")
        if frame["type"] == "ack":
            break
        assert frame["code"] == "rate_limited"
        await asyncio.sleep(0.05)
    assert len(await messages_over_http(client)) == len(acked) + 1


async def test_rate_limit_counts_all_sockets_of_a_user(client):
    room_1_a, _, _ = await open_room(client, "pt_1", "t1")
    room_1_b, _, _ = await open_room(client, "pt_1", "t1")
    room_2, _, _ = await open_room(client, "pt_2", "t1")
    plan = [(ws, [f"{name}-{number:02}" for number in range(15)])
            for ws, name in ((room_1_a, "a"), (room_1_b, "b"), (room_2, "c"))]
    answers, elapsed_s = await burst(plan)
    acked = check_rate_limited(answers, elapsed_s, DEFAULT_RATE, DEFAULT_BURST)
    stored_ids = {m["client_id"] for m in await messages_over_http(client, "pt_1") + await messages_over_http(client, "pt_2")}
    assert stored_ids == acked

    # another user is not held back by t1's limit
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    await marker(ws_m1, "m1-fine")


async def test_spread_frames_count_towards_the_rate_limit(client):
    ws, _, _ = await open_room(client, "pt_1", "t1")
    chats = [f"chat-{number:02}" for number in range(DEFAULT_BURST)]
    answers, _ = await burst([(ws, chats)])
    assert all(frame["type"] == "ack" for frame in answers.values())
    answers, _ = await burst([(ws, ["spread-1"])], frame_type="spread")
    assert (answers["spread-1"]["type"], answers["spread-1"].get("code")) == ("error",
                                                                               "rate_limited")
    assert [m for m in await messages_over_http(client, "pt_2")] == []


async def test_rate_limit_follows_the_setting(make_client):
    client = await make_client(rate_limit=2)
    ws, _, _ = await open_room(client, "pt_1", "m1")
    client_ids = [f"c{number:02}" for number in range(16)]
    answers, elapsed_s = await burst([(ws, client_ids)])
    acked = check_rate_limited(answers, elapsed_s, 2, 8)
    assert set(client_ids[:8]) <= acked
    assert len(await messages_over_http(client)) == len(acked)


async def test_reconnecting_does_not_refill_the_rate_limit(client):
    sent: list[str] = []
    answers: dict = {}
    started = time.monotonic()
    for round_number in range(3):
        ws, _, _ = await open_room(client, "pt_1", "m1")
        client_ids = [f"r{round_number}-{number:02}" for number in range(DEFAULT_BURST)]
        round_answers, _ = await burst([(ws, client_ids)])
        answers.update(round_answers)
        sent += client_ids
        await ws.close()
    acked = check_rate_limited(answers, time.monotonic() - started, DEFAULT_RATE, DEFAULT_BURST)
    assert len(acked) < len(sent)
    assert len(await messages_over_http(client)) == len(acked)


async def test_a_rate_limit_below_a_quarter_a_second_still_lets_one_through(make_client):
    client = await make_client(rate_limit=0.2)
    ws, _, _ = await open_room(client, "pt_1", "m1")
    await send_chat(ws, "slow but allowed", "one")
    assert (await ack_of(ws, "one"))["client_id"] == "one"


async def test_rate_limit_zero_switches_it_off(make_client):
    client = await make_client(rate_limit=0)
    ws, _, _ = await open_room(client, "pt_1", "m1")
    client_ids = [f"c{number:02}" for number in range(60)]
    answers, _ = await burst([(ws, client_ids)])
    assert [answers[cid]["type"] for cid in client_ids] == ["ack"] * 60
    assert len(await messages_over_http(client)) == 60


# ---------------------------------------------------- sockets per user ---


async def test_a_user_holds_at_most_20_sockets(client):
    sockets = [(await open_room(client, "pt_1", "m1"))[0] for _ in range(20)]
    extra = await client.ws_connect(WS_PATH.format("pt_1"), headers=auth("m1"))
    await expect_close(extra, 1008)
    # the 20 stay usable, and other users are not affected
    await marker(sockets[0], "first")
    await marker(sockets[-1], "last")
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    await marker(ws_t1, "t1")

    # closing one makes room for one more
    await sockets.pop().close()
    deadline = time.monotonic() + 5
    while True:
        assert time.monotonic() < deadline, "no socket freed after a close"
        again = await client.ws_connect(WS_PATH.format("pt_1"), headers=auth("m1"))
        message = await again.receive(timeout=5)
        if message.type is WSMsgType.TEXT:
            assert message.json()["type"] == "welcome"
            break
        assert (message.type, message.data) == (WSMsgType.CLOSE, 1008)
        await asyncio.sleep(0.05)


async def test_socket_limit_counts_every_room_of_the_user(client):
    for room_id in ("pt_1", "pt_2"):
        for _ in range(10):
            await open_room(client, room_id, "t1")
    for room_id in ("pt_1", "pt_2"):
        extra = await client.ws_connect(WS_PATH.format(room_id), headers=auth("t1"))
        await expect_close(extra, 1008)


# ------------------------------------------------------- token expiry ---


async def test_token_expiry_closes_an_open_socket_with_4401(client):
    token = make_token("m1", ttl_s=2)
    expires_at = jwt.decode(token, options={"verify_signature": False})["exp"]
    ws, _, _ = await open_room(client, "pt_1", "m1", token=token)
    lasting_tab, _, _ = await open_room(client, "pt_1", "m1")
    closed_at = await expect_close(ws, 4401, timeout_s=expires_at - time.time() + 3)
    assert expires_at - 0.1 <= closed_at <= expires_at + 1.0, (closed_at, expires_at)
    # only the socket whose token expired is closed
    await marker(lasting_tab, "still-here")


# ------------------------------------------------------------ storage ---


async def test_locked_storage_answers_unavailable_and_a_resend_is_stored_once(client, settings):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    lock = sqlite3.connect(settings.db_path, isolation_level=None, timeout=5)
    try:
        lock.execute("BEGIN IMMEDIATE")
        await send_chat(ws, "while locked", "locked-1")
        error = await next_error(ws, timeout_s=10)
        assert (error["code"], error["client_id"]) == ("unavailable", "locked-1")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert await messages_over_http(client) == []
    # the socket stays open; the retry with the same client_id is stored once
    await send_chat(ws, "while locked", "locked-1")
    ack = await ack_of(ws, "locked-1")
    await send_chat(ws, "while locked", "locked-1")
    assert (await ack_of(ws, "locked-1"))["id"] == ack["id"]
    assert [(m["id"], m["client_id"]) for m in await messages_over_http(client)] == [(ack["id"], "locked-1")]


async def test_locked_storage_does_not_close_the_socket_on_a_read(client, settings):
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    await send_chat(ws_t1, "read me", "first")
    first_id = (await ack_of(ws_t1, "first"))["id"]
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    lock = sqlite3.connect(settings.db_path, isolation_level=None, timeout=5)
    try:
        lock.execute("BEGIN IMMEDIATE")
        await ws_m1.send_json({"type": "read", "message_id": first_id})
        await send_chat(ws_m1, "while locked", "locked-2")  # handled after the read
        error = await receive_until(
            ws_m1, lambda f: f["type"] == "error" and f["client_id"] == "locked-2", 10)
        assert error["code"] == "unavailable"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    # the socket stays open: the read and the message go through once storage is back
    await ws_m1.send_json({"type": "read", "message_id": first_id})
    read = await receive_until(ws_m1, lambda f: f["type"] == "read")
    assert (read["user_id"], read["message_id"]) == ("m1", first_id)
    await marker(ws_m1, "locked-2")
    assert [m["client_id"] for m in await messages_over_http(client)] == ["first", "locked-2"]


# -------------------------------------------------- management changes ---


async def test_end_session_while_connected_makes_sends_room_closed(client, settings):
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    await send_chat(ws_t1, "last words", "before")
    last_id = (await ack_of(ws_t1, "before"))["id"]
    result = await cli(settings, "end-session", "pt_1")
    assert result.returncode == 0, result.stderr

    deadline = time.monotonic() + 2  # the running server honours it within 2 s
    for attempt in range(1000):
        await send_chat(ws_m1, "after the end?", f"late-{attempt}")
        frame = await receive_until(
            ws_m1, lambda f: f["type"] in ("ack", "error") and f["client_id"] == f"late-{attempt}")
        if frame["type"] == "error":
            assert frame["code"] == "room_closed", frame
            break
        assert time.monotonic() < deadline, "the ended room still takes messages"
        await asyncio.sleep(0.1)
    acked_late = attempt
    # the socket stays open and reads still work
    await ws_m1.send_json({"type": "read", "message_id": last_id})
    read = await receive_until(ws_m1, lambda f: f["type"] == "read")
    assert (read["user_id"], read["message_id"]) == ("m1", last_id)
    await send_chat(ws_t1, "me neither", "t1-late")
    assert (await next_error(ws_t1))["code"] == "room_closed"
    assert len(await messages_over_http(client)) == 1 + acked_late


# ----------------------------------------------------------- shutdown ---


async def _close_code(ws, timeout_s: float = 5.0) -> tuple[list[dict], int | None]:
    """Frames until the socket closes, and the close code it got (None: no close frame)."""
    frames = []
    deadline = time.monotonic() + timeout_s
    while True:
        message = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        if message.type is WSMsgType.TEXT:
            frames.append(message.json())
            continue
        if message.type is WSMsgType.CLOSE:
            return frames, message.data
        return frames, None


async def test_server_shutdown_closes_every_socket_with_1001(client, settings):
    sockets = [(await open_room(client, room_id, user_id))[0]
               for room_id, user_id in (("pt_1", "m1"), ("pt_1", "t1"), ("pt_2", "t1"),
                                        ("pt_2", "m2"), ("pt_3", "m3"))]
    readers = [asyncio.create_task(_close_code(ws)) for ws in sockets]
    await send_chat(sockets[0], "mid-send", "mid")  # one socket is sending as it stops
    await client.server.close()
    results = await asyncio.wait_for(asyncio.gather(*readers), timeout=10)
    assert [code for _, code in results] == [1001] * len(sockets)
    # if the mid-send message was acked, it was committed
    acked = [f for f in results[0][0] if f["type"] == "ack" and f["client_id"] == "mid"]
    with contextlib.closing(sqlite3.connect(settings.db_path)) as db:
        rows = db.execute("SELECT id FROM messages WHERE client_id = 'mid'").fetchall()
    if acked:
        assert rows == [(acked[0]["id"],)]
