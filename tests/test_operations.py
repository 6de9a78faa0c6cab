"""Running it for years (SPEC 8): --version, backup and check, schema upgrades,
CSV import, sign-in from a gym's own app, printed links; and error frames that
always let a client settle its pending message (SPEC 5). Real processes, real
SQLite files in tmp_path."""
from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import sqlite3
import time
from pathlib import Path

import aiohttp
import jwt
import pytest

import distributor_chat as dc
from conftest import (SECRET, auth, make_settings, make_token, next_error, open_room,
                      run_cli, seed_gym, stored_rows)

SCHEMA_V0 = Path(__file__).parent / "data" / "schema_v0.sql"


def schema_of(db_path: Path) -> dict[str, str]:
    """Every table, index and trigger's SQL, by name: what a database's shape is.
    Spacing is left out (ALTER TABLE ADD COLUMN writes its column as ", col)"
    where schema.sql has ",\n    col\n)"); every word and sign stays."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return {name: re.sub(r"\s*([(),])\s*", r"\1", " ".join(sql.split()))
                for name, sql in db.execute(
                    "SELECT name, sql FROM sqlite_master "
                    "WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%'")}


def user_version(db_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


# --------------------------------------------------------------- version ---


def test_version_prints_the_name_and_version_and_exits_0(tmp_path):
    done = run_cli("--version", db_path=tmp_path / "none.db")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"distributor-chat {dc.VERSION}\n", "")
    assert re.fullmatch(r"\d+\.\d+\.\d+", dc.VERSION)
    assert not (tmp_path / "none.db").exists()


# ----------------------------------------------------- backup and check ---


async def test_a_backup_taken_while_20_clients_send_holds_every_message_acked_before_it(
        server_process, tmp_path):
    """SPEC 8: the copy restored into a new server has every message acked before
    the backup started; sending goes on meanwhile."""
    server = server_process("--rate-limit", "0", "--log-level", "warning")
    acked_before: dict[str, int] = {}
    backup_started = asyncio.Event()
    backup_path = tmp_path / "nightly" / "chat-backup.db"
    backup_path.parent.mkdir()
    senders = [("m1", "pt_1"), ("t1", "pt_1"), ("m2", "pt_2"), ("t1", "pt_2"), ("t2", "pt_3"),
               ("m3", "pt_3")]

    async def send_until_stopped(http, number: int, stop: asyncio.Event) -> None:
        user_id, room_id = senders[number % len(senders)]
        async with http.ws_connect(f"ws://127.0.0.1:{server.port}/distributor/ws/chat/{room_id}",
                                   headers=auth(user_id), heartbeat=None) as ws:
            for _ in range(2):
                await ws.receive_json(timeout=5)
            sequence = 0
            while not stop.is_set():
                client_id = f"c{number}-{sequence}"
                await ws.send_json({"type": "chat", "content": f"set {sequence} from {number}",
                                    "client_id": client_id})
                while True:
                    frame = await ws.receive_json(timeout=10)
                    if frame["type"] == "ack" and frame["client_id"] == client_id:
                        break
                if not backup_started.is_set():
                    acked_before[client_id] = frame["id"]
                sequence += 1

    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        clients = [asyncio.create_task(send_until_stopped(http, number, stop)) for number in range(20)]
        deadline = time.monotonic() + 10
        while len(acked_before) < 200:
            assert time.monotonic() < deadline and not any(c.done() for c in clients)
            await asyncio.sleep(0.01)
        backup_started.set()
        done = await asyncio.to_thread(run_cli, "backup", str(backup_path), db_path=server.db_path)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    assert done.returncode == 0, done.stderr
    assert backup_path.stat().st_mode & 0o777 == 0o600  # it holds the sign-in and push keys
    copied = {row["client_id"]: row["id"] for row in stored_rows(backup_path)}
    assert done.stdout == f"backup {backup_path}: {len(copied)} messages, 0 photos\n"
    missing = {client_id for client_id in acked_before if copied.get(client_id) != acked_before[client_id]}
    assert not missing, f"{len(missing)} acked before the backup are not in it"
    assert len(stored_rows(server.db_path)) > len(acked_before)  # sending went on

    # Restoring = putting the copy back with the server stopped: a new server on it.
    restored_path = tmp_path / "restored" / "chat.db"
    restored_path.parent.mkdir()
    shutil.copy(backup_path, restored_path)
    restored = server_process("--log-level", "warning", db_path=restored_path, seed=False)
    async with aiohttp.ClientSession() as http:
        ids = []
        for room_id, reader in (("pt_1", "t1"), ("pt_2", "t1"), ("pt_3", "t2")):
            after = 0
            while True:
                async with http.get(f"{restored.base_url}/distributor/chat/rooms/{room_id}/messages",
                                    params={"after": str(after), "limit": "100"},
                                    headers=auth(reader)) as response:
                    assert response.status == 200
                    page = await response.json()
                ids += [(m["client_id"], m["id"]) for m in page["messages"]]
                if not page["has_more"]:
                    break
                after = page["messages"][-1]["id"]
                await asyncio.sleep(0.1)  # 10 history reads a second per user (SPEC 5)
    assert set(acked_before.items()) <= set(ids)


def test_a_backup_to_a_file_that_exists_writes_nothing(tmp_path):
    settings = make_settings(tmp_path)
    seed_gym(settings)
    existing = tmp_path / "keep.db"
    existing.write_bytes(b"the gym's other file")
    done = run_cli("backup", str(existing), db_path=settings.db_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: {existing} exists; a backup goes to a new file\n"
    assert existing.read_bytes() == b"the gym's other file"
    missing_dir = run_cli("backup", str(tmp_path / "no" / "such" / "dir.db"), db_path=settings.db_path)
    assert missing_dir.returncode == 1 and missing_dir.stderr.startswith("error: backup failed")
    assert not (tmp_path / "no").exists()


def test_check_prints_ok_the_version_and_the_counts(tmp_path):
    settings = make_settings(tmp_path)
    seed_gym(settings)
    done = run_cli("check", db_path=settings.db_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"ok\nschema version: {dc.SCHEMA_VERSION}\nusers: 5\nsessions: 3\n"
                           "messages: 0\nphotos: 0\n")


def test_check_finds_damage_and_names_it(tmp_path):
    settings = make_settings(tmp_path)
    seed_gym(settings)
    chats = [("t1", f"message {number} " + "x" * 500) for number in range(400)]
    with contextlib.closing(sqlite3.connect(settings.db_path)) as db:
        db.executemany("INSERT INTO messages (session_id, user_id, type, content, client_id, created_at)"
                       " VALUES (1, ?, 'chat', ?, ?, '2026-12-01T00:00:00.000Z')",
                       [(user, content, f"c{index}") for index, (user, content) in enumerate(chats)])
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    damaged = tmp_path / "damaged.db"
    data = bytearray(settings.db_path.read_bytes())
    for page in (10, 20, 30):  # overwrite some pages in the middle of the file
        data[page * page_size:(page + 1) * page_size] = b"\xa5" * page_size
    damaged.write_bytes(bytes(data))
    done = run_cli("check", db_path=damaged)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: the database is damaged: "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    missing = run_cli("check", db_path=tmp_path / "nothing-here.db")
    assert (missing.returncode, missing.stderr) == (1, f"error: no database at {tmp_path / 'nothing-here.db'}\n")
    assert not (tmp_path / "nothing-here.db").exists()


# ------------------------------------------------------- schema versions ---


def make_v0_database(db_path: Path) -> None:
    """A gym's database as the first released version left it, with its data."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.executescript(SCHEMA_V0.read_text(encoding="utf-8"))
        db.executescript("""
            INSERT INTO meta (key, value) VALUES ('jwt_secret', 'kept-from-v0');
            INSERT INTO users VALUES ('t1', 'Coach One', 'trainer', '2026-01-01T00:00:00.000Z'),
                                     ('m1', '이서연', 'member', '2026-01-01T00:00:00.000Z');
            INSERT INTO pt_sessions (id, trainer_id, member_id, created_at)
                 VALUES (1, 't1', 'm1', '2026-01-01T00:00:00.000Z');
            INSERT INTO messages (session_id, user_id, type, content, client_id, created_at)
                 VALUES (1, 'm1', 'chat', '스쿼트 자세 봐주세요', 'a', '2026-01-02T00:00:00.000Z'),
                        (1, 't1', 'chat', '좋아요', 'b', '2026-01-02T00:01:00.000Z');
            UPDATE read_state SET last_read_id = 1 WHERE user_id = 't1';
        """)
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0


