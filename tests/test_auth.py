"""Identity and access (SPEC section 3): tokens, sign-in, who may reach which room."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from urllib.parse import quote

import aiohttp
import jwt
import pytest

from conftest import SECRET, auth, make_token, open_room, receive_until

ROOMS = "/distributor/chat/rooms"
JSON = {"Accept": "application/json"}
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, key: bytes | None = None, digest=hashlib.sha256) -> str:
    """A JWT assembled by hand, so the header can say anything."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = b64url(hmac.new(key, signing_input.encode(), digest).digest()) if key else ""
    return f"{signing_input}.{signature}"


def claims_of(user_id: str = "m1", role: str = "member", ttl_s: float = 3600, **extra) -> dict:
    return {"sub": user_id, "role": role, "exp": int(time.time() + ttl_s), **extra}


def signed(claims: dict) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def without(claims: dict, key: str) -> dict:
    return {name: value for name, value in claims.items() if name != key}


def tampered_sub() -> str:
    """m1's valid token with the payload swapped for t1's (signature kept)."""
    header, _, signature = make_token("m1").split(".")
    payload = b64url(json.dumps(claims_of("t1", "trainer")).encode())
    return f"{header}.{payload}.{signature}"


KEY = SECRET.encode()
REFUSED_TOKENS = {
    "alg none": lambda: forge({"alg": "none", "typ": "JWT"}, claims_of()),
    "alg None": lambda: forge({"alg": "None", "typ": "JWT"}, claims_of()),
    "alg none with a signature": lambda: forge({"alg": "none"}, claims_of(), KEY),
    "HS512 with the right key": lambda: forge({"alg": "HS512"}, claims_of(), KEY, hashlib.sha512),
    "HS384 with the right key": lambda: forge({"alg": "HS384"}, claims_of(), KEY, hashlib.sha384),
    "HS256 with another key": lambda: make_token("m1", secret="another-secret-0123456789abcdef0123"),
    "RS256 header, HMAC body": lambda: forge({"alg": "RS256", "typ": "JWT"}, claims_of(), KEY),
    "ES256 header, HMAC body": lambda: forge({"alg": "ES256", "typ": "JWT"}, claims_of(), KEY),
    "lower-case hs256": lambda: forge({"alg": "hs256", "typ": "JWT"}, claims_of(), KEY),
    "HS256 header, HS512 signature": lambda: forge({"alg": "HS256"}, claims_of(), KEY, hashlib.sha512),
    "empty signature": lambda: forge({"alg": "HS256", "typ": "JWT"}, claims_of()),
    "tampered payload": tampered_sub,
    "expired": lambda: signed(claims_of(ttl_s=-60)),
    "missing exp": lambda: signed(without(claims_of(), "exp")),
    "exp as a string": lambda: signed({**claims_of(), "exp": str(int(time.time()) + 3600)}),
    "exp null": lambda: signed({**claims_of(), "exp": None}),
    "missing sub": lambda: signed(without(claims_of(), "sub")),
    "sub a number": lambda: signed({**claims_of(), "sub": 1}),
    "sub a list": lambda: signed({**claims_of(), "sub": ["m1"]}),
    "missing role": lambda: signed(without(claims_of(), "role")),
    "role not stored (member as trainer)": lambda: signed(claims_of("m1", "trainer")),
    "role not stored (trainer as member)": lambda: signed(claims_of("t1", "member")),
    "unknown role": lambda: signed(claims_of("m1", "admin")),
    "unknown user": lambda: signed(claims_of("ghost", "member")),
    "empty sub": lambda: signed(claims_of("", "member")),
    "not a JWT": lambda: "not-a-token",
    "three junk parts": lambda: "a.b.c",
    "JSON instead of a JWT": lambda: json.dumps(claims_of()),
}


def assert_error_shape(body: dict) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def room_ids(response) -> list[str]:
    assert response.status == 200, await response.text()
    return sorted(room["id"] for room in (await response.json())["chat_rooms"])


