"""The management CLI and the serve command, run as real child processes (SPEC section 2)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import aiohttp
import jwt
import pytest

from conftest import (SECRET, SERVER_SCRIPT, free_port, make_settings, make_token, run_cli,
                      seed_gym, wait_until)

LINK_PATTERN = re.compile(r"https?://\S+/distributor/login\?token=\S+")
TABLES = ("users", "pt_sessions", "messages", "read_state", "meta")


# ------------------------------------------------------------ helpers ---


def clean_env(**extra: str) -> dict:
    """The environment without any DISTRIBUTOR_* the caller happens to have."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISTRIBUTOR_")}
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra)
    return env


def cli(*args: str, cwd: Path, env: dict | None = None,
        timeout_s: float = 15) -> subprocess.CompletedProcess:
    """The CLI with exactly these arguments (no --db added), in ``cwd``."""
    return subprocess.run([sys.executable, str(SERVER_SCRIPT), *args], cwd=cwd,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout_s,
                          env=clean_env(**(env or {})), stdin=subprocess.DEVNULL)


def failure_problems(result: subprocess.CompletedProcess, code: int) -> list[str]:
    """What is wrong with a run that should exit ``code`` with a one-line reason."""
    problems = []
    reason = result.stderr.strip()
    if result.returncode != code:
        problems.append(f"exit {result.returncode}, not {code}")
    if not reason:
        problems.append("no reason on stderr")
    elif "\n" in reason or "Traceback" in reason:
        problems.append("the reason is not one line")
    if result.stdout.strip():
        problems.append(f"printed {result.stdout.strip()[:80]!r}")
    return [f"{problem} (stderr: {result.stderr[-300:]!r})" for problem in problems]


def assert_one_line_failure(result: subprocess.CompletedProcess, code: int) -> None:
    problems = failure_problems(result, code)
    assert not problems, problems


def assert_all_fail(tmp_path: Path, code: int, cases: dict) -> None:
    """Run every case on its own freshly seeded database, a few at a time: each must
    exit ``code`` with a one-line reason and leave its database as it was.
    A case is a function of the database path that runs the CLI."""
    def run_case(number_and_case):
        number, (name, run) = number_and_case
        folder = tmp_path / f"case{number}"
        folder.mkdir()
        db = seeded_db(folder)
        before = snapshot(db)
        try:
            problems = failure_problems(run(db), code)
        except subprocess.TimeoutExpired:
            problems = ["did not exit in time"]
        if snapshot(db) != before:
            problems.append("the database changed")
        return name, problems

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(run_case, enumerate(cases.items())))
    failures = {name: problems for name, problems in outcomes if problems}
    assert not failures, json.dumps(failures, indent=1, ensure_ascii=False)


def snapshot(db_path: Path) -> dict:
    """Every row of every table, to compare before and after a command."""
    with closing(sqlite3.connect(db_path)) as db:
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                for table in TABLES}


def query(db_path: Path, sql: str, *params) -> list[tuple]:
    with closing(sqlite3.connect(db_path)) as db:
        return db.execute(sql, params).fetchall()