async def test_a_database_of_the_first_release_upgrades_with_its_data_intact(server_process,
                                                                             tmp_path):
    old = tmp_path / "old.db"
    make_v0_database(old)
    fresh = tmp_path / "fresh.db"
    seed_gym(make_settings(tmp_path, db_path=fresh), users=(), sessions=())
    server = server_process("--log-level", "warning", db_path=old, seed=False)
    assert user_version(old) == dc.SCHEMA_VERSION
    assert schema_of(old) == schema_of(fresh)  # the same shape as a new database
    async with aiohttp.ClientSession() as http:
        token = jwt.encode({"sub": "m1", "role": "member", "exp": int(time.time()) + 600},
                           SECRET, algorithm="HS256")
        async with http.get(f"{server.base_url}/distributor/chat/rooms?format=json",
                            headers={"Authorization": f"Bearer {token}"}) as response:
            rooms = (await response.json())["chat_rooms"]
        assert [(room["id"], room["last_message"], room["unread_count"]) for room in rooms] == [
            ("pt_1", "좋아요", 1)]
        async with http.get(f"{server.base_url}/distributor/chat/rooms/pt_1/messages",
                            headers={"Authorization": f"Bearer {token}"}) as response:
            messages = (await response.json())["messages"]
        assert [(m["id"], m["content"]) for m in messages] == [(1, "스쿼트 자세 봐주세요"), (2, "좋아요")]
    server.stop()
    with contextlib.closing(sqlite3.connect(old)) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'jwt_secret'").fetchone() == ("kept-from-v0",)
        assert db.execute("SELECT last_read_id FROM read_state WHERE user_id = 't1'").fetchone() == (1,)
    assert run_cli("check", db_path=old).stdout.startswith(f"ok\nschema version: {dc.SCHEMA_VERSION}\n")


