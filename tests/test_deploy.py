"""The deployment files a gym ships with (SPEC section 8): Debian's nginx runs the
shipped `deploy/nginx.conf` on loopback, in front of a real server process started
with --trust-proxy, and clients sign in, list rooms, chat and read history through
it over TLS; a chat left idle for a minute stays open through it. The systemd unit
is checked by systemd's own verifier and key by key, and its command and environment
start a server that trusts the proxy and stops cleanly on its kill signal.

Only what cannot work on a test machine is changed in the shipped config: the
listen ports (80 and 443 become free ports on 127.0.0.1), the upstream's port and
the certificate (a throwaway self-signed one for 127.0.0.1). Each change is checked
to have happened, so a reworded config fails here instead of being tested half.
"""
from __future__ import annotations

import asyncio
import configparser
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from http.cookies import SimpleCookie
from pathlib import Path, PurePosixPath

import aiohttp
import pytest

from conftest import (ROOT, SERVER_SCRIPT, ack_of, free_port, make_settings, make_token,
                      receive_until, run_cli, seed_gym, send_chat, wait_until)

NGINX = "/usr/sbin/nginx"  # Debian's nginx package
NGINX_SITE = ROOT / "deploy" / "nginx.conf"
UNIT = ROOT / "deploy" / "distributor-chat.service"
STATE_DIRECTORY = PurePosixPath("/var/lib/distributor-chat")
PUBLIC_HOST = "chat.gym.example"  # the name the shipped config serves

TOKEN_COOKIE = "distributor_token"
ROOMS = "/distributor/chat/rooms"
LOGIN = "/distributor/login"
WS_PATH = "/distributor/ws/chat/{}"
MESSAGES = ROOMS + "/{}/messages"

IDLE_S = 60  # past two of the server's 20 s pings, short of nginx's 75 s read timeout


def require_program(path: str | None, name: str) -> str:
    """The program's path; a skip when it is missing, a failure in CI (a CI image
    that lost nginx must not turn these tests into silent skips)."""
    if path and os.access(path, os.X_OK):
        return path
    message = f"{name} is missing: install Debian's {name} package"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# --------------------------------------------------------- the config ---

def replace_once(text: str, pattern: str, replacement: str, what: str) -> str:
    """``pattern`` replaced where it occurs exactly once in the shipped text."""
    changed, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"deploy/nginx.conf: expected one {what} ({pattern!r}), found {count}"
    return changed


