"""Operations (SPEC section 8): the JSON and text logs and the Prometheus metrics
of a real server process, driven by real clients over 127.0.0.1. The log is read
after the server stopped (SIGTERM), so every line it would write is there."""
from __future__ import annotations

import asyncio
import collections
import json
import re
import time
from datetime import datetime

import aiohttp
from aiohttp import WSMsgType
from prometheus_client.parser import text_string_to_metric_families

from conftest import ack_of, auth, make_token, next_error, receive_until, send_chat
from test_abuse import TINY_RCVBUF, Flooder, RawWebSocket, open_live, ws_url

LOGIN = "/distributor/login"
ROOMS = "/distributor/chat/rooms"
METRICS = "/distributor/metrics"
WS_PATH = "/distributor/ws/chat/{}"
UTF8 = {"PYTHONIOENCODING": "utf-8"}
SECRET_CONTENT = "secret-content-수업 7시"
FLOOD_CONTENT = "secret-flood-운동-" + "f" * 29_000  # ~30 KB a frame
LEVELS = {"debug", "info", "warning", "error"}
MIB = 1024 * 1024


# ------------------------------------------------------------ helpers ---


def json_log(output: str) -> list[dict]:
    """Every log line of a server's output, parsed. The server's own prints (its
    address, its capacity) do not start with "{"; every line that does must parse."""
    events = []
    for line in output.splitlines():
        if not line.startswith("{"):
            assert not line.lstrip().startswith("{"), f"a log line with a margin: {line!r}"
            continue
        event = json.loads(line)  # one object a line, nothing else
        assert isinstance(event, dict), line
        assert {"ts", "level", "event"} <= event.keys(), line
        assert event["level"] in LEVELS, line
        assert event["ts"].endswith("Z"), line
        when = datetime.fromisoformat(event["ts"])
        assert when.utcoffset().total_seconds() == 0, line
        assert abs(when.timestamp() - time.time()) < 600, line
        events.append(event)
    assert events, output
    return events


def only(events: list[dict], name: str, **fields) -> dict:
    """The one event called ``name`` with these field values; fails on none or two."""
    matching = [event for event in events if event["event"] == name
                and all(event.get(key) == value for key, value in fields.items())]
    assert len(matching) == 1, (name, fields, matching)
    return matching[0]


def assert_nothing_secret(output: str, tokens: list[str], contents: list[str]) -> None:
    """No token (nor its signature), cookie value or message text anywhere in the output."""
    for token in tokens:
        assert token not in output, "a token was logged"
        if token.count(".") == 2:
            assert token.rsplit(".", 1)[1] not in output, "a token's signature was logged"
    for content in contents:
        assert content not in output, f"message content was logged: {content[:40]!r}"


async def stop(server) -> int:
    """SIGTERM, awaited in a thread so the test's own sockets can answer the 1001 close."""
    return await asyncio.to_thread(server.stop)


async def read_until_closed(ws) -> int:
    """Read (answering pings and the close) until the server closes; the close code."""
    while True:
        message = await ws.receive(timeout=10)
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            return ws.close_code
        assert message.type is WSMsgType.TEXT, message


async def refused_close_code(http: aiohttp.ClientSession, server, room_id: str,
                             token: str) -> int:
    """A handshake with ``token`` in the query: upgraded, then closed at once; its code."""
    ws = await http.ws_connect(f"{ws_url(server, room_id)}?token={token}", heartbeat=None)
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.CLOSE, message
    await ws.close()
    return ws.close_code


async def rate_limit_burst(ws, count: int, prefix: str) -> collections.Counter:
    """``count`` chats sent at once; how many were acked and how many refused."""
    for number in range(count):
        await send_chat(ws, f"{SECRET_CONTENT} #{number}", f"{prefix}-{number}")
    outcomes: collections.Counter = collections.Counter()
    pending = {f"{prefix}-{number}" for number in range(count)}
    while pending:
        frame = await receive_until(ws, lambda f: f["type"] in ("ack", "error")
                                    and f.get("client_id") in pending)
        pending.discard(frame["client_id"])
        outcomes[frame["type"] if frame["type"] == "ack" else frame["code"]] += 1
    return outcomes


# ------------------------------------------------------------ JSON log ---


async def stall_a_reader_in_a_flood(server) -> tuple[int | None, str]:
    """m1 stops reading pt_1 while t1 floods it with ~30 KB chats, until the server
    closes m1's socket; the close code m1 read at last, and the token m1 used."""
    token = make_token("m1")
    stalled = await RawWebSocket.connect("127.0.0.1", server.port, WS_PATH.format("pt_1"),
                                         {"Authorization": f"Bearer {token}"},
                                         rcvbuf=TINY_RCVBUF)
    try:
        assert (await stalled.next_json())["type"] == "welcome"
        assert (await stalled.next_json())["type"] == "history"
        async with aiohttp.ClientSession() as http:
            trainer, _, _ = await open_live(http, server, "pt_1", "t1")
            deadline = time.monotonic() + 60
            round_number = 0
            while "slow_peer_closed" not in server.output():
                assert time.monotonic() < deadline, "the stalled reader was never closed"
                await Flooder(trainer, f"flood{round_number}", content=FLOOD_CONTENT).run(40)
                round_number += 1
            ending = await stalled.read_to_the_end(timeout_s=15)
            await trainer.close()
    finally:
        stalled.close()
    return ending.close_code, token


