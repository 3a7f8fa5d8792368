"""The page of ``moshi-ttt serve`` in a real browser: headless Chromium (the system's, driven by
Playwright) against ``moshi-ttt serve --tiny`` with the end-to-end and recall memories, the
microphone a generated wav (Chromium's fake media stream).

It talks (audio and text come back, the memory panel updates), resets the memory, disconnects,
reloads, resumes the same session (the server restores it; the panel's history is back), shrugs
off malformed memory messages, and shows each error state: server full (1013), unknown token
(1008), no microphone permission, plain http from another host, lost connection.

``MOSHI_TTT_SCREENSHOT=1`` also writes the page as ``docs/figures/serve_page.png`` (the figure of
docs/serving.md). Skipped, with one line saying why, without Chromium or Playwright (``.ci/run``
installs Chromium; ``MOSHI_TTT_CHROMIUM`` names another executable).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("MOSHI_TTT_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the dev extras install it
    sync_playwright = None
if CHROMIUM is None or sync_playwright is None:
    pytest.skip(
        "browser test of the serve page skipped: "
        + ("no Chromium (apt-get install chromium)" if CHROMIUM is None else "no playwright")
        + "; .ci/run installs it",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "figures" / "serve_page.png"
OTHER_HOST = "gpu-box.test"  # resolved to 127.0.0.1 by Chromium only: an insecure origin
WAIT_MS = 30_000
E2E_YAML = """\
kind: e2e
layers: top:1
e2e_hidden: 64
e2e_chunk: 4
e2e_lr: 0.3
recall_keys: 256
recall_active: 8
recall_context: 4
"""
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--autoplay-policy=no-user-gesture-required",
                 f"--host-resolver-rules=MAP {OTHER_HOST} 127.0.0.1"]  # fmt: skip


def voice_wav(path: Path, seconds: float = 30.0, rate: int = 48000) -> Path:
    """Speech-like audio: three tones under a syllable-rate envelope, 16-bit mono."""
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * f * t) for f in (180.0, 420.0, 760.0))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 1.7 * t)) / 3
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.5 * 32767 * x).astype("<i2").tobytes())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``moshi-ttt serve --tiny`` with the memories, one conversation at most, in a process."""

    def __init__(self, tmp: Path, ttt_yaml: str | None = E2E_YAML):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        cmd = [sys.executable, "-m", "moshi_ttt.cli", "serve", "--tiny", "--host", "127.0.0.1",
               "--port", str(self.port), "--max-sessions", "1", "--state-dir",
               str(tmp / "states"), "--greedy"]  # fmt: skip
        if ttt_yaml is not None:  # else --tiny's default: a gated TTT-Linear layer
            (tmp / "ttt.yaml").write_text(ttt_yaml)
            cmd += ["--ttt-config", str(tmp / "ttt.yaml")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.wait(lambda: self.stats() is not None, "the server", 120)

    def stats(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"{self.url}/api/stats", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def wait(self, pred, what: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None and what != "the server to die":
                raise AssertionError(f"server exited: {self.log.read_text()[-2000:]}")
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def idle(self) -> None:
        """No conversation open, and the last one saved: the seat is free."""
        self.wait(lambda: (self.stats() or {}).get("sessions") == 0, "a free seat")
        time.sleep(0.3)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"))
    yield s
    s.kill()


@pytest.fixture(scope="module")
def playwright():
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright, tmp_path_factory):
    wav = voice_wav(tmp_path_factory.mktemp("mic") / "voice.wav")
    flags = BROWSER_FLAGS + ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                             f"--use-file-for-fake-audio-capture={wav}"]  # fmt: skip
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=flags, headless=True)
    yield b
    b.close()


def new_page(browser):
    """A page in a context of its own (its own storage); its uncaught errors in ``errors``."""
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    p = context.new_page()
    p.errors = []
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    return p


@pytest.fixture
def page(browser):
    p = new_page(browser)
    yield p
    assert p.errors == []  # uncaught exceptions of the page: none, ever
    p.context.close()


def state(page, expr: str):
    return page.evaluate(f"() => window.moshiTTT.{expr}")


def until(page, condition: str, timeout: int = WAIT_MS) -> None:
    page.wait_for_function(f"() => {{ const s = window.moshiTTT.state; return {condition}; }}",
                           timeout=timeout)  # fmt: skip


def notice(page, kind: str) -> str:
    """Wait for the page to show the state ``kind``; its text."""
    try:
        page.wait_for_selector(f'#notice[data-kind="{kind}"]:not([hidden])', timeout=WAIT_MS)
    except Exception as e:
        shown = page.evaluate("() => JSON.stringify(window.moshiTTT.state.message)")
        raise AssertionError(f"expected the page to show {kind!r}; it shows {shown}") from e
    return page.inner_text("#notice")


