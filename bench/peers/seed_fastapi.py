"""Benchmark peer: the Distributor Chat brief as a typical team would build it.

FastAPI + uvicorn + SQLAlchemy ORM (sync Session) over SQLite in WAL mode: ORM
models, one Session per request or per socket frame, one commit per message,
a ChatManager holding a dict of sets of WebSockets, JSON encoded per recipient
with ``websocket.send_json``, and the sync database calls made straight from
the async WebSocket handler, as such code usually does. Written competently
(indexes, WAL, no sleeps) but in that conventional style, so that
``bench/`` can compare it with ``distributor_chat.py`` under one load generator.

It speaks the subset of SPEC.md that the load generator uses:

    python bench/peers/seed_fastapi.py --db PATH --port N --secret S [--host 127.0.0.1]
        serves (``serve`` may be given first; ``--rate-limit``, ``--no-demo`` are
        accepted and ignored, ``--log-level`` is passed to uvicorn)
    python bench/peers/seed_fastapi.py import FILE.json --db PATH
        loads {"users": [{"id","name","role"}], "sessions": [{"id","trainer","member"}]}
        (room id pt_<id>); existing ids are updated
    python bench/peers/seed_fastapi.py load-messages --db PATH --session-ids 1-300 --per-session N
        bulk-inserts N synthetic messages into each listed session (``A-B`` or
        ``1,5,9``), interleaved across rooms, senders alternating member/trainer,
        one second apart ending now; nothing is marked read
    python bench/peers/seed_fastapi.py token USER_ID --db PATH --secret S
        prints a JWT for a user (for trying it by hand)

Endpoints: GET /distributor/healthz, GET /distributor/chat/rooms (JSON only),
GET /distributor/chat/rooms/{room_id}/messages, WS /distributor/ws/chat/{room_id}.
Not implemented (SPEC differences): HTML pages, login/logout, Origin checks,
rate limits, socket caps, the 5 s join/leave grace, closing at token expiry,
the 10 s slow-consumer cut-off, end-session and the other admin subcommands.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import jwt
import uvicorn
from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import (ForeignKey, Index, String, UniqueConstraint, create_engine, event, func,
                        or_, select, text)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (DeclarativeBase, Mapped, Session, joinedload, mapped_column,
                            relationship, sessionmaker)
from starlette.requests import HTTPConnection

MAX_MESSAGE_CHARS = 2000
MAX_CLIENT_ID_CHARS = 64
HISTORY_LATEST = 50
HISTORY_RESUME_MAX = 500
ROOM_ID = re.compile(r"pt_([0-9]{1,18})")
log = logging.getLogger("uvicorn.error")


# ------------------------------------------------------------------ models ---
class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PTSession(Base):
    __tablename__ = "pt_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    trainer_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    member_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    trainer: Mapped[User] = relationship(foreign_keys=[trainer_id])
    member: Mapped[User] = relationship(foreign_keys=[member_id])

    @property
    def room_id(self) -> str:
        return f"pt_{self.id}"


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("session_id", "user_id", "client_id"),
                      Index("ix_messages_session_id_id", "session_id", "id"))
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("pt_sessions.id"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    type: Mapped[str] = mapped_column(String(16), default="chat")
    content: Mapped[str]
    client_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sender: Mapped[User] = relationship()

    def to_dict(self) -> dict:
        return {"type": self.type, "id": self.id, "room_id": f"pt_{self.session_id}",
                "user_id": self.user_id, "sender_name": self.sender.name,
                "content": self.content, "created_at": iso(self.created_at),
                "client_id": self.client_id}


class ReadState(Base):
    __tablename__ = "read_states"
    session_id: Mapped[int] = mapped_column(ForeignKey("pt_sessions.id"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    last_read_id: Mapped[int] = mapped_column(default=0)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds") + "Z"


def local_minute(moment: datetime) -> str:
    return moment.replace(tzinfo=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M")


# ---------------------------------------------------------------- database ---
engine = None
SessionLocal = sessionmaker(autocommit=False, autoflush=False)


def init_db(path: str) -> None:
    global engine
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False,
                                                               "timeout": 10})

    @event.listens_for(engine, "connect")
    def set_sqlite_pragma(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # like ours, not left to the build default
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    SessionLocal.configure(bind=engine)
    Base.metadata.create_all(engine)


def get_db():
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


# -------------------------------------------------------------------- auth ---
class AuthError(Exception):
    pass


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message


SECRET = ""


def token_from(conn: HTTPConnection) -> str | None:
    scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return conn.cookies.get("distributor_token") or conn.query_params.get("token")


def authenticate(db: Session, token: str | None) -> User:
    if not token:
        raise AuthError("not signed in")
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"],
                            options={"require": ["exp", "sub", "role"]})
    except jwt.PyJWTError:
        raise AuthError("invalid or expired token") from None
    user = db.get(User, str(claims["sub"]))
    if user is None or user.role != claims["role"]:
        raise AuthError("unknown user or role changed")
    return user


def find_room(db: Session, room_id: str) -> PTSession | None:
    match = ROOM_ID.fullmatch(room_id)
    return db.get(PTSession, int(match.group(1))) if match else None


def current_user(request: Request, db: Session = Depends(get_db)) -> User:
    try:
        user = authenticate(db, token_from(request))
    except AuthError as error:
        raise ApiError(401, "unauthorized", str(error)) from None
    claimed = request.query_params.get("user_id")
    if claimed is not None and claimed != user.id:
        raise ApiError(403, "forbidden", "user_id does not match the token")
    return user


# --------------------------------------------------------------------- app ---
app = FastAPI(title="Distributor Chat (FastAPI peer)")


@app.exception_handler(ApiError)
async def api_error_handler(_request: Request, error: ApiError):
    return JSONResponse({"error": {"code": error.code, "message": error.message}},
                        status_code=error.status)


@app.exception_handler(RequestValidationError)
async def validation_error_handler(_request: Request, error: RequestValidationError):
    return JSONResponse({"error": {"code": "bad_request", "message": "invalid parameter"}},
                        status_code=400)


@app.get("/distributor/healthz")
def healthz(db: Session = Depends(get_db)):
    db.execute(text("SELECT 1"))
    return {"status": "ok"}


@app.get("/distributor/chat/rooms")
def list_rooms(user: User = Depends(current_user), db: Session = Depends(get_db)):
    rooms = db.scalars(
        select(PTSession)
        .options(joinedload(PTSession.trainer), joinedload(PTSession.member))
        .where(or_(PTSession.trainer_id == user.id, PTSession.member_id == user.id))).all()
    result = []
    for room in rooms:
        last = db.scalars(select(Message).where(Message.session_id == room.id)
                          .order_by(Message.id.desc()).limit(1)).first()
        state = db.get(ReadState, (room.id, user.id))
        last_read_id = state.last_read_id if state else 0
        unread = db.scalar(select(func.count(Message.id)).where(
            Message.session_id == room.id, Message.user_id != user.id,
            Message.id > last_read_id))
        activity = last.created_at if last else room.created_at
        result.append((activity, room.id, {
            "id": room.room_id, "member_name": room.member.name,
            "trainer_name": room.trainer.name, "last_activity": local_minute(activity),
            "last_message": last.content if last else None, "unread_count": unread,
            "status": room.status}))
    result.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return {"chat_rooms": [item[2] for item in result]}


@app.get("/distributor/chat/rooms/{room_id}/messages")
def list_messages(room_id: str, before: int | None = None, after: int | None = None,
                  limit: int = 50, user: User = Depends(current_user),
                  db: Session = Depends(get_db)):
    if before is not None and after is not None:
        raise ApiError(400, "bad_request", "give before or after, not both")
    if not 1 <= limit <= 100:
        raise ApiError(400, "bad_request", "limit must be 1 to 100")
    room = find_room(db, room_id)
    if room is None:
        raise ApiError(404, "not_found", "no such room")
    if user.id not in (room.trainer_id, room.member_id):
        raise ApiError(403, "forbidden", "not your room")
    messages, has_more = fetch_messages(db, room.id, before=before, after=after, limit=limit)
    return {"messages": [m.to_dict() for m in messages], "has_more": has_more}


def fetch_messages(db: Session, session_id: int, *, before: int | None = None,
                   after: int | None = None, limit: int) -> tuple[list[Message], bool]:
    query = select(Message).options(joinedload(Message.sender)).where(
        Message.session_id == session_id)
    if after is not None:
        rows = db.scalars(query.where(Message.id > after).order_by(Message.id)
                          .limit(limit + 1)).all()
        return list(rows[:limit]), len(rows) > limit
    if before is not None:
        query = query.where(Message.id < before)
    rows = db.scalars(query.order_by(Message.id.desc()).limit(limit + 1)).all()
    return list(reversed(rows[:limit])), len(rows) > limit


# ------------------------------------------------------------- chat manager ---
class ChatManager:
    def __init__(self):
        self.rooms: dict[str, set[WebSocket]] = defaultdict(set)
        self.users: dict[WebSocket, str] = {}

    def connect(self, room_id: str, user_id: str, websocket: WebSocket) -> bool:
        """Adds the socket; True when it is the user's first in the room."""
        first = not self.is_online(room_id, user_id)
        self.rooms[room_id].add(websocket)
        self.users[websocket] = user_id
        return first

    def disconnect(self, room_id: str, websocket: WebSocket) -> bool:
        """Removes the socket; True when it was the user's last in the room."""
        self.rooms[room_id].discard(websocket)
        user_id = self.users.pop(websocket, None)
        if not self.rooms[room_id]:
            del self.rooms[room_id]
        return user_id is not None and not self.is_online(room_id, user_id)

    def is_online(self, room_id: str, user_id: str) -> bool:
        return any(self.users.get(ws) == user_id for ws in self.rooms.get(room_id, ()))

    async def broadcast(self, room_id: str, payload: dict, exclude_user: str | None = None):
        for websocket in list(self.rooms.get(room_id, ())):
            if exclude_user is not None and self.users.get(websocket) == exclude_user:
                continue
            try:
                await websocket.send_json(payload)
            except Exception:
                self.disconnect(room_id, websocket)


