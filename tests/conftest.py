"""Shared fixtures: a real app on a fresh SQLite file in tmp_path, real sockets."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import jwt
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import distributor_chat as dc  # noqa: E402

SECRET = "test-secret-for-distributor-chat-tests-0123456789"
SERVER_SCRIPT = ROOT / "distributor_chat.py"

# The test gym: two trainers, three members, three PT sessions.
USERS = (
    ("t1", "Coach One", "trainer"),
    ("t2", "Coach Two", "trainer"),
    ("m1", "Member One", "member"),
    ("m2", "Member Two", "member"),
    ("m3", "Member Three", "member"),
)
SESSIONS = ((1, "t1", "m1"), (2, "t1", "m2"), (3, "t2", "m3"))


def make_settings(tmp_path: Path, **overrides) -> dc.Settings:
    values = {"db_path": tmp_path / "chat.db", "secret": SECRET, "demo": False}
    values.update(overrides)
    return dc.Settings(**values)


def change_storage(settings: dc.Settings, change) -> None:
    """Run ``await change(tx)`` in one management change of the server's own
    storage. In a thread of its own: tests call this from a running loop."""
    async def run() -> None:
        storage = await dc.Storage.open(settings)
        try:
            async with storage.admin_change() as tx:
                await change(tx)
        finally:
            await storage.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


def seed_gym(settings: dc.Settings, users=USERS, sessions=SESSIONS) -> None:
    """Users and sessions through the same storage and statements the CLI uses."""
    async def seed(tx) -> None:
        now = dc.utc_now_iso()
        for user_id, name, role in users:
            await tx.execute(dc.INSERT_USER, {"user_id": user_id, "name": name, "role": role,
                                              "created_at": now})
        for session_id, trainer_id, member_id in sessions:
            await tx.execute(dc.INSERT_SESSION_WITH_ID, {"session_id": session_id,
                                                         "trainer_id": trainer_id,
                                                         "member_id": member_id,
                                                         "created_at": now})
    change_storage(settings, seed)


def make_token(user_id: str, role: str | None = None, *, ttl_s: float = 3600,
               secret: str = SECRET, **claims) -> str:
    role = role or dict((u, r) for u, _, r in USERS).get(user_id, "member")
    payload = {"sub": user_id, "role": role, "exp": int(time.time() + ttl_s), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def auth(user_id: str, **kwargs) -> dict:
    return {"Authorization": f"Bearer {make_token(user_id, **kwargs)}"}


async def wait_until(check, timeout_s: float = 5.0, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval_s)


async def receive_until(ws, predicate, timeout_s: float = 5.0) -> dict:
    """The first JSON frame matching predicate; frames before it are skipped."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no matching frame in time"
        frame = await ws.receive_json(timeout=remaining)
        if predicate(frame):
            return frame


MESSAGES_PATH = "/distributor/chat/rooms/{}/messages"
ROOM_TRAINERS = {"pt_1": "t1", "pt_2": "t1", "pt_3": "t2", "pt_4": "t1"}


async def messages_over_http(client, room_id: str = "pt_1") -> list[dict]:
    """Every message of a room as the messages API serves it to the room's trainer."""
    messages, after_id = [], 0
    while True:
        response = await client.get(MESSAGES_PATH.format(room_id),
                                    params={"after": str(after_id), "limit": "100"},
                                    headers=auth(ROOM_TRAINERS[room_id]))
        assert response.status == 200, await response.text()
        page = await response.json()
        messages += page["messages"]
        if not page["has_more"]:
            return messages
        after_id = page["messages"][-1]["id"]


async def send_chat(ws, content: str, client_id: str, frame_type: str = "chat", **extra) -> None:
    await ws.send_json({"type": frame_type, "content": content, "client_id": client_id, **extra})


async def marker(ws, client_id: str, content: str = "ok") -> list[dict]:
    """Send a good chat; every frame up to its ack. Frames the server queued for
    this socket before the chat come first, so absent ones were never sent, and
    the ack proves the socket is still usable."""
    await send_chat(ws, content, client_id)
    frames: list[dict] = []

    def collect(frame: dict) -> bool:
        frames.append(frame)
        return frame["type"] == "ack" and frame["client_id"] == client_id

    await receive_until(ws, collect)
    return frames


ERROR_CODES = {"invalid_message", "too_long", "empty", "forbidden", "rate_limited",
               "room_closed", "unavailable"}


async def ack_of(ws, client_id: str, timeout_s: float = 5.0) -> dict:
    return await receive_until(
        ws, lambda f: f["type"] == "ack" and f["client_id"] == client_id, timeout_s)


async def next_error(ws, timeout_s: float = 5.0) -> dict:
    """The next error frame, checked to have the SPEC's shape and codes."""
    frame = await receive_until(ws, lambda f: f["type"] == "error", timeout_s)
    assert {"code", "message", "client_id"} <= frame.keys(), frame
    assert frame["code"] in ERROR_CODES, frame
    assert isinstance(frame["message"], str) and frame["message"], frame
    return frame