# ------------------------------------------------------------ tokens ---


@pytest.mark.parametrize("source", ["bearer", "cookie", "query"])
async def test_a_valid_token_is_accepted_from_each_source(client, source):
    token = make_token("m2")
    headers, path = dict(JSON), ROOMS
    if source == "bearer":
        headers["Authorization"] = f"Bearer {token}"
    elif source == "cookie":
        headers["Cookie"] = f"distributor_token={token}"
    else:
        path += f"?token={token}"
    assert await room_ids(await client.get(path, headers=headers)) == ["pt_2"]


async def test_token_sources_are_read_in_order_bearer_cookie_query(client):
    bearer, cookie, query = make_token("m1"), make_token("t2"), make_token("m2")
    all_three = {**JSON, "Authorization": f"Bearer {bearer}", "Cookie": f"distributor_token={cookie}"}
    assert await room_ids(await client.get(f"{ROOMS}?token={query}", headers=all_three)) == ["pt_1"]
    cookie_and_query = {**JSON, "Cookie": f"distributor_token={cookie}"}
    assert await room_ids(await client.get(f"{ROOMS}?token={query}", headers=cookie_and_query)) == ["pt_3"]


@pytest.mark.parametrize("make_bad_token", REFUSED_TOKENS.values(), ids=REFUSED_TOKENS.keys())
async def test_a_bad_token_is_refused_with_401(client, make_bad_token):
    headers = {**JSON, "Authorization": f"Bearer {make_bad_token()}"}
    response = await client.get(ROOMS, headers=headers)
    assert response.status == 401
    assert_error_shape(await response.json())


@pytest.mark.parametrize("case", ["alg none", "expired", "HS256 with another key", "unknown user"])
@pytest.mark.parametrize("source", ["cookie", "query"])
async def test_a_bad_token_is_refused_from_cookie_and_query_too(client, case, source):
    token = REFUSED_TOKENS[case]()
    if source == "cookie":
        response = await client.get(ROOMS, headers={**JSON, "Cookie": f"distributor_token={token}"})
    else:
        response = await client.get(f"{ROOMS}?token={quote(token, safe='')}", headers=JSON)
    assert response.status == 401
    assert_error_shape(await response.json())


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer "}, {"Authorization": "Basic dTpw"}],
                         ids=["none", "empty bearer", "basic auth"])
@pytest.mark.parametrize("path", [ROOMS, f"{ROOMS}/pt_1/messages", "/distributor/chat?room_id=pt_1"])
async def test_no_token_is_401_json_for_json_callers(client, path, headers):
    response = await client.get(path, headers={**JSON, **headers})
    assert response.status == 401
    assert_error_shape(await response.json())


@pytest.mark.parametrize("path", [ROOMS, "/distributor/chat?room_id=pt_1",
                                  f"/distributor/login?token={quote(REFUSED_TOKENS['expired'](), safe='')}"])
async def test_no_token_shows_browsers_an_html_page_explaining_sign_in(client, path):
    response = await client.get(path, headers=BROWSER)
    assert response.status == 401
    assert response.content_type == "text/html"
    page = await response.text()
    assert "<html" in page.lower()
    assert any(hint in page.lower() for hint in ("sign in", "sign-in", "로그인")), page
    assert "Traceback" not in page


# ----------------------------------------------------------- sign-in ---


@pytest.mark.parametrize("next_path", ["/distributor/chat?room_id=pt_1", "/distributor/chat/rooms",
                                       "/distributor/chat/rooms?format=json"])
async def test_login_redirects_to_a_next_path_under_distributor(client, next_path):
    response = await client.get("/distributor/login", allow_redirects=False,
                                params={"token": make_token("m1"), "next": next_path})
    assert response.status == 303
    assert response.headers["Location"] == next_path