manager = ChatManager()


class FrameError(Exception):
    def __init__(self, code: str, message: str, client_id: str | None = None):
        self.code, self.message, self.client_id = code, message, client_id


def checked_text(value, what: str, client_id=None) -> str:
    if not isinstance(value, str):
        raise FrameError("invalid_message", f"{what} must be a string", client_id)
    if "\x00" in value:
        raise FrameError("invalid_message", f"{what} contains NUL", client_id)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError("invalid_message", f"{what} has a lone surrogate", client_id) from None
    return value


def save_chat(session_id: int, user_id: str, content: str, client_id: str) -> tuple[Message, bool]:
    """Stores a chat message (one commit); returns it and whether it is new."""
    with SessionLocal() as db:
        room = db.get(PTSession, session_id)
        existing = db.scalars(select(Message).options(joinedload(Message.sender)).where(
            Message.session_id == session_id, Message.user_id == user_id,
            Message.client_id == client_id)).first()
        if existing is not None:
            return existing, False
        if room.status != "active":
            raise FrameError("room_closed", "this session has ended", client_id)
        message = Message(session_id=session_id, user_id=user_id, type="chat",
                          content=content, client_id=client_id)
        db.add(message)
        try:
            db.commit()
        except IntegrityError:
            db.rollback()
            raise FrameError("unavailable", "retry with the same client_id", client_id) from None
        db.refresh(message)
        message.sender  # load before the session closes
        return message, True


