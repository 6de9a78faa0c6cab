"""Property-based fuzzing (hypothesis) of the whole server from outside, as SPEC's
clients see it: a real ``python distributor_chat.py`` process, real sockets, a real
SQLite file. Three properties:

1. Any WebSocket frame (arbitrary JSON, frame-shaped dicts with wrong fields,
   non-JSON text, binary, frames around 64 KiB) gets exactly the answer SPEC
   section 5 gives it, never crashes the server, and nothing invalid is stored.
2. Any path and query string on every HTTP endpoint gets one of SPEC section 4's
   statuses with its error body, never a 500, a 503 or a traceback.
3. Any Unicode content round-trips exactly (ack, live frame, messages API, the
   stored bytes); lone surrogates and NUL are refused and nothing is stored.

Each property runs as one sync test that owns one server process and one event
loop; hypothesis drives an inner ``@given`` function that runs one example on that
loop. The server is stateful, so the tests keep a model of what must be stored and
check every example against it (a repeated client_id is acked with the first id).
``derandomize=True``: every run draws the same examples, so CI is reproducible.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import sqlite3
import string
import time
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from hypothesis import HealthCheck, given, note, settings, strategies as st

from conftest import ERROR_CODES, USERS, make_token, marker, parse_frame

BASE = "/distributor"
ROOMS = f"{BASE}/chat/rooms"
FRAME_LIMIT_BYTES = 64 * 1024
CLIENT_ID_MAX_CHARS = 64
NAMES = {user_id: name for user_id, name, _ in USERS}
ROOM = "pt_1"  # t1 and m1's room; t1 also has pt_2, where a spread lands too
SPREAD_ROOMS = ("pt_1", "pt_2")  # every active room of t1
RECEIVE_TIMEOUT_S = 10.0

# Small content limits put too_long within reach of generated text.
FRAME_FUZZ_MAX_CHARS = 40
UNICODE_MAX_CHARS = 48

# Bounded so the file runs in well under 90 s on two cores.
FRAME_EXAMPLES = 500
HTTP_EXAMPLES = 500
UNICODE_EXAMPLES = 400
SURROGATE_EXAMPLES = 100

FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=False,
                report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])


# ============================================================ shared ===


def weighted(*choices) -> st.SearchStrategy:
    """one_of with (weight, strategy) pairs. Naming a branch twice in one_of does not
    make it likelier, so the branch is drawn first."""
    branches = [strategy for _, strategy in choices]
    picks = [index for index, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(picks).flatmap(lambda index: branches[index])


def fuzz_server(server_process, *options: str):
    """A server with the rate limit off: fuzzing sends far more than 5 frames a second."""
    return server_process("--rate-limit", "0", "--log-level", "info", *options)


def bearer(user_id: str) -> dict:
    return {"Authorization": f"Bearer {make_token(user_id)}"}


async def open_socket(session: aiohttp.ClientSession, base_url: str, user_id: str,
                      room_id: str = ROOM) -> aiohttp.ClientWebSocketResponse:
    """A socket past welcome and history."""
    ws = await session.ws_connect(f"{base_url}{BASE}/ws/chat/{room_id}", headers=bearer(user_id))
    for expected in ("welcome", "history"):
        frame = await ws.receive_json(timeout=RECEIVE_TIMEOUT_S)
        assert frame["type"] == expected, frame
    return ws


async def collect(ws, stop, timeout_s: float = RECEIVE_TIMEOUT_S) -> tuple[list[dict], int | None]:
    """Frames up to and including the first one ``stop`` accepts: (frames, None); or,
    when the server closes the socket first, (frames before it, the close code)."""
    frames: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no matching frame in time; got {frames}"
        message = await ws.receive(timeout=remaining)
        if message.type is aiohttp.WSMsgType.TEXT:
            frame = json.loads(message.data)
            frames.append(frame)
            if stop(frame):
                return frames, None
        elif message.type is aiohttp.WSMsgType.CLOSE:
            return frames, message.data
        else:
            raise AssertionError(f"unexpected {message.type} (close code {ws.close_code})")


_marker_numbers = itertools.count(1)


async def marked(ws) -> tuple[list[dict], dict]:
    """conftest's marker, with an id no fuzzed frame has (U+2063): every frame
    before its ack, and the ack."""
    frames = await marker(ws, f"marker-{next(_marker_numbers):06d}-\u2063")
    return frames[:-1], frames[-1]


def read_only(db_path) -> sqlite3.Connection:
    """The server's database, read-only: what is really stored, not what the API says."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    db.text_factory = bytes  # decode ourselves, strictly: bad UTF-8 must show up
    return db


def stored_rows_with_rooms(db_path) -> list[dict]:
    """Every stored message as raw bytes, with its room's participants and whether
    its sender exists: what SPEC 5 allows to be stored, checked strictly."""
    with contextlib.closing(read_only(db_path)) as db:
        rows = db.execute(
            "SELECT m.id, m.session_id, m.user_id, m.type, m.content, m.client_id,"
            "       s.trainer_id, s.member_id, u.id"
            "  FROM messages m LEFT JOIN pt_sessions s ON s.id = m.session_id"
            "  LEFT JOIN users u ON u.id = m.user_id ORDER BY m.id").fetchall()
    names = ("id", "session_id", "user_id", "type", "content", "client_id", "trainer_id",
             "member_id", "known_user")
    return [dict(zip(names, row)) for row in rows]


def check_rows_follow_spec(rows: list[dict], max_chars: int) -> None:
    """Every stored message satisfies SPEC section 5's rules for what may be stored."""
    for row in rows:
        assert row["trainer_id"] is not None, f"message in a room that does not exist: {row}"
        assert row["known_user"] is not None, f"message from an unknown user: {row}"
        assert row["user_id"] in (row["trainer_id"], row["member_id"]), f"not a participant: {row}"
        assert row["type"] in (b"chat", b"spread"), row
        content = row["content"].decode("utf-8")  # strict: raises on anything not UTF-8
        assert "\x00" not in content, row
        assert content == content.strip() and 1 <= len(content) <= max_chars, row
        client_id = row["client_id"].decode("utf-8")
        assert 1 <= len(client_id) <= CLIENT_ID_MAX_CHARS, row