async def test_login_without_next_goes_to_the_room_list(client):
    response = await client.get("/distributor/login", allow_redirects=False,
                                params={"token": make_token("m1")})
    assert response.status == 303
    assert response.headers["Location"] == ROOMS


@pytest.mark.parametrize("next_path", [
    "https://evil.example", "https://evil.example/distributor/chat", "//evil.example",
    "//evil.example/distributor/", "///evil.example", "/\\evil.example", "\\\\evil.example",
    "/distributor/../x", "/distributor/./../x", "/distributor/%2e%2e/x", "/distributor/%2E%2E/x",
    "/distributor/.%2e/x", "javascript:alert(1)", "JavaScript:alert(1)//distributor/",
    "data:text/html,<script>alert(1)</script>", "/distributor", "/distributorx/chat", "/other",
    "distributor/chat", "http:/distributor/chat", "/distributor/\r\nSet-Cookie: a=b",
    "/distributor/\tx", "", "http://[::1", "//[x", "/distributor/\x7f",
])
async def test_login_never_redirects_outside_distributor(client, next_path):
    response = await client.get("/distributor/login", allow_redirects=False,
                                params={"token": make_token("m1"), "next": next_path})
    assert response.status == 303
    assert response.headers["Location"] == ROOMS


async def test_login_follows_a_korean_next_path_percent_encoded(client):
    response = await client.get("/distributor/login", allow_redirects=False,
                                params={"token": make_token("m1"), "next": "/distributor/chat?q=운동"})
    assert response.status == 303
    assert response.headers["Location"] == "/distributor/chat?q=%EC%9A%B4%EB%8F%99"


async def test_login_sets_an_httponly_lax_cookie_scoped_to_distributor(client):
    token = make_token("m1")
    response = await client.get("/distributor/login", allow_redirects=False, params={"token": token})
    assert response.status == 303
    cookies = [value for value in response.headers.getall("Set-Cookie")
               if value.startswith("distributor_token=")]
    assert len(cookies) == 1
    attributes = [part.strip() for part in cookies[0].split(";")]
    assert attributes[0] == f"distributor_token={token}"
    lowered = [attribute.lower() for attribute in attributes[1:]]
    assert "httponly" in lowered
    assert "samesite=lax" in lowered
    assert "path=/distributor" in lowered


async def test_after_login_the_cookie_signs_the_browser_in(client):
    response = await client.get("/distributor/login", allow_redirects=False,
                                params={"token": make_token("t2")})
    assert response.status == 303
    assert await room_ids(await client.get(ROOMS, headers=JSON)) == ["pt_3"]


@pytest.mark.parametrize("token", [None, "", "garbage", "expired", "unknown user", "alg none"])
async def test_login_with_a_bad_token_is_401_and_sets_no_cookie(client, token):
    params = {"next": ROOMS}
    if token is not None:
        params["token"] = REFUSED_TOKENS[token]() if token in REFUSED_TOKENS else token
    response = await client.get("/distributor/login", allow_redirects=False, params=params)
    assert response.status == 401
    assert "distributor_token" not in response.headers.get("Set-Cookie", "")
    assert (await client.get(ROOMS, headers=JSON)).status == 401


async def test_logout_clears_the_cookie(client):
    await client.get("/distributor/login", allow_redirects=False, params={"token": make_token("m1")})
    assert (await client.get(ROOMS, headers=JSON)).status == 200
    response = await client.post("/distributor/logout", allow_redirects=False)
    assert response.status in (200, 303)
    cleared = [value for value in response.headers.getall("Set-Cookie")
               if value.startswith("distributor_token=")]
    assert len(cleared) == 1
    lowered = cleared[0].lower()
    assert "path=/distributor" in lowered
    assert "max-age=0" in lowered or "expires=thu, 01 jan 1970" in lowered
    assert (await client.get(ROOMS, headers=JSON)).status == 401


async def test_logout_by_get_is_405(client):
    response = await client.get("/distributor/logout", headers=JSON)
    assert response.status == 405
    assert_error_shape(await response.json())


