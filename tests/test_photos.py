"""Photos in the thread (SPEC section 9): upload, what the server keeps of an
image and what it refuses, who may see it, sending it as a message, clean-up of
photos never sent, and what backup and check say. Real app, real sockets, a
fresh SQLite file; every image is made here, with Pillow or by hand."""
from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import secrets
import shutil
import sqlite3
import struct
import time
import zipfile
import zlib
from pathlib import Path

import aiohttp
import pytest
from PIL import ExifTags, Image, ImageCms, ImageDraw, PngImagePlugin

import distributor_chat as dc
from conftest import (ack_of, auth, make_settings, make_token, messages_over_http, open_room,
                      receive_until, run_cli, send_chat, stored_rows)
from test_operations import make_v0_database

PHOTOS_PATH = "/distributor/chat/rooms/{}/photos"
PHOTO_PATH = "/distributor/chat/photos/{}"
THUMB_PATH = "/distributor/chat/photos/{}/thumb"
ROOMS = "/distributor/chat/rooms"
JSON = {"Accept": "application/json"}
CACHE_FOREVER = "private, max-age=31536000, immutable"
MESSAGE_FIELDS = {"type", "id", "room_id", "user_id", "sender_name", "content", "created_at",
                  "client_id", "photo"}
PHOTO_ID = re.compile(r"[A-Za-z0-9_-]{16,}")
HAS_PROC = Path("/proc/self/status").exists()
needs_proc = pytest.mark.skipif(not HAS_PROC, reason="reads /proc (Linux)")

# Colours far apart, so a corner is told by its nearest one even after JPEG.
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30),
           "grey": (128, 128, 128), "white": (255, 255, 255)}
GPS = {1: "N", 2: (37.0, 33.0, 59.0), 3: "E", 4: (126.0, 58.0, 41.0)}  # a gym in Seoul
COMMENT = b"taken at member-home-address 12"
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
       b'02/22-rdf-syntax-ns#"><rdf:Description>private-xmp-note</rdf:Description>'
       b"</rdf:RDF></x:xmpmeta>")


# ------------------------------------------------------------- images ---


def picture(width: int, height: int, corners: dict[str, str] | None = None, *,
            mode: str = "RGB", background: str = "grey") -> Image.Image:
    """A grey picture with a coloured block (a third of each side) in some corners."""
    fill = COLOURS[background] + ((255,) if mode == "RGBA" else ())
    image = Image.new(mode, (width, height), fill)
    draw = ImageDraw.Draw(image)
    block_w, block_h = width // 3, height // 3
    origins = {"top_left": (0, 0), "top_right": (width - block_w, 0),
               "bottom_left": (0, height - block_h),
               "bottom_right": (width - block_w, height - block_h)}
    for corner, colour in (corners or {}).items():
        x, y = origins[corner]
        draw.rectangle((x, y, x + block_w - 1, y + block_h - 1),
                       fill=COLOURS[colour] + ((255,) if mode == "RGBA" else ()))
    return image


def encode(image: Image.Image, image_format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def jpeg(width: int = 320, height: int = 240, corners: dict[str, str] | None = None,
         **params) -> bytes:
    return encode(picture(width, height, corners), "JPEG", quality=90, **params)


def nearest_colour(pixel) -> str:
    red, green, blue = pixel[:3]
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in
                                              zip(COLOURS[name], (red, green, blue))))


def corner_colours(image: Image.Image) -> dict[str, str]:
    """The colour name in the middle of each corner block."""
    image = image.convert("RGB")
    width, height = image.size
    near_x, far_x = width // 6, width - 1 - width // 6
    near_y, far_y = height // 6, height - 1 - height // 6
    points = {"top_left": (near_x, near_y), "top_right": (far_x, near_y),
              "bottom_left": (near_x, far_y), "bottom_right": (far_x, far_y)}
    return {corner: nearest_colour(image.getpixel(point)) for corner, point in points.items()}


def exif_with_gps(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneMaker"
    exif[ExifTags.Base.Model] = "PhoneModel-X1"
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps.update(GPS)
    return exif


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def handmade_png(width: int, height: int, *, bit_depth: int, colour_type: int,
                 raw: bytes) -> bytes:
    """A PNG whose header says width x height and whose one IDAT holds ``raw``
    (the filtered scanlines, as many as given) compressed."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b""))


def png_bomb() -> bytes:
    """About 17 KB that declares 20,000 x 20,000 RGBA (1.6 GB decoded)."""
    row = 1 + 20_000 * 4
    return handmade_png(20_000, 20_000, bit_depth=8, colour_type=6, raw=bytes(row * 200))


def png_42_megapixels() -> bytes:
    """A whole, valid 7000 x 6000 black-and-white PNG of a few KB: over 40 megapixels."""
    return handmade_png(7000, 6000, bit_depth=1, colour_type=0, raw=bytes((1 + 875) * 6000))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header is changed to claim width x height."""
    data = bytearray(jpeg(64, 48))
    start = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, start + 5, height, width)
    return bytes(data)


def zip_file() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.jpg", jpeg())
    return buffer.getvalue()


SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
       b'<script>alert(document.cookie)</script><rect width="100" height="100" fill="red"/></svg>')
HTML = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"


# ------------------------------------------------------------ helpers ---


async def upload(client, data: bytes, *, room_id: str = "pt_1", user_id: str | None = "m1",
                 filename: str = "photo.jpg", content_type: str = "image/jpeg",
                 headers: dict | None = None, base_url: str = "") -> aiohttp.ClientResponse:
    """POST one file field ``photo``; ``client`` is a test client (paths) or a
    ClientSession with ``base_url``. The answer's body is read before returning."""
    form = aiohttp.FormData()
    form.add_field("photo", data, filename=filename, content_type=content_type)
    request_headers = {**(auth(user_id) if user_id else {}), **(headers or {})}
    response = await client.post(base_url + PHOTOS_PATH.format(room_id), data=form,
                                 headers=request_headers)
    await response.read()
    return response


async def uploaded(client, data: bytes, **kwargs) -> dict:
    """Upload that must succeed: its 201 body."""
    response = await upload(client, data, **kwargs)
    assert response.status == 201, await response.text()
    body = await response.json()
    assert set(body) == {"photo_id", "width", "height"}, body
    assert isinstance(body["photo_id"], str) and PHOTO_ID.fullmatch(body["photo_id"]), body
    assert isinstance(body["width"], int) and isinstance(body["height"], int), body
    return body


async def assert_refused(response: aiohttp.ClientResponse, status: int, code: str) -> None:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


async def get_photo(client, photo_id: str, user_id: str | None = "m1", *, thumb: bool = False,
                    headers: dict | None = None) -> aiohttp.ClientResponse:
    path = (THUMB_PATH if thumb else PHOTO_PATH).format(photo_id)
    request_headers = {**JSON, **(auth(user_id) if user_id else {}), **(headers or {})}
    response = await client.get(path, headers=request_headers)
    await response.read()
    return response


async def served(client, photo_id: str, user_id: str = "m1", *,
                 thumb: bool = False) -> tuple[Image.Image, bytes, str]:
    """The image as served (decoded, raw bytes, Content-Type), its headers checked."""
    response = await get_photo(client, photo_id, user_id, thumb=thumb)
    assert response.status == 200, await response.text()
    content_type = response.headers["Content-Type"]
    assert content_type in ("image/jpeg", "image/png"), content_type
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == CACHE_FOREVER
    data = await response.read()
    image = Image.open(io.BytesIO(data))
    assert image.format == {"image/jpeg": "JPEG", "image/png": "PNG"}[content_type], image.format
    image.load()
    return image, data, content_type


def photo_count(db_path: Path) -> int:
    """Rows in the photos table, read as the file holds them."""
    uri = f"{Path(db_path).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        return db.execute("SELECT count(*) FROM photos").fetchone()[0]


def files_beside(db_path: Path) -> set[str]:
    """What is in the database's directory besides the database's own files."""
    own = {db_path.name, f"{db_path.name}-wal", f"{db_path.name}-shm"}
    return {path.name for path in db_path.parent.iterdir()} - own


async def send_photo(ws, photo_id, client_id: str, content: str = "") -> None:
    await send_chat(ws, content, client_id, photo_id=photo_id)


async def message_frame(ws, client_id: str) -> dict:
    return await receive_until(ws, lambda f: f["type"] == "chat" and f["client_id"] == client_id)


async def ack_and_frame(ws, client_id: str) -> tuple[dict, dict]:
    """The sender's ack and its own copy of the message, in whichever order they come."""
    found: dict[str, dict] = {}

    def collect(frame: dict) -> bool:
        if frame.get("client_id") == client_id and frame["type"] in ("ack", "chat"):
            found[frame["type"]] = frame
        return len(found) == 2

    await receive_until(ws, collect)
    return found["ack"], found["chat"]


async def refusal(ws, client_id: str) -> str:
    """The code of the error that answers ``client_id`` (an ack instead fails)."""
    frame = await receive_until(
        ws, lambda f: f["type"] in ("ack", "error") and f.get("client_id") == client_id)
    assert frame["type"] == "error", frame
    assert isinstance(frame["message"], str) and frame["message"], frame
    return frame["code"]


def close_to(actual: tuple[int, int], expected: tuple[int, int]) -> bool:
    """Within a pixel of rounding on the short side; the long side exact."""
    return (all(abs(a - e) <= 1 for a, e in zip(actual, expected))
            and max(actual) == max(expected))


async def room_list(client, user_id: str) -> dict[str, dict]:
    response = await client.get(ROOMS, headers={**JSON, **auth(user_id)})
    assert response.status == 200, await response.text()
    return {room["id"]: room for room in (await response.json())["chat_rooms"]}