def check_server_healthy(server) -> None:
    """Still running, and nothing in its log says a handler failed."""
    assert server.process.poll() is None, server.output()[-3000:]
    log = server.output()
    for sign in ("Traceback", "unexpected error", "write failed"):
        assert sign not in log, log[log.index(sign) - 1500:][:4000]


async def healthz(session, base_url: str) -> None:
    async with session.get(f"{base_url}{BASE}/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


# ======================================= 1. arbitrary WebSocket frames ===


@dataclass(frozen=True)
class Attempt:
    """One frame to send: ``kind`` is text or binary; ``sender`` is m1 or t1 in pt_1."""
    sender: str
    kind: str
    payload: str | bytes


SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
# Short text that may hold anything: NUL, controls, astral, lone surrogates.
ANY_TEXT = st.text(st.one_of(st.characters(codec=None), SURROGATES), max_size=12)
JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-3, 3)
                | st.floats(allow_nan=False, allow_infinity=False) | ANY_TEXT)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=10)

CLIENT_TYPES = ["chat", "spread", "read", "typing"]
# Server-only types and near misses must all be refused like garbage.
OTHER_TYPES = ["system", "ack", "error", "welcome", "history", "join", "leave", "CHAT", "Chat",
               " chat", "chat ", "chat\x00", "", "ｃｈａｔ", "typing\n", "spreads"]

WHITESPACE = st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2028\u2029\u3000\u2003\u0085"),
                     max_size=6)
CONTENTS = weighted(
    (1, st.text(max_size=20)),
    (2, st.builds(lambda pad, text, tail: pad + text + tail, WHITESPACE, st.text(max_size=8),
                  WHITESPACE)),
    (2, WHITESPACE),
    (1, ANY_TEXT),
    (2, st.text(min_size=FRAME_FUZZ_MAX_CHARS - 2, max_size=FRAME_FUZZ_MAX_CHARS + 2)),
    (2, st.builds(lambda pad, n: pad + "가" * n + pad, WHITESPACE,
                  st.integers(FRAME_FUZZ_MAX_CHARS - 1, FRAME_FUZZ_MAX_CHARS + 1))),
    (2, JSON_VALUES),  # wrong types: numbers, null, lists, objects
)
# A few fixed ids make repeats (the resend rule) common; long ones straddle 64.
CLIENT_IDS = st.one_of(
    st.sampled_from(["a", "b", "c", "한", "😀"]),
    ANY_TEXT,
    st.text(min_size=CLIENT_ID_MAX_CHARS - 1, max_size=CLIENT_ID_MAX_CHARS + 1),
    st.just(""),
    JSON_VALUES,
)
MESSAGE_IDS = st.one_of(st.integers(-2, 60), st.integers(), st.sampled_from([1.0, 2.5, -1.0, 1e300]),
                        st.booleans(), JSON_VALUES)
ROOM_IDS = st.one_of(st.just(ROOM), st.sampled_from(["pt_2", "pt_3", "PT_1", "pt_01", "", " pt_1"]),
                     JSON_VALUES)
USER_IDS = st.one_of(st.sampled_from(["m1", "t1"]), st.sampled_from(["m2", "t2", "M1", ""]),
                     JSON_VALUES)

FRAME_DICTS = st.fixed_dictionaries(
    {"type": weighted((2, st.sampled_from(CLIENT_TYPES)), (1, st.sampled_from(OTHER_TYPES)),
                      (1, JSON_VALUES))},
    optional={"content": CONTENTS, "client_id": CLIENT_IDS, "message_id": MESSAGE_IDS,
              "room_id": ROOM_IDS, "user_id": USER_IDS, "extra": JSON_VALUES})


def has_surrogate(value) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in json.dumps(value, ensure_ascii=False))


@st.composite
def json_text(draw, values) -> str:
    """A JSON encoding of a drawn value; surrogates can only travel as \\u escapes."""
    value = draw(values)
    ascii_only = draw(st.booleans()) or has_surrogate(value)
    return json.dumps(value, ensure_ascii=ascii_only)


def padded_chat(size: int) -> str:
    """A chat frame of exactly ``size`` UTF-8 bytes."""
    head, tail = '{"type":"chat","client_id":"big","content":"', '"}'
    return head + "a" * (size - len(head) - len(tail)) + tail


SENDERS = st.sampled_from(["m1", "t1"])
GOOD_CONTENTS = st.text(min_size=1, max_size=30)
GOOD_CLIENT_IDS = st.one_of(st.sampled_from(["a", "b", "c", "한", "😀"]), st.text(min_size=1, max_size=10))


@st.composite
def well_formed_attempts(draw) -> Attempt:
    """A send, read or typing frame, mostly well-formed so that acks and receipts are
    common too; each field still sometimes comes from the hostile strategies."""
    sender = draw(SENDERS)
    frame_type = draw(st.sampled_from(["chat", "chat", "chat", "spread", "read", "typing"]))
    frame = {"type": frame_type}
    if frame_type in ("chat", "spread"):
        frame["content"] = draw(weighted((3, GOOD_CONTENTS), (1, CONTENTS)))
        frame["client_id"] = draw(weighted((4, GOOD_CLIENT_IDS), (1, CLIENT_IDS)))
    elif frame_type == "read":
        frame["message_id"] = draw(weighted((3, st.integers(1, 60)), (1, MESSAGE_IDS)))
    for name, own, hostile in (("room_id", ROOM, ROOM_IDS), ("user_id", sender, USER_IDS)):
        choice = draw(st.sampled_from(["absent", "absent", "own", "hostile"]))
        if choice != "absent":
            frame[name] = own if choice == "own" else draw(hostile)
    if draw(st.booleans()):
        frame[draw(ANY_TEXT)] = draw(JSON_VALUES)  # unknown, or overwriting a known field
    ascii_only = draw(st.booleans()) or has_surrogate(frame)
    return Attempt(sender, "text", json.dumps(frame, ensure_ascii=ascii_only))


# Sizes on both sides of the limit; sampled_from draws evenly where integers() would
# mostly draw the low end.
FRAME_SIZES = st.sampled_from([FRAME_LIMIT_BYTES + offset for offset in range(-48, 49)])
HOSTILE_TEXT = weighted(
    (3, json_text(FRAME_DICTS)),
    (2, json_text(JSON_VALUES)),
    (2, st.text(max_size=60)),  # mostly not JSON at all
    (1, st.builds(lambda text, cut: text[:cut], json_text(FRAME_DICTS), st.integers(0, 40))),  # cut short
    (1, st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth)),  # deep nesting
    (1, st.integers(1, 3000).map(lambda depth: '{"type":' * depth + '"chat"' + "}" * depth)),
)
BINARY_PAYLOADS = st.one_of(st.binary(max_size=80),
                            json_text(FRAME_DICTS).map(lambda text: text.encode("utf-8")))
