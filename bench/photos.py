"""Photos under load: what a 10 MB upload costs its sender, the other rooms and memory.

    python bench/photos.py [--seconds 15] [--uploads 100]

Starts distributor_chat.py (durable, `synchronous = FULL`, `--rate-limit 0`) on a
fresh database with 24 rooms and measures, on the same CPUs as the server (the chat
from this process, the 4 uploaders from a second one, so that sending 40 MB does
not delay the reading of acks here):

1. time to 201 for one upload of a 10 MB JPEG (camera noise: the worst case for the
   decoder; 3600 x 2400, just under the 10 MiB limit), alone, median of 5;
2. the ack latency of chat in 20 other rooms (each member sends 10 messages a
   second, open loop: 200 msgs/s offered), first alone, then while 4 members
   upload that photo in a loop, each one after the other;
3. the server's resident memory at rest, and after 100 such uploads.

Needs Pillow (requirements.txt) to make the photo.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from load import (Server, auth, client_session, median, open_room, pairs_gym, percentile,
                  self_cpu_seconds)

UPLOAD_ROOMS = (1, 2, 3, 4)
CHAT_ROOMS = range(5, 25)
CHAT_RATE_PER_ROOM = 10.0  # messages a second from each room's member
LIMIT_BYTES = 10 * 1024 * 1024


def camera_noise_jpeg(width: int = 3600, height: int = 2400) -> bytes:
    """A JPEG of random pixels just under the upload limit (with the form's bytes)."""
    from PIL import Image
    picture = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    for quality in range(95, 50, -3):
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=quality)
        if len(out.getvalue()) < LIMIT_BYTES - 4096:
            return out.getvalue()
    raise RuntimeError("could not make a photo under the limit")


async def upload(http: aiohttp.ClientSession, server: Server, room: int, photo: bytes) -> float:
    """Seconds from the request's start to its 201."""
    form = aiohttp.FormData()
    form.add_field("photo", photo, filename="IMG_0001.JPG", content_type="image/jpeg")
    started = time.perf_counter()
    async with http.post(f"{server.http_base}/chat/rooms/pt_{room}/photos", data=form,
                         headers=auth(f"m{room}", "member", server.secret)) as response:
        body = await response.read()
        if response.status != 201:
            raise RuntimeError(f"upload answered {response.status}: {body[:200]!r}")
    return time.perf_counter() - started


async def chat_for(http: aiohttp.ClientSession, server: Server, seconds: float) -> list[float]:
    """Open-loop chat in CHAT_ROOMS for ``seconds``; every ack's latency in ms."""
    sockets = []
    for room in CHAT_ROOMS:
        trainer_ws, _ = await open_room(http, server, room, f"t{room}", "trainer")
        member_ws, _ = await open_room(http, server, room, f"m{room}", "member")
        sockets.append((room, member_ws, trainer_ws))
    sent_at: dict[str, float] = {}
    ack_ms: list[float] = []

    async def read_acks(ws) -> None:
        async for message in ws:
            frame = message.json()
            if frame["type"] == "ack":
                ack_ms.append((time.perf_counter() - sent_at.pop(frame["client_id"])) * 1000)

    async def send(room: int, ws) -> None:
        interval = 1 / CHAT_RATE_PER_ROOM
        next_at = time.perf_counter() + interval * room / len(CHAT_ROOMS)  # spread the rooms out
        deadline = time.perf_counter() + seconds
        count = 0
        while next_at < deadline:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            client_id = f"r{room}-{count}"
            sent_at[client_id] = time.perf_counter()
            await ws.send_str(f'{{"type":"chat","content":"set {count} done","client_id":"{client_id}"}}')
            count += 1
            next_at += interval

    readers = [asyncio.create_task(read_acks(member_ws)) for _, member_ws, _ in sockets]
    drains = [asyncio.create_task(trainer_ws.receive()) for *_, trainer_ws in sockets]
    await asyncio.gather(*(send(room, member_ws) for room, member_ws, _ in sockets))
    deadline = time.perf_counter() + 10
    while sent_at and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    for ws in [ws for _, member_ws, trainer_ws in sockets for ws in (member_ws, trainer_ws)]:
        await ws.close()
    for task in readers + drains:
        task.cancel()
    await asyncio.gather(*readers, *drains, return_exceptions=True)
    if sent_at:
        raise RuntimeError(f"{len(sent_at)} messages never acked")
    return ack_ms