def save_spread(session_id: int, user_id: str, content: str, client_id: str):
    """Stores a spread in every active room of the trainer; returns (own, all, rooms)."""
    with SessionLocal() as db:
        existing = db.scalars(select(Message).options(joinedload(Message.sender)).where(
            Message.session_id == session_id, Message.user_id == user_id,
            Message.client_id == client_id)).first()
        if existing is not None:
            count = db.scalar(select(func.count(Message.id)).where(
                Message.user_id == user_id, Message.client_id == client_id,
                Message.type == "spread"))
            return existing, [], count
        rooms = db.scalars(select(PTSession).where(PTSession.trainer_id == user_id,
                                                   PTSession.status == "active")).all()
        if session_id not in {room.id for room in rooms}:
            raise FrameError("room_closed", "this session has ended", client_id)
        created_at = utcnow()
        messages = [Message(session_id=room.id, user_id=user_id, type="spread", content=content,
                            client_id=client_id, created_at=created_at) for room in rooms]
        db.add_all(messages)
        db.flush()
        frames = [m.to_dict() for m in messages]
        db.commit()
        own = next(f for f in frames if f["room_id"] == f"pt_{session_id}")
        return own, frames, len(frames)


def save_read(session_id: int, user_id: str, message_id: int) -> int | None:
    with SessionLocal() as db:
        last_id = db.scalar(select(func.max(Message.id)).where(
            Message.session_id == session_id)) or 0
        target = min(message_id, last_id)
        state = db.get(ReadState, (session_id, user_id))
        if state is None:
            state = ReadState(session_id=session_id, user_id=user_id, last_read_id=0)
            db.add(state)
        if target <= state.last_read_id:
            return None
        state.last_read_id = target
        db.commit()
        return target