ATTEMPTS = weighted(
    (4, well_formed_attempts()),
    (3, st.builds(Attempt, SENDERS, st.just("text"), HOSTILE_TEXT)),
    (1, st.builds(Attempt, SENDERS, st.just("binary"), BINARY_PAYLOADS)),
    # around SPEC's 64 KiB frame limit, as text and as binary
    (1, st.builds(lambda sender, size, as_bytes: Attempt(
        sender, "binary" if as_bytes else "text",
        padded_chat(size).encode() if as_bytes else padded_chat(size)),
        SENDERS, FRAME_SIZES, st.booleans())),
)


class NotJson(Exception):
    pass


NOT_JSON = object()  # the reading of a frame as "not JSON at all"


def _refuse_constant(name: str):
    raise NotJson(name)


def readings(text: str) -> list:
    """The ways a text frame can be read: its JSON value, or NOT_JSON. NaN and Infinity
    are not JSON, yet Python reads them: SPEC is silent, so both readings count."""
    try:
        return [json.loads(text, parse_constant=_refuse_constant)]
    except NotJson:
        pass
    except (ValueError, RecursionError):
        return [NOT_JSON]
    try:
        return [NOT_JSON, json.loads(text)]
    except (ValueError, RecursionError):
        return [NOT_JSON]


def is_clean(text: str) -> bool:
    """No NUL and no lone surrogate (a surrogate cannot be stored as UTF-8)."""
    return "\x00" not in text and not any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def outcomes_of_value(frame, sender: str) -> set[str]:
    """What SPEC section 5 allows as the answer to one JSON value from ``sender`` in
    pt_1: "ack", "quiet" (nothing, or a read receipt) or "error:<code>". When a frame
    has several faults SPEC does not say which one is reported: any of them is."""
    if not isinstance(frame, dict) or frame.get("type") not in CLIENT_TYPES:
        return {"error:invalid_message"}
    faults = set()
    for name, own in (("room_id", ROOM), ("user_id", sender)):
        if name in frame:
            if not isinstance(frame[name], str):
                faults.add("invalid_message")
            elif frame[name] != own:
                faults.add("forbidden")
    frame_type, silent = frame["type"], set()
    if frame_type in ("chat", "spread"):
        client_id, content = frame.get("client_id"), frame.get("content")
        if not isinstance(client_id, str) or not 1 <= len(client_id) <= CLIENT_ID_MAX_CHARS:
            faults.add("invalid_message")
        elif not is_clean(client_id):
            silent.add("error:invalid_message")  # SPEC names NUL/surrogates for content only
        if not isinstance(content, str) or not is_clean(content):
            faults.add("invalid_message")
        elif not content.strip():
            faults.add("empty")
        elif len(content.strip()) > FRAME_FUZZ_MAX_CHARS:
            faults.add("too_long")
        if frame_type == "spread" and sender != "t1":
            faults.add("forbidden")
        good = "ack"
    elif frame_type == "read":
        message_id = frame.get("message_id")
        if isinstance(message_id, float) and message_id.is_integer() and message_id > 0:
            silent.add("error:invalid_message")  # 1.0: an integer or not? SPEC is silent
        elif not isinstance(message_id, int) or isinstance(message_id, bool) or message_id <= 0:
            faults.add("invalid_message")
        good = "quiet"
    else:
        good = "quiet"
    if faults:
        return {f"error:{code}" for code in faults} | silent
    return {good} | silent


def expected_outcomes(attempt: Attempt) -> tuple[set[str], object]:
    """The allowed answers, and the JSON value read from the frame (None if none)."""
    size = len(attempt.payload if attempt.kind == "binary" else attempt.payload.encode("utf-8"))
    if size > FRAME_LIMIT_BYTES:
        return {"close:1009"}, None
    if attempt.kind == "binary":
        return {"error:invalid_message"}, None
    outcomes, value = set(), None
    for reading in readings(attempt.payload):
        if reading is NOT_JSON:
            outcomes.add("error:invalid_message")
        else:
            value = reading
            outcomes |= outcomes_of_value(reading, attempt.sender)
    return outcomes, value


@dataclass
class StoreModel:
    """What the database must hold: (room, user, client_id) → (id, type, content).
    The id of a spread's copy in pt_2 is not in its ack, so it is None."""
    rows: dict[tuple[str, str, str], tuple[int | None, str, str]] = field(default_factory=dict)

    def record(self, room_id, user_id, client_id, message_id, message_type, content) -> None:
        self.rows[(room_id, user_id, client_id)] = (message_id, message_type, content)

    def newest_id(self) -> int:
        return max((row[0] for row in self.rows.values() if row[0] is not None), default=0)

    def check_database(self, db_path, max_chars: int) -> None:
        rows = stored_rows_with_rooms(db_path)
        check_rows_follow_spec(rows, max_chars)
        stored = {(f"pt_{row['session_id']}", row["user_id"].decode(), row["client_id"].decode("utf-8")):
                  (row["id"], row["type"].decode(), row["content"].decode("utf-8")) for row in rows}
        assert len(stored) == len(rows), "a client_id stored twice for one user and room"
        expected = {key: (stored.get(key, (None,))[0] if message_id is None else message_id,
                          message_type, content)
                    for key, (message_id, message_type, content) in self.rows.items()}
        missing = {key: row for key, row in expected.items() if stored.get(key) != row}
        extra = {key: row for key, row in stored.items() if key not in expected}
        assert not missing and not extra, f"model and database differ: {missing=} {extra=}"


