"""Distributor Chat: a gym's trainer-member chat in one file.

Personal trainers chat 1:1 with their PT members, one room per PT session
(``pt_<session_id>``), and can "spread" an announcement to all their rooms.
Live over WebSocket, stored in SQLite, signed in with JWTs.

Sections, top to bottom (``grep -n '# ===' distributor_chat.py``):
settings, metrics, storage, auth, frames, chat hub, photos, push, HTTP, WebSocket,
app, connections, CLI.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import gc
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from http import HTTPStatus
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import quote, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if __name__ == "__main__":
    # The server verifies HS256 only. PyJWT imports cryptography's X.509 stack
    # whenever it is installed, for asymmetric algorithms we refuse anyway, at a
    # cost in memory and startup time. Keep it out of the server process (not
    # of importers such as tests, which may need it themselves).
    sys.modules.setdefault("cryptography", None)

import aiohttp_jinja2
import aiosqlite
import jinja2
import jwt
import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractAccessLogger, AbstractResolver
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("distributor_chat")

# ========================================================== settings ===

HERE = Path(__file__).resolve().parent
SCHEMA_PATH = HERE / "schema.sql"
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = (HERE / "static").resolve()

BASE_PATH = "/distributor"
ROOMS_PATH = f"{BASE_PATH}/chat/rooms"
ENV_PREFIX = "DISTRIBUTOR_"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
VERSION = "1.1.0"

MAX_BODY_BYTES = 64 * 1024
MAX_FRAME_BYTES = 64 * 1024
CLIENT_ID_MAX_CHARS = 64
USER_ID_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
USER_NAME_MAX_CHARS = 100
ROOM_ID_PATTERN = re.compile(r"pt_([1-9][0-9]{0,17})")

SERVER_NAME = "distributor-chat"  # the Server header: no software version

# Connections (SPEC 2). A request's headers must arrive whole and soon, so an
# unfinished one holds neither a file descriptor nor memory for long.
HEADERS_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 16 * 1024
KEEPALIVE_TIMEOUT_S = 15.0
MAX_CONNECTIONS_PER_IP = 1000  # a gym's members often share one address
# Descriptors kept back from connections: the database files, the listener,
# the event loop's own, logs. Past the rest, the oldest idle connection goes.
RESERVED_FILE_DESCRIPTORS = 64
ACCEPT_ERROR_LOG_INTERVAL_S = 60.0

PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 100
HISTORY_LATEST_COUNT = 50
HISTORY_RESUME_MAX = 500

PING_INTERVAL_S = 20.0
SLOW_PEER_TIMEOUT_S = 10.0
OUTBOX_MAX_BYTES = 1024 * 1024
# A history frame bigger than this is cut (has_more: true): a long catch-up must
# never fill the outbox, or the client is closed as slow on every reconnect.
HISTORY_MAX_BYTES = OUTBOX_MAX_BYTES // 2
PEER_BUFFER_HIGH_BYTES = 256 * 1024
PEER_BUFFER_POLL_S = 0.01
CLOSE_HANDSHAKE_TIMEOUT_S = 2.0
SHUTDOWN_FLUSH_TIMEOUT_S = 1.0
SHUTDOWN_SOCKETS_TIMEOUT_S = 2.5
PRESENCE_GRACE_S = 5.0
MAX_SOCKETS_PER_USER = 20
WRITES_IN_FLIGHT_PER_SOCKET = 32  # a socket's chats, spreads and reads not yet committed
# Per user, over all their sockets and requests (SPEC 5): socket opens, and
# history reads (messages requests and resumes), each 10 a second, burst 40.
OPENS_PER_S = 10.0
HISTORY_READS_PER_S = 10.0
OPEN_AND_READ_BURST = 40.0
# Pings and pongs on one socket; aiohttp's own answering loop never yields.
MAX_CONTROL_FRAMES_PER_S = 50
MAX_PUSH_SUBSCRIPTIONS = 10  # per user; the oldest goes
PUSH_RETRY_FIRST_S_DEFAULT = 1.0
PHOTO_UNSENT_KEEP_S = 86_400.0  # an upload never sent is deleted after a day
PHOTO_CLEANUP_INTERVAL_S = 3_600.0
# Connections waiting to be accepted. When every client reconnects at once (a
# restart, a Wi-Fi blip), a short queue drops SYNs and each dropped client
# waits a full second to retry; the kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 2048
RATE_BURST_FACTOR = 4
# Objects allocated between young collections (CPython's default: 700). Under
# load the default runs a full collection many times a minute, each a pause.
GC_YOUNG_THRESHOLD = 10_000
TYPING_RELAY_INTERVAL_S = 0.5
ADMIN_POLL_INTERVAL_S = 1.0

DEFAULT_TOKEN_TTL = "12h"
TTL_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

TOKEN_COOKIE = "distributor_token"

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    db_path: Path = Path("distributor_chat.db")
    secret: str | None = None
    allowed_origins: tuple[str, ...] = ()
    tz: tzinfo | None = None  # None: the machine's own zone
    tz_name: str | None = None
    max_message_chars: int = 2000
    rate_limit: float = 5.0
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    trust_proxy: bool = False
    metrics_token: str | None = None
    log_format: str = "text"
    public_url: str | None = None
    show_qr: bool = False
    vapid_private_key: str | None = None  # None: one made once and kept in the database
    push_contact: str | None = None
    push_allow_hosts: tuple[str, ...] = ()
    push_preview: bool = True
    push_retry_first_s: float = PUSH_RETRY_FIRST_S_DEFAULT  # tests shorten it
    max_photo_mb: int = 10
    photo_unsent_keep_s: float = PHOTO_UNSENT_KEEP_S  # tests shorten these two
    photo_cleanup_interval_s: float = PHOTO_CLEANUP_INTERVAL_S
    ping_interval_s: float = PING_INTERVAL_S  # also how soon a dead peer is dropped
    log_level: str = "info"
    demo: bool = True


def machine_tz_name() -> str | None:
    """The IANA name of the machine's zone, so the browser can show the same times."""
    if os.environ.get("TZ"):
        return os.environ["TZ"].lstrip(":") or None
    try:
        target = os.path.realpath("/etc/localtime")
    except OSError:
        return None
    marker = "/zoneinfo/"
    return target.split(marker, 1)[1] if marker in target else None


def compact_json(value: Any) -> str:
    """JSON as sent: UTF-8 as it is (an emoji is 4 bytes, not a 12-byte escape)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def utc_now_iso() -> str:
    return utc_iso_at(time.time())


def utc_iso_at(timestamp: float) -> str:
    """A moment as stored times are written: ISO 8601 UTC, milliseconds, 'Z'."""
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Line breaks and other control characters (C0, DEL, C1, Unicode's line and
# paragraph separators), and the backslash that escapes them.
LOG_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")


def _escaped(match: re.Match) -> str:
    char = match.group()
    return "\\\\" if char == "\\" else f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def log_event(level: int, event: str, **fields: Any) -> None:
    """One line per event, with its fields: `event key=value ...` in the text log,
    an object in the JSON one. Never a token, a cookie or message content."""
    if log.isEnabledFor(level):
        log.log(level, "%s", event, extra={"event": event, "fields": fields})


class EscapingFormatter(logging.Formatter):
    """The text log. One event, one line: no input (a path, a room id, a header)
    can start a forged line, since control characters in a message are escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if fields is not None:
            record.message = " ".join([record.event, *(f"{name}={value}"
                                                       for name, value in fields.items())])
        record.message = LOG_UNSAFE_CHARACTERS.sub(_escaped, record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """The JSON log (--log-format json): one object a line with ts, level, event
    and the event's fields; JSON escapes every control character."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": datetime.fromtimestamp(record.created, timezone.utc)
                .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname.lower(),
                "event": getattr(record, "event", record.name.replace(".", "_"))}
        fields = getattr(record, "fields", None)
        line.update({"message": record.getMessage()} if fields is None else fields)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def room_id_of(session_id: int) -> str:
    return f"pt_{session_id}"


def session_id_of(room_id: str) -> int | None:
    """The session behind a room id, or None for anything not ``pt_<digits>``."""
    match = ROOM_ID_PATTERN.fullmatch(room_id or "")
    return int(match.group(1)) if match else None


# =========================================================== metrics ===
#
# Counters and histograms in Prometheus' text format, for GET /distributor/
# metrics (--metrics-token). Kept by plain dict increments, and a batch's
# timing once per batch, not per message. Gauges are read at scrape time.

PROCESS_STARTED_AT = time.time()
COMMIT_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WRITE_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # observations at or below each bound
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)  # the first bound >= value
        if index < len(self.buckets):
            self.counts[index] += 1
        self.count += 1
        self.total += value


class Metrics:
    """What the server counts, labelled as SPEC 8 names it."""

    def __init__(self) -> None:
        self.messages_stored: collections.Counter[str] = collections.Counter()  # by type
        self.errors: collections.Counter[str] = collections.Counter()  # error frames, by code
        self.closes: collections.Counter[int] = collections.Counter()  # sockets, by close code
        self.push_sent: collections.Counter[str] = collections.Counter()  # by outcome
        self.commit_seconds = Histogram(COMMIT_SECONDS_BUCKETS)
        self.write_batch_size = Histogram(WRITE_BATCH_SIZE_BUCKETS)

    def render(self, *, sockets_open: int, rooms_live: int) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {prometheus_number(value)}" for labels, value in samples)

        def labelled(label: str, counts: collections.Counter) -> list[tuple[str, float]]:
            return [(f'{{{label}="{key}"}}', count) for key, count in sorted(counts.items())]

        def histogram(name: str, help_text: str, histogram: Histogram) -> None:
            cumulative, samples = 0, []
            for bound, count in zip(histogram.buckets, histogram.counts):
                cumulative += count
                samples.append((f'_bucket{{le="{bound:g}"}}', cumulative))
            samples += [('_bucket{le="+Inf"}', histogram.count), ("_sum", histogram.total),
                        ("_count", histogram.count)]
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} histogram")
            lines.extend(f"{name}{suffix} {prometheus_number(value)}" for suffix, value in samples)

        family("distributor_sockets_open", "gauge", "Open WebSockets.", [("", sockets_open)])
        family("distributor_rooms_live", "gauge", "Rooms with at least one open WebSocket.",
               [("", rooms_live)])
        family("distributor_messages_stored_total", "counter", "Messages stored, by type.",
               labelled("type", self.messages_stored))
        family("distributor_errors_total", "counter", "Error frames sent, by code.",
               labelled("code", self.errors))
        family("distributor_closes_total", "counter", "WebSockets closed, by close code.",
               labelled("code", self.closes))
        family("distributor_push_sent_total", "counter", "Web Push deliveries, by outcome.",
               labelled("outcome", self.push_sent))
        histogram("distributor_commit_seconds", "One write batch's transaction, BEGIN to COMMIT.",
                  self.commit_seconds)
        histogram("distributor_write_batch_size", "Writes committed in one transaction.",
                  self.write_batch_size)
        family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
               [("", resident_memory_bytes())])
        family("process_start_time_seconds", "gauge", "Start time of the process since the epoch.",
               [("", PROCESS_STARTED_AT)])
        return "\n".join(lines) + "\n"


def prometheus_number(value: float) -> str:
    """Counts exactly (no exponent that rounds a large count), times as they are."""
    return str(value) if isinstance(value, int) else repr(float(value))


def resident_memory_bytes() -> int:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):  # not Linux: the peak, as getrusage knows it
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


# =========================================================== storage ===
#
# Everything that knows the database is here: the sections below talk to one
# Storage (the app's, or a management command's) and never to a driver.
#
# One writer task owns the only write connection: handlers queue a Write and
# are answered after COMMIT, many writes sharing one transaction. Reads use a
# second connection (WAL), so they never see an uncommitted batch.
#
# The statements below are shared by every engine; what only SQLite says (JSON
# built in SQL, PRAGMAs, BEGIN IMMEDIATE, its error classes) belongs to
# SqliteEngine, the seam another engine plugs into.

import sqlite3  # noqa: E402  (the one section that knows the driver)

# A batch is everything waiting when the writer turns to it, up to this: the
# cost of a COMMIT (an fsync) is shared by all of it.
WRITE_BATCH_MAX = 4096
WRITE_QUEUE_MAX = 10_000

COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"
SAVEPOINT_WRITE = "SAVEPOINT one_write"
ROLLBACK_TO_WRITE = "ROLLBACK TO one_write"
RELEASE_WRITE = "RELEASE one_write"

# Schema versions live in PRAGMA user_version; 0 is the first released schema.
# schema.sql is always the whole current schema. An older database is brought
# up to it in one transaction at start: the steps below (what schema.sql's
# CREATE ... IF NOT EXISTS cannot do, such as a new column), then schema.sql.
SCHEMA_VERSION = 3
SCHEMA_UPGRADES: dict[int, tuple[str, ...]] = {
    1: (),  # revoked_tokens: a new table only
    2: (),  # push_subscriptions: a new table only
    3: ("ALTER TABLE messages ADD COLUMN photo_id TEXT REFERENCES photos (id)",),  # and photos
}
SELECT_SCHEMA_VERSION = "PRAGMA user_version"
HAS_USERS_TABLE = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'users'"
INTEGRITY_CHECK = "PRAGMA integrity_check(20)"
BACKUP_INTO = "VACUUM INTO :path"
COUNT_SESSIONS = "SELECT count(*) FROM pt_sessions"
COUNT_MESSAGES = "SELECT count(*) FROM messages"
COUNT_PHOTOS = "SELECT count(*) FROM photos"
HAS_PHOTOS_TABLE = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'photos'"

# A value made once and kept (the JWT secret, the VAPID key): the first one stays.
SELECT_KEPT_VALUE = "SELECT value FROM meta WHERE key = :key"
INSERT_KEPT_VALUE = """
    INSERT INTO meta (key, value) VALUES (:key, :value) ON CONFLICT (key) DO NOTHING
"""
SELECT_ADMIN_VERSION = "SELECT value FROM meta WHERE key = 'admin_version'"
BUMP_ADMIN_VERSION = """
    INSERT INTO meta (key, value) VALUES ('admin_version', '1')
    ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1
"""
SELECT_HEALTH = "SELECT 1"

COUNT_USERS = "SELECT count(*) FROM users"
SELECT_USER = "SELECT id, name, role FROM users WHERE id = :user_id"
# Signing in reads the user and whether this token was signed out of, in one trip.
SELECT_USER_FOR_TOKEN = """
    SELECT id, name, role,
           EXISTS (SELECT 1 FROM revoked_tokens WHERE token_hash = :token_hash) AS is_revoked
      FROM users WHERE id = :user_id
"""
INSERT_REVOKED_TOKEN = """
    INSERT INTO revoked_tokens (token_hash, expires_at) VALUES (:token_hash, :expires_at)
    ON CONFLICT (token_hash) DO NOTHING
"""
DELETE_EXPIRED_REVOCATIONS = "DELETE FROM revoked_tokens WHERE expires_at < :now"
DELETE_SUBSCRIPTION = "DELETE FROM push_subscriptions WHERE endpoint = :endpoint"
DELETE_OWN_SUBSCRIPTION = """
    DELETE FROM push_subscriptions WHERE endpoint = :endpoint AND user_id = :user_id
"""
INSERT_SUBSCRIPTION = """
    INSERT INTO push_subscriptions (endpoint, user_id, p256dh, auth, created_at)
    VALUES (:endpoint, :user_id, :p256dh, :auth, :created_at)
"""
TRIM_SUBSCRIPTIONS = """
    DELETE FROM push_subscriptions
     WHERE user_id = :user_id
       AND id NOT IN (SELECT id FROM push_subscriptions WHERE user_id = :user_id
                       ORDER BY id DESC LIMIT :keep)
"""
SELECT_SUBSCRIPTIONS = """
    SELECT endpoint, p256dh, auth FROM push_subscriptions WHERE user_id = :user_id ORDER BY id
"""
SELECT_UNREAD_TOTAL = "SELECT coalesce(sum(unread_count), 0) FROM read_state WHERE user_id = :user_id"
INSERT_USER = """
    INSERT INTO users (id, name, role, created_at) VALUES (:user_id, :name, :role, :created_at)
"""
UPDATE_USER = "UPDATE users SET name = :name, role = :role WHERE id = :user_id"

SELECT_ROOM = """
    SELECT id AS session_id, trainer_id, member_id, status, created_at
      FROM pt_sessions WHERE id = :session_id
"""
INSERT_SESSION = """
    INSERT INTO pt_sessions (trainer_id, member_id, created_at)
    VALUES (:trainer_id, :member_id, :created_at) RETURNING id
"""
INSERT_SESSION_WITH_ID = """
    INSERT INTO pt_sessions (id, trainer_id, member_id, created_at)
    VALUES (:session_id, :trainer_id, :member_id, :created_at)
"""
UPDATE_SESSION_PARTICIPANTS = """
    UPDATE pt_sessions SET trainer_id = :trainer_id, member_id = :member_id
     WHERE id = :session_id AND (trainer_id != :trainer_id OR member_id != :member_id)
"""
END_SESSION = "UPDATE pt_sessions SET status = 'ended' WHERE id = :session_id"
COUNT_SESSIONS_WITH_WRONG_ROLES = """
    SELECT count(*) FROM pt_sessions s
      JOIN users t ON t.id = s.trainer_id
      JOIN users m ON m.id = s.member_id
     WHERE t.role != 'trainer' OR m.role != 'member'
"""

SELECT_PARTICIPANTS = """
    SELECT u.id AS user_id, u.name, u.role, coalesce(r.last_read_id, 0) AS last_read_id
      FROM pt_sessions s
      JOIN users u ON u.id IN (s.trainer_id, s.member_id)
      LEFT JOIN read_state r ON r.session_id = s.id AND r.user_id = u.id
     WHERE s.id = :session_id
     ORDER BY u.role = 'member'
"""

# A message row as every reader of messages gets it: its photo's size comes
# from the photos row (never its images, which lie past these columns).
MESSAGE_COLUMNS = """
    m.id, m.session_id, m.user_id, u.name AS sender_name, m.type, m.content, m.client_id,
    m.created_at, m.photo_id, p.width AS photo_width, p.height AS photo_height
"""
MESSAGE_JOINS = """
    JOIN users u ON u.id = m.user_id LEFT JOIN photos p ON p.id = m.photo_id
"""
_MESSAGE_COLUMNS = f"SELECT {MESSAGE_COLUMNS} FROM messages m {MESSAGE_JOINS}"
SELECT_MESSAGES_LATEST = _MESSAGE_COLUMNS + """
     WHERE m.session_id = :session_id ORDER BY m.id DESC LIMIT :limit
"""
SELECT_MESSAGES_BEFORE = _MESSAGE_COLUMNS + """
     WHERE m.session_id = :session_id AND m.id < :before_id ORDER BY m.id DESC LIMIT :limit
"""
SELECT_MESSAGES_AFTER = _MESSAGE_COLUMNS + """
     WHERE m.session_id = :session_id AND m.id > :after_id ORDER BY m.id LIMIT :limit
"""

SELECT_MESSAGE_BY_CLIENT_ID = """
    SELECT id, created_at FROM messages
     WHERE session_id = :session_id AND user_id = :user_id AND client_id = :client_id
"""
SELECT_ROOM_STATUS = """
    SELECT status, :user_id IN (trainer_id, member_id) AS is_participant
      FROM pt_sessions WHERE id = :session_id
"""
INSERT_SPREAD_MESSAGES = """
    INSERT INTO messages (session_id, user_id, type, content, client_id, created_at)
    SELECT id, :user_id, 'spread', :content, :client_id, :created_at
      FROM pt_sessions
     WHERE trainer_id = :user_id AND status = 'active'
    ON CONFLICT (session_id, user_id, client_id) DO NOTHING
    RETURNING id, session_id,
              (SELECT member_id FROM pt_sessions WHERE pt_sessions.id = messages.session_id)
"""
COUNT_SPREAD_ROOMS = """
    SELECT count(*) FROM messages m JOIN pt_sessions s ON s.id = m.session_id
     WHERE s.trainer_id = :user_id AND m.user_id = :user_id
       AND m.client_id = :client_id AND m.type = 'spread'
"""
# Never moves back; an id past the room's last counts as the last. The unread
# recount walks only the messages after the new pointer (usually none).
# Photos (SPEC 9). A photo is served to its room's participants only; to anyone
# else it does not exist.
INSERT_PHOTO = """
    INSERT INTO photos (id, session_id, user_id, media_type, width, height, created_at,
                        thumb, image)
    VALUES (:photo_id, :session_id, :user_id, :media_type, :width, :height, :created_at,
            :thumb, :image)
"""
SELECT_PHOTO = """
    SELECT id, session_id, user_id, width, height FROM photos WHERE id = :photo_id
"""
_PHOTO_FOR_VIEWER = """
    SELECT p.media_type, p.{column} FROM photos p JOIN pt_sessions s ON s.id = p.session_id
     WHERE p.id = :photo_id AND :user_id IN (s.trainer_id, s.member_id)
"""
SELECT_PHOTO_IMAGE = _PHOTO_FOR_VIEWER.format(column="image")
SELECT_PHOTO_THUMB = _PHOTO_FOR_VIEWER.format(column="thumb")
DELETE_UNSENT_PHOTOS = """
    DELETE FROM photos
     WHERE created_at < :cutoff
       AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.photo_id = photos.id)
"""

UPDATE_READ_POINTER = """
    WITH target AS (
        SELECT min(:message_id, coalesce(last_message_id, 0)) AS read_id
          FROM pt_sessions WHERE id = :session_id
    )
    UPDATE read_state
       SET last_read_id = (SELECT read_id FROM target),
           unread_count = (SELECT count(*) FROM messages
                            WHERE session_id = :session_id AND user_id != :user_id
                              AND id > (SELECT read_id FROM target))
     WHERE session_id = :session_id AND user_id = :user_id
       AND last_read_id < (SELECT read_id FROM target)
    RETURNING last_read_id
"""


class StorageUnavailable(Exception):
    """Storage could not take a read or a write (locked, full, read-only, busy):
    nothing was stored; the caller may try again later."""


class SchemaTooNew(StorageUnavailable):
    """The database was made by a newer program: it is refused, never touched."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the database's schema version {version} is newer than this program's "
                         f"({SCHEMA_VERSION}); run a newer distributor_chat.py")
        self.version = version


class RoomClosed(Exception):
    """The room's session has ended: it accepts reads only."""


