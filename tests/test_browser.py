"""The page in a real browser (SPEC section 7): headless Chromium driven by
Playwright against the real server process on a seeded database.

Users (conftest): t1 "Coach One" and m1 "Member One" share room pt_1; t1 also has
pt_2 with m2. One Chromium per module, a fresh browser context per user and test.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import Counter
from contextlib import contextmanager
from urllib.parse import quote

import aiohttp
import aiohttp.web
import pytest
import pytest_asyncio
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, async_playwright, expect

from conftest import (ROOT, USERS, make_settings, make_token, open_room, receive_until, seed_gym, send_chat,
                      messages_over_http)

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = "/usr/bin/chromium"  # Debian's Chromium: Playwright cannot download its own here
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ACK_TIMEOUT_S = 10  # SPEC 7: no ack in 10 s -> failed
XSS = "<img src=x onerror=window.__xss=1>"

expect.set_options(timeout=10_000)


# ------------------------------------------------------------ fixtures ---

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing: install Debian's chromium package"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def new_context(browser):
    """A factory for browser contexts (Korean unless told); all closed after the test."""
    contexts = []

    async def factory(locale: str = "ko-KR", **options):
        context = await browser.new_context(locale=locale, **options)
        contexts.append(context)
        return context

    yield factory
    for context in contexts:
        await context.close()


@pytest.fixture
def server(server_process):
    return server_process("--tz", "Asia/Seoul", "--log-level", "warning")


# ------------------------------------------------------------- helpers ---

def login_url(server, user_id: str, next_path: str = "/distributor/chat?room_id=pt_1", *,
              token: str | None = None) -> str:
    token = token or make_token(user_id)
    return f"{server.base_url}/distributor/login?token={token}&next={quote(next_path, safe='/')}"


async def open_chat(new_context, server, user_id: str, room_id: str = "pt_1", *,
                    locale: str = "ko-KR", online: bool = True, token: str | None = None,
                    context=None, **options) -> Page:
    """A signed-in page on a room's chat, by default waited until it shows online."""
    context = context or await new_context(locale=locale, **options)
    page = await context.new_page()
    await page.goto(login_url(server, user_id, f"/distributor/chat?room_id={room_id}", token=token))
    if online:
        await expect(page.locator(".connection-online")).to_be_visible()
    return page


async def open_rooms(new_context, server, user_id: str, **options) -> Page:
    context = await new_context(**options)
    page = await context.new_page()
    await page.goto(login_url(server, user_id, "/distributor/chat/rooms"))
    await expect(page.locator(".rooms-page")).to_be_visible()
    return page


def composer(page: Page):
    return page.locator(".composer textarea")


async def type_and_send(page: Page, text: str) -> None:
    box = composer(page)
    await box.fill(text)
    await box.press("Enter")


def exactly(text: str) -> re.Pattern:
    return re.compile("^" + re.escape(text) + "$")


def stored_bubbles(page: Page, text: str | None = None):
    """Stored message bubbles (with data-id), optionally only those whose text is `text`."""
    rows = page.locator(".timeline .message-row[data-id]")
    if text is not None:
        rows = rows.filter(has=page.locator(".bubble-text", has_text=exactly(text)))
    return rows


def unsent_rows(page: Page, text: str | None = None):
    rows = page.locator(".timeline .message-row.is-unsent")
    if text is not None:
        rows = rows.filter(has=page.locator(".bubble-text", has_text=exactly(text)))
    return rows


def reconnecting(page: Page):
    return page.locator(".connection-reconnecting, .connection-connecting")


async def stored(server, room_id: str = "pt_1") -> list[dict]:
    """Every stored message of the room, over HTTP with the trainer's Bearer token."""
    async with aiohttp.ClientSession(base_url=server.base_url) as http:
        return await messages_over_http(http, room_id)


async def contents(server, room_id: str = "pt_1") -> Counter:
    return Counter(message["content"] for message in await stored(server, room_id))


async def send_over_socket(server, user_id: str, texts: list[str], room_id: str = "pt_1") -> list[int]:
    """Send chats from a plain WebSocket client, all before reading the acks (more
    than the rate limit's burst needs --rate-limit 0); the stored ids, in order."""
    async with aiohttp.ClientSession(base_url=server.base_url) as http:
        ws, _, _ = await open_room(http, room_id, user_id)
        client_ids = [f"{user_id}-{number}-{os.urandom(4).hex()}" for number in range(len(texts))]
        for client_id, text in zip(client_ids, texts):
            await send_chat(ws, text, client_id)
        acked: dict[str, int] = {}
        while len(acked) < len(client_ids):
            frame = await receive_until(ws, lambda f: f["type"] in ("ack", "error"))
            assert frame["type"] == "ack", frame
            acked[frame["client_id"]] = frame["id"]
        await ws.close()
        return [acked[client_id] for client_id in client_ids]


async def ids_on_page(page: Page) -> list[int]:
    return await page.eval_on_selector_all(".timeline .message-row[data-id]",
                                           "rows => rows.map((row) => Number(row.dataset.id))")


async def outbox_in_storage(page: Page) -> str:
    """Everything the page keeps in localStorage, as one string (the unsent outbox)."""
    return await page.evaluate("() => JSON.stringify(Object.assign({}, localStorage))")


async def horizontal_overflow(page: Page) -> int:
    return await page.evaluate("() => document.documentElement.scrollWidth")