def site_for_test(site: str, *, https_port: int, http_port: int, upstream_port: int,
                  cert: Path, key: Path) -> str:
    """The shipped site file with only the machine-specific parts changed."""
    site = replace_once(site, r"^(\s*)listen 80;$", rf"\g<1>listen 127.0.0.1:{http_port};",
                        "plain listen on 80")
    site = replace_once(site, r"^\s*listen \[::\]:80;\n", "", "IPv6 listen on 80")
    site = replace_once(site, r"^(\s*)listen 443 ssl;$",
                        rf"\g<1>listen 127.0.0.1:{https_port} ssl;", "TLS listen on 443")
    site = replace_once(site, r"^\s*listen \[::\]:443 ssl;\n", "", "IPv6 TLS listen on 443")
    site = replace_once(site, r"(upstream distributor_chat \{\s*server 127\.0\.0\.1:)8080;",
                        rf"\g<1>{upstream_port};", "upstream on 127.0.0.1:8080")
    site = replace_once(site, r"^(\s*ssl_certificate)\s+\S+;$", rf"\g<1> {cert};",
                        "ssl_certificate")
    site = replace_once(site, r"^(\s*ssl_certificate_key)\s+\S+;$", rf"\g<1> {key};",
                        "ssl_certificate_key")
    listens = re.findall(r"^\s*listen\s+([^\s;]+)", site, flags=re.MULTILINE)
    assert listens == [f"127.0.0.1:{http_port}", f"127.0.0.1:{https_port}"], listens
    return site


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for 127.0.0.1, made by the openssl CLI."""
    openssl = require_program(shutil.which("openssl"), "openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


MAIN_CONFIG = """\
daemon off;
{user}pid {directory}/nginx.pid;
error_log {directory}/error.log info;
worker_processes 1;
events {{
    worker_connections 512;
}}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    include {site};
}}
"""


class NginxFront:
    """Debian's nginx with the shipped site config, in front of one chat server.
    Everything it writes stays in ``directory``."""

    def __init__(self, directory: Path, upstream_port: int) -> None:
        self.directory = directory
        directory.mkdir()
        self.https_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.https_port:
            self.http_port = free_port()
        self.cert, key = self_signed_certificate(directory)
        site = directory / "distributor-chat.conf"
        site.write_text(site_for_test(NGINX_SITE.read_text(encoding="utf-8"),
                                      https_port=self.https_port, http_port=self.http_port,
                                      upstream_port=upstream_port, cert=self.cert, key=key),
                        encoding="utf-8")
        # As root, nginx would hand its workers to "nobody", who cannot enter a
        # private temporary directory; the workers keep our own user instead.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.config = directory / "nginx.conf"
        self.config.write_text(MAIN_CONFIG.format(user=user, directory=directory, site=site),
                               encoding="utf-8")
        self.ssl_context = ssl.create_default_context(cafile=str(self.cert))
        self.origin = f"https://127.0.0.1:{self.https_port}"
        self.process: subprocess.Popen | None = None

    def url(self, path: str, scheme: str = "https") -> str:
        if scheme == "http":
            return f"http://127.0.0.1:{self.http_port}{path}"
        return f"{scheme}://127.0.0.1:{self.https_port}{path}"

    def output(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            path = self.directory / name
            if path.exists():
                parts.append(f"--- nginx {name}\n" + path.read_text(errors="replace"))
        return "\n".join(parts)

    def start(self, timeout_s: float = 10.0) -> "NginxFront":
        with open(self.directory / "stderr.log", "w") as stderr:
            # A session of its own: if nginx hangs, its workers go with it.
            self.process = subprocess.Popen(
                [NGINX, "-p", str(self.directory), "-c", str(self.config),
                 "-e", str(self.directory / "error.log")],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not port_accepts(self.https_port):
            assert self.process.poll() is None, f"nginx exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"nginx did not listen in time:\n{self.output()}"
            time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # nginx's fast shutdown
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def chat_server(server_process):
    """The chat server as deploy/ runs it: behind the proxy, trusting it."""
    return server_process("--trust-proxy", "--log-level", "warning")


@pytest.fixture
def programs():
    """nginx and openssl, checked before anything starts."""
    require_program(NGINX, "nginx")
    require_program(shutil.which("openssl"), "openssl")


@pytest.fixture
def front(programs, tmp_path, chat_server):
    """nginx with the shipped config on loopback, proxying to ``chat_server``."""
    proxy = NginxFront(tmp_path / "nginx", chat_server.port)
    try:
        yield proxy.start()
    finally:
        proxy.stop()
        print(proxy.output())  # shown when a test failed
        print("--- chat server\n" + chat_server.output())


def browser(front: NginxFront) -> aiohttp.ClientSession:
    """A client that trusts the test certificate and keeps cookies for 127.0.0.1
    (aiohttp's default jar ignores cookies of IP addresses), as a browser would."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=front.ssl_context),
                                 cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(session: aiohttp.ClientSession, front: NginxFront, user_id: str):
    """Follow a sign-in link through the proxy; the cookie it set."""
    token = make_token(user_id)
    response = await session.get(front.url(LOGIN), params={"token": token, "next": ROOMS},
                                 allow_redirects=False)
    assert response.status == 303, await response.text()
    assert response.headers["Location"] == ROOMS
    cookies = SimpleCookie()
    for header in response.headers.getall("Set-Cookie"):
        cookies.load(header)
    cookie = cookies[TOKEN_COOKIE]
    assert cookie.value == token
    return cookie


async def open_room_through(session: aiohttp.ClientSession, front: NginxFront, room_id: str,
                            user_id: str, **options):
    """A socket through the proxy, signed in by the session's cookie and sent
    with the page's own Origin, past welcome and history."""
    ws = await session.ws_connect(f"wss://127.0.0.1:{front.https_port}{WS_PATH.format(room_id)}",
                                  headers={"Origin": front.origin}, **options)
    welcome = await ws.receive_json(timeout=5)
    assert (welcome["type"], welcome["room_id"], welcome["user_id"]) == \
        ("welcome", room_id, user_id), welcome
    history = await ws.receive_json(timeout=5)
    assert history["type"] == "history", history
    return ws, history


# ------------------------------------------------------ through nginx ---

async def test_sign_in_rooms_chat_and_history_through_nginx(front):
    """A gym's members reach the chat only through nginx over TLS: the sign-in
    cookie is Secure (the server learnt https from the proxy), the room list and
    a chat between member and trainer work over wss, a page from another site
    cannot open a socket, the message is in the history, and plain http is sent
    to https."""
    async with browser(front) as member, browser(front) as trainer:
        cookie = await sign_in(member, front, "m1")
        assert cookie["secure"] is True, cookie.OutputString()
        assert cookie["httponly"] is True, cookie.OutputString()
        assert cookie["samesite"] == "Lax", cookie.OutputString()
        assert cookie["path"] == "/distributor", cookie.OutputString()
        await sign_in(trainer, front, "t1")

        response = await member.get(front.url(ROOMS), params={"format": "json"})
        assert response.status == 200, await response.text()
        rooms = (await response.json())["chat_rooms"]
        assert [(room["id"], room["trainer_name"], room["member_name"]) for room in rooms] == \
            [("pt_1", "Coach One", "Member One")]

        member_ws, history = await open_room_through(member, front, "pt_1", "m1")
        assert history["messages"] == []
        trainer_ws, _ = await open_room_through(trainer, front, "pt_1", "t1")
        await send_chat(member_ws, "hello through nginx", "c1")
        ack = await ack_of(member_ws, "c1")
        assert type(ack["id"]) is int, ack
        chat = await receive_until(trainer_ws, lambda frame: frame["type"] == "chat")
        assert (chat["id"], chat["room_id"], chat["user_id"], chat["sender_name"],
                chat["content"], chat["client_id"]) == \
            (ack["id"], "pt_1", "m1", "Member One", "hello through nginx", "c1")
        await member_ws.close()
        await trainer_ws.close()

        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await member.ws_connect(f"wss://127.0.0.1:{front.https_port}{WS_PATH.format('pt_1')}",
                                    headers={"Origin": "https://evil.example"})
        assert refused.value.status == 403

        response = await member.get(front.url(MESSAGES.format("pt_1")), params={"after": "0"})
        assert response.status == 200, await response.text()
        messages = (await response.json())["messages"]
        assert [(message["id"], message["user_id"], message["content"])
                for message in messages] == [(ack["id"], "m1", "hello through nginx")]

    async with aiohttp.ClientSession() as plain:
        response = await plain.get(front.url(ROOMS + "?format=json", scheme="http"),
                                   headers={"Host": PUBLIC_HOST}, allow_redirects=False)
        assert response.status == 301
        assert response.headers["Location"] == f"https://{PUBLIC_HOST}{ROOMS}?format=json"


def noisy_jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG that does not compress: several MiB for a phone's size."""
    from PIL import Image
    picture = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=95)
    return out.getvalue()