# ------------------------------------------------------------ access ---

ACCESS = [  # (user, room, status)
    ("t1", "pt_1", 200), ("t1", "pt_2", 200), ("t1", "pt_3", 403),
    ("t2", "pt_3", 200), ("t2", "pt_1", 403), ("t2", "pt_2", 403),
    ("m1", "pt_1", 200), ("m1", "pt_2", 403), ("m1", "pt_3", 403),
    ("m2", "pt_2", 200), ("m2", "pt_1", 403), ("m3", "pt_3", 200), ("m3", "pt_2", 403),
]


@pytest.mark.parametrize("user_id, room_id, status", ACCESS)
async def test_only_the_sessions_trainer_and_member_read_its_messages(client, user_id, room_id, status):
    response = await client.get(f"{ROOMS}/{room_id}/messages", headers=auth(user_id))
    assert response.status == status
    if status == 403:
        assert_error_shape(await response.json())


@pytest.mark.parametrize("user_id, room_id, status", ACCESS)
async def test_only_the_sessions_trainer_and_member_open_its_chat_page(client, user_id, room_id, status):
    response = await client.get("/distributor/chat", params={"room_id": room_id},
                                headers={**BROWSER, **auth(user_id)})
    assert response.status == status
    assert response.content_type == "text/html"


@pytest.mark.parametrize("user_id, rooms", [("t1", ["pt_1", "pt_2"]), ("t2", ["pt_3"]),
                                            ("m1", ["pt_1"]), ("m2", ["pt_2"]), ("m3", ["pt_3"])])
async def test_the_room_list_holds_only_the_callers_rooms(client, user_id, rooms):
    assert await room_ids(await client.get(ROOMS, headers={**JSON, **auth(user_id)})) == rooms


@pytest.mark.parametrize("path", [ROOMS + "?format=json", f"{ROOMS}/pt_1/messages",
                                  "/distributor/chat?room_id=pt_1"])
@pytest.mark.parametrize("claimed", ["t1", "m2", "M1", "m1 ", ""])
async def test_a_user_id_query_that_is_not_the_tokens_sub_is_403(client, path, claimed):
    response = await client.get(path, params={"user_id": claimed}, headers={**JSON, **auth("m1")})
    assert response.status == 403
    assert_error_shape(await response.json())


@pytest.mark.parametrize("path", [ROOMS + "?format=json", f"{ROOMS}/pt_1/messages",
                                  "/distributor/chat?room_id=pt_1"])
async def test_a_user_id_query_equal_to_the_tokens_sub_is_allowed(client, path):
    response = await client.get(path, params={"user_id": "m1"}, headers=auth("m1"))
    assert response.status == 200


BAD_ROOM_IDS = ["pt_", "pt_abc", "PT_1", "Pt_1", "pt_01", "pt_0", "pt_1x", "pt_-1", "pt_+1", "pt_1.0",
                "pt_ 1", " pt_1", "pt_1 ", "pt_1\n", "pt_１", "pt__1", "room1", "1", "pt1",
                "pt_1' OR '1'='1", "pt_1; DROP TABLE messages;--", "pt_1%00", "pt_1\x00",
                "pt_" + "9" * 30, "pt_" + "1" * 5000, "x" * 5000, "pt_999"]


@pytest.mark.parametrize("room_id", BAD_ROOM_IDS, ids=lambda value: repr(value)[:40])
async def test_a_room_id_that_is_not_pt_digits_or_unknown_is_404(client, room_id):
    path = f"{ROOMS}/{quote(room_id, safe='')}/messages"
    response = await client.get(path, headers=auth("t1"))
    assert response.status == 404, await response.text()
    assert_error_shape(await response.json())
    page = await client.get("/distributor/chat", params={"room_id": room_id}, headers=auth("t1"))
    assert page.status == 404


# --------------------------------------------------------- WebSocket ---