class FrameHarness:
    """Two participants of pt_1 (m1 and t1) on a fuzz server, and the model."""

    def __init__(self, server) -> None:
        self.server = server
        self.base_url = server.base_url
        self.model = StoreModel()
        self.sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self.session: aiohttp.ClientSession | None = None
        self.counts: dict[str, int] = {}
        self.dirty = False

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        for user_id in ("m1", "t1"):
            await self.ensure_open(user_id)

    async def stop(self) -> None:
        for ws in self.sockets.values():
            await ws.close()
        await self.session.close()

    async def ensure_open(self, user_id: str) -> None:
        """Reopen a socket a previous example closed (an oversized frame, or a failure)."""
        ws = self.sockets.get(user_id)
        if ws is None or ws.closed:
            self.sockets[user_id] = await open_socket(self.session, self.base_url, user_id)

    async def send_marker(self, user_id: str) -> list[dict]:
        frames, ack = await marked(self.sockets[user_id])
        self.model.record(ROOM, user_id, ack["client_id"], ack["id"], "chat", "ok")
        return frames

    async def check(self, attempt: Attempt) -> None:
        """One example; after a failed one, first drain both sockets so that what it
        left unread does not fail the examples hypothesis runs next."""
        if self.dirty:
            for user_id in ("m1", "t1"):
                await self.ensure_open(user_id)
                await self.send_marker(user_id)
            self.dirty = False
        self.dirty = True
        await self.check_one(attempt)
        self.dirty = False

    async def check_one(self, attempt: Attempt) -> None:
        sender = attempt.sender
        other = "t1" if sender == "m1" else "m1"
        for user_id in (sender, other):
            await self.ensure_open(user_id)
        allowed, frame = expected_outcomes(attempt)
        note(f"allowed answers: {sorted(allowed)}")
        ws = self.sockets[sender]
        newest_before = self.model.newest_id()
        if attempt.kind == "binary":
            await ws.send_bytes(attempt.payload)
        else:
            await ws.send_str(attempt.payload)

        if allowed == {"close:1009"}:
            frames, closed = await collect(ws, lambda f: False)
            assert closed == 1009, (closed, frames)
            assert not [f for f in frames if f["type"] in ("ack", "error")], frames
            self.counts["closed"] = self.counts.get("closed", 0) + 1
            await healthz(self.session, self.base_url)
            await self.ensure_open(sender)  # SPEC: the client may come back with after=
            await self.send_marker(sender)
            await self.send_marker(other)
            return

        window = await self.send_marker(sender)
        client_id = frame.get("client_id") if isinstance(frame, dict) else None
        replies = [f for f in window if f["type"] in ("ack", "error")]
        assert len(replies) <= 1, f"more than one answer to one frame: {replies}"
        reply = replies[0] if replies else None
        if reply is None:
            outcome = "quiet"
        elif reply["type"] == "ack":
            outcome = "ack"
        else:
            outcome = f"error:{reply['code']}"
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if outcome == "ack" and isinstance(frame, dict):
            self.record_ack(reply, frame, sender, newest_before)  # stored, right or wrong
        assert outcome in allowed, f"answered {reply or 'nothing'}; SPEC allows {sorted(allowed)}"

        if reply is not None and reply["type"] == "error":
            self.check_error_frame(reply, frame, client_id)
        for receipt in (f for f in window if f["type"] == "read"):
            assert receipt["user_id"] == sender and 0 < receipt["message_id"] <= newest_before, receipt
        copies = [f for f in window if f["type"] in ("chat", "spread") and f["client_id"] == client_id
                  and f["user_id"] == sender]
        if outcome == "ack":
            self.check_ack(reply, frame, sender, copies)
        else:
            assert copies == [], f"a refused frame was delivered: {copies}"
        other_window = await self.send_marker(other)
        assert not [f for f in other_window if f["type"] in ("error", "ack")], other_window
        other_copies = [f for f in other_window
                        if f["type"] in ("chat", "spread") and f["client_id"] == client_id
                        and f["user_id"] == sender]
        if outcome == "ack" and copies:
            assert other_copies == copies, (other_copies, copies)  # the same message, live
        else:
            assert other_copies == [], f"the other participant got {other_copies}"

    @staticmethod
    def check_error_frame(error: dict, frame, client_id) -> None:
        assert {"type", "code", "message", "client_id"} <= error.keys(), error
        assert error["code"] in ERROR_CODES and isinstance(error["message"], str) and error["message"]
        # an error is never pinned on another message's client_id
        assert error["client_id"] is None or error["client_id"] == client_id, (error, frame)
        if error["code"] in ("empty", "too_long"):
            assert error["client_id"] == client_id, "the client cannot tell which send failed"

    def record_ack(self, ack: dict, frame: dict, sender: str, newest_before: int) -> None:
        """Note an acked frame in the model before any check, so a failed check does
        not put the model out of step with the server for the examples hypothesis
        runs while shrinking."""
        client_id = frame.get("client_id")
        self.newest_before_ack = newest_before
        self.earlier = None
        if not isinstance(client_id, str) or not isinstance(frame.get("content"), str):
            return  # not a storable frame: the check of the answer fails on it
        key = (ROOM, sender, client_id)
        self.earlier = self.model.rows.get(key)
        if self.earlier is not None:
            return
        content = frame["content"].strip()
        if frame["type"] == "spread":
            for room_id in SPREAD_ROOMS:
                self.model.record(room_id, sender, key[2],
                                  ack["id"] if room_id == ROOM else None, "spread", content)
        else:
            self.model.record(ROOM, sender, key[2], ack["id"], "chat", content)

    def check_ack(self, ack: dict, frame: dict, sender: str, copies: list[dict]) -> None:
        if self.earlier is not None:  # a resend: the first id, nothing stored or sent again
            assert ack["id"] == self.earlier[0], (ack, self.earlier)
            assert copies == [], f"a resend was delivered again: {copies}"
            return
        assert ack["id"] > self.newest_before_ack, "ids must increase"
        assert {"client_id", "id", "created_at"} <= ack.keys(), ack
        if frame["type"] == "spread":
            assert ack.get("rooms") == len(SPREAD_ROOMS), ack
        assert len(copies) == 1, f"the sender's own tab must get the message once: {copies}"
        copy = copies[0]
        assert (copy["type"], copy["id"], copy["room_id"], copy["user_id"], copy["sender_name"],
                copy["content"], copy["created_at"]) == (
            frame["type"], ack["id"], ROOM, sender, NAMES[sender], frame["content"].strip(),
            ack["created_at"]), copy