async def test_the_json_log_has_one_parsable_line_per_event_and_no_secrets(server_process,
                                                                            tmp_path):
    """Sign-in, chat, a refused token, rate limiting and a slow peer each log one JSON
    line with the SPEC's fields; no token, cookie or message text is ever logged."""
    server = server_process("--log-format", "json", "--log-level", "info", "--rate-limit", "1",
                            env=UTF8)
    m1_link_token, m1_token, t1_token = make_token("m1"), make_token("m1"), make_token("t1")
    expired_token = make_token("m2", ttl_s=-60)
    garbage_token = "garbage.token-that-is-no-jwt.x9Zq7Wv3"
    async with aiohttp.ClientSession() as http:
        # A sign-in link: 303 with the cookie.
        async with http.get(f"{server.base_url}{LOGIN}", params={"token": m1_link_token},
                            allow_redirects=False) as response:
            assert response.status == 303, await response.text()
            cookie_value = response.cookies["distributor_token"].value
        # An HTTP refusal with a token in the query.
        async with http.get(f"{server.base_url}{ROOMS}",
                            params={"format": "json", "token": garbage_token}) as response:
            assert response.status == 401

        # A chat in pt_1: t1 by header, m1 with its token in the query string.
        trainer = await http.ws_connect(ws_url(server, "pt_1"), heartbeat=None,
                                        headers={"Authorization": f"Bearer {t1_token}"})
        assert (await trainer.receive_json(timeout=5))["type"] == "welcome"
        assert (await trainer.receive_json(timeout=5))["type"] == "history"
        member = await http.ws_connect(f"{ws_url(server, 'pt_1')}?token={m1_token}",
                                       heartbeat=None)
        assert (await member.receive_json(timeout=5))["type"] == "welcome"
        assert (await member.receive_json(timeout=5))["type"] == "history"
        await send_chat(member, SECRET_CONTENT, "secret-1")
        await ack_of(member, "secret-1")
        got = await receive_until(trainer, lambda f: f["type"] == "chat")
        assert got["content"] == SECRET_CONTENT and got["user_id"] == "m1"

        # A refused token: an expired one, in the query string.
        assert await refused_close_code(http, server, "pt_2", expired_token) == 4401

        # Rate limiting: 10 chats at once against 1 a second, burst 4.
        outcomes = await rate_limit_burst(member, 10, "burst")
        assert outcomes["rate_limited"] >= 5 and outcomes["ack"] >= 1, outcomes
        assert outcomes["ack"] + outcomes["rate_limited"] == 10, outcomes

        # m1 leaves (1000); t1 stays until shutdown (1001).
        await member.close()
        assert member.close_code == 1000
        trainer_closed = asyncio.create_task(read_until_closed(trainer))
        assert await stop(server) == 0
        assert await asyncio.wait_for(trainer_closed, 10) == 1001

    # The slow peer, on a server without rate limiting (a flood must get through).
    slow_server = server_process("--log-format", "json", "--log-level", "info", "--rate-limit",
                                 "0", "--max-message-chars", "30000",
                                 db_path=tmp_path / "slow.db", env=UTF8)
    slow_close_code, stalled_token = await stall_a_reader_in_a_flood(slow_server)
    assert slow_close_code == 1008
    assert await stop(slow_server) == 0

    output = server.output()
    events = json_log(output)
    start = only(events, "server_start")
    assert start["port"] == server.port and start["host"] == "127.0.0.1", start
    assert isinstance(start["version"], str) and start["version"], start
    assert isinstance(start["connections"], int) and start["connections"] > 0, start
    only(events, "server_stop")
    assert events[0]["event"] == "server_start", events[0]
    assert only(events, "sign_in")["user_id"] == "m1"
    refused = only(events, "ws_refused")
    assert refused["code"] == 4401 and refused["room_id"] == "pt_2", refused
    assert isinstance(refused["reason"], str) and refused["reason"], refused
    http_refused = only(events, "request_refused")
    assert (http_refused["path"], http_refused["status"]) == (ROOMS, 401), http_refused
    limited = only(events, "rate_limited")
    assert (limited["user_id"], limited["kind"]) == ("m1", "send"), limited
    assert only(events, "ws_open", user_id="t1")["sockets"] == 1
    assert only(events, "ws_open", user_id="m1")["sockets"] == 2
    assert all(event["room_id"] == "pt_1" for event in events if event["event"] == "ws_open")
    assert only(events, "ws_close", room_id="pt_1", user_id="m1")["code"] == 1000
    assert len([event for event in events if event["event"] == "ws_close"]) == 2
    assert not [event for event in events if event["event"] == "slow_peer_closed"]
    # Access lines carry the path, never the query string with its token.
    login_line = only(events, "http", path=LOGIN)
    assert (login_line["method"], login_line["status"]) == ("GET", 303), login_line
    assert isinstance(login_line["ms"], (int, float)) and login_line["ms"] >= 0, login_line
    assert all("?" not in event["path"] for event in events if event["event"] == "http")
    assert {event["level"] for event in events} <= {"info"}, events
    assert_nothing_secret(output, [m1_link_token, m1_token, t1_token, expired_token,
                                   garbage_token, cookie_value],
                          [SECRET_CONTENT, "secret-content", "수업 7시"])

    slow_output = slow_server.output()
    slow_events = json_log(slow_output)
    only(slow_events, "server_start")
    only(slow_events, "server_stop")
    slow = only(slow_events, "slow_peer_closed")
    assert (slow["room_id"], slow["user_id"]) == ("pt_1", "m1"), slow
    assert isinstance(slow["reason"], str) and slow["reason"], slow
    assert only(slow_events, "ws_close", room_id="pt_1", user_id="m1")["code"] == 1008
    assert_nothing_secret(slow_output, [stalled_token], [FLOOD_CONTENT[:40], "secret-flood"])
    # Last, as the rest does not depend on it: a socket the server closed at shutdown
    # is logged with the 1001 it sent and the client answered.
    assert only(events, "ws_close", room_id="pt_1", user_id="t1")["code"] == 1001