@contextmanager
def frozen(server):
    """The server process stopped (SIGSTOP): sockets stay open but nothing is answered."""
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def serve_from_memory_when_down(page: Page) -> None:
    """Route the chat page and its static files through a cache that answers only
    when the server does not, so the page can be reloaded while the server is down.
    (Chromium's local network access checks keep a page served this way from
    opening sockets to 127.0.0.1: it is reloaded again once the server is back.)"""
    cache: dict[str, dict] = {}

    async def handler(route):
        url = route.request.url
        try:
            response = await route.fetch()
        except PlaywrightError:  # the server is down
            if url in cache:
                await route.fulfill(**cache[url])
            else:
                await route.abort()
            return
        cache[url] = {"status": response.status, "headers": response.headers,
                      "body": await response.body()}
        await route.continue_()  # the browser's own request: a real page from the server

    await page.route(re.compile(r"/distributor/(chat\?|static/)"), handler)


# -------------------------------------------------------------- tests ----

async def test_live_send_and_receive_both_ways_own_right_other_left(new_context, server):
    trainer = await open_chat(new_context, server, "t1")
    member = await open_chat(new_context, server, "m1")

    await type_and_send(member, "코치님 안녕하세요")
    await expect(stored_bubbles(member, "코치님 안녕하세요")).to_have_count(1)
    await expect(stored_bubbles(trainer, "코치님 안녕하세요")).to_have_count(1)

    await type_and_send(trainer, "네, 반갑습니다")
    await expect(stored_bubbles(trainer, "네, 반갑습니다")).to_have_count(1)
    await expect(stored_bubbles(member, "네, 반갑습니다")).to_have_count(1)

    for page, mine, theirs in ((member, "코치님 안녕하세요", "네, 반갑습니다"),
                               (trainer, "네, 반갑습니다", "코치님 안녕하세요")):
        await expect(stored_bubbles(page, mine)).to_have_class(re.compile(r"\bis-mine\b"))
        await expect(stored_bubbles(page, theirs)).not_to_have_class(re.compile(r"\bis-mine\b"))
        timeline = await page.locator(".timeline").bounding_box()
        middle = timeline["x"] + timeline["width"] / 2
        own = await stored_bubbles(page, mine).locator(".bubble").bounding_box()
        other = await stored_bubbles(page, theirs).locator(".bubble").bounding_box()
        assert own["x"] > middle, "own message is not on the right"
        assert other["x"] + other["width"] < middle, "the other's message is not on the left"
    # The peer's page renders their name for the other's bubble.
    await expect(stored_bubbles(trainer, "코치님 안녕하세요")).to_contain_text("Member One")


async def test_unread_one_disappears_when_the_other_opens_the_room(new_context, server):
    member = await open_chat(new_context, server, "m1")
    await type_and_send(member, "읽으면 1이 사라져요")
    mark = stored_bubbles(member, "읽으면 1이 사라져요").locator(".unread-mark")
    await expect(mark).to_have_text("1")

    trainer = await open_chat(new_context, server, "t1")  # opening the room reads it
    await expect(stored_bubbles(trainer, "읽으면 1이 사라져요")).to_have_count(1)
    await expect(mark).to_have_count(0)  # on the member's page, without reload
    await expect(member.locator(".unread-mark")).to_have_count(0)

    # While both are in the room, a new message is read at once too.
    await type_and_send(member, "지금도 읽음")
    await expect(stored_bubbles(trainer, "지금도 읽음")).to_have_count(1)
    await expect(stored_bubbles(member, "지금도 읽음")).to_have_count(1)
    await expect(member.locator(".unread-mark")).to_have_count(0)


async def test_enter_sends_and_shift_enter_is_a_newline(new_context, server):
    trainer = await open_chat(new_context, server, "t1")
    member = await open_chat(new_context, server, "m1")
    box = composer(member)
    await box.click()
    await member.keyboard.type("첫 줄")
    await member.keyboard.press("Shift+Enter")
    await member.keyboard.type("둘째 줄")
    await expect(box).to_have_value("첫 줄\n둘째 줄")
    await expect(member.locator(".timeline .message-row")).to_have_count(0)  # nothing sent yet

    await member.keyboard.press("Enter")
    await expect(box).to_have_value("")
    rows = stored_bubbles(trainer)
    await expect(rows).to_have_count(1)
    assert await rows.locator(".bubble-text").inner_text() == "첫 줄\n둘째 줄"
    await expect(stored_bubbles(member)).to_have_count(1)
    assert [m["content"] for m in await stored(server)] == ["첫 줄\n둘째 줄"]


async def test_enter_during_ime_composition_does_not_send(new_context, server):
    context = await new_context()
    member = await open_chat(new_context, server, "m1", context=context)
    box = composer(member)
    await box.focus()
    await member.evaluate("""() => {
        window.__enterKeys = []
        document.addEventListener('keydown', (event) => {
            if (event.key === 'Enter') window.__enterKeys.push(event.isComposing)
        }, true)
    }""")
    cdp = await context.new_cdp_session(member)
    enter_down = {"type": "rawKeyDown", "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13,
                  "nativeVirtualKeyCode": 13}
    enter_up = {**enter_down, "type": "keyUp"}

    # "안녕하세요 " is committed, then "반" is being composed by the Korean IME.
    await cdp.send("Input.insertText", {"text": "안녕하세요 "})
    await cdp.send("Input.imeSetComposition", {"text": "반", "selectionStart": 1, "selectionEnd": 1})
    await expect(box).to_have_value("안녕하세요 반")
    before = len(await stored(server))
    await cdp.send("Input.dispatchKeyEvent", enter_down)
    await cdp.send("Input.dispatchKeyEvent", enter_up)
    # The Enter really was dispatched during composition (else this test proves nothing).
    assert await member.evaluate("window.__enterKeys") == [True]

    # Nothing sent: no bubble, pending or stored, and nothing stored on the server.
    # A message from the trainer, shown on the member's page, is the sync point.
    await send_over_socket(server, "t1", ["동기화"])
    await expect(stored_bubbles(member, "동기화")).to_have_count(1)
    await expect(unsent_rows(member)).to_have_count(0)
    await expect(stored_bubbles(member)).to_have_count(1)
    assert len(await stored(server)) == before + 1
    await expect(box).to_have_value("안녕하세요 반")

    # Commit the composition, then Enter sends it, once.
    await cdp.send("Input.insertText", {"text": "반"})
    await expect(box).to_have_value("안녕하세요 반")
    await cdp.send("Input.dispatchKeyEvent", enter_down)
    await cdp.send("Input.dispatchKeyEvent", enter_up)
    assert await member.evaluate("window.__enterKeys") == [True, False]
    await expect(stored_bubbles(member, "안녕하세요 반")).to_have_count(1)
    await expect(box).to_have_value("")
    assert (await contents(server))["안녕하세요 반"] == 1
    assert len(await stored(server)) == before + 2


