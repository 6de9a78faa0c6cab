"""Web Push (SPEC 10): subscriptions, who gets a push, what it holds, how a push
service's answers are handled, and that no subscription can point the server
at an address inside the gym's network. A push service stand-in on 127.0.0.1
does what a real one does: it checks the VAPID signature and decrypts the body
with the subscription's private key (the browser's side of RFC 8291)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from dataclasses import dataclass, field

import aiohttp
import http_ece
import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from PIL import Image

import distributor_chat as dc
from conftest import ack_of, auth, open_room, seed_gym, send_chat, wait_until

KEY_PATH = "/distributor/push/key"
SUBSCRIPTIONS = "/distributor/push/subscriptions"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Browser:
    """One browser's push subscription: the keys only it holds."""
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    auth_secret: bytes = field(default_factory=lambda: __import__("os").urandom(16))

    def to_json(self) -> dict:
        public = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        return {"endpoint": self.endpoint, "expirationTime": None,
                "keys": {"p256dh": b64url(public), "auth": b64url(self.auth_secret)}}


@dataclass
class Delivery:
    path: str
    headers: dict
    payload: dict
    jwt_claims: dict


class PushService:
    """The stand-in: verifies, decrypts, records, and answers as scripted."""

    def __init__(self) -> None:
        self.browsers: dict[str, Browser] = {}  # by path
        self.deliveries: list[Delivery] = []
        self.attempts: dict[str, int] = {}
        self.script: dict[str, list[int]] = {}  # path -> statuses to answer, in turn (then 201)
        self.server_public_key: str | None = None  # the chat server's VAPID key (base64url)
        self.problems: list[str] = []

    def browser(self, name: str) -> Browser:
        browser = Browser(f"{self.origin}/push/{name}")
        self.browsers[f"/push/{name}"] = browser
        return browser

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts[request.path] = self.attempts.get(request.path, 0) + 1
        try:
            delivery = self.check(request, await request.read())
        except AssertionError as problem:
            self.problems.append(f"{request.path}: {problem}")
            return web.Response(status=400)
        statuses = self.script.get(request.path, [])
        status = statuses.pop(0) if statuses else 201
        if status == 201:
            self.deliveries.append(delivery)
        return web.Response(status=status)

    def check(self, request: web.Request, body: bytes) -> Delivery:
        headers = request.headers
        assert headers.get("TTL") == "86400", headers.get("TTL")
        assert headers.get("Urgency") == "high", headers.get("Urgency")
        assert headers.get("Content-Encoding") == "aes128gcm"
        scheme, _, parameters = headers.get("Authorization", "").partition(" ")
        assert scheme == "vapid", headers.get("Authorization")
        values = dict(part.strip().split("=", 1) for part in parameters.split(","))
        assert values["k"] == self.server_public_key, "not the server's VAPID key"
        header_b64, claims_b64, signature_b64 = values["t"].split(".")
        assert json.loads(unb64url(header_b64)) == {"typ": "JWT", "alg": "ES256"}
        claims = json.loads(unb64url(claims_b64))
        assert claims["aud"] == self.origin, claims
        assert time.time() < claims["exp"] <= time.time() + 24 * 3600, claims
        signature = unb64url(signature_b64)
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(values["k"]))
        try:
            public_key.verify(encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                                   int.from_bytes(signature[32:], "big")),
                              f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise AssertionError("the VAPID signature does not verify") from None
        browser = self.browsers[request.path]
        plaintext = http_ece.decrypt(body, private_key=browser.private_key,
                                     auth_secret=browser.auth_secret, version="aes128gcm")
        return Delivery(request.path, dict(headers), json.loads(plaintext), claims)

    async def start(self, aiohttp_server) -> "PushService":
        app = web.Application()
        app.router.add_post("/push/{name}", self.handle)
        self.server = await aiohttp_server(app)
        self.origin = f"http://127.0.0.1:{self.server.port}"
        return self


@pytest.fixture
async def push_service(aiohttp_server):
    return await PushService().start(aiohttp_server)