class NotParticipant(Exception):
    """A management change moved the sender out of the room a moment ago."""


class PhotoNotSendable(Exception):
    """The photo is not the sender's upload in this room, or was sent already."""


@dataclass(slots=True)
class StoredMessage:
    message_id: int
    created_at: str
    is_duplicate: bool


@dataclass(slots=True)
class StoredSpread:
    message_id: int  # in the sender's room
    created_at: str
    room_count: int
    is_duplicate: bool
    message_ids_by_session: dict[int, int] = field(default_factory=dict)
    member_ids_by_session: dict[int, str] = field(default_factory=dict)  # who may need a push


def local_minute_formatter(zone: tzinfo | None) -> Callable[[str | None], str | None]:
    """'YYYY-MM-DD HH:MM' in the zone for an ISO UTC time (NULL stays NULL); the
    room list's SQL calls it once per room. Zones shift by whole minutes, so the
    UTC minute decides it, and a plain dict caches it: SQLite calls back through
    the GIL, so the callback must be light."""
    formatted: dict[str, str] = {}

    def local_minute(iso_utc: str | None) -> str | None:
        if iso_utc is None:
            return None
        utc_minute = iso_utc[:16]
        text = formatted.get(utc_minute)
        if text is None:
            if len(formatted) >= 4096:  # bounded: a long-running server sees new minutes
                formatted.clear()
            moment = datetime.fromisoformat(utc_minute + ":00+00:00")
            text = formatted[utc_minute] = moment.astimezone(zone).strftime("%Y-%m-%d %H:%M")
        return text

    return local_minute