def test_a_failed_upgrade_leaves_the_old_database_as_it_was(tmp_path, monkeypatch):
    """One transaction: a step that fails changes nothing, not even the version."""
    old = tmp_path / "old.db"
    make_v0_database(old)
    before = schema_of(old)
    monkeypatch.setitem(dc.SCHEMA_UPGRADES, 1, ("CREATE TABLE revoked_tokens (x)",
                                                "THIS IS NOT SQL",))
    with pytest.raises(dc.StorageUnavailable):
        asyncio.run(dc.Storage.open(make_settings(tmp_path, db_path=old)))
    assert user_version(old) == 0
    assert schema_of(old) == before


def test_a_database_from_a_newer_version_is_refused_and_left_alone(tmp_path):
    settings = make_settings(tmp_path)
    seed_gym(settings)
    newer = dc.SCHEMA_VERSION + 1
    with contextlib.closing(sqlite3.connect(settings.db_path)) as db:
        db.execute(f"PRAGMA user_version = {newer}")
    before = settings.db_path.read_bytes()
    expected = (f"error: the database's schema version {newer} is newer than this program's "
                f"({dc.SCHEMA_VERSION}); run a newer distributor_chat.py\n")
    for args in (("serve", "--port", "0", "--no-demo"), ("add-user", "--role", "member", "--name", "X"),
                 ("check",)):
        done = run_cli(*args, db_path=settings.db_path)
        assert (done.returncode, done.stderr) == (1, expected), args
    with contextlib.closing(sqlite3.connect(settings.db_path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == newer
        assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 5
    assert settings.db_path.read_bytes() == before


# ------------------------------------------------------------ CSV import ---

USERS_CSV = "id,name,role\r\ncoach_lee,이코치,trainer\r\nmember_kang,강하늘,member\r\nmember_yoon,윤서아,member\r\n"
SESSIONS_CSV = "session_id,trainer_id,member_id\r\n21,coach_lee,member_kang\r\n22,coach_lee,member_yoon\r\n"


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["no BOM", "BOM"])
def test_csv_import_of_users_then_sessions_with_korean_names(tmp_path, bom):
    db_path = tmp_path / "chat.db"
    (tmp_path / "users.csv").write_bytes(bom + USERS_CSV.encode())
    (tmp_path / "sessions.csv").write_bytes(bom + SESSIONS_CSV.encode())
    users = run_cli("import", str(tmp_path / "users.csv"), db_path=db_path)
    assert (users.returncode, users.stdout) == (0, "users: 3 added, 0 updated; sessions: 0 added, 0 updated\n")
    sessions = run_cli("import", str(tmp_path / "sessions.csv"), db_path=db_path)
    assert (sessions.returncode, sessions.stdout) == (0, "users: 0 added, 0 updated; sessions: 2 added, 0 updated\n")
    again = run_cli("import", str(tmp_path / "users.csv"), db_path=db_path)
    assert again.stdout == "users: 0 added, 3 updated; sessions: 0 added, 0 updated\n"
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT id, name, role FROM users ORDER BY id").fetchall() == [
            ("coach_lee", "이코치", "trainer"), ("member_kang", "강하늘", "member"),
            ("member_yoon", "윤서아", "member")]
        assert db.execute("SELECT id, trainer_id, member_id FROM pt_sessions ORDER BY id").fetchall() == [
            (21, "coach_lee", "member_kang"), (22, "coach_lee", "member_yoon")]