def upload_loop(port: int, secret: str, photo: bytes, stop, results) -> None:
    """In a process of its own: the 4 uploaders, each uploading again as soon as
    its last upload got its 201, until ``stop`` is set; their times to 201."""
    server = Server.__new__(Server)
    server.port, server.secret = port, secret

    async def uploader(http, room: int, times: list[float]) -> None:
        while not stop.is_set():
            times.append(await upload(http, server, room, photo))

    async def main() -> list[float]:
        times: list[float] = []
        async with client_session() as http:
            await asyncio.gather(*(uploader(http, room, times) for room in UPLOAD_ROOMS))
        return times
    results.put(asyncio.run(main()))


async def run(seconds: float, upload_count: int) -> None:
    photo = camera_noise_jpeg()
    workdir = Path(tempfile.mkdtemp(prefix="distributor-photos-bench-"))
    server = Server("ours", workdir)
    server.import_gym(pairs_gym(max(CHAT_ROOMS)))
    server.start()
    cpu_started, wall_started = self_cpu_seconds(), time.perf_counter()
    try:
        await asyncio.sleep(1)
        rest_kib = server.rss_kib()
        async with client_session() as http:
            alone = [await upload(http, server, 1, photo) for _ in range(5)]
            baseline = await chat_for(http, server, seconds)
            context = multiprocessing.get_context("spawn")
            stop, results = context.Event(), context.Queue()
            uploaders = context.Process(target=upload_loop,
                                        args=(server.port, server.secret, photo, stop, results))
            uploaders.start()
            try:
                await asyncio.sleep(3)  # the process started, every uploader under way
                during = await chat_for(http, server, seconds)
            finally:
                stop.set()
            upload_times = await asyncio.to_thread(results.get, timeout=60)
            await asyncio.to_thread(uploaders.join)
            uploaded = len(alone) + len(upload_times)
            while uploaded < upload_count:
                await asyncio.gather(*(upload(http, server, room, photo)
                                       for room in UPLOAD_ROOMS[:min(4, upload_count - uploaded)]))
                uploaded = min(upload_count, uploaded + 4)
        await asyncio.sleep(2)
        after_kib = server.rss_kib()
    finally:
        server.stop()
    generator_share = (self_cpu_seconds() - cpu_started) / (time.perf_counter() - wall_started)

    def ms(values: list[float], share: float) -> str:
        return f"{percentile(values, share):.1f}"
    print(f"photo: {len(photo) / 1e6:.1f} MB JPEG, 3600 x 2400 (kept as 2048 x 1365)")
    print(f"upload alone, time to 201: median {median(alone) * 1000:.0f} ms "
          f"(of {len(alone)}: {', '.join(f'{t * 1000:.0f}' for t in alone)})")
    print(f"other rooms' chat, {len(CHAT_ROOMS)} rooms x {CHAT_RATE_PER_ROOM:.0f} msgs/s offered:")
    print(f"  alone:                 ack p50 {ms(baseline, 0.5)} ms, p99 {ms(baseline, 0.99)} ms "
          f"({len(baseline)} acks)")
    print(f"  during 4 uploaders:    ack p50 {ms(during, 0.5)} ms, p99 {ms(during, 0.99)} ms "
          f"({len(during)} acks; {len(upload_times)} uploads meanwhile, "
          f"time to 201 median {median(upload_times) * 1000:.0f} ms)")
    print(f"server RSS: at rest {rest_kib / 1024:.1f} MiB, after {uploaded} uploads "
          f"{after_kib / 1024:.1f} MiB")
    print(f"generator: 2 processes (chat; uploads), the chat one {generator_share:.0%} of one "
          f"core on average; {os.cpu_count()} CPUs shared with the server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="each chat phase's length")
    parser.add_argument("--uploads", type=int, default=100, help="uploads before the RSS reading")
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.uploads))


if __name__ == "__main__":
    sys.exit(main())