# ------------------------------------------------------------ text log ---


TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+ \S")


async def raw_get(port: int, target: str) -> int:
    """One GET with ``target`` sent exactly as written; the status code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return int(status_line.split()[1])


async def test_the_text_log_is_one_escaped_line_per_event(server_process):
    """A refused handshake is one `ws_refused ... code=4401` line, and a newline in a
    path is escaped, so no request can forge a log line."""
    server = server_process("--log-format", "text", "--log-level", "info", env=UTF8)
    garbage_token = "not-a-jwt-at-all-7Hq2"
    forged = "FORGED 2099-01-01 00:00:00,000 INFO distributor_chat server_stop"
    async with aiohttp.ClientSession() as http:
        assert await refused_close_code(http, server, "pt_1", garbage_token) == 4401
    status = await raw_get(server.port, f"/distributor/x%0a{forged.replace(' ', '%20')}")
    assert status == 404
    assert await stop(server) == 0

    lines = server.output().splitlines()
    refused = [line for line in lines if "ws_refused" in line]
    assert len(refused) == 1, refused
    assert "code=4401" in refused[0] and "room_id=pt_1" in refused[0], refused
    assert TEXT_LINE.match(refused[0]), refused
    assert garbage_token not in server.output()
    # The path's newline is \x0a inside the one access line; no line starts with the forgery.
    forging = [line for line in lines if "FORGED" in line]
    assert len(forging) == 1, forging
    assert f"path=/distributor/x\\x0a{forged}" in forging[0], forging
    assert TEXT_LINE.match(forging[0]) and " http " in forging[0], forging
    assert not any(line.startswith("FORGED") for line in lines)


# ------------------------------------------------------------- metrics ---


class Scrape:
    """One /distributor/metrics answer, parsed: families by name, samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                assert key not in self.samples, f"a sample twice: {key}"
                self.samples[key] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for a labelled counter not counted yet."""
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            assert labels, f"no sample {name}"
            return 0.0
        return self.samples[key]

    def labelled(self, name: str, label: str) -> dict[str, float]:
        return {dict(labels)[label]: value for (sample_name, labels), value in self.samples.items()
                if sample_name == name}


def metrics_url(server) -> str:
    return f"{server.base_url}{METRICS}"


async def scrape(http: aiohttp.ClientSession, server, token: str) -> Scrape:
    async with http.get(metrics_url(server),
                        headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain", response.headers
        return Scrape(await response.text())


def assert_histogram(scrape: Scrape, name: str) -> None:
    """Cumulative buckets ending in +Inf, which equals _count."""
    family = scrape.families[name]
    assert family.type == "histogram", family
    buckets = sorted(((float(sample.labels["le"]), sample.value) for sample in family.samples
                      if sample.name == f"{name}_bucket"))
    assert buckets and buckets[-1][0] == float("inf"), buckets
    counts = [count for _, count in buckets]
    assert counts == sorted(counts), buckets
    assert counts[-1] == scrape.value(f"{name}_count"), buckets


async def test_metrics_need_their_token_and_count_real_traffic_exactly(server_process):
    """404 without --metrics-token; 401 without its Bearer token; with it, Prometheus
    text whose gauges and counters match what the clients did."""
    metrics_token = "metrics-token-4f9c2e"
    async with aiohttp.ClientSession() as http:
        server = server_process()
        async with http.get(metrics_url(server), headers={"Authorization": f"Bearer {metrics_token}"}
                            ) as response:
            assert response.status == 404
        assert await stop(server) == 0

        server = server_process("--metrics-token", metrics_token)
        for headers, query in (({}, {}), ({"Authorization": "Bearer wrong-token"}, {}),
                               ({"Authorization": f"Bearer {metrics_token}x"}, {}),
                               ({"Authorization": f"Basic {metrics_token}"}, {}),
                               ({}, {"token": metrics_token}), (auth("t1"), {})):
            async with http.get(metrics_url(server), headers=headers, params=query) as response:
                assert response.status == 401, (headers, query)

        before = await scrape(http, server, metrics_token)
        for name, kind in (("distributor_sockets_open", "gauge"),
                           ("distributor_rooms_live", "gauge"),
                           ("distributor_messages_stored", "counter"),
                           ("distributor_errors", "counter"),
                           ("distributor_closes", "counter"),
                           ("distributor_push_sent", "counter"),
                           ("distributor_commit_seconds", "histogram"),
                           ("distributor_write_batch_size", "histogram"),
                           ("process_resident_memory_bytes", "gauge"),
                           ("process_start_time_seconds", "gauge")):
            assert before.families[name].type == kind, (name, before.families[name])
        assert before.value("distributor_sockets_open") == 0
        assert before.value("distributor_rooms_live") == 0

        trainer, _, _ = await open_live(http, server, "pt_1", "t1")
        member, _, _ = await open_live(http, server, "pt_1", "m1")
        member_two, _, _ = await open_live(http, server, "pt_2", "m2")
        leaving, _, _ = await open_live(http, server, "pt_3", "t2")
        for number in range(5):
            await send_chat(member, f"chat {number}", f"chat-{number}")
        for number in range(5):
            await ack_of(member, f"chat-{number}")
        await send_chat(trainer, "gym closes at 9 today", "spread-1", frame_type="spread")
        assert (await ack_of(trainer, "spread-1"))["rooms"] == 2
        await member.send_str("this is not JSON")
        assert (await next_error(member))["code"] == "invalid_message"
        assert await refused_close_code(http, server, "pt_1", "not-a-jwt") == 4401
        await leaving.close()
        assert leaving.close_code == 1000

        # The server counts a close once its handler is done: wait for that, then compare.
        deadline = time.monotonic() + 5
        while True:
            after = await scrape(http, server, metrics_token)
            closes = after.value("distributor_closes_total", code="1000")
            if closes > before.value("distributor_closes_total", code="1000"):
                break
            assert time.monotonic() < deadline, "the 1000 close was never counted"
            await asyncio.sleep(0.05)

        def moved(name: str, **labels: str) -> float:
            return after.value(name, **labels) - before.value(name, **labels)

        assert moved("distributor_messages_stored_total", type="chat") == 5
        assert moved("distributor_messages_stored_total", type="spread") == 2
        assert moved("distributor_errors_total", code="invalid_message") == 1
        assert sum(after.labelled("distributor_errors_total", "code").values()) - sum(
            before.labelled("distributor_errors_total", "code").values()) == 1
        assert moved("distributor_closes_total", code="4401") == 1
        assert moved("distributor_closes_total", code="1000") == 1
        assert sum(after.labelled("distributor_closes_total", "code").values()) - sum(
            before.labelled("distributor_closes_total", "code").values()) == 2
        assert after.value("distributor_sockets_open") == 3  # t1 and m1 in pt_1, m2 in pt_2
        assert after.value("distributor_rooms_live") == 2
        assert sum(after.labelled("distributor_push_sent_total", "outcome").values()) == sum(
            before.labelled("distributor_push_sent_total", "outcome").values())  # no push here
        for histogram in ("distributor_commit_seconds", "distributor_write_batch_size"):
            assert_histogram(before, histogram)
            assert_histogram(after, histogram)
        batches = moved("distributor_write_batch_size_count")
        assert batches >= 1
        assert moved("distributor_write_batch_size_sum") >= 6  # 5 chats and a spread at least
        assert moved("distributor_commit_seconds_count") == batches  # one timing a batch
        assert after.value("distributor_commit_seconds_sum") > 0
        assert after.value("process_resident_memory_bytes") > 10 * MIB
        for ws in (trainer, member, member_two):
            await ws.close()
    assert await stop(server) == 0
    started_at = after.value("process_start_time_seconds")
    assert time.time() - 60 < started_at <= time.time(), started_at