async def handle_frame(websocket: WebSocket, me: dict, room_id: str, session_id: int, raw: str):
    try:
        frame = json.loads(raw)
    except ValueError:
        raise FrameError("invalid_message", "frames must be JSON") from None
    if not isinstance(frame, dict) or frame.get("type") not in ("chat", "spread", "read", "typing"):
        raise FrameError("invalid_message", "unknown frame")
    for name, expected in (("room_id", room_id), ("user_id", me["id"])):
        if name in frame and frame[name] != expected:
            raise FrameError("forbidden", f"{name} does not match this connection")
    kind = frame["type"]
    if kind in ("chat", "spread"):
        client_id = checked_text(frame.get("client_id"), "client_id")
        if not 1 <= len(client_id) <= MAX_CLIENT_ID_CHARS:
            raise FrameError("invalid_message", "client_id must be 1 to 64 characters")
        content = checked_text(frame.get("content"), "content", client_id).strip()
        if not content:
            raise FrameError("empty", "the message is empty", client_id)
        if len(content) > MAX_MESSAGE_CHARS:
            raise FrameError("too_long", f"at most {MAX_MESSAGE_CHARS} characters", client_id)
        if kind == "chat":
            message, is_new = save_chat(session_id, me["id"], content, client_id)
            if is_new:
                await manager.broadcast(room_id, message.to_dict())
            await websocket.send_json({"type": "ack", "client_id": client_id, "id": message.id,
                                       "created_at": iso(message.created_at)})
        else:
            if me["role"] != "trainer":
                raise FrameError("forbidden", "only trainers can spread", client_id)
            own, frames, count = save_spread(session_id, me["id"], content, client_id)
            for payload in frames:
                await manager.broadcast(payload["room_id"], payload)
            if isinstance(own, Message):
                own = own.to_dict()
            await websocket.send_json({"type": "ack", "client_id": client_id, "id": own["id"],
                                       "created_at": own["created_at"], "rooms": count})
    elif kind == "read":
        message_id = frame.get("message_id")
        if not isinstance(message_id, int) or isinstance(message_id, bool) or message_id <= 0:
            raise FrameError("invalid_message", "message_id must be a positive integer")
        new_id = save_read(session_id, me["id"], min(message_id, 2**63 - 1))
        if new_id is not None:
            await manager.broadcast(room_id, {"type": "read", "room_id": room_id,
                                              "user_id": me["id"], "message_id": new_id})
    else:
        await manager.broadcast(room_id, {"type": "typing", "room_id": room_id,
                                          "user_id": me["id"]}, exclude_user=me["id"])


@app.websocket("/distributor/ws/chat/{room_id}")
async def chat_socket(websocket: WebSocket, room_id: str):
    await websocket.accept()
    with SessionLocal() as db:
        try:
            user = authenticate(db, token_from(websocket))
        except AuthError:
            await websocket.close(code=4401)
            return
        room = find_room(db, room_id)
        if room is None:
            await websocket.close(code=4404)
            return
        claimed = websocket.query_params.get("user_id")
        if user.id not in (room.trainer_id, room.member_id) or claimed not in (None, user.id):
            await websocket.close(code=4403)
            return
        me = {"id": user.id, "name": user.name, "role": user.role}
        session_id = room.id
        first = manager.connect(room_id, user.id, websocket)
        participants = []
        for person in (room.trainer, room.member):
            state = db.get(ReadState, (session_id, person.id))
            participants.append({"user_id": person.id, "name": person.name, "role": person.role,
                                 "online": manager.is_online(room_id, person.id),
                                 "last_read_id": state.last_read_id if state else 0})
        after = websocket.query_params.get("after", "")
        if after.isdigit() and len(after) <= 18:
            history, has_more = fetch_messages(db, session_id, after=int(after),
                                               limit=HISTORY_RESUME_MAX)
        else:
            history, has_more = fetch_messages(db, session_id, limit=HISTORY_LATEST)
        history = [m.to_dict() for m in history]
    try:
        await websocket.send_json({"type": "welcome", "room_id": room_id, "user_id": me["id"],
                                   "role": me["role"], "participants": participants})
        await websocket.send_json({"type": "history", "messages": history, "has_more": has_more})
        if first:
            await manager.broadcast(room_id, {
                "type": "system", "event": "join", "room_id": room_id, "user_id": me["id"],
                "name": me["name"], "content": f"{me['name']} joined"}, exclude_user=me["id"])
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            try:
                if message.get("text") is None:
                    raise FrameError("invalid_message", "binary frames are not accepted")
                await handle_frame(websocket, me, room_id, session_id, message["text"])
            except FrameError as error:
                await websocket.send_json({"type": "error", "code": error.code,
                                           "message": error.message, "client_id": error.client_id})
    except WebSocketDisconnect:
        pass  # the peer went away mid-send
    except Exception:
        log.exception("socket error in %s", room_id)
    finally:
        if manager.disconnect(room_id, websocket):
            await manager.broadcast(room_id, {
                "type": "system", "event": "leave", "room_id": room_id, "user_id": me["id"],
                "name": me["name"], "content": f"{me['name']} left"})