async def test_a_phone_photo_uploads_and_is_seen_through_nginx(front):
    """A member's photo of several MiB goes up through nginx (its body limit
    fits a photo, the upload streams through), is sent in the room, and the
    trainer gets it from its address; a body past the server's limit is the
    server's own 413, not nginx's."""
    photo_bytes = noisy_jpeg(3000, 2000)
    assert 5 * 1024 * 1024 < len(photo_bytes) < 10 * 1024 * 1024, len(photo_bytes)
    upload_url = front.url(ROOMS + "/pt_1/photos")
    async with browser(front) as member, browser(front) as trainer:
        await sign_in(member, front, "m1")
        await sign_in(trainer, front, "t1")
        form = aiohttp.FormData()
        form.add_field("photo", photo_bytes, filename="IMG_0001.JPG", content_type="image/jpeg")
        response = await member.post(upload_url, data=form, headers={"Origin": front.origin})
        assert response.status == 201, await response.text()
        uploaded = await response.json()
        assert (uploaded["width"], uploaded["height"]) == (2048, 1365), uploaded

        member_ws, _ = await open_room_through(member, front, "pt_1", "m1")
        trainer_ws, _ = await open_room_through(trainer, front, "pt_1", "t1")
        await send_chat(member_ws, "", "p1", photo_id=uploaded["photo_id"])
        ack = await ack_of(member_ws, "p1")
        chat = await receive_until(trainer_ws, lambda frame: frame["type"] == "chat")
        assert (chat["id"], chat["content"], chat["photo"]) == \
            (ack["id"], "", {"id": uploaded["photo_id"], "width": 2048, "height": 1365})
        await member_ws.close()
        await trainer_ws.close()

        response = await trainer.get(front.url(f"/distributor/chat/photos/{uploaded['photo_id']}"))
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/jpeg"
        assert response.headers["Cache-Control"] == "private, max-age=31536000, immutable"
        assert (await response.read())[:3] == b"\xff\xd8\xff"

        too_large = aiohttp.FormData()
        too_large.add_field("photo", b"\xff" * (11 * 1024 * 1024), filename="big.jpg",
                            content_type="image/jpeg")
        response = await member.post(upload_url, data=too_large, headers={"Origin": front.origin})
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "too_large"