async def test_pending_until_ack_then_stored_bubble_with_id(new_context, server):
    member = await open_chat(new_context, server, "m1")
    with frozen(server):  # the server takes the frame but cannot answer yet
        await type_and_send(member, "확인 대기")
        pending = member.locator(".timeline .message-row.is-unsent.is-pending")
        await expect(pending).to_have_count(1)
        await expect(pending).to_have_class(re.compile(r"\bis-mine\b"))
        await expect(pending.locator(".bubble-text")).to_have_text("확인 대기")
        await expect(pending).not_to_have_attribute("data-id", re.compile(".*"))
        await expect(stored_bubbles(member)).to_have_count(0)
    await expect(unsent_rows(member)).to_have_count(0)
    row = stored_bubbles(member, "확인 대기")
    await expect(row).to_have_count(1)
    [message] = await stored(server)
    await expect(row).to_have_attribute("data-id", str(message["id"]))


async def test_missed_messages_appear_once_after_a_server_restart(new_context, server):
    context = await new_context()
    sockets: list[str] = []
    page = await context.new_page()
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(login_url(server, "m1"))
    await expect(page.locator(".connection-online")).to_be_visible()
    await type_and_send(page, "재시작 전")
    await expect(stored_bubbles(page, "재시작 전")).to_have_count(1)
    [first] = await stored(server)

    assert server.stop() == 0  # SIGTERM: the server closes every socket with 1001
    await expect(reconnecting(page)).to_be_visible()
    # Hold the page off the network while the server comes back and the trainer
    # writes, so these messages are certainly missed by the page.
    await context.set_offline(True)
    await expect(page.locator(".connection-offline")).to_be_visible()
    server.start()  # same port, same database
    missed = [f"놓친 메시지 {n}" for n in range(1, 4)]
    ids = await send_over_socket(server, "t1", missed)
    await expect(stored_bubbles(page, missed[0])).to_have_count(0)

    await context.set_offline(False)  # the `online` event: reconnect at once
    await expect(page.locator(".connection-online")).to_be_visible(timeout=5_000)
    for message_id, text in zip(ids, missed):
        await expect(page.locator(f'.timeline .message-row[data-id="{message_id}"]')).to_have_count(1)
        await expect(stored_bubbles(page, text)).to_have_count(1)
    await expect(stored_bubbles(page, "재시작 전")).to_have_count(1)
    all_ids = await ids_on_page(page)
    assert all_ids == sorted(set(all_ids)) == [first["id"], *ids]
    assert f"after={first['id']}" in sockets[-1], sockets  # resumed with after=


async def test_resume_past_500_missed_fills_the_gap_while_live_messages_arrive(
        new_context, server_process):
    """A resume's history stops at 500 and the page fetches the rest page by page.
    A live message that lands between two pages must not make it skip the rest."""
    server = server_process("--rate-limit", "0", "--log-level", "warning")
    page = await open_chat(new_context, server, "m1")
    [first_id] = await send_over_socket(server, "t1", ["놓치기 전"])
    await expect(page.locator(f'.timeline .message-row[data-id="{first_id}"]')).to_have_count(1)

    held, release = asyncio.Event(), asyncio.Event()

    async def hold_first_gap_page(route):
        if not held.is_set():
            held.set()
            await release.wait()
        await route.continue_()

    await page.route(re.compile(r"/messages\?.*after="), hold_first_gap_page)
    assert server.stop() == 0
    await expect(reconnecting(page)).to_be_visible()
    await page.context.set_offline(True)
    await expect(page.locator(".connection-offline")).to_be_visible()
    server.start()
    missed_ids = await send_over_socket(server, "t1", [f"놓친 {n}" for n in range(620)])
    async with aiohttp.ClientSession(base_url=server.base_url) as http:
        trainer, _, _ = await open_room(http, "pt_1", "t1")  # sees the page's read pointer move
        await page.context.set_offline(False)

        await asyncio.wait_for(held.wait(), timeout=10)  # history shown, first gap page asked for
        [live_id] = await send_over_socket(server, "t1", ["페이지 사이에 온 메시지"])
        await expect(page.locator(f'.timeline .message-row[data-id="{live_id}"]')).to_have_count(1)
        # A typing frame goes out after any read the live message caused, on the same socket.
        await composer(page).fill("…")
        read_ids: list[int] = []

        def read_or_typing(frame: dict) -> bool:
            if frame["type"] == "read" and frame["user_id"] == "m1":
                read_ids.append(frame["message_id"])
            return frame["type"] == "typing" and frame["user_id"] == "m1"

        await receive_until(trainer, read_or_typing)
        assert max(read_ids, default=0) < live_id, "read past messages not yet shown"
        release.set()

        expected = [first_id, *missed_ids, live_id]
        await expect(stored_bubbles(page)).to_have_count(len(expected), timeout=10_000)
        assert await ids_on_page(page) == expected
        # Once the gap is filled, the page reads through the newest message.
        await receive_until(trainer, lambda f: f["type"] == "read" and f["message_id"] == live_id)
        await trainer.close()


