"""HTTP (SPEC section 4): room list, message pages, pages, static files and errors."""
from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from yarl import URL

import distributor_chat as dc
from conftest import (ROOT, PageParser, auth, make_settings, make_token, open_room, receive_until,
                      run_cli, seed_gym, wait_until)

ROOMS = "/distributor/chat/rooms"
JSON = {"Accept": "application/json"}
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
ROOM_FIELDS = {"id", "member_name", "trainer_name", "last_activity", "last_message",
               "unread_count", "status"}
MESSAGE_FIELDS = {"type", "id", "room_id", "user_id", "sender_name", "content", "created_at",
                  "client_id", "photo"}
_client_ids = itertools.count(1)


# ----------------------------------------------------------- helpers ---


async def send(ws, content: str, kind: str = "chat") -> dict:
    """Send a chat/spread frame; its ack (the message is then committed)."""
    client_id = f"c{next(_client_ids)}"
    await ws.send_json({"type": kind, "content": content, "client_id": client_id})
    return await receive_until(ws, lambda f: f["type"] == "ack" and f["client_id"] == client_id)


async def send_many(ws, count: int) -> list[int]:
    """``count`` chat messages pipelined; their ids in send order."""
    client_ids = [f"bulk{next(_client_ids)}" for _ in range(count)]
    for number, client_id in enumerate(client_ids):
        await ws.send_json({"type": "chat", "content": f"message {number}", "client_id": client_id})
    acks = {}
    while len(acks) < count:
        ack = await receive_until(ws, lambda f: f["type"] == "ack", timeout_s=30)
        acks[ack["client_id"]] = ack["id"]
    return [acks[client_id] for client_id in client_ids]


async def read_up_to(ws, user_id: str, message_id: int) -> dict:
    """Mark read; the read receipt the server broadcasts once it is stored."""
    await ws.send_json({"type": "read", "message_id": message_id})
    return await receive_until(ws, lambda f: f["type"] == "read" and f["user_id"] == user_id)


async def after_clock_passes(created_at: str) -> None:
    """Until the server clock is past ``created_at``, so the next message is newer."""
    await wait_until(lambda: dc.utc_now_iso() > created_at)


async def room_list(client, user_id: str) -> dict[str, dict]:
    response = await client.get(ROOMS, headers={**JSON, **auth(user_id)})
    assert response.status == 200, await response.text()
    return {room["id"]: room for room in (await response.json())["chat_rooms"]}


async def unread(client, user_id: str, room_id: str) -> int:
    return (await room_list(client, user_id))[room_id]["unread_count"]


async def page(client, room_id: str = "pt_1", user_id: str = "m1", **query) -> tuple[list[int], bool]:
    response = await client.get(f"{ROOMS}/{room_id}/messages", params=query, headers=auth(user_id))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"messages", "has_more"}
    return [message["id"] for message in body["messages"]], body["has_more"]


def local_minute(iso_utc: str, zone) -> str:
    return datetime.fromisoformat(iso_utc.replace("Z", "+00:00")).astimezone(zone).strftime(
        "%Y-%m-%d %H:%M")