def test_arbitrary_websocket_frames_get_spec_answers_and_store_nothing_invalid(server_process):
    """Any frame gets SPEC's answer, the server survives, and the database matches the acks."""
    server = fuzz_server(server_process, "--max-message-chars", str(FRAME_FUZZ_MAX_CHARS))
    harness = FrameHarness(server)
    started = time.monotonic()
    with asyncio.Runner() as runner:
        runner.run(harness.start())
        try:
            @settings(FUZZ, max_examples=FRAME_EXAMPLES)
            @given(attempt=ATTEMPTS)
            def check(attempt: Attempt) -> None:
                runner.run(harness.check(attempt))

            check()
            runner.run(healthz(harness.session, server.base_url))
        finally:
            runner.run(harness.stop())
    harness.model.check_database(server.db_path, FRAME_FUZZ_MAX_CHARS)
    check_server_healthy(server)
    # the strategies must have reached every kind of answer, or the property is hollow
    assert {"ack", "quiet", "closed", "error:invalid_message", "error:empty", "error:too_long",
            "error:forbidden"} <= harness.counts.keys(), harness.counts
    print(f"\nframes: {sum(harness.counts.values())} answers {harness.counts} "
          f"in {time.monotonic() - started:.1f} s")


# ============================================ 2. arbitrary HTTP requests ===

# Characters a request-target may hold as they are (RFC 3986); anything else is
# percent-encoded, so every request is well-formed HTTP and reaches the app.
TARGET_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%"
SPEC_STATUSES = {200, 303, 400, 401, 403, 404, 405, 413}
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
FOREIGN_ORIGIN = "http://evil.example"

TOKENS = {
    "m1": make_token("m1", ttl_s=3 * 3600),
    "t1": make_token("t1", ttl_s=3 * 3600),
    "t2": make_token("t2", ttl_s=3 * 3600),
    "expired": make_token("m1", ttl_s=-60),
    "wrong-role": make_token("m1", role="trainer", ttl_s=3600),
    "wrong-secret": make_token("m1", secret="another-secret-another-secret-0123456789"),
    "unknown-user": make_token("ghost", role="member", ttl_s=3600),
    "garbage": "a.b.c",
}
SPECIAL_COMPONENTS = [
    "", "%", "%z", "%zz", "%ff", "%00", "%0a", "%0d%0a", "%ed%a0%80", "%c0%af", "%ef%bc%91", "..",
    "%2e%2e", ".", "%2f", "%5c", "pt_1", "pt_2", "pt_3", "pt_4", "pt_0", "pt_01", "pt_-1", "pt_1%00",
    "pt_99999999999999999999", "pt_%F0%9F%92%A9", "%ED%95%9C%EA%B8%80", "json", "m1", "t1", "m2",
    "0", "1", "-1", "50", "100", "101", "1e3", "99999999999999999999", "logout", "login", "healthz",
    "static", "js", "css", "distributor_chat.js", "distributor_chat.css", "vue.min.js",
    "distributor_chat.py", "schema.sql", "%2Fdistributor%2Fchat%2Frooms", "/distributor/chat/rooms",
    "/distributor/chat?room_id=pt_1", "//evil.example", "https://evil.example/", "/distributor/../x",
    "/distributor/%2e%2e/x", "/distributor//evil.example", "%5C%5Cevil.example", "/%09/evil.example",
    *(quote(token, safe="") for token in TOKENS.values()),
]
COMPONENTS = weighted(
    (3, st.sampled_from(SPECIAL_COMPONENTS)),
    (2, st.text(st.sampled_from(TARGET_CHARS), max_size=12)),
    (1, st.binary(max_size=10).map(lambda raw: quote(raw, safe=""))),  # any bytes, decoded there
    (1, st.text(max_size=6).map(lambda text: quote(text.encode("utf-8", "surrogatepass"), safe=""))),
    (1, st.integers(100, 1500).map(lambda n: "a" * n)),
)
PARAMETERS = ["room_id", "user_id", "format", "token", "before", "after", "limit", "next"]
# Where next= may point: SPEC follows only a path under /distributor/.
NEXT_PATHS = [
    ROOMS, f"{BASE}/chat?room_id=pt_1", f"{BASE}/채팅", "//evil.example", "///evil.example",
    "https://evil.example/", "http:evil.example", "javascript:alert(1)", "/\\evil.example",
    "\\/evil.example", f"{BASE}/../../etc/passwd", f"{BASE}/%2e%2e/x", f"{BASE}//evil.example",
    f"{BASE}/\r\nSet-Cookie: a=b", f"{BASE}/%0d%0aSet-Cookie:%20a=b", "/distributorx", BASE,
    f"{BASE}/x?next=//evil.example#frag", "%2F%2Fevil.example", f"{BASE}/[", "/\t/evil.example",
]
NUMBERS = weighted(
    (2, st.integers(-3, 150).map(str)),
    (2, st.sampled_from(["", "1e3", "0x10", "1.5", "%201", "%2B1", "%D9%A1", "%EF%BC%91", "1_0", "0",
                         "99999999999999999999", "9" * 18, "9" * 19, "00001", "NaN", "-0"])),
    (1, COMPONENTS),
)
# Per parameter: mostly values it could sensibly have, so that requests get past the
# first check and reach the later ones; sometimes anything.
PARAMETER_VALUES = {
    "room_id": weighted((3, st.sampled_from(["pt_1", "pt_2", "pt_3", "pt_4", "pt_0", "pt_01"])),
                        (1, COMPONENTS)),
    "user_id": weighted((3, st.sampled_from(["m1", "t1", "m2", "t2"])), (1, COMPONENTS)),
    "format": weighted((3, st.sampled_from(["json", "html", "JSON"])), (1, COMPONENTS)),
    "token": weighted((3, st.sampled_from([quote(TOKENS[name], safe="") for name in ("m1", "t1")])),
                      (1, st.sampled_from([quote(token, safe="") for token in TOKENS.values()])),
                      (1, COMPONENTS)),
    "before": NUMBERS, "after": NUMBERS, "limit": NUMBERS,
    "next": weighted((3, st.sampled_from(NEXT_PATHS).map(lambda path: quote(path, safe="/:?=&%"))),
                     (1, COMPONENTS)),
}


def queries(*names: str, min_size: int = 1) -> st.SearchStrategy[str]:
    """Query strings mostly of ``names``, sometimes other or garbage pairs."""
    known = st.sampled_from(names).flatmap(
        lambda name: PARAMETER_VALUES[name].map(lambda value: f"{name}={value}"))
    anything = st.builds(lambda key, value: f"{key}={value}",
                         weighted((2, st.sampled_from(PARAMETERS)), (1, COMPONENTS)), COMPONENTS)
    pair = weighted((6, known), (1, anything), (1, COMPONENTS))
    return st.lists(pair, min_size=min_size, max_size=4).map("&".join)