class SqliteEngine:
    """What only SQLite says. A connection runs the shared statements as they
    are (named parameters); the few that SQLite alone accepts are here."""

    name = "sqlite"
    # Take the write lock when the transaction begins, so a batch never fails
    # half-way on a lock another process holds.
    BEGIN = "BEGIN IMMEDIATE"
    PRAGMAS = """
        PRAGMA journal_mode = WAL;
        PRAGMA synchronous = FULL;
        PRAGMA foreign_keys = ON;
    """
    SCHEMA = SCHEMA_PATH.read_text(encoding="utf-8")
    WRITER_BUSY_TIMEOUT_MS = 1000
    READER_BUSY_TIMEOUT_MS = 2000
    unavailable_errors: tuple[type[Exception], ...] = (sqlite3.Error,)  # locked, full, I/O
    refused_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)  # this write only

    # Each row is one room already as JSON text: SQLite builds the objects in C, so
    # a 300-room list costs no Python dict per room and no json.dumps. local_minute()
    # is registered on the read connection (it needs the configured zone).
    _ROOM_LIST_JSON = """
        SELECT json_object('id', 'pt_' || s.id, 'member_name', m.name, 'trainer_name', t.name,
                           'last_activity', local_minute(coalesce(last.created_at, s.created_at)),
                           'last_message', CASE WHEN last.content = '' AND last.photo_id IS NOT NULL
                                                THEN :photo_preview ELSE last.content END,
                           'unread_count', coalesce(r.unread_count, 0),
                           'status', s.status) AS room_json
          FROM pt_sessions s
          JOIN users t ON t.id = s.trainer_id
          JOIN users m ON m.id = s.member_id
          LEFT JOIN messages last ON last.id = s.last_message_id
          LEFT JOIN read_state r ON r.session_id = s.id AND r.user_id = :user_id
    """
    _NEWEST_ROOM_FIRST = " ORDER BY coalesce(last.created_at, s.created_at) DESC, s.id DESC"
    SELECT_ROOMS_OF_TRAINER = _ROOM_LIST_JSON + " WHERE s.trainer_id = :user_id" + _NEWEST_ROOM_FIRST
    SELECT_ROOMS_OF_MEMBER = _ROOM_LIST_JSON + " WHERE s.member_id = :user_id" + _NEWEST_ROOM_FIRST

    # A socket's first history, cut near HISTORY_MAX_BYTES inside SQLite, so a
    # resume over hundreds of long messages never brings them all into Python.
    # `sized` measures the content nearest the client first; the rows go up to
    # the first one whose running total reaches :max_bytes, so the caller sees
    # that more lie beyond.
    SELECT_HISTORY_AFTER = f"""
        WITH sized AS (
            SELECT id, sum(length(CAST(content AS BLOB))) OVER (ORDER BY id) AS bytes_through
              FROM messages WHERE session_id = :session_id AND id > :after_id
             ORDER BY id LIMIT :limit)
        SELECT {MESSAGE_COLUMNS}, sized.bytes_through
          FROM sized JOIN messages m ON m.id = sized.id {MESSAGE_JOINS}
         WHERE sized.id <= coalesce((SELECT min(id) FROM sized WHERE bytes_through >= :max_bytes),
                                    sized.id)
         ORDER BY m.id
    """
    SELECT_HISTORY_LATEST = f"""
        WITH sized AS (
            SELECT id, sum(length(CAST(content AS BLOB))) OVER (ORDER BY id DESC) AS bytes_through
              FROM messages WHERE session_id = :session_id
             ORDER BY id DESC LIMIT :limit)
        SELECT {MESSAGE_COLUMNS}, sized.bytes_through
          FROM sized JOIN messages m ON m.id = sized.id {MESSAGE_JOINS}
         WHERE sized.id >= coalesce((SELECT max(id) FROM sized WHERE bytes_through >= :max_bytes),
                                    sized.id)
         ORDER BY m.id DESC
    """

    # A whole batch of chats in one statement (one trip to the writer's thread):
    # :batch is a JSON array of {session_id, user_id, content, client_id,
    # created_at, photo_id}. Rows whose room is closed or not the sender's,
    # whose photo is not the sender's upload in that room, resent client_ids and
    # photos sent already (any unique conflict) are skipped; ids follow the
    # array's order.
    INSERT_CHAT_MESSAGES = """
        INSERT INTO messages (session_id, user_id, type, content, client_id, created_at, photo_id)
        SELECT json_extract(chat.value, '$.session_id'), json_extract(chat.value, '$.user_id'), 'chat',
               json_extract(chat.value, '$.content'), json_extract(chat.value, '$.client_id'),
               json_extract(chat.value, '$.created_at'), json_extract(chat.value, '$.photo_id')
          FROM json_each(:batch) AS chat
         WHERE EXISTS (SELECT 1 FROM pt_sessions AS room
                        WHERE room.id = json_extract(chat.value, '$.session_id')
                          AND room.status = 'active'
                          AND json_extract(chat.value, '$.user_id') IN (room.trainer_id, room.member_id))
           AND (json_extract(chat.value, '$.photo_id') IS NULL
                OR EXISTS (SELECT 1 FROM photos
                            WHERE photos.id = json_extract(chat.value, '$.photo_id')
                              AND photos.session_id = json_extract(chat.value, '$.session_id')
                              AND photos.user_id = json_extract(chat.value, '$.user_id')))
         ORDER BY chat.key
        ON CONFLICT DO NOTHING
        RETURNING id, session_id, user_id, client_id
    """

    def __init__(self, db_path: Path, zone: tzinfo | None) -> None:
        self.db_path = db_path
        self.zone = zone

    async def connect_writer(self, *, busy_timeout_ms: int = WRITER_BUSY_TIMEOUT_MS) -> aiosqlite.Connection:
        """The write connection, the database brought up to SCHEMA_VERSION."""
        db = await self.connect_plain(busy_timeout_ms)
        try:
            await db.executescript(self.PRAGMAS)
            await self._upgrade(db)
        except BaseException:
            await db.close()
            raise
        return db

    async def connect_plain(self, busy_timeout_ms: int = WRITER_BUSY_TIMEOUT_MS) -> aiosqlite.Connection:
        """A connection as it comes, for backup and check: nothing applied."""
        db = await aiosqlite.connect(self.db_path, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            await db.execute_fetchall(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        except BaseException:
            await db.close()
            raise
        return db

    def schema_statements(self) -> list[str]:
        """schema.sql one statement at a time (executescript would commit first)."""
        statements, pending = [], ""
        for line in self.SCHEMA.splitlines(keepends=True):
            pending += line
            if sqlite3.complete_statement(pending):
                statements.append(pending.strip())
                pending = ""
        return [statement for statement in statements if statement.strip(" ;\n")]

    async def _upgrade(self, db: aiosqlite.Connection) -> None:
        """Bring the database to SCHEMA_VERSION in one transaction, or refuse it."""
        await db.execute(self.BEGIN)
        try:
            version = (await db.execute_fetchall(SELECT_SCHEMA_VERSION))[0][0]
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(version)
            is_new_file = not (await db.execute_fetchall(HAS_USERS_TABLE))[0][0]
            if version < SCHEMA_VERSION or is_new_file:
                if not is_new_file:
                    for step in range(version + 1, SCHEMA_VERSION + 1):
                        for statement in SCHEMA_UPGRADES[step]:
                            await db.execute(statement)
                for statement in self.schema_statements():
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
            await db.execute(COMMIT)
        except BaseException:
            with contextlib.suppress(*self.unavailable_errors):
                await db.execute(ROLLBACK)
            raise

    async def connect_reader(self) -> aiosqlite.Connection:
        """A read-only connection; the room list's times are formatted in SQL."""
        db = await aiosqlite.connect(self.db_path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.create_function("local_minute", 1, local_minute_formatter(self.zone),
                                     deterministic=True)
            await db.execute(f"PRAGMA busy_timeout = {self.READER_BUSY_TIMEOUT_MS}")
            await db.execute("PRAGMA query_only = ON")
        except BaseException:
            await db.close()
            raise
        return db

    @staticmethod
    def chat_batch(params_list: list[dict]) -> str:
        return json.dumps(params_list, ensure_ascii=False)


class Transaction:
    """Statements inside one open transaction, the way every engine runs them:
    the writer's batches and the management commands' changes alike."""

    def __init__(self, db: aiosqlite.Connection, engine: SqliteEngine) -> None:
        self.db = db
        self.engine = engine

    async def fetch_all(self, sql: str, params: dict | None = None) -> list:
        return list(await self.db.execute_fetchall(sql, params or {}))

    async def fetch_one(self, sql: str, params: dict | None = None) -> Any:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params: dict | None = None) -> int:
        """Run a statement; how many rows it changed."""
        cursor = await self.db.execute(sql, params or {})
        return cursor.rowcount

    async def insert_chats(self, params_list: list[dict]) -> list:
        """Store a run of chats in one statement: (id, session_id, user_id, client_id) rows."""
        return await self.fetch_all(self.engine.INSERT_CHAT_MESSAGES,
                                    {"batch": self.engine.chat_batch(params_list)})


Outcome = tuple[bool, Any]  # (stored?, the stored result or the exception)


async def _outcome(tx: Transaction, store: Awaitable) -> Outcome:
    """A write refused on its own fails alone; storage-wide errors end the batch.
    Each write is one statement (or reads, then one statement), so a refused
    one leaves nothing behind."""
    try:
        return True, await store
    except (RoomClosed, NotParticipant, PhotoNotSendable) as error:
        return False, error
    except tx.engine.refused_errors as error:
        log_event(logging.WARNING, "write_refused", error=error)
        return False, StorageUnavailable(str(error))


def one_by_one(store_one: Callable[[Transaction, dict], Awaitable]) -> Callable:
    """A store function for the writer, which hands over runs of writes."""
    async def store_each(tx: Transaction, params_list: list[dict]) -> list[Outcome]:
        return [await _outcome(tx, store_one(tx, params)) for params in params_list]
    store_each.__name__ = f"{store_one.__name__}_each"
    return store_each


async def store_chats(tx: Transaction, params_list: list[dict]) -> list[Outcome]:
    """Many chats in one statement; the few it skipped, one by one."""
    rows = await tx.insert_chats(params_list)
    new_ids = {(session_id, user_id, client_id): message_id
               for message_id, session_id, user_id, client_id in rows}
    outcomes = []
    for params in params_list:
        # pop: a client_id sent twice in one batch is new once, then a resend.
        message_id = new_ids.pop((params["session_id"], params["user_id"], params["client_id"]), None)
        if message_id is None:
            outcomes.append(await _outcome(tx, _resent_or_refused(tx, params)))
        else:
            outcomes.append((True, StoredMessage(message_id, params["created_at"], is_duplicate=False)))
    return outcomes


async def _resent_or_refused(tx: Transaction, params: dict) -> StoredMessage:
    earlier = await tx.fetch_all(SELECT_MESSAGE_BY_CLIENT_ID, params)
    if earlier:
        return StoredMessage(earlier[0][0], earlier[0][1], is_duplicate=True)
    # The room takes messages, so the photo was what the insert skipped it for.
    raise await _refusal(tx, params) or PhotoNotSendable()


async def _refusal(tx: Transaction, params: dict) -> Exception | None:
    """Why the sender's room takes no message now, or None when it does."""
    rows = await tx.fetch_all(SELECT_ROOM_STATUS, params)
    if not rows or not rows[0][1]:
        return NotParticipant()
    if rows[0][0] != "active":
        return RoomClosed()
    return None


async def store_spread(tx: Transaction, params: dict) -> StoredSpread:
    earlier = await tx.fetch_all(SELECT_MESSAGE_BY_CLIENT_ID, params)
    if earlier:
        room_count = (await tx.fetch_all(COUNT_SPREAD_ROOMS, params))[0][0]
        return StoredSpread(earlier[0][0], earlier[0][1], room_count, is_duplicate=True)
    refusal = await _refusal(tx, params)
    if refusal is not None:
        raise refusal
    # The sender's room is active and theirs, so the insert below includes it.
    rows = await tx.fetch_all(INSERT_SPREAD_MESSAGES, params)
    message_ids_by_session = {session_id: message_id for message_id, session_id, _ in rows}
    return StoredSpread(
        message_ids_by_session[params["session_id"]], params["created_at"],
        len(rows), is_duplicate=False, message_ids_by_session=message_ids_by_session,
        member_ids_by_session={session_id: member_id for _, session_id, member_id in rows})


async def store_read(tx: Transaction, params: dict) -> int | None:
    """The new read pointer, or None when it did not move."""
    rows = await tx.fetch_all(UPDATE_READ_POINTER, params)
    return rows[0][0] if rows else None


async def store_revocation(tx: Transaction, params: dict) -> None:
    """Refuse a token from now until its exp; forget the ones already past theirs."""
    await tx.execute(INSERT_REVOKED_TOKEN, params)
    await tx.execute(DELETE_EXPIRED_REVOCATIONS, {"now": int(time.time())})


async def store_subscription(tx: Transaction, params: dict) -> None:
    """A new row for the endpoint (also when it moves to another user), then the
    user's oldest beyond MAX_PUSH_SUBSCRIPTIONS go."""
    await tx.execute(SAVEPOINT_WRITE)  # three statements: all or none of them
    try:
        await tx.execute(DELETE_SUBSCRIPTION, params)
        await tx.execute(INSERT_SUBSCRIPTION, params)
        await tx.execute(TRIM_SUBSCRIPTIONS, {"user_id": params["user_id"],
                                              "keep": MAX_PUSH_SUBSCRIPTIONS})
    except tx.engine.refused_errors:
        await tx.execute(ROLLBACK_TO_WRITE)
        raise
    finally:
        await tx.execute(RELEASE_WRITE)


async def store_photo(tx: Transaction, params: dict) -> None:
    await tx.execute(INSERT_PHOTO, params)


async def store_photo_cleanup(tx: Transaction, params: dict) -> int:
    """Delete the photos uploaded before ``cutoff`` and never sent; how many went."""
    return await tx.execute(DELETE_UNSENT_PHOTOS, params)


async def store_kept_value(tx: Transaction, params: dict) -> None:
    await tx.execute(INSERT_KEPT_VALUE, params)


async def store_unsubscription(tx: Transaction, params: dict) -> None:
    """The caller's own subscription goes (params has user_id), or a gone one
    the push service refused with 404/410 (params has no user_id)."""
    await tx.execute(DELETE_OWN_SUBSCRIPTION if "user_id" in params else DELETE_SUBSCRIPTION, params)


store_spreads = one_by_one(store_spread)
store_reads = one_by_one(store_read)
store_revocations = one_by_one(store_revocation)
store_subscriptions = one_by_one(store_subscription)
store_unsubscriptions = one_by_one(store_unsubscription)
store_kept_values = one_by_one(store_kept_value)
store_photos = one_by_one(store_photo)
store_photo_cleanups = one_by_one(store_photo_cleanup)


@dataclass(slots=True)
class Write:
    store: Callable[[Transaction, list[dict]], Awaitable[list[Outcome]]]
    params: dict
    done: asyncio.Future


_STOP_WRITER = object()


class Writer:
    """The only task that writes: group commit, answers only after COMMIT."""

    def __init__(self, tx: Transaction, metrics: Metrics) -> None:
        self.tx = tx
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue(WRITE_QUEUE_MAX)
        self.task: asyncio.Task | None = None
        self.is_stopping = False

    def submit(self, store: Callable, params: dict) -> asyncio.Future:
        """Queue a write; its future settles after COMMIT (or with the error)."""
        if self.is_stopping:
            raise StorageUnavailable("the server is shutting down")
        done = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(Write(store, params, done))
        except asyncio.QueueFull:
            raise StorageUnavailable("too many writes waiting") from None
        return done

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="writer")

    async def stop(self) -> None:
        """Finish every queued write, then end."""
        self.is_stopping = True
        await self.queue.put(_STOP_WRITER)
        if self.task is not None:
            await self.task

    async def run(self) -> None:
        while True:
            # Everything already waiting joins the batch, up to the stop mark.
            taken = [await self.queue.get()]
            while len(taken) < WRITE_BATCH_MAX and not self.queue.empty() \
                    and taken[-1] is not _STOP_WRITER:
                taken.append(self.queue.get_nowait())
            batch = [write for write in taken if write is not _STOP_WRITER]
            if batch:
                try:
                    await self.commit_batch(batch)
                except Exception as error:  # a bug must not stop every later write
                    log.exception("writer failed", extra={"event": "storage_error",
                                                          "fields": {"batch": len(batch)}})
                    await self.rollback()
                    _fail_all(batch, StorageUnavailable(str(error)))
            if taken[-1] is _STOP_WRITER:
                return

    async def commit_batch(self, batch: list[Write]) -> None:
        if all(write.store is store_chats for write in batch):
            await self.commit_chats(batch)
            return
        unavailable = self.tx.engine.unavailable_errors
        began_at = time.perf_counter()
        try:
            await self.tx.execute(self.tx.engine.BEGIN)
        except unavailable as error:
            log_event(logging.WARNING, "storage_error", batch=len(batch), error=error)
            _fail_all(batch, StorageUnavailable(str(error)))
            return
        outcomes: list[Outcome] = []
        try:
            # Runs of the same kind go together: a run of chats is one statement.
            for store, run in itertools.groupby(batch, key=lambda write: write.store):
                outcomes += await store(self.tx, [write.params for write in run])
            await self.tx.execute(COMMIT)
            self.metrics.commit_seconds.observe(time.perf_counter() - began_at)
            self.metrics.write_batch_size.observe(len(batch))
        except unavailable as error:
            log_event(logging.WARNING, "storage_error", batch=len(batch), error=error,
                      rolled_back=True)
            await self.rollback()
            _fail_all(batch, StorageUnavailable(str(error)))
            return
        _answer_all(batch, outcomes)

    async def commit_chats(self, batch: list[Write]) -> None:
        """A batch of chats only (the usual one) is one INSERT, and one statement
        outside BEGIN is a transaction of its own: it commits as it ends, or
        stores nothing. BEGIN and COMMIT would each cost a trip to the driver's
        thread (a third of a millisecond each, measured at 2,000 msg/s); what
        runs after the INSERT (finding a resent client_id) only reads."""
        began_at = time.perf_counter()
        try:
            outcomes = await store_chats(self.tx, [write.params for write in batch])
        except self.tx.engine.unavailable_errors as error:
            log_event(logging.WARNING, "storage_error", batch=len(batch), error=error)
            _fail_all(batch, StorageUnavailable(str(error)))
            return
        self.metrics.commit_seconds.observe(time.perf_counter() - began_at)
        self.metrics.write_batch_size.observe(len(batch))
        _answer_all(batch, outcomes)

    async def rollback(self) -> None:
        try:
            await self.tx.execute(ROLLBACK)
        except self.tx.engine.unavailable_errors:
            pass  # already rolled back (SQLite does after SQLITE_FULL)


def _answer_all(batch: list[Write], outcomes: list[Outcome]) -> None:
    for write, (is_ok, value) in zip(batch, outcomes):
        if write.done.done():
            continue
        if is_ok:
            write.done.set_result(value)
        else:
            write.done.set_exception(value)


def _fail_all(batch: list[Write], error: Exception) -> None:
    for write in batch:
        if not write.done.done():
            write.done.set_exception(error)


class Storage:
    """The database as the rest of the file sees it: reads on a connection of
    their own, writes through the writer, a management command's change in one
    transaction. A driver's error comes out as StorageUnavailable."""

    def __init__(self, engine: SqliteEngine, read_db: aiosqlite.Connection,
                 write_db: aiosqlite.Connection, metrics: Metrics) -> None:
        self.engine = engine
        self.read_db = read_db
        self.writer = Writer(Transaction(write_db, engine), metrics)

    @classmethod
    async def open(cls, settings: Settings, *, metrics: Metrics | None = None,
                   busy_timeout_ms: int = SqliteEngine.WRITER_BUSY_TIMEOUT_MS) -> Storage:
        """Both connections, the schema applied; nothing left open on failure."""
        engine = SqliteEngine(settings.db_path, settings.tz)
        try:
            write_db = await engine.connect_writer(busy_timeout_ms=busy_timeout_ms)
            try:
                read_db = await engine.connect_reader()
            except BaseException:
                await write_db.close()
                raise
        except engine.unavailable_errors as error:
            raise StorageUnavailable(f"cannot open the database {settings.db_path}: {error}") from None
        return cls(engine, read_db, write_db, metrics or Metrics())

    async def close(self) -> None:
        await self.read_db.close()  # an unclosed aiosqlite thread blocks exit
        await self.writer.tx.db.close()

    def submit(self, store: Callable, params: dict) -> asyncio.Future:
        return self.writer.submit(store, params)

    async def _read(self, sql: str, params: dict | None = None) -> list:
        try:
            return list(await self.read_db.execute_fetchall(sql, params or {}))
        except self.engine.unavailable_errors as error:
            raise StorageUnavailable(str(error)) from None

    async def _read_one(self, sql: str, params: dict | None = None) -> Any:
        rows = await self._read(sql, params)
        return rows[0] if rows else None

    async def check(self) -> None:
        """Raises StorageUnavailable unless the database answers."""
        await self._read(SELECT_HEALTH)

    async def user(self, user_id: str) -> Any:
        return await self._read_one(SELECT_USER, {"user_id": user_id})

    async def user_for_token(self, user_id: str, token_hash: str) -> Any:
        return await self._read_one(SELECT_USER_FOR_TOKEN,
                                    {"user_id": user_id, "token_hash": token_hash})

    async def room(self, session_id: int) -> Any:
        return await self._read_one(SELECT_ROOM, {"session_id": session_id})

    async def participants(self, session_id: int) -> list:
        return await self._read(SELECT_PARTICIPANTS, {"session_id": session_id})

    async def room_list_json(self, user_id: str, *, is_trainer: bool) -> str:
        """The user's rooms, newest activity first, as a JSON array."""
        query = self.engine.SELECT_ROOMS_OF_TRAINER if is_trainer \
            else self.engine.SELECT_ROOMS_OF_MEMBER
        rows = await self._read(query, {"user_id": user_id, "photo_preview": PHOTO_PREVIEW})
        return "[" + ",".join(row[0] for row in rows) + "]"

    async def messages(self, session_id: int, *, before_id: int | None = None,
                       after_id: int | None = None, limit: int) -> tuple[list, bool]:
        """Up to ``limit`` message rows ascending, and whether more lie in the direction read."""
        params = {"session_id": session_id, "before_id": before_id, "after_id": after_id,
                  "limit": limit + 1}
        if after_id is not None:
            rows = await self._read(SELECT_MESSAGES_AFTER, params)
            return rows[:limit], len(rows) > limit
        query = SELECT_MESSAGES_LATEST if before_id is None else SELECT_MESSAGES_BEFORE
        rows = await self._read(query, params)
        return rows[:limit][::-1], len(rows) > limit

    async def history(self, session_id: int, after_id: int | None) -> tuple[list, bool]:
        """A socket's first message rows, ascending: those after ``after_id`` (at
        most HISTORY_RESUME_MAX), else the latest HISTORY_LATEST_COUNT; and about
        HISTORY_MAX_BYTES of content at most. has_more when more lie beyond."""
        limit = HISTORY_LATEST_COUNT if after_id is None else HISTORY_RESUME_MAX
        params = {"session_id": session_id, "after_id": after_id, "limit": limit + 1,
                  "max_bytes": HISTORY_MAX_BYTES}
        query = self.engine.SELECT_HISTORY_LATEST if after_id is None \
            else self.engine.SELECT_HISTORY_AFTER
        rows = await self._read(query, params)
        has_more = len(rows) > limit or bool(rows) and rows[-1]["bytes_through"] >= HISTORY_MAX_BYTES
        rows = rows[:limit]
        return (rows[::-1] if after_id is None else rows), has_more

    async def admin_version(self) -> Any:
        row = await self._read_one(SELECT_ADMIN_VERSION)
        return row[0] if row else None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """BEGIN … COMMIT on the write connection, or ROLLBACK on any error: all
        or nothing. For management commands and start-up, where no writer runs."""
        tx = self.writer.tx
        try:
            await tx.execute(self.engine.BEGIN)
        except self.engine.unavailable_errors as error:
            raise StorageUnavailable(str(error)) from None
        try:
            yield tx
            await tx.execute(COMMIT)
        except self.engine.unavailable_errors as error:
            await self.writer.rollback()
            raise StorageUnavailable(str(error)) from None
        except BaseException:
            await self.writer.rollback()
            raise

    @contextlib.asynccontextmanager
    async def admin_change(self) -> AsyncIterator[Transaction]:
        """A management change, all or nothing; a running server notices it
        within 2 s, since it polls the admin_version this bumps."""
        async with self.transaction() as tx:
            yield tx
            await tx.execute(BUMP_ADMIN_VERSION)

    async def photo(self, photo_id: str) -> Any:
        """A photo's owner, room and size (never its images)."""
        return await self._read_one(SELECT_PHOTO, {"photo_id": photo_id})

    async def photo_for_viewer(self, photo_id: str, user_id: str, *,
                               is_thumb: bool) -> tuple[str, bytes] | None:
        """(media type, bytes) of a photo or its thumbnail, if ``user_id`` is in its room."""
        row = await self._read_one(SELECT_PHOTO_THUMB if is_thumb else SELECT_PHOTO_IMAGE,
                                   {"photo_id": photo_id, "user_id": user_id})
        return (row[0], row[1]) if row else None

    async def push_subscriptions(self, user_id: str) -> list:
        return await self._read(SELECT_SUBSCRIPTIONS, {"user_id": user_id})

    async def unread_total(self, user_id: str) -> int:
        return (await self._read_one(SELECT_UNREAD_TOTAL, {"user_id": user_id}))[0]

    async def vapid_private_key(self, make_key: Callable[[], str]) -> str:
        """The VAPID key kept in the database, made (by ``make_key``) on first use.
        Through the writer: the server is running when push is first used."""
        key = {"key": "vapid_private_key"}
        row = await self._read_one(SELECT_KEPT_VALUE, key)
        if row is None:
            await self.submit(store_kept_values, {**key, "value": make_key()})
            row = await self._read_one(SELECT_KEPT_VALUE, key)
        return row[0]

    async def secret(self) -> str:
        """The JWT key kept in the database, made on first use."""
        key = {"key": "jwt_secret"}
        async with self.transaction() as tx:
            await store_kept_value(tx, {**key, "value": secrets.token_urlsafe(32)})
            return (await tx.fetch_one(SELECT_KEPT_VALUE, key))[0]


@dataclass(frozen=True, slots=True)
class DatabaseReport:
    """What `check` and `backup` say of a database."""
    schema_version: int
    user_count: int
    session_count: int
    message_count: int
    photo_count: int


async def _report(db: aiosqlite.Connection) -> DatabaseReport:
    async def count(sql: str) -> int:
        return (await db.execute_fetchall(sql))[0][0]
    version = await count(SELECT_SCHEMA_VERSION)
    if version > SCHEMA_VERSION:  # its tables may not be the ones counted below
        raise SchemaTooNew(version)
    # A database from before photos (check and backup never upgrade) holds none.
    photo_count = await count(COUNT_PHOTOS) if await count(HAS_PHOTOS_TABLE) else 0
    return DatabaseReport(version, await count(COUNT_USERS), await count(COUNT_SESSIONS),
                          await count(COUNT_MESSAGES), photo_count)


async def check_database(settings: Settings) -> DatabaseReport:
    """SQLite's integrity check and the counts; StorageUnavailable names the
    problem (damage, or a schema newer than this program). Changes nothing."""
    if not settings.db_path.is_file():
        raise StorageUnavailable(f"no database at {settings.db_path}")
    engine = SqliteEngine(settings.db_path, settings.tz)
    try:
        db = await engine.connect_plain()
        try:
            problems = [row[0] for row in await db.execute_fetchall(INTEGRITY_CHECK)]
            if problems != ["ok"]:
                raise StorageUnavailable("the database is damaged: " + "; ".join(problems))
            return await _report(db)
        finally:
            await db.close()
    except engine.unavailable_errors as error:
        raise StorageUnavailable(f"the database is damaged: {error}") from None


async def backup_database(settings: Settings, destination: Path) -> DatabaseReport:
    """A consistent copy of the live data (a running server keeps running): every
    transaction committed before it began. ``destination`` must not exist."""
    if not settings.db_path.is_file():
        raise StorageUnavailable(f"no database at {settings.db_path}")
    try:
        # Made empty and private first (the copy holds the sign-in and push keys);
        # O_EXCL: a file that appeared meanwhile is never overwritten.
        os.close(os.open(destination, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise StorageUnavailable(f"{destination} exists; a backup goes to a new file") from None
    except OSError as error:
        raise StorageUnavailable(f"backup failed: {error.strerror or error}") from None
    engine = SqliteEngine(settings.db_path, settings.tz)
    try:
        db = await engine.connect_plain()
        try:
            await db.execute_fetchall(BACKUP_INTO, {"path": str(destination)})
        finally:
            await db.close()
        copy = await SqliteEngine(destination, None).connect_plain()
        try:
            return await _report(copy)
        finally:
            await copy.close()
    except engine.unavailable_errors as error:
        with contextlib.suppress(OSError):
            destination.unlink()  # it did not exist before: nothing half-written stays
        raise StorageUnavailable(f"backup failed: {error}") from None


# ============================================================== auth ===


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    role: str
    name: str
    expires_at: float  # the token's exp, seconds since the epoch
    token_hash: str    # names the token for sign-out, without keeping it


@dataclass(frozen=True, slots=True)
class Room:
    room_id: str
    session_id: int
    trainer_id: str
    member_id: str
    status: str

    def admits(self, identity: Identity) -> bool:
        if identity.role == "trainer":
            return identity.user_id == self.trainer_id
        return identity.user_id == self.member_id

    def other_participant(self, user_id: str) -> str:
        return self.member_id if user_id == self.trainer_id else self.trainer_id


class AuthError(Exception):
    """No usable token: the message says why, for the person signing in."""


@dataclass(frozen=True, slots=True)
class TokenRules:
    """How tokens are signed and what they must say: the HS256 key, and the
    issuer and audience a gym's own app puts in them (--jwt-issuer/-audience)."""
    secret: str
    issuer: str | None = None
    audience: str | None = None


def token_rules(settings: Settings, secret: str) -> TokenRules:
    return TokenRules(secret, settings.jwt_issuer, settings.jwt_audience)


def issue_token(rules: TokenRules, user_id: str, role: str, name: str, ttl_s: int) -> str:
    claims = {"sub": user_id, "role": role, "name": name, "exp": int(time.time()) + ttl_s}
    if rules.issuer is not None:
        claims["iss"] = rules.issuer
    if rules.audience is not None:
        claims["aud"] = rules.audience
    return jwt.encode(claims, rules.secret, algorithm="HS256")


def token_from_request(request: web.Request) -> str | None:
    """The token from, in order: Authorization Bearer, the cookie, ?token=."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.cookies.get(TOKEN_COOKIE) or request.query.get("token") or None


def decode_token(token: str, rules: TokenRules) -> dict:
    required = ["exp", "sub", "role"] + ["iss"] * (rules.issuer is not None) \
        + ["aud"] * (rules.audience is not None)
    try:
        # An audience is checked only when one is set: a gym's app may name one
        # the server was not told about.
        claims = jwt.decode(token, rules.secret, algorithms=["HS256"], issuer=rules.issuer,
                            audience=rules.audience,
                            options={"require": required, "verify_aud": rules.audience is not None})
    except jwt.ExpiredSignatureError:
        raise AuthError("the sign-in link has expired; ask for a new one") from None
    except Exception:  # PyJWT raises several types for malformed input
        raise AuthError("the sign-in token is not valid") from None
    if not isinstance(claims.get("sub"), str) or claims.get("role") not in ("trainer", "member"):
        raise AuthError("the sign-in token is not valid")
    if not isinstance(claims["exp"], (int, float)) or isinstance(claims["exp"], bool):
        raise AuthError("the sign-in token is not valid")
    return claims


def token_hash_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def identity_from_token(storage: Storage, token: str | None, rules: TokenRules) -> Identity:
    if not token:
        raise AuthError("you are not signed in")
    claims = decode_token(token, rules)
    token_hash = token_hash_of(token)
    user = await storage.user_for_token(claims["sub"], token_hash)
    if user is None:
        raise AuthError("this account does not exist")
    if user["is_revoked"]:
        raise AuthError("you signed out with this sign-in link; ask for a new one")
    if user["role"] != claims["role"]:
        raise AuthError("this account's role has changed; ask for a new sign-in link")
    return Identity(user["id"], user["role"], user["name"], float(claims["exp"]), token_hash)


async def load_room(storage: Storage, room_id: str) -> Room | None:
    session_id = session_id_of(room_id)
    row = None if session_id is None else await storage.room(session_id)
    if row is None:
        return None
    return Room(room_id, session_id, row["trainer_id"], row["member_id"], row["status"])


# ============================================================ frames ===
#
# Every frame the server sends is built here, one small function per type; a
# broadcast serialises a frame once and hands the same bytes to every socket.
#
# Those bytes are whole WebSocket frames written straight to the transport, past
# aiohttp's writer (which would frame and lock per recipient). That is sound
# because of what aiohttp promises and tests/test_frames.py checks on every
# upgrade: a server's frames are unmasked and, without compression, these bytes
# exactly; and aiohttp writes each of its own frames (pings, pongs, the close) in
# one transport.write(), so ours and its never interleave.


def websocket_text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame (RFC 6455 section 5.2), as a server sends it."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload


PING_WIRE_FRAME = b"\x89\x00"  # a final, empty ping (RFC 6455 section 5.5.2)


def pong_wire_frame(payload: bytes) -> bytes:
    """The pong for a ping (its payload is at most 125 bytes, aiohttp checks)."""
    return bytes((0x8A, len(payload))) + payload


def wire_frame(frame: dict) -> bytes:
    """A frame as it goes on the wire; a broadcast builds it once for everyone."""
    try:
        return websocket_text_frame(compact_json(frame).encode())
    except UnicodeEncodeError:  # a lone surrogate, echoed in an error's client_id:
        return websocket_text_frame(json.dumps(frame, separators=(",", ":")).encode())  # \u escaped


def message_frame(*, message_type: str, message_id: int, session_id: int, user_id: str,
                  sender_name: str, content: str, created_at: str, client_id: str,
                  photo: dict | None = None) -> dict:
    """A stored message, live and in history and the messages API alike."""
    return {"type": message_type, "id": message_id, "room_id": room_id_of(session_id),
            "user_id": user_id, "sender_name": sender_name, "content": content,
            "created_at": created_at, "client_id": client_id, "photo": photo}


def photo_field(photo_id: str, width: int, height: int) -> dict:
    """A message's "photo": what a client needs to lay it out before it loads."""
    return {"id": photo_id, "width": width, "height": height}


def message_from_row(row: Any) -> dict:
    photo_id = row["photo_id"]
    return message_frame(message_type=row["type"], message_id=row["id"],
                         session_id=row["session_id"], user_id=row["user_id"],
                         sender_name=row["sender_name"], content=row["content"],
                         created_at=row["created_at"], client_id=row["client_id"],
                         photo=None if photo_id is None
                         else photo_field(photo_id, row["photo_width"], row["photo_height"]))


def welcome_frame(room: Room, identity: Identity, participants: list[dict]) -> dict:
    return {"type": "welcome", "room_id": room.room_id, "user_id": identity.user_id,
            "role": identity.role, "status": room.status, "participants": participants}


def history_wire_frame(messages: list[dict], has_more: bool, *,
                       keep_oldest: bool) -> tuple[bytes, int | None]:
    """The history frame's bytes and its newest message id, at most
    HISTORY_MAX_BYTES: each message is encoded once, nearest the client first
    (the oldest after ``after``, else the newest), until the next would not
    fit; then has_more is true and the client pages the rest over HTTP."""
    budget = HISTORY_MAX_BYTES - 64  # the frame's header and the envelope
    kept: list[bytes] = []
    for message in (messages if keep_oldest else reversed(messages)):
        encoded = compact_json(message).encode()
        budget -= len(encoded) + 1
        if budget < 0 and kept:
            has_more = True
            break
        kept.append(encoded)
    if not keep_oldest:
        kept.reverse()
        messages = messages[len(messages) - len(kept):]
    newest_id = messages[len(kept) - 1]["id"] if kept else None
    payload = (b'{"type":"history","messages":[' + b",".join(kept) + b'],"has_more":'
               + (b"true" if has_more else b"false") + b"}")
    return websocket_text_frame(payload), newest_id


def error_frame(code: str, message: str, client_id: str | None = None) -> dict:
    return {"type": "error", "code": code, "message": message, "client_id": client_id}


def ack_frame(client_id: str, message_id: int, created_at: str) -> dict:
    return {"type": "ack", "client_id": client_id, "id": message_id, "created_at": created_at}


def system_frame(event: str, room_id: str, user_id: str, name: str) -> dict:
    verb = "들어왔습니다" if event == "join" else "나갔습니다"
    return {"type": "system", "event": event, "room_id": room_id, "user_id": user_id,
            "name": name, "content": f"{name}님이 {verb}"}


def read_frame(room_id: str, user_id: str, message_id: int) -> dict:
    return {"type": "read", "room_id": room_id, "user_id": user_id, "message_id": message_id}


def typing_frame(room_id: str, user_id: str) -> dict:
    return {"type": "typing", "room_id": room_id, "user_id": user_id}


# ========================================================== chat hub ===


class Outbox:
    """What waits to be written to one peer, at most OUTBOX_MAX_BYTES.

    Frames queued in one loop turn leave in one write at the next (a chat's copy
    for its sender and the ack go together). A peer whose buffer is then full
    gets a waiting task of its own, so it never holds up a broadcast or another
    room; idle sockets own no task. A peer that overflows the outbox, or does
    not drain within SLOW_PEER_TIMEOUT_S, is too slow: its socket is asked to
    close with 1008, and it takes nothing more.
    """

    def __init__(self, owner: ChatSocket, transport: asyncio.Transport) -> None:
        self.owner = owner
        self.transport = transport
        self.frames: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.is_flush_scheduled = False
        self.slow_peer_task: asyncio.Task | None = None

    def put(self, data: bytes) -> None:
        if self.size + len(data) > OUTBOX_MAX_BYTES:
            self._too_slow("the outbox is full")
            return
        self.frames.append(data)
        self.size += len(data)
        if not self.is_flush_scheduled and self.slow_peer_task is None:
            self.is_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued in one write; if the peer's buffer is then
        full, wait for it to drain before writing more."""
        self.is_flush_scheduled = False
        if not self.frames or self.slow_peer_task is not None or self.owner.closed:
            return  # nothing may follow the close frame
        if self.transport.is_closing():
            self.owner.request_stop(WSCloseCode.GOING_AWAY, "connection lost")
            return
        frames = list(self.frames)
        self.frames.clear()
        self.size = 0
        self.transport.write(b"".join(frames))
        if self.transport.get_write_buffer_size() > PEER_BUFFER_HIGH_BYTES:
            self.slow_peer_task = asyncio.create_task(self._wait_for_slow_peer())

    async def _wait_for_slow_peer(self) -> None:
        """Rare: frames queue (bounded) until the peer's buffer drains, or 1008."""
        try:
            async with asyncio.timeout(SLOW_PEER_TIMEOUT_S):
                while self.transport.get_write_buffer_size() > PEER_BUFFER_HIGH_BYTES:
                    await asyncio.sleep(PEER_BUFFER_POLL_S)
        except TimeoutError:
            self._too_slow(f"frames not taken for {SLOW_PEER_TIMEOUT_S:g} s")
            return
        finally:
            self.slow_peer_task = None
        self.flush()

    def _too_slow(self, why: str) -> None:
        if self.owner.stop_code is None:
            log_event(logging.INFO, "slow_peer_closed", room_id=self.owner.room.room_id,
                      user_id=self.owner.identity.user_id, reason=why)
        self.owner.request_stop(WSCloseCode.POLICY_VIOLATION, "too slow: frames not taken")

    async def drain(self, timeout_s: float) -> None:
        """Send what is queued (before a close frame), waiting at most timeout_s."""
        self.flush()
        async with asyncio.timeout(timeout_s):
            while self.slow_peer_task is not None:
                await asyncio.wait([self.slow_peer_task])

    def cancel(self) -> None:
        if self.slow_peer_task is not None:
            self.slow_peer_task.cancel()


class ChatSocket(web.WebSocketResponse):
    """One live connection: who holds it, in which room, and its frames' way out.

    Live frames wait in ``held_frames`` until the welcome and the history are
    queued; then they go through the Outbox. Pings and pongs are ours, not
    aiohttp's: its answering loop never yields to other sockets, and its
    heartbeat timer restarts after close() and keeps a refused socket alive for
    half a minute. The hub's liveness sweep pings instead.
    """

    def __init__(self, metrics: Metrics) -> None:
        # aiohttp refuses a frame of max_msg_size itself; 64 KiB exactly is allowed.
        super().__init__(autoping=False, max_msg_size=MAX_FRAME_BYTES + 1,
                         compress=False, timeout=CLOSE_HANDSHAKE_TIMEOUT_S)
        self.metrics = metrics
        self.identity: Identity | None = None
        self.room: Room | None = None
        self.outbox: Outbox | None = None  # once prepared
        self.stop_code: int | None = None
        self.stop_reason = ""
        self.is_receiving = False
        self.is_receive_cancelled = False
        self.handler_task = asyncio.current_task()
        self.finished = asyncio.get_running_loop().create_future()
        self.last_typing_at = 0.0
        self.writes_in_flight: collections.deque[asyncio.Future] = collections.deque()
        now = asyncio.get_running_loop().time()
        self.last_heard_at = now  # the peer's latest frame of any kind
        self.ping_sent_at: float | None = None  # a ping not yet answered by any frame
        self.control_window_started_at = now
        self.control_frame_count = 0
        # A message committed while the history was read can be in both: the
        # live copy of anything up to the history's newest id is dropped.
        self.held_frames: list[tuple[bytes, int | None]] | None = []
        self.history_through_id = 0

    def enqueue(self, data: bytes, message_id: int | None = None) -> None:
        """Queue a frame built by ``wire_frame``."""
        if self.closed or self.is_cut_off:
            return
        if self.held_frames is not None:
            self.held_frames.append((data, message_id))
            return
        if message_id is not None and message_id <= self.history_through_id:
            return
        self.outbox.put(data)

    def send_later(self, frame: dict) -> None:
        self.enqueue(wire_frame(frame))

    def flush_now(self) -> None:
        """Write what is queued now, not at the loop's next turn."""
        if self.outbox is not None and self.held_frames is None:
            self.outbox.flush()

    def send_error(self, code: str, message: str, client_id: str | None = None) -> None:
        self.metrics.errors[code] += 1
        self.send_later(error_frame(code, message, client_id))

    def start_live(self, first_frames: list[bytes], newest_history_id: int) -> None:
        """Queue ``first_frames`` (wire bytes), then the held live frames the history lacks."""
        held, self.held_frames = self.held_frames or [], None
        for data in first_frames:
            self.enqueue(data)
        self.history_through_id = newest_history_id
        for data, message_id in held:
            self.enqueue(data, message_id)

    # Stopping, the whole story. Anything may ask a socket to close: the hub
    # (a management change, sign-out, a token's exp), the liveness sweep, the
    # outbox (too slow), the receive loop (a control-frame flood), shutdown.
    # Only the handler task closes it: a close from another task while the
    # handler awaits receive() can end in a reset instead of a close frame. So
    # request_stop records the code (the first ask wins) and, if the handler
    # is waiting in receive(), cancels it there; is_receive_cancelled marks
    # that cancel as ours, and receive_frames uncancels its task and returns.
    # The handler's finally then runs close_socket: it drains the outbox
    # (unless the peer is the problem) and sends the close frame with the code.

    def request_stop(self, code: int, reason: str) -> None:
        """Ask the handler to close this socket with ``code``; the first ask wins."""
        if self.stop_code is not None:
            return
        self.stop_code = code
        self.stop_reason = reason
        if self.is_receiving and self.handler_task is not None:
            self.is_receive_cancelled = True
            self.handler_task.cancel()

    @property
    def is_cut_off(self) -> bool:
        """Being closed for a policy violation (too slow a reader, a control-frame
        flood): nothing more goes out. A frame may have been dropped, and the peer
        resumes with `after` the newest id it got, so a later frame reaching it
        would make it skip the dropped one."""
        return self.stop_code == WSCloseCode.POLICY_VIOLATION

    @property
    def is_dead(self) -> bool:
        """Dropped by the liveness sweep: the connection is already aborted."""
        return self.stop_code == WSCloseCode.ABNORMAL_CLOSURE

    def heard_control_frame(self, now: float) -> bool:
        """Count a ping or pong; False once the peer is over its budget."""
        if now - self.control_window_started_at >= 1.0:
            self.control_window_started_at = now
            self.control_frame_count = 0
        self.control_frame_count += 1
        return self.control_frame_count <= MAX_CONTROL_FRAMES_PER_S

    def check_liveness(self, now: float, ping_interval_s: float) -> None:
        """Ping a peer quiet for ping_interval_s; drop one that leaves a ping
        unanswered for half of that (the frame after a ping answers it)."""
        if self.ping_sent_at is not None:
            if self.last_heard_at >= self.ping_sent_at:
                self.ping_sent_at = None
            elif now - self.ping_sent_at >= ping_interval_s / 2:
                self.request_stop(WSCloseCode.ABNORMAL_CLOSURE, "no answer to ping")
                self.outbox.transport.abort()
                return
        if self.ping_sent_at is None and now - self.last_heard_at >= ping_interval_s:
            self.ping_sent_at = now
            self.enqueue(PING_WIRE_FRAME)


@dataclass(slots=True)
class RateBucket:
    tokens: float
    updated_at: float
    is_limiting: bool = False  # refusing now: logged once when it starts


class RateLimiter:
    """A token bucket per user: ``rate`` a second, up to ``burst`` at once.
    Buckets stay when a user's sockets close: a reconnect must not refill them."""

    def __init__(self, kind: str, rate: float, burst: float) -> None:
        self.kind = kind
        self.rate = rate
        self.burst = max(1.0, burst)  # a rate below 1/burst still lets one through
        self.buckets: dict[str, RateBucket] = {}

    def allows(self, user_id: str) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        bucket = self.buckets.get(user_id)
        if bucket is None:
            bucket = self.buckets[user_id] = RateBucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated_at) * self.rate)
        bucket.updated_at = now
        if bucket.tokens < 1:
            if not bucket.is_limiting:
                bucket.is_limiting = True
                log_event(logging.INFO, "rate_limited", user_id=user_id, kind=self.kind)
            return False
        bucket.tokens -= 1
        bucket.is_limiting = False
        return True


class ChatHub:
    """Who is connected where: sockets per room, presence, rate limits."""

    def __init__(self, rate_limit: float, metrics: Metrics) -> None:
        self.metrics = metrics
        self.push: PushSender | None = None  # set while the push sender runs
        self.room_sockets: dict[str, weakref.WeakSet[ChatSocket]] = {}
        self.socket_counts_by_user: dict[str, int] = {}
        self.pending_leaves: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.sends = RateLimiter("send", rate_limit, rate_limit * RATE_BURST_FACTOR)
        self.opens = RateLimiter("open", OPENS_PER_S, OPEN_AND_READ_BURST)
        self.history_reads = RateLimiter("history_read", HISTORY_READS_PER_S, OPEN_AND_READ_BURST)
        # Subscribing resolves a name the user chose: as many a second as history reads.
        self.subscribes = RateLimiter("subscribe", HISTORY_READS_PER_S, OPEN_AND_READ_BURST)
        self.is_closing = False

    def all_sockets(self) -> list[ChatSocket]:
        return [ws for sockets in list(self.room_sockets.values()) for ws in list(sockets)]

    def has_room_for(self, user_id: str) -> bool:
        return self.socket_counts_by_user.get(user_id, 0) < MAX_SOCKETS_PER_USER

    def is_present(self, room_id: str, user_id: str) -> bool:
        return any(ws.identity.user_id == user_id for ws in self.room_sockets.get(room_id, ()))

    def is_online(self, room_id: str, user_id: str) -> bool:
        return self.is_present(room_id, user_id) or (room_id, user_id) in self.pending_leaves

    def add(self, ws: ChatSocket) -> bool:
        """Register a socket; True when its user just came into the room."""
        room_id, user_id = ws.room.room_id, ws.identity.user_id
        was_online = self.is_online(room_id, user_id)
        pending_leave = self.pending_leaves.pop((room_id, user_id), None)
        if pending_leave is not None:
            pending_leave.cancel()  # back within the grace period: no leave, no join
        self.room_sockets.setdefault(room_id, weakref.WeakSet()).add(ws)
        self.socket_counts_by_user[user_id] = self.socket_counts_by_user.get(user_id, 0) + 1
        return not was_online

    def discard(self, ws: ChatSocket) -> None:
        room_id, user_id = ws.room.room_id, ws.identity.user_id
        sockets = self.room_sockets.get(room_id)
        if sockets is None or ws not in sockets:
            return
        sockets.discard(ws)
        if not sockets:
            del self.room_sockets[room_id]
        remaining = self.socket_counts_by_user.get(user_id, 1) - 1
        if remaining > 0:
            self.socket_counts_by_user[user_id] = remaining
        else:
            self.socket_counts_by_user.pop(user_id, None)
            # The rate bucket stays: a reconnect must not refill the burst.
        if not self.is_present(room_id, user_id) and not self.is_closing:
            self.pending_leaves[(room_id, user_id)] = asyncio.get_running_loop().call_later(
                PRESENCE_GRACE_S, self._announce_leave, room_id, user_id, ws.identity.name)

    def _announce_leave(self, room_id: str, user_id: str, name: str) -> None:
        self.pending_leaves.pop((room_id, user_id), None)
        if not self.is_present(room_id, user_id):
            self.broadcast(room_id, system_frame("leave", room_id, user_id, name))

    def broadcast(self, room_id: str, frame: dict, *, skip_user_id: str | None = None,
                  skip_socket: ChatSocket | None = None) -> None:
        """Build the frame once, queue it for every socket in the room (the sender's included)."""
        sockets = self.room_sockets.get(room_id)
        if not sockets:
            return
        data = wire_frame(frame)
        message_id = frame["id"] if frame["type"] in ("chat", "spread") else None
        for ws in list(sockets):
            if ws is not skip_socket and ws.identity.user_id != skip_user_id:
                ws.enqueue(data, message_id)

    def close_signed_out(self, token_hash: str) -> None:
        """A token just signed out of opens nothing more, open sockets included."""
        for ws in self.all_sockets():
            if ws.identity.token_hash == token_hash:
                ws.request_stop(CLOSE_UNAUTHORIZED, "signed out; sign in again")

    def cancel_pending_leaves(self) -> None:
        for handle in self.pending_leaves.values():
            handle.cancel()
        self.pending_leaves.clear()


async def revalidate_sockets(storage: Storage, hub: ChatHub) -> None:
    """After a management command: close sockets whose user or room changed."""
    users: dict[str, Any] = {}
    rooms: dict[str, Room | None] = {}
    for ws in hub.all_sockets():
        user_id, room_id = ws.identity.user_id, ws.room.room_id
        if user_id not in users:
            users[user_id] = await storage.user(user_id)
        if room_id not in rooms:
            rooms[room_id] = await load_room(storage, room_id)
        user, room = users[user_id], rooms[room_id]
        if user is None or user["role"] != ws.identity.role:
            ws.request_stop(CLOSE_UNAUTHORIZED, "account changed; sign in again")
        elif room is None or not room.admits(ws.identity):
            ws.request_stop(CLOSE_FORBIDDEN, "not a participant of this room")
        else:
            ws.identity = dataclasses.replace(ws.identity, name=user["name"])
            ws.room = room


async def keep_sockets_alive(hub: ChatHub, ping_interval_s: float) -> None:
    """One sweep for every socket (no timer per socket): ping the quiet ones,
    drop those that leave a ping unanswered."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(ping_interval_s / 4)
        now = loop.time()
        for ws in hub.all_sockets():
            ws.check_liveness(now, ping_interval_s)


_NOT_READ = object()


async def watch_admin_changes(storage: Storage, hub: ChatHub) -> None:
    """Management commands bump admin_version; the server honours them within 2 s."""
    seen_version: object = _NOT_READ
    while True:
        try:
            version = await storage.admin_version()
            if seen_version is not _NOT_READ and version != seen_version:
                await revalidate_sockets(storage, hub)
            seen_version = version
        except StorageUnavailable as error:
            log_event(logging.WARNING, "storage_error", during="admin watch", error=error)
        await asyncio.sleep(ADMIN_POLL_INTERVAL_S)


# ============================================================ photos ===
#
# Every upload is treated as an attack until it has been decoded and encoded
# afresh (SPEC 9). Only Pillow's decoders for the four formats we name ever see
# the bytes; the pixel count is read from the header and refused before any
# decoding; what is kept is a new encoding of the pixels alone (no EXIF, GPS,
# comment, XMP or colour profile survives). Decoding runs on a small pool of
# threads, since Pillow lets go of the GIL while it decodes, scales and
# encodes, and those threads run at the lowest CPU priority and leave a core
# to the event loop: a 40-megapixel upload never holds up anyone's chat. Pillow
# is imported on first use, so a gym that sends no photos never loads it.

PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
PHOTO_MAX_PIXELS = 40_000_000
PHOTO_MAX_SIDE = 2048
THUMB_MAX_SIDE = 480
PHOTO_JPEG_QUALITY = 85
THUMB_JPEG_QUALITY = 80
# One core always stays with the event loop: on the usual 2-core box, one thread.
PHOTO_DECODE_THREADS = min(4, max(1, (os.cpu_count() or 2) - 1))
PHOTO_THREAD_NICENESS = 19
PHOTO_UPLOADS_PER_USER = 2  # at once; a third waits for one of them (429)
PHOTO_UPLOADS_AT_ONCE = 16  # in the server: each holds up to --max-photo-mb in memory
PHOTO_READ_CHUNK = 64 * 1024
PHOTO_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")
PHOTO_PREVIEW = "📷"  # a photo without a caption, in the room list and in a push
# A photo never changes under its id, and only its room's participants get it.
PHOTO_CACHE_CONTROL = "private, max-age=31536000, immutable"
MIB = 1024 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number
MALLOC_MMAP_THRESHOLD_BYTES = 1 * MIB


def new_photo_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits: 22 characters


class PhotoRefused(Exception):
    """An upload not taken, with the HTTP status and code SPEC 9 gives it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def not_an_image() -> PhotoRefused:
    return PhotoRefused(415, "unsupported_media",
                        "that file is not a JPEG, PNG, WebP or GIF image (or it is damaged)")


def too_many_pixels() -> PhotoRefused:
    return PhotoRefused(400, "bad_image", "that image has more than 40 megapixels")


@dataclass(frozen=True, slots=True)
class ReencodedPhoto:
    media_type: str
    width: int
    height: int
    image: bytes
    thumb: bytes


@functools.cache
def _pillow():
    """Pillow, imported once and set up for hostile files: its pixel limit is
    ours, and the 'decompression bomb' warning it gives under twice that limit
    is an error like the one above it."""
    import warnings
    from PIL import Image, ImageCms, ImageOps
    Image.MAX_IMAGE_PIXELS = PHOTO_MAX_PIXELS
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    _return_large_blocks_at_once()
    return Image, ImageCms, ImageOps


@functools.cache
def _libc() -> Any:
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _return_large_blocks_at_once() -> None:
    """glibc keeps what a freed buffer of many MiB took (its mmap threshold
    rises to the size of the largest one freed), so each upload and decoded
    image would leave the server that much bigger. A fixed threshold gives
    every large block back to the system when it is freed."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)


def _trim_heap() -> None:
    """Give back what a decode left free in the worker threads' malloc arenas."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def reencode_photo(data: bytes | bytearray) -> ReencodedPhoto:
    """The upload decoded, turned upright, scaled and encoded afresh, with its
    thumbnail; PhotoRefused when it is no image of ours. Runs in a worker thread."""
    Image, _, ImageOps = _pillow()
    try:
        with Image.open(io.BytesIO(data), formats=PHOTO_FORMATS) as source:
            if source.width * source.height > PHOTO_MAX_PIXELS:
                raise too_many_pixels()
            if source.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 when that still covers the size kept
                source.draft("RGB", _covering_box(source.size, PHOTO_MAX_SIDE))
            source.load()  # a GIF's or an animated WebP's first frame
            upright = ImageOps.exif_transpose(source)
            picture = upright.convert("RGBA" if _has_alpha(upright) else "RGB")
            icc_profile = upright.info.get("icc_profile")
    except PhotoRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_many_pixels() from None
    except Exception:  # whatever a damaged or hostile file makes a decoder raise
        raise not_an_image() from None
    picture.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.Resampling.LANCZOS)
    if icc_profile:
        picture = _in_srgb(picture, icc_profile)
    thumb = picture.copy()
    thumb.thumbnail((THUMB_MAX_SIDE, THUMB_MAX_SIDE), Image.Resampling.LANCZOS)
    media_type = "image/png" if picture.mode == "RGBA" else "image/jpeg"
    return ReencodedPhoto(media_type, picture.width, picture.height,
                          _encoded(picture, PHOTO_JPEG_QUALITY), _encoded(thumb, THUMB_JPEG_QUALITY))


