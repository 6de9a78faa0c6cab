"""Load generator: Distributor Chat over its public protocol, from outside the process.

Starts `distributor_chat.py` on a fresh database in a temporary directory, seeds
rooms with the `import` subcommand, mints tokens with the `--secret` it gave the
server, connects both participants of every room, and has every member send
messages as fast as acks come back (closed loop, a fixed number in flight each).
Prints acknowledged messages a second, ack latency and send-to-delivery latency.

    python bench/load.py [--rooms 100] [--messages 20] [--in-flight 1]

Bounded in count and time; talks only to 127.0.0.1.

The helpers here (Server, gyms, tokens, sockets, percentiles) are shared with
bench/run.py, which runs every scenario against our server and two peers.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import jwt

try:  # faster frame decoding when available; the standard library otherwise
    import orjson
    loads = orjson.loads
except ImportError:  # pragma: no cover
    loads = json.loads

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
SCRIPTS = {"ours": ROOT / "distributor_chat.py",
           "bare": ROOT / "bench" / "peers" / "bare_limit.py",
           "peer": ROOT / "bench" / "peers" / "seed_fastapi.py"}
HOST = "127.0.0.1"


# ------------------------------------------------------------------ basics ---
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def token(user_id: str, role: str, secret: str = SECRET) -> str:
    return jwt.encode({"sub": user_id, "role": role, "exp": int(time.time()) + 3600},
                      secret, algorithm="HS256")


def auth(user_id: str, role: str, secret: str = SECRET) -> dict:
    return {"Authorization": f"Bearer {token(user_id, role, secret)}"}


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def raise_fd_limit() -> None:
    """Soft open-file limit up to the hard one: thousands of sockets per process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _server_preexec() -> None:
    """In the server child: more file descriptors, and die with the bench (Linux)."""
    raise_fd_limit()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------- gyms ---
def pairs_gym(rooms: int) -> dict:
    """Room n: trainer tn and member mn (one trainer per room: at most 20 sockets a user)."""
    users = [{"id": f"t{n}", "name": f"Coach {n}", "role": "trainer"} for n in range(1, rooms + 1)]
    users += [{"id": f"m{n}", "name": f"Member {n}", "role": "member"} for n in range(1, rooms + 1)]
    sessions = [{"id": n, "trainer": f"t{n}", "member": f"m{n}"} for n in range(1, rooms + 1)]
    return {"users": users, "sessions": sessions}


def coach_gym(rooms: int, first_room: int, coach: str = "coach") -> dict:
    """One trainer `coach` with rooms first_room.. (member c<room> in each)."""
    ids = range(first_room, first_room + rooms)
    users = [{"id": coach, "name": "Head Coach", "role": "trainer"}]
    users += [{"id": f"c{n}", "name": f"Client {n}", "role": "member"} for n in ids]
    sessions = [{"id": n, "trainer": coach, "member": f"c{n}"} for n in ids]
    return {"users": users, "sessions": sessions}