def seeded_db(tmp_path: Path, name: str = "chat.db") -> Path:
    path = tmp_path / name
    seed_gym(make_settings(tmp_path, db_path=path))
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def token_and_link(result: subprocess.CompletedProcess) -> tuple[str, str]:
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    token = next(line for line in lines if re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", line))
    link = LINK_PATTERN.search(result.stdout).group(0)
    assert parse_qs(urlsplit(link).query)["token"] == [token]
    return token, link


async def sign_in(http: aiohttp.ClientSession, link: str) -> str:
    """GET a sign-in link with redirects off: 303 and the cookie; the cookie's token."""
    async with http.get(link, allow_redirects=False) as response:
        assert response.status == 303, (response.status, await response.text())
        assert response.headers["Location"].startswith("/distributor/")
        cookie = response.cookies.get("distributor_token")
        assert cookie is not None and cookie.value
        assert cookie["httponly"]
        assert cookie["path"] == "/distributor"
        assert cookie["samesite"].lower() == "lax"
        return cookie.value


async def room_list(http: aiohttp.ClientSession, base_url: str, token: str) -> list[dict]:
    async with http.get(f"{base_url}/distributor/chat/rooms?format=json",
                        headers={"Cookie": f"distributor_token={token}"}) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["chat_rooms"]


async def wait_listening(port: int, process: subprocess.Popen, timeout_s: float = 10) -> None:
    def is_listening() -> bool:
        assert process.poll() is None, "the server exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False
    await wait_until(is_listening, timeout_s=timeout_s, interval_s=0.05)


async def close_code_within(ws, timeout_s: float) -> int | None:
    """Read until the socket closes; its close code (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not ws.closed:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the socket was not closed in time"
        message = await ws.receive(timeout=remaining)
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
            break
    return ws.close_code


class Served:
    """``python distributor_chat.py ...`` (serving) with its output read line by line."""

    def __init__(self, *args: str, cwd: Path, env: dict | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), *args], cwd=cwd, env=clean_env(**(env or {})),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace")
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def links(self) -> list[str]:
        return LINK_PATTERN.findall(self.output)

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        await wait_until(lambda: self.process.poll() is not None, timeout_s=timeout_s,
                         interval_s=0.05)
        self._reader.join(timeout=5)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def serve():
    """A factory for serving processes; every one still running is killed after the test."""
    started: list[Served] = []

    def factory(*args: str, cwd: Path, env: dict | None = None) -> Served:
        served = Served(*args, cwd=cwd, env=env)
        started.append(served)
        return served

    yield factory
    for served in started:
        served.kill()


# ----------------------------------------------------------- add-user ---


def test_add_user_prints_given_or_generated_id(tmp_path):
    db = seeded_db(tmp_path)
    given = run_cli("add-user", "--role", "trainer", "--name", "  코치 Lee ", "--id", "coach.lee@gym",
                    db_path=db)
    assert given.returncode == 0, given.stderr
    assert given.stdout.strip() == "coach.lee@gym"
    generated = [run_cli("add-user", "--role", "member", "--name", "Newbie", db_path=db)
                 for _ in range(2)]
    ids = [result.stdout.strip() for result in generated]
    assert all(result.returncode == 0 for result in generated), [r.stderr for r in generated]
    assert all(re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", user_id) for user_id in ids), ids
    assert ids[0] != ids[1]
    rows = dict((row[0], row[1:]) for row in query(db, "SELECT id, name, role FROM users"))
    assert rows["coach.lee@gym"] == ("코치 Lee", "trainer")
    assert rows[ids[0]] == ("Newbie", "member") and rows[ids[1]] == ("Newbie", "member")


def test_add_user_with_an_existing_id_exits_1_and_changes_nothing(tmp_path):
    db = seeded_db(tmp_path)
    before = snapshot(db)
    result = run_cli("add-user", "--role", "member", "--name", "Impostor", "--id", "m1", db_path=db)
    assert_one_line_failure(result, 1)
    assert result.stdout.strip() == ""
    assert snapshot(db) == before


BAD_ADD_USER_ARGS = {
    "bad-role": ("--role", "admin", "--name", "X"),
    "no-role": ("--name", "No Role"),
    "no-name": ("--role", "member"),
    "blank-name": ("--role", "member", "--name", "   "),
    "space-id": ("--role", "member", "--name", "X", "--id", "has space"),
    "empty-id": ("--role", "member", "--name", "X", "--id", ""),
    "long-id": ("--role", "member", "--name", "X", "--id", "x" * 65),
}


def test_add_user_bad_arguments_exit_2(tmp_path):
    assert_all_fail(tmp_path, 2, {
        name: (lambda db, args=args: run_cli("add-user", *args, db_path=db))
        for name, args in BAD_ADD_USER_ARGS.items()})


# -------------------------------------------------------- add-session ---


def test_add_session_prints_the_room_id_and_stores_it(tmp_path):
    db = seeded_db(tmp_path)
    result = run_cli("add-session", "--trainer", "t2", "--member", "m1", db_path=db)
    assert result.returncode == 0, result.stderr
    room_id = result.stdout.strip()
    match = re.fullmatch(r"pt_(\d+)", room_id)
    assert match, result.stdout
    assert query(db, "SELECT trainer_id, member_id, status FROM pt_sessions WHERE id = ?",
                 int(match.group(1))) == [("t2", "m1", "active")]
    second = run_cli("add-session", "--trainer", "t2", "--member", "m2", db_path=db)
    assert second.returncode == 0 and second.stdout.strip() not in ("", room_id)


def test_add_session_unknown_ids_or_wrong_roles_exit_1(tmp_path):
    pairs = {"unknown-trainer": ("nobody", "m1"), "unknown-member": ("t1", "nobody"),
             "member-as-trainer": ("m1", "m2"), "trainer-as-member": ("t1", "t2"),
             "swapped": ("m1", "t1")}
    assert_all_fail(tmp_path, 1, {
        name: (lambda db, pair=pair: run_cli("add-session", "--trainer", pair[0],
                                             "--member", pair[1], db_path=db))
        for name, pair in pairs.items()})


def test_add_session_missing_argument_exits_2(tmp_path):
    db = seeded_db(tmp_path)
    before = snapshot(db)
    assert_one_line_failure(run_cli("add-session", "--trainer", "t1", db_path=db), 2)
    assert snapshot(db) == before


# -------------------------------------------------------- end-session ---


def test_end_session_makes_the_room_read_only_in_the_db(tmp_path):
    db = seeded_db(tmp_path)
    result = run_cli("end-session", "pt_2", db_path=db)
    assert result.returncode == 0, result.stderr
    statuses = dict(query(db, "SELECT id, status FROM pt_sessions"))
    assert statuses == {1: "active", 2: "ended", 3: "active"}


def test_end_session_unknown_or_bad_room_exits_1(tmp_path):
    assert_all_fail(tmp_path, 1, {
        room_id: (lambda db, room_id=room_id: run_cli("end-session", room_id, db_path=db))
        for room_id in ("pt_99", "pt_0", "room_1", "pt_abc")})


# -------------------------------------------------------------- token ---


@pytest.mark.parametrize("ttl, seconds", [
    (None, 12 * 3600), ("45s", 45), ("5m", 300), ("2h", 7200), ("3d", 3 * 86400)])
def test_token_is_hs256_with_sub_role_exp(tmp_path, ttl, seconds):
    db = seeded_db(tmp_path)
    extra = () if ttl is None else ("--ttl", ttl)
    started = time.time()
    result = run_cli("token", "t1", *extra, "--secret", SECRET, db_path=db)
    token, link = token_and_link(result)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": True})
    assert claims["sub"] == "t1" and claims["role"] == "trainer"
    assert started + seconds - 2 <= claims["exp"] <= time.time() + seconds + 2
    assert urlsplit(link).path == "/distributor/login"


def test_token_bad_ttl_exits_2(tmp_path):
    ttl_args = {ttl: ("--ttl", ttl) for ttl in ("12", "1w", "-1h", "abc", "0h")}
    ttl_args["=-1h"] = ("--ttl=-1h",)
    assert_all_fail(tmp_path, 2, {
        name: (lambda db, args=args: run_cli("token", "m1", *args, "--secret", SECRET,
                                             db_path=db))
        for name, args in ttl_args.items()})


def test_token_unknown_user_exits_1(tmp_path):
    db = seeded_db(tmp_path)
    before = snapshot(db)
    result = run_cli("token", "nobody", "--secret", SECRET, db_path=db)
    assert_one_line_failure(result, 1)
    assert result.stdout.strip() == ""
    assert snapshot(db) == before


async def test_token_link_signs_in_to_a_running_server(server_process):
    server = server_process()
    result = run_cli("token", "m1", "--ttl", "10m", "--secret", SECRET, "--port", str(server.port),
                     db_path=server.db_path)
    token, link = token_and_link(result)
    assert link.startswith(f"http://127.0.0.1:{server.port}/distributor/login?")
    async with aiohttp.ClientSession() as http:
        assert await sign_in(http, link) == token
        rooms = await room_list(http, server.base_url, token)
        assert [room["id"] for room in rooms] == ["pt_1"]


# ------------------------------------------------------------- import ---


def test_import_adds_and_updates_in_one_go(tmp_path):
    db = seeded_db(tmp_path)
    data = {
        "users": [
            {"id": "t3", "name": "Coach Three", "role": "trainer"},
            {"id": "m4", "name": "Member Four", "role": "member"},
            {"id": "m1", "name": "Member One Renamed", "role": "member"},
        ],
        "sessions": [
            {"id": 12, "trainer": "t3", "member": "m4"},
            {"id": 3, "trainer": "t1", "member": "m3"},
        ],
    }
    result = run_cli("import", str(write_json(tmp_path / "gym.json", data)), db_path=db)
    assert result.returncode == 0, result.stderr
    assert "added" in result.stdout and "updated" in result.stdout
    assert sorted(int(n) for n in re.findall(r"\d+", result.stdout)) == [1, 1, 1, 2]
    users = {row[0]: row[1:] for row in query(db, "SELECT id, name, role FROM users")}
    assert len(users) == 7
    assert users["m1"] == ("Member One Renamed", "member")
    assert users["t3"] == ("Coach Three", "trainer") and users["m4"] == ("Member Four", "member")
    sessions = {row[0]: row[1:] for row in query(db, "SELECT id, trainer_id, member_id FROM pt_sessions")}
    assert sessions == {1: ("t1", "m1"), 2: ("t1", "m2"), 3: ("t1", "m3"), 12: ("t3", "m4")}

    # The same file again: everything exists, so it is updated, never duplicated.
    again = run_cli("import", str(tmp_path / "gym.json"), db_path=db)
    assert again.returncode == 0, again.stderr
    assert "updated" in again.stdout
    assert query(db, "SELECT count(*) FROM users") == [(7,)]
    assert query(db, "SELECT count(*) FROM pt_sessions") == [(4,)]


BAD_IMPORTS = {
    "not-json": '{"users": [',
    "not-utf8": b"\xff\xfe{\x00}",
    "nested-100000-deep": b"[" * 100000 + b"]" * 100000,
    "array": [],
    "users-not-list": {"users": {"id": "x", "name": "X", "role": "member"}},
    "user-not-object": {"users": ["m9"]},
    "user-no-name": {"users": [{"id": "m9", "role": "member"}]},
    "user-bad-role": {"users": [{"id": "m9", "name": "X", "role": "admin"}]},
    "user-bad-id": {"users": [{"id": "no spaces", "name": "X", "role": "member"}]},
    "duplicate-user": {"users": [{"id": "m9", "name": "A", "role": "member"},
                                 {"id": "m9", "name": "B", "role": "member"}]},
    "session-string-id": {"sessions": [{"id": "9", "trainer": "t1", "member": "m1"}]},
    "session-zero-id": {"sessions": [{"id": 0, "trainer": "t1", "member": "m1"}]},
    "duplicate-session": {"sessions": [{"id": 9, "trainer": "t1", "member": "m1"},
                                       {"id": 9, "trainer": "t2", "member": "m3"}]},
    "unknown-user": {"sessions": [{"id": 9, "trainer": "t1", "member": "ghost"}]},
    "role-mismatch": {"sessions": [{"id": 9, "trainer": "m1", "member": "m2"}]},
    # Valid users first, then a bad session: the users must not stay behind.
    "good-then-bad": {"users": [{"id": "t9", "name": "New Coach", "role": "trainer"},
                                {"id": "m1", "name": "Renamed", "role": "member"}],
                      "sessions": [{"id": 1, "trainer": "t9", "member": "m1"},
                                   {"id": 9, "trainer": "t9", "member": "t1"}]},
    # A role change that leaves an existing session without its trainer.
    "role-change-breaks-session": {"users": [{"id": "t1", "name": "Coach One", "role": "member"}]},
}


def _import_case(name: str):
    def run(db: Path) -> subprocess.CompletedProcess:
        path = db.parent / "import.json"
        data = BAD_IMPORTS.get(name)
        if isinstance(data, bytes):
            path.write_bytes(data)
        elif data is not None:
            write_json(path, data)
        return run_cli("import", str(path), db_path=db)
    return run


def test_import_invalid_file_exits_1_and_changes_nothing(tmp_path):
    names = sorted(BAD_IMPORTS) + ["missing-file"]
    assert_all_fail(tmp_path, 1, {name: _import_case(name) for name in names})


# ------------------------------------------------ options and environment ---


BAD_OPTIONS = [
    (("--port", "abc"), {}),
    (("--log-level", "loud"), {}),
    (("--tz", "Mars/Base"), {}),
    (("--rate-limit", "-1"), {}),
    (("--max-message-chars", "0"), {}),
    (("--allowed-origin", "gym.example"), {}),
    ((), {"DISTRIBUTOR_PORT": "abc"}),
    ((), {"DISTRIBUTOR_LOG_LEVEL": "loud"}),
    ((), {"DISTRIBUTOR_MAX_MESSAGE_CHARS": "0"}),
    ((), {"DISTRIBUTOR_ALLOWED_ORIGIN": "https://ok.example,not-an-origin"}),
    ((), {"DISTRIBUTOR_ALLOWED_ORIGIN": "http://[x"}),
    (("--allowed-origin", "http://[x"), {}),
    (("token", "m1", "--port", "abc"), {}),
    (("add-user", "--role", "member", "--name", "X", "--log-level", "loud"), {}),
]


def test_bad_option_values_exit_2(tmp_path):
    def case(args, env):
        # A port of our own, so a server that wrongly starts cannot take 8080.
        port_env = {"DISTRIBUTOR_PORT": str(free_port()), **env}
        return lambda db: cli(*args, "--db", str(db), cwd=db.parent, env=port_env, timeout_s=10)
    assert_all_fail(tmp_path, 2, {
        " ".join(args) + " " + " ".join(f"{k}={v}" for k, v in env.items()): case(args, env)
        for args, env in BAD_OPTIONS})


def test_cli_reads_db_secret_port_and_host_from_environment(tmp_path):
    db = seeded_db(tmp_path, "env.db")
    port = free_port()
    env = {"DISTRIBUTOR_DB": "env.db", "DISTRIBUTOR_SECRET": SECRET,
           "DISTRIBUTOR_PORT": str(port), "DISTRIBUTOR_HOST": "127.0.0.1"}
    added = cli("add-user", "--role", "member", "--name", "Env Member", "--id", "m_env",
                cwd=tmp_path, env=env)
    assert added.returncode == 0, added.stderr
    assert query(db, "SELECT name FROM users WHERE id = 'm_env'") == [("Env Member",)]
    token, link = token_and_link(cli("token", "m_env", cwd=tmp_path, env=env))
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["sub"] == "m_env"
    assert link.startswith(f"http://127.0.0.1:{port}/distributor/login?")
    # A flag beats its environment form.
    _, flagged = token_and_link(cli("token", "m_env", "--port", "9123", cwd=tmp_path, env=env))
    assert flagged.startswith("http://127.0.0.1:9123/")
    assert not (tmp_path / "distributor_chat.db").exists()


def test_relative_db_path_is_relative_to_the_working_directory(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = cli("add-user", "--role", "trainer", "--name", "Rel", "--id", "rel",
                 "--db", "rel.db", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert query(workdir / "rel.db", "SELECT id FROM users") == [("rel",)]


async def test_server_reads_its_options_from_environment(tmp_path, serve):
    db = seeded_db(tmp_path, "env.db")
    port = free_port()
    env = {"DISTRIBUTOR_PORT": str(port), "DISTRIBUTOR_DB": "env.db",
           "DISTRIBUTOR_SECRET": SECRET, "DISTRIBUTOR_LOG_LEVEL": "WARNING",
           "DISTRIBUTOR_ALLOWED_ORIGIN": "https://a.example, https://b.example",
           "DISTRIBUTOR_MAX_MESSAGE_CHARS": "5", "DISTRIBUTOR_RATE_LIMIT": "1",
           "DISTRIBUTOR_TZ": "Asia/Seoul"}
    served = serve("--no-demo", cwd=tmp_path, env=env)
    await wait_listening(port, served.process)
    base = f"http://127.0.0.1:{port}"
    created_at = query(db, "SELECT created_at FROM pt_sessions WHERE id = 1")[0][0]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/distributor/healthz") as response:
            assert response.status == 200 and await response.json() == {"status": "ok"}
        rooms = await room_list(http, base, make_token("m1"))  # SECRET from the environment
        seoul = datetime.fromisoformat(created_at.replace("Z", "+00:00")).astimezone(
            ZoneInfo("Asia/Seoul"))
        assert rooms[0]["last_activity"] == seoul.strftime("%Y-%m-%d %H:%M")

        url = f"ws://127.0.0.1:{port}/distributor/ws/chat/pt_1"
        headers = {"Authorization": f"Bearer {make_token('m1')}"}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, headers={**headers, "Origin": "https://evil.example"})
        assert refused.value.status == 403
        async with http.ws_connect(url, headers={**headers, "Origin": "https://b.example"}) as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "welcome"
            assert (await ws.receive_json(timeout=5))["type"] == "history"
            await ws.send_json({"type": "chat", "content": "123456", "client_id": "long"})
            error = await _frame(ws, lambda f: f["type"] == "error")
            assert error["code"] == "too_long" and error["client_id"] == "long"
            # Rate 1 a second, burst 4: six at once cannot all be stored.
            for number in range(6):
                await ws.send_json({"type": "chat", "content": f"hi {number}",
                                    "client_id": f"r{number}"})
            outcomes = {}
            while len(outcomes) < 6:
                frame = await _frame(ws, lambda f: f["type"] in ("ack", "error"))
                outcomes[frame["client_id"]] = frame.get("code", "ack")
            assert "rate_limited" in outcomes.values(), outcomes
            assert list(outcomes.values()).count("ack") >= 4, outcomes
    assert await served.stop() == 0
    assert " INFO " not in served.output and "/distributor/healthz" not in served.output, \
        served.output


async def _frame(ws, predicate, timeout_s: float = 5) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no matching frame in time"
        message = await ws.receive(timeout=remaining)
        assert message.type is aiohttp.WSMsgType.TEXT, \
            f"the socket closed (code {ws.close_code}) while a frame was awaited: {message}"
        frame = json.loads(message.data)
        if predicate(frame):
            return frame


async def test_server_secret_makes_cli_tokens_valid(server_process, tmp_path):
    server = server_process()  # started with --secret SECRET
    port = str(server.port)
    by_flag = run_cli("token", "m1", "--secret", SECRET, "--port", port, db_path=server.db_path)
    by_env = run_cli("token", "t1", "--port", port, db_path=server.db_path,
                     env={"DISTRIBUTOR_SECRET": SECRET})
    # Without the server's secret the CLI signs with another key: refused.
    other = run_cli("token", "m2", "--port", port, db_path=server.db_path,
                    env={"DISTRIBUTOR_SECRET": ""})
    async with aiohttp.ClientSession() as http:
        for result in (by_flag, by_env):
            token, link = token_and_link(result)
            assert await sign_in(http, link) == token
        _, wrong_link = token_and_link(other)
        async with http.get(wrong_link, allow_redirects=False) as response:
            assert response.status == 401


async def test_secret_kept_in_database_survives_restart(tmp_path, serve):
    db = seeded_db(tmp_path)
    port = free_port()
    # Minted before the server ever ran: the CLI creates the kept secret.
    early, early_link = token_and_link(run_cli("token", "m1", "--port", str(port), db_path=db))
    args = ("--port", str(port), "--db", str(db), "--no-demo")
    first = serve(*args, cwd=tmp_path)
    await wait_listening(port, first.process)
    late, late_link = token_and_link(run_cli("token", "t1", "--port", str(port), db_path=db))
    secret_rows = query(db, "SELECT value FROM meta WHERE key = 'jwt_secret'")
    assert len(secret_rows) == 1
    kept = secret_rows[0][0]
    assert jwt.decode(late, kept, algorithms=["HS256"])["sub"] == "t1"
    async with aiohttp.ClientSession() as http:
        assert await sign_in(http, early_link) == early
        assert await sign_in(http, late_link) == late
        assert await first.stop() == 0

        second = serve(*args, cwd=tmp_path)
        await wait_listening(port, second.process)
        assert await sign_in(http, early_link) == early
        assert await sign_in(http, late_link) == late
        assert query(db, "SELECT value FROM meta WHERE key = 'jwt_secret'") == [(kept,)]
        assert await second.stop() == 0


# ------------------------------------------- commands while a server runs ---


async def _open(http, port: int, room_id: str, user_id: str, token: str | None = None):
    ws = await http.ws_connect(
        f"ws://127.0.0.1:{port}/distributor/ws/chat/{room_id}",
        headers={"Authorization": f"Bearer {token or make_token(user_id)}"})
    welcome = await ws.receive_json(timeout=5)
    assert welcome["type"] == "welcome", welcome
    assert (await ws.receive_json(timeout=5))["type"] == "history"
    return ws, welcome


async def test_commands_work_while_the_server_runs(server_process):
    server = server_process()
    db = server.db_path
    added = run_cli("add-user", "--role", "member", "--name", "Live Newbie", "--id", "newbie",
                    db_path=db)
    assert added.returncode == 0, added.stderr
    session = run_cli("add-session", "--trainer", "t2", "--member", "newbie", db_path=db)
    assert session.returncode == 0, session.stderr
    room_id = session.stdout.strip()
    token, link = token_and_link(run_cli("token", "newbie", "--port", str(server.port),
                                         db_path=db, env={"DISTRIBUTOR_SECRET": SECRET}))
    async with aiohttp.ClientSession() as http:
        assert await sign_in(http, link) == token
        assert [room["id"] for room in await room_list(http, server.base_url, token)] == [room_id]
        ws, welcome = await _open(http, server.port, room_id, "newbie", token)
        names = {p["user_id"]: p["name"] for p in welcome["participants"]}
        assert names == {"t2": "Coach Two", "newbie": "Live Newbie"}
        await ws.send_json({"type": "chat", "content": "hello", "client_id": "n1"})
        assert (await _frame(ws, lambda f: f["type"] == "ack"))["client_id"] == "n1"
        await ws.close()


async def test_end_session_while_connected_answers_room_closed(server_process):
    server = server_process()
    async with aiohttp.ClientSession() as http:
        ws, _ = await _open(http, server.port, "pt_1", "m1")
        await ws.send_json({"type": "chat", "content": "before", "client_id": "b1"})
        first = await _frame(ws, lambda f: f["type"] == "ack")
        result = run_cli("end-session", "pt_1", db_path=server.db_path)
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 2.0
        attempt = 0
        while True:
            attempt += 1
            await ws.send_json({"type": "chat", "content": "after", "client_id": f"a{attempt}"})
            frame = await _frame(ws, lambda f: f["type"] in ("ack", "error"))
            if frame.get("code") == "room_closed":
                assert frame["client_id"] == f"a{attempt}"
                break
            assert time.monotonic() < deadline, f"still accepted after 2 s: {frame}"
            await asyncio.sleep(0.1)
        # Read-only, not gone: reads still work, the room list says ended.
        await ws.send_json({"type": "read", "message_id": first["id"]})
        receipt = await _frame(ws, lambda f: f["type"] in ("read", "error"))
        assert receipt == {"type": "read", "room_id": "pt_1", "user_id": "m1",
                           "message_id": first["id"]}
        rooms = await room_list(http, server.base_url, make_token("m1"))
        assert rooms[0]["status"] == "ended"
        assert not ws.closed
        await ws.close()
    stored = query(server.db_path, "SELECT client_id FROM messages WHERE session_id = 1")
    assert stored == [("b1",)]


async def test_import_moving_a_session_closes_the_old_members_socket(server_process, tmp_path):
    server = server_process()
    async with aiohttp.ClientSession() as http:
        old_member, _ = await _open(http, server.port, "pt_1", "m1")
        trainer, _ = await _open(http, server.port, "pt_1", "t1")
        move = write_json(tmp_path / "move.json",
                          {"sessions": [{"id": 1, "trainer": "t1", "member": "m2"}]})
        result = run_cli("import", str(move), db_path=server.db_path)
        assert result.returncode == 0, result.stderr
        assert await close_code_within(old_member, 2.0) == 4403
        # The trainer stays; the new member gets in; the old one is refused.
        await trainer.send_json({"type": "chat", "content": "still here", "client_id": "s1"})
        assert (await _frame(trainer, lambda f: f["type"] == "ack"))["client_id"] == "s1"
        new_member, welcome = await _open(http, server.port, "pt_1", "m2")
        assert {p["user_id"] for p in welcome["participants"]} == {"t1", "m2"}
        again = await http.ws_connect(f"ws://127.0.0.1:{server.port}/distributor/ws/chat/pt_1",
                                      headers={"Authorization": f"Bearer {make_token('m1')}"})
        assert await close_code_within(again, 5) == 4403
        await trainer.close()
        await new_member.close()


async def test_sends_right_after_an_import_moves_the_room_store_nothing_there(
        server_process, tmp_path):
    """Between the import and the server closing the old trainer's socket, their
    chat and spread are refused as forbidden, and other users' writes go on."""
    server = server_process()
    async with aiohttp.ClientSession() as http:
        old_trainer, _ = await _open(http, server.port, "pt_1", "t1")
        bystander, _ = await _open(http, server.port, "pt_3", "m3")
        move = write_json(tmp_path / "move.json",
                          {"sessions": [{"id": 1, "trainer": "t2", "member": "m1"}]})
        result = run_cli("import", str(move), db_path=server.db_path)
        assert result.returncode == 0, result.stderr
        outcomes = []
        for frame_type, client_id in (("spread", "late-spread"), ("chat", "late-chat")):
            try:
                await old_trainer.send_json({"type": frame_type, "content": "mine?",
                                             "client_id": client_id})
                answer = await _frame(old_trainer, lambda f: f.get("client_id") == client_id)
                outcomes.append(answer.get("code", answer["type"]))
            except (AssertionError, ConnectionError, aiohttp.ClientError):
                # the server closed the socket (4403) first: also fine
                outcomes.append(f"closed {old_trainer.close_code}")
        assert all(outcome in ("forbidden", "closed 4403") for outcome in outcomes), outcomes
        await bystander.send_json({"type": "chat", "content": "unrelated", "client_id": "b1"})
        assert (await _frame(bystander, lambda f: f["type"] in ("ack", "error")))["type"] == "ack"
        await bystander.close()
    assert query(server.db_path, "SELECT count(*) FROM messages WHERE client_id LIKE 'late-%'") \
        == [(0,)]
    assert server.stop() == 0
    assert "Traceback" not in server.output()


# ------------------------------------------------------------ serving ---


async def test_serve_seeds_the_demo_gym_once_with_working_links(tmp_path, serve):
    port = free_port()
    args = ("--port", str(port), "--db", "demo.db")
    db = tmp_path / "demo.db"
    first = serve(*args, cwd=tmp_path)
    await wait_listening(port, first.process)
    await wait_until(lambda: len(first.links()) >= 4, timeout_s=10)
    links = first.links()
    assert len(links) == 4, first.output
    roles = dict(query(db, "SELECT role, count(*) FROM users GROUP BY role"))
    assert roles == {"trainer": 1, "member": 3}
    assert query(db, "SELECT count(*) FROM pt_sessions") == [(3,)]
    message_count = query(db, "SELECT count(*) FROM messages")[0][0]
    assert message_count > 0
    async with aiohttp.ClientSession() as http:
        room_counts = []
        for link in links:
            assert link.startswith(f"http://127.0.0.1:{port}/distributor/login?")
            token = await sign_in(http, link)
            rooms = await room_list(http, f"http://127.0.0.1:{port}", token)
            assert rooms and all(room["status"] == "active" for room in rooms)
            room_counts.append(len(rooms))
        assert sorted(room_counts) == [1, 1, 1, 3]
    assert await first.stop() == 0

    second = serve(*args, cwd=tmp_path)
    await wait_listening(port, second.process)
    assert await second.stop() == 0
    assert second.links() == [], second.output
    assert query(db, "SELECT count(*) FROM users") == [(4,)]
    assert query(db, "SELECT count(*) FROM pt_sessions") == [(3,)]
    assert query(db, "SELECT count(*) FROM messages") == [(message_count,)]


async def test_serve_no_demo_leaves_an_empty_database_empty(tmp_path, serve):
    port = free_port()
    served = serve("serve", "--port", str(port), "--db", "empty.db", "--no-demo", cwd=tmp_path)
    await wait_listening(port, served.process)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/distributor/healthz") as response:
            assert response.status == 200 and await response.json() == {"status": "ok"}
    assert await served.stop() == 0
    assert served.links() == [], served.output
    assert query(tmp_path / "empty.db", "SELECT count(*) FROM users") == [(0,)]