QUERIES = queries(*PARAMETERS, min_size=0)
SEGMENTS = st.lists(COMPONENTS, min_size=1, max_size=4).map("/".join)
ROOM_SEGMENTS = weighted((3, st.sampled_from(["pt_1", "pt_1", "pt_2", "pt_3"])), (1, COMPONENTS))
TARGETS = weighted(
    (2, st.builds(lambda q: f"{BASE}/chat?{q}", queries("room_id", "user_id", "token"))),
    (1, st.builds(lambda q: f"{ROOMS}?{q}", queries("format", "user_id", "token"))),
    (4, st.builds(lambda room, q: f"{ROOMS}/{room}/messages?{q}", ROOM_SEGMENTS,
                  queries("before", "after", "limit", "user_id", "format"))),
    (3, st.builds(lambda q: f"{BASE}/login?{q}", queries("token", "next"))),
    (1, st.builds(lambda path, q: f"{BASE}/static/{path}?{q}", SEGMENTS, QUERIES)),
    (1, st.builds(lambda q: f"{BASE}/healthz?{q}", QUERIES)),
    (3, st.builds(lambda room, q: f"{BASE}/ws/chat/{room}?{q}", ROOM_SEGMENTS,
                  queries("after", "user_id", "token"))),
    (1, st.builds(lambda q: f"{BASE}/logout?{q}", QUERIES)),
    (1, st.builds(lambda path, q: f"/{path}?{q}", SEGMENTS, QUERIES)),
    (1, st.builds(lambda path: f"{BASE}/{path}", SEGMENTS)),
    (1, st.sampled_from(["/", BASE, f"{BASE}/"])),
).map(lambda target: target[:8000])  # aiohttp refuses longer request lines before the app


@dataclass(frozen=True)
class HttpAttempt:
    method: str
    target: str
    accept: str | None
    credentials: str  # none, bearer:<token name>, cookie:<token name>
    upgrade: bool  # a WebSocket handshake instead of a plain request
    origin: str | None


HTTP_ATTEMPTS = st.builds(
    HttpAttempt,
    method=st.sampled_from(["GET"] * 16 + ["POST", "POST", "PUT", "DELETE"]),
    target=TARGETS,
    accept=st.sampled_from([None, "application/json", BROWSER_ACCEPT, "*/*", "text/html"]),
    credentials=weighted((3, st.sampled_from(["bearer:m1", "bearer:t1", "cookie:t1"])),
                         (1, st.sampled_from(["none"] + [f"{where}:{name}" for name in TOKENS
                                                         for where in ("bearer", "cookie")]))),
    upgrade=st.sampled_from([False, False, True]),
    origin=st.sampled_from([None, None, "own", FOREIGN_ORIGIN, "null"]),
)