def test_csv_with_3_bad_rows_lists_each_by_line_and_imports_nothing(tmp_path):
    db_path = tmp_path / "chat.db"
    seed_gym(make_settings(tmp_path, db_path=db_path))
    users = ("\ufeffid,name,role\r\nnew_one,새회원,member\r\nnew_two,,member\r\n"
             "new_three,셋,coach\r\nnew_one,중복,member\r\nnew_four,넷,member\r\n")
    (tmp_path / "users.csv").write_text(users, encoding="utf-8")
    done = run_cli("import", str(tmp_path / "users.csv"), db_path=db_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {tmp_path / 'users.csv'}: 3 bad rows, nothing imported",
        "line 3: a user needs id, name and role",
        "line 4: unknown role 'coach' (trainer or member)",
        "line 5: id 'new_one' is also on line 2"]
    sessions = "session_id,trainer_id,member_id\n40,t1,m1\n41,nobody,m1\n40,t1,m2\n42,m1,t1\n"
    (tmp_path / "sessions.csv").write_text(sessions, encoding="utf-8")
    done = run_cli("import", str(tmp_path / "sessions.csv"), db_path=db_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: {tmp_path / 'sessions.csv'}: 3 bad rows, nothing imported",
        "line 3: unknown user 'nobody'",
        "line 4: session_id 40 is also on line 2",
        "line 5: 'm1' is not a trainer",
        "line 5: 't1' is not a member"]
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 5
        assert db.execute("SELECT count(*) FROM pt_sessions").fetchone()[0] == 3


def test_a_csv_with_an_unknown_header_is_refused(tmp_path):
    (tmp_path / "people.csv").write_text("user,name\nx,y\n", encoding="utf-8")
    done = run_cli("import", str(tmp_path / "people.csv"), db_path=tmp_path / "chat.db")
    assert done.returncode == 1
    assert done.stderr.splitlines()[1] == (
        "line 1: the header must be id,name,role or session_id,trainer_id,member_id")


# ------------------------------------------------ sign-in from a gym's app ---


@pytest.mark.parametrize("claims, status", [
    ({}, 401), ({"iss": "gym-app"}, 401), ({"aud": "distributor"}, 401),
    ({"iss": "gym-app", "aud": "distributor"}, 200), ({"iss": "other", "aud": "distributor"}, 401),
    ({"iss": "gym-app", "aud": "elsewhere"}, 401), ({"iss": "gym-app", "aud": ["x", "distributor"]}, 200),
], ids=["neither", "iss only", "aud only", "both match", "wrong iss", "wrong aud", "aud in a list"])
async def test_jwt_issuer_and_audience_are_required_when_set(make_client, claims, status):
    client = await make_client(jwt_issuer="gym-app", jwt_audience="distributor")
    token = make_token("m1", **claims)
    response = await client.get("/distributor/chat/rooms?format=json",
                                headers={"Authorization": f"Bearer {token}"})
    assert response.status == status
    ws = await client.ws_connect("/distributor/ws/chat/pt_1", headers={"Authorization": f"Bearer {token}"})
    first = await ws.receive(timeout=5)
    await ws.close()
    assert (first.type == aiohttp.WSMsgType.TEXT) == (status == 200)
    if status != 200:
        assert first.data == 4401