@pytest.fixture
async def chat(make_client, push_service):
    """A chat server that admits the stand-in (--push-allow-host), retrying fast."""
    client = await make_client(push_allow_hosts=(f"127.0.0.1:{push_service.server.port}",),
                               push_contact="mailto:owner@gym.example", push_retry_first_s=0.1,
                               rate_limit=0)
    response = await client.get(KEY_PATH)
    push_service.server_public_key = (await response.json())["public_key"]
    return client


async def subscribe(client, user_id: str, browser: Browser, **headers):
    return await client.post(SUBSCRIPTIONS, data=json.dumps(browser.to_json()),
                             headers={**auth(user_id), "Content-Type": "application/json", **headers})


async def deliveries_to(push_service: PushService, path: str, count: int) -> list[Delivery]:
    await wait_until(lambda: len([d for d in push_service.deliveries if d.path == path]) >= count)
    assert push_service.problems == []
    return [d for d in push_service.deliveries if d.path == path]


async def test_the_public_key_is_an_uncompressed_p256_point_kept_across_restarts(
        settings, aiohttp_client):
    """Made once and kept in the database: subscriptions outlive a restart."""
    seed_gym(settings)
    first_server = await aiohttp_client(dc.create_app(settings))
    first = await (await first_server.get(KEY_PATH)).json()
    await first_server.close()
    key = unb64url(first["public_key"])
    assert len(key) == 65 and key[0] == 4
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key)  # a point on the curve
    restarted = await aiohttp_client(dc.create_app(settings))
    assert await (await restarted.get(KEY_PATH)).json() == first


async def test_a_member_away_from_the_room_gets_the_message_as_a_push(chat, push_service):
    phone = push_service.browser("member-phone")
    assert (await subscribe(chat, "m1", phone)).status == 201
    trainer, _, _ = await open_room(chat, "pt_1", "t1")
    await send_chat(trainer, "내일 7시 하체 운동입니다. " + "x" * 150, "t-1")
    ack = await ack_of(trainer, "t-1")
    [delivery] = await deliveries_to(push_service, "/push/member-phone", 1)
    assert delivery.payload == {"type": "message", "room_id": "pt_1", "message_id": ack["id"],
                                "sender_name": "Coach One",
                                "preview": ("내일 7시 하체 운동입니다. " + "x" * 150)[:100],
                                "unread_total": 1}
    assert delivery.headers["Topic"] == "pt_1"
    assert delivery.jwt_claims["sub"] == "mailto:owner@gym.example"
    # The member opens the room and reads: their devices are told the total is 0.
    member, _, _ = await open_room(chat, "pt_1", "m1")
    await member.send_json({"type": "read", "message_id": ack["id"]})
    deliveries = await deliveries_to(push_service, "/push/member-phone", 2)
    assert deliveries[1].payload == {"type": "read", "unread_total": 0}


async def test_a_photo_is_pushed_with_a_camera_for_its_preview_unless_it_has_a_caption(
        chat, push_service):
    await subscribe(chat, "m1", push_service.browser("photo-phone"))
    trainer, _, _ = await open_room(chat, "pt_1", "t1")
    photo = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo, "JPEG")
    expected = set()
    for number, caption in enumerate(("", "폼 체크해 보세요")):
        form = aiohttp.FormData()
        form.add_field("photo", photo.getvalue(), filename="form.jpg", content_type="image/jpeg")
        response = await chat.post("/distributor/chat/rooms/pt_1/photos", data=form,
                                   headers=auth("t1"))
        assert response.status == 201, await response.text()
        await send_chat(trainer, caption, f"photo-{number}",
                        photo_id=(await response.json())["photo_id"])
        ack = await ack_of(trainer, f"photo-{number}")
        expected.add((ack["id"], caption or "📷"))
    deliveries = await deliveries_to(push_service, "/push/photo-phone", 2)
    assert {(d.payload["message_id"], d.payload["preview"]) for d in deliveries} == expected
    assert {d.payload["sender_name"] for d in deliveries} == {"Coach One"}