def _covering_box(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """The smallest box of the image's shape whose long side is ``long_side``."""
    width, height = size
    scale = long_side / max(width, height, 1)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _has_alpha(picture: Any) -> bool:
    return picture.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in picture.info


def _in_srgb(picture: Any, icc_profile: bytes) -> Any:
    """The pixels in sRGB (a phone's Display P3 photo keeps its colours once its
    profile is gone); as they are when the profile cannot be read."""
    _, ImageCms, _ = _pillow()
    try:
        source_profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        return ImageCms.profileToProfile(picture, source_profile, ImageCms.createProfile("sRGB"),
                                         outputMode=picture.mode)
    except Exception:  # a broken or unusual profile
        return picture


def _encoded(picture: Any, jpeg_quality: int) -> bytes:
    picture.info.clear()  # Pillow writes a kept JPEG comment or PNG profile back out
    out = io.BytesIO()
    if picture.mode == "RGBA":
        picture.save(out, "PNG")
    else:
        picture.save(out, "JPEG", quality=jpeg_quality)
    return out.getvalue()


def _yield_to_chat() -> None:
    """A decoding thread runs at the lowest CPU priority: when the cores are
    busy, the event loop (every chat's ack) and the writer go first. On Linux a
    thread has a priority of its own."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PHOTO_THREAD_NICENESS)


def _reencode_and_trim(data: bytes | bytearray) -> ReencodedPhoto:
    try:
        return reencode_photo(data)
    finally:
        _trim_heap()


class PhotoDesk:
    """Uploads in progress, bounded per user and in all, and the threads that
    decode them (started with the first photo)."""

    def __init__(self) -> None:
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.uploads_by_user: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def upload_slot(self, user_id: str):
        if self.uploads_by_user[user_id] >= PHOTO_UPLOADS_PER_USER:
            raise PhotoRefused(429, "rate_limited",
                               f"at most {PHOTO_UPLOADS_PER_USER} photos upload at once; wait for one")
        if self.uploads_by_user.total() >= PHOTO_UPLOADS_AT_ONCE:
            raise PhotoRefused(503, "unavailable", "busy with other photos; try again shortly")
        self.uploads_by_user[user_id] += 1
        try:
            yield
        finally:
            self.uploads_by_user[user_id] -= 1
            if not self.uploads_by_user[user_id]:
                del self.uploads_by_user[user_id]

    async def reencode(self, data: bytes | bytearray) -> ReencodedPhoto:
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(
                PHOTO_DECODE_THREADS, thread_name_prefix="photo", initializer=_yield_to_chat)
        return await asyncio.get_running_loop().run_in_executor(self.executor, _reencode_and_trim, data)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


async def remove_unsent_photos(storage: Storage, keep_s: float, interval_s: float) -> None:
    """Every ``interval_s``: photos uploaded more than ``keep_s`` ago and never
    sent are deleted (so one is gone within keep_s + interval_s)."""
    while True:
        await asyncio.sleep(interval_s)
        cutoff = utc_iso_at(time.time() - keep_s)
        try:
            removed = await storage.submit(store_photo_cleanups, {"cutoff": cutoff})
        except StorageUnavailable as error:
            log_event(logging.WARNING, "storage_error", task="photo cleanup", error=error)
        else:
            if removed:
                log_event(logging.INFO, "unsent_photos_removed", count=removed)


# ============================================================== push ===
#
# Web Push (RFC 8030) to members who are not looking: the payload encrypted
# for the browser (RFC 8291, aes128gcm), signed for the push service (VAPID,
# RFC 8292). Pushes leave from a bounded queue through one worker, so a slow
# push service never delays an ack or a broadcast. The endpoint is a URL a
# user gave us: it is reached only on a public address (checked again at
# every connection, so a DNS answer that changes cannot point it inward),
# never following a redirect. `cryptography` is loaded on first use only.

PUSH_QUEUE_MAX = 10_000
PUSH_TTL_S = 86_400
PUSH_TIMEOUT_S = 10.0
PUSH_RETRY_FOR_S = 600.0  # 429 and 5xx are retried with backoff for this long
PUSH_PREVIEW_CHARS = 100
PUSH_RECORD_SIZE = 4096
PUSH_DELIVERIES_AT_ONCE = 32
PUSH_RESPONSE_READ_MAX = 4096
PUSH_RESOLVE_TIMEOUT_S = 3.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _crypto():
    """cryptography's primitives, imported on first use (the server process keeps
    the package out at start: see the top of this file)."""
    if sys.modules.get("cryptography", False) is None:
        del sys.modules["cryptography"]
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, utils
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    return hashes, serialization, ec, utils, AESGCM


def new_vapid_private_key() -> str:
    """A P-256 private key as its 32-byte scalar, base64url."""
    _, _, ec, _, _ = _crypto()
    return b64url(ec.generate_private_key(ec.SECP256R1()).private_numbers()
                  .private_value.to_bytes(32, "big"))


class Vapid:
    """The server's VAPID identity: signs a JWT per push service origin."""

    def __init__(self, private_key_b64: str, contact: str | None) -> None:
        hashes, serialization, ec, utils, _ = _crypto()
        self._hashes, self._ec, self._utils = hashes, ec, utils
        self.private_key = ec.derive_private_key(int.from_bytes(b64url_decode(private_key_b64), "big"),
                                                 ec.SECP256R1())
        self.public_key_b64 = b64url(self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
        self.contact = contact

    def authorization(self, endpoint: str) -> str:
        parts = urlsplit(endpoint)
        claims = {"aud": f"{parts.scheme}://{parts.netloc}", "exp": int(time.time()) + 12 * 3600}
        if self.contact:
            claims["sub"] = self.contact
        signing_input = (b64url(compact_json({"typ": "JWT", "alg": "ES256"}).encode()) + "."
                         + b64url(compact_json(claims).encode()))
        r, s = self._utils.decode_dss_signature(self.private_key.sign(
            signing_input.encode(), self._ec.ECDSA(self._hashes.SHA256())))
        token = signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        return f"vapid t={token}, k={self.public_key_b64}"


def encrypt_push(payload: bytes, user_agent_key: bytes, auth_secret: bytes) -> bytes:
    """RFC 8291: one aes128gcm record for the browser's key and auth secret."""
    hashes, serialization, ec, _, AESGCM = _crypto()

    def hmac_sha256(key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, hashlib.sha256).digest()

    local_key = ec.generate_private_key(ec.SECP256R1())
    local_public = local_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), user_agent_key)
    shared_secret = local_key.exchange(ec.ECDH(), peer)
    key_info = b"WebPush: info\x00" + user_agent_key + local_public
    ikm = hmac_sha256(hmac_sha256(auth_secret, shared_secret), key_info + b"\x01")
    salt = secrets.token_bytes(16)
    prk = hmac_sha256(salt, ikm)
    content_key = hmac_sha256(prk, b"Content-Encoding: aes128gcm\x00\x01")[:16]
    nonce = hmac_sha256(prk, b"Content-Encoding: nonce\x00\x01")[:12]
    record = AESGCM(content_key).encrypt(nonce, payload + b"\x02", None)  # \x02: the last record
    return (salt + struct.pack("!IB", PUSH_RECORD_SIZE, len(local_public)) + local_public
            + record)


# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, the
# old IPv4-compatible form): the IPv4 one is where such a packet ends up.
IPV4_CARRYING_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"),
                          ipaddress.ip_network("::/96"))


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            ip = ip.teredo[1]
        elif any(ip in prefix for prefix in IPV4_CARRYING_PREFIXES):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


class PushAddressError(Exception):
    """A push endpoint the server will not send to."""


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_allowed_push_host(host: str, port: int, allowed_hosts: tuple[str, ...]) -> bool:
    """--push-allow-host HOST admits it on any port; HOST:PORT on that one."""
    return host.lower() in allowed_hosts or f"{host.lower()}:{port}" in allowed_hosts