def assert_error_shape(body: dict) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def raw_request(client, request: bytes) -> bytes:
    """Bytes on a fresh TCP connection; everything answered until the server closes."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    answer = b""
    try:
        async with asyncio.timeout(5):
            try:
                writer.write(request)
                await writer.drain()
            except ConnectionError:
                pass  # the server may answer and close before taking every byte
            while chunk := await reader.read(65536):
                answer += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    return answer


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert match, answer[:200]
    return int(match.group(1))


# ---------------------------------------------------------- healthz ---


async def test_healthz_answers_ok(client):
    response = await client.get("/distributor/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


# ------------------------------------------------------------ static ---


@pytest.mark.parametrize("path, content_type", [("js/distributor_chat.js", "javascript"),
                                                ("css/distributor_chat.css", "text/css")])
async def test_static_files_are_served_under_distributor_static(client, path, content_type):
    response = await client.get(f"/distributor/static/{path}")
    assert response.status == 200
    assert content_type in response.content_type
    assert await response.read() == (ROOT / "static" / path).read_bytes()


@pytest.mark.parametrize("target", [
    "/distributor/static/../distributor_chat.py", "/distributor/static/../../distributor_chat.py",
    "/distributor/static/%2e%2e/distributor_chat.py", "/distributor/static/..%2fdistributor_chat.py",
    "/distributor/static/js/../../distributor_chat.py", "/distributor/static/%2e%2e%2fschema.sql",
    "/distributor/static//etc/passwd", "/distributor/static/..\\distributor_chat.py",
])
async def test_static_never_serves_files_outside_static(client, target):
    answer = await raw_request(client, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                       .encode())
    assert status_of(answer) in (400, 403, 404)
    assert b"create_app" not in answer and b"CREATE TABLE" not in answer and b"root:" not in answer


# ----------------------------------------------------------- errors ---


@pytest.mark.parametrize("path", ["/distributor/nope", f"{ROOMS}/pt_1", f"{ROOMS}/pt_1/messages/1",
                                  "/nope", "/distributor/static/nope.js", "/distributor/chat/room"])
async def test_an_unknown_path_is_404_in_the_error_shape(client, path):
    response = await client.get(path, headers={**JSON, **auth("t1")})
    assert response.status == 404
    assert_error_shape(await response.json())


async def test_an_unknown_path_shows_browsers_an_html_404(client):
    response = await client.get("/distributor/nope", headers=BROWSER)
    assert response.status == 404
    assert response.content_type == "text/html"


METHOD_MISMATCHES = [("POST", ROOMS), ("PUT", ROOMS), ("DELETE", ROOMS), ("POST", f"{ROOMS}/pt_1/messages"),
                     ("DELETE", f"{ROOMS}/pt_1/messages"), ("POST", "/distributor/healthz"),
                     ("GET", "/distributor/logout"), ("PUT", "/distributor/login"),
                     ("POST", "/distributor/chat"), ("PATCH", "/distributor/chat"),
                     ("POST", "/distributor/static/js/distributor_chat.js")]


@pytest.mark.parametrize("method, path", METHOD_MISMATCHES)
async def test_a_wrong_method_is_405_in_the_error_shape(client, method, path):
    response = await client.request(method, path, headers={**JSON, **auth("t1")})
    assert response.status == 405
    assert_error_shape(await response.json())


async def test_a_wrong_method_shows_browsers_an_html_405(client):
    response = await client.post(ROOMS, headers={**BROWSER, **auth("t1")})
    assert response.status == 405
    assert response.content_type == "text/html"


BIG = 64 * 1024


@pytest.mark.parametrize("method, path", [("POST", "/distributor/logout"), ("GET", ROOMS),
                                          ("GET", f"{ROOMS}/pt_1/messages"), ("POST", ROOMS)])
async def test_a_body_over_64_kib_is_413(client, method, path):
    response = await client.request(method, path, data=b"x" * (BIG + 1), headers={**JSON, **auth("t1")})
    assert response.status == 413
    assert_error_shape(await response.json())


async def test_a_body_over_64_kib_shows_browsers_an_html_413(client):
    response = await client.post("/distributor/logout", data=b"x" * (BIG + 1), headers=BROWSER)
    assert response.status == 413
    assert response.content_type == "text/html"


async def test_a_chunked_body_over_64_kib_is_413(client):
    async def chunks():
        for _ in range(5):
            yield b"x" * (BIG // 4)

    response = await client.post("/distributor/logout", data=chunks(), headers={**JSON, **auth("t1")})
    assert response.status == 413


async def test_a_body_of_exactly_64_kib_is_accepted(client):
    response = await client.post("/distributor/logout", data=b"x" * BIG, headers=JSON)
    assert response.status == 200


MALFORMED = [
    "/distributor/chat/rooms?%", "/distributor/chat/rooms?a=%zz&%%%", "/distributor/chat/rooms?format=%00",
    "/distributor/chat/rooms?token=%00", "/distributor/chat/rooms?token=%ff%fe",
    "/distributor/chat/rooms?user_id=%00", "/distributor/chat/rooms?format=json&user_id=%ed%a0%80",
    "/distributor/chat?room_id=%00", "/distributor/chat?room_id=%ff", "/distributor/chat?room_id=",
    "/distributor/chat?room_id=pt_1&room_id=pt_2", "/distributor/chat?room_id=%ED%95%9C%EA%B8%80",
    "/distributor/chat/rooms/%ff/messages", "/distributor/chat/rooms/%00/messages",
    "/distributor/chat/rooms/pt_%F0%9F%92%A9/messages", "/distributor/chat/rooms/pt_1/messages?before=%00",
    "/distributor/chat/rooms/pt_1/messages?limit=%ef%bc%91", "/distributor/chat/rooms/pt_1/messages?after=%ff",
    "/distributor/chat/rooms/pt_1/messages?before=1&before=2", "/distributor/%00", "/distributor/%ff",
    "/distributor/static/%00", "/distributor/static/%ff", "/distributor/static/",
    "/distributor/login?token=%00&next=%00", "/distributor/login?token=a.b.c%ff",
    "/distributor/ws/chat/pt_1", "/distributor/ws/chat/%00", "/distributor/ws/chat/pt_1?after=%ff",
    "/distributor/chat/rooms?" + "a=1&" * 1500,
]


@pytest.mark.parametrize("target", MALFORMED, ids=lambda value: value[:60])
@pytest.mark.parametrize("headers", [JSON, BROWSER], ids=["json", "browser"])
async def test_a_malformed_request_never_answers_500_or_a_traceback(client, target, headers):
    response = await client.get(URL(target, encoded=True), headers={**headers, **auth("m1")},
                                allow_redirects=False)
    assert response.status < 500
    assert "Traceback" not in await response.text(errors="replace")


@pytest.mark.parametrize("next_path", ["/distributor/채팅", "/distributor/\u2028x", "/distributor/%ff",
                                       "/distributor/\udcff", "/distributor/" + "x" * 6000])
async def test_login_with_a_strange_next_never_answers_500(client, next_path):
    response = await client.get("/distributor/login", params={"token": make_token("m1"), "next": next_path},
                                allow_redirects=False)
    assert response.status in (303, 400, 414)
    assert "Traceback" not in await response.text(errors="replace")


H = b"Host: x\r\nConnection: close\r\n"
RAW_REQUESTS = {
    "NUL in query": b"GET /distributor/chat/rooms?token=\x00 HTTP/1.1\r\n" + H + b"\r\n",
    "binary bearer": b"GET /distributor/chat/rooms HTTP/1.1\r\n" + H + b"Authorization: Bearer \xff\xfe\x00\r\n\r\n",
    "binary cookie": b"GET /distributor/chat/rooms HTTP/1.1\r\n" + H + b"Cookie: distributor_token=\xff; =;;;\r\n\r\n",
    "binary accept": b"GET /distributor/chat/rooms HTTP/1.1\r\n" + H + b"Accept: \xff\xfe\r\n\r\n",
    "huge header": b"GET /distributor/chat/rooms HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n",
    "many headers": b"GET /distributor/chat/rooms HTTP/1.1\r\n" + H + b"X-Many: 1\r\n" * 500 + b"\r\n",
    "huge query": b"GET /distributor/chat/rooms?" + b"a" * 20000 + b" HTTP/1.1\r\n" + H + b"\r\n",
    "negative length": b"GET /distributor/chat/rooms HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
    "junk length": b"GET /distributor/chat/rooms HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n",
    "absurd length": b"POST /distributor/logout HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999\r\n\r\n",
    "utf-8 path": b"GET /distributor/chat/\xed\x95\x9c HTTP/1.1\r\n" + H + b"\r\n",
    "latin-1 path": b"GET /distributor/chat/rooms/pt_\xff/messages HTTP/1.1\r\n" + H + b"\r\n",
    "HTTP/9.9": b"GET /distributor/chat/rooms HTTP/9.9\r\n" + H + b"\r\n",
    "garbage": b"GARBAGE\r\n\r\n",
    "TLS hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40,
}


@pytest.mark.parametrize("request_bytes", RAW_REQUESTS.values(), ids=RAW_REQUESTS.keys())
async def test_a_malformed_raw_request_never_answers_500_or_a_traceback(client, request_bytes):
    answer = await raw_request(client, request_bytes)
    if answer:  # closing the connection without an answer is not a 500 either
        assert status_of(answer) < 500
    assert b"Traceback" not in answer


# --------------------------------------------------------- room list ---


@pytest.mark.parametrize("headers, query, is_json", [
    (JSON, "", True), ({}, "?format=json", True), (BROWSER, "?format=json", True),
    ({"Accept": "application/json; charset=utf-8"}, "", True),
    ({}, "", False), (BROWSER, "", False), ({"Accept": "*/*"}, "", False),
    ({"Accept": "text/html"}, "", False),
])
async def test_the_room_list_is_json_only_when_asked_for(client, headers, query, is_json):
    response = await client.get(ROOMS + query, headers={**headers, **auth("t1")})
    assert response.status == 200
    if is_json:
        assert response.content_type == "application/json"
        assert set((await response.json())["chat_rooms"][0]) == ROOM_FIELDS
    else:
        assert response.content_type == "text/html"
        page = await response.text()
        assert "Member One" in page and "Member Two" in page


async def test_the_room_list_json_has_the_specified_fields_and_values(client):
    member, _, _ = await open_room(client, "pt_1", "m1")
    ack = await send(member, "  see you at 7  ")
    rooms = await room_list(client, "t1")
    assert rooms["pt_1"] == {"id": "pt_1", "member_name": "Member One", "trainer_name": "Coach One",
                             "last_activity": local_minute(ack["created_at"], None),
                             "last_message": "see you at 7", "unread_count": 1, "status": "active"}
    assert rooms["pt_2"]["last_message"] is None
    assert rooms["pt_2"]["unread_count"] == 0
    for room in rooms.values():
        assert set(room) == ROOM_FIELDS
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", room["last_activity"])
    assert (await room_list(client, "m1"))["pt_1"]["unread_count"] == 0
    await member.close()


async def test_the_room_list_puts_the_newest_activity_first(client):
    first, _, _ = await open_room(client, "pt_1", "m1")
    ack = await send(first, "one")
    assert list(await room_list(client, "t1")) == ["pt_1", "pt_2"]
    await after_clock_passes(ack["created_at"])
    second, _, _ = await open_room(client, "pt_2", "m2")
    ack = await send(second, "two")
    assert list(await room_list(client, "t1")) == ["pt_2", "pt_1"]
    await after_clock_passes(ack["created_at"])
    await send(first, "three")
    assert list(await room_list(client, "t1")) == ["pt_1", "pt_2"]
    await first.close()
    await second.close()


@pytest.mark.parametrize("zone", ["Asia/Seoul", "UTC", "America/New_York", "Asia/Kolkata"])
async def test_last_activity_is_the_newest_message_time_in_the_configured_zone(make_client, zone):
    client = await make_client(tz=ZoneInfo(zone))
    ws, _, _ = await open_room(client, "pt_1", "m1")
    ack = await send(ws, "hello")
    assert (await room_list(client, "t1"))["pt_1"]["last_activity"] == local_minute(
        ack["created_at"], ZoneInfo(zone))
    await ws.close()


async def test_the_same_message_shows_nine_hours_apart_in_seoul_and_utc(make_client, aiohttp_client,
                                                                        tmp_path):
    seoul = await make_client(tz=ZoneInfo("Asia/Seoul"))
    utc = await aiohttp_client(dc.create_app(make_settings(tmp_path, tz=ZoneInfo("UTC"))))
    ws, _, _ = await open_room(seoul, "pt_1", "m1")
    await send(ws, "hello")
    shown = [datetime.strptime((await room_list(app, "t1"))["pt_1"]["last_activity"], "%Y-%m-%d %H:%M")
             for app in (seoul, utc)]
    assert shown[0] - shown[1] == timedelta(hours=9)
    await ws.close()


async def test_last_activity_of_an_empty_room_is_the_sessions_creation(make_client, tmp_path):
    client = await make_client(tz=ZoneInfo("Asia/Seoul"))
    with sqlite3.connect(tmp_path / "chat.db") as db:
        created_at = db.execute("SELECT created_at FROM pt_sessions WHERE id = 2").fetchone()[0]
    assert (await room_list(client, "m2"))["pt_2"]["last_activity"] == local_minute(
        created_at, ZoneInfo("Asia/Seoul"))


async def test_an_ended_session_shows_as_ended_in_the_room_list(client, settings):
    result = run_cli("end-session", "pt_1", db_path=settings.db_path)
    assert result.returncode == 0, result.stderr
    rooms = await room_list(client, "t1")
    assert (rooms["pt_1"]["status"], rooms["pt_2"]["status"]) == ("ended", "active")
    assert (await room_list(client, "m1"))["pt_1"]["status"] == "ended"
    assert (await client.get(f"{ROOMS}/pt_1/messages", headers=auth("m1"))).status == 200


async def test_unread_count_is_others_messages_after_the_last_read(client):
    member, _, _ = await open_room(client, "pt_1", "m1")
    first = await send(member, "one")
    await send(member, "two")
    assert (await unread(client, "t1", "pt_1"), await unread(client, "m1", "pt_1")) == (2, 0)
    trainer, _, _ = await open_room(client, "pt_1", "t1")
    reply = await send(trainer, "reply")
    assert (await unread(client, "t1", "pt_1"), await unread(client, "m1", "pt_1")) == (2, 1)
    assert (await read_up_to(trainer, "t1", first["id"]))["message_id"] == first["id"]
    assert await unread(client, "t1", "pt_1") == 1
    assert (await read_up_to(trainer, "t1", 10**12))["message_id"] == reply["id"]
    assert await unread(client, "t1", "pt_1") == 0
    await read_up_to(member, "m1", reply["id"])
    assert await unread(client, "m1", "pt_1") == 0
    assert await unread(client, "t1", "pt_2") == 0
    await member.close()
    await trainer.close()


async def test_unread_count_never_rises_when_a_read_moves_back(client):
    member, _, _ = await open_room(client, "pt_1", "m1")
    first = await send(member, "one")
    second = await send(member, "two")
    trainer, _, _ = await open_room(client, "pt_1", "t1")
    await read_up_to(trainer, "t1", second["id"])
    await trainer.send_json({"type": "read", "message_id": first["id"]})
    await send(trainer, "after the backwards read")  # frames are handled in order
    assert await unread(client, "t1", "pt_1") == 0
    await member.close()
    await trainer.close()


async def test_a_spread_counts_as_unread_in_each_of_the_trainers_rooms(client):
    trainer, _, _ = await open_room(client, "pt_1", "t1")
    ack = await send(trainer, "Gym closed on Saturday", kind="spread")
    assert ack["rooms"] == 2
    assert await unread(client, "m1", "pt_1") == 1
    assert await unread(client, "m2", "pt_2") == 1
    assert await unread(client, "m3", "pt_3") == 0
    t1_rooms = await room_list(client, "t1")
    assert [t1_rooms[room]["unread_count"] for room in ("pt_1", "pt_2")] == [0, 0]
    assert [t1_rooms[room]["last_message"] for room in ("pt_1", "pt_2")] == ["Gym closed on Saturday"] * 2
    await trainer.close()


# ---------------------------------------------------------- messages ---


async def test_messages_have_the_live_frames_fields_ascending_by_id(client):
    member, _, _ = await open_room(client, "pt_1", "m1")
    trainer, _, _ = await open_room(client, "pt_1", "t1")
    observer, _, _ = await open_room(client, "pt_1", "m1")  # another tab: only listens
    for text in ("first", "second", "third"):
        await send(member, text)
    await send(trainer, "announcement", kind="spread")
    live = [await receive_until(observer, lambda f: f["type"] in ("chat", "spread")) for _ in range(4)]
    response = await client.get(f"{ROOMS}/pt_1/messages", headers=auth("m1"))
    body = await response.json()
    assert body == {"messages": live, "has_more": False}
    assert [m["content"] for m in body["messages"]] == ["first", "second", "third", "announcement"]
    assert [m["type"] for m in body["messages"]] == ["chat", "chat", "chat", "spread"]
    ids = [m["id"] for m in body["messages"]]
    assert ids == sorted(set(ids))
    assert all(set(m) == MESSAGE_FIELDS for m in body["messages"])
    assert (await page(client, "pt_1", "t1"))[0] == ids
    for ws in (member, trainer, observer):
        await ws.close()


async def test_an_empty_room_has_no_messages(client):
    assert await page(client, "pt_2", "m2") == ([], False)


@pytest.fixture
async def seven(make_client):
    """A client without a rate limit and seven messages in pt_1 (plus one in pt_2)."""
    client = await make_client(rate_limit=0)
    member, _, _ = await open_room(client, "pt_1", "m1")
    other, _, _ = await open_room(client, "pt_2", "m2")
    ids = await send_many(member, 4)
    await send(other, "another room")
    ids += await send_many(member, 3)
    yield client, ids
    await member.close()
    await other.close()


async def test_messages_without_before_or_after_are_the_newest_page(seven):
    client, ids = seven
    assert await page(client, limit=3) == (ids[-3:], True)
    assert await page(client, limit=7) == (ids, False)
    assert await page(client) == (ids, False)


async def test_messages_before_an_id_are_the_newest_older_ones(seven):
    client, ids = seven
    assert await page(client, before=ids[5], limit=2) == (ids[3:5], True)
    assert await page(client, before=ids[2], limit=2) == (ids[0:2], False)
    assert await page(client, before=ids[1], limit=5) == (ids[:1], False)
    assert await page(client, before=ids[0]) == ([], False)


async def test_messages_after_an_id_are_the_oldest_newer_ones(seven):
    client, ids = seven
    assert await page(client, after=0, limit=3) == (ids[:3], True)
    assert await page(client, after=ids[0], limit=2) == (ids[1:3], True)
    assert await page(client, after=ids[4], limit=2) == (ids[5:7], False)
    assert await page(client, after=ids[-1]) == ([], False)


async def test_messages_default_to_50_and_take_at_most_100(make_client):
    client = await make_client(rate_limit=0)
    member, _, _ = await open_room(client, "pt_1", "m1")
    ids = await send_many(member, 101)
    assert await page(client) == (ids[-50:], True)
    assert await page(client, limit=100) == (ids[-100:], True)
    assert await page(client, limit=1) == (ids[-1:], True)
    assert await page(client, after=0, limit=100) == (ids[:100], True)
    assert await page(client, before=ids[-1], limit=100) == (ids[:100], False)
    await member.close()


@pytest.mark.parametrize("query", [
    {"before": "5", "after": "1"}, {"before": "1", "after": "1"}, {"before": "0", "after": "0"},
    {"before": "-1"}, {"before": "abc"}, {"before": "1.5"}, {"before": "0x10"}, {"before": "1e3"},
    {"before": ""}, {"before": " 1"}, {"before": "+1"}, {"before": "１"}, {"before": "²"},
    {"before": "9" * 40}, {"before": "1" + "0" * 19}, {"after": "-1"}, {"after": "abc"},
    {"after": "1.5"}, {"after": "0x10"}, {"after": "9" * 40}, {"after": "NaN"},
    {"limit": "0"}, {"limit": "101"}, {"limit": "-1"}, {"limit": "abc"}, {"limit": "1.5"},
    {"limit": ""}, {"limit": "0x10"}, {"limit": "1e2"}, {"limit": "1000000"}, {"limit": "9" * 40},
])
async def test_a_bad_page_parameter_is_400(client, query):
    response = await client.get(f"{ROOMS}/pt_1/messages", params=query, headers=auth("m1"))
    assert response.status == 400
    assert_error_shape(await response.json())


# ------------------------------------------------------------- pages ---


async def test_the_chat_page_is_html_with_the_rooms_messages(client):
    member, _, _ = await open_room(client, "pt_1", "m1")
    await send(member, "stored before the page loads")
    response = await client.get("/distributor/chat", params={"room_id": "pt_1"},
                                headers={**BROWSER, **auth("t1")})
    assert response.status == 200
    assert response.content_type == "text/html"
    page_html = await response.text()
    assert "stored before the page loads" in page_html and "Member One" in page_html
    await member.close()


@pytest.mark.parametrize("headers", [JSON, BROWSER], ids=["json", "browser"])
async def test_the_chat_page_without_a_room_id_is_400(client, headers):
    response = await client.get("/distributor/chat", headers={**headers, **auth("t1")})
    assert response.status == 400
    if headers is JSON:
        assert_error_shape(await response.json())
    else:
        assert response.content_type == "text/html"


@pytest.mark.parametrize("path, user_id", [
    (ROOMS, "t1"), ("/distributor/chat?room_id=pt_1", "t1"), (ROOMS, None),
    ("/distributor/chat?room_id=pt_3", "t1"), ("/distributor/chat?room_id=pt_999", "t1"),
    ("/distributor/nope", None),
], ids=["rooms", "chat", "401", "403", "404", "unknown path"])
async def test_html_pages_carry_security_headers(client, path, user_id):
    response = await client.get(path, headers={**BROWSER, **(auth(user_id) if user_id else {})})
    assert response.content_type == "text/html"
    headers = response.headers
    assert headers["X-Content-Type-Options"] == "nosniff"
    # Scripts from this origin only (Vue's runtime compiler needs eval), no inline
    # script or style, connections to this host only, never framed.
    host = f"{client.server.host}:{client.server.port}"
    assert headers["Content-Security-Policy"] == (
        "default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self'; "
        f"img-src 'self' data:; connect-src 'self' ws://{host}; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'")
    assert headers["X-Frame-Options"] == "DENY"
    # Not no-referrer: under it browsers send "Origin: null" with our own forms.
    assert headers["Referrer-Policy"] == "same-origin"


XSS_NAME = "<img src=x onerror=alert(1)> {{ 7*7 }} </script><script>alert(3)</script>"
XSS_TEXT = "<img src=x onerror=alert(2)> {{ 7*7 }} <script>alert(4)</script> ' \" &amp;"


def assert_rendered_as_text(html: str, *texts: str) -> None:
    parsed = PageParser(html)
    assert not [tag for tag, _ in parsed.tags if tag == "img"], "user text became an <img>"
    assert not [attrs for _, attrs in parsed.tags if any(name.startswith("on") for name in attrs)]
    scripts = [attrs for tag, attrs in parsed.tags if tag == "script"]
    assert all("src" in attrs or attrs.get("type") == "application/json" for attrs in scripts), scripts
    assert not [body for body in parsed.scripts if "<" in body], "raw markup inside a script"
    visible = "".join(parsed.text)
    for text in texts:
        assert text in visible, (text, visible)


async def test_user_text_is_escaped_in_the_room_list_and_chat_page(client, settings):
    seed_gym(settings, users=(("m9", XSS_NAME, "member"),), sessions=((9, "t1", "m9"),))
    member, _, _ = await open_room(client, "pt_9", "m9")
    await send(member, XSS_TEXT)
    for user_id, path, texts in [
        ("t1", ROOMS, (XSS_NAME, XSS_TEXT)),
        ("t1", "/distributor/chat?room_id=pt_9", (XSS_NAME, XSS_TEXT)),
        ("m9", ROOMS, (XSS_NAME, XSS_TEXT)),
        ("m9", "/distributor/chat?room_id=pt_9", (XSS_NAME, XSS_TEXT)),
    ]:
        response = await client.get(path, headers={**BROWSER, **auth(user_id)})
        assert response.status == 200, (user_id, path)
        assert_rendered_as_text(await response.text(), *texts)
    await member.close()