async def test_no_push_for_someone_with_the_room_open_and_none_for_the_sender(chat, push_service):
    member_phone, trainer_phone = push_service.browser("m"), push_service.browser("t")
    await subscribe(chat, "m1", member_phone)
    await subscribe(chat, "t1", trainer_phone)
    member, _, _ = await open_room(chat, "pt_1", "m1")
    trainer, _, _ = await open_room(chat, "pt_1", "t1")
    await send_chat(trainer, "both here", "t-1")
    await ack_of(trainer, "t-1")
    await trainer.close()  # the trainer leaves; the member answers
    await send_chat(member, "on my way", "m-1")
    await ack_of(member, "m-1")
    [delivery] = await deliveries_to(push_service, "/push/t", 1)
    assert delivery.payload["preview"] == "on my way"
    assert push_service.attempts.get("/push/m") is None


async def test_a_spread_pushes_each_away_member_once(chat, push_service):
    phones = {user_id: push_service.browser(user_id) for user_id in ("m1", "m2")}
    for user_id, phone in phones.items():
        await subscribe(chat, user_id, phone)
    trainer, _, _ = await open_room(chat, "pt_1", "t1")
    await send_chat(trainer, "토요일 휴무", "s-1", frame_type="spread")
    ack = await ack_of(trainer, "s-1")
    assert ack["rooms"] == 2
    for user_id, room_id in (("m1", "pt_1"), ("m2", "pt_2")):
        [delivery] = await deliveries_to(push_service, f"/push/{user_id}", 1)
        assert (delivery.payload["room_id"], delivery.payload["preview"]) == (room_id, "토요일 휴무")


async def test_previews_can_be_hidden(make_client, push_service):
    client = await make_client(push_allow_hosts=(f"127.0.0.1:{push_service.server.port}",),
                               push_preview=False)
    push_service.server_public_key = (await (await client.get(KEY_PATH)).json())["public_key"]
    await subscribe(client, "m1", push_service.browser("p"))
    trainer, _, _ = await open_room(client, "pt_1", "t1")
    await send_chat(trainer, "private", "t-1")
    [delivery] = await deliveries_to(push_service, "/push/p", 1)
    assert delivery.payload["preview"] == ""


@pytest.mark.parametrize("status", [404, 410])
async def test_a_gone_subscription_is_deleted(chat, push_service, settings, status):
    push_service.script["/push/old"] = [status]
    await subscribe(chat, "m1", push_service.browser("old"))
    await subscribe(chat, "m1", push_service.browser("laptop"))
    trainer, _, _ = await open_room(chat, "pt_1", "t1")
    await send_chat(trainer, "hello", "t-1")
    await wait_until(lambda: subscription_count(settings) == 1)
    await send_chat(trainer, "again", "t-2")
    # Once the laptop has the second push, the sender has passed the old one by.
    deliveries = await deliveries_to(push_service, "/push/laptop", 2)
    assert [d.payload["preview"] for d in deliveries] == ["hello", "again"]
    assert push_service.attempts["/push/old"] == 1


def subscription_count(settings) -> int:
    import sqlite3
    with sqlite3.connect(settings.db_path) as db:
        return db.execute("SELECT count(*) FROM push_subscriptions").fetchone()[0]


@pytest.mark.parametrize("statuses", [[429], [500, 503]], ids=["429", "5xx twice"])
async def test_busy_or_failing_push_services_are_retried(chat, push_service, statuses):
    push_service.script["/push/busy"] = list(statuses)
    await subscribe(chat, "m1", push_service.browser("busy"))
    trainer, _, _ = await open_room(chat, "pt_1", "t1")
    await send_chat(trainer, "are you there?", "t-1")
    [delivery] = await deliveries_to(push_service, "/push/busy", 1)
    assert delivery.payload["preview"] == "are you there?"
    assert push_service.attempts["/push/busy"] == len(statuses) + 1