def endpoint_host(endpoint: str, allowed_hosts: tuple[str, ...]) -> tuple[str, int, bool]:
    """(host, port, is_allowed) of an endpoint the server may try; else PushAddressError.
    https only, unless its host:port was admitted with --push-allow-host."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise PushAddressError("the endpoint is not a URL") from None
    host = (parts.hostname or "").lower()
    if not host or parts.username or parts.password:
        raise PushAddressError("the endpoint has no usable host")
    is_allowed = is_allowed_push_host(host, port, allowed_hosts)
    if parts.scheme != "https" and not (is_allowed and parts.scheme == "http"):
        raise PushAddressError("a push endpoint must be https://")
    return host, port, is_allowed


async def check_push_endpoint(endpoint: str, allowed_hosts: tuple[str, ...]) -> None:
    """Refuse (PushAddressError) an endpoint that is not a public https address,
    after resolving its name: every address it resolves to must be public."""
    host, port, is_allowed = endpoint_host(endpoint, allowed_hosts)
    if is_allowed:
        return
    try:
        async with asyncio.timeout(PUSH_RESOLVE_TIMEOUT_S):  # resolver threads are shared
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, TimeoutError):
        raise PushAddressError("the endpoint's host does not resolve") from None
    if not infos or not all(is_public_address(info[4][0]) for info in infos):
        raise PushAddressError("the endpoint is not on a public address")


class PublicOnlyResolver(AbstractResolver):
    """The push sender's resolver: only public addresses, except admitted hosts,
    so the address connected to is the address checked."""

    def __init__(self, allowed_hosts: tuple[str, ...]) -> None:
        self.allowed_hosts = allowed_hosts
        self.resolver = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list:
        addresses = await self.resolver.resolve(host, port, family)
        if is_allowed_push_host(host, port, self.allowed_hosts):
            return addresses
        public = [address for address in addresses if is_public_address(address["host"])]
        if not public:
            raise OSError(f"{host} is not on a public address")
        return public

    async def close(self) -> None:
        await self.resolver.close()


@dataclass(slots=True)
class PushJob:
    kind: str  # "message": a stored message for its room's other person; "read": unread back to 0
    user_id: str  # "message": its sender (the push goes to the other person); "read": the reader
    room_id: str = ""
    session_id: int = 0
    message_id: int = 0
    sender_name: str = ""
    preview: str = ""


class PushSender:
    """The bounded queue of pushes and the one task that works through it."""

    def __init__(self, storage: Storage, hub: ChatHub, metrics: Metrics, *,
                 vapid_private_key: str | None, contact: str | None,
                 allowed_hosts: tuple[str, ...], show_preview: bool,
                 retry_first_s: float) -> None:
        self.storage, self.hub, self.metrics = storage, hub, metrics
        self.configured_key = vapid_private_key
        self.contact = contact
        self.allowed_hosts = allowed_hosts
        self.show_preview = show_preview
        self.retry_first_s = retry_first_s
        self.queue: asyncio.Queue[PushJob] = asyncio.Queue(PUSH_QUEUE_MAX)
        self.vapid: Vapid | None = None
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task | None = None
        self.deliveries: set[asyncio.Task] = set()
        # Posts under way at once. A delivery waiting to retry holds no slot, so
        # a failing push service never holds up everyone else's pushes.
        self.delivery_slots = asyncio.Semaphore(PUSH_DELIVERIES_AT_ONCE)
        # Who may have a notification of ours showing (this process's view):
        # only they get the "read" push that clears it.
        self.users_notified: set[str] = set()
        self.is_dropping = False  # the queue was full at the last push

    async def public_key(self) -> str:
        return (await self._vapid()).public_key_b64

    async def _vapid(self) -> Vapid:
        if self.vapid is None:
            key = self.configured_key or await self.storage.vapid_private_key(new_vapid_private_key)
            self.vapid = Vapid(key, self.contact)
        return self.vapid

    def message_stored(self, room_id: str, session_id: int, message_id: int, sender_id: str,
                       sender_name: str, content: str, *, recipient_id: str | None = None) -> None:
        """A chat, photo or spread is stored: its room's other person may need a push.
        When the caller knows who that is and they are in the room (the usual
        case in a live chat), nothing is queued: no job, no read per message."""
        if recipient_id is not None and self.hub.is_present(room_id, recipient_id):
            return
        preview = content[:PUSH_PREVIEW_CHARS] if content else PHOTO_PREVIEW
        self._put(PushJob("message", sender_id, room_id, session_id, message_id, sender_name,
                          preview if self.show_preview else ""))

    def read_moved(self, user_id: str) -> None:
        self._put(PushJob("read", user_id))

    def _put(self, job: PushJob) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:  # a push is a nudge, not the message: drop it
            self.metrics.push_sent["dropped"] += 1
            if not self.is_dropping:  # one line when it starts, not one per push
                log_event(logging.WARNING, "push_failed", reason="queue full")
            self.is_dropping = True
        else:
            self.is_dropping = False

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="push sender")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for delivery in list(self.deliveries):
            delivery.cancel()
        await asyncio.gather(*filter(None, [self.task, *self.deliveries]), return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def run(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                await self._handle(job)
            except StorageUnavailable as error:
                log_event(logging.WARNING, "push_failed", reason="storage", error=error)
            except Exception as error:  # a bad push must not stop the later ones
                log_event(logging.ERROR, "push_failed", reason="unexpected", error=repr(error))

    async def _handle(self, job: PushJob) -> None:
        if job.kind == "message":
            row = await self.storage.room(job.session_id)
            if row is None:
                return
            recipient = row["member_id"] if job.user_id == row["trainer_id"] else row["trainer_id"]
            if self.hub.is_present(job.room_id, recipient):
                return  # looking at the room already
        elif job.user_id not in self.users_notified:
            return  # no notification of ours can be showing: nothing to clear
        else:
            recipient = job.user_id
        subscriptions = await self.storage.push_subscriptions(recipient)
        if not subscriptions:
            return
        unread_total = await self.storage.unread_total(recipient)
        if job.kind == "message":
            payload = {"type": "message", "room_id": job.room_id, "message_id": job.message_id,
                       "sender_name": job.sender_name, "preview": job.preview,
                       "unread_total": unread_total}
            self.users_notified.add(recipient)
        elif unread_total == 0:  # the read brought the total to 0: clear the other devices
            payload = {"type": "read", "unread_total": 0}
            self.users_notified.discard(recipient)
        else:
            return
        vapid = await self._vapid()
        body = compact_json(payload).encode()
        for row in subscriptions:
            delivery = asyncio.create_task(self._deliver(vapid, row["endpoint"], row["p256dh"],
                                                         row["auth"], body, job.room_id))
            self.deliveries.add(delivery)
            delivery.add_done_callback(self.deliveries.discard)

    async def _deliver(self, vapid: Vapid, endpoint: str, p256dh: str, auth: str, body: bytes,
                       topic: str) -> None:
        """One push to one subscription; 429 and 5xx again with backoff for up to
        PUSH_RETRY_FOR_S, 404 and 410 delete the subscription."""
        host = urlsplit(endpoint).hostname  # never the path: it identifies the subscription
        try:
            encrypted = encrypt_push(body, b64url_decode(p256dh), b64url_decode(auth))
            _, _, is_allowed = endpoint_host(endpoint, self.allowed_hosts)
            # A literal address skips the resolver: check it here, every time
            # (an admission removed since subscribing must count).
            if not is_allowed and is_ip_literal(host) and not is_public_address(host):
                raise PushAddressError("the endpoint is not on a public address")
        except (ValueError, PushAddressError) as error:
            self.metrics.push_sent["refused"] += 1
            log_event(logging.WARNING, "push_failed", host=host, reason=str(error))
            return
        headers = {"TTL": str(PUSH_TTL_S), "Urgency": "high", "Content-Encoding": "aes128gcm",
                   "Content-Type": "application/octet-stream"}
        if topic:
            headers["Topic"] = topic  # a room id: URL-safe base64 characters only, as RFC 8030 asks
        give_up_at = time.monotonic() + PUSH_RETRY_FOR_S
        wait_s = self.retry_first_s
        while True:
            async with self.delivery_slots:
                status = await self._post(endpoint, encrypted, {
                    **headers, "Authorization": vapid.authorization(endpoint)})
            if status is not None and 200 <= status < 300:
                self.metrics.push_sent["sent"] += 1
                return
            if status in (404, 410):
                self.metrics.push_sent["gone"] += 1
                with contextlib.suppress(StorageUnavailable):
                    await self.storage.submit(store_unsubscriptions, {"endpoint": endpoint})
                log_event(logging.INFO, "push_subscription_gone", host=host, status=status)
                return
            if status is not None and status != 429 and status < 500:
                self.metrics.push_sent["failed"] += 1
                log_event(logging.WARNING, "push_failed", host=host, status=status)
                return
            if time.monotonic() + wait_s > give_up_at:
                self.metrics.push_sent["failed"] += 1
                log_event(logging.WARNING, "push_failed", host=host, status=status,
                          reason="gave up after retries")
                return
            self.metrics.push_sent["retried"] += 1
            await asyncio.sleep(wait_s * random.uniform(0.8, 1.2))
            wait_s = min(wait_s * 2, 120.0)

    async def _post(self, endpoint: str, body: bytes, headers: dict) -> int | None:
        """The push service's status, or None when it could not be reached."""
        if self.session is None:
            connector = aiohttp.TCPConnector(resolver=PublicOnlyResolver(self.allowed_hosts),
                                             limit=PUSH_DELIVERIES_AT_ONCE)
            self.session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT_S))
        try:
            async with self.session.post(endpoint, data=body, headers=headers,
                                         allow_redirects=False) as response:
                await response.content.read(PUSH_RESPONSE_READ_MAX)
                return response.status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
            log_event(logging.INFO, "push_unreachable", host=urlsplit(endpoint).hostname,
                      error=type(error).__name__)
            return None


# ============================================================== HTTP ===

SETTINGS = web.AppKey("SETTINGS", Settings)
TOKEN_RULES = web.AppKey("TOKEN_RULES", TokenRules)
METRICS = web.AppKey("METRICS", Metrics)
PUSH = web.AppKey("PUSH", PushSender)
STORAGE = web.AppKey("STORAGE", Storage)
HUB = web.AppKey("HUB", ChatHub)
PHOTOS = web.AppKey("PHOTOS", PhotoDesk)
PHOTO_UPLOAD_ROUTE = "photo_upload"  # its body is a photo: not held to MAX_BODY_BYTES

ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media",
               429: "rate_limited",
               431: "headers_too_large", 503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or ERROR_CODES.get(status, "error")
        self.message = message


def wants_json(request: web.Request) -> bool:
    if request.query.get("format") == "json":
        return True
    if request.path.startswith((f"{BASE_PATH}/ws/", f"{BASE_PATH}/healthz", f"{BASE_PATH}/push/")):
        return True
    if request.path.startswith(ROOMS_PATH + "/"):  # the messages API
        return True
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


def error_response(request: web.Request, status: int, code: str, message: str) -> web.Response:
    if wants_json(request):
        return web.json_response({"error": {"code": code, "message": message}}, status=status)
    context = {"status": status, "message": message, "is_sign_in_problem": status == 401,
               "rooms_path": ROOMS_PATH}
    return aiohttp_jinja2.render_template("error.html", request, context, status=status)


@web.middleware
async def forwarded_middleware(request: web.Request, handler) -> web.StreamResponse:
    """With --trust-proxy only: the client's address and scheme as the proxy in
    front saw them. The last X-Forwarded-For entry is the one that proxy added;
    any before it came from the client and prove nothing."""
    changes = {}
    scheme = request.headers.get("X-Forwarded-Proto", "").rsplit(",", 1)[-1].strip().lower()
    if scheme in ("http", "https"):
        changes["scheme"] = scheme
    address = request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
    if address:
        changes["remote"] = address
    return await handler(request.clone(**changes) if changes else request)


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    is_photo_upload = request.match_info.route.name == PHOTO_UPLOAD_ROUTE  # reads its own body
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES \
            and not is_photo_upload:
        return error_response(request, 413, "too_large", "the request body is over 64 KiB")
    try:
        if request.can_read_body and request.content_length is None and not is_photo_upload:
            await request.read()  # a chunked body: client_max_size answers 413 past 64 KiB
        return await handler(request)
    except ApiError as error:
        if error.status in (401, 403, 429):
            log_event(logging.INFO, "request_refused", path=request.path, status=error.status,
                      reason=error.message)
        return error_response(request, error.status, error.code, error.message)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        status = error.status if error.status in ERROR_CODES else 400
        return error_response(request, status, ERROR_CODES[status], error.reason)
    except asyncio.CancelledError:
        raise
    except StorageUnavailable as error:
        log_event(logging.WARNING, "storage_error", path=request.path, error=error)
        return error_response(request, 503, "unavailable", "storage is unavailable; try again")
    except Exception:
        log.exception("unexpected error", extra={"event": "unexpected_error",
                                                 "fields": {"path": request.path}})
        return error_response(request, 503, "unavailable", "something went wrong; try again")


# A Host header as browsers send it; anything else is left out of the policy.
HOST_PATTERN = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def connect_sources(request: web.Request) -> str:
    """Scripts may connect to this origin only. Older Safari does not count a
    WebSocket to its own host as 'self', so that one address is named too."""
    if not HOST_PATTERN.fullmatch(request.host):
        return "'self'"
    return f"'self' {'wss' if request.secure else 'ws'}://{request.host}"


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME
    # Most answers depend on who is signed in: no shared cache may keep them.
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null"
    # with our own forms' POSTs, and sign-out and sign-in check that Origin.
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if response.content_type == "text/html":
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self'; "
            f"img-src 'self' data:; connect-src {connect_sources(request)}; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def is_own_origin(request: web.Request, origin: str) -> bool:
    try:
        parts = urlsplit(origin.strip().lower().rstrip("/"))
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.netloc == request.host.lower()


def is_cross_site(request: web.Request) -> bool:
    """A browser request sent by another site's page: its Origin is not ours,
    or the browser says so. A client that is no browser sends neither."""
    if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("Origin")
    return origin is not None and not is_own_origin(request, origin)


def origin_allowed(request: web.Request, settings: Settings) -> bool:
    """No Origin (a non-browser client) or our own, or one the operator allowed."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin.strip().lower().rstrip("/") in settings.allowed_origins \
        or is_own_origin(request, origin)


async def require_identity(request: web.Request) -> Identity:
    try:
        return await identity_from_token(request.app[STORAGE], token_from_request(request),
                                         request.app[TOKEN_RULES])
    except AuthError as error:
        raise ApiError(401, str(error)) from None


def check_claimed_user(request: web.Request, identity: Identity) -> None:
    claimed_user_id = request.query.get("user_id")
    if claimed_user_id is not None and claimed_user_id != identity.user_id:
        raise ApiError(403, "user_id does not match the signed-in user")


async def require_room(request: web.Request, identity: Identity, room_id: str) -> Room:
    room = await load_room(request.app[STORAGE], room_id)
    if room is None:
        raise ApiError(404, f"no such room: {room_id[:80]}")
    if not room.admits(identity):
        raise ApiError(403, "this room is not yours")
    return room


def parse_message_id(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ApiError(400, f"{name} must be a message id (a whole number ≥ 0)")
    return int(text)


def parse_limit(request: web.Request) -> int:
    text = request.query.get("limit")
    if text is None:
        return PAGE_LIMIT_DEFAULT
    if not (text.isascii() and text.isdigit() and len(text) <= 3
            and 1 <= int(text) <= PAGE_LIMIT_MAX):
        raise ApiError(400, f"limit must be a whole number from 1 to {PAGE_LIMIT_MAX}")
    return int(text)


async def rooms_handler(request: web.Request) -> web.StreamResponse:
    identity = await require_identity(request)
    check_claimed_user(request, identity)
    chat_rooms_json = await request.app[STORAGE].room_list_json(
        identity.user_id, is_trainer=identity.role == "trainer")
    if wants_json(request):
        return web.Response(text='{"chat_rooms":' + chat_rooms_json + "}",
                            content_type="application/json")
    chat_rooms = json.loads(chat_rooms_json)
    context = {"identity": identity, "chat_rooms": chat_rooms,
               "boot": {"page": "rooms", "user_id": identity.user_id, "role": identity.role,
                        "name": identity.name, "rooms_path": ROOMS_PATH,
                        "logout_path": f"{BASE_PATH}/logout", "chat_rooms": chat_rooms,
                        "tz": request.app[SETTINGS].tz_name}}
    return aiohttp_jinja2.render_template("chat_rooms.html", request, context)


async def messages_handler(request: web.Request) -> web.Response:
    identity = await require_identity(request)
    check_claimed_user(request, identity)
    room = await require_room(request, identity, request.match_info["room_id"])
    before_id = parse_message_id(request, "before")
    after_id = parse_message_id(request, "after")
    if before_id is not None and after_id is not None:
        raise ApiError(400, "give before or after, not both")
    limit = parse_limit(request)
    if not request.app[HUB].history_reads.allows(identity.user_id):
        raise ApiError(429, "too many history reads a second; try again shortly")
    rows, has_more = await request.app[STORAGE].messages(room.session_id, before_id=before_id,
                                                         after_id=after_id, limit=limit)
    return web.json_response({"messages": [message_from_row(row) for row in rows],
                              "has_more": has_more}, dumps=compact_json)


async def photo_upload_handler(request: web.Request) -> web.Response:
    """SPEC 9: one photo, decoded and stored (durable) before the 201."""
    settings, storage = request.app[SETTINGS], request.app[STORAGE]
    if not origin_allowed(request, settings):
        raise ApiError(403, "this origin may not upload here")
    identity = await require_identity(request)
    room = await require_room(request, identity, request.match_info["room_id"])
    if room.status != "active":
        raise ApiError(403, "this session has ended; the room is read-only", "room_closed")
    try:
        with request.app[PHOTOS].upload_slot(identity.user_id):
            data = await read_photo_upload(request, settings.max_photo_mb * MIB)
            photo = await request.app[PHOTOS].reencode(data)
    except PhotoRefused as refusal:
        log_event(logging.INFO, "photo_refused", room_id=room.room_id, user_id=identity.user_id,
                  status=refusal.status, reason=refusal.message)
        raise ApiError(refusal.status, refusal.message, refusal.code) from None
    photo_id = new_photo_id()
    await storage.submit(store_photos, {
        "photo_id": photo_id, "session_id": room.session_id, "user_id": identity.user_id,
        "media_type": photo.media_type, "width": photo.width, "height": photo.height,
        "created_at": utc_now_iso(), "thumb": photo.thumb, "image": photo.image})
    return web.json_response({"photo_id": photo_id, "width": photo.width, "height": photo.height},
                             status=201)


async def read_photo_upload(request: web.Request, max_bytes: int) -> bytearray:
    """The multipart body's `photo` field, read as it arrives and refused the
    moment the body passes ``max_bytes``, so no more than that is ever held.
    Its filename and Content-Type are not looked at: the decoder decides."""
    too_large = PhotoRefused(413, "too_large", f"a photo upload is at most {max_bytes // MIB} MiB")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    if request.content_type != "multipart/form-data":
        raise ApiError(400, "send the photo as multipart/form-data, in a file field named photo")
    photo: bytearray | None = None
    received = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader):
                raise ApiError(400, "a nested multipart body is not a photo")
            kept = bytearray() if part.name == "photo" and photo is None else None
            while chunk := await part.read_chunk(PHOTO_READ_CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise too_large
                if kept is not None:
                    kept += chunk
            if kept is not None:
                photo = kept
    except (ValueError, RuntimeError, LookupError, AssertionError):  # a malformed body
        raise ApiError(400, "the body is not multipart/form-data as sent by a browser") from None
    if photo is None:
        raise ApiError(400, "the form has no file field named photo")
    return photo


async def photo_handler(request: web.Request) -> web.Response:
    """A photo or its thumbnail, for its room's participants. To anyone else it
    is the same 404 as an id that never existed."""
    identity = await require_identity(request)
    photo_id = request.match_info["photo_id"]
    found = None
    if PHOTO_ID_PATTERN.fullmatch(photo_id):
        found = await request.app[STORAGE].photo_for_viewer(
            photo_id, identity.user_id, is_thumb=request.path.endswith("/thumb"))
    if found is None:
        raise ApiError(404, "no such photo")
    media_type, body = found
    return web.Response(body=body, content_type=media_type,
                        headers={"Cache-Control": PHOTO_CACHE_CONTROL})


async def chat_page_handler(request: web.Request) -> web.Response:
    identity = await require_identity(request)
    check_claimed_user(request, identity)
    room_id = request.query.get("room_id")
    if not room_id:
        raise ApiError(400, "room_id is required")
    room = await require_room(request, identity, room_id)
    storage, settings = request.app[STORAGE], request.app[SETTINGS]
    rows, has_more = await storage.messages(room.session_id, limit=HISTORY_LATEST_COUNT)
    messages = [message_from_row(row) for row in rows]
    participants = await storage.participants(room.session_id)
    peer_name = next((row["name"] for row in participants if row["user_id"] != identity.user_id), "")
    boot = {"page": "chat", "room_id": room.room_id, "user_id": identity.user_id,
            "role": identity.role, "name": identity.name, "peer_name": peer_name,
            "status": room.status,
            "ws_path": f"{BASE_PATH}/ws/chat/{room.room_id}",
            "messages_path": f"{ROOMS_PATH}/{room.room_id}/messages",
            "rooms_path": ROOMS_PATH, "tz": settings.tz_name,
            "max_message_chars": settings.max_message_chars}
    context = {"identity": identity, "room": room, "messages": messages, "has_more": has_more,
               "participants": participants, "boot": boot}
    return aiohttp_jinja2.render_template("distributor_chat.html", request, context)


def safe_next_path(next_path: str | None) -> str:
    """Only a plain path under /distributor/ is followed (no open redirect)."""
    if not next_path or any(ord(char) < 0x20 or char in "\\\x7f" for char in next_path):
        return ROOMS_PATH
    try:
        parts = urlsplit(next_path)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return ROOMS_PATH
    if parts.scheme or parts.netloc or not parts.path.startswith(BASE_PATH + "/"):
        return ROOMS_PATH
    # Browsers resolve %2e%2e as "..": judge the path as they will read it.
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        return ROOMS_PATH
    # Location must be ASCII: percent-encode anything else (Korean paths included).
    return quote(next_path, safe="!#$%&'()*+,/:;=?@[]~")


async def identity_of_link(request: web.Request, token: str | None) -> Identity:
    try:
        return await identity_from_token(request.app[STORAGE], token, request.app[TOKEN_RULES])
    except AuthError as error:
        raise ApiError(401, str(error)) from None


def signed_in_response(identity: Identity, token: str, next_path: str, *,
                       secure: bool) -> web.Response:
    response = web.Response(status=303, headers={"Location": next_path})
    response.set_cookie(TOKEN_COOKIE, token, path=BASE_PATH, httponly=True,
                        samesite="Lax", secure=secure,
                        max_age=max(0, int(identity.expires_at - time.time())))
    log_event(logging.INFO, "sign_in", user_id=identity.user_id)
    return response


async def login_handler(request: web.Request) -> web.Response:
    """A sign-in link. Over another user's valid cookie it only asks: a link
    someone else made must not swap who this browser is (login CSRF)."""
    token = request.query.get("token")
    identity = await identity_of_link(request, token)
    next_path = safe_next_path(request.query.get("next"))
    try:
        signed_in = await identity_from_token(request.app[STORAGE],
                                              request.cookies.get(TOKEN_COOKIE),
                                              request.app[TOKEN_RULES])
    except AuthError:
        signed_in = None
    if signed_in is not None and signed_in.user_id != identity.user_id:
        context = {"signed_in": signed_in, "identity": identity, "token": token,
                   "next_path": next_path, "login_path": f"{BASE_PATH}/login"}
        return aiohttp_jinja2.render_template("confirm_sign_in.html", request, context)
    return signed_in_response(identity, token, next_path, secure=request.secure)


async def confirm_login_handler(request: web.Request) -> web.Response:
    """The confirmation page's button: only a same-origin POST replaces the cookie."""
    if is_cross_site(request):
        raise ApiError(403, "sign-in from another site refused")
    form = await request.post()
    token = form.get("token")
    identity = await identity_of_link(request, token if isinstance(token, str) else None)
    next_field = form.get("next")
    next_path = safe_next_path(next_field if isinstance(next_field, str) else None)
    return signed_in_response(identity, token, next_path, secure=request.secure)


