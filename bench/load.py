"""Load generator: Distributor Chat over its public protocol, from outside the process.

Starts `distributor_chat.py` on a fresh database in a temporary directory, seeds
rooms with the `import` subcommand, mints tokens with the `--secret` it gave the
server, connects both participants of every room, and has every member send
messages as fast as acks come back (closed loop, a fixed number in flight each).
Prints acknowledged messages a second, ack latency and send-to-delivery latency.

    python bench/load.py [--rooms 100] [--messages 20] [--in-flight 1]

Bounded in count and time; talks only to 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def token(user_id: str, role: str) -> str:
    return jwt.encode({"sub": user_id, "role": role, "exp": int(time.time()) + 3600},
                      SECRET, algorithm="HS256")


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def seed(workdir: Path, db_path: Path, rooms: int) -> None:
    # One trainer per room: a user may hold at most 20 sockets.
    users = [{"id": f"t{n}", "name": f"Coach {n}", "role": "trainer"} for n in range(1, rooms + 1)]
    users += [{"id": f"m{n}", "name": f"Member {n}", "role": "member"} for n in range(1, rooms + 1)]
    sessions = [{"id": n, "trainer": f"t{n}", "member": f"m{n}"} for n in range(1, rooms + 1)]
    import_file = workdir / "gym.json"
    import_file.write_text(json.dumps({"users": users, "sessions": sessions}))
    subprocess.run([sys.executable, str(ROOT / "distributor_chat.py"), "import", str(import_file),
                    "--db", str(db_path)], check=True, capture_output=True)


def start_server(db_path: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "distributor_chat.py"), "--db", str(db_path), "--port", str(port),
         "--secret", SECRET, "--rate-limit", "0", "--no-demo", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("server did not start")


async def drain_until_history(ws) -> None:
    while (await ws.receive_json(timeout=10))["type"] != "history":
        pass


async def run_load(port: int, rooms: int, messages: int, in_flight: int) -> dict:
    base = f"ws://127.0.0.1:{port}/distributor/ws/chat"
    sent_at: dict[str, float] = {}
    ack_ms: list[float] = []
    delivery_ms: list[float] = []
    delivered = 0
    # No connection cap: every WebSocket holds one (the default cap is 100).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        trainer_sockets, member_sockets = [], []
        for n in range(1, rooms + 1):
            trainer_sockets.append(await session.ws_connect(
                f"{base}/pt_{n}", headers={"Authorization": f"Bearer {token(f't{n}', 'trainer')}"}))
            member_sockets.append(await session.ws_connect(
                f"{base}/pt_{n}", headers={"Authorization": f"Bearer {token(f'm{n}', 'member')}"}))
        await asyncio.gather(*(drain_until_history(ws) for ws in trainer_sockets + member_sockets))

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
                await ws.send_str(json.dumps({"type": "chat", "content": f"set {number} done",
                                              "client_id": client_id}))
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
            "ack_p50_ms": statistics.median(ack_ms), "ack_p99_ms": percentile(ack_ms, 0.99),
            "delivery_p50_ms": statistics.median(delivery_ms),
            "delivery_p99_ms": percentile(delivery_ms, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--messages", type=int, default=20, help="per member")
    parser.add_argument("--in-flight", type=int, default=1, help="unacked messages per member")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        db_path = Path(workdir) / "bench.db"
        seed(Path(workdir), db_path, args.rooms)
        port = free_port()
        server = start_server(db_path, port)
        try:
            result = asyncio.run(asyncio.wait_for(
                run_load(port, args.rooms, args.messages, args.in_flight), timeout=300))
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(f"rooms={args.rooms} messages/member={args.messages} in_flight={args.in_flight} "
          f"cpus={os.cpu_count()}")
    for key, value in result.items():
        print(f"{key:>16}: {value:.1f}" if isinstance(value, float) else f"{key:>16}: {value}")
    assert result["acked"] == result["expected"] == result["delivered"], "lost messages"


if __name__ == "__main__":
    main()