def test_talk_watch_reset_and_resume_the_memory(server, page):
    server.idle()
    page.goto(server.url)
    assert page.inner_text("#status") == "not connected"
    page.click("#new")
    until(page, "s.phase === 'connected' && s.memoryMessages > 0")
    token = state(page, "state.token")
    assert page.inner_text("#token") == token
    assert page.evaluate("() => localStorage.getItem('moshi-ttt.session')") == token
    # Moshi answers (audio decoded, text shown) and the memory learns (updates scored)
    until(page, "window.moshiTTT.audioSamples() > 24000 && s.textPieces > 0")
    until(page, "s.memory.events.filter(e => e.before !== null).length >= 3")
    assert page.inner_text("#transcript").strip()
    assert int(page.inner_text("#m-updates")) >= 3 and page.is_visible("#plot-learned")
    assert "→" in page.inner_text("#m-learned") and page.inner_text("#kinds") == "e2e, recall"
    memory = state(page, "state.memory")
    assert all(e["after"] < e["before"] for e in memory["events"] if e["before"] is not None)
    assert memory["points"][-1]["e2e_distance"] > 0 and "frame_ms" in memory["points"][-1]
    # the memory only is reset; the conversation goes on and the memory learns again
    page.click("#reset-memory")
    until(page, "s.memory.counters.resets === 1")
    updates = state(page, "state.memory.counters.updates")
    until(page, f"s.memory.counters.updates >= {updates + 2}")
    if os.environ.get("MOSHI_TTT_SCREENSHOT") == "1":
        page.wait_for_timeout(8000)  # a few more seconds of conversation on the plots
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
    # malformed memory messages are ignored, and the page goes on
    page.evaluate("""() => {
        const enc = (s) => new TextEncoder().encode(s);
        for (const body of ["not json", "null", "[1,2]", '{"points": 5, "events": "x"}',
                            '{"points": [{"t": "x"}, {"t": 1, "gate": 1e999}], "updates": -3}',
                            '{"t": 1e999, "frame_ms": [], "kinds": "e2e"}']) {
            const b = enc(body), m = new Uint8Array(b.length + 1);
            m[0] = 0x10; m.set(b, 1);
            window.moshiTTT.receive(m.buffer);
        }
        window.moshiTTT.receive(new Uint8Array([0x10, 0xff, 0xfe, 0x00]).buffer);
        window.moshiTTT.receive(new Uint8Array([0x42, 1, 2, 3]).buffer);
        window.moshiTTT.receive(new Uint8Array([]).buffer);
    }""")
    assert state(page, "state.badMemoryMessages") == 4  # not JSON, null, a list, bad UTF-8
    assert "malformed" in page.inner_text("#bad-memory")
    seen = state(page, "state.memoryMessages")
    until(page, f"s.memoryMessages > {seen + 2} && s.phase === 'connected'")
    # disconnect: the server saves the conversation under its token
    updates = state(page, "state.memory.counters.updates")
    page.click("#disconnect")
    assert "press Resume" in notice(page, "disconnected")
    server.wait(lambda: server.stats()["saved"] >= 1, "the saved conversation")
    server.idle()
    # a reload resumes it (the token from the browser's storage): memory and panel are back
    page.reload()
    assert page.inner_text("#token") == token
    page.click("#resume")
    until(page, "s.phase === 'connected' && s.resumed")
    assert page.is_visible("#resumed") and page.inner_text("#status") == "connected (resumed)"
    assert state(page, "state.memory.counters.updates") >= updates
    assert state(page, "state.memory.counters.resets") == 1
    assert len(state(page, "state.memory.points")) >= len(memory["points"])
    assert server.stats()["restored"] == 1
    # the resume link in another browser (no storage) takes the same conversation over
    other = new_page(page.context.browser)
    try:
        other.goto(f"{server.url}/?session={token}")
        other.click("#resume")
        until(other, "s.phase === 'connected' && s.resumed")
        assert "Another tab or window resumed it" in notice(page, "replaced")
        assert server.stats()["restored"] == 2
        other.click("#disconnect")
        notice(other, "disconnected")
        assert other.errors == []
    finally:
        other.context.close()
    final = server.stats()
    assert final["bad_clients"] == 0 and final["frames"] > 20  # the browser's Ogg/Opus: taken


def test_gated_ttt_layers_on_the_panel(browser, tmp_path):
    """``moshi-ttt serve --tiny`` as it comes (a gated TTT-Linear layer): the panel plots its
    gate and the inner loss before and after each step."""
    server = Server(tmp_path, ttt_yaml=None)
    page = new_page(browser)
    try:
        page.goto(server.url)
        page.click("#new")
        until(page, "s.phase === 'connected' && s.memory.kinds.includes('gated')")
        until(page, "s.memory.points.filter(p => 'inner_before' in p).length >= 3")
        assert page.is_visible("#plot-gated") and not page.is_visible("#plot-learned")
        points = [p for p in state(page, "state.memory.points") if "inner_before" in p]
        assert all(-1 <= p["gate"] <= 1 and p["inner_after"] < p["inner_before"] for p in points)
        assert page.inner_text("#kinds") == "gated"
        assert page.errors == []
    finally:
        page.context.close()
        server.kill()