async def open_room(client, room_id: str, user_id: str, *, after: int | None = None,
                    token: str | None = None):
    """A socket past welcome and history: (ws, welcome, history)."""
    path = f"/distributor/ws/chat/{room_id}"
    if after is not None:
        path += f"?after={after}"
    token = token or make_token(user_id)
    ws = await client.ws_connect(path, headers={"Authorization": f"Bearer {token}"})
    welcome = await ws.receive_json(timeout=5)
    assert welcome["type"] == "welcome", welcome
    history = await ws.receive_json(timeout=5)
    assert history["type"] == "history", history
    return ws, welcome, history


@pytest.fixture
def settings(tmp_path) -> dc.Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def client(settings, aiohttp_client):
    """A test client of the real app on a seeded, fresh database."""
    seed_gym(settings)
    return await aiohttp_client(dc.create_app(settings))


@pytest.fixture
def make_client(tmp_path, aiohttp_client):
    """A factory for a client with other settings (rate limit, origins, ...)."""
    async def factory(**overrides):
        settings = make_settings(tmp_path, **overrides)
        seed_gym(settings)
        return await aiohttp_client(dc.create_app(settings))
    return factory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LIMIT_OPEN_FILES_THEN_EXEC = """
import os, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
os.execv(sys.argv[2], sys.argv[2:])
"""


class ServerProcess:
    """``python distributor_chat.py`` as a real child process; its output goes to a
    log file beside the database (a pipe nobody reads would block a chatty server)."""

    def __init__(self, db_path: Path, port: int, *extra: str, env: dict | None = None,
                 open_file_limit: int | None = None) -> None:
        self.db_path, self.port, self.extra = db_path, port, extra
        self.env = {**os.environ, **(env or {})}
        self.open_file_limit = open_file_limit  # soft and hard, as `ulimit -n` would set
        self.process: subprocess.Popen | None = None
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = db_path.parent / f"server-{port}.log"

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def start(self, timeout_s: float = 10.0) -> "ServerProcess":
        command = [sys.executable, str(SERVER_SCRIPT), "--db", str(self.db_path), "--port",
                   str(self.port), "--secret", SECRET, "--no-demo", *self.extra]
        if self.open_file_limit:
            # Set in the child before it runs the server (no preexec_fn: it can
            # deadlock a forked child when the test process has threads).
            command = [sys.executable, "-c", LIMIT_OPEN_FILES_THEN_EXEC,
                       str(self.open_file_limit), *command]
        with open(self.log_path, "a", encoding="utf-8") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                            text=True, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("server did not start in time")

    def stop(self, sig=None, timeout_s: float = 10.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig or 15)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("server did not exit in time")


@pytest.fixture
def server_process(tmp_path):
    """A factory for real server processes on a seeded database; all stopped after."""
    started: list[ServerProcess] = []

    def factory(*extra: str, seed: bool = True, db_path: Path | None = None,
                port: int | None = None, env: dict | None = None,
                open_file_limit: int | None = None) -> ServerProcess:
        path = db_path or tmp_path / "chat.db"
        if seed and not path.exists():
            seed_gym(make_settings(tmp_path, db_path=path))
        server = ServerProcess(path, port or free_port(), *extra, env=env,
                               open_file_limit=open_file_limit)
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        if server.process and server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def run_cli(*args: str, db_path: Path, env: dict | None = None, stdin: str | None = None,
            timeout_s: float = 30) -> subprocess.CompletedProcess:
    """A management command as a gym runs it; ``stdin`` is its input (none by default)."""
    return subprocess.run([sys.executable, str(SERVER_SCRIPT), *args, "--db", str(db_path)],
                          capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})},
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


class PageParser(HTMLParser):
    """Tags with their attributes, visible text, and script bodies."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)


def stored_rows(db_path: Path) -> list[dict]:
    """Every stored message as it is in the file (not as the API serves it), by
    id, read through a read-only connection."""
    uri = f"{Path(db_path).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(
            "SELECT id, session_id, user_id, type, content, client_id, created_at "
            "FROM messages ORDER BY id")]


def parse_frame(buffer: bytearray) -> tuple[int, bytes] | None:
    """Take one whole server frame (opcode, payload) off the buffer, or None yet."""
    if len(buffer) < 2:
        return None
    opcode, length, position = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
    assert not buffer[1] & 0x80, "a server must not mask its frames"
    if length == 126:
        if len(buffer) < 4:
            return None
        length, position = struct.unpack_from("!H", buffer, 2)[0], 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        length, position = struct.unpack_from("!Q", buffer, 2)[0], 10
    if len(buffer) < position + length:
        return None
    payload = bytes(buffer[position:position + length])
    del buffer[:position + length]
    return opcode, payload
