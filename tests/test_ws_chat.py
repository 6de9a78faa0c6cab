"""The chat WebSocket (SPEC section 5): handshake, welcome and history, chat,
spread, read, typing and bad frames. Real app, real sockets, a fresh database."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType

from conftest import (
    ack_of, auth, make_token, marker, next_error, open_room, receive_until,
    run_cli, send_chat, messages_over_http,
)

WS_PATH = "/distributor/ws/chat/{}"
MESSAGE_FIELDS = {"type", "id", "room_id", "user_id", "sender_name", "content", "created_at",
                  "client_id", "photo"}


# ------------------------------------------------------------ helpers ---


async def frames_until(ws, predicate, timeout_s: float = 5.0) -> list[dict]:
    """Every frame up to and including the first one matching predicate."""
    frames: list[dict] = []

    def collect(frame: dict) -> bool:
        frames.append(frame)
        return predicate(frame)

    await receive_until(ws, collect, timeout_s)
    return frames


async def send_many(sockets: list, count: int, prefix: str) -> list[int]:
    """Store ``count`` chats spread over ``sockets`` (rate limit off); their ids."""
    per_socket = [list(range(index, count, len(sockets))) for index in range(len(sockets))]

    async def run(ws, numbers):
        for number in numbers:
            await send_chat(ws, f"message {number}", f"{prefix}-{number}")
        ids = []
        pending = {f"{prefix}-{number}" for number in numbers}
        while pending:
            frame = await receive_until(
                ws, lambda f: f["type"] in ("ack", "error") and f.get("client_id") in pending, 30)
            assert frame["type"] == "ack", frame
            pending.discard(frame["client_id"])
            ids.append(frame["id"])
        return ids

    results = await asyncio.gather(*(run(ws, numbers) for ws, numbers in zip(sockets, per_socket)))
    return sorted(id_ for ids in results for id_ in ids)


def assert_message_frame(frame: dict, **expected) -> None:
    assert MESSAGE_FIELDS <= frame.keys(), frame
    for key, value in expected.items():
        assert frame[key] == value, (key, frame)
    assert isinstance(frame["id"], int) and frame["id"] > 0
    created_at = datetime.fromisoformat(frame["created_at"].replace("Z", "+00:00"))
    assert created_at.utcoffset() == timedelta(0), frame["created_at"]


async def expect_close(ws, code: int, timeout_s: float = 5.0) -> None:
    """The next frame is the close with ``code``: nothing (no welcome) before it."""
    message = await ws.receive(timeout=timeout_s)
    assert message.type is WSMsgType.CLOSE, message
    assert message.data == code, message
    assert ws.close_code == code


def cli(settings, *args: str):
    return asyncio.to_thread(run_cli, *args, db_path=settings.db_path)


# ---------------------------------------------------------- handshake ---


def upgrade_headers(origin: str, user_id: str = "m1") -> dict:
    return {"Origin": origin, "Connection": "Upgrade", "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            **auth(user_id)}


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1",
                                    "http://[evil", "http://[::1"])
async def test_foreign_origin_is_refused_with_403_and_no_upgrade(client, origin):
    response = await client.get(WS_PATH.format("pt_1"), headers=upgrade_headers(origin))
    assert response.status == 403
    assert response.headers.get("Upgrade") is None
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(WS_PATH.format("pt_1"),
                                headers={"Origin": origin, **auth("m1")})
    assert refused.value.status == 403


async def test_own_origin_is_accepted(client):
    own_origin = str(client.make_url("/")).rstrip("/")
    ws = await client.ws_connect(WS_PATH.format("pt_1"),
                                 headers={"Origin": own_origin, **auth("m1")})
    welcome = await ws.receive_json(timeout=5)
    assert welcome["type"] == "welcome" and welcome["user_id"] == "m1"


async def test_allowed_origin_is_accepted_and_others_still_refused(make_client):
    client = await make_client(allowed_origins=("https://gym.example",))
    ws = await client.ws_connect(WS_PATH.format("pt_1"),
                                 headers={"Origin": "https://gym.example", **auth("m1")})
    assert (await ws.receive_json(timeout=5))["type"] == "welcome"
    response = await client.get(WS_PATH.format("pt_1"),
                                headers=upgrade_headers("https://other.example"))
    assert response.status == 403


async def test_no_origin_is_accepted(client):
    ws, welcome, history = await open_room(client, "pt_1", "m1")
    assert welcome["room_id"] == "pt_1"


@pytest.mark.parametrize("token", [
    None,
    "not-a-jwt",
    make_token("m1", secret="another-secret-entirely-another-secret"),
    make_token("m1", ttl_s=-60),
    make_token("nobody", role="member"),
    make_token("m1", role="trainer"),
], ids=["none", "garbage", "wrong-key", "expired", "unknown-user", "wrong-role"])
async def test_bad_token_closes_4401_right_after_upgrade(client, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ws = await client.ws_connect(WS_PATH.format("pt_1"), headers=headers)
    await expect_close(ws, 4401)


async def test_alg_none_token_closes_4401(client):
    token = jwt.encode({"sub": "m1", "role": "member", "exp": 2**40}, None, algorithm="none")
    ws = await client.ws_connect(WS_PATH.format("pt_1"), headers={"Authorization": f"Bearer {token}"})
    await expect_close(ws, 4401)


@pytest.mark.parametrize("user_id, path", [
    ("m2", "pt_1"),                 # a member of another session of the same trainer
    ("t2", "pt_1"),                 # another trainer
    ("m1", "pt_3"),                 # a member in a room of another trainer
    ("m1", "pt_1?user_id=m2"),      # user_id claimed in the query is not the token's
    ("t1", "pt_1?user_id=m1"),
])
async def test_not_a_participant_or_user_id_mismatch_closes_4403(client, user_id, path):
    ws = await client.ws_connect(WS_PATH.format(path), headers=auth(user_id))
    await expect_close(ws, 4403)


async def test_matching_user_id_query_is_accepted(client):
    ws = await client.ws_connect(WS_PATH.format("pt_1?user_id=m1"), headers=auth("m1"))
    assert (await ws.receive_json(timeout=5))["type"] == "welcome"


@pytest.mark.parametrize("room_id", ["pt_99", "pt_0", "pt_abc", "room1", "pt_", "1", "pt_1x"])
async def test_bad_or_unknown_room_closes_4404(client, room_id):
    ws = await client.ws_connect(WS_PATH.format(room_id), headers=auth("m1"))
    await expect_close(ws, 4404)


async def test_token_from_query_parameter_and_cookie(client):
    ws = await client.ws_connect(WS_PATH.format("pt_1"), params={"token": make_token("m1")})
    assert (await ws.receive_json(timeout=5))["user_id"] == "m1"
    ws = await client.ws_connect(WS_PATH.format("pt_1"),
                                 headers={"Cookie": f"distributor_token={make_token('t1')}"})
    assert (await ws.receive_json(timeout=5))["user_id"] == "t1"


async def test_authorization_header_wins_over_query_token(client):
    ws = await client.ws_connect(WS_PATH.format("pt_1"), headers=auth("m1"),
                                 params={"token": make_token("m2")})
    welcome = await ws.receive_json(timeout=5)
    assert welcome["type"] == "welcome" and welcome["user_id"] == "m1"


# ------------------------------------------------- welcome and history ---


async def test_welcome_then_history_on_connect(client):
    ws, welcome, history = await open_room(client, "pt_1", "m1")
    assert welcome["room_id"] == "pt_1"
    assert welcome["user_id"] == "m1"
    assert welcome["role"] == "member"
    participants = {p["user_id"]: p for p in welcome["participants"]}
    assert set(participants) == {"t1", "m1"}
    for participant in participants.values():
        assert {"user_id", "name", "role", "online", "last_read_id"} <= participant.keys()
        assert participant["last_read_id"] == 0
    assert participants["t1"]["name"] == "Coach One"
    assert participants["t1"]["role"] == "trainer"
    assert participants["t1"]["online"] is False
    assert participants["m1"]["name"] == "Member One"
    assert participants["m1"]["role"] == "member"
    assert history == {"type": "history", "messages": [], "has_more": False}


async def test_welcome_shows_a_connected_participant_online(client):
    await open_room(client, "pt_1", "t1")
    ws, welcome, _ = await open_room(client, "pt_1", "m1")
    participants = {p["user_id"]: p for p in welcome["participants"]}
    assert participants["t1"]["online"] is True
    assert welcome["role"] == "member"
    _, trainer_welcome, _ = await open_room(client, "pt_2", "t1")
    assert trainer_welcome["role"] == "trainer"


async def test_names_come_from_the_database_not_the_token(client):
    token = make_token("t1", name="Mallory")
    ws, welcome, _ = await open_room(client, "pt_1", "t1", token=token)
    names = {p["user_id"]: p["name"] for p in welcome["participants"]}
    assert names["t1"] == "Coach One"
    await send_chat(ws, "hello", "c1")
    frame = await receive_until(ws, lambda f: f["type"] == "chat")
    assert frame["sender_name"] == "Coach One"


async def test_history_without_after_is_the_latest_50(make_client):
    client = await make_client(rate_limit=0)
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    ids = await send_many([ws_t1, ws_m1], 55, "h")
    _, _, history = await open_room(client, "pt_1", "m1")
    assert [m["id"] for m in history["messages"]] == ids[-50:]
    assert history["has_more"] is True
    for message in history["messages"]:
        assert_message_frame(message, room_id="pt_1", type="chat")
    assert history["messages"] == (await messages_over_http(client))[-50:]

    _, _, history = await open_room(client, "pt_1", "m1", after=ids[4])
    assert [m["id"] for m in history["messages"]] == ids[5:]
    assert history["has_more"] is False
    _, _, history = await open_room(client, "pt_1", "m1", after=ids[-1])
    assert history == {"type": "history", "messages": [], "has_more": False}


async def test_history_after_resumes_with_at_most_500(make_client):
    client = await make_client(rate_limit=0)
    sockets = [(await open_room(client, "pt_1", user_id))[0] for user_id in ("t1", "m1") * 3]
    ids = await send_many(sockets, 510, "r")
    assert len(ids) == 510

    _, _, history = await open_room(client, "pt_1", "m1", after=0)
    assert [m["id"] for m in history["messages"]] == ids[:500]
    assert history["has_more"] is True
    _, _, history = await open_room(client, "pt_1", "m1", after=ids[8])
    assert [m["id"] for m in history["messages"]] == ids[9:509]
    assert history["has_more"] is True
    _, _, history = await open_room(client, "pt_1", "m1", after=ids[9])
    assert [m["id"] for m in history["messages"]] == ids[10:]
    assert history["has_more"] is False
    _, _, history = await open_room(client, "pt_1", "m1", after=ids[-4])
    assert [m["id"] for m in history["messages"]] == ids[-3:]
    assert history["has_more"] is False


# --------------------------------------------------------------- chat ---


async def test_chat_is_stored_broadcast_and_acked(client):
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    await send_chat(ws_m1, "  hello coach \n", "c-1")
    own_frames = await frames_until(
        ws_m1, lambda f: f["type"] == "ack" and f["client_id"] == "c-1")
    chat = next(f for f in own_frames if f["type"] == "chat")
    ack = own_frames[-1]
    assert_message_frame(chat, type="chat", room_id="pt_1", user_id="m1",
                         sender_name="Member One", content="hello coach", client_id="c-1")
    assert {"client_id", "id", "created_at"} <= ack.keys()
    assert (ack["id"], ack["created_at"]) == (chat["id"], chat["created_at"])

    other = await receive_until(ws_t1, lambda f: f["type"] == "chat")
    assert other == chat
    assert await messages_over_http(client) == [chat]
    # the ack went to the sender only
    trainer_frames = await marker(ws_t1, "t-marker")
    assert not [f for f in trainer_frames if f["type"] == "ack" and f["client_id"] == "c-1"]


async def test_chat_reaches_the_senders_other_tabs_without_their_ack(client):
    tab_a, _, _ = await open_room(client, "pt_1", "m1")
    tab_b, _, _ = await open_room(client, "pt_1", "m1")
    await send_chat(tab_a, "from tab a", "tab-a")
    ack = await ack_of(tab_a, "tab-a")
    copy = await receive_until(tab_b, lambda f: f["type"] == "chat")
    assert (copy["id"], copy["client_id"], copy["content"]) == (ack["id"], "tab-a", "from tab a")
    frames = await marker(tab_b, "tab-b")
    assert not [f for f in frames if f["type"] == "ack" and f["client_id"] == "tab-a"]


async def test_ids_increase_with_every_stored_message(client):
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ids = []
    for number, ws in enumerate([ws_m1, ws_t1, ws_m1, ws_t1, ws_m1]):
        await send_chat(ws, f"n{number}", f"n{number}")
        ids.append((await ack_of(ws, f"n{number}"))["id"])
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [m["id"] for m in await messages_over_http(client)] == ids


async def test_content_limit_counts_unicode_code_points(make_client):
    client = await make_client(max_message_chars=5)
    ws, _, _ = await open_room(client, "pt_1", "m1")
    accepted = {"emoji": "😀👍🏋🔥💪", "korean": "안녕하세요", "trimmed": "  abcde \n "}
    for client_id, content in accepted.items():
        await send_chat(ws, content, client_id)
        await ack_of(ws, client_id)
    for client_id, content in {"emoji6": "😀👍🏋🔥💪😀", "korean6": "안녕하세요요",
                               "ascii6": "abcdef"}.items():
        await send_chat(ws, content, client_id)
        error = await next_error(ws)
        assert (error["code"], error["client_id"]) == ("too_long", client_id)
    assert [m["content"] for m in await messages_over_http(client)] == ["😀👍🏋🔥💪", "안녕하세요", "abcde"]
    await marker(ws, "still-open")


async def test_default_limit_is_2000_characters(client):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    await send_chat(ws, "가" * 2000, "max")
    await ack_of(ws, "max")
    await send_chat(ws, "가" * 2001, "over")
    error = await next_error(ws)
    assert (error["code"], error["client_id"]) == ("too_long", "over")
    assert [len(m["content"]) for m in await messages_over_http(client)] == [2000]


@pytest.mark.parametrize("content", ["", " ", "  \n\t  ", "\u3000"])
async def test_empty_content_is_refused(client, content):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    await send_chat(ws, content, "e1")
    error = await next_error(ws)
    assert (error["code"], error["client_id"]) == ("empty", "e1")
    await marker(ws, "after")
    assert [m["client_id"] for m in await messages_over_http(client)] == ["after"]


@pytest.mark.parametrize("raw", [
    '{"type":"chat","content":"\\ud800","client_id":"x"}',
    '{"type":"chat","content":"a\\udc00b","client_id":"x"}',
    '{"type":"chat","content":"a\\u0000b","client_id":"x"}',
    '{"type":"chat","content":"\\u0000","client_id":"x"}',
    '{"type":"chat","content":5,"client_id":"x"}',
    '{"type":"chat","content":null,"client_id":"x"}',
    '{"type":"chat","content":["hi"],"client_id":"x"}',
    '{"type":"chat","client_id":"x"}',
], ids=["lone-high-surrogate", "lone-low-surrogate", "nul-inside", "nul-only", "number",
        "null", "list", "missing"])
async def test_bad_content_is_invalid_message(client, raw):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    await ws.send_str(raw)
    error = await next_error(ws)
    assert (error["code"], error["client_id"]) == ("invalid_message", "x")
    await marker(ws, "after")
    assert [m["client_id"] for m in await messages_over_http(client)] == ["after"]


@pytest.mark.parametrize("client_id", [None, "", "x" * 65, 17, ["a"], {"a": 1}, True, "MISSING"],
                         ids=["null", "empty", "65-chars", "number", "list", "object", "bool",
                              "missing"])
async def test_bad_client_id_is_invalid_message(client, client_id):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    frame = {"type": "chat", "content": "hi"}
    if client_id != "MISSING":
        frame["client_id"] = client_id
    await ws.send_json(frame)
    assert (await next_error(ws))["code"] == "invalid_message"
    await marker(ws, "after")
    assert [m["client_id"] for m in await messages_over_http(client)] == ["after"]


async def test_client_id_of_64_characters_is_accepted(client):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    client_id = "한" * 64
    await send_chat(ws, "hi", client_id)
    assert (await ack_of(ws, client_id))["client_id"] == client_id
    assert [m["client_id"] for m in await messages_over_http(client)] == [client_id]


async def test_repeated_client_id_is_acked_with_the_first_id_and_not_stored_again(client):
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    await send_chat(ws_m1, "first", "dup")
    first = await ack_of(ws_m1, "dup")
    await send_chat(ws_m1, "second", "dup")
    frames = await frames_until(ws_m1, lambda f: f["type"] == "ack" and f["client_id"] == "dup")
    assert [f["type"] for f in frames] == ["ack"]  # not broadcast again
    assert (frames[0]["id"], frames[0]["created_at"]) == (first["id"], first["created_at"])
    # another tab of the same user resending it gets the same answer
    tab_b, _, _ = await open_room(client, "pt_1", "m1")
    await send_chat(tab_b, "third", "dup")
    assert (await ack_of(tab_b, "dup"))["id"] == first["id"]

    trainer_frames = await marker(ws_t1, "t-marker")
    assert [f["client_id"] for f in trainer_frames if f["type"] == "chat"] == ["dup", "t-marker"]
    assert [(m["client_id"], m["content"]) for m in await messages_over_http(client)] == [
        ("dup", "first"), ("t-marker", "ok")]


async def test_same_client_id_from_another_user_or_room_is_a_new_message(client):
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_t1_room2, _, _ = await open_room(client, "pt_2", "t1")
    ids = set()
    for ws in (ws_m1, ws_t1, ws_t1_room2):
        await send_chat(ws, "same id", "shared")
        ids.add((await ack_of(ws, "shared"))["id"])
    assert len(ids) == 3
    assert len(await messages_over_http(client, "pt_1")) == 2
    assert len(await messages_over_http(client, "pt_2")) == 1


@pytest.mark.parametrize("extra", [{"room_id": "pt_2"}, {"user_id": "t1"},
                                   {"room_id": "pt_1", "user_id": "m2"}])
async def test_room_or_user_id_mismatch_is_forbidden(client, extra):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    await send_chat(ws, "sneaky", "s1", **extra)
    assert (await next_error(ws))["code"] == "forbidden"
    await ws.send_json({"type": "read", "message_id": 1, **extra})
    assert (await next_error(ws))["code"] == "forbidden"
    await marker(ws, "after")
    assert [m["client_id"] for m in await messages_over_http(client)] == ["after"]


async def test_matching_room_and_user_id_are_accepted(client):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    await send_chat(ws, "fine", "ok", room_id="pt_1", user_id="m1")
    await ack_of(ws, "ok")
    assert [m["client_id"] for m in await messages_over_http(client)] == ["ok"]


# ------------------------------------------------------------- spread ---


async def add_fourth_room(settings) -> None:
    """m4 and pt_4 (trainer t1), through the management CLI of the running server."""
    result = await cli(settings, "add-user", "--role", "member", "--name", "Member Four",
                       "--id", "m4")
    assert result.returncode == 0, result.stderr
    result = await cli(settings, "add-session", "--trainer", "t1", "--member", "m4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pt_4"


async def test_spread_goes_to_every_active_room_of_the_trainer(client, settings):
    await add_fourth_room(settings)
    assert (await cli(settings, "end-session", "pt_2")).returncode == 0
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    ws_m4, _, _ = await open_room(client, "pt_4", "m4")
    ws_m3, _, _ = await open_room(client, "pt_3", "m3")

    await ws_t1.send_json({"type": "spread", "content": " closed on Saturday ", "client_id": "sp"})
    frames = await frames_until(ws_t1, lambda f: f["type"] == "ack" and f["client_id"] == "sp")
    ack = frames[-1]
    own = next(f for f in frames if f["type"] == "spread")
    assert ack["rooms"] == 2
    assert ack["id"] == own["id"]
    expected = dict(type="spread", user_id="t1", sender_name="Coach One",
                    content="closed on Saturday", client_id="sp")
    assert_message_frame(own, room_id="pt_1", **expected)
    assert_message_frame(await receive_until(ws_m1, lambda f: f["type"] == "spread"),
                         room_id="pt_1", id=ack["id"], **expected)
    in_room_4 = await receive_until(ws_m4, lambda f: f["type"] == "spread")
    assert_message_frame(in_room_4, room_id="pt_4", **expected)

    assert [m["id"] for m in await messages_over_http(client, "pt_1")] == [ack["id"]]
    assert [m["id"] for m in await messages_over_http(client, "pt_4")] == [in_room_4["id"]]
    assert await messages_over_http(client, "pt_2") == []
    assert await messages_over_http(client, "pt_3") == []
    # t2's member never hears of it
    assert [f["type"] for f in await marker(ws_m3, "m3")] == ["chat", "ack"]


async def test_repeated_spread_client_id_is_acked_once_stored(client):
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    await ws_t1.send_json({"type": "spread", "content": "one", "client_id": "sp"})
    first = await ack_of(ws_t1, "sp")
    await ws_t1.send_json({"type": "spread", "content": "one", "client_id": "sp"})
    again = await ack_of(ws_t1, "sp")
    assert (again["id"], again["rooms"]) == (first["id"], first["rooms"]) == (first["id"], 2)
    assert len(await messages_over_http(client, "pt_1")) == 1
    assert len(await messages_over_http(client, "pt_2")) == 1


async def test_spread_by_a_member_is_forbidden(client):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    await ws.send_json({"type": "spread", "content": "everyone!", "client_id": "sp"})
    error = await next_error(ws)
    assert (error["code"], error["client_id"]) == ("forbidden", "sp")
    await marker(ws, "after")
    assert [m["type"] for m in await messages_over_http(client)] == ["chat"]


@pytest.mark.parametrize("content, code", [("", "empty"), ("x" * 2001, "too_long"),
                                           ("a\u0000", "invalid_message"), (7, "invalid_message")])
async def test_bad_spread_content_is_refused(client, content, code):
    ws, _, _ = await open_room(client, "pt_1", "t1")
    await ws.send_json({"type": "spread", "content": content, "client_id": "sp"})
    assert (await next_error(ws))["code"] == code
    await marker(ws, "after")
    assert [m["client_id"] for m in await messages_over_http(client, "pt_1")] == ["after"]
    assert await messages_over_http(client, "pt_2") == []


async def test_ended_room_refuses_sends_and_accepts_reads(client, settings):
    ws_t1, _, _ = await open_room(client, "pt_2", "t1")
    await send_chat(ws_t1, "before the end", "before")
    last_id = (await ack_of(ws_t1, "before"))["id"]
    assert (await cli(settings, "end-session", "pt_2")).returncode == 0

    ws_m2, _, history = await open_room(client, "pt_2", "m2")
    assert [m["id"] for m in history["messages"]] == [last_id]
    await send_chat(ws_m2, "too late", "late")
    error = await next_error(ws_m2)
    assert (error["code"], error["client_id"]) == ("room_closed", "late")
    await ws_t1.send_json({"type": "spread", "content": "all", "client_id": "sp"})
    error = await next_error(ws_t1)
    assert (error["code"], error["client_id"]) == ("room_closed", "sp")

    await ws_m2.send_json({"type": "read", "message_id": last_id})
    read = await receive_until(ws_m2, lambda f: f["type"] == "read")
    assert read == {"type": "read", "room_id": "pt_2", "user_id": "m2", "message_id": last_id}
    assert [m["id"] for m in await messages_over_http(client, "pt_2")] == [last_id]
    assert await messages_over_http(client, "pt_1") == []  # the refused spread went nowhere


# --------------------------------------------------------------- read ---


async def test_read_marks_up_to_n_and_reaches_the_room(client):
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_m1, welcome, _ = await open_room(client, "pt_1", "m1")
    assert {p["user_id"]: p["last_read_id"] for p in welcome["participants"]} == {"t1": 0, "m1": 0}
    ids = []
    for number in range(3):
        await send_chat(ws_t1, f"m{number}", f"r{number}")
        ids.append((await ack_of(ws_t1, f"r{number}"))["id"])

    await ws_m1.send_json({"type": "read", "message_id": ids[1]})
    expected = {"type": "read", "room_id": "pt_1", "user_id": "m1", "message_id": ids[1]}
    assert await receive_until(ws_t1, lambda f: f["type"] == "read") == expected
    assert await receive_until(ws_m1, lambda f: f["type"] == "read") == expected

    # never moves back
    await ws_m1.send_json({"type": "read", "message_id": ids[0]})
    frames = await marker(ws_m1, "m-marker")
    assert [f for f in frames if f["type"] == "read"] == []
    _, welcome, _ = await open_room(client, "pt_1", "m1")
    assert {p["user_id"]: p["last_read_id"] for p in welcome["participants"]} == {
        "t1": 0, "m1": ids[1]}


@pytest.mark.parametrize("past_last", [10**6, 2**63 - 1, 10**30])
async def test_read_past_the_last_is_the_last(client, past_last):
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    await send_chat(ws_t1, "only", "only")
    last_id = (await ack_of(ws_t1, "only"))["id"]
    await ws_m1.send_json({"type": "read", "message_id": past_last})
    read = await receive_until(ws_t1, lambda f: f["type"] == "read")
    assert read["message_id"] == last_id
    _, welcome, _ = await open_room(client, "pt_1", "m1")
    assert {p["user_id"]: p["last_read_id"] for p in welcome["participants"]}["m1"] == last_id


@pytest.mark.parametrize("message_id", [0, -1, "5", 1.5, True, None, [3], {"id": 3}, "MISSING"],
                         ids=["zero", "negative", "string", "float", "true", "null", "list",
                              "object", "missing"])
async def test_read_needs_a_positive_integer(client, message_id):
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    await send_chat(ws_t1, "hi", "hi")
    await ack_of(ws_t1, "hi")
    frame = {"type": "read"}
    if message_id != "MISSING":
        frame["message_id"] = message_id
    await ws_m1.send_json(frame)
    assert (await next_error(ws_m1))["code"] == "invalid_message"
    frames = await marker(ws_m1, "after")
    assert [f for f in frames if f["type"] == "read"] == []
    _, welcome, _ = await open_room(client, "pt_1", "m1")
    assert {p["user_id"]: p["last_read_id"] for p in welcome["participants"]}["m1"] == 0


# ------------------------------------------------------------- typing ---


async def test_typing_is_relayed_to_the_other_user_not_the_sender(client):
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    await ws_m1.send_json({"type": "typing"})
    typing = await receive_until(ws_t1, lambda f: f["type"] == "typing")
    assert typing == {"type": "typing", "room_id": "pt_1", "user_id": "m1"}
    frames = await marker(ws_m1, "after")
    assert [f for f in frames if f["type"] == "typing"] == []
    assert [m["client_id"] for m in await messages_over_http(client)] == ["after"]


async def test_typing_right_after_a_message_is_relayed(client):
    """A message ends a bout of typing: the next keystroke is news, not spam."""
    ws_t1, _, _ = await open_room(client, "pt_1", "t1")
    ws_m1, _, _ = await open_room(client, "pt_1", "m1")
    await ws_m1.send_json({"type": "typing"})
    await receive_until(ws_t1, lambda f: f["type"] == "typing")
    await marker(ws_m1, "sent")
    await ws_m1.send_json({"type": "typing"})
    frames = await marker(ws_t1, "trainer-marker")  # everything queued for t1 so far
    assert [f["type"] for f in frames if f["type"] in ("typing", "chat")] == ["chat", "typing", "chat"]


async def test_resuming_while_another_user_sends_gets_every_message_once_in_order(make_client):
    """A message committed while the history is read must not also arrive live."""
    client = await make_client(rate_limit=0)
    sender, _, _ = await open_room(client, "pt_1", "t1")
    sending = asyncio.Event()
    sending.set()

    async def keep_sending():
        number = 0
        while sending.is_set() and number < 5000:
            await send_chat(sender, f"m{number}", f"c{number}")
            await ack_of(sender, f"c{number}")
            number += 1

    sender_task = asyncio.create_task(keep_sending())
    received: list[int] = []
    try:
        for _ in range(30):
            ws, _, history = await open_room(client, "pt_1", "m1", after=received[-1] if received else 0)
            received += [message["id"] for message in history["messages"]]
            live = 0
            while live < 10:
                frame = await ws.receive_json(timeout=5)
                if frame["type"] == "chat":
                    received.append(frame["id"])
                    live += 1
            await ws.close()
    finally:
        sending.clear()
        await sender_task
    stored_ids = [message["id"] for message in await messages_over_http(client)]
    assert received == sorted(set(received)), "a message arrived twice or out of order"
    assert received == [i for i in stored_ids if i <= received[-1]], "a message was missed"


async def test_a_history_frame_over_64_kib_arrives_whole(make_client):
    """Every frame length form of the wire: short acks, mid-size messages, and a
    history frame of about 240 KB (40 messages of 2,000 three-byte characters)."""
    client = await make_client(rate_limit=0)
    sender, _, _ = await open_room(client, "pt_1", "t1")
    contents = [f"{number:02}" + "운" * 1998 for number in range(40)]
    for number, content in enumerate(contents):
        await send_chat(sender, content, f"long-{number}")
        await ack_of(sender, f"long-{number}")
    ws, _, history = await open_room(client, "pt_1", "m1")
    assert [message["content"] for message in history["messages"]] == contents
    await marker(ws, "still-framed")  # the frames after it still parse


async def test_pipelined_chats_from_one_socket_keep_their_order(make_client):
    """A client may send many messages without waiting for acks (they share
    commits): its acks, and the copies every socket in the room gets, come in
    the order it sent them, ids rising, each stored once."""
    client = await make_client(rate_limit=0)
    sender, _, _ = await open_room(client, "pt_1", "m1")
    trainer, _, _ = await open_room(client, "pt_1", "t1")
    count = 200
    for number in range(count):
        await sender.send_json({"type": "chat", "content": f"set {number}", "client_id": f"p{number}"})
    acks, own_copies = [], []
    while len(acks) < count or len(own_copies) < count:
        frame = await sender.receive_json(timeout=10)
        if frame["type"] == "ack":
            acks.append(frame)
        elif frame["type"] == "chat":
            own_copies.append(frame)
    delivered = [await receive_until(trainer, lambda f: f["type"] == "chat") for _ in range(count)]
    sent_order = [f"p{number}" for number in range(count)]
    assert [ack["client_id"] for ack in acks] == sent_order
    assert [frame["client_id"] for frame in own_copies] == sent_order
    assert [frame["client_id"] for frame in delivered] == sent_order
    ids = [ack["id"] for ack in acks]
    assert ids == sorted(set(ids))
    assert [frame["id"] for frame in delivered] == ids
    stored = await messages_over_http(client)
    assert [(m["id"], m["client_id"]) for m in stored] == list(zip(ids, sent_order))
    await sender.close()
    await trainer.close()
