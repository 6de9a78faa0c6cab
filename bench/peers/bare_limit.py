"""Benchmark peer: the bare limit of our own design, a yardstick, not a product.

The same architecture as distributor_chat.py with everything but its core taken
away: an aiohttp hub holding each room's live sockets in a WeakSet, and one
aiosqlite writer task that takes every write waiting in its queue, stores the
batch with one `executemany` INSERT and one COMMIT (WAL, `synchronous = FULL`),
and only then acks and broadcasts. A message frame is JSON-encoded once per room
and written straight to every socket's transport (no lock, no per-socket queue,
no back-pressure, no slow-consumer cut-off). Reads (history, room list, a
trainer's rooms) use a second connection.

Left out on purpose, so that it costs less than any real server could: token
checks (the claims are read, the signature is not), frame validation, the resent
`client_id` lookup and its unique index, read pointers (`unread_count` is always 0),
join/leave frames, participants in `welcome`, rate limits, socket caps, pings.

    python bench/peers/bare_limit.py --db PATH --port N [--host 127.0.0.1]
        serves (`serve` may be given first; --secret, --rate-limit, --no-demo,
        --log-level and --max-connections-per-ip are accepted and ignored)
    python bench/peers/bare_limit.py import FILE.json --db PATH
        loads {"users": [{"id","name","role"}], "sessions": [{"id","trainer","member"}]}

Endpoints: GET /distributor/healthz, GET /distributor/chat/rooms (JSON only),
WS /distributor/ws/chat/{room_id} (frames: welcome, history, chat, spread, ack).
Bulk history goes in with plain SQL: the tables are named as in schema.sql.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import itertools
import json
import sqlite3
import weakref
from collections import defaultdict
from datetime import datetime, timezone

import aiosqlite
from aiohttp import WSMsgType, web

SCHEMA = """
    PRAGMA journal_mode = WAL;
    CREATE TABLE IF NOT EXISTS users (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS pt_sessions (
        id INTEGER PRIMARY KEY, trainer_id TEXT NOT NULL, member_id TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'active', created_at TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS pt_sessions_by_trainer ON pt_sessions (trainer_id);
    CREATE INDEX IF NOT EXISTS pt_sessions_by_member ON pt_sessions (member_id);
    CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL, user_id TEXT NOT NULL,
        type TEXT NOT NULL, content TEXT NOT NULL, client_id TEXT NOT NULL,
        created_at TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS messages_by_room ON messages (session_id, id);
"""
INSERT_MESSAGES = """
    INSERT INTO messages (id, session_id, user_id, type, content, client_id, created_at)
    VALUES (?, ?, ?, ?, ?, ?, ?)
"""
SELECT_LAST_ID = "SELECT coalesce(max(id), 0) FROM messages"
SELECT_USER_NAME = "SELECT name FROM users WHERE id = ?"
SELECT_TRAINER_ROOMS = "SELECT id FROM pt_sessions WHERE trainer_id = ? AND status = 'active'"
_MESSAGE = """
    SELECT m.type, m.id, m.session_id, m.user_id, u.name, m.content, m.created_at, m.client_id
      FROM messages m JOIN users u ON u.id = m.user_id
"""
SELECT_HISTORY_AFTER = _MESSAGE + " WHERE m.session_id = ? AND m.id > ? ORDER BY m.id LIMIT 501"
SELECT_HISTORY_LATEST = _MESSAGE + " WHERE m.session_id = ? ORDER BY m.id DESC LIMIT 51"
SELECT_ROOMS = """
    SELECT 'pt_' || s.id, mu.name, tu.name,
           strftime('%Y-%m-%d %H:%M', coalesce(last.created_at, s.created_at), 'localtime'),
           last.content, s.status
      FROM pt_sessions s
      JOIN users tu ON tu.id = s.trainer_id
      JOIN users mu ON mu.id = s.member_id
      LEFT JOIN messages last
        ON last.id = (SELECT max(id) FROM messages WHERE session_id = s.id)
     WHERE s.trainer_id = :user_id OR s.member_id = :user_id
     ORDER BY coalesce(last.created_at, s.created_at) DESC, s.id DESC
"""
MESSAGE_FIELDS = ("type", "id", "room_id", "user_id", "sender_name", "content",
                  "created_at", "client_id")
STOP = object()


@dataclasses.dataclass
class Write:
    """One chat or spread: its rows, its frames (one per room), the sender's ack."""
    sender: web.WebSocketResponse
    rows: list[tuple]
    frames: list[tuple[str, int, bytes]]  # room_id, message id, encoded frame
    ack: bytes
    client_id: str


@dataclasses.dataclass
class Hub:
    writer: aiosqlite.Connection
    reader: aiosqlite.Connection
    queue: asyncio.Queue
    ids: itertools.count
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    rooms: defaultdict = dataclasses.field(default_factory=lambda: defaultdict(weakref.WeakSet))
    # Sockets between joining their room and their history frame: live frames wait here.
    joining: dict = dataclasses.field(default_factory=dict)


HUB = web.AppKey("hub", Hub)
DB_PATH = web.AppKey("db_path", str)


def push(ws: web.WebSocketResponse, data: bytes) -> None:
    """Writes a text frame to the socket's transport now, never waiting for it to drain
    (aiohttp's uncompressed frame write, which send_str would await)."""
    if not ws.closed:
        try:
            ws._writer._write_websocket_frame(data, WSMsgType.TEXT, 0)
        except ConnectionError:
            pass


def broadcast(hub: Hub, room_id: str, message_id: int, data: bytes) -> None:
    for ws in hub.rooms.get(room_id, ()):
        waiting = hub.joining.get(ws)
        if waiting is None:
            push(ws, data)
        else:
            waiting.append((message_id, data))


async def run_writer(hub: Hub) -> None:
    """Everything waiting in the queue, one INSERT batch and one COMMIT; then acks."""
    while (first := await hub.queue.get()) is not STOP:
        batch = [first]
        while not hub.queue.empty():
            batch.append(hub.queue.get_nowait())
        stop = any(write is STOP for write in batch)
        batch = [write for write in batch if write is not STOP]
        try:
            await hub.writer.executemany(INSERT_MESSAGES, [r for w in batch for r in w.rows])
            await hub.writer.commit()
        except sqlite3.Error as error:
            await hub.writer.rollback()
            for write in batch:
                push(write.sender, json.dumps({"type": "error", "code": "unavailable",
                                               "message": str(error),
                                               "client_id": write.client_id}).encode())
        else:
            for write in batch:
                for room_id, message_id, data in write.frames:
                    broadcast(hub, room_id, message_id, data)
                push(write.sender, write.ack)
        if stop:
            return


def claims(request: web.Request) -> dict:
    """The token's claims, read and not verified (no auth in the bare limit)."""
    payload = request.headers.get("Authorization", "").rpartition(" ")[2].split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def sender_name(hub: Hub, user_id: str) -> str:
    if user_id not in hub.names:
        rows = await hub.reader.execute_fetchall(SELECT_USER_NAME, (user_id,))
        hub.names[user_id] = rows[0][0] if rows else user_id
    return hub.names[user_id]


def message_write(hub: Hub, ws, user_id: str, name: str, kind: str, content: str,
                  client_id: str, session_ids: list[int], own_session_id: int) -> Write:
    """The rows (ids taken here, in queue order) and frames of one chat or spread."""
    created_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"
    rows, frames, own_id = [], [], 0
    for session_id in session_ids:
        message_id = next(hub.ids)
        own_id = message_id if session_id == own_session_id else own_id
        rows.append((message_id, session_id, user_id, kind, content, client_id, created_at))
        frame = dict(zip(MESSAGE_FIELDS, (kind, message_id, f"pt_{session_id}", user_id, name,
                                          content, created_at, client_id)))
        frames.append((f"pt_{session_id}", message_id, json.dumps(frame).encode()))
    ack = {"type": "ack", "client_id": client_id, "id": own_id, "created_at": created_at}
    if kind == "spread":
        ack["rooms"] = len(session_ids)
    return Write(ws, rows, frames, json.dumps(ack).encode(), client_id)


async def chat_socket(request: web.Request) -> web.WebSocketResponse:
    hub = request.app[HUB]
    room_id = request.match_info["room_id"]
    session_id = int(room_id.removeprefix("pt_"))
    me = claims(request)
    user_id = me["sub"]
    ws = web.WebSocketResponse(max_msg_size=64 * 1024)
    await ws.prepare(request)
    name = await sender_name(hub, user_id)
    hub.joining[ws] = []
    hub.rooms[room_id].add(ws)
    try:
        after = request.query.get("after")
        if after is not None:
            rows = await hub.reader.execute_fetchall(SELECT_HISTORY_AFTER,
                                                     (session_id, int(after)))
            has_more, rows = len(rows) > 500, rows[:500]
        else:
            rows = await hub.reader.execute_fetchall(SELECT_HISTORY_LATEST, (session_id,))
            has_more, rows = len(rows) > 50, list(reversed(rows[:50]))
        messages = [dict(zip(MESSAGE_FIELDS, (row[0], row[1], f"pt_{row[2]}", *row[3:])))
                    for row in rows]
        push(ws, json.dumps({"type": "welcome", "room_id": room_id, "user_id": user_id,
                             "role": me.get("role"), "participants": []}).encode())
        push(ws, json.dumps({"type": "history", "messages": messages,
                             "has_more": has_more}).encode())
        seen_id = messages[-1]["id"] if messages else 0
        for message_id, data in hub.joining.pop(ws):
            if message_id > seen_id:
                push(ws, data)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if frame["type"] == "chat":
                sessions = [session_id]
            elif frame["type"] == "spread":
                sessions = [row[0] for row in await hub.reader.execute_fetchall(
                    SELECT_TRAINER_ROOMS, (user_id,))]
            else:
                continue
            hub.queue.put_nowait(message_write(hub, ws, user_id, name, frame["type"],
                                               frame["content"], frame["client_id"],
                                               sessions, session_id))
    finally:
        hub.joining.pop(ws, None)
        hub.rooms[room_id].discard(ws)
    return ws


async def room_list(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    rows = await hub.reader.execute_fetchall(SELECT_ROOMS, {"user_id": claims(request)["sub"]})
    rooms = [{"id": room_id, "member_name": member_name, "trainer_name": trainer_name,
              "last_activity": last_activity, "last_message": last_message,
              "unread_count": 0, "status": status}
             for room_id, member_name, trainer_name, last_activity, last_message, status in rows]
    return web.json_response({"chat_rooms": rooms}, headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    await request.app[HUB].reader.execute_fetchall("SELECT 1")
    return web.json_response({"status": "ok"})


async def hub_context(app: web.Application):
    writer = await aiosqlite.connect(app[DB_PATH])
    await writer.executescript(SCHEMA)
    await writer.execute("PRAGMA synchronous = FULL")
    reader = await aiosqlite.connect(app[DB_PATH])
    last_id = (await writer.execute_fetchall(SELECT_LAST_ID))[0][0]
    # Only this writer inserts, so it numbers the rows itself.
    hub = app[HUB] = Hub(writer, reader, asyncio.Queue(), itertools.count(last_id + 1))
    task = asyncio.create_task(run_writer(hub))
    yield
    hub.queue.put_nowait(STOP)
    await task
    await reader.close()
    await writer.close()


async def close_sockets(app: web.Application) -> None:
    sockets = [ws for room in app[HUB].rooms.values() for ws in list(room)]
    await asyncio.gather(*(ws.close(code=1001) for ws in sockets), return_exceptions=True)


def import_gym(path: str, db_path: str) -> None:
    data = json.loads(open(path, encoding="utf-8").read())
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"
    db = sqlite3.connect(db_path)
    db.executescript(SCHEMA)
    with db:
        db.executemany("INSERT OR REPLACE INTO users (id, name, role) VALUES (?, ?, ?)",
                       [(u["id"], u["name"], u["role"]) for u in data["users"]])
        db.executemany("INSERT OR REPLACE INTO pt_sessions (id, trainer_id, member_id, created_at)"
                       " VALUES (?, ?, ?, ?)",
                       [(s["id"], s["trainer"], s["member"], now) for s in data["sessions"]])
    db.close()
    print(f"{len(data['users'])} users, {len(data['sessions'])} sessions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "import"))
    parser.add_argument("file", nargs="?")
    parser.add_argument("--db", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    for ignored in ("--secret", "--rate-limit", "--log-level", "--max-connections-per-ip"):
        parser.add_argument(ignored, help="accepted and ignored")
    parser.add_argument("--no-demo", action="store_true", help="accepted and ignored")
    args = parser.parse_args()
    if args.command == "import":
        import_gym(args.file, args.db)
        return
    app = web.Application()
    app[DB_PATH] = args.db
    app.cleanup_ctx.append(hub_context)
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/distributor/healthz", healthz)
    app.router.add_get("/distributor/chat/rooms", room_list)
    app.router.add_get("/distributor/ws/chat/{room_id}", chat_socket)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None,
                shutdown_timeout=2)


if __name__ == "__main__":
    main()