async def test_no_ack_in_10_s_shows_retry_and_retry_delivers_once(new_context, server):
    trainer = await open_chat(new_context, server, "t1")
    member = await open_chat(new_context, server, "m1")
    text = "다시 보내 주세요"
    with frozen(server):
        await type_and_send(member, text)
        await expect(unsent_rows(member, text)).to_have_class(re.compile(r"\bis-pending\b"))
        failed = member.locator(".timeline .message-row.is-failed")
        await expect(failed).to_have_count(1, timeout=(ACK_TIMEOUT_S + 5) * 1000)
        await expect(failed.locator(".bubble-text")).to_have_text(text)
        await expect(failed.get_by_role("button", name="삭제")).to_be_visible()
        retry = failed.get_by_role("button", name="다시 보내기")
        await retry.click()  # the same client_id again, still no answer
        await expect(unsent_rows(member, text)).to_have_class(re.compile(r"\bis-pending\b"))
    await expect(unsent_rows(member)).to_have_count(0)
    await expect(stored_bubbles(member, text)).to_have_count(1)
    await expect(stored_bubbles(trainer, text)).to_have_count(1)
    assert (await contents(server))[text] == 1
    await expect(stored_bubbles(member)).to_have_count(1)
    await expect(stored_bubbles(trainer)).to_have_count(1)


async def test_delete_drops_a_failed_message_and_unsent_survive_reload(new_context, server):
    # The page's own worker would answer a reload with the offline page; here the
    # test's memory cache stands in for a browser cache, so the worker stays out.
    context = await new_context(service_workers="block")
    page = await context.new_page()
    await page.goto(login_url(server, "m1"))
    await expect(page.locator(".connection-online")).to_be_visible()
    await serve_from_memory_when_down(page)
    await page.reload()  # fills the cache
    await expect(page.locator(".connection-online")).to_be_visible()

    assert server.stop() == 0  # down: nothing the page sends can arrive
    await expect(reconnecting(page)).to_be_visible()
    await type_and_send(page, "지울 메시지")
    failed = page.locator(".timeline .message-row.is-failed")
    await expect(failed).to_have_count(1, timeout=(ACK_TIMEOUT_S + 5) * 1000)
    await failed.get_by_role("button", name="삭제").click()
    await expect(unsent_rows(page)).to_have_count(0)
    assert "지울 메시지" not in await outbox_in_storage(page)

    await type_and_send(page, "살아남을 메시지")
    await expect(unsent_rows(page, "살아남을 메시지")).to_have_count(1)
    assert "살아남을 메시지" in await outbox_in_storage(page)
    await page.reload()  # served from memory: the server is still down
    await expect(unsent_rows(page, "살아남을 메시지")).to_have_count(1)
    await expect(unsent_rows(page, "지울 메시지")).to_have_count(0)

    server.start()
    await page.reload()  # from the server again: connects and sends what it kept
    await expect(page.locator(".connection-online")).to_be_visible()
    await expect(stored_bubbles(page, "살아남을 메시지")).to_have_count(1)
    await expect(unsent_rows(page)).to_have_count(0)
    assert await contents(server) == Counter({"살아남을 메시지": 1})
    assert "살아남을 메시지" not in await outbox_in_storage(page)
    await page.reload()
    await expect(stored_bubbles(page, "살아남을 메시지")).to_have_count(1)
    await expect(unsent_rows(page)).to_have_count(0)


async def test_html_in_messages_and_names_is_shown_as_text(new_context, server_process, tmp_path):
    users = tuple((uid, XSS if uid == "m1" else name, role) for uid, name, role in USERS)
    seed_gym(make_settings(tmp_path), users=users)
    server = server_process("--tz", "Asia/Seoul", "--log-level", "warning")
    trainer = await open_chat(new_context, server, "t1")
    member = await open_chat(new_context, server, "m1")

    await type_and_send(member, XSS)
    for page in (trainer, member):
        await expect(stored_bubbles(page, XSS)).to_have_count(1)
        await expect(page.locator(".timeline img")).to_have_count(0)
        assert await page.evaluate("typeof window.__xss") == "undefined"
    await expect(stored_bubbles(trainer, XSS).locator(".message-sender")).to_have_text(XSS)
    await expect(trainer.locator(".chat-page")).to_contain_text(XSS)  # the peer name in the header
    assert await trainer.locator(".chat-page img").count() == 0

    rooms = await open_rooms(new_context, server, "t1")
    room = rooms.locator('.room-item[data-room-id="pt_1"]')
    await expect(room.locator(".room-name")).to_have_text(XSS)
    await expect(room.locator(".room-last")).to_have_text(XSS)
    assert await rooms.locator("img").count() == 0
    assert await rooms.evaluate("typeof window.__xss") == "undefined"