async def revoke_token(request: web.Request, token: str) -> None:
    """Refuse this token everywhere until it would have expired, open sockets too."""
    try:
        claims = decode_token(token, request.app[TOKEN_RULES])
    except AuthError:
        return  # expired or forged: nothing to refuse that is not refused already
    token_hash = token_hash_of(token)
    params = {"token_hash": token_hash, "expires_at": math.ceil(claims["exp"])}
    try:
        await request.app[STORAGE].submit(store_revocations, params)
    except StorageUnavailable:
        raise ApiError(503, "could not sign out; try again") from None
    request.app[HUB].close_signed_out(token_hash)
    log_event(logging.INFO, "sign_out", user_id=claims["sub"])


async def logout_handler(request: web.Request) -> web.Response:
    """Clear the cookie and revoke its token: a sign-in link left in a shared
    tablet's history must not sign the next person straight back in."""
    if is_cross_site(request):
        raise ApiError(403, "sign-out from another site refused")
    for token in {request.cookies.get(TOKEN_COOKIE), token_from_request(request)} - {None}:
        await revoke_token(request, token)
    if wants_json(request):
        response = web.json_response({"status": "signed_out"})
    else:
        response = web.Response(status=303, headers={"Location": ROOMS_PATH})
    response.del_cookie(TOKEN_COOKIE, path=BASE_PATH)
    return response


async def push_key_handler(request: web.Request) -> web.Response:
    """The VAPID public key a browser subscribes with (no sign-in needed: it is public)."""
    return web.json_response({"public_key": await request.app[PUSH].public_key()})


async def read_json_body(request: web.Request) -> Any:
    """A push subscription request's body: JSON only, from our own pages only."""
    if not origin_allowed(request, request.app[SETTINGS]):
        raise ApiError(403, "a request from another site is refused")
    if request.content_type != "application/json":
        raise ApiError(415, "send application/json", "unsupported_media")
    try:
        return json.loads(await request.text())
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise ApiError(400, "the body is not JSON") from None


def checked_subscription(body: Any) -> dict:
    """PushSubscription.toJSON(): endpoint, keys.p256dh (a P-256 point), keys.auth (16 bytes)."""
    if not isinstance(body, dict) or not isinstance(body.get("endpoint"), str) \
            or not 1 <= len(body["endpoint"]) <= 2048 or not isinstance(body.get("keys"), dict):
        raise ApiError(400, "a subscription has an endpoint and keys")
    keys = body["keys"]
    try:
        p256dh = b64url_decode(keys["p256dh"])
        auth = b64url_decode(keys["auth"])
    except (KeyError, TypeError, ValueError):
        raise ApiError(400, "keys.p256dh and keys.auth must be base64url") from None
    if len(p256dh) != 65 or p256dh[0] != 4 or len(auth) != 16:
        raise ApiError(400, "keys.p256dh must be an uncompressed P-256 key and keys.auth 16 bytes")
    return {"endpoint": body["endpoint"], "p256dh": keys["p256dh"], "auth": keys["auth"]}


async def subscribe_handler(request: web.Request) -> web.Response:
    identity = await require_identity(request)
    if not request.app[HUB].subscribes.allows(identity.user_id):
        raise ApiError(429, "too many subscriptions a second; try again shortly")
    subscription = checked_subscription(await read_json_body(request))
    try:
        await check_push_endpoint(subscription["endpoint"], request.app[SETTINGS].push_allow_hosts)
    except PushAddressError as error:
        raise ApiError(400, str(error)) from None
    params = {**subscription, "user_id": identity.user_id, "created_at": utc_now_iso()}
    try:
        await request.app[STORAGE].submit(store_subscriptions, params)
    except StorageUnavailable:
        raise ApiError(503, "not stored; try again") from None
    return web.json_response({"status": "subscribed"}, status=201)