def request_bytes(attempt: HttpAttempt, port: int) -> bytes:
    origin = f"http://127.0.0.1:{port}" if attempt.origin == "own" else attempt.origin
    lines = [f"{attempt.method} {attempt.target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if attempt.accept:
        lines.append(f"Accept: {attempt.accept}")
    if attempt.credentials != "none":
        where, _, name = attempt.credentials.partition(":")
        lines.append(f"Authorization: Bearer {TOKENS[name]}" if where == "bearer"
                     else f"Cookie: distributor_token={TOKENS[name]}")
    if origin:
        lines.append(f"Origin: {origin}")
    if attempt.upgrade:
        key = base64.b64encode(os.urandom(16)).decode()
        lines += ["Connection: Upgrade", "Upgrade: websocket", f"Sec-WebSocket-Key: {key}",
                  "Sec-WebSocket-Version: 13"]
    else:
        lines.append("Connection: close")
    if attempt.method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    ws_frame: tuple[int, bytes] | None = None  # after a 101: (opcode, payload) of the first frame


async def read_ws_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The first server frame on the stream (what follows it is not read)."""
    buffer = bytearray()
    while (frame := parse_frame(buffer)) is None:
        chunk = await reader.read(65536)
        assert chunk, f"the stream ended inside a frame: {bytes(buffer[:40])!r}"
        buffer += chunk
    return frame


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """By Content-Length, chunks, or up to EOF (a handshake keeps the connection open)."""
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return await reader.read()
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        body += (await reader.readexactly(size + 2))[:size]
    await reader.readuntil(b"\r\n")
    return body


async def http_exchange(port: int, request: bytes) -> HttpAnswer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(RECEIVE_TIMEOUT_S):
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ")[1])
            headers = {}
            for line in filter(None, header_lines):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if status == 101:
                return HttpAnswer(status, headers, b"", await read_ws_frame(reader))
            return HttpAnswer(status, headers, await read_body(reader, headers))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def decoded_path(target: str) -> str:
    return unquote(target.partition("?")[0], errors="replace")


def is_browser_page(attempt: HttpAttempt, path: str) -> bool:
    """A browser asking for a page, not for one of the JSON endpoints (messages,
    healthz, WebSocket) and not for JSON with format=: SPEC gives it an HTML error."""
    query = unquote(attempt.target.partition("?")[2], errors="replace").lower()
    is_json_endpoint = path.startswith((f"{ROOMS}/", f"{BASE}/healthz", f"{BASE}/ws/"))
    return attempt.accept in (BROWSER_ACCEPT, "text/html") and not is_json_endpoint \
        and "format" not in query


def check_http_answer(attempt: HttpAttempt, answer: HttpAnswer) -> None:
    """SPEC section 4: a listed status, the error body where SPEC gives one, no trace."""
    path = decoded_path(attempt.target)
    content_type = answer.headers.get("content-type", "").split(";")[0].strip()
    text = answer.body.decode("utf-8", errors="replace")
    assert "Traceback" not in text and "Internal Server Error" not in text, text[:2000]
    is_ws = path.startswith(f"{BASE}/ws/chat/")
    if answer.status == 101:
        check_ws_upgrade(attempt, answer)
        return
    assert answer.status in SPEC_STATUSES, f"status {answer.status}: {text[:500]}"
    raw_room = attempt.target.partition("?")[0].removeprefix(f"{BASE}/ws/chat/")
    is_ws_route = is_ws and raw_room != attempt.target and raw_room and "/" not in raw_room
    if attempt.upgrade and is_ws_route and attempt.method == "GET" \
            and attempt.origin not in (None, "own"):
        assert answer.status == 403, "a foreign origin must be refused before the upgrade"
    if answer.status >= 400:
        assert content_type in ("application/json", "text/html"), (content_type, text[:300])
        if attempt.accept == "application/json":
            assert content_type == "application/json", "a JSON caller gets a JSON error"
        if is_browser_page(attempt, path):
            assert content_type == "text/html", "a browser gets an HTML error page"
        if content_type == "application/json":
            body = json.loads(answer.body)
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
            assert isinstance(body["error"]["code"], str) and body["error"]["code"], body
            assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    elif answer.status == 303:
        if path == f"{BASE}/login":  # SPEC section 3: the cookie it sets
            cookie = answer.headers.get("set-cookie", "")
            for part in ("distributor_token=", "HttpOnly", "SameSite=Lax", f"Path={BASE}"):
                assert part.lower() in cookie.lower(), cookie
        location = answer.headers["location"]
        assert location.isascii(), location
        parts = urlsplit(location)  # never an open redirect
        assert not parts.scheme and not parts.netloc and parts.path.startswith(f"{BASE}/"), location
        assert ".." not in unquote(parts.path).split("/"), location
    else:  # 200
        if content_type == "application/json":
            body = json.loads(answer.body)
            assert isinstance(body, dict), body
            if path.endswith("/messages"):
                assert set(body) == {"messages", "has_more"}, body
        if path.startswith(f"{BASE}/static/"):
            assert b"CREATE TABLE" not in answer.body and b"def create_app" not in answer.body
    if path == f"{BASE}/healthz" and attempt.method == "GET" and not attempt.upgrade:
        assert (answer.status, json.loads(answer.body)) == (200, {"status": "ok"})


def check_ws_upgrade(attempt: HttpAttempt, answer: HttpAnswer) -> None:
    """An upgrade happens only on the WebSocket path, then welcome or a SPEC close code."""
    assert attempt.upgrade and attempt.method == "GET", attempt
    assert decoded_path(attempt.target).startswith(f"{BASE}/ws/chat/"), attempt
    assert attempt.origin in (None, "own"), "upgraded a foreign origin"
    opcode, payload = answer.ws_frame
    if opcode == 0x1:
        frame = json.loads(payload)
        assert frame["type"] == "welcome", frame
        assert frame["user_id"] in {frame_user["user_id"] for frame_user in frame["participants"]}
    else:
        assert opcode == 0x8, answer.ws_frame
        code = int.from_bytes(payload[:2], "big")
        assert code in (4401, 4403, 4404, 1008), (code, payload)


def test_arbitrary_http_requests_get_spec_statuses_and_bodies(server_process):
    """Any path and query on every endpoint: a SPEC status and body, never 500 or a trace."""
    server = fuzz_server(server_process)
    statuses: dict[int, int] = {}
    started = time.monotonic()
    with asyncio.Runner() as runner:
        @settings(FUZZ, max_examples=HTTP_EXAMPLES)
        @given(attempt=HTTP_ATTEMPTS)
        def check(attempt: HttpAttempt) -> None:
            answer = runner.run(http_exchange(server.port, request_bytes(attempt, server.port)))
            note(f"answer: {answer.status} {answer.headers} {answer.body[:300]!r} {answer.ws_frame}")
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
            check_http_answer(attempt, answer)

        check()
        runner.run(healthz_once(server.base_url))
    check_server_healthy(server)
    assert {101, 200, 303, 400, 401, 403, 404, 405} <= statuses.keys(), statuses
    print(f"\nhttp: {sum(statuses.values())} requests {dict(sorted(statuses.items()))} "
          f"in {time.monotonic() - started:.1f} s")


async def healthz_once(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        await healthz(session, base_url)


# ============================================== 3. Unicode round trips ===

ATOMS = [
    "👨\u200d👩\u200d👧\u200d👦",  # family: a ZWJ sequence of 7 code points
    "👩🏽\u200d💻", "🏳️\u200d🌈", "🇰🇷", "😀", "\U0001F9D1\U0001F3FF",
    "مرحبا بالعالم", "שלום", "\u202eabc\u202c", "\u200f", "\u200e",  # RTL text and marks
    "e\u0301", "a\u0308\u0323", "\u0915\u094d\u0937", "Z\u0351\u0345\u036b",  # combining marks
    "\ufeff", "\u200b", "\u2060", "\u00ad",  # BOM, zero-width and soft hyphen: not whitespace
    "안녕하세요", "한글", "\u1100\u1161\u11a8", "ㅋㅋㅋ",  # Korean, also as conjoining jamo
    "\U00010000", "\U0010FFFF", "𝕳𝖊𝖑𝖑𝖔", "\U0002A6D6", "\ue000", "\ufffd", "\ufffe", "\uffff",
    "\x00",  # NUL: refused
    " ", "\t", "\n", "\r\n", "\u3000", "\u2028", "\u2029", "\u00a0", "\x85", "\x0b", "\x1c",
    "\x7f", "\x1b[31m", "\x01",
    "<b>&amp;</b>", '"\\/', "'", "{}", "\\u0000", "%00", "\u0130", "ß", "ﬁ",
]
UNICODE_CONTENTS = st.lists(
    # codec="utf-8": no surrogates here, they have their own test below
    weighted((2, st.sampled_from(ATOMS)), (1, st.text(st.characters(codec="utf-8"), max_size=8)),
             (1, st.text(st.characters(min_codepoint=0x10000), max_size=6))),
    max_size=14).map("".join)


def expected_unicode_outcome(content: str) -> tuple[str, str | None]:
    """SPEC section 5: NUL → invalid_message; trimmed, then 1..max code points. What is
    stored is the trimmed text; "trimmed" is Python's str.strip, the server's own
    reading, since SPEC does not list which characters count as white space."""
    if "\x00" in content:
        return "error:invalid_message", None
    stored = content.strip()
    if not stored:
        return "error:empty", None
    if len(stored) > UNICODE_MAX_CHARS:
        return "error:too_long", None
    return "ack", stored


class UnicodeHarness:
    def __init__(self, server) -> None:
        self.server = server
        self.client_ids = (f"u{number}" for number in itertools.count(1))
        self.counts: dict[str, int] = {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        self.sockets = {user_id: await open_socket(self.session, self.server.base_url, user_id)
                        for user_id in ("m1", "t1")}
        self.db = read_only(self.server.db_path)

    async def stop(self) -> None:
        self.db.close()
        for ws in self.sockets.values():
            await ws.close()
        await self.session.close()

    def stored_bytes(self, client_id: str) -> list[bytes]:
        return [row[0] for row in self.db.execute(
            "SELECT CAST(content AS BLOB) FROM messages WHERE client_id = ?", (client_id,))]

    async def send_and_answer(self, sender: str, raw: str, client_id: str) -> tuple[dict, list[dict]]:
        """The answer (ack or error) to a raw frame, and the frames before it."""
        await self.sockets[sender].send_str(raw)
        frames, closed = await collect(
            self.sockets[sender],
            lambda f: f["type"] in ("ack", "error") and f.get("client_id") == client_id)
        assert closed is None, f"socket closed with {closed}"
        return frames[-1], frames[:-1]

    async def round_trip(self, sender: str, content: str, ascii_only: bool) -> None:
        receiver = "t1" if sender == "m1" else "m1"
        client_id = next(self.client_ids)
        outcome, expected = expected_unicode_outcome(content)
        raw = json.dumps({"type": "chat", "content": content, "client_id": client_id},
                         ensure_ascii=ascii_only)
        answer, before = await self.send_and_answer(sender, raw, client_id)
        got = "ack" if answer["type"] == "ack" else f"error:{answer['code']}"
        self.counts[got] = self.counts.get(got, 0) + 1
        assert got == outcome, f"{answer}; SPEC says {outcome}"
        if outcome != "ack":
            assert self.stored_bytes(client_id) == [], "a refused message was stored"
            await self.check_not_delivered(receiver, client_id)
            return
        message_id = answer["id"]
        own = [f for f in before if f.get("client_id") == client_id]
        assert [f["content"] for f in own] == [expected], own  # the sender's other tabs
        live = await receive_chat(self.sockets[receiver], client_id)
        assert (live["id"], live["content"]) == (message_id, expected), live
        response = await get_within_read_limit(
            self.session, f"{self.server.base_url}{ROOMS}/{ROOM}/messages",
            params={"after": str(message_id - 1), "limit": "1"}, headers=bearer(receiver))
        async with response:
            assert response.status == 200, await response.text()
            page = (await response.json())["messages"]
        assert [(m["id"], m["content"]) for m in page] == [(message_id, expected)], page
        assert self.stored_bytes(client_id) == [expected.encode("utf-8")]  # byte for byte

    async def check_not_delivered(self, receiver: str, client_id: str) -> None:
        """A marker from the receiver comes back after anything the refusal sent it."""
        frames, _ = await marked(self.sockets[receiver])
        assert not [f for f in frames if f.get("client_id") == client_id], frames

    async def lone_surrogate(self, sender: str, content: str) -> None:
        client_id = next(self.client_ids)
        raw = json.dumps({"type": "chat", "content": content, "client_id": client_id})  # \udXXX
        assert "\\ud" in raw
        answer, _ = await self.send_and_answer(sender, raw, client_id)
        self.counts["surrogate-refused"] = self.counts.get("surrogate-refused", 0) + 1
        assert answer["type"] == "error", answer
        assert (answer["code"], answer["client_id"]) == ("invalid_message", client_id), answer
        assert self.stored_bytes(client_id) == []
        await self.check_not_delivered("t1" if sender == "m1" else "m1", client_id)


async def get_within_read_limit(session: aiohttp.ClientSession, url: str, **options):
    """A client that honours SPEC 5's 10 history reads a second: on 429 it asks again
    a moment later (the fuzzing reads back every message it sends)."""
    deadline = time.monotonic() + 10
    while True:
        response = await session.get(url, **options)
        if response.status != 429:
            return response
        response.release()
        assert time.monotonic() < deadline, "still rate limited after 10 s"
        await asyncio.sleep(0.1)


async def receive_chat(ws, client_id: str) -> dict:
    frames, closed = await collect(ws, lambda f: f["type"] == "chat" and f["client_id"] == client_id)
    assert closed is None, f"socket closed with {closed}"
    return frames[-1]


def run_unicode_property(server_process, property_name: str, strategy, examples: int) -> dict:
    server = fuzz_server(server_process, "--max-message-chars", str(UNICODE_MAX_CHARS))
    harness = UnicodeHarness(server)
    started = time.monotonic()
    with asyncio.Runner() as runner:
        runner.run(harness.start())
        try:
            @settings(FUZZ, max_examples=examples)
            @given(case=strategy)
            def check(case) -> None:
                runner.run(getattr(harness, property_name)(*case))

            check()
        finally:
            runner.run(harness.stop())
    rows = stored_rows_with_rooms(server.db_path)
    check_rows_follow_spec(rows, UNICODE_MAX_CHARS)
    check_server_healthy(server)
    print(f"\n{property_name}: {sum(harness.counts.values())} sends {harness.counts} "
          f"in {time.monotonic() - started:.1f} s")
    return harness.counts


def test_any_unicode_content_round_trips_exactly(server_process):
    """Sent, acked, delivered, stored and served back byte for byte (after SPEC's trim)."""
    counts = run_unicode_property(
        server_process, "round_trip",
        st.tuples(SENDERS, UNICODE_CONTENTS, st.booleans()), UNICODE_EXAMPLES)
    assert {"ack", "error:invalid_message", "error:empty", "error:too_long"} <= counts.keys(), counts
    assert counts["ack"] >= UNICODE_EXAMPLES // 2, counts  # mostly real round trips


def test_a_lone_surrogate_is_refused_and_nothing_is_stored(server_process):
    """A lone surrogate escape anywhere in the content: invalid_message, nothing stored or sent."""
    contents = st.builds(lambda before, surrogate, after: before + surrogate + after,
                         UNICODE_CONTENTS.map(lambda text: text.replace("\x00", "")),
                         SURROGATES, UNICODE_CONTENTS.map(lambda text: text.replace("\x00", "")))
    counts = run_unicode_property(server_process, "lone_surrogate", st.tuples(SENDERS, contents),
                                  SURROGATE_EXAMPLES)
    assert counts.keys() == {"surrogate-refused"}, counts