async def test_room_list_updates_without_reload(new_context, server):
    rooms = await open_rooms(new_context, server, "t1")
    pt_1 = rooms.locator('.room-item[data-room-id="pt_1"]')
    pt_2 = rooms.locator('.room-item[data-room-id="pt_2"]')
    await expect(rooms.locator(".room-item")).to_have_count(2)
    await expect(pt_1.locator(".badge")).to_have_count(0)

    await send_over_socket(server, "m1", ["첫 소식"])
    await expect(pt_1.locator(".badge")).to_have_text("1")  # polled every 3 s
    await expect(pt_1.locator(".room-last")).to_have_text("첫 소식")
    await expect(rooms.locator(".room-item").first).to_have_attribute("data-room-id", "pt_1")

    await send_over_socket(server, "m2", ["다른 회원"], room_id="pt_2")
    await expect(pt_2.locator(".badge")).to_have_text("1")
    await expect(rooms.locator(".room-item").first).to_have_attribute("data-room-id", "pt_2")

    await send_over_socket(server, "m1", ["두 번째 소식"])
    await expect(pt_1.locator(".badge")).to_have_text("2")
    await expect(pt_1.locator(".room-last")).to_have_text("두 번째 소식")
    await expect(rooms.locator(".room-item").first).to_have_attribute("data-room-id", "pt_1")

    # Reading the room clears its badge on the list, again without reload.
    await open_chat(new_context, server, "t1", context=rooms.context)
    await expect(pt_1.locator(".badge")).to_have_count(0)
    await expect(pt_2.locator(".badge")).to_have_text("1")


async def test_english_for_english_browsers_korean_by_default(new_context, server):
    english = await open_chat(new_context, server, "m1", locale="en-US")
    await expect(composer(english)).to_have_attribute("placeholder", "Write a message")
    await expect(english.locator(".connection-online")).to_have_text("Online")
    await expect(english.locator("html")).to_have_attribute("lang", "en")

    korean = await open_chat(new_context, server, "m1", locale="ko-KR")
    await expect(composer(korean)).to_have_attribute("placeholder", "메시지 입력")
    await expect(korean.locator(".connection-online")).to_have_text("온라인")
    await expect(korean.locator("html")).to_have_attribute("lang", "ko")

    english_rooms = await open_rooms(new_context, server, "m1", locale="en-US")
    await expect(english_rooms.locator(".topbar-title")).to_have_text("Chats")
    korean_rooms = await open_rooms(new_context, server, "m1")
    await expect(korean_rooms.locator(".topbar-title")).to_have_text("채팅")


async def test_expired_sign_in_stops_the_page_with_a_reason(new_context, server):
    context = await new_context()
    page = await context.new_page()
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    token = make_token("m1", ttl_s=4)
    await page.goto(login_url(server, "m1", token=token))
    await expect(page.locator(".connection-online")).to_be_visible()
    stopped = page.locator(".connection-stopped")
    await expect(stopped).to_contain_text("로그인이 만료되었습니다", timeout=10_000)  # 4401
    await expect(composer(page)).to_be_disabled()
    assert len(sockets) == 1
    # A client must not reconnect after 44xx: the shortest backoff is 1 s, wait past it.
    await page.wait_for_timeout(3_000)
    assert len(sockets) == 1, sockets
    await expect(stopped).to_be_visible()
    await expect(page.locator(".connection-reconnecting, .connection-connecting")).to_have_count(0)


async def test_phone_screen_has_no_horizontal_scroll_and_labelled_controls(new_context, server):
    phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
    trainer = await open_chat(new_context, server, "t1", **phone)
    member = await open_chat(new_context, server, "m1", **phone)
    long_word = "가나다라마바사" * 60 + "https://example.com/" + "x" * 400
    await type_and_send(member, "짧은 메시지")
    await expect(stored_bubbles(member, "짧은 메시지")).to_have_count(1)
    await type_and_send(member, long_word)
    for page in (trainer, member):
        await expect(stored_bubbles(page, "짧은 메시지")).to_have_count(1)
        await expect(stored_bubbles(page, long_word)).to_have_count(1)
        assert await horizontal_overflow(page) <= 390
        box = await stored_bubbles(page, long_word).locator(".bubble").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390

    textbox = member.get_by_role("textbox", name="메시지")
    await expect(textbox).to_be_visible()
    await expect(textbox).to_have_attribute("id", "composer-text")
    send_button = member.locator(".composer button[type=submit]")
    await expect(send_button).to_have_attribute("aria-label", "보내기")
    await expect(member.get_by_role("button", name="보내기")).to_be_visible()

    rooms = await open_rooms(new_context, server, "t1", **phone)
    await expect(rooms.locator('.room-item[data-room-id="pt_1"] .room-last')).to_have_text(long_word)
    assert await horizontal_overflow(rooms) <= 390


async def test_older_messages_load_when_scrolling_up(new_context, server_process):
    server = server_process("--tz", "Asia/Seoul", "--log-level", "warning", "--rate-limit", "0")
    texts = [f"기록 {n:03d}" for n in range(1, 121)]
    ids = await send_over_socket(server, "m1", texts)
    trainer = await open_chat(new_context, server, "t1")
    rows = stored_bubbles(trainer)
    await expect(rows).to_have_count(50)  # the latest 50
    assert await ids_on_page(trainer) == ids[-50:]
    scroller = trainer.locator(".timeline-scroller")
    for expected in (100, 120):
        await scroller.evaluate("(element) => { element.scrollTop = 0 }")
        await expect(rows).to_have_count(expected)
    assert await ids_on_page(trainer) == ids  # each once, in order
    await expect(stored_bubbles(trainer, "기록 001")).to_have_count(1)
    await expect(stored_bubbles(trainer, "기록 120")).to_have_count(1)