async def unsubscribe_handler(request: web.Request) -> web.Response:
    identity = await require_identity(request)
    body = await read_json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("endpoint"), str):
        raise ApiError(400, "give the endpoint to unsubscribe")
    try:
        await request.app[STORAGE].submit(store_unsubscriptions,
                                          {"endpoint": body["endpoint"], "user_id": identity.user_id})
    except StorageUnavailable:
        raise ApiError(503, "not stored; try again") from None
    return web.Response(status=204)


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus' text format, only with --metrics-token, only to that Bearer token."""
    token = request.app[SETTINGS].metrics_token
    if token is None:
        raise ApiError(404, "no such page")
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(),
                                                             token.encode()):
        raise ApiError(401, "the metrics token is missing or wrong")
    hub = request.app[HUB]
    text = request.app[METRICS].render(sockets_open=len(hub.all_sockets()),
                                       rooms_live=len(hub.room_sockets))
    return web.Response(body=text.encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def healthz_handler(request: web.Request) -> web.Response:
    await request.app[STORAGE].check()
    return web.json_response({"status": "ok"})


async def static_handler(request: web.Request) -> web.FileResponse:
    """Files under static/ only; a missing one is a 404 in the usual error shape."""
    try:
        target = (STATIC_DIR / request.match_info["path"]).resolve()
        is_ours = target.is_relative_to(STATIC_DIR) and target.is_file()
    except (OSError, ValueError):  # a NUL or an over-long name
        is_ours = False
    if not is_ours:
        raise ApiError(404, "no such file")
    return web.FileResponse(target, headers={"Cache-Control": "no-cache"})


# The installable app (SPEC 10): what a phone's "Add to Home Screen" reads.
APP_MANIFEST = {
    "name": "Distributor Chat", "short_name": "PT 채팅", "lang": "ko",
    "start_url": ROOMS_PATH, "scope": f"{BASE_PATH}/", "display": "standalone",
    "theme_color": "#fee500", "background_color": "#f3f4f6",
    "icons": [
        {"src": f"{BASE_PATH}/static/icons/icon-192.png", "sizes": "192x192", "type": "image/png"},
        {"src": f"{BASE_PATH}/static/icons/icon-512.png", "sizes": "512x512", "type": "image/png"},
        {"src": f"{BASE_PATH}/static/icons/icon-maskable-512.png", "sizes": "512x512",
         "type": "image/png", "purpose": "maskable"},
    ],
}
SERVICE_WORKER_PATH = STATIC_DIR / "js" / "sw.js"


async def manifest_handler(request: web.Request) -> web.Response:
    return web.Response(text=compact_json(APP_MANIFEST), content_type="application/manifest+json",
                        headers={"Cache-Control": "no-cache"})


async def service_worker_handler(request: web.Request) -> web.FileResponse:
    """The worker's script, at the top of the scope it serves (/distributor/)."""
    return web.FileResponse(SERVICE_WORKER_PATH, headers={
        "Content-Type": "text/javascript; charset=utf-8", "Cache-Control": "no-cache"})


async def home_handler(request: web.Request) -> web.Response:
    return web.Response(status=303, headers={"Location": ROOMS_PATH})


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Access lines without the query string: sign-in tokens ride in it."""

    def log(self, request, response, time_taken: float) -> None:
        self.logger.info("%s", "http", extra={"event": "http", "fields": {
            "method": request.method, "path": request.path, "status": response.status,
            "ms": round(time_taken * 1000, 1)}})


# ========================================================= WebSocket ===


class SocketRefused(Exception):
    """The upgrade is accepted and closed at once with ``code`` (SPEC 5)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# HTTP's refusals, as a WebSocket says them after the upgrade.
CLOSE_CODES_BY_STATUS = {401: CLOSE_UNAUTHORIZED, 403: CLOSE_FORBIDDEN, 404: CLOSE_NOT_FOUND}


async def check_socket_access(request: web.Request, room_id: str) -> tuple[Identity, Room]:
    """The caller and the room, checked as HTTP checks them, or SocketRefused."""
    try:
        identity = await require_identity(request)
        check_claimed_user(request, identity)
        return identity, await require_room(request, identity, room_id)
    except ApiError as error:
        if error.status not in CLOSE_CODES_BY_STATUS:
            raise
        raise SocketRefused(CLOSE_CODES_BY_STATUS[error.status], error.message) from None


def check_socket_budget(request: web.Request, identity: Identity, after_id: int | None) -> None:
    """An authorized caller's socket is still refused (SocketRefused) while the
    server stops, past the user's opens and reads a second, or their 20 sockets."""
    hub = request.app[HUB]
    if hub.is_closing:
        raise SocketRefused(WSCloseCode.GOING_AWAY, "server shutting down")
    if not hub.opens.allows(identity.user_id) or (
            after_id is not None and not hub.history_reads.allows(identity.user_id)):
        raise SocketRefused(WSCloseCode.TRY_AGAIN_LATER,
                            "too many connections a second; try again shortly")
    if not hub.has_room_for(identity.user_id):
        raise SocketRefused(WSCloseCode.POLICY_VIOLATION,
                            f"at most {MAX_SOCKETS_PER_USER} open connections per user")


def parse_after_id(request: web.Request) -> int | None:
    """The client's newest message id; anything unusable reads as none."""
    text = request.query.get("after", "")
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


async def send_welcome(request: web.Request, ws: ChatSocket) -> None:
    """Welcome, then history, then the live frames that came in meanwhile."""
    storage, hub = request.app[STORAGE], request.app[HUB]
    room = ws.room
    participants = [{"user_id": row["user_id"], "name": row["name"], "role": row["role"],
                     "online": hub.is_online(room.room_id, row["user_id"]),
                     "last_read_id": row["last_read_id"]}
                    for row in await storage.participants(room.session_id)]
    after_id = parse_after_id(request)
    rows, has_more = await storage.history(room.session_id, after_id)
    history, newest_id = history_wire_frame([message_from_row(row) for row in rows], has_more,
                                            keep_oldest=after_id is not None)
    ws.start_live([wire_frame(welcome_frame(room, ws.identity, participants)), history],
                  newest_id if newest_id is not None else after_id or 0)


class FrameError(Exception):
    def __init__(self, code: str, message: str, client_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.client_id = client_id


CLIENT_FRAME_TYPES = ("chat", "spread", "read", "typing")


def parse_client_frame(text: str, ws: ChatSocket) -> dict:
    """A client frame as a dict with a known type, checked against the socket."""
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        raise FrameError("invalid_message", "frames must be JSON") from None
    if not isinstance(frame, dict):
        raise FrameError("invalid_message", "a frame must be a JSON object")
    client_id = echoed_client_id(frame)
    frame_type = frame.get("type")
    if frame_type not in CLIENT_FRAME_TYPES:
        raise FrameError("invalid_message", "unknown frame type", client_id)
    for name, expected in (("room_id", ws.room.room_id), ("user_id", ws.identity.user_id)):
        if name in frame:
            if not isinstance(frame[name], str):
                raise FrameError("invalid_message", f"{name} must be a string", client_id)
            if frame[name] != expected:
                raise FrameError("forbidden", f"{name} does not match this connection", client_id)
    return frame


def echoed_client_id(frame: dict) -> str | None:
    """The client_id an error about this frame carries: any string the frame had,
    even an invalid one, so the client can settle its pending message (SPEC 5)."""
    client_id = frame.get("client_id")
    return client_id if isinstance(client_id, str) else None


def is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return "\x00" not in text


def checked_client_id(frame: dict) -> str:
    client_id = frame.get("client_id")
    if not isinstance(client_id, str) or not 1 <= len(client_id) <= CLIENT_ID_MAX_CHARS \
            or not is_encodable(client_id):
        raise FrameError("invalid_message", f"client_id must be 1 to {CLIENT_ID_MAX_CHARS} characters",
                         echoed_client_id(frame))
    return client_id


def checked_content(frame: dict, client_id: str, max_chars: int, *, is_caption: bool) -> str:
    """The trimmed text; a photo's caption may be empty (or left out)."""
    content = frame.get("content", "" if is_caption else None)
    if not isinstance(content, str):
        raise FrameError("invalid_message", "content must be a string", client_id)
    if not is_encodable(content):
        raise FrameError("invalid_message", "content has a NUL or a lone surrogate", client_id)
    content = content.strip()
    if not content and not is_caption:
        raise FrameError("empty", "the message is empty", client_id)
    if len(content) > max_chars:
        raise FrameError("too_long", f"a message holds at most {max_chars} characters", client_id)
    return content


PHOTO_NOT_SENDABLE = "photo_id must be a photo you uploaded to this room and have not sent yet"


async def checked_photo(storage: Storage, ws: ChatSocket, frame: dict, client_id: str) -> dict | None:
    """The message's photo field, or None for text. The writer checks again as it
    stores (the photo may have been sent meanwhile); this answers early and
    gives the frame its size."""
    photo_id = frame.get("photo_id")
    if photo_id is None:
        return None
    if frame["type"] != "chat":
        raise FrameError("invalid_message", "only a chat message carries a photo", client_id)
    if not isinstance(photo_id, str) or not PHOTO_ID_PATTERN.fullmatch(photo_id):
        raise FrameError("invalid_message", PHOTO_NOT_SENDABLE, client_id)
    try:
        row = await storage.photo(photo_id)
    except StorageUnavailable:
        raise FrameError("unavailable", "not stored; retry later with the same client_id",
                         client_id) from None
    if row is None or row["user_id"] != ws.identity.user_id \
            or row["session_id"] != ws.room.session_id:
        raise FrameError("invalid_message", PHOTO_NOT_SENDABLE, client_id)
    return photo_field(photo_id, row["width"], row["height"])


def reply_to_write(ws: ChatSocket, client_id: str, future: asyncio.Future) -> Any:
    """The stored outcome, or None after telling the sender why it was not stored."""
    if future.cancelled():
        return None
    error = future.exception()
    if isinstance(error, RoomClosed):
        ws.send_error("room_closed", "this session has ended; the room is read-only", client_id)
    elif isinstance(error, NotParticipant):
        ws.send_error("forbidden", "you are no longer in this room", client_id)
    elif isinstance(error, PhotoNotSendable):
        ws.send_error("invalid_message", PHOTO_NOT_SENDABLE, client_id)
    elif isinstance(error, StorageUnavailable):
        ws.send_error("unavailable", "not stored; retry later with the same client_id", client_id)
    elif error is not None:
        log_event(logging.ERROR, "storage_error", room_id=ws.room.room_id, error=repr(error))
        ws.send_error("unavailable", "not stored; retry later", client_id)
    else:
        return future.result()
    return None


def publish_chat(hub: ChatHub, ws: ChatSocket, client_id: str, content: str, photo: dict | None,
                 future: asyncio.Future) -> None:
    """Runs as the write settles, in commit order, even if the handler is gone."""
    stored: StoredMessage | None = reply_to_write(ws, client_id, future)
    if stored is None:
        return
    if not stored.is_duplicate:
        hub.metrics.messages_stored["chat"] += 1
        hub.broadcast(ws.room.room_id, message_frame(
            message_type="chat", message_id=stored.message_id, session_id=ws.room.session_id,
            user_id=ws.identity.user_id, sender_name=ws.identity.name, content=content,
            created_at=stored.created_at, client_id=client_id, photo=photo))
        if hub.push is not None:
            hub.push.message_stored(ws.room.room_id, ws.room.session_id, stored.message_id,
                                    ws.identity.user_id, ws.identity.name, content,
                                    recipient_id=ws.room.other_participant(ws.identity.user_id))
    ws.send_later(ack_frame(client_id, stored.message_id, stored.created_at))


def publish_spread(hub: ChatHub, ws: ChatSocket, client_id: str, content: str,
                   future: asyncio.Future) -> None:
    stored: StoredSpread | None = reply_to_write(ws, client_id, future)
    if stored is None:
        return
    message_ids = stored.message_ids_by_session  # empty for a resend
    hub.metrics.messages_stored["spread"] += len(message_ids)

    def publish_in(session_id: int) -> None:
        room_id = room_id_of(session_id)
        hub.broadcast(room_id, message_frame(
            message_type="spread", message_id=message_ids[session_id], session_id=session_id,
            user_id=ws.identity.user_id, sender_name=ws.identity.name, content=content,
            created_at=stored.created_at, client_id=client_id))
        if hub.push is not None:
            hub.push.message_stored(room_id, session_id, message_ids[session_id],
                                    ws.identity.user_id, ws.identity.name, content,
                                    recipient_id=stored.member_ids_by_session[session_id])

    # The sender's room, then the ack, which leaves at once: the copies for
    # hundreds of other rooms come after it.
    if ws.room.session_id in message_ids:
        publish_in(ws.room.session_id)
    ws.send_later({**ack_frame(client_id, stored.message_id, stored.created_at),
                   "rooms": stored.room_count})
    ws.flush_now()
    for session_id in message_ids:
        if session_id != ws.room.session_id:
            publish_in(session_id)


def publish_read(hub: ChatHub, ws: ChatSocket, future: asyncio.Future) -> None:
    if future.cancelled() or future.exception() is not None:
        return  # a lost read receipt is resent with the next one
    last_read_id = future.result()
    if last_read_id is not None:
        hub.broadcast(ws.room.room_id, read_frame(ws.room.room_id, ws.identity.user_id,
                                                  last_read_id))
        if hub.push is not None:  # at 0 unread, the user's other devices clear their badge
            hub.push.read_moved(ws.identity.user_id)


async def track_write(ws: ChatSocket, future: asyncio.Future) -> None:
    """A socket's frames go to the writer as they arrive (a client's pipelined
    messages share one COMMIT), up to WRITES_IN_FLIGHT_PER_SOCKET; past that
    its frames wait here for the oldest write, so a flood from one socket
    holds at most that many places in the writer's queue. The writer stores
    and answers in queue order, so acks and deliveries keep the socket's order.
    ``asyncio.wait`` neither raises a write's error (its callback answers the
    client) nor cancels the write when the handler stops, so a committed
    message still gets its ack."""
    in_flight = ws.writes_in_flight
    in_flight.append(future)
    future.add_done_callback(lambda done: in_flight.remove(done))
    if len(in_flight) >= WRITES_IN_FLIGHT_PER_SOCKET:
        await asyncio.wait((in_flight[0],))


async def handle_send(request: web.Request, ws: ChatSocket, frame: dict) -> None:
    settings, hub, storage = request.app[SETTINGS], request.app[HUB], request.app[STORAGE]
    client_id = checked_client_id(frame)
    has_photo = frame.get("photo_id") is not None
    content = checked_content(frame, client_id, settings.max_message_chars, is_caption=has_photo)
    is_spread = frame["type"] == "spread"
    if is_spread and ws.identity.role != "trainer":
        raise FrameError("forbidden", "only trainers can spread", client_id)
    if not hub.sends.allows(ws.identity.user_id):
        raise FrameError("rate_limited", "too many messages; slow down", client_id)
    photo = await checked_photo(storage, ws, frame, client_id) if has_photo else None
    ws.last_typing_at = 0.0  # a message ends this bout of typing: relay the next one at once
    params = {"session_id": ws.room.session_id, "user_id": ws.identity.user_id,
              "content": content, "client_id": client_id, "created_at": utc_now_iso(),
              "photo_id": photo and photo["id"]}
    if is_spread:
        store, publish = store_spreads, functools.partial(publish_spread, hub, ws, client_id, content)
    else:
        store, publish = store_chats, functools.partial(publish_chat, hub, ws, client_id, content, photo)
    try:
        future = storage.submit(store, params)
    except StorageUnavailable:
        raise FrameError("unavailable", "not stored; retry later with the same client_id",
                         client_id) from None
    future.add_done_callback(publish)
    await track_write(ws, future)


async def handle_read(request: web.Request, ws: ChatSocket, frame: dict) -> None:
    message_id = frame.get("message_id")
    if not isinstance(message_id, int) or isinstance(message_id, bool) or message_id <= 0:
        raise FrameError("invalid_message", "message_id must be a positive whole number",
                         echoed_client_id(frame))
    params = {"session_id": ws.room.session_id, "user_id": ws.identity.user_id,
              "message_id": min(message_id, 2**63 - 1)}
    try:
        future = request.app[STORAGE].submit(store_reads, params)
    except StorageUnavailable:
        raise FrameError("unavailable", "read receipt not stored; send it again later",
                         echoed_client_id(frame)) from None
    future.add_done_callback(lambda done: publish_read(request.app[HUB], ws, done))
    await track_write(ws, future)


def handle_typing(request: web.Request, ws: ChatSocket) -> None:
    now = time.monotonic()
    if now - ws.last_typing_at < TYPING_RELAY_INTERVAL_S:
        return  # keystrokes arrive faster than anyone can see them
    ws.last_typing_at = now
    request.app[HUB].broadcast(ws.room.room_id, typing_frame(ws.room.room_id, ws.identity.user_id),
                               skip_user_id=ws.identity.user_id)


async def handle_text(request: web.Request, ws: ChatSocket, text: str) -> None:
    try:
        frame = parse_client_frame(text, ws)
        if frame["type"] in ("chat", "spread"):
            await handle_send(request, ws, frame)
        elif frame["type"] == "read":
            await handle_read(request, ws, frame)
        else:
            handle_typing(request, ws)
    except FrameError as error:
        ws.send_error(error.code, error.message, error.client_id)


def handle_control_frame(ws: ChatSocket, message: aiohttp.WSMessage, now: float) -> None:
    """Answer a ping (a pong needs nothing), within the socket's budget."""
    if not ws.heard_control_frame(now):
        ws.request_stop(WSCloseCode.POLICY_VIOLATION,
                        f"over {MAX_CONTROL_FRAMES_PER_S} pings and pongs a second")
    elif message.type is WSMsgType.PING:
        ws.enqueue(pong_wire_frame(message.data))


async def receive_frames(request: web.Request, ws: ChatSocket) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    try:
        while ws.stop_code is None:
            ws.is_receiving = True
            try:
                message = await ws.receive()
            finally:
                ws.is_receiving = False
            ws.last_heard_at = loop.time()
            if message.type is WSMsgType.TEXT:
                await handle_text(request, ws, message.data)
            elif message.type in (WSMsgType.PING, WSMsgType.PONG):
                handle_control_frame(ws, message, ws.last_heard_at)
            elif message.type is WSMsgType.BINARY:
                ws.send_error("invalid_message", "binary frames are not accepted")
            else:
                return  # closed by the peer, too large (1009), or the connection broke
            # Frames already buffered are read without waiting; a refused one is
            # answered at once. Take turns, so a flood holds up no one else.
            await asyncio.sleep(0)
    except asyncio.CancelledError:
        if not ws.is_receive_cancelled:
            raise
        ws.is_receive_cancelled = False
        task.uncancel()


def close_reason(reason: str) -> bytes:
    """A close frame's reason: at most 123 bytes, whole UTF-8 characters."""
    return reason.encode()[:120].decode(errors="ignore").encode()


async def close_socket(request: web.Request, ws: ChatSocket) -> None:
    """Flush what is queued (unless the peer is the problem), then close."""
    if ws.is_dead:
        return  # the sweep aborted the connection: no one is there to answer
    if ws.stop_code is not None and not ws.is_cut_off and not ws.closed:
        try:
            await ws.outbox.drain(SHUTDOWN_FLUSH_TIMEOUT_S)
        except TimeoutError:
            pass
    code = ws.stop_code or WSCloseCode.OK
    try:
        async with asyncio.timeout(CLOSE_HANDSHAKE_TIMEOUT_S + 1):
            await ws.close(code=code, message=close_reason(ws.stop_reason))
    except (TimeoutError, ConnectionError):
        if request.transport is not None:
            request.transport.abort()


async def refuse_socket(request: web.Request, code: int, reason: str) -> web.WebSocketResponse:
    """Upgrade, then close at once with ``code``: a plain socket with no heartbeat
    and nothing of ours, gone once its close handshake ends (at most 2 s)."""
    ws = web.WebSocketResponse(autoping=False, timeout=CLOSE_HANDSHAKE_TIMEOUT_S,
                               max_msg_size=MAX_FRAME_BYTES + 1)
    await ws.prepare(request)
    request.app[METRICS].closes[int(code)] += 1
    log_event(logging.INFO, "ws_refused", room_id=request.match_info["room_id"][:80], code=code,
              reason=reason)
    try:
        await ws.close(code=code, message=close_reason(reason))
    except ConnectionError:
        pass
    return ws


async def chat_socket_handler(request: web.Request) -> web.StreamResponse:
    settings, hub = request.app[SETTINGS], request.app[HUB]
    if not origin_allowed(request, settings):
        raise ApiError(403, "cross-site WebSocket refused: this origin is not allowed")
    room_id = request.match_info["room_id"]
    try:
        identity, room = await check_socket_access(request, room_id)
        check_socket_budget(request, identity, parse_after_id(request))
    except SocketRefused as refusal:
        return await refuse_socket(request, refusal.code, refusal.reason)
    ws = ChatSocket(request.app[METRICS])
    await ws.prepare(request)
    ws.identity, ws.room = identity, room
    ws.outbox = Outbox(ws, request.transport)
    expiry = asyncio.get_running_loop().call_later(
        max(0.0, ws.identity.expires_at - time.time()),
        ws.request_stop, CLOSE_UNAUTHORIZED, "token expired; sign in again")
    is_new_presence = hub.add(ws)
    if hub.is_closing:  # shutdown began while this socket was being prepared
        ws.request_stop(WSCloseCode.GOING_AWAY, "server shutting down")
    log_event(logging.INFO, "ws_open", room_id=room_id, user_id=ws.identity.user_id,
              sockets=len(hub.room_sockets.get(room_id, ())))
    try:
        await send_welcome(request, ws)
        if is_new_presence:
            hub.broadcast(room_id, system_frame("join", room_id, ws.identity.user_id,
                                                ws.identity.name), skip_socket=ws)
        await receive_frames(request, ws)
    finally:
        expiry.cancel()
        hub.discard(ws)
        try:
            await close_socket(request, ws)
        finally:  # aiohttp may cancel the handler mid-close (at shutdown)
            ws.outbox.cancel()
            ws.finished.set_result(None)
            # The code this side closed with, else the one the peer or aiohttp did.
            close_code = ws.stop_code or ws.close_code or WSCloseCode.ABNORMAL_CLOSURE
            request.app[METRICS].closes[int(close_code)] += 1
            log_event(logging.INFO, "ws_close", room_id=room_id, user_id=ws.identity.user_id,
                      code=close_code, reason=ws.stop_reason or None)
    return ws


# =============================================================== app ===


# Each lifetime is one *_context, named for what it owns; they close in reverse
# order, so background tasks stop first, then the writer drains, then storage
# closes. Sockets close earlier still, in on_shutdown.


async def storage_context(app: web.Application):
    settings = app[SETTINGS]
    storage = app[STORAGE] = await Storage.open(settings, metrics=app[METRICS])
    try:
        app[TOKEN_RULES] = token_rules(settings, settings.secret or await storage.secret())
    except BaseException:
        await storage.close()
        raise
    yield
    await storage.close()  # an unclosed aiosqlite thread blocks exit


async def writer_context(app: web.Application):
    app[STORAGE].writer.start()
    yield
    await app[STORAGE].writer.stop()  # after every handler: nothing queued is dropped


async def push_context(app: web.Application):
    settings = app[SETTINGS]
    sender = app[PUSH] = PushSender(
        app[STORAGE], app[HUB], app[METRICS], vapid_private_key=settings.vapid_private_key,
        contact=settings.push_contact, allowed_hosts=settings.push_allow_hosts,
        show_preview=settings.push_preview, retry_first_s=settings.push_retry_first_s)
    sender.start()
    app[HUB].push = sender
    yield
    app[HUB].push = None
    await sender.stop()


async def _stop_task(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def admin_watch_context(app: web.Application):
    watcher = asyncio.create_task(watch_admin_changes(app[STORAGE], app[HUB]), name="admin watch")
    yield
    await _stop_task(watcher)


async def photos_context(app: web.Application):
    desk = app[PHOTOS] = PhotoDesk()
    settings = app[SETTINGS]
    cleaner = asyncio.create_task(remove_unsent_photos(
        app[STORAGE], settings.photo_unsent_keep_s, settings.photo_cleanup_interval_s),
        name="photo cleanup")
    yield
    await _stop_task(cleaner)
    await asyncio.to_thread(desk.close)  # a decode under way finishes first


async def liveness_context(app: web.Application):
    sweeper = asyncio.create_task(keep_sockets_alive(app[HUB], app[SETTINGS].ping_interval_s),
                                  name="liveness sweep")
    yield
    await _stop_task(sweeper)


async def close_all_sockets(app: web.Application) -> None:
    """On shutdown: every socket closes with 1001, each by its own handler."""
    hub = app[HUB]
    hub.is_closing = True
    hub.cancel_pending_leaves()
    sockets = hub.all_sockets()  # a copy: handlers discard while we await
    for ws in sockets:
        ws.request_stop(WSCloseCode.GOING_AWAY, "server shutting down")
    if sockets:
        await asyncio.wait([ws.finished for ws in sockets], timeout=SHUTDOWN_SOCKETS_TIMEOUT_S)


def create_app(settings: Settings) -> web.Application:
    middlewares = [forwarded_middleware] if settings.trust_proxy else []
    app = web.Application(middlewares=[*middlewares, errors_middleware],
                          client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[HUB] = ChatHub(settings.rate_limit, app[METRICS])
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True)
    app.router.add_get("/", home_handler)
    app.router.add_get(BASE_PATH, home_handler)
    app.router.add_get(BASE_PATH + "/", home_handler)
    app.router.add_get(f"{BASE_PATH}/chat", chat_page_handler)
    app.router.add_get(ROOMS_PATH, rooms_handler)
    app.router.add_get(ROOMS_PATH + "/{room_id}/messages", messages_handler)
    app.router.add_post(ROOMS_PATH + "/{room_id}/photos", photo_upload_handler,
                        name=PHOTO_UPLOAD_ROUTE)
    app.router.add_get(f"{BASE_PATH}/chat/photos/{{photo_id}}", photo_handler)
    app.router.add_get(f"{BASE_PATH}/chat/photos/{{photo_id}}/thumb", photo_handler)
    app.router.add_get(f"{BASE_PATH}/ws/chat/{{room_id}}", chat_socket_handler)
    app.router.add_get(f"{BASE_PATH}/login", login_handler)
    app.router.add_post(f"{BASE_PATH}/login", confirm_login_handler)
    app.router.add_post(f"{BASE_PATH}/logout", logout_handler)
    app.router.add_get(f"{BASE_PATH}/healthz", healthz_handler)
    app.router.add_get(f"{BASE_PATH}/metrics", metrics_handler)
    app.router.add_get(f"{BASE_PATH}/push/key", push_key_handler)
    app.router.add_get(f"{BASE_PATH}/manifest.webmanifest", manifest_handler)
    app.router.add_get(f"{BASE_PATH}/sw.js", service_worker_handler)
    app.router.add_post(f"{BASE_PATH}/push/subscriptions", subscribe_handler)
    app.router.add_delete(f"{BASE_PATH}/push/subscriptions", unsubscribe_handler)
    app.router.add_get(f"{BASE_PATH}/static/{{path:.+}}", static_handler)
    app.cleanup_ctx.extend([storage_context, writer_context, push_context, photos_context,
                            admin_watch_context, liveness_context])
    app.on_shutdown.append(close_all_sockets)
    app.on_response_prepare.append(add_security_headers)
    return app


# ======================================================= connections ===
#
# What aiohttp's server leaves to the application: how long and how large a
# request's headers may be, how many connections one address may hold, and
# what happens when file descriptors run out. Used by ``run_server``.

ADMITTED = object()


class ConnectionGuard:
    """Every admitted connection, oldest first, and how many each address holds."""

    def __init__(self, capacity: int, per_address_max: int) -> None:
        self.capacity = capacity
        self.per_address_max = per_address_max
        self.connections: dict[GuardedRequestHandler, object] = {}
        self.counts_by_address: collections.Counter[str] = collections.Counter()

    def admit(self, handler: GuardedRequestHandler) -> bool:
        address = handler.address
        if self.counts_by_address[address] >= self.per_address_max:
            log_event(logging.DEBUG, "connection_refused", address=address,
                      reason=f"over {self.per_address_max} connections from it")
            return False
        if len(self.connections) >= self.capacity and not self._shed_oldest_idle():
            log_event(logging.DEBUG, "connection_refused", address=address, reason="at capacity")
            return False
        self.connections[handler] = ADMITTED
        self.counts_by_address[address] += 1
        return True

    def release(self, handler: GuardedRequestHandler) -> None:
        if self.connections.pop(handler, None) is ADMITTED:
            self.counts_by_address[handler.address] -= 1
            if not self.counts_by_address[handler.address]:
                del self.counts_by_address[handler.address]

    def _shed_oldest_idle(self) -> bool:
        """At capacity, the oldest connection with no request under way (idle,
        or still sending its headers) makes room, so a real client gets in."""
        for handler in self.connections:
            if handler.is_between_requests():
                log_event(logging.DEBUG, "connection_closed", address=handler.address,
                          reason="room for a newer one")
                self.release(handler)
                handler.force_close()
                return True
        return False


def header_block_size(message: Any) -> int:
    """The bytes of a parsed request's line and headers (0 for a parse error)."""
    raw_headers = getattr(message, "raw_headers", ())
    return len(getattr(message, "path", "")) + sum(len(name) + len(value) + 4
                                                    for name, value in raw_headers)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP connection, with SPEC 2's limits on a request's headers:
    whole within HEADERS_TIMEOUT_S, at most MAX_HEADER_BYTES. It reads a few of
    aiohttp's own attributes (pinned in requirements.txt; tests cover each)."""

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **options: Any) -> None:
        super().__init__(manager, **options)
        self.guard = guard
        self.address = ""
        self.header_bytes = 0
        self.headers_deadline: asyncio.TimerHandle | None = None
        self.body: Any = None  # the latest request's payload while it streams in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else ""
        if not self.guard.admit(self):
            transport.close()
            return
        super().connection_made(transport)
        self._start_headers_clock()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.release(self)
        self._stop_headers_clock()
        super().connection_lost(exc)

    def is_between_requests(self) -> bool:
        return not (self._upgraded or self._payload_parser is not None
                    or self._request_in_progress or self._messages)

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self._payload_parser is not None:  # a WebSocket
            return super().data_received(data)
        is_headers = self.body is None or self.body.is_eof()
        if is_headers:
            if self.headers_deadline is None:  # the first bytes of the next request
                self._start_headers_clock()
            self.header_bytes += len(data)
        parsed_before = self._request_count
        super().data_received(data)
        parsed_count = self._request_count - parsed_before
        if parsed_count:
            self._stop_headers_clock()
            parsed = list(self._messages)[-parsed_count:]  # (message, payload) pairs
            self.body = parsed[-1][1] if parsed else None
            if any(header_block_size(message) > MAX_HEADER_BYTES for message, _ in parsed):
                self._refuse_large_headers()
        elif is_headers and self.header_bytes > MAX_HEADER_BYTES:
            self._refuse_large_headers()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.Response:
        """aiohttp's answer to a request it could not parse: one debug line, no
        traceback, no software version; and never a 500."""
        if status >= 500:
            log_event(logging.ERROR, "unexpected_error", address=self.address, error=repr(exc))
            status = 503
        else:
            # Only the kind: the parser's message quotes the line, a token or cookie included.
            log_event(logging.DEBUG, "malformed_request", address=self.address, status=status,
                      reason=type(exc).__name__ if exc is not None else "unparsable")
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had already begun")
        response = web.Response(status=status, text=f"{status} {HTTPStatus(status).phrase}\n",
                                headers={"Server": SERVER_NAME, "Cache-Control": "no-store"})
        response.force_close()
        return response

    def _start_headers_clock(self) -> None:
        self.header_bytes = 0
        self.headers_deadline = self._loop.call_later(HEADERS_TIMEOUT_S, self._headers_too_slow)

    def _stop_headers_clock(self) -> None:
        self.header_bytes = 0
        if self.headers_deadline is not None:
            self.headers_deadline.cancel()
            self.headers_deadline = None

    def _headers_too_slow(self) -> None:
        self.headers_deadline = None
        log_event(logging.DEBUG, "connection_closed", address=self.address,
                  reason=f"headers not complete in {HEADERS_TIMEOUT_S:g} s")
        self.force_close()

    def _refuse_large_headers(self) -> None:
        log_event(logging.DEBUG, "connection_closed", address=self.address,
                  reason=f"headers over {MAX_HEADER_BYTES} bytes")
        self._stop_headers_clock()
        body = compact_json({"error": {"code": "headers_too_large",
                                       "message": "request headers are over 16 KiB"}}).encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nServer: " + SERVER_NAME.encode()
            + b"\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
            + b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.force_close()  # the transport sends what it holds, then closes


class AcceptErrorReporter:
    """The event loop's exception handler. Out of file descriptors, asyncio
    reports every failed accept with a traceback; this says it once a minute."""

    def __init__(self) -> None:
        self.reported_at: float | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        now = loop.time()
        if self.reported_at is None or now - self.reported_at >= ACCEPT_ERROR_LOG_INTERVAL_S:
            self.reported_at = now
            log_event(logging.WARNING, "accept_failed", error=context.get("exception"))


def raise_open_file_limit() -> int:
    """Lift the soft limit on open files to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


# =============================================================== CLI ===


class CommandError(Exception):
    """A management command could not be done; nothing was changed (exit 1)."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad arguments exit 2 with a one-line reason, not a usage screen."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number ≥ 1: {text!r}")
    return int(text)


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not math.isfinite(rate) or rate < 0:
        raise argparse.ArgumentTypeError(f"not a rate ≥ 0: {text!r}")
    return rate


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"choose one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return text.lower()


def _zone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown time zone: {text!r}") from None
    return text


def _origin(text: str) -> str:
    origin = text.strip().lower().rstrip("/")
    try:
        parts = urlsplit(origin)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an origin: {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
        raise argparse.ArgumentTypeError(f"an origin looks like https://gym.example: {text!r}")
    return origin


def _ttl_seconds(text: str) -> int:
    match = re.fullmatch(r"([1-9][0-9]{0,6})([smhd])", text)
    if not match:
        raise argparse.ArgumentTypeError(f"a ttl is a number with s, m, h or d, like 12h: {text!r}")
    return int(match.group(1)) * TTL_UNITS_S[match.group(2)]


def _user_id(text: str) -> str:
    if not USER_ID_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"a user id is 1 to 64 of A-Z a-z 0-9 _ . @ -: {text!r}")
    return text


def _log_format(text: str) -> str:
    if text.lower() not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"choose text or json, not {text!r}")
    return text.lower()


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _public_url(text: str) -> str:
    url = text.strip().rstrip("/")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a URL: {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"a public URL looks like https://chat.gym.example: {text!r}")
    return url


def _vapid_key(text: str) -> str:
    try:
        scalar = b64url_decode(text.strip())
    except ValueError:
        scalar = b""
    if len(scalar) != 32 or not any(scalar):
        raise argparse.ArgumentTypeError("a VAPID private key is 32 bytes, base64url")
    return text.strip()


def _push_contact(text: str) -> str:
    if not text.startswith(("mailto:", "https://")) or len(text) < 10:
        raise argparse.ArgumentTypeError(f"a contact looks like mailto:owner@gym.example: {text!r}")
    return text


def _on_off(text: str) -> str:
    if text.lower() not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"on or off, not {text!r}")
    return text.lower()


def _host_port(text: str) -> str:
    host = text.strip().lower()
    if not HOST_PATTERN.fullmatch(host):
        raise argparse.ArgumentTypeError(f"a host or host:port, like 127.0.0.1:9000: {text!r}")
    return host


def _name(text: str) -> str:
    name = text.strip()
    if not name or len(name) > USER_NAME_MAX_CHARS or not is_encodable(name):
        raise argparse.ArgumentTypeError(f"a name is 1 to {USER_NAME_MAX_CHARS} characters")
    return name


# (flag, dest, type, help); each also reads DISTRIBUTOR_<FLAG> from the environment.
SERVER_OPTIONS = (
    ("--host", "host", str, "address to listen on (default 127.0.0.1)"),
    ("--port", "port", _port, "port to listen on (default 8080; 0 picks a free one)"),
    ("--db", "db", str, "SQLite file (default ./distributor_chat.db)"),
    ("--secret", "secret", str, "JWT HS256 key (default: one kept in the database)"),
    ("--tz", "tz", _zone, "time zone for displayed times (default: the machine's)"),
    ("--max-message-chars", "max_message_chars", _positive_int, "default 2000"),
    ("--max-photo-mb", "max_photo_mb", _positive_int, "largest photo upload in MiB (default 10)"),
    ("--rate-limit", "rate_limit", _rate, "chat/spread frames a second per user (0: off)"),
    ("--max-connections-per-ip", "max_connections_per_ip", _positive_int,
     f"open connections from one client address (default {MAX_CONNECTIONS_PER_IP})"),
    ("--log-level", "log_level", _log_level, "debug, info, warning or error"),
    ("--log-format", "log_format", _log_format, "text (default) or json: one line per event"),
    ("--jwt-issuer", "jwt_issuer", _nonempty, "require this iss in every token"),
    ("--jwt-audience", "jwt_audience", _nonempty, "require this aud in every token"),
    ("--metrics-token", "metrics_token", _nonempty, "serve /distributor/metrics to this Bearer token"),
    ("--public-url", "public_url", _public_url, "the address users reach, for printed links"),
    ("--vapid-private-key", "vapid_private_key", _vapid_key,
     "Web Push VAPID key, base64url P-256 scalar (default: one kept in the database)"),
    ("--push-contact", "push_contact", _push_contact, "mailto: or https: contact for push services"),
    ("--push-preview", "push_preview", _on_off, "on (default) or off: message text in pushes"),
)
OPTION_DEFAULTS = {"host": "127.0.0.1", "port": "8080", "db": "distributor_chat.db",
                   "secret": None, "tz": None, "max_message_chars": "2000", "max_photo_mb": "10",
                   "rate_limit": "5", "max_connections_per_ip": str(MAX_CONNECTIONS_PER_IP),
                   "log_level": "info", "log_format": "text", "jwt_issuer": None,
                   "jwt_audience": None, "metrics_token": None, "public_url": None,
                   "vapid_private_key": None, "push_contact": None, "push_preview": "on"}
