"""Presence on the chat WebSocket (SPEC section 5): join and leave `system`
frames, once per user however many tabs, none for a reconnect within 5 s."""
from __future__ import annotations

import asyncio
import time

from conftest import MESSAGES_PATH, auth, marker, open_room, receive_until

PRESENCE_GRACE_S = 5.0
RECONNECT_AFTER_S = 4.0  # late in the grace period, so a shorter one shows
SYSTEM_FIELDS = {"type", "event", "room_id", "user_id", "name", "content"}


def presence(frames: list[dict]) -> list[tuple[str, str]]:
    return [(f["event"], f["user_id"]) for f in frames if f["type"] == "system"]


async def frames_for(ws, seconds: float) -> list[dict]:
    """Every frame that arrives in the next ``seconds`` (bounded by receive timeouts)."""
    frames = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            frames.append(await ws.receive_json(timeout=remaining))
        except (asyncio.TimeoutError, TimeoutError):
            break
    return frames


def assert_system_frame(frame: dict, event: str, user_id: str, name: str) -> None:
    assert SYSTEM_FIELDS <= frame.keys(), frame
    assert (frame["type"], frame["event"], frame["room_id"], frame["user_id"], frame["name"]) == (
        "system", event, "pt_1", user_id, name)
    assert isinstance(frame["content"], str) and frame["content"], frame


async def test_first_socket_sends_join_to_the_room(client):
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    join = await receive_until(ws_t1, lambda f: f["type"] == "system")
    assert_system_frame(join, "join", "m1", "Member One")
    # presence is not stored
    response = await client.get(MESSAGES_PATH.format("pt_1"), headers=auth("t1"))
    assert (await response.json())["messages"] == []


async def test_presence_is_per_room(client):
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_m2, _, _ = await open_room(client, "pt_2", "m2")
    frames = await marker(ws_t1, "t1-marker")
    assert presence(frames) == []


async def test_more_tabs_send_no_second_join(client):
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    tab_a, _, _ = await open_room(client, "pt_1", "m1")
    tab_b, welcome, _ = await open_room(client, "pt_1", "m1")
    tab_c, _, _ = await open_room(client, "pt_1", "m1")
    assert {p["user_id"]: p["online"] for p in welcome["participants"]} == {"t1": True, "m1": True}
    frames = await marker(ws_t1, "t1-marker")
    assert presence(frames) == [("join", "m1")]


async def test_a_user_in_two_rooms_joins_each_room(client):
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    ws_m2, _, _ = await open_room(client, "pt_2", "m2")
    await open_room(client, "pt_1", "t1")
    await open_room(client, "pt_2", "t1")
    join_1 = await receive_until(ws_m1, lambda f: f["type"] == "system")
    join_2 = await receive_until(ws_m2, lambda f: f["type"] == "system")
    assert (join_1["event"], join_1["user_id"], join_1["room_id"]) == ("join", "t1", "pt_1")
    assert (join_2["event"], join_2["user_id"], join_2["room_id"]) == ("join", "t1", "pt_2")


async def test_leave_only_when_the_last_socket_closes_and_not_on_a_quick_reconnect(client):
    """One run through the 5 s grace: closing one of two tabs, and closing the last
    tab and coming back at once, send nothing; closing for good sends one leave."""
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    tab_a, _, _ = await open_room(client, "pt_1", "m1")
    tab_b, _, _ = await open_room(client, "pt_1", "m1")
    assert presence(await marker(ws_t1, "t1-1")) == [("join", "m1")]

    await tab_a.close()                      # another tab stays open
    await tab_b.close()                      # the last one closes ...
    closed_at = time.monotonic()
    frames = await frames_for(ws_t1, RECONNECT_AFTER_S)
    tab_c, _, _ = await open_room(client, "pt_1", "m1")  # ... and is back within 5 s
    assert time.monotonic() - closed_at < PRESENCE_GRACE_S

    # past the grace period: neither a leave nor a join reached the room
    frames += await frames_for(ws_t1, PRESENCE_GRACE_S + 0.5 - (time.monotonic() - closed_at))
    frames += await marker(ws_t1, "t1-2")
    assert presence(frames) == []

    # the last socket closes for good: one leave, after the grace period
    await tab_c.close()
    leave = await receive_until(ws_t1, lambda f: f["type"] == "system",
                                timeout_s=PRESENCE_GRACE_S + 2)
    assert_system_frame(leave, "leave", "m1", "Member One")

    # coming back after the leave is a new join
    await open_room(client, "pt_1", "m1")
    join = await receive_until(ws_t1, lambda f: f["type"] == "system")
    assert_system_frame(join, "join", "m1", "Member One")
    assert presence(await marker(ws_t1, "t1-3")) == []