async def test_typing_shows_on_the_other_page(new_context, server):
    trainer = await open_chat(new_context, server, "t1")
    member = await open_chat(new_context, server, "m1")
    await expect(trainer.locator(".typing")).to_have_count(0)
    await composer(member).press_sequentially("입력 중")
    typing = trainer.locator(".typing")
    await expect(typing).to_be_visible()
    await expect(typing).to_contain_text("Member One")
    await expect(member.locator(".typing")).to_have_count(0)  # not on the typist's own page
    await composer(member).press("Enter")
    await expect(stored_bubbles(trainer, "입력 중")).to_have_count(1)
    await expect(typing).to_have_count(0)
    # Typing again right after sending starts a new bout: it shows at once.
    await composer(member).press_sequentially("다음")
    await expect(typing).to_be_visible()


# ------------------------------------------------ sign-in and sign-out ---

EVIL_PAGES = {
    "/logout": """<!doctype html><form id="f" method="post" action="{base}/distributor/logout"></form>
                  <script>document.getElementById('f').submit()</script>""",
    "/login": """<!doctype html><a id="go" href="{base}/distributor/login?token={token}&next=/distributor/chat?room_id=pt_2">
                 a free protein shake</a><script>document.getElementById('go').click()</script>""",
}


async def start_evil_site(server, attacker_token: str) -> tuple[aiohttp.web.AppRunner, str]:
    """Another site (localhost, not 127.0.0.1: another origin and another site)
    whose pages sign out or sign in whoever opens them."""
    async def page(request):
        html = EVIL_PAGES[request.path].format(base=server.base_url, token=attacker_token)
        return aiohttp.web.Response(text=html, content_type="text/html")

    app = aiohttp.web.Application()
    for path in EVIL_PAGES:
        app.router.add_get(path, page)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "localhost", 0)
    await site.start()
    return runner, f"http://localhost:{runner.addresses[0][1]}"


async def test_another_site_can_neither_sign_a_member_out_nor_in_as_someone_else(
        new_context, server):
    """SPEC 3, as the review proved it in Chromium: a foreign page's auto-submitted
    logout is refused, and its sign-in link only asks (the member stays themselves)."""
    evil, evil_base = await start_evil_site(server, make_token("m2"))
    try:
        page = await open_rooms(new_context, server, "m1")
        await page.goto(f"{evil_base}/logout")
        await expect(page.locator("h1")).to_have_text("403")
        await page.goto(f"{evil_base}/login")
        await expect(page.locator(".confirm-sign-in")).to_be_visible()
        await expect(page.locator(".confirm-sign-in")).to_contain_text("Member One")
        await expect(page.locator(".confirm-sign-in")).to_contain_text("Member Two")
        await page.goto(f"{server.base_url}/distributor/chat/rooms")
        await expect(page.locator(".topbar-side")).to_have_text("Member One")
        # Asked and confirmed on our own page, the link does sign in.
        await page.go_back()
        await page.get_by_role("button", name=re.compile("Member Two")).click()
        await expect(page).to_have_url(re.compile(r"/distributor/chat\?room_id=pt_2$"))
        await expect(page.locator(".connection-online")).to_be_visible()
    finally:
        await evil.cleanup()


async def test_sign_out_forgets_unsent_messages_and_the_sign_in_link(new_context, server):
    """A shared front-desk tablet: after sign-out nothing unsent is left in the
    browser, and the link in its history no longer signs in (SPEC 3)."""
    context = await new_context()
    page = await context.new_page()
    link = login_url(server, "m1", "/distributor/chat/rooms")
    await page.goto(link)
    await expect(page.locator(".rooms-page")).to_be_visible()
    await page.evaluate("""() => localStorage.setItem('distributor_chat:outbox:pt_1:m1',
        JSON.stringify([{client_id: 'c1', type: 'chat', content: '비밀 메모'}]))""")
    await page.get_by_role("button", name="로그아웃").click()
    await expect(page.locator("h1")).to_have_text("401")
    assert await outbox_in_storage(page) == "{}"
    await page.goto(link)
    await expect(page.locator("h1")).to_have_text("401")
    assert not [cookie for cookie in await context.cookies() if cookie["name"] == "distributor_token"]


# ----------------------------------------------- installable app and push ---

async def settles_to(read, expected, timeout_s: float = 10.0):
    """Read (sync or async) until it gives ``expected``, within the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = read()
        if asyncio.iscoroutine(value):
            value = await value
        if value == expected:
            return value
        assert asyncio.get_running_loop().time() < deadline, f"still {value!r}, not {expected!r}"
        await asyncio.sleep(0.05)


async def worker_registration_id(context, page: Page, cdp) -> str:
    """The service worker's registration, as the DevTools protocol names it."""
    registrations = []
    cdp.on("ServiceWorker.workerRegistrationUpdated",
           lambda event: registrations.extend(event["registrations"]))
    await cdp.send("ServiceWorker.enable")
    scope = await page.evaluate("navigator.serviceWorker.ready.then((registration) => registration.scope)")
    await settles_to(lambda: any(r["scopeURL"] == scope for r in registrations), True)
    return next(r["registrationId"] for r in registrations if r["scopeURL"] == scope)