async def test_without_issuer_or_audience_set_tokens_may_carry_any(client):
    token = make_token("m1", iss="anything", aud="whatever")
    response = await client.get("/distributor/chat/rooms?format=json",
                                headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200


def test_cli_tokens_carry_the_configured_issuer_and_audience(tmp_path):
    settings = make_settings(tmp_path)
    seed_gym(settings)
    done = run_cli("token", "m1", "--secret", SECRET, "--jwt-issuer", "gym-app",
                   "--jwt-audience", "distributor", db_path=settings.db_path)
    token = done.stdout.splitlines()[0]
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="distributor", issuer="gym-app")
    assert (claims["sub"], claims["iss"], claims["aud"]) == ("m1", "gym-app", "distributor")


# -------------------------------------------------------- printed links ---


def test_links_use_the_public_url_when_given(tmp_path):
    settings = make_settings(tmp_path)
    seed_gym(settings)
    done = run_cli("token", "m1", "--secret", SECRET, "--public-url", "https://chat.gym.example/",
                   db_path=settings.db_path)
    link = done.stdout.splitlines()[1]
    assert link.startswith("https://chat.gym.example/distributor/login?token=")
    assert link.endswith("&next=/distributor/chat/rooms")


def test_a_server_on_all_interfaces_prints_a_lan_address_never_loopback(tmp_path):
    settings = make_settings(tmp_path)
    seed_gym(settings)
    done = run_cli("token", "m1", "--secret", SECRET, "--host", "0.0.0.0", db_path=settings.db_path)
    host = re.match(r"http://([^/:]+):8080/distributor/login\?token=", done.stdout.splitlines()[1])
    assert host, done.stdout
    assert host.group(1) not in ("127.0.0.1", "0.0.0.0", "localhost") and not host.group(1).startswith("127.")
    assert host.group(1) == dc.lan_address()


def test_qr_shows_each_printed_link_as_a_qr_code(tmp_path):
    settings = make_settings(tmp_path)
    seed_gym(settings)
    done = run_cli("token", "m1", "--secret", SECRET, "--qr", db_path=settings.db_path)
    token, link, *qr_lines = done.stdout.splitlines()
    assert link.startswith("http://127.0.0.1:8080/distributor/login?token=")
    assert len(qr_lines) >= 20 and len({len(line) for line in qr_lines}) == 1  # a square block
    assert set("".join(qr_lines)) <= set("█▀▄ ")
    plain = run_cli("token", "m1", "--secret", SECRET, db_path=settings.db_path)
    assert len(plain.stdout.splitlines()) == 2


# ----------------------------------------- error frames settle a client ---


@pytest.mark.parametrize("frame, code", [
    ({"type": "chat", "content": "hi", "client_id": ""}, "invalid_message"),
    ({"type": "chat", "content": "hi", "client_id": "x" * 65}, "invalid_message"),
    ({"type": "chat", "content": "hi", "client_id": "c1", "room_id": "pt_2"}, "forbidden"),
    ({"type": "chat", "content": "hi", "client_id": "c1", "user_id": "m2"}, "forbidden"),
    ({"type": "chat", "content": "hi", "client_id": "c1", "room_id": 5}, "invalid_message"),
    ({"type": "shout", "content": "hi", "client_id": "c1"}, "invalid_message"),
    ({"type": "read", "message_id": "x", "client_id": "c1"}, "invalid_message"),
    ({"type": "spread", "content": "hi", "client_id": "c1"}, "forbidden"),
    ({"type": "chat", "content": "   ", "client_id": "c1"}, "empty"),
], ids=["empty id", "65-char id", "other room", "other user", "room_id not a string",
        "unknown type", "bad read", "member spread", "blank content"])
async def test_an_error_carries_the_client_id_of_the_frame_it_answers(client, frame, code):
    """SPEC 5: any string client_id, even an invalid one, comes back, so the page
    can settle its pending message."""
    ws, _, _ = await open_room(client, "pt_1", "m1")
    await ws.send_json(frame)
    error = await next_error(ws)
    assert (error["code"], error["client_id"]) == (code, frame["client_id"])
    await ws.close()


async def test_an_error_for_a_frame_without_a_string_client_id_carries_null(client):
    ws, _, _ = await open_room(client, "pt_1", "m1")
    for frame in ({"type": "chat", "content": "hi", "client_id": 7}, {"type": "chat", "content": "hi"},
                  ["not", "an", "object"]):
        await ws.send_json(frame)
        assert (await next_error(ws))["client_id"] is None
    await ws.send_str('{"type": "chat", "content": "hi", "client_id": "\\ud800"}')
    error = await next_error(ws)
    assert (error["code"], error["client_id"]) == ("invalid_message", "\ud800")
    await ws.close()