async def test_a_push_service_that_never_answers_delays_no_ack(make_client, aiohttp_server):
    """SPEC 10: pushes leave from their own queue; acks and broadcasts never wait on them."""
    reached, released = asyncio.Event(), asyncio.Event()

    async def never_answers(request):
        reached.set()
        await released.wait()
        return web.Response(status=201)

    stuck_app = web.Application()
    stuck_app.router.add_post("/push/{name}", never_answers)
    stuck = await aiohttp_server(stuck_app)
    client = await make_client(push_allow_hosts=(f"127.0.0.1:{stuck.port}",), rate_limit=0)
    assert (await subscribe(client, "m1", Browser(f"http://127.0.0.1:{stuck.port}/push/s"))).status == 201
    trainer, _, _ = await open_room(client, "pt_1", "t1")
    await send_chat(trainer, "first", "q-0")
    await ack_of(trainer, "q-0")
    await asyncio.wait_for(reached.wait(), 5)  # a push is now hanging on the service
    for number in range(1, 30):
        await send_chat(trainer, f"quick {number}", f"q-{number}")
        await ack_of(trainer, f"q-{number}", timeout_s=5)
    released.set()


@pytest.mark.parametrize("endpoint", [
    "http://127.0.0.1/push/x", "https://127.0.0.1/push/x", "https://10.0.0.1/push/x",
    "https://[::1]/push/x", "https://169.254.169.254/latest/meta-data", "https://localhost/push/x",
    "https://192.168.1.20/push", "https://[fe80::1]/push", "https://224.0.0.1/push",
    "https://0.0.0.0/push", "ftp://push.example/x", "https://user:pw@push.example/x",
    "https://[::ffff:10.0.0.1]/push", "https://[64:ff9b::a00:5]/push", "https://[2002:a00:5::1]/push",
    "https://[::a00:5]/push",
])
async def test_an_endpoint_inside_the_network_is_refused_at_subscribe(chat, push_service, settings,
                                                                      endpoint):
    """SPEC 10: the server never sends to loopback, private or link-local addresses."""
    response = await subscribe(chat, "m1", Browser(endpoint))
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "bad_request"
    assert subscription_count(settings) == 0


async def test_subscriptions_take_json_from_our_own_pages_and_the_signed_in_user(chat, push_service):
    browser = push_service.browser("x")
    assert (await subscribe(chat, "m1", browser, Origin="https://evil.example")).status == 403
    plain = await chat.post(SUBSCRIPTIONS, data=json.dumps(browser.to_json()),
                            headers={**auth("m1"), "Content-Type": "text/plain"})
    assert plain.status == 415
    anonymous = await chat.post(SUBSCRIPTIONS, data=json.dumps(browser.to_json()),
                                headers={"Content-Type": "application/json"})
    assert anonymous.status == 401
    bad_keys = {**browser.to_json(), "keys": {"p256dh": "AAAA", "auth": "AAAA"}}
    bad = await chat.post(SUBSCRIPTIONS, data=json.dumps(bad_keys),
                          headers={**auth("m1"), "Content-Type": "application/json"})
    assert bad.status == 400


async def test_at_most_10_subscriptions_a_user_the_oldest_goes(chat, push_service, settings):
    browsers = [push_service.browser(f"d{number}") for number in range(12)]
    for browser in browsers:
        assert (await subscribe(chat, "m1", browser)).status == 201
    import sqlite3
    with sqlite3.connect(settings.db_path) as db:
        endpoints = [row[0] for row in db.execute(
            "SELECT endpoint FROM push_subscriptions WHERE user_id = 'm1' ORDER BY id")]
    assert endpoints == [browser.endpoint for browser in browsers[2:]]