# On/off options; the environment form is true for 1, true or yes.
FLAG_OPTIONS = (
    ("--no-demo", "no_demo", "do not seed the demo gym into an empty database"),
    ("--trust-proxy", "trust_proxy", "take the client's address and scheme from X-Forwarded-*"),
    ("--qr", "qr", "also show each printed sign-in link as a QR code"),
)


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_server_options(parser: argparse.ArgumentParser, *, from_env: bool) -> None:
    """The shared options; on subcommands they default to 'not given' so that
    an option placed before the subcommand is not overwritten."""
    for flag, dest, kind, help_text in SERVER_OPTIONS:
        default = os.environ.get(_env_name(flag), OPTION_DEFAULTS[dest]) if from_env \
            else argparse.SUPPRESS
        parser.add_argument(flag, dest=dest, type=kind, default=default, help=help_text)
    parser.add_argument("--allowed-origin", dest="allowed_origin", type=_origin, action="append",
                        default=None if from_env else argparse.SUPPRESS,
                        help="another origin allowed to open sockets (repeatable)")
    parser.add_argument("--push-allow-host", dest="push_allow_host", type=_host_port, action="append",
                        default=None if from_env else argparse.SUPPRESS,
                        help="a push service host[:port] admitted off the public internet (repeatable)")
    for flag, dest, help_text in FLAG_OPTIONS:
        parser.add_argument(flag, dest=dest, action="store_true",
                            default=False if from_env else argparse.SUPPRESS, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="distributor_chat.py",
                                   description="Distributor Chat server and management commands.")
    add_server_options(parser, from_env=True)
    parser.add_argument("--version", action="version", version=f"distributor-chat {VERSION}")
    commands = parser.add_subparsers(dest="command", parser_class=OneLineArgumentParser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_server_options(sub, from_env=False)
        return sub

    command("serve", "run the chat server (the default)")
    add_user = command("add-user", "add a user and print their id")
    add_user.add_argument("--role", required=True, choices=("trainer", "member"))
    add_user.add_argument("--name", required=True, type=_name)
    add_user.add_argument("--id", dest="user_id", type=_user_id)
    add_session = command("add-session", "link a trainer and a member; print the room id")
    add_session.add_argument("--trainer", required=True)
    add_session.add_argument("--member", required=True)
    end_session = command("end-session", "make a room read-only")
    end_session.add_argument("room_id")
    token = command("token", "print a JWT and a sign-in link for a user")
    token.add_argument("user_id")
    token.add_argument("--ttl", type=_ttl_seconds, default=_ttl_seconds(DEFAULT_TOKEN_TTL))
    import_file = command("import", "load users and sessions from a JSON or CSV file")
    import_file.add_argument("file")
    backup = command("backup", "copy the live data to a new file, while the server runs")
    backup.add_argument("destination")
    command("check", "check the data's integrity; print its schema version and counts")
    return parser


def _repeated(args: argparse.Namespace, parser: argparse.ArgumentParser, flag: str,
              dest: str, kind: Callable[[str], str]) -> tuple[str, ...]:
    """A repeatable option's values; its environment form is a comma-separated list."""
    values = getattr(args, dest, None)
    if values is None:
        try:
            values = [kind(item) for item in os.environ.get(_env_name(flag), "").split(",")
                      if item.strip()]
        except argparse.ArgumentTypeError as error:
            parser.error(f"{_env_name(flag)}: {error}")
    return tuple(values)


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    origins = _repeated(args, parser, "--allowed-origin", "allowed_origin", _origin)
    flags = {dest: getattr(args, dest) or os.environ.get(_env_name(flag), "").lower()
             in ("1", "true", "yes") for flag, dest, _ in FLAG_OPTIONS}
    return Settings(host=args.host, port=args.port, db_path=Path(args.db), secret=args.secret or None,
                    allowed_origins=tuple(origins), tz=ZoneInfo(args.tz) if args.tz else None,
                    tz_name=args.tz or machine_tz_name(),
                    max_message_chars=args.max_message_chars, max_photo_mb=args.max_photo_mb,
                    rate_limit=args.rate_limit,
                    max_connections_per_ip=args.max_connections_per_ip,
                    log_level=args.log_level, log_format=args.log_format,
                    jwt_issuer=args.jwt_issuer, jwt_audience=args.jwt_audience,
                    metrics_token=args.metrics_token, public_url=args.public_url,
                    trust_proxy=flags["trust_proxy"], show_qr=flags["qr"],
                    vapid_private_key=args.vapid_private_key, push_contact=args.push_contact,
                    push_allow_hosts=_repeated(args, parser, "--push-allow-host", "push_allow_host",
                                               _host_port),
                    push_preview=args.push_preview == "on", demo=not flags["no_demo"])


CLI_BUSY_TIMEOUT_MS = 5000  # a running server may hold the write lock a moment


async def cli_secret(storage: Storage, settings: Settings) -> str:
    return settings.secret or await storage.secret()


def lan_address() -> str:
    """This machine's address on its network, for a phone on the gym's Wi-Fi: the
    one its default route leaves from. Connecting a UDP socket sends nothing."""
    with contextlib.suppress(OSError):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1 (RFC 5737): routed, never reached
            address = probe.getsockname()[0]
            if not address.startswith(("127.", "0.")):
                return address
    with contextlib.suppress(OSError):
        for *_, (address, *_) in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            if not address.startswith(("127.", "0.")):
                return address
    return socket.gethostname()


def public_base_url(settings: Settings) -> str:
    """Where users reach the server: --public-url, else this address and port
    (the machine's LAN address when it listens on all of them)."""
    if settings.public_url:
        return settings.public_url
    host = lan_address() if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}"


def sign_in_link(settings: Settings, token: str, next_path: str = ROOMS_PATH) -> str:
    return (f"{public_base_url(settings)}{BASE_PATH}/login?token={token}"
            f"&next={quote(next_path, safe='/')}")


def print_link(settings: Settings, label: str, link: str) -> None:
    """A printed link, and with --qr the same as a QR code a phone's camera reads."""
    print(f"{label}{link}", flush=True)
    if settings.show_qr:
        import segno  # only gyms that ask for QR codes load it
        segno.make(link, error="l").terminal(out=sys.stdout, compact=True)
        sys.stdout.flush()


async def find_user(tx: Transaction, user_id: str) -> Any:
    user = await tx.fetch_one(SELECT_USER, {"user_id": user_id})
    if user is None:
        raise CommandError(f"no user with id {user_id!r}")
    return user


async def cmd_add_user(storage: Storage, settings: Settings, args: argparse.Namespace) -> None:
    user_id = args.user_id or f"{args.role}_{secrets.token_hex(4)}"
    async with storage.admin_change() as tx:
        if await tx.fetch_one(SELECT_USER, {"user_id": user_id}):
            raise CommandError(f"a user with id {user_id!r} already exists")
        await tx.execute(INSERT_USER, {"user_id": user_id, "name": args.name, "role": args.role,
                                       "created_at": utc_now_iso()})
    print(user_id)


async def cmd_add_session(storage: Storage, settings: Settings, args: argparse.Namespace) -> None:
    async with storage.admin_change() as tx:
        if (await find_user(tx, args.trainer))["role"] != "trainer":
            raise CommandError(f"user {args.trainer!r} is not a trainer")
        if (await find_user(tx, args.member))["role"] != "member":
            raise CommandError(f"user {args.member!r} is not a member")
        row = await tx.fetch_one(INSERT_SESSION, {"trainer_id": args.trainer,
                                                  "member_id": args.member,
                                                  "created_at": utc_now_iso()})
    print(room_id_of(row[0]))


async def cmd_end_session(storage: Storage, settings: Settings, args: argparse.Namespace) -> None:
    session_id = session_id_of(args.room_id)
    async with storage.admin_change() as tx:
        if session_id is None or not await tx.execute(END_SESSION, {"session_id": session_id}):
            raise CommandError(f"no such room: {args.room_id!r}")
    print(f"{args.room_id} ended")


async def cmd_token(storage: Storage, settings: Settings, args: argparse.Namespace) -> None:
    user = await storage.user(args.user_id)  # a read: no write lock for it
    if user is None:
        raise CommandError(f"no user with id {args.user_id!r}")
    secret = await cli_secret(storage, settings)
    token = issue_token(token_rules(settings, secret), user["id"], user["role"], user["name"],
                        args.ttl)
    print(token)
    print_link(settings, "", sign_in_link(settings, token))


def _import_users(data: dict) -> list[dict]:
    users = data.get("users", [])
    if not isinstance(users, list):
        raise CommandError("'users' must be a list")
    seen: set[str] = set()
    for index, user in enumerate(users):
        where = f"users[{index}]"
        if not isinstance(user, dict):
            raise CommandError(f"{where} must be an object")
        if not isinstance(user.get("id"), str) or not USER_ID_PATTERN.fullmatch(user["id"]):
            raise CommandError(f"{where}.id must be 1 to 64 of A-Z a-z 0-9 _ . @ -")
        if user["id"] in seen:
            raise CommandError(f"{where}.id {user['id']!r} appears twice")
        seen.add(user["id"])
        name = user.get("name")
        if not isinstance(name, str) or not name.strip() or len(name.strip()) > USER_NAME_MAX_CHARS \
                or not is_encodable(name):
            raise CommandError(f"{where}.name must be 1 to {USER_NAME_MAX_CHARS} characters")
        if user.get("role") not in ("trainer", "member"):
            raise CommandError(f"{where}.role must be trainer or member")
    return [{"user_id": user["id"], "name": user["name"].strip(), "role": user["role"]}
            for user in users]


def _import_sessions(data: dict) -> list[dict]:
    sessions = data.get("sessions", [])
    if not isinstance(sessions, list):
        raise CommandError("'sessions' must be a list")
    seen: set[int] = set()
    for index, session in enumerate(sessions):
        where = f"sessions[{index}]"
        if not isinstance(session, dict):
            raise CommandError(f"{where} must be an object")
        session_id = session.get("id")
        if not isinstance(session_id, int) or isinstance(session_id, bool) \
                or not 1 <= session_id < 10**18:
            raise CommandError(f"{where}.id must be a positive whole number")
        if session_id in seen:
            raise CommandError(f"{where}.id {session_id} appears twice")
        seen.add(session_id)
        for key in ("trainer", "member"):
            if not isinstance(session.get(key), str):
                raise CommandError(f"{where}.{key} must be a user id")
    return [{"session_id": session["id"], "trainer_id": session["trainer"],
             "member_id": session["member"]} for session in sessions]


CSV_USERS_HEADER = ["id", "name", "role"]
CSV_SESSIONS_HEADER = ["session_id", "trainer_id", "member_id"]


def _csv_users(rows: list[tuple[int, list[str]]], problems: list[str]) -> list[dict]:
    users, first_line_by_id = [], {}
    for line, cells in rows:
        user_id, name, role = (*(cell.strip() for cell in cells[:3]), "", "", "")[:3]
        if user_id in first_line_by_id:
            problems.append(f"line {line}: id {user_id!r} is also on line {first_line_by_id[user_id]}")
            continue
        first_line_by_id.setdefault(user_id, line)
        if len(cells) != 3 or not (user_id and name and role):
            problems.append(f"line {line}: a user needs id, name and role")
        elif not USER_ID_PATTERN.fullmatch(user_id):
            problems.append(f"line {line}: id {user_id!r} must be 1 to 64 of A-Z a-z 0-9 _ . @ -")
        elif len(name) > USER_NAME_MAX_CHARS or not is_encodable(name):
            problems.append(f"line {line}: a name is 1 to {USER_NAME_MAX_CHARS} characters")
        elif role not in ("trainer", "member"):
            problems.append(f"line {line}: unknown role {role!r} (trainer or member)")
        else:
            users.append({"user_id": user_id, "name": name, "role": role})
    return users


def _csv_sessions(rows: list[tuple[int, list[str]]], problems: list[str]) -> list[dict]:
    sessions, first_line_by_id = [], {}
    for line, cells in rows:
        session_text, trainer_id, member_id = (*(cell.strip() for cell in cells[:3]), "", "", "")[:3]
        if session_text in first_line_by_id:
            problems.append(f"line {line}: session_id {session_text} is also on line "
                            f"{first_line_by_id[session_text]}")
            continue
        first_line_by_id.setdefault(session_text, line)
        if len(cells) != 3 or not (session_text and trainer_id and member_id):
            problems.append(f"line {line}: a session needs session_id, trainer_id and member_id")
        elif not (session_text.isascii() and session_text.isdigit()
                  and 1 <= int(session_text) < 10**18):
            problems.append(f"line {line}: session_id {session_text!r} must be a positive whole number")
        else:
            sessions.append({"session_id": int(session_text), "trainer_id": trainer_id,
                             "member_id": member_id, "where": f"line {line}"})
    return sessions


def read_csv_import(text: str, problems: list[str]) -> tuple[list[dict], list[dict]]:
    """Users (header id,name,role) or sessions (session_id,trainer_id,member_id)
    from CSV; each bad row goes into ``problems`` as "line N: reason"."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [cell.strip().lower() for cell in next(reader, [])]
    rows = [(reader.line_num, cells) for cells in reader if any(cell.strip() for cell in cells)]
    if header == CSV_USERS_HEADER:
        return _csv_users(rows, problems), []
    if header == CSV_SESSIONS_HEADER:
        return [], _csv_sessions(rows, problems)
    problems.append("line 1: the header must be id,name,role or session_id,trainer_id,member_id")
    return [], []


def read_import_file(path: str, problems: list[str]) -> tuple[list[dict], list[dict]]:
    """Users and sessions from a JSON or a CSV file (UTF-8, with or without a
    BOM). A JSON problem raises CommandError; a bad CSV row goes to ``problems``."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"cannot read {path}: {error}") from None
    if not text.lstrip().startswith(("{", "[")):
        return read_csv_import(text, problems)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise CommandError(f"{path} is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(data, dict):
        raise CommandError(f"{path} must hold a JSON object with users and sessions")
    return _import_users(data), _import_sessions(data)


def _bad_rows(path: str, problems: list[str]) -> str:
    def line_number(problem: str) -> int:
        match = re.match(r"line (\d+):", problem)
        return int(match.group(1)) if match else 0
    problems = sorted(problems, key=line_number)
    row_count = len({problem.split(":", 1)[0] for problem in problems})
    return f"{path}: {row_count} bad row{'s' * (row_count != 1)}, nothing imported\n" \
        + "\n".join(problems)


async def cmd_import(storage: Storage, settings: Settings, args: argparse.Namespace) -> None:
    problems: list[str] = []
    users, sessions = read_import_file(args.file, problems)
    counts = collections.Counter()
    now = utc_now_iso()
    async with storage.admin_change() as tx:
        for user in users:
            exists = await tx.fetch_one(SELECT_USER, user) is not None
            await tx.execute(UPDATE_USER if exists else INSERT_USER, {**user, "created_at": now})
            counts["users updated" if exists else "users added"] += 1
        for session in sessions:
            where = session.pop("where", f"session {session['session_id']}")
            problems_before = len(problems)
            for key, role in (("trainer_id", "trainer"), ("member_id", "member")):
                user = await tx.fetch_one(SELECT_USER, {"user_id": session[key]})
                if user is None:
                    problems.append(f"{where}: unknown user {session[key]!r}")
                elif user["role"] != role:
                    problems.append(f"{where}: {session[key]!r} is not a {role}")
            if len(problems) > problems_before:
                continue  # listed; the transaction will roll back anyway
            exists = await tx.fetch_one(SELECT_ROOM, session) is not None
            await tx.execute(UPDATE_SESSION_PARTICIPANTS if exists else INSERT_SESSION_WITH_ID,
                             {**session, "created_at": now})
            counts["sessions updated" if exists else "sessions added"] += 1
        if problems:  # the transaction rolls back: nothing imported
            raise CommandError(problems[0] if len(problems) == 1 and not problems[0].startswith("line")
                               else _bad_rows(args.file, problems))
        if (await tx.fetch_one(COUNT_SESSIONS_WITH_WRONG_ROLES))[0]:
            raise CommandError("a role change would leave a session without its trainer or member")
    print(f"users: {counts['users added']} added, {counts['users updated']} updated; "
          f"sessions: {counts['sessions added']} added, {counts['sessions updated']} updated")


# Demo gym: one trainer, three members, three PT sessions, a few messages.
DEMO_USERS = (
    ("coach_kim", "김민준 코치", "trainer"),
    ("member_lee", "이서연", "member"),
    ("member_park", "박지호", "member"),
    ("member_choi", "최하은", "member"),
)
DEMO_MESSAGES = (
    # (session index, sender, text)
    (0, "coach_kim", "서연님, 내일 아침 7시 하체 운동 맞죠?"),
    (0, "member_lee", "네! 스쿼트 자세 한 번 더 봐주세요 🙏"),
    (0, "coach_kim", "좋아요. 물 많이 드시고 푹 주무세요."),
    (1, "member_park", "코치님 오늘 수업 10분 늦을 것 같아요"),
    (1, "coach_kim", "괜찮아요, 천천히 오세요."),
    (2, "coach_kim", "하은님 식단 기록 잘 보고 있어요 👍"),
)
DEMO_SPREAD = "이번 주 토요일은 센터 휴무입니다. 좋은 주말 보내세요!"


async def seed_demo(storage: Storage) -> list:
    """Fill an empty database with the demo gym; the users to print links for."""
    async with storage.admin_change() as tx:
        if (await tx.fetch_one(COUNT_USERS))[0]:
            return []
        now = utc_now_iso()
        for user_id, name, role in DEMO_USERS:
            await tx.execute(INSERT_USER, {"user_id": user_id, "name": name, "role": role,
                                           "created_at": now})
        trainer_id = DEMO_USERS[0][0]
        session_ids = [(await tx.fetch_one(INSERT_SESSION, {"trainer_id": trainer_id,
                                                             "member_id": member_id,
                                                             "created_at": now}))[0]
                       for member_id, _, _ in DEMO_USERS[1:]]
        await tx.insert_chats([{"session_id": session_ids[session_index], "user_id": user_id,
                                "content": content, "client_id": f"demo-{number}",
                                "created_at": now}
                               for number, (session_index, user_id, content)
                               in enumerate(DEMO_MESSAGES, 1)])
        await tx.fetch_all(INSERT_SPREAD_MESSAGES, {"user_id": trainer_id, "content": DEMO_SPREAD,
                                                    "client_id": "demo-spread", "created_at": now})
        return [await find_user(tx, user_id) for user_id, _, _ in DEMO_USERS]


HTTP_OPTIONS = {"access_log_class": PathOnlyAccessLogger, "keepalive_timeout": KEEPALIVE_TIMEOUT_S}


async def run_server(settings: Settings, demo_users: list, secret: str) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorReporter())
    open_file_limit = raise_open_file_limit()
    # Behind a proxy every connection comes from the proxy's address: limiting
    # each client's connections is then the proxy's work (deploy/nginx.conf).
    per_address_max = sys.maxsize if settings.trust_proxy else settings.max_connections_per_ip
    guard = ConnectionGuard(max(16, open_file_limit - RESERVED_FILE_DESCRIPTORS), per_address_max)
    runner = web.AppRunner(create_app(settings), handle_signals=False, shutdown_timeout=1.0,
                           **HTTP_OPTIONS)
    await runner.setup()
    try:
        listener = await loop.create_server(
            lambda: GuardedRequestHandler(runner.server, guard, loop=loop, **HTTP_OPTIONS),
            settings.host, settings.port, backlog=LISTEN_BACKLOG, reuse_address=True)
    except OSError as error:
        await runner.cleanup()
        raise CommandError(f"cannot listen on {settings.host}:{settings.port}: "
                           f"{error.strerror or error}") from None
    port = listener.sockets[0].getsockname()[1]
    settings = dataclasses.replace(settings, port=port)
    print(f"Distributor Chat on {public_base_url(settings)}{ROOMS_PATH}", flush=True)
    per_address = "per address: left to the proxy" if settings.trust_proxy \
        else f"at most {settings.max_connections_per_ip:,} from one address"
    print(f"Holds up to {guard.capacity:,} connections (open-file limit {open_file_limit:,}; "
          f"{per_address})", flush=True)
    log_event(logging.INFO, "server_start", version=VERSION, host=settings.host, port=port,
              connections=guard.capacity)
    for user in demo_users:
        token = issue_token(token_rules(settings, secret), user["id"], user["role"], user["name"],
                            _ttl_seconds(DEFAULT_TOKEN_TTL))
        print_link(settings, f"  {user['name']} ({user['role']}): ", sign_in_link(settings, token))
    # What startup loaded lives as long as the process: no collection need scan
    # it. Fewer young collections mean far fewer full ones under load (README,
    # Performance, has the measurements).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    stop = asyncio.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    await stop.wait()
    log_event(logging.INFO, "server_stop")
    listener.close()  # stop accepting
    # Sockets first: the runner's cleanup starts by making aiohttp drop what
    # every connection receives, clients' answers to our 1001 included. (Its
    # on_shutdown runs close_all_sockets again, for servers started otherwise,
    # such as tests': by then there is nothing left to close.)
    await close_all_sockets(runner.app)
    await runner.cleanup()


COMMANDS = {"add-user": cmd_add_user, "add-session": cmd_add_session,
            "end-session": cmd_end_session, "token": cmd_token, "import": cmd_import}


async def cmd_backup(settings: Settings, args: argparse.Namespace) -> None:
    destination = Path(args.destination)
    report = await backup_database(settings, destination)
    print(f"backup {destination}: {report.message_count} messages, {report.photo_count} photos")


async def cmd_check(settings: Settings, args: argparse.Namespace) -> None:
    report = await check_database(settings)
    print("ok")
    print(f"schema version: {report.schema_version}")
    print(f"users: {report.user_count}")
    print(f"sessions: {report.session_count}")
    print(f"messages: {report.message_count}")
    print(f"photos: {report.photo_count}")


# These read the database as it is: no schema upgrade, nothing written to it.
READING_COMMANDS = {"backup": cmd_backup, "check": cmd_check}


async def run_command(command: str, settings: Settings, args: argparse.Namespace) -> None:
    """A management command, or the server: the demo gym and the secret first,
    through a storage of its own that is closed before the server opens its own."""
    if command in READING_COMMANDS:
        await READING_COMMANDS[command](settings, args)
        return
    storage = await Storage.open(settings, busy_timeout_ms=CLI_BUSY_TIMEOUT_MS)
    try:
        if command != "serve":
            await COMMANDS[command](storage, settings, args)
            return
        demo_users = await seed_demo(storage) if settings.demo else []
        secret = await cli_secret(storage, settings)
    finally:
        await storage.close()
    if demo_users:
        print("Empty database: seeded the demo gym. Sign in with these links (valid 12 h):")
    await run_server(settings, demo_users, secret)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args, parser)
    log_handler = logging.StreamHandler()
    log_handler.setFormatter(JsonFormatter() if settings.log_format == "json" else
                             EscapingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[log_handler])
    # aiosqlite's debug lines carry SQL parameters: message text never goes to a log.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    try:
        asyncio.run(run_command(args.command or "serve", settings, args))
    except (CommandError, StorageUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