def test_ogg_pages_agree_with_sphn(server, page):
    """The page's Ogg reader takes sphn's pages apart (their CRCs recomputed equal), and the
    pages its writer builds from those packets decode in sphn to the same audio."""
    import sphn

    pcm = (0.3 * np.sin(np.arange(1920 * 12) / 7)).astype(np.float32)
    writer = sphn.OpusStreamWriter(24000)
    ogg = b"".join(writer.append_pcm(pcm[i : i + 1920]) for i in range(0, len(pcm), 1920))
    page.goto(server.url)
    out = page.evaluate(
        """async (bytes) => {
        const ogg = await import("./ogg.js");
        const data = Uint8Array.from(bytes);
        const reader = new ogg.OggReader();
        const packets = [];  // fed in odd pieces, as a websocket may
        for (let at = 0; at < data.length; at += 97) {
            packets.push(...reader.push(data.subarray(at, at + 97)));
        }
        let at = 0, crcs = 0;
        while (at < data.length) {  // every page's CRC, recomputed
            const n = data[at + 26];
            let size = 27 + n;
            for (let i = 0; i < n; i++) size += data[at + 27 + i];
            const page = data.slice(at, at + size);
            const want = new DataView(page.buffer).getUint32(22, true);
            new DataView(page.buffer).setUint32(22, 0, true);
            if (ogg.oggCrc(page) !== want) return {error: `CRC of the page at ${at}`};
            crcs += 1;
            at += size;
        }
        const w = new ogg.OggOpusWriter(24000);
        const out = [...w.headers()];
        for (const p of packets) if (!ogg.isOpusHeader(p)) out.push(w.packet(p, 960 * 2));
        return {crcs, heads: packets.filter(ogg.isOpusHeader).length, audio: packets.length - 2,
                pages: out.map((p) => Array.from(p))};
    }""",
        list(ogg),
    )
    assert "error" not in out, out
    assert out["crcs"] >= 3 and out["heads"] == 2 and out["audio"] > 0
    ours = sphn.OpusStreamReader(24000)
    decoded = np.concatenate([ours.append_bytes(bytes(p)) for p in out["pages"]])
    theirs = sphn.OpusStreamReader(24000).append_bytes(ogg)
    assert decoded.size == theirs.size > 0 and np.array_equal(decoded, theirs)


def test_an_unknown_token_says_to_start_a_new_conversation(server, page):
    server.idle()
    page.goto(f"{server.url}/?session=bogus-token")
    assert page.inner_text("#token") == "bogus-token"
    page.click("#resume")
    assert "Start a new conversation" in notice(page, "token")
    assert page.is_enabled("#new")


def test_a_full_server_says_to_try_again_later(server, page):
    server.idle()
    import aiohttp

    held, release = threading.Event(), threading.Event()

    def occupy():  # another client holds the only seat
        async def go():
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(f"{server.url}/api/chat") as ws,
            ):
                assert await ws.receive_bytes() == b"\x00"
                held.set()
                while not release.is_set():
                    await asyncio.sleep(0.05)

        asyncio.run(go())

    thread = threading.Thread(target=occupy, daemon=True)
    thread.start()
    try:
        assert held.wait(30)
        page.goto(server.url)
        page.click("#new")
        text = notice(page, "full")
        assert "--max-sessions" in text and "Try again" in text
    finally:
        release.set()
        thread.join(30)


def test_no_microphone_permission(server, playwright, tmp_path):
    """Without the fake consent UI, the headless browser denies the microphone."""
    wav = voice_wav(tmp_path / "voice.wav", seconds=2)
    flags = BROWSER_FLAGS + ["--use-fake-device-for-media-stream",
                             f"--use-file-for-fake-audio-capture={wav}"]  # fmt: skip
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=flags, headless=True)
    try:
        page = b.new_page()
        page.goto(server.url)
        page.click("#new")
        assert "Allow it" in notice(page, "mic-denied")
        assert page.is_enabled("#new")
    finally:
        b.close()


def test_plain_http_from_another_host_says_why_and_how(server, page):
    page.goto(f"http://{OTHER_HOST}:{server.port}/")
    text = notice(page, "insecure")
    assert f"ssh -L {server.port}:localhost:{server.port}" in text and "https" in text
    page.click("#new")  # still says so, and connects to nothing
    notice(page, "insecure")
    assert state(page, "state.phase") == "idle"


def test_a_lost_connection_says_how_to_resume(server, page):
    """Last: the server is killed mid-conversation."""
    server.idle()
    page.goto(server.url)
    page.click("#new")
    until(page, "s.phase === 'connected' && s.memoryMessages > 0 && s.sentPages > 0")
    server.kill()
    assert "press Resume once the server is back" in notice(page, "lost")
    page.click("#resume")  # the server is still down
    assert "Check that moshi-ttt serve is running" in notice(page, "unreachable")