async def test_the_same_endpoint_again_replaces_its_row_also_for_another_user(chat, push_service,
                                                                             settings):
    shared_tablet = push_service.browser("tablet")
    assert (await subscribe(chat, "m1", shared_tablet)).status == 201
    assert (await subscribe(chat, "m2", shared_tablet)).status == 201
    import sqlite3
    with sqlite3.connect(settings.db_path) as db:
        assert db.execute("SELECT user_id FROM push_subscriptions").fetchall() == [("m2",)]
    # Unsubscribing: only one's own.
    other = await chat.delete(SUBSCRIPTIONS, data=json.dumps({"endpoint": shared_tablet.endpoint}),
                              headers={**auth("m1"), "Content-Type": "application/json"})
    assert other.status == 204
    assert subscription_count(settings) == 1
    own = await chat.delete(SUBSCRIPTIONS, data=json.dumps({"endpoint": shared_tablet.endpoint}),
                            headers={**auth("m2"), "Content-Type": "application/json"})
    assert own.status == 204
    assert subscription_count(settings) == 0


async def test_a_spread_to_300_away_members_gives_300_pushes_and_the_ack_does_not_wait(
        make_client, push_service):
    """The load check: every member of a busy trainer is away; one spread reaches
    each of their phones, and the trainer's ack does not wait for the pushes."""
    members = [(f"member{number}", f"Member {number}", "member") for number in range(300)]
    sessions = [(100 + number, "t1", user_id) for number, (user_id, _, _) in enumerate(members)]
    client = await make_client(push_allow_hosts=(f"127.0.0.1:{push_service.server.port}",),
                               rate_limit=0)

    seed_gym(client.server.app[dc.SETTINGS], users=members, sessions=sessions)
    push_service.server_public_key = (await (await client.get(KEY_PATH)).json())["public_key"]
    trainer, _, _ = await open_room(client, "pt_1", "t1")

    async def spread_ack_ms(client_id: str) -> float:
        started = time.perf_counter()
        await send_chat(trainer, f"이번 주 토요일 휴무 ({client_id})", client_id, frame_type="spread")
        ack = await ack_of(trainer, client_id, timeout_s=30)
        assert ack["rooms"] == 302  # pt_1, pt_2 and the 300
        return (time.perf_counter() - started) * 1000

    without_push_ms = [await spread_ack_ms(f"quiet-{number}") for number in range(3)]
    for user_id, _, _ in members:
        assert (await subscribe(client, user_id, push_service.browser(user_id))).status == 201
    started = time.perf_counter()
    with_push_ms = await spread_ack_ms("loud")
    # (The quiet spreads' pushes may still be on their way: they count apart.)
    def loud() -> list[Delivery]:
        return [d for d in push_service.deliveries if d.payload["preview"] == "이번 주 토요일 휴무 (loud)"]

    await wait_until(lambda: len(loud()) >= 300, timeout_s=60)
    delivered_s = time.perf_counter() - started
    assert push_service.problems == []
    assert sorted(d.path for d in loud()) == sorted(f"/push/{user_id}" for user_id, _, _ in members)
    print(f"\nspread to 302 rooms: trainer's ack {min(without_push_ms):.1f}–{max(without_push_ms):.1f} ms "
          f"without subscriptions, {with_push_ms:.1f} ms with 300; all 300 pushes delivered "
          f"(encrypted, signed, decrypted by the stand-in) in {delivered_s:.2f} s")


async def test_a_read_push_goes_only_where_a_notification_may_be_showing(chat, push_service):
    """SPEC 10: the read push clears other devices; with nothing shown, none is sent
    (a browser shows something for every push it gets)."""
    phone = push_service.browser("phone")
    await subscribe(chat, "m1", phone)
    trainer, _, _ = await open_room(chat, "pt_1", "t1")
    member, _, _ = await open_room(chat, "pt_1", "m1")
    await send_chat(trainer, "while you look", "t-1")
    seen = await ack_of(trainer, "t-1")
    await member.send_json({"type": "read", "message_id": seen["id"]})  # 1 -> 0, nothing shown
    await member.close()
    await send_chat(trainer, "now you are away", "t-2")
    [delivery] = await deliveries_to(push_service, "/push/phone", 1)
    assert delivery.payload["preview"] == "now you are away"  # the first push of all