# --------------------------------------------------------------------- CLI ---
def import_gym(path: str) -> None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        users, sessions = data["users"], data["sessions"]
        assert all(isinstance(u["id"], str) and isinstance(u["name"], str)
                   and u["role"] in ("trainer", "member") for u in users)
        assert all(isinstance(s["id"], int) and s["id"] > 0 for s in sessions)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as error:
        sys.exit(f"invalid import file: {error!r}")
    counts = defaultdict(int)
    with SessionLocal() as db:
        for entry in users:
            counts["users updated" if db.get(User, entry["id"]) else "users added"] += 1
            db.merge(User(id=entry["id"], name=entry["name"], role=entry["role"]))
        db.flush()
        for entry in sessions:
            trainer, member = db.get(User, entry["trainer"]), db.get(User, entry["member"])
            if not trainer or trainer.role != "trainer" or not member or member.role != "member":
                db.rollback()
                sys.exit(f"session {entry['id']}: unknown trainer or member")
            room = db.get(PTSession, entry["id"])
            counts["sessions updated" if room else "sessions added"] += 1
            if room is None:
                db.add(PTSession(id=entry["id"], trainer_id=trainer.id, member_id=member.id))
            else:
                room.trainer_id, room.member_id = trainer.id, member.id
        db.commit()
    print(", ".join(f"{n} {what}" for what, n in counts.items()) or "nothing to import")


def parse_ids(spec: str) -> list[int]:
    ids = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        ids.extend(range(int(low), int(high or low) + 1))
    return ids


def load_messages(session_ids: list[int], per_session: int) -> None:
    with SessionLocal() as db:
        rooms = {r.id: r for r in db.scalars(select(PTSession).where(
            PTSession.id.in_(session_ids)))}
    missing = sorted(set(session_ids) - set(rooms))
    if missing:
        sys.exit(f"no such sessions: {missing[:10]}")
    started, total = time.perf_counter(), per_session * len(rooms)
    first = utcnow() - timedelta(seconds=total)

    def rows():
        for k in range(per_session):
            for n, room in enumerate(rooms.values()):
                sender = room.member_id if k % 2 == 0 else room.trainer_id
                moment = first + timedelta(seconds=k * len(rooms) + n + 1)
                yield (room.id, sender, "chat", f"synthetic message {k} in pt_{room.id}",
                       f"seed-{k}", moment.strftime("%Y-%m-%d %H:%M:%S.%f"))

    raw = engine.raw_connection()
    try:
        raw.cursor().execute("PRAGMA cache_size=-262144")  # 256 MiB: fewer page spills
        raw.cursor().executemany(
            "INSERT INTO messages (session_id, user_id, type, content, client_id, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)", rows())
        raw.commit()
    finally:
        raw.close()
    print(f"inserted {total} messages into {len(rooms)} sessions "
          f"in {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> None:
    global SECRET, MAX_MESSAGE_CHARS
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("serve", "import", "load-messages", "token", "-h", "--help"):
        argv = ["serve", *argv]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("--db", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--secret", required=True)
    serve.add_argument("--max-message-chars", type=int, default=MAX_MESSAGE_CHARS)
    serve.add_argument("--log-level", default="info", type=str.lower)
    serve.add_argument("--rate-limit", help="accepted and ignored")
    serve.add_argument("--no-demo", action="store_true", help="accepted and ignored")
    load = commands.add_parser("import")
    load.add_argument("file")
    load.add_argument("--db", required=True)
    seed = commands.add_parser("load-messages")
    seed.add_argument("--db", required=True)
    seed.add_argument("--session-ids", required=True, type=parse_ids, help="A-B or 1,5,9")
    seed.add_argument("--per-session", required=True, type=int)
    mint = commands.add_parser("token")
    mint.add_argument("user_id")
    mint.add_argument("--db", required=True)
    mint.add_argument("--secret", required=True)
    args = parser.parse_args(argv)
    init_db(args.db)
    if args.command == "import":
        import_gym(args.file)
    elif args.command == "load-messages":
        load_messages(args.session_ids, args.per_session)
    elif args.command == "token":
        with SessionLocal() as db:
            user = db.get(User, args.user_id)
        if user is None:
            sys.exit(f"no such user: {args.user_id}")
        print(jwt.encode({"sub": user.id, "role": user.role, "exp": int(time.time()) + 43200},
                         args.secret, algorithm="HS256"))
    else:
        SECRET, MAX_MESSAGE_CHARS = args.secret, args.max_message_chars
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    ws_max_size=64 * 1024, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