async def test_no_answer_through_nginx_names_a_version(front):
    """SPEC 4: no answer names server software versions. Through the deployment a
    client meets nginx's own answers too: the redirect on port 80, a path outside
    the app, and the app's answers with nginx's Server header in place of ours."""
    async with browser(front) as session:
        answers = [await session.get(front.url(ROOMS + "?format=json")),
                   await session.get(front.url("/no-such-page")),
                   await session.get(front.url(ROOMS, scheme="http"), allow_redirects=False)]
        for response in answers:
            body = await response.text()
            server = response.headers.get("Server", "")
            where = f"{response.method} {response.url} -> {response.status}"
            assert not re.search(r"\d", server), f"{where}: Server: {server}"
            assert not re.search(r"nginx/\d", body), f"{where}: {body}"


async def test_idle_chat_through_nginx_stays_open_for_a_minute(front):
    """A member who leaves the chat open and says nothing for a minute can still
    send: the server's pings and the client's pongs cross nginx (the server drops a
    peer that leaves a ping unanswered), and nginx does not time the tunnel out.
    Takes a minute."""
    async with browser(front) as member:
        await sign_in(member, front, "m1")
        ws, _ = await open_room_through(member, front, "pt_1", "m1",
                                        heartbeat=None, autoping=True)
        # A pending receive() is what answers pings; it must see nothing for a minute.
        next_frame = asyncio.ensure_future(ws.receive())
        done, _ = await asyncio.wait({next_frame}, timeout=IDLE_S)
        assert not done, f"the socket ended while idle: {next_frame.result()}"
        await send_chat(ws, "still here", "idle-1")
        first = await asyncio.wait_for(next_frame, timeout=5)
        assert first.type == aiohttp.WSMsgType.TEXT, first
        frame = json.loads(first.data)
        if frame["type"] != "ack":  # the room's copy of the message may come first
            assert (frame["type"], frame["client_id"]) == ("chat", "idle-1"), frame
            frame = await ack_of(ws, "idle-1")
        assert (frame["type"], frame["client_id"], type(frame["id"])) == ("ack", "idle-1", int)
        await ws.close()


# ------------------------------------------------------- systemd unit ---

class RepeatedKeys(dict):
    """Section contents that keep every value of a repeated key (Environment=),
    joined by newlines, as systemd reads them."""

    def __setitem__(self, key, value):
        if isinstance(value, list) and isinstance(self.get(key), list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, dict_type=RepeatedKeys,
                                     comment_prefixes=("#", ";"), empty_lines_in_values=False)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return unit


def unit_environment(service: configparser.SectionProxy) -> dict[str, str]:
    environment = {}
    for line in service.get("Environment", "").splitlines():
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            environment[name] = value
    return environment