# ----------------------------------------------------------------- server ---
class Server:
    """One server process (ours, the bare limit or the FastAPI peer) on a fresh
    database in `workdir`."""

    live: set["Server"] = set()  # every started, not yet stopped server: stopped on exit

    def __init__(self, kind: str, workdir: Path, name: str = "bench", secret: str = SECRET,
                 template: Path | None = None):
        self.kind, self.secret = kind, secret
        self.script = SCRIPTS[kind]
        workdir.mkdir(parents=True, exist_ok=True)
        self.db_path = workdir / f"{name}.db"
        self.log_path = workdir / f"{name}-{kind}.log"
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.kill_expected = False  # set when a scenario means to SIGKILL an overloaded server
        if template is not None:  # a seeded database (users, sessions, no messages)
            shutil.copyfile(template, self.db_path)

    @property
    def http_base(self) -> str:
        return f"http://{HOST}:{self.port}/distributor"

    @property
    def ws_base(self) -> str:
        return f"ws://{HOST}:{self.port}/distributor/ws/chat"

    def _run(self, *args: str) -> str:
        done = subprocess.run([sys.executable, str(self.script), *args], capture_output=True,
                              text=True, timeout=600, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{self.kind} {args[0]} failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    def import_gym(self, gym: dict) -> None:
        path = self.db_path.with_suffix(".gym.json")
        path.write_text(json.dumps(gym))
        self._run("import", str(path), "--db", str(self.db_path))

    def load_messages(self, first: int, last: int, per_room: int) -> None:
        """Bulk messages into rooms first..last, interleaved, senders alternating
        member/trainer, one second apart ending now; nothing read. Ours and the
        bare limit: plain SQL into `messages` (our schema's triggers keep the
        counts); the FastAPI peer: its own `load-messages` subcommand. Not
        through the protocol."""
        if self.kind == "peer":
            self._run("load-messages", "--db", str(self.db_path),
                      "--session-ids", f"{first}-{last}", "--per-session", str(per_room))
            return
        db = sqlite3.connect(self.db_path)
        try:
            people = {sid: (member, trainer) for sid, trainer, member in db.execute(
                "SELECT id, trainer_id, member_id FROM pt_sessions WHERE id BETWEEN ? AND ?",
                (first, last))}
            total = per_room * len(people)
            first = datetime.now(timezone.utc) - timedelta(seconds=total)

            def rows():
                for k in range(per_room):
                    for n, (session_id, pair) in enumerate(people.items()):
                        moment = first + timedelta(seconds=k * len(people) + n + 1)
                        yield (session_id, pair[k % 2], "chat",
                               f"synthetic message {k} in pt_{session_id}", f"seed-{k}",
                               moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"))

            db.execute("PRAGMA cache_size=-262144")
            with db:
                db.executemany("INSERT INTO messages (session_id, user_id, type, content,"
                               " client_id, created_at) VALUES (?, ?, ?, ?, ?, ?)", rows())
        finally:
            db.close()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Reads the database file directly (after stop, or read-only while it runs)."""
        db = sqlite3.connect(self.db_path, timeout=10)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def start(self, timeout_s: float = 30) -> float:
        """Starts the server; returns ms from spawn to the first 200 from /healthz."""
        self.port = free_port()
        log = open(self.log_path, "ab")
        started = time.perf_counter()
        # Every generated client comes from 127.0.0.1: lift our per-address cap (SPEC 2).
        ours_only = ["--max-connections-per-ip", "1000000"] if self.kind == "ours" else []
        self.process = subprocess.Popen(
            [sys.executable, str(self.script), "--db", str(self.db_path), "--port", str(self.port),
             "--secret", self.secret, "--rate-limit", "0", "--no-demo", "--log-level", "warning",
             *ours_only],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
            preexec_fn=_server_preexec)
        log.close()
        Server.live.add(self)
        deadline = started + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.process.returncode}: "
                                   f"{self.log_tail()}")
            if self.healthy():
                return (time.perf_counter() - started) * 1000
            time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"{self.kind} did not answer /healthz within {timeout_s} s")

    def healthy(self) -> bool:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=1)
        try:
            connection.request("GET", "/distributor/healthz")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def _proc(self, name: str) -> str:
        return Path(f"/proc/{self.process.pid}/{name}").read_text()

    def rss_kib(self) -> int:
        for line in self._proc("status").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """user + system CPU seconds of the server process so far."""
        fields = self._proc("stat").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, grace_s: float = 10) -> None:
        """SIGTERM, then SIGKILL after grace_s (committed rows survive either)."""
        if self.process is None or self.exit_code is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            self.exit_code = self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait(timeout=10)
        Server.live.discard(self)

    def log_tail(self, chars: int = 800) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        return ""

    @classmethod
    def stop_all(cls) -> None:
        for server in list(cls.live):
            server.stop()


# ---------------------------------------------------------------- sockets ---
def client_session() -> aiohttp.ClientSession:
    # No connection cap: every WebSocket holds one (the default cap is 100).
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def read_until_history(ws, timeout_s: float = 30) -> dict:
    """Reads the handshake frames (welcome, presence) up to the history frame."""
    deadline = time.monotonic() + timeout_s
    for _ in range(100):
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"socket closed before history: {msg.type.name} {msg.data}")
        frame = loads(msg.data)
        if frame["type"] == "history":
            return frame
    raise ConnectionError("no history frame")


async def open_room(http: aiohttp.ClientSession, server: Server, room: int, user_id: str,
                    role: str, after: int | None = None, timeout_s: float = 30):
    """Connects to room pt_<room>; returns (ws, history frame)."""
    url = f"{server.ws_base}/pt_{room}" + (f"?after={after}" if after is not None else "")
    ws = await http.ws_connect(url, headers=auth(user_id, role, server.secret),
                               timeout=aiohttp.ClientWSTimeout(ws_close=5), max_msg_size=0)
    try:
        history = await read_until_history(ws, timeout_s)
    except BaseException:
        await ws.close()
        raise
    return ws, history


def chat_frame(content: str, client_id: str) -> str:
    return json.dumps({"type": "chat", "content": content, "client_id": client_id})


# ------------------------------------------------- the original closed loop ---
async def run_load(server: Server, rooms: int, messages: int, in_flight: int) -> dict:
    sent_at: dict[str, float] = {}
    ack_ms: list[float] = []
    delivery_ms: list[float] = []
    delivered = 0
    async with client_session() as session:
        trainer_sockets, member_sockets = [], []
        for n in range(1, rooms + 1):
            trainer_sockets.append((await open_room(session, server, n, f"t{n}", "trainer"))[0])
            member_sockets.append((await open_room(session, server, n, f"m{n}", "member"))[0])

        async def watch_trainer(ws, expected: int) -> None:
            nonlocal delivered
            seen = 0
            while seen < expected:
                frame = await ws.receive_json(timeout=30)
                if frame["type"] == "chat":
                    delivery_ms.append((time.perf_counter() - sent_at[frame["client_id"]]) * 1000)
                    delivered += 1
                    seen += 1

        async def send_all(ws, room_number: int) -> None:
            window = asyncio.Semaphore(in_flight)
            waiting: dict[str, asyncio.Future] = {}

            async def read_acks() -> None:
                while waiting:
                    frame = await ws.receive_json(timeout=30)
                    if frame["type"] == "ack":
                        ack_ms.append((time.perf_counter() - sent_at[frame["client_id"]]) * 1000)
                        waiting.pop(frame["client_id"]).set_result(None)
                        window.release()
                    elif frame["type"] == "error":
                        raise SystemExit(f"error frame: {frame}")

            reader = None
            for number in range(messages):
                await window.acquire()
                client_id = f"r{room_number}-{number}"
                waiting[client_id] = asyncio.get_running_loop().create_future()
                sent_at[client_id] = time.perf_counter()
                await ws.send_str(chat_frame(f"set {number} done", client_id))
                if reader is None or reader.done():
                    reader = asyncio.create_task(read_acks())
            await asyncio.gather(*waiting.values())
            if reader is not None:
                await reader

        started = time.perf_counter()
        await asyncio.gather(
            *(watch_trainer(ws, messages) for ws in trainer_sockets),
            *(send_all(ws, n) for n, ws in enumerate(member_sockets, start=1)))
        elapsed = time.perf_counter() - started
        for ws in trainer_sockets + member_sockets:
            await ws.close()
    total = rooms * messages
    return {"acked": len(ack_ms), "delivered": delivered, "expected": total,
            "seconds": elapsed, "acked_per_s": len(ack_ms) / elapsed,
            "ack_p50_ms": median(ack_ms), "ack_p99_ms": percentile(ack_ms, 0.99),
            "delivery_p50_ms": median(delivery_ms),
            "delivery_p99_ms": percentile(delivery_ms, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--messages", type=int, default=20, help="per member")
    parser.add_argument("--in-flight", type=int, default=1, help="unacked messages per member")
    parser.add_argument("--server", choices=sorted(SCRIPTS), default="ours")
    args = parser.parse_args()
    raise_fd_limit()
    with tempfile.TemporaryDirectory() as workdir:
        server = Server(args.server, Path(workdir))
        server.import_gym(pairs_gym(args.rooms))
        server.start()
        try:
            result = asyncio.run(asyncio.wait_for(
                run_load(server, args.rooms, args.messages, args.in_flight), timeout=300))
        finally:
            server.stop()
    print(f"server={args.server} rooms={args.rooms} messages/member={args.messages} "
          f"in_flight={args.in_flight} cpus={os.cpu_count()}")
    for key, value in result.items():
        print(f"{key:>16}: {value:.1f}" if isinstance(value, float) else f"{key:>16}: {value}")
    assert result["acked"] == result["expected"] == result["delivered"], "lost messages"


if __name__ == "__main__":
    main()