async def test_the_app_is_installable_and_its_worker_serves_the_distributor_scope(
        new_context, server):
    """SPEC 10: a manifest linked from every page and a worker at /distributor/sw.js
    with scope /distributor/; both, and the icons, need no sign-in."""
    page = await open_rooms(new_context, server, "m1")
    cdp = await page.context.new_cdp_session(page)
    manifest = await cdp.send("Page.getAppManifest")
    assert manifest["errors"] == [] and manifest["url"] == f"{server.base_url}/distributor/manifest.webmanifest"
    parsed = manifest["manifest"]
    assert (parsed["startUrl"], parsed["scope"], parsed["display"]) == (
        f"{server.base_url}/distributor/chat/rooms", f"{server.base_url}/distributor/", "kStandalone")
    assert {(icon["sizes"]) for icon in parsed["icons"]} == {"192x192", "512x512"}
    assert '"purpose":"maskable"' in manifest["data"]
    # The only thing Chromium holds against installing here is the test's private window.
    errors = (await cdp.send("Page.getInstallabilityErrors"))["installabilityErrors"]
    assert [error["errorId"] for error in errors] in ([], ["in-incognito"]), errors
    scope = await page.evaluate("navigator.serviceWorker.ready.then((registration) => registration.scope)")
    assert scope == f"{server.base_url}/distributor/"
    async with aiohttp.ClientSession() as http:  # no cookie
        for path, content_type in (("/distributor/manifest.webmanifest", "application/manifest+json"),
                                   ("/distributor/sw.js", "text/javascript"),
                                   ("/distributor/static/icons/icon-192.png", "image/png"),
                                   ("/distributor/static/icons/icon-maskable-512.png", "image/png")):
            async with http.get(server.base_url + path) as response:
                assert (response.status, response.content_type) == (200, content_type), path
    # The chat page links the manifest too.
    chat = await open_chat(new_context, server, "m1")
    assert await chat.locator('link[rel="manifest"]').get_attribute("href") == "/distributor/manifest.webmanifest"


async def test_pushes_show_one_notification_per_room_set_the_badge_and_clear_on_read(
        new_context, server):
    """The real worker gets pushes as the push service would deliver them."""
    context = await new_context()
    await context.grant_permissions(["notifications"], origin=server.base_url)
    page = await context.new_page()
    await page.goto(login_url(server, "m1", "/distributor/chat/rooms"))
    cdp = await context.new_cdp_session(page)
    registration_id = await worker_registration_id(context, page, cdp)
    [worker] = context.service_workers
    # Record the badge the worker sets (the platform's badge is not visible headless).
    await worker.evaluate("""() => {
        self.badges = []
        Object.defineProperty(self.navigator, 'setAppBadge', { configurable: true,
            value: (count) => { self.badges.push(count); return Promise.resolve() } })
        Object.defineProperty(self.navigator, 'clearAppBadge', { configurable: true,
            value: () => { self.badges.push(0); return Promise.resolve() } })
    }""")

    async def deliver(payload: dict) -> None:
        await cdp.send("ServiceWorker.deliverPushMessage", {
            "origin": server.base_url + "/", "registrationId": registration_id,
            "data": __import__("json").dumps(payload)})

    async def shown() -> list:
        return await page.evaluate("""navigator.serviceWorker.ready
            .then((registration) => registration.getNotifications())
            .then((shown) => shown.map((n) => [n.tag, n.title, n.body]).sort())""")

    message = {"type": "message", "message_id": 7, "sender_name": "Coach One"}
    await deliver({**message, "room_id": "pt_1", "preview": "첫 메시지", "unread_total": 1})
    await settles_to(shown, [["pt_1", "Coach One", "첫 메시지"]])
    await deliver({**message, "room_id": "pt_1", "preview": "두 번째", "unread_total": 2})
    await settles_to(shown, [["pt_1", "Coach One", "두 번째"]])  # replaced, not added
    await deliver({**message, "room_id": "pt_2", "preview": "다른 방", "unread_total": 3})
    await settles_to(shown, [["pt_1", "Coach One", "두 번째"], ["pt_2", "Coach One", "다른 방"]])
    assert await worker.evaluate("self.badges") == [1, 2, 3]
    await deliver({"type": "read", "unread_total": 0})
    await settles_to(shown, [])
    assert await worker.evaluate("self.badges") == [1, 2, 3, 0]


async def test_a_notification_tap_goes_to_the_rooms_window_or_a_new_one(new_context, server):
    context = await new_context()
    page = await context.new_page()
    await page.goto(login_url(server, "m1"))  # the chat page of pt_1
    await expect(page.locator(".connection-online")).to_be_visible()
    await page.evaluate("navigator.serviceWorker.ready")
    [worker] = context.service_workers
    room_url = f"{server.base_url}/distributor/chat?room_id=pt_1"
    assert page.url == room_url
    assert await worker.evaluate("self.distributorChat.roomUrl('pt_12')") == \
        f"{server.base_url}/distributor/chat?room_id=pt_12"
    for hostile in ("javascript:alert(1)", "pt_1&x=1", "//evil.example", None):
        assert await worker.evaluate("(id) => self.distributorChat.roomUrl(id)", hostile) == \
            f"{server.base_url}/distributor/chat/rooms"
    # A tap (notificationclick) focuses this window for pt_1; for pt_2 none is open,
    # so it opens one. Focusing and opening need the user's tap itself, so here
    # the choice is checked, as the handler makes it.
    assert await worker.evaluate("self.distributorChat.roomWindow('pt_1').then((c) => c && c.url)") == room_url
    assert await worker.evaluate("self.distributorChat.roomWindow('pt_2').then((c) => c && c.url)") is None