SPAN_UNITS = {"ms": 0.001, "": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def seconds_of(span: str) -> float:
    """A systemd time span ("15", "15s", "1min 30s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]*)+\s*", span), span
    assert all(unit in SPAN_UNITS for _, unit in parts), span
    return sum(float(number) * SPAN_UNITS[unit] for number, unit in parts)


def local_command(exec_start: str) -> list[str]:
    """The unit's command with its interpreter and program as on this machine."""
    argv = shlex.split(exec_start)
    assert Path(argv[1]).name == "distributor_chat.py", argv
    assert Path(argv[0]).name.startswith("python"), argv
    return [sys.executable, str(SERVER_SCRIPT), *argv[2:]]


def test_systemd_unit_gives_the_server_a_user_state_and_restarts(tmp_path):
    """What an operator relies on from the unit: systemd accepts it, the server
    runs as a user of its own with its data in a state directory, is restarted
    when it fails, gets SIGTERM with more than its 5 s to finish, listens where
    nginx's upstream points, trusts that proxy, and starts at boot."""
    text = UNIT.read_text(encoding="utf-8")
    unit = read_unit(UNIT)
    service = unit["Service"]

    analyze = shutil.which("systemd-analyze")
    if analyze:
        local = tmp_path / UNIT.name
        local_text, count = re.subn(r"^ExecStart=.*$",
                                    "ExecStart=" + shlex.join(local_command(service["ExecStart"])),
                                    text, flags=re.MULTILINE)
        assert count == 1
        local.write_text(local_text, encoding="utf-8")
        verified = subprocess.run([analyze, "verify", str(local)], capture_output=True,
                                  text=True, timeout=60)
        output = verified.stdout + verified.stderr
        print(output)
        assert verified.returncode == 0, output
        assert [line for line in output.splitlines() if UNIT.name in line] == [], output

    assert service.get("DynamicUser") == "yes" or service.get("User", "root") != "root", \
        dict(service)
    assert service["StateDirectory"] == "distributor-chat"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert seconds_of(service["TimeoutStopSec"]) > 5
    local_command(service["ExecStart"])  # runs distributor_chat.py with a Python
    environment = unit_environment(service)
    database = PurePosixPath(environment["DISTRIBUTOR_DB"])
    assert database.is_absolute() and database.is_relative_to(STATE_DIRECTORY), database
    assert environment["DISTRIBUTOR_TRUST_PROXY"] == "1"
    assert environment["DISTRIBUTOR_HOST"] == "127.0.0.1"
    upstream = re.search(r"upstream distributor_chat \{\s*server ([\d.]+:\d+);",
                         NGINX_SITE.read_text(encoding="utf-8"))
    assert upstream, "deploy/nginx.conf has no upstream distributor_chat"
    listen = f"{environment['DISTRIBUTOR_HOST']}:{environment.get('DISTRIBUTOR_PORT', '8080')}"
    assert upstream[1] == listen, "nginx's upstream is not where the unit's server listens"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


async def test_systemd_units_command_serves_behind_the_proxy_and_stops_on_its_signal(tmp_path):
    """The unit's own command and environment (its paths moved into a scratch
    state directory) start a server that prints sign-in links for the public
    address, takes https from the proxy's header, logs JSON, and exits 0 within
    5 s of the unit's kill signal, well inside TimeoutStopSec."""
    service = read_unit(UNIT)["Service"]
    environment = unit_environment(service)
    state = tmp_path / "state"
    state.mkdir()
    database = state / PurePosixPath(environment["DISTRIBUTOR_DB"]).name
    seed_gym(make_settings(tmp_path, db_path=database, secret=None))
    port = free_port()
    environment.update(DISTRIBUTOR_DB=str(database), DISTRIBUTOR_PORT=str(port))
    env = {name: value for name, value in os.environ.items() if not name.startswith("DISTRIBUTOR_")}
    env.update(environment)

    link = run_cli("token", "m1", db_path=database, env=environment)
    assert link.returncode == 0, link.stderr
    public_url = environment["DISTRIBUTOR_PUBLIC_URL"]
    found = re.search(re.escape(public_url) + r"/distributor/login\?token=([\w.-]+)", link.stdout)
    assert found, link.stdout
    token = found[1]

    log_path = state / "server.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(local_command(service["ExecStart"]), cwd=state, env=env,
                                   stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    try:
        await wait_until(lambda: process.poll() is not None or port_accepts(port), timeout_s=10)
        assert process.poll() is None, log_path.read_text()
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}{LOGIN}"
            behind_tls = await session.get(url, params={"token": token}, allow_redirects=False,
                                           headers={"X-Forwarded-Proto": "https",
                                                    "X-Forwarded-For": "203.0.113.7"})
            plain = await session.get(url, params={"token": token}, allow_redirects=False)
        assert (behind_tls.status, plain.status) == (303, 303)
        assert behind_tls.cookies[TOKEN_COOKIE]["secure"] is True
        assert not plain.cookies[TOKEN_COOKIE]["secure"]

        started = time.monotonic()
        process.send_signal(signal.Signals[service["KillSignal"]])
        assert process.wait(timeout=seconds_of(service["TimeoutStopSec"])) == 0, \
            log_path.read_text()
        assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    events = [json.loads(line) for line in log_path.read_text().splitlines()
              if line.startswith("{")]
    start = next(event for event in events if event["event"] == "server_start")
    assert (start["host"], start["port"]) == ("127.0.0.1", port), start
    assert events[-1]["event"] == "server_stop", events