async def handshake_close_code(client, path: str, headers: dict | None = None) -> int:
    ws = await client.ws_connect(path, headers=headers or {})
    message = await ws.receive(timeout=5)
    assert message.type == aiohttp.WSMsgType.CLOSE, message
    return message.data


@pytest.mark.parametrize("case", [None, "alg none", "expired", "HS512 with the right key",
                                  "role not stored (member as trainer)", "unknown user"])
async def test_a_socket_without_a_valid_token_is_closed_4401(client, case):
    headers = {"Authorization": f"Bearer {REFUSED_TOKENS[case]()}"} if case else {}
    assert await handshake_close_code(client, "/distributor/ws/chat/pt_1", headers) == 4401


@pytest.mark.parametrize("user_id, room_id", [("m1", "pt_2"), ("t2", "pt_1"), ("t1", "pt_3")])
async def test_a_socket_to_a_room_that_is_not_yours_is_closed_4403(client, user_id, room_id):
    assert await handshake_close_code(client, f"/distributor/ws/chat/{room_id}", auth(user_id)) == 4403


async def test_a_socket_with_a_user_id_query_that_is_not_the_tokens_sub_is_closed_4403(client):
    assert await handshake_close_code(client, "/distributor/ws/chat/pt_1?user_id=t1", auth("m1")) == 4403


@pytest.mark.parametrize("room_id", ["pt_", "pt_abc", "PT_1", "pt_01", "pt_1x", "room1", "pt_999",
                                     "pt_" + "9" * 30])
async def test_a_socket_to_a_room_that_does_not_exist_is_closed_4404(client, room_id):
    assert await handshake_close_code(client, f"/distributor/ws/chat/{room_id}", auth("t1")) == 4404


@pytest.mark.parametrize("source", ["query", "cookie"])
async def test_a_socket_takes_its_token_from_the_query_or_the_cookie(client, source):
    token = make_token("m1")
    path, headers = "/distributor/ws/chat/pt_1", {}
    if source == "query":
        path += f"?token={token}"
    else:
        headers["Cookie"] = f"distributor_token={token}"
    ws = await client.ws_connect(path, headers=headers)
    welcome = await ws.receive_json(timeout=5)
    assert (welcome["type"], welcome["user_id"], welcome["role"]) == ("welcome", "m1", "member")
    await ws.close()


@pytest.mark.parametrize("field, value", [("user_id", "t1"), ("room_id", "pt_2")])
async def test_a_frame_claiming_another_user_or_room_gets_forbidden_and_the_socket_stays(
        client, field, value):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    await ws.send_json({"type": "chat", "content": "spoof", "client_id": "c1", field: value})
    error = await receive_until(ws, lambda frame: frame["type"] == "error")
    assert error["code"] == "forbidden"
    await ws.send_json({"type": "chat", "content": "honest", "client_id": "c2"})
    ack = await receive_until(ws, lambda frame: frame["type"] == "ack")
    assert ack["client_id"] == "c2"
    messages = (await (await client.get(f"{ROOMS}/pt_1/messages", headers=auth("m1"))).json())["messages"]
    assert [message["content"] for message in messages] == ["honest"]
    await ws.close()


async def test_names_come_from_the_database_not_the_token(client):
    token = make_token("m1", name="Impostor Admin")
    ws, welcome, _ = await open_room(client, "pt_1", "m1", token=token)
    assert {p["user_id"]: p["name"] for p in welcome["participants"]} == {
        "t1": "Coach One", "m1": "Member One"}
    await ws.send_json({"type": "chat", "content": "hello", "client_id": "c1"})
    frame = await receive_until(ws, lambda frame: frame["type"] == "chat")
    assert frame["sender_name"] == "Member One"
    page = await (await client.get(ROOMS, headers={"Authorization": f"Bearer {token}"})).text()
    assert "Member One" in page and "Impostor" not in page
    await ws.close()