async def test_the_bell_asks_only_on_a_tap_and_turns_push_on_and_off(new_context, server_process,
                                                                    tmp_path):
    """The page subscribes with the server's key and sends the subscription; off
    deletes it. Only PushManager's subscription is stubbed (Chromium reaches its
    push service only over the internet)."""
    push_port = 47123
    server = server_process("--push-allow-host", f"127.0.0.1:{push_port}", "--log-level", "warning")
    endpoint = f"http://127.0.0.1:{push_port}/push/member-phone"
    context = await new_context(locale="en-US")
    await context.grant_permissions(["notifications"], origin=server.base_url)
    await context.add_init_script("""(() => {
        let current = null
        PushManager.prototype.subscribe = async function (options) {
            window.subscribedWith = Array.from(new Uint8Array(options.applicationServerKey))
            current = { endpoint: '%s', unsubscribe: async () => { current = null; return true },
                        toJSON: () => ({ endpoint: '%s', expirationTime: null, keys: {
                            p256dh: 'BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4',
                            auth: 'BTBZMqHH6r4Tts7J_aSIgg' } }) }
            return current
        }
        PushManager.prototype.getSubscription = async function () { return current }
    })()""" % (endpoint, endpoint))
    page = await context.new_page()
    await page.goto(login_url(server, "m1", "/distributor/chat/rooms"))
    bell = page.locator(".bell")
    await expect(bell).to_have_text(re.compile("Notifications off"))
    assert await page.evaluate("window.subscribedWith") is None  # nothing asked before the tap
    await bell.click()
    await expect(bell).to_have_text(re.compile("Notifications on"))
    await expect(bell).to_have_attribute("aria-pressed", "true")
    async with aiohttp.ClientSession() as http:
        async with http.get(server.base_url + "/distributor/push/key") as response:
            public_key = (await response.json())["public_key"]
    key_bytes = list(__import__("base64").urlsafe_b64decode(public_key + "=" * (-len(public_key) % 4)))
    assert await page.evaluate("window.subscribedWith") == key_bytes

    def subscriptions() -> list:
        import sqlite3
        with sqlite3.connect(server.db_path) as db:
            return db.execute("SELECT user_id, endpoint FROM push_subscriptions").fetchall()

    await settles_to(subscriptions, [("m1", endpoint)])
    await bell.click()
    await expect(bell).to_have_text(re.compile("Notifications off"))
    await settles_to(subscriptions, [])
    # On again, then sign out: the tablet's subscription goes with the person.
    await bell.click()
    await expect(bell).to_have_text(re.compile("Notifications on"))
    await settles_to(subscriptions, [("m1", endpoint)])
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.locator("h1")).to_have_text("401")
    await settles_to(subscriptions, [])


async def test_the_offline_page_shows_when_the_server_is_down(new_context, server):
    context = await new_context()
    page = await context.new_page()
    await page.goto(login_url(server, "m1", "/distributor/chat/rooms"))
    await page.evaluate("navigator.serviceWorker.ready")
    await page.reload()  # now controlled by the worker
    assert await page.evaluate("navigator.serviceWorker.controller !== null")
    assert server.stop() == 0
    await page.goto(f"{server.base_url}/distributor/chat/rooms")
    await expect(page.locator("h1")).to_have_text("오프라인")


# ---------------------------------------------------------- accessibility ---

AXE_PATH = ROOT / "tests" / ".axe" / "node_modules" / "axe-core" / "axe.min.js"
AXE_VERSION = "4.14.1"  # .ci/run installs this one
AXE_RULES = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]
SCREENS = {"phone": {"width": 390, "height": 844}, "desktop": {"width": 1280, "height": 800}}


def axe_source() -> str:
    if not AXE_PATH.exists():
        message = f"axe-core is missing: run .ci/run (npm install axe-core@{AXE_VERSION})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    source = AXE_PATH.read_text(encoding="utf-8")
    assert source.startswith(f"/*! axe v{AXE_VERSION}"), source[:40]
    return source


async def axe_violations(page: Page) -> list[dict]:
    await page.add_script_tag(content=axe_source())
    result = await page.evaluate("""(tags) => axe.run(document, { runOnly: { type: 'tag', values: tags },
        resultTypes: ['violations'] })""", AXE_RULES)
    return [{"id": violation["id"], "impact": violation["impact"],
             "nodes": [node["target"] for node in violation["nodes"]]} for violation in result["violations"]]


@pytest.mark.parametrize("screen", SCREENS, ids=SCREENS)
async def test_every_page_passes_axe_on_a_phone_and_a_desktop(new_context, server, screen):
    """SPEC 7: WCAG 2.1 AA and best practice, no violation, on every page."""
    found = {}
    # bypass_csp: the pages refuse inline scripts, axe is injected as one.
    options = {"viewport": SCREENS[screen], "bypass_csp": True}
    for user_id in ("t1", "m1"):
        rooms = await open_rooms(new_context, server, user_id, **options)
        found[f"room list ({user_id})"] = await axe_violations(rooms)
        chat = await open_chat(new_context, server, user_id, **options)
        await chat.locator(".composer textarea").fill("안녕하세요")
        found[f"chat ({user_id})"] = await axe_violations(chat)
    context = await new_context(**options)
    page = await context.new_page()
    await page.goto(f"{server.base_url}/distributor/chat/rooms")
    found["sign-in needed (401)"] = await axe_violations(page)
    await page.goto(login_url(server, "m1", "/distributor/chat/rooms"))
    await page.goto(login_url(server, "m2", "/distributor/chat/rooms"))
    await expect(page.locator(".confirm-sign-in")).to_be_visible()
    found["sign in as someone else?"] = await axe_violations(page)
    await page.goto(f"{server.base_url}/distributor/static/offline.html")
    found["offline"] = await axe_violations(page)
    failing = {page_name: violations for page_name, violations in found.items() if violations}
    assert failing == {}, __import__("json").dumps(failing, ensure_ascii=False, indent=1)
