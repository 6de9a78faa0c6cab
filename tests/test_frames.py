"""The frames the server writes by hand (SPEC 5 on the wire).

A broadcast builds each frame's bytes once and writes them straight to every
peer's transport, past aiohttp's writer. That relies on two things aiohttp
does today, checked here so an aiohttp upgrade that changes them fails a test
instead of a user: its reader (and any other) takes our bytes as the frames
they mean, at every length encoding; and aiohttp writes each of its own
control frames (the close frame, pings, pongs) in one transport.write(), so
ours and its never interleave on the wire.
"""
from __future__ import annotations

import asyncio
import struct

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.http_websocket import WebSocketReader, WebSocketWriter
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

import distributor_chat as dc

# Each length encoding (RFC 6455 5.2) at its edges: 7-bit, 16-bit, 64-bit.
PAYLOAD_LENGTHS = [0, 1, 125, 126, 65_535, 65_536, 200_000]


def payload_of(length: int) -> bytes:
    """UTF-8 text of exactly ``length`` bytes, with multi-byte characters in it."""
    text = ("가나다 abc 💪 " * (length // 10 + 1)).encode()[:length].decode(errors="ignore")
    return (text + "x" * (length - len(text.encode()))).encode()


class ReadingProtocol:
    """What aiohttp's data queue asks of its protocol: whether it may pause."""

    _reading_paused = False

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False


@pytest.mark.parametrize("length", PAYLOAD_LENGTHS)
async def test_aiohttps_reader_reads_our_text_frames_byte_for_byte(length):
    payload = payload_of(length)
    assert len(payload) == length
    queue = WebSocketDataQueue(ReadingProtocol(), 2**16, loop=asyncio.get_running_loop())
    reader = WebSocketReader(queue, max_msg_size=0, compress=False, decode_text=True)
    data = dc.websocket_text_frame(payload)
    # Fed whole, and fed a byte at a time after the header: the same one message.
    reader.feed_data(data)
    message = await queue.read()
    assert (message.type, message.data) == (WSMsgType.TEXT, payload.decode())
    reader.feed_data(data[:3])
    for index in range(3, len(data), max(1, len(data) // 7)):
        reader.feed_data(data[index:index + max(1, len(data) // 7)])
    message = await queue.read()
    assert (message.type, message.data) == (WSMsgType.TEXT, payload.decode())


@pytest.mark.parametrize("length", PAYLOAD_LENGTHS)
def test_the_websockets_library_reads_our_text_frames_byte_for_byte(length):
    payload = payload_of(length)
    frame = parse_with_websockets(dc.websocket_text_frame(payload))
    assert (frame.opcode, frame.fin, frame.rsv1, frame.rsv2, frame.rsv3) == (
        Opcode.TEXT, True, False, False, False)
    assert bytes(frame.data) == payload


def parse_with_websockets(data: bytes) -> Frame:
    stream = StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    parser = Frame.parse(stream.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        assert not stream.buffer, "bytes left over after the frame"
        return done.value
    raise AssertionError("the frame was incomplete")


def test_our_pings_and_pongs_are_the_control_frames_they_mean():
    ping = parse_with_websockets(dc.PING_WIRE_FRAME)
    assert (ping.opcode, ping.fin, bytes(ping.data)) == (Opcode.PING, True, b"")
    for payload in (b"", b"p1", b"x" * 125):
        pong = parse_with_websockets(dc.pong_wire_frame(payload))
        assert (pong.opcode, pong.fin, bytes(pong.data)) == (Opcode.PONG, True, payload)


def test_a_broadcast_frame_is_the_json_of_the_frame():
    frame = dc.typing_frame("pt_1", "m1")
    decoded = parse_with_websockets(dc.wire_frame(frame))
    assert bytes(decoded.data) == b'{"type":"typing","room_id":"pt_1","user_id":"m1"}'


class RecordingTransport:
    """Each write() aiohttp's writer makes, as one item."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False


class WritingProtocol:
    _paused = False


@pytest.mark.parametrize("opcode, payload", [
    (WSMsgType.PING, b""), (WSMsgType.PING, b"x" * 125), (WSMsgType.PONG, b"p"),
    (WSMsgType.PONG, b"y" * 125)], ids=["ping", "long ping", "pong", "long pong"])
async def test_aiohttp_writes_each_control_frame_in_one_call(opcode, payload):
    transport = RecordingTransport()
    writer = WebSocketWriter(WritingProtocol(), transport)
    await writer.send_frame(payload, opcode)
    assert len(transport.writes) == 1
    assert transport.writes[0] == bytes((0x80 | opcode, len(payload))) + payload


async def test_aiohttp_writes_its_close_frame_in_one_call():
    transport = RecordingTransport()
    writer = WebSocketWriter(WritingProtocol(), transport)
    reason = dc.close_reason("x" * 200)
    await writer.close(dc.CLOSE_UNAUTHORIZED, reason)
    assert len(transport.writes) == 1
    frame = parse_with_websockets(transport.writes[0])
    assert frame.opcode == Opcode.CLOSE
    assert struct.unpack("!H", bytes(frame.data[:2]))[0] == dc.CLOSE_UNAUTHORIZED
    assert bytes(frame.data[2:]) == reason


def test_a_close_reason_is_whole_characters_within_123_bytes():
    for reason in ("no such room: " + "가" * 100, "x" * 300, "ok"):
        data = dc.close_reason(reason)
        assert len(data) <= 123 and reason.startswith(data.decode())
