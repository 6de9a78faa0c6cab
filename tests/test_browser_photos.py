"""Photos on the page (SPEC 9, last bullet), in a real browser: the composer's
photo button, paste and drop, upload progress with Cancel, pending / failed /
Retry as for text, thumbnails on both sides that open full size.

Same browser, server and users as test_browser.py (t1 and m1 share pt_1). Test
images are drawn with Pillow in the test; none is kept in the repository.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import re

import aiohttp
import pytest
from PIL import Image, ImageDraw
from playwright.async_api import Page, expect

from conftest import ack_of, auth, open_room
import test_browser
from test_browser import (ACK_TIMEOUT_S, axe_violations, composer, exactly, open_chat, settles_to, stored,
                          stored_bubbles, unsent_rows)

# test_browser.py's fixtures: one Chromium for this module, contexts, the server.
browser, new_context, server = test_browser.browser, test_browser.new_context, test_browser.server

pytestmark = pytest.mark.asyncio(loop_scope="module")

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
THUMB_BOX = (240, 320)  # the page fits a thumbnail in this box (CSS px)
THUMB_MIN = 64
SCREENSHOT_DIR = os.environ.get("PHOTO_SCREENSHOT_DIR")  # set it to keep the phone screenshots


def photo_bytes(width: int, height: int, image_format: str = "JPEG") -> bytes:
    """A test photo: a gradient with shapes, so it is a real image of some size."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(0, height, 8):
        draw.rectangle([0, y, width, y + 8], fill=(40 + 180 * y // height, 120, 220 - 160 * y // height))
    draw.ellipse([width // 4, height // 4, width * 3 // 4, height * 3 // 4], fill=(254, 229, 0))
    draw.rectangle([0, 0, width // 6, height // 6], fill=(229, 72, 77))  # marks the top left corner
    grain = Image.effect_noise((width, height), 60).convert("RGB")  # a camera's grain: a photo's file size
    image = Image.blend(image, grain, 0.15)
    out = io.BytesIO()
    image.save(out, image_format, quality=92)
    return out.getvalue()


def as_file(name: str, data: bytes, mime_type: str = "image/jpeg") -> dict:
    return {"name": name, "mimeType": mime_type, "buffer": data}


def thumb_size(width: int, height: int) -> tuple[int, int]:
    """The thumbnail's size on the page, as the page computes it from the frame."""
    scale = min(1, THUMB_BOX[0] / width, THUMB_BOX[1] / height)
    return max(THUMB_MIN, round(width * scale)), max(THUMB_MIN, round(height * scale))


def photo_input(page: Page):
    return page.get_by_label(re.compile("^(사진 첨부|Attach a photo)$"))


def photo_rows(page: Page):
    """Stored messages that carry a photo."""
    return page.locator(".timeline .message-row[data-id]").filter(has=page.locator(".photo-thumb"))


def uploads_to(page: Page) -> list[str]:
    """Record the page's photo uploads (POSTs to the room's photos path)."""
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url)
            if request.method == "POST" and request.url.endswith("/photos") else None)
    return seen


async def screenshot(page: Page, name: str) -> None:
    if SCREENSHOT_DIR:
        await page.screenshot(path=os.path.join(SCREENSHOT_DIR, name))


async def choose_and_send(page: Page, file: dict, caption: str = "") -> None:
    await photo_input(page).set_input_files(file)
    await expect(page.locator(".composer-attachment")).to_be_visible()
    await expect(page.locator(".send-button")).to_be_enabled()
    if caption:
        await composer(page).fill(caption)
    await composer(page).press("Enter")


async def photo_messages(server) -> list[dict]:
    return [message for message in await stored(server) if message.get("photo")]


async def hold_uploads(page: Page):
    """Hold every photo upload at the network until ``release`` is set."""
    held, release = asyncio.Event(), asyncio.Event()

    async def handler(route):
        held.set()
        await release.wait()
        try:
            await route.continue_()
        except Exception:  # the page cancelled it meanwhile
            pass

    await page.route(re.compile(r"/photos$"), handler)
    return held, release


# -------------------------------------------------------------- tests ----

async def test_a_photo_from_the_button_uploads_with_progress_and_shows_on_both_sides(
        new_context, server):
    trainer = await open_chat(new_context, server, "t1", **PHONE)
    member = await open_chat(new_context, server, "m1", **PHONE)
    await expect(photo_input(member)).to_have_attribute("accept", "image/*")
    await expect(photo_input(member)).to_have_attribute("type", "file")

    # A slow uplink (DevTools' throttling), so the progress has steps to see.
    cdp = await member.context.new_cdp_session(member)
    await cdp.send("Network.enable")
    await cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 20, "downloadThroughput": -1, "uploadThroughput": 256 * 1024})
    data = photo_bytes(2400, 1600)  # wider than the server keeps: it scales to 2048
    assert len(data) > 200_000, len(data)
    caption = "<b>오늘</b> 자세 확인해 주세요"
    await choose_and_send(member, as_file("squat.jpg", data), caption)
    await expect(member.locator(".composer-attachment")).to_have_count(0)
    await expect(composer(member)).to_have_value("")

    pending = unsent_rows(member)
    progress = pending.locator("progress")
    await expect(progress).to_be_visible()
    await expect(pending.get_by_role("button", name="취소")).to_be_visible()
    await expect(pending.locator(".photo-thumb")).to_have_attribute("src", re.compile("^data:image/jpeg"))
    # The progress moves: some of the file is up while not all of it is.
    await expect(progress).to_have_attribute("value", re.compile(r"^([1-9]|[1-9][0-9])$"))
    await screenshot(member, "photos-progress-390.png")
    await expect(progress).to_have_count(0, timeout=20_000)  # uploaded
    await cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    await expect(unsent_rows(member)).to_have_count(0)

    [message] = await photo_messages(server)
    photo = message["photo"]
    assert (photo["width"], photo["height"]) == (2048, 1365)
    assert message["content"] == caption
    width, height = thumb_size(photo["width"], photo["height"])
    for page in (member, trainer):
        row = photo_rows(page)
        await expect(row).to_have_count(1)
        await expect(row).to_have_attribute("data-id", str(message["id"]))
        thumb = row.locator("img.photo-thumb")
        await expect(thumb).to_have_attribute("width", str(width))
        await expect(thumb).to_have_attribute("height", str(height))
        await expect(thumb).to_have_attribute("alt", "Member One님이 보낸 사진")
        await expect(thumb).to_have_attribute("loading", "lazy")
        await expect(thumb).to_have_attribute("src", f"/distributor/chat/photos/{photo['id']}/thumb")
        await expect(row.locator(".bubble-text")).to_have_text(exactly(caption))  # text, not HTML
        await expect(row.locator("b")).to_have_count(0)
        await settles_to(lambda: thumb.evaluate("(img) => img.complete && img.naturalWidth"), 480)
    await expect(photo_rows(member)).to_have_class(re.compile(r"\bis-mine\b"))
    await expect(photo_rows(trainer)).not_to_have_class(re.compile(r"\bis-mine\b"))
    # Own on the right edge; the other's on the left, after the sender's avatar.
    own = await photo_rows(member).locator(".bubble-photo").bounding_box()
    other = await photo_rows(trainer).locator(".bubble-photo").bounding_box()
    assert 390 - 16 <= own["x"] + own["width"] <= 390, own
    assert 0 < other["x"] <= 64 and other["x"] + other["width"] < 390 - 16, other
    for page in (member, trainer):
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390

    # A tap opens it full size; Escape closes it and focus returns to the thumbnail.
    link = photo_rows(trainer).get_by_role("link")
    await link.tap()
    viewer = trainer.get_by_role("dialog", name="사진")
    await expect(viewer).to_be_visible()
    full = viewer.locator("img.photo-full")
    await expect(full).to_have_attribute("src", f"/distributor/chat/photos/{photo['id']}")
    await settles_to(lambda: full.evaluate("(img) => img.complete ? [img.naturalWidth, img.naturalHeight] : null"),
                     [photo["width"], photo["height"]])
    await expect(viewer.get_by_role("button", name="닫기")).to_be_focused()
    await trainer.keyboard.press("Escape")
    await expect(viewer).to_have_count(0)
    await expect(link).to_be_focused()
    # The keyboard opens it too, and the close button closes it.
    await trainer.keyboard.press("Enter")
    await expect(viewer).to_be_visible()
    await viewer.get_by_role("button", name="닫기").click()
    await expect(viewer).to_have_count(0)

    if SCREENSHOT_DIR:
        await send_text_from(trainer, "좋아요! 무릎이 발끝을 넘지 않게 해 보세요.")
        await choose_and_send(trainer, as_file("tall.png", photo_bytes(600, 1400, "PNG"), "image/png"))
        await expect(photo_rows(member)).to_have_count(2)
        await expect(photo_rows(member).last.locator("img")).to_have_js_property("complete", True)
        await screenshot(member, "photos-member-390.png")
        await screenshot(trainer, "photos-trainer-390.png")
        await photo_rows(trainer).first.get_by_role("link").click()
        await expect(trainer.get_by_role("dialog")).to_be_visible()
        await screenshot(trainer, "photos-viewer-390.png")


async def send_text_from(page: Page, text: str) -> None:
    await composer(page).fill(text)
    await composer(page).press("Enter")
    await expect(stored_bubbles(page, text)).to_have_count(1)


async def test_a_file_the_server_refuses_shows_why_and_can_be_deleted(new_context, server):
    """A text file named .jpg: the server answers 415. Sending it again cannot
    help, so the failed photo offers Delete and says why, not Retry."""
    member = await open_chat(new_context, server, "m1", **PHONE)
    await choose_and_send(member, as_file("notes.jpg", "이건 사진이 아닙니다\n".encode() * 50))
    failed = member.locator(".timeline .message-row.is-failed")
    await expect(failed).to_have_count(1)
    await expect(failed.locator(".failed-text")).to_have_text(
        "보낼 수 없는 파일입니다. JPEG, PNG, WebP, GIF 사진만 됩니다.")
    await expect(failed.get_by_role("alert")).to_be_visible()
    await expect(failed.get_by_role("button", name="다시 보내기")).to_have_count(0)
    await screenshot(member, "photos-refused-390.png")
    await failed.get_by_role("button", name="삭제").click()
    await expect(unsent_rows(member)).to_have_count(0)
    assert await stored(server) == []


async def test_a_failed_upload_shows_retry_and_retry_uploads_and_sends_once(new_context, server):
    trainer = await open_chat(new_context, server, "t1")
    member = await open_chat(new_context, server, "m1")
    uploads = uploads_to(member)
    await member.route(re.compile(r"/photos$"), lambda route: route.abort("connectionreset"))
    await choose_and_send(member, as_file("lunge.jpg", photo_bytes(800, 600)), "런지")
    failed = member.locator(".timeline .message-row.is-failed")
    await expect(failed).to_have_count(1)
    await expect(failed.locator(".failed-text")).to_have_text("사진을 올리지 못했습니다. 연결을 확인하고 다시 보내세요.")
    await expect(failed.locator(".bubble-text")).to_have_text("런지")
    client_id = await failed.get_attribute("data-client-id")

    await member.unroute(re.compile(r"/photos$"))
    await failed.get_by_role("button", name="다시 보내기").click()
    for page in (member, trainer):
        await expect(photo_rows(page)).to_have_count(1)
        await expect(photo_rows(page).locator(".bubble-text")).to_have_text("런지")
    await expect(unsent_rows(member)).to_have_count(0)
    assert len(uploads) == 2  # the refused one and the retry
    [message] = await stored(server)
    assert (message["client_id"], message["content"]) == (client_id, "런지")
    assert (message["photo"]["width"], message["photo"]["height"]) == (800, 600)


async def test_without_an_ack_retry_resends_the_frame_not_the_photo(new_context, server):
    """The upload succeeded, the chat frame got no ack: Retry sends the frame
    again with the same client_id and photo_id; the photo goes up once."""
    context = await new_context()
    frames: list[dict] = []

    async def drop_first_photo_frame(ws):
        upstream = ws.connect_to_server()

        def from_page(message):
            frame = json.loads(message) if isinstance(message, str) else {}
            if frame.get("photo_id"):
                frames.append(frame)
                if len(frames) == 1:
                    return  # lost on the way
            upstream.send(message)

        ws.on_message(from_page)

    await context.route_web_socket(re.compile(r"/distributor/ws/chat/"), drop_first_photo_frame)
    member = await open_chat(new_context, server, "m1", context=context)
    uploads = uploads_to(member)
    await choose_and_send(member, as_file("plank.png", photo_bytes(500, 700, "PNG"), "image/png"))
    pending = unsent_rows(member)
    await expect(pending.locator("progress")).to_have_count(0)  # uploaded, waiting for the ack
    await expect(pending).to_have_class(re.compile(r"\bis-pending\b"))
    failed = member.locator(".timeline .message-row.is-failed")
    await expect(failed).to_have_count(1, timeout=(ACK_TIMEOUT_S + 5) * 1000)
    await failed.get_by_role("button", name="다시 보내기").click()
    await expect(photo_rows(member)).to_have_count(1)
    await expect(unsent_rows(member)).to_have_count(0)
    assert len(uploads) == 1
    assert len(frames) == 2 and frames[0] == frames[1], frames
    [message] = await stored(server)
    assert message["client_id"] == frames[0]["client_id"] and message["photo"]["id"] == frames[0]["photo_id"]


async def test_an_uploaded_photo_waiting_for_its_ack_survives_a_reload(new_context, server):
    context = await new_context()
    dropping = {"on": True}

    async def hold_photo_frames(ws):
        upstream = ws.connect_to_server()

        def from_page(message):
            if dropping["on"] and isinstance(message, str) and '"photo_id"' in message:
                return
            upstream.send(message)

        ws.on_message(from_page)

    await context.route_web_socket(re.compile(r"/distributor/ws/chat/"), hold_photo_frames)
    member = await open_chat(new_context, server, "m1", context=context)
    await choose_and_send(member, as_file("row.jpg", photo_bytes(640, 480)), "로우")
    pending = unsent_rows(member)
    await expect(pending.locator("progress")).to_have_count(0)
    await settles_to(lambda: member.evaluate("JSON.stringify(Object.assign({}, localStorage)).includes('photo')"),
                     True)
    dropping["on"] = False
    await member.reload()  # the upload is done: the page keeps the photo's id and sends it
    await expect(photo_rows(member)).to_have_count(1)
    await expect(photo_rows(member).locator(".bubble-text")).to_have_text("로우")
    await expect(unsent_rows(member)).to_have_count(0)
    assert [m["content"] for m in await stored(server)] == ["로우"]


async def test_cancel_stops_the_upload_and_sends_nothing(new_context, server):
    member = await open_chat(new_context, server, "m1", **PHONE)
    held, release = await hold_uploads(member)
    await photo_input(member).set_input_files(as_file("cancel.jpg", photo_bytes(400, 300)))
    await expect(member.locator(".composer-attachment img")).to_be_visible()
    await composer(member).fill("이건 취소할 사진")
    await screenshot(member, "photos-chosen-390.png")
    await composer(member).press("Enter")
    pending = unsent_rows(member)
    await asyncio.wait_for(held.wait(), timeout=10)
    await expect(pending.locator("progress")).to_be_visible()
    await screenshot(member, "photos-uploading-390.png")
    await pending.get_by_role("button", name="취소").click()
    await expect(unsent_rows(member)).to_have_count(0)
    release.set()
    assert "cancel" not in await member.evaluate("JSON.stringify(Object.assign({}, localStorage))")
    # A text sent after it is the only message: the cancelled photo was never sent.
    await send_text_from(member, "취소 후")
    await expect(photo_rows(member)).to_have_count(0)
    assert [m["content"] for m in await stored(server)] == ["취소 후"]


async def test_paste_and_drop_attach_a_photo(new_context, server):
    """A desktop: an image pasted into the composer, or dropped on the page."""
    trainer = await open_chat(new_context, server, "t1", locale="en-US")
    png = list(photo_bytes(300, 200, "PNG"))
    make_transfer = """(bytes) => {
        const transfer = new DataTransfer()
        transfer.items.add(new File([new Uint8Array(bytes)], 'screenshot.png', { type: 'image/png' }))
        return transfer
    }"""
    await composer(trainer).fill("붙여넣은 사진")
    await trainer.evaluate(f"""(bytes) => {{
        const transfer = ({make_transfer})(bytes)
        document.querySelector('#composer-text').dispatchEvent(
            new ClipboardEvent('paste', {{ clipboardData: transfer, bubbles: true, cancelable: true }}))
    }}""", png)
    attachment = trainer.locator(".composer-attachment")
    await expect(attachment).to_contain_text("screenshot.png")
    await expect(attachment.get_by_role("img", name="Photo to send")).to_have_attribute(
        "src", re.compile("^data:image/jpeg"))
    await expect(composer(trainer)).to_have_value("붙여넣은 사진")  # the text stays: it is the caption
    await expect(composer(trainer)).to_have_attribute("placeholder", "Add a caption (optional)")
    await trainer.get_by_role("button", name="Send", exact=True).click()
    await expect(photo_rows(trainer)).to_have_count(1)
    await expect(photo_rows(trainer).locator(".bubble-text")).to_have_text("붙여넣은 사진")

    # Dropped anywhere on the page; the hint shows while dragging.
    handle = await trainer.evaluate_handle(make_transfer, png)
    await trainer.locator(".timeline-scroller").dispatch_event("dragover", {"dataTransfer": handle})
    await expect(trainer.locator(".drop-hint")).to_have_text("Drop a photo here")
    await trainer.locator(".timeline-scroller").dispatch_event("drop", {"dataTransfer": handle})
    await expect(trainer.locator(".drop-hint")).to_have_count(0)
    await expect(attachment).to_contain_text("screenshot.png")
    # Removed again, then dropped and sent without a caption.
    await attachment.get_by_role("button", name="Remove photo").click()
    await expect(attachment).to_have_count(0)
    await trainer.locator(".timeline-scroller").dispatch_event("drop", {"dataTransfer": handle})
    await expect(attachment).to_be_visible()
    await composer(trainer).press("Enter")
    await expect(photo_rows(trainer)).to_have_count(2)
    assert [m["content"] for m in await stored(server)] == ["붙여넣은 사진", ""]
    assert trainer.url.startswith(server.base_url + "/distributor/chat?")  # the drop opened no file


async def test_the_photo_button_is_off_for_announcements(new_context, server):
    trainer = await open_chat(new_context, server, "t1")
    await trainer.get_by_label("모든 회원에게 공지").check()
    await expect(photo_input(trainer)).to_be_disabled()
    await trainer.get_by_label("모든 회원에게 공지").uncheck()
    await expect(photo_input(trainer)).to_be_enabled()
    await photo_input(trainer).set_input_files(as_file("a.jpg", photo_bytes(200, 200)))
    await expect(trainer.get_by_label("모든 회원에게 공지")).to_be_disabled()


@pytest.mark.parametrize("screen", ["phone", "desktop"])
async def test_photos_pass_axe(new_context, server, screen):
    """Every photo state: sent and not yet read ("1"), refused, uploading with
    Cancel, chosen in the composer; and the viewer open."""
    viewport = {"phone": {"width": 390, "height": 844}, "desktop": {"width": 1280, "height": 800}}[screen]
    options = {"viewport": viewport, "bypass_csp": True}
    member = await open_chat(new_context, server, "m1", **options)
    await choose_and_send(member, as_file("one.jpg", photo_bytes(900, 1200)), "캡션")
    await expect(photo_rows(member).locator(".unread-mark")).to_have_text("1")
    await choose_and_send(member, as_file("notes.jpg", b"not a photo" * 100))
    await expect(member.locator(".timeline .message-row.is-failed")).to_have_count(1)
    held, release = await hold_uploads(member)
    await choose_and_send(member, as_file("held.jpg", photo_bytes(600, 400)))
    await expect(unsent_rows(member).locator("progress")).to_be_visible()
    await photo_input(member).set_input_files(as_file("three.jpg", photo_bytes(300, 300)))
    await expect(member.locator(".composer-attachment img")).to_be_visible()
    await screenshot(member, f"photos-states-{screen}.png")
    found = {"member: every photo state": await axe_violations(member)}
    release.set()

    trainer = await open_chat(new_context, server, "t1", **options)
    await choose_and_send(trainer, as_file("two.jpg", photo_bytes(1200, 500)))
    await expect(photo_rows(trainer)).to_have_count(3)
    await photo_rows(trainer).first.get_by_role("link").click()
    await expect(trainer.get_by_role("dialog")).to_be_visible()
    found["trainer: the viewer"] = await axe_violations(trainer)
    failing = {name: violations for name, violations in found.items() if violations}
    assert failing == {}, json.dumps(failing, ensure_ascii=False, indent=1)


async def test_a_photo_from_the_server_shows_for_a_page_opened_later(new_context, server):
    """History carries the photo: a page opened after it was sent shows it too."""
    async with aiohttp.ClientSession(base_url=server.base_url) as http:
        form = aiohttp.FormData()
        form.add_field("photo", photo_bytes(1000, 1000), filename="x.jpg", content_type="image/jpeg")
        async with http.post("/distributor/chat/rooms/pt_1/photos", data=form, headers=auth("m1")) as response:
            assert response.status == 201, await response.text()
            uploaded = await response.json()
        ws, _, _ = await open_room(http, "pt_1", "m1")
        await ws.send_json({"type": "chat", "content": "", "photo_id": uploaded["photo_id"], "client_id": "later-1"})
        await ack_of(ws, "later-1")
        await ws.close()
    trainer = await open_chat(new_context, server, "t1")
    row = photo_rows(trainer)
    await expect(row).to_have_count(1)
    await expect(row.locator("img")).to_have_attribute("width", "240")
    await expect(row.locator("img")).to_have_attribute("height", "240")
    await expect(row.locator(".bubble-text")).to_have_count(0)  # no caption, no empty text


async def test_a_photo_over_the_size_limit_says_so(new_context, server_process):
    server = server_process("--max-photo-mb", "1", "--log-level", "warning")
    member = await open_chat(new_context, server, "m1")
    data = photo_bytes(2400, 1600)
    assert len(data) > 1024 * 1024
    await choose_and_send(member, as_file("huge.jpg", data))
    failed = member.locator(".timeline .message-row.is-failed")
    await expect(failed.locator(".failed-text")).to_have_text("사진 파일이 너무 큽니다.")
    await expect(failed.get_by_role("button", name="다시 보내기")).to_have_count(0)
    await expect(failed.get_by_role("button", name="삭제")).to_be_visible()