def status_kib(pid: int, field: str) -> int:
    """A figure of /proc/<pid>/status in KiB (VmRSS now, VmHWM the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def assert_no_metadata(image: Image.Image, data: bytes) -> None:
    assert dict(image.getexif()) == {}, dict(image.getexif())
    for key in ("exif", "comment", "xmp", "icc_profile", "XML:com.adobe.xmp", "Comment",
                "Description"):
        assert key not in image.info, (key, image.info.get(key))
    for needle in (COMMENT, b"member-home-address", b"private-xmp-note", b"PhoneMaker",
                   b"PhoneModel", b"Exif", b"ICC_PROFILE", b"http://ns.adobe.com/xap/1.0/",
                   b"eXIf", b"iCCP", b"tEXt", b"iTXt", b"zTXt"):
        assert needle not in data, needle


# ----------------------------------------------------------- upload ---


async def test_a_photo_is_201_and_served_to_both_participants_from_its_upload_on(client,
                                                                                  settings):
    body = await uploaded(client, jpeg(320, 240, {"top_left": "red"}))
    assert (body["width"], body["height"]) == (320, 240)
    assert photo_count(settings.db_path) == 1
    for user_id in ("m1", "t1"):  # the trainer sees it before it is sent
        image, _, content_type = await served(client, body["photo_id"], user_id)
        assert (content_type, image.size) == ("image/jpeg", (320, 240))
        assert corner_colours(image) == {"top_left": "red", "top_right": "grey",
                                         "bottom_left": "grey", "bottom_right": "grey"}
        thumb, _, thumb_type = await served(client, body["photo_id"], user_id, thumb=True)
        assert (thumb_type, thumb.size) == ("image/jpeg", (320, 240))  # under 480: its own size
    # An <img> on our page sends the sign-in cookie, not a header.
    response = await client.get(PHOTO_PATH.format(body["photo_id"]),
                                headers={"Cookie": f"distributor_token={make_token('t1')}"})
    assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"


async def test_photo_ids_are_random_url_safe_and_unrelated(client):
    photo_ids = [(await uploaded(client, jpeg(40, 30)))["photo_id"] for _ in range(6)]
    assert len(set(photo_ids)) == 6
    assert not any(photo_id.isdigit() for photo_id in photo_ids)
    assert len({photo_id[:8] for photo_id in photo_ids}) == 6  # no shared counter-like prefix


@pytest.mark.parametrize("kind, with_profile", [
    ("jpeg", False), ("jpeg", True), ("png", False), ("png", True), ("webp", False),
    ("webp", True),
], ids=["jpeg", "jpeg with a colour profile", "png", "png with a colour profile", "webp",
        "webp with a colour profile"])
async def test_the_served_photo_and_thumb_carry_no_metadata(client, kind, with_profile):
    """GPS, camera, comment, XMP and colour profile: none of it leaves the server
    (with and without a profile: converting colours must not be what drops the rest)."""
    profile = {"icc_profile": srgb_profile()} if with_profile else {}
    if kind == "jpeg":
        data = jpeg(600, 400, {"top_left": "red"}, exif=exif_with_gps(), comment=COMMENT,
                    xmp=XMP, **profile)
        expected_type = "image/jpeg"
    elif kind == "png":  # with transparency, so it stays a PNG
        image = picture(600, 400, {"top_left": "red"}, mode="RGBA")
        image.putpixel((300, 200), (0, 0, 0, 0))
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", COMMENT.decode())
        info.add_itxt("XML:com.adobe.xmp", XMP.decode())
        data = encode(image, "PNG", pnginfo=info, exif=exif_with_gps(), **profile)
        expected_type = "image/png"
    else:
        data = encode(picture(600, 400, {"top_left": "red"}), "WEBP", quality=90,
                      exif=exif_with_gps(), xmp=XMP, **profile)
        expected_type = "image/jpeg"
    original = Image.open(io.BytesIO(data))
    assert original.getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the upload does carry GPS
    body = await uploaded(client, data, filename=f"photo.{kind}", content_type=f"image/{kind}")
    assert (body["width"], body["height"]) == (600, 400)
    for thumb in (False, True):
        image, raw, content_type = await served(client, body["photo_id"], thumb=thumb)
        assert content_type == expected_type, (thumb, content_type)
        assert image.size == ((480, 320) if thumb else (600, 400))
        assert_no_metadata(image, raw)


async def test_a_phone_photo_with_exif_orientation_6_comes_back_upright(client):
    """Stored 400x300 lying on its side; shown upright it is 300x400 and the
    stored top-left corner is at the top right (a quarter turn clockwise)."""
    data = jpeg(400, 300, {"top_left": "red", "top_right": "blue"},
                exif=exif_with_gps(orientation=6))
    assert Image.open(io.BytesIO(data)).size == (400, 300)
    body = await uploaded(client, data)
    assert (body["width"], body["height"]) == (300, 400)
    upright = {"top_left": "grey", "top_right": "red", "bottom_left": "grey",
               "bottom_right": "blue"}
    for thumb in (False, True):
        image, raw, _ = await served(client, body["photo_id"], thumb=thumb)
        assert image.size == (300, 400), thumb
        assert corner_colours(image) == upright, thumb
        assert_no_metadata(image, raw)  # no orientation tag left to turn it twice


@pytest.mark.parametrize("kind", ["png", "webp", "gif"])
async def test_png_webp_and_gif_are_taken_with_their_sizes(client, kind):
    corners = {"top_left": "red", "bottom_right": "green"}
    if kind == "gif":  # animated: the first frame is the photo
        first = picture(360, 270, corners)
        second = Image.new("RGB", (360, 270), COLOURS["blue"])
        data = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
        assert Image.open(io.BytesIO(data)).n_frames == 2
    elif kind == "png":
        data = encode(picture(360, 270, corners), "PNG")
    else:
        data = encode(picture(360, 270, corners), "WEBP", lossless=True)
    body = await uploaded(client, data, filename=f"p.{kind}", content_type=f"image/{kind}")
    assert (body["width"], body["height"]) == (360, 270)
    image, _, content_type = await served(client, body["photo_id"])
    assert (content_type, image.size) == ("image/jpeg", (360, 270))  # opaque: JPEG
    assert corner_colours(image) == {"top_left": "red", "top_right": "grey",
                                     "bottom_left": "grey", "bottom_right": "green"}


async def test_a_png_with_transparency_stays_transparent(client):
    image = picture(300, 200, {"top_left": "red"}, mode="RGBA")
    ImageDraw.Draw(image).rectangle((200, 100, 299, 199), fill=(0, 0, 0, 0))
    body = await uploaded(client, encode(image, "PNG"), filename="sticker.png",
                          content_type="image/png")
    for thumb in (False, True):
        served_image, _, content_type = await served(client, body["photo_id"], thumb=thumb)
        assert (content_type, served_image.size) == ("image/png", (300, 200))
        rgba = served_image.convert("RGBA")
        assert rgba.getpixel((250, 150))[3] == 0  # still see-through
        assert rgba.getpixel((20, 20)) == COLOURS["red"] + (255,)


@pytest.mark.parametrize("size, orientation, photo_size, thumb_size", [
    ((3000, 1000), None, (2048, 683), (480, 160)),
    ((1000, 3000), None, (683, 2048), (160, 480)),
    ((2048, 1536), None, (2048, 1536), (480, 360)),
    ((3000, 1000), 6, (683, 2048), (160, 480)),  # turned upright first, then scaled
    ((300, 200), None, (300, 200), (300, 200)),
], ids=["wide", "tall", "exactly 2048", "wide on its side", "small"])
async def test_the_long_side_is_scaled_to_2048_and_the_thumbs_to_480(client, size, orientation,
                                                                    photo_size, thumb_size):
    params = {"exif": exif_with_gps(orientation)} if orientation else {}
    body = await uploaded(client, jpeg(*size, {"top_left": "red"}, **params))

    assert close_to((body["width"], body["height"]), photo_size), body
    image, _, _ = await served(client, body["photo_id"])
    assert image.size == (body["width"], body["height"])
    thumb, _, _ = await served(client, body["photo_id"], thumb=True)
    assert close_to(thumb.size, thumb_size), thumb.size
    expected_corner = "top_right" if orientation == 6 else "top_left"
    assert corner_colours(image)[expected_corner] == "red"
    assert corner_colours(thumb)[expected_corner] == "red"


async def test_the_name_and_content_type_of_an_upload_do_not_matter(client):
    body = await uploaded(client, encode(picture(120, 80), "PNG"), filename="notes.txt",
                          content_type="text/plain")
    assert (body["width"], body["height"]) == (120, 80)
    body = await uploaded(client, jpeg(90, 60), filename="",
                          content_type="application/octet-stream")
    assert (body["width"], body["height"]) == (90, 60)


NOT_IMAGES = {
    "html named .jpg": (HTML, "holiday.jpg", "image/jpeg"),
    "truncated jpeg": (encode(Image.frombytes("RGB", (400, 300), os.urandom(400 * 300 * 3)),
                              "JPEG", quality=95)[:20_000], "cut.jpg", "image/jpeg"),
    "corrupt png": (encode(picture(200, 100), "PNG")[:60] + b"\x00" * 200, "bad.png", "image/png"),
    "zip": (zip_file(), "photos.jpg", "image/jpeg"),
    "svg": (SVG, "drawing.svg", "image/svg+xml"),
    "svg named .png": (SVG, "drawing.png", "image/png"),
    "bmp": (encode(picture(50, 40), "BMP"), "old.bmp", "image/bmp"),
    "tiff": (encode(picture(50, 40), "TIFF"), "scan.tif", "image/tiff"),
    "empty": (b"", "nothing.jpg", "image/jpeg"),
}


@pytest.mark.parametrize("data, filename, content_type", NOT_IMAGES.values(), ids=NOT_IMAGES.keys())
async def test_anything_but_a_whole_jpeg_png_webp_or_gif_is_415(client, settings, data, filename,
                                                                 content_type):
    response = await upload(client, data, filename=filename, content_type=content_type)
    await assert_refused(response, 415, "unsupported_media")
    assert photo_count(settings.db_path) == 0
    assert files_beside(settings.db_path) == set()


@needs_proc
async def test_bombs_and_photos_over_40_megapixels_are_400_and_the_server_does_not_grow(
        server_process):
    """A few KB that would decode to gigabytes are refused from their header."""
    server = server_process("--log-level", "warning")
    pid = server.process.pid
    bombs = {"png 20000x20000": png_bomb(), "png 7000x6000, whole": png_42_megapixels(),
             "jpeg claiming 30000x30000": jpeg_declaring(30_000, 30_000)}
    assert all(len(data) < 64 * 1024 for data in bombs.values())
    async with aiohttp.ClientSession() as http:
        # Warm up: the image code is loaded and has run once before the baseline.
        await uploaded(http, jpeg(64, 48), base_url=server.base_url)
        rss_before_kib = status_kib(pid, "VmRSS")
        for name, data in bombs.items():
            response = await upload(http, data, base_url=server.base_url,
                                    filename="photo.png", content_type="image/png")
            assert response.status == 400, (name, response.status)
            await assert_refused(response, 400, "bad_image")
        peak_rise_mib = (status_kib(pid, "VmHWM") - rss_before_kib) / 1024
        assert server.process.poll() is None
        await uploaded(http, jpeg(64, 48), base_url=server.base_url)  # still taking photos
    print(f"\n{len(bombs)} bombs refused; server peak RSS rise {peak_rise_mib:.1f} MiB")
    assert peak_rise_mib < 50, peak_rise_mib
    assert photo_count(server.db_path) == 2


async def test_an_upload_over_10_mib_is_413_and_one_just_under_is_taken(client, settings):
    response = await upload(client, os.urandom(11 * 2**20), filename="huge.jpg")
    await assert_refused(response, 413, "too_large")
    assert photo_count(settings.db_path) == 0
    assert files_beside(settings.db_path) == set()
    # 9.9 MB of noise as a PNG (it does not compress): under the limit, taken.
    noise = Image.frombytes("RGB", (3000, 1100), os.urandom(3000 * 1100 * 3))
    data = encode(noise, "PNG", compress_level=0)
    assert 9_900_000 < len(data) < 10 * 2**20 - 4096
    body = await uploaded(client, data, filename="noise.png", content_type="image/png")
    assert close_to((body["width"], body["height"]), (2048, 751)), body
    assert photo_count(settings.db_path) == 1


async def test_max_photo_mb_sets_the_limit(server_process):
    server = server_process("--log-level", "warning", "--max-photo-mb", "1")
    noise = encode(Image.frombytes("RGB", (700, 600), os.urandom(700 * 600 * 3)), "PNG",
                   compress_level=0)
    assert 2**20 < len(noise) < 2 * 2**20
    async with aiohttp.ClientSession() as http:
        response = await upload(http, noise, base_url=server.base_url, content_type="image/png")
        await assert_refused(response, 413, "too_large")
        await uploaded(http, jpeg(640, 480), base_url=server.base_url)
    assert photo_count(server.db_path) == 1


@pytest.mark.parametrize("room_id, user_id, status, code", [
    ("pt_1", None, 401, "unauthorized"),
    ("pt_1", "m2", 403, "forbidden"),   # a member of the same trainer's other room
    ("pt_1", "t2", 403, "forbidden"),   # another trainer
    ("pt_3", "m1", 403, "forbidden"),
    ("pt_99", "m1", 404, "not_found"),
    ("pt_abc", "m1", 404, "not_found"),
])
async def test_only_the_rooms_participants_may_upload(client, settings, room_id, user_id, status,
                                                      code):
    response = await upload(client, jpeg(), room_id=room_id, user_id=user_id)
    await assert_refused(response, status, code)
    assert photo_count(settings.db_path) == 0
    assert files_beside(settings.db_path) == set()


async def test_an_upload_from_another_site_is_403_and_one_from_our_page_is_taken(client, settings):
    own_origin = str(client.make_url("/")).rstrip("/")
    cookie = {"Cookie": f"distributor_token={make_token('m1')}"}
    for origin in ("https://evil.example", "null", f"{own_origin}.evil.example"):
        response = await upload(client, jpeg(), user_id=None, headers={**cookie, "Origin": origin})
        await assert_refused(response, 403, "forbidden")
        response = await upload(client, jpeg(), headers={"Origin": origin})  # bearer too
        await assert_refused(response, 403, "forbidden")
    assert photo_count(settings.db_path) == 0
    await uploaded(client, jpeg(), user_id=None, headers={**cookie, "Origin": own_origin})
    assert photo_count(settings.db_path) == 1


async def test_a_photo_is_404_to_anyone_outside_its_room_as_if_it_did_not_exist(client):
    photo_id = (await uploaded(client, jpeg()))["photo_id"]
    missing = {}
    for thumb in (False, True):
        response = await get_photo(client, secrets.token_urlsafe(16), "m1", thumb=thumb)
        assert response.status == 404
        missing[thumb] = await response.json()
        assert missing[thumb]["error"]["code"] == "not_found"
    for user_id in ("m2", "t2", "m3"):
        for thumb in (False, True):
            response = await get_photo(client, photo_id, user_id, thumb=thumb)
            assert response.status == 404, (user_id, thumb)
            assert await response.json() == missing[thumb], (user_id, thumb)
            assert response.headers.get("Content-Type", "").startswith("application/json")
    for bogus in ("1", "..%2F..%2Fschema.sql", "%00", photo_id + "x", photo_id[::-1]):
        response = await get_photo(client, bogus, "m1")
        assert response.status == 404, bogus
    for thumb in (False, True):
        response = await get_photo(client, photo_id, None, thumb=thumb)
        await assert_refused(response, 401, "unauthorized")


async def test_more_than_2_uploads_in_progress_for_one_user_is_429(client, settings):
    """Two uploads whose bodies are still coming hold m1's slots: a third is 429
    and stores nothing; another user is not held back; closing them frees the slots."""
    boundary = "photoboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; "
            f"filename=\"slow.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    body_start = head + jpeg(640, 480)[:1000]
    request = (f"POST {PHOTOS_PATH.format('pt_1')} HTTP/1.1\r\n"
               f"Host: {client.server.host}:{client.server.port}\r\n"
               f"Authorization: Bearer {make_token('m1')}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
               f"Content-Length: {len(body_start) + 500_000}\r\n\r\n").encode() + body_start
    slow = []
    try:
        for _ in range(2):
            reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
            slow.append((reader, writer))
            writer.write(request)
            await writer.drain()
        # The slow two may not have reached the server's handler yet: until they
        # have, a third is taken (and counted); from then on it is refused.
        taken = 0
        deadline = time.monotonic() + 5
        while (response := await upload(client, jpeg(80, 60))).status == 201:
            taken += 1
            assert time.monotonic() < deadline, "a third upload is taken while two are in progress"
            await asyncio.sleep(0.02)
        await assert_refused(response, 429, "rate_limited")
        assert photo_count(settings.db_path) == taken
        await uploaded(client, jpeg(80, 60), user_id="t1")  # another user is not held back
        for reader, _ in slow:
            assert not reader.at_eof()  # still uploading, not answered
    finally:
        for _, writer in slow:
            writer.close()
    deadline = time.monotonic() + 5
    while (response := await upload(client, jpeg(80, 60))).status == 429:
        assert time.monotonic() < deadline, "the slots of closed uploads were never freed"
        await asyncio.sleep(0.02)
    assert response.status == 201, await response.text()
    assert photo_count(settings.db_path) == taken + 2
    assert files_beside(settings.db_path) == set()


# ------------------------------------------------------------ sending ---


async def test_a_photo_is_sent_with_or_without_a_caption_to_every_socket_in_the_room(client,
                                                                                    settings):
    member, _, _ = await open_room(client, "pt_1", "m1")
    trainer, _, _ = await open_room(client, "pt_1", "t1")
    plain = await uploaded(client, jpeg(400, 300))
    captioned = await uploaded(client, jpeg(200, 300))
    await send_photo(member, plain["photo_id"], "p-1")
    first = await ack_and_frame(member, "p-1")
    await send_photo(member, captioned["photo_id"], "p-2", content="  스쿼트 자세 어때요?  ")
    second = await ack_and_frame(member, "p-2")
    for client_id, photo, content, (ack, own_copy) in (
            ("p-1", plain, "", first), ("p-2", captioned, "스쿼트 자세 어때요?", second)):
        expected = {"type": "chat", "id": ack["id"], "room_id": "pt_1", "user_id": "m1",
                    "sender_name": "Member One", "content": content,
                    "created_at": ack["created_at"], "client_id": client_id,
                    "photo": {"id": photo["photo_id"], "width": photo["width"],
                              "height": photo["height"]}}
        assert own_copy == expected
        assert await message_frame(trainer, client_id) == expected
    assert (first[0]["id"], second[0]["id"]) == (first[1]["id"], second[1]["id"])
    # A text message says it has no photo.
    await send_chat(trainer, "좋아요", "t-1")
    text = await message_frame(member, "t-1")
    assert set(text) == MESSAGE_FIELDS and text["photo"] is None
    assert [(row["client_id"], row["content"]) for row in stored_rows(settings.db_path)] == [
        ("p-1", ""), ("p-2", "스쿼트 자세 어때요?"), ("t-1", "좋아요")]


async def test_a_resend_with_the_same_client_id_is_acked_with_the_first_id(client, settings):
    member, _, _ = await open_room(client, "pt_1", "m1")
    photo = await uploaded(client, jpeg())
    await send_photo(member, photo["photo_id"], "again")
    first = await ack_of(member, "again")
    await send_photo(member, photo["photo_id"], "again")
    second = await ack_of(member, "again")
    assert (second["id"], second["created_at"]) == (first["id"], first["created_at"])
    assert [row["client_id"] for row in stored_rows(settings.db_path)] == ["again"]


async def test_a_photo_is_sent_once_by_its_uploader_in_its_room(client, settings):
    trainer_1, _, _ = await open_room(client, "pt_1", "t1")
    trainer_2, _, _ = await open_room(client, "pt_2", "t1")
    member, _, _ = await open_room(client, "pt_1", "m1")
    members_photo = await uploaded(client, jpeg())
    trainers_photo = await uploaded(client, jpeg(), user_id="t1")
    # Someone else's (the room's other participant), and the uploader's in their other room.
    await send_photo(trainer_1, members_photo["photo_id"], "someone-else", content="look")
    assert await refusal(trainer_1, "someone-else") == "invalid_message"
    await send_photo(trainer_2, trainers_photo["photo_id"], "other-room", content="look")
    assert await refusal(trainer_2, "other-room") == "invalid_message"
    assert stored_rows(settings.db_path) == []
    # Refused attempts do not use a photo up: its uploader sends it in its room.
    await send_photo(member, members_photo["photo_id"], "good-1")
    await ack_of(member, "good-1")
    await send_photo(trainer_1, trainers_photo["photo_id"], "good-2")
    await ack_of(trainer_1, "good-2")
    # Once only: not again with another client_id, caption or socket, nor by the other.
    await send_photo(member, members_photo["photo_id"], "twice", content="again")
    assert await refusal(member, "twice") == "invalid_message"
    other_tab, _, _ = await open_room(client, "pt_1", "m1")
    await send_photo(other_tab, members_photo["photo_id"], "twice-2")
    assert await refusal(other_tab, "twice-2") == "invalid_message"
    await send_photo(trainer_1, members_photo["photo_id"], "twice-3")
    assert await refusal(trainer_1, "twice-3") == "invalid_message"
    assert [row["client_id"] for row in stored_rows(settings.db_path)] == ["good-1", "good-2"]


@pytest.mark.parametrize("photo_id", ["no-such-photo-0123456789", "", 7, ["x"], {"id": "x"}],
                         ids=["unknown", "empty", "number", "list", "object"])
async def test_a_photo_id_that_is_not_a_photo_is_invalid_message(client, settings, photo_id):
    member, _, _ = await open_room(client, "pt_1", "m1")
    await send_photo(member, photo_id, "odd", content="caption")
    assert await refusal(member, "odd") == "invalid_message"
    assert stored_rows(settings.db_path) == []


async def test_photo_messages_are_in_history_on_connect_on_resume_and_in_the_api(client):
    member, _, _ = await open_room(client, "pt_1", "m1")
    await send_chat(member, "before", "c-0")
    before = await ack_of(member, "c-0")
    photo = await uploaded(client, jpeg(500, 250))
    await send_photo(member, photo["photo_id"], "c-1")
    sent, live = await ack_and_frame(member, "c-1")
    assert live["photo"] == {"id": photo["photo_id"], "width": 500, "height": 250}

    _, _, history = await open_room(client, "pt_1", "t1")
    assert [(m["client_id"], m["photo"]) for m in history["messages"]] == [
        ("c-0", None), ("c-1", live["photo"])]
    assert history["messages"][1] == live
    _, _, resumed = await open_room(client, "pt_1", "t1", after=before["id"])
    assert resumed == {"type": "history", "messages": [live], "has_more": False}
    messages = await messages_over_http(client, "pt_1")
    assert [m["id"] for m in messages] == [before["id"], sent["id"]]
    assert messages[1] == live
    assert messages[0]["photo"] is None
    assert all(set(m) == MESSAGE_FIELDS for m in messages + history["messages"])


async def test_photos_count_as_unread_and_show_in_the_room_list(client):
    member, _, _ = await open_room(client, "pt_1", "m1")
    trainer, _, _ = await open_room(client, "pt_1", "t1")
    await send_photo(member, (await uploaded(client, jpeg()))["photo_id"], "p-1")
    await ack_of(member, "p-1")
    for user_id in ("t1", "m1"):
        assert (await room_list(client, user_id))["pt_1"]["last_message"] == "📷"
    assert (await room_list(client, "t1"))["pt_1"]["unread_count"] == 1
    assert (await room_list(client, "m1"))["pt_1"]["unread_count"] == 0
    await send_photo(member, (await uploaded(client, jpeg()))["photo_id"], "p-2",
                     content="오늘 식단")
    last = await ack_of(member, "p-2")
    rooms = await room_list(client, "t1")
    assert (rooms["pt_1"]["last_message"], rooms["pt_1"]["unread_count"]) == ("오늘 식단", 2)
    await trainer.send_json({"type": "read", "message_id": last["id"]})
    await receive_until(trainer, lambda f: f["type"] == "read" and f["user_id"] == "t1")
    assert (await room_list(client, "t1"))["pt_1"]["unread_count"] == 0
    # The trainer answers with a photo: now the member has one unread.
    await send_photo(trainer, (await uploaded(client, jpeg(), user_id="t1"))["photo_id"], "t-1")
    await ack_of(trainer, "t-1")
    rooms = await room_list(client, "m1")
    assert (rooms["pt_1"]["last_message"], rooms["pt_1"]["unread_count"]) == ("📷", 1)


# ----------------------------------------------------------- clean-up ---


async def test_an_unsent_photo_is_deleted_after_the_keep_time_and_a_sent_one_is_kept(make_client,
                                                                                     tmp_path):
    client = await make_client(photo_unsent_keep_s=1.0, photo_cleanup_interval_s=0.1)
    db_path = tmp_path / "chat.db"
    member, _, _ = await open_room(client, "pt_1", "m1")
    sent = await uploaded(client, jpeg())
    await send_photo(member, sent["photo_id"], "kept")
    await ack_of(member, "kept")
    unsent = await uploaded(client, jpeg())  # newer than the sent one
    assert (await get_photo(client, unsent["photo_id"])).status == 200
    assert photo_count(db_path) == 2

    async def gone() -> bool:
        return (await get_photo(client, unsent["photo_id"])).status == 404

    deadline = time.monotonic() + 10
    while not await gone():
        assert time.monotonic() < deadline, "the unsent photo was never deleted"
        await asyncio.sleep(0.1)
    # Deleted entirely; the sent one, older still, is kept, with its thumbnail.
    assert (await get_photo(client, unsent["photo_id"], thumb=True)).status == 404
    assert photo_count(db_path) == 1
    for user_id in ("m1", "t1"):
        await served(client, sent["photo_id"], user_id)
        await served(client, sent["photo_id"], user_id, thumb=True)
    # A deleted photo can no longer be sent.
    await send_photo(member, unsent["photo_id"], "too-late")
    assert await refusal(member, "too-late") == "invalid_message"
    assert [row["client_id"] for row in stored_rows(db_path)] == ["kept"]


def test_the_default_keep_time_is_24_hours_checked_hourly():
    settings = dc.Settings()
    assert (settings.photo_unsent_keep_s, settings.photo_cleanup_interval_s) == (86400.0, 3600.0)
    assert settings.max_photo_mb == 10


# --------------------------------------------------------- operations ---


async def test_check_and_backup_count_photos_and_a_restored_backup_serves_the_same_bytes(
        client, settings, tmp_path, aiohttp_client):
    member, _, _ = await open_room(client, "pt_1", "m1")
    photos = [await uploaded(client, jpeg(700, 500, {"top_left": "red"})),
              await uploaded(client, encode(picture(300, 300, mode="RGBA"), "PNG"),
                             content_type="image/png")]
    for number, photo in enumerate(photos):
        await send_photo(member, photo["photo_id"], f"p-{number}")
        await ack_of(member, f"p-{number}")
    await send_chat(member, "text too", "t-0")
    await ack_of(member, "t-0")
    done = await asyncio.to_thread(run_cli, "check", db_path=settings.db_path)
    assert (done.returncode, done.stdout) == (0, "ok\nschema version: 3\nusers: 5\nsessions: 3\n"
                                                 "messages: 3\nphotos: 2\n"), done.stderr
    backup_path = tmp_path / "backup" / "chat.db"
    backup_path.parent.mkdir()
    done = await asyncio.to_thread(run_cli, "backup", str(backup_path), db_path=settings.db_path)
    assert (done.returncode, done.stdout) == (0, f"backup {backup_path}: 3 messages, 2 photos\n"), \
        done.stderr

    restored_path = tmp_path / "restored" / "chat.db"
    restored_path.parent.mkdir()
    shutil.copy(backup_path, restored_path)
    restored = await aiohttp_client(dc.create_app(make_settings(tmp_path, db_path=restored_path)))
    for photo in photos:
        for thumb in (False, True):
            original = await get_photo(client, photo["photo_id"], thumb=thumb)
            copy = await get_photo(restored, photo["photo_id"], "t1", thumb=thumb)
            assert copy.status == 200
            assert copy.headers["Content-Type"] == original.headers["Content-Type"]
            assert await copy.read() == await original.read()
    messages = await messages_over_http(restored, "pt_1")
    assert [m["photo"] for m in messages] == [
        {"id": p["photo_id"], "width": p["width"], "height": p["height"]} for p in photos] + [None]
    assert dc.SCHEMA_VERSION == 3


async def test_a_first_release_database_upgrades_and_takes_photos(tmp_path, aiohttp_client):
    """An old gym's data: its messages come with no photo, and photos work in its rooms."""
    old = tmp_path / "old.db"
    make_v0_database(old)
    client = await aiohttp_client(dc.create_app(make_settings(tmp_path, db_path=old)))
    messages = await messages_over_http(client, "pt_1")
    assert [(m["content"], m["photo"]) for m in messages] == [("스쿼트 자세 봐주세요", None),
                                                                ("좋아요", None)]
    trainer, _, _ = await open_room(client, "pt_1", "t1")
    photo = await uploaded(client, jpeg(120, 90), user_id="t1")
    await send_photo(trainer, photo["photo_id"], "new-photo")
    ack = await ack_of(trainer, "new-photo")
    assert ack["id"] == 3
    assert photo_count(old) == 1
    with contextlib.closing(sqlite3.connect(old)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        assert "photo_id" in {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    rooms = await room_list(client, "m1")  # the old answer and the new photo are unread
    assert (rooms["pt_1"]["last_message"], rooms["pt_1"]["unread_count"]) == ("📷", 2)
