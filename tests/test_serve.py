"""``moshi-ttt serve`` on the tiny model over loopback: moshi's protocol, isolation, resume,
refusal and bad clients. Clients are protocol-level (aiohttp websocket + sphn Opus)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import socket
import struct
import time

import aiohttp
import numpy as np
import pytest
import sphn
import torch
from moshi.utils.compile import no_compile
from safetensors.torch import load_file

from moshi_ttt.integration import TTTConfig, apply_ttt
from moshi_ttt.models.load import load_base_lm, load_codec
from moshi_ttt.serve import ChatServer, ServeConfig, ServerThread, SessionStore, ttt_state
from moshi_ttt.serve.engine import load_ttt_state
from moshi_ttt.serve.server import SESSION_ID_HEADER

FRAME, RATE = 1920, 24000
DEADLINE_S = 30.0  # every wait in these tests is bounded


def load_tiny():
    """The tiny Moshi with the default TTT layer, its Mimi and tokenizer."""
    model = load_base_lm("tiny", dtype=torch.float32)
    lm = model.lm
    apply_ttt(lm, TTTConfig())
    lm.eval()
    mimi, tokenizer = load_codec(model)
    return lm, mimi, tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 OpenMP threads stall on a busy 2-core VM
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load_tiny()  # streaming in the module's shared server


def make_server(model, tmp_path, **kw):
    lm, mimi, tok = model
    cfg = ServeConfig(
        greedy=True, max_backlog_frames=1000, send_buffer_bytes=4096, send_timeout_s=1.0, **kw
    )
    return ServerThread(ChatServer(lm, mimi, tok, cfg, SessionStore(tmp_path / "states")))


def audio(seed: int, frames: int) -> np.ndarray:
    """Synthetic speech-like audio: a few seeded tones with an envelope, and noise."""
    g = np.random.default_rng(seed)
    t = np.arange(frames * FRAME) / RATE
    x = sum(0.1 * np.sin(2 * np.pi * f * t) for f in g.uniform(120, 900, 3))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * g.uniform(1, 3) * t)) + 0.01 * g.normal(size=t.size)
    return x.astype(np.float32)


def opus_pages(pcm: np.ndarray) -> list[bytes]:
    """The pcm as a client sends it: one Ogg/Opus chunk per 80 ms frame."""
    w = sphn.OpusStreamWriter(RATE)
    pages = [w.append_pcm(pcm[i : i + FRAME]) for i in range(0, len(pcm), FRAME)]
    return [p for p in pages if len(p)]


def opus_roundtrip(pcm: np.ndarray) -> np.ndarray:
    """What the server decodes from ``opus_pages(pcm)``."""
    r = sphn.OpusStreamReader(RATE)
    return np.concatenate([r.append_bytes(p) for p in opus_pages(pcm)])


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, DEADLINE_S))


async def stats(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/api/stats") as r:
        return await r.json()


async def wait_for(pred, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def converse(url: str, pcm: np.ndarray, query: str = "", hold: asyncio.Event | None = None):
    """Connect, stream ``pcm`` through Opus, collect everything until the server has answered
    every frame. Returns ``{"audio": bytes, "text": [str], "frames": n, "kinds": set}``."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/api/chat{query}") as ws:
            first = await ws.receive_bytes()
            assert first == b"\x00"  # moshi's handshake
            sid = int(ws._response.headers[SESSION_ID_HEADER])
            if hold is not None:
                await hold.wait()
            for page in opus_pages(pcm):
                await ws.send_bytes(b"\x01" + page)
            frames = len(opus_roundtrip(pcm)) // FRAME
            audio_out, text, kinds = b"", [], set()

            async def answered() -> bool:
                mine = [s for s in (await stats(http, url))["per_session"] if s["id"] == sid]
                return bool(mine) and mine[0]["frames_out"] >= frames - 1  # LMGen's delay: 1

            receiving = asyncio.ensure_future(wait_for(answered, "all frames answered"))
            while True:
                try:
                    msg = await asyncio.wait_for(ws.receive(), 0.3 if receiving.done() else 5)
                except asyncio.TimeoutError:
                    if receiving.done():
                        break
                    continue
                assert msg.type == aiohttp.WSMsgType.BINARY, msg
                kinds.add(msg.data[0])
                if msg.data[0] == 1:
                    audio_out += msg.data[1:]
                elif msg.data[0] == 2:
                    text.append(msg.data[1:].decode())
            receiving.result()
        return {"audio": audio_out, "text": text, "frames": frames, "kinds": kinds, "id": sid}


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    with make_server(
        model,
        tmp_path_factory.mktemp("serve"),
        max_sessions=3,
        max_message_bytes=1 << 16,
        max_send_backlog=8,
    ) as t:
        yield t


@pytest.fixture(scope="module")
def alone(server):
    """Each test voice, streamed alone (greedy), on the shared server."""
    return {seed: run(converse(server.url, audio(seed, 25))) for seed in (1, 2)}


def test_streams_audio_and_text_with_moshis_protocol(server, alone):
    out = alone[1]
    assert out["kinds"] == {1, 2} and out["text"]  # Opus audio and text pieces
    pcm = sphn.OpusStreamReader(RATE).append_bytes(out["audio"])
    assert pcm.size > 10 * FRAME and np.isfinite(pcm).all()

    async def check():
        async with aiohttp.ClientSession() as http:
            return await stats(http, server.url)

    s = run(check())
    assert s["budget_ms"] == 80 and s["frame_ms"]["p50"] > 0 and s["frame_ms"]["p99"] > 0
    assert s["frames"] >= 24 and s["frames_dropped"] == 0 and s["max_sessions"] == 3


def test_two_simultaneous_clients_each_get_what_they_get_alone(server, alone):
    async def both():
        go = asyncio.Event()
        tasks = [
            asyncio.ensure_future(converse(server.url, audio(seed, 25), hold=go)) for seed in (1, 2)
        ]
        await asyncio.sleep(0.3)  # both connected, then both stream at once
        go.set()
        return await asyncio.gather(*tasks)

    a, b = run(both())
    assert a["text"] == alone[1]["text"] and a["audio"] == alone[1]["audio"]
    assert b["text"] == alone[2]["text"] and b["audio"] == alone[2]["audio"]
    assert alone[1]["text"] != alone[2]["text"] or alone[1]["audio"] != alone[2]["audio"]


# -- bad clients --------------------------------------------------------------------------------
def ws_frame(payload: bytes, opcode: int = 2) -> bytes:
    """A masked client websocket frame."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def raw_client(url: str, rcvbuf: int = 4096) -> socket.socket:
    """A websocket client on a plain socket with a tiny receive buffer; handshake read."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /api/chat HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(1)
    assert b" 101 " in data.split(b"\r\n")[0]
    assert sock.recv(3) == b"\x82\x01\x00"  # the handshake message 0x00
    return sock


async def bad_ws(url: str, send) -> int | None:
    """Connect with aiohttp, wait for the handshake, ``send(ws)``; the server's close code."""
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/api/chat") as ws:
        assert await ws.receive_bytes() == b"\x00"
        await send(ws)
        for _ in range(1000):
            msg = await ws.receive()
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                return ws.close_code
        return None


def test_bad_clients_are_closed_and_others_go_on_unchanged(server, alone):
    async def not_reading() -> str:
        def go():
            sock = raw_client(server.url)
            end = time.monotonic() + 10
            try:  # stream, never read, until the server gives up on us (bounded)
                for page in opus_pages(audio(5, 400)):
                    sock.sendall(ws_frame(b"\x01" + page))
                    time.sleep(0.01)
                    if time.monotonic() > end:
                        break
            except OSError as e:  # closed by the server: what we want
                return type(e).__name__
            finally:
                sock.close()
            return "sent"

        return await asyncio.to_thread(go)

    async def gone_mid_frame() -> None:
        def go():
            sock = raw_client(server.url)
            pages = opus_pages(audio(6, 10))
            for page in pages[:4]:
                sock.sendall(ws_frame(b"\x01" + page))
            sock.sendall(ws_frame(b"\x01" + pages[4])[:20])  # half a message, then RST
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        await asyncio.to_thread(go)

    async def text(ws):
        await ws.send_str("hello")

    async def garbage(ws):
        await ws.send_bytes(os.urandom(64))

    async def unknown_kind(ws):
        await ws.send_bytes(b"\x05" + opus_pages(audio(3, 2))[0])

    async def oversized(ws):
        await ws.send_bytes(b"\x01" + b"OggS" + bytes(100_000))

    async def not_opus(ws):
        await ws.send_bytes(b"\x01" + b"RIFF" + os.urandom(200))

    async def ogg_garbage(ws):
        await ws.send_bytes(b"\x01" + b"OggS" + os.urandom(300))

    async def everything():
        good = asyncio.ensure_future(converse(server.url, audio(1, 25)))
        await asyncio.sleep(0.2)
        codes = []
        for send in (text, garbage, unknown_kind, oversized, not_opus, ogg_garbage):
            codes.append(await bad_ws(server.url, send))
        stalled = asyncio.ensure_future(not_reading())
        await gone_mid_frame()
        out = await good
        return out, codes, await stalled

    out, codes, stalled = run(everything())
    assert codes[:3] == [1003, 1003, 1003] and codes[3] == 1009 and codes[4:] == [1003, 1003]
    assert stalled != "sent"  # the server closed the client that stopped reading

    async def final():
        async with aiohttp.ClientSession() as http:

            async def settled():
                return (await stats(http, server.url))["sessions"] == 0

            await wait_for(settled, "every bad session closed")
            return await stats(http, server.url)

    s = run(final())
    assert s["not_reading"] >= 1 and s["bad_clients"] >= 7
    assert out["text"] == alone[1]["text"] and out["audio"] == alone[1]["audio"]


# -- refusal and resume (one session at a time: the offline reference has batch 1) --------------
def offline(lm, mimi, parts, ttt=None):
    """Reference: ``LMGen`` + Mimi at batch 1 as in ``generate``, greedy. ``parts``: pcm per
    connection; between them everything streaming is reset except the TTT state (kept). Returns
    per part the text tokens, the Opus bytes (fresh writer per part) and the TTT states."""
    from moshi.models.lm import LMGen

    gen = LMGen(lm, use_sampling=False)
    results = []
    with torch.no_grad(), no_compile(), mimi.streaming(1), gen.streaming(1):
        for k, pcm in enumerate(parts):
            if k:
                kept = ttt_state(lm, 0)
                mimi.reset_streaming()
                gen.reset_streaming()
                load_ttt_state(lm, 0, kept)
            writer, tokens, opus = sphn.OpusStreamWriter(RATE), [], b""
            for i in range(len(pcm) // FRAME):
                codes = mimi.encode(torch.from_numpy(pcm[i * FRAME : (i + 1) * FRAME])[None, None])
                if i == 0:
                    mimi.reset_streaming()  # as moshi.server: the first frame is in the past
                out = gen.step(codes[:, : lm.n_q - lm.dep_q])
                if out is None:
                    continue
                tokens.append(int(out[0, 0, 0]))
                opus += writer.append_pcm(mimi.decode(out[:, 1:])[0, 0].numpy())
            results.append({"tokens": tokens, "audio": opus, "ttt": ttt_state(lm, 0)})
    return results


def test_refusal_beyond_max_sessions_and_resume_with_memory(tmp_path):
    model = load_tiny()  # its own: the shared server's model is streaming
    lm, mimi, tok = model
    a, b = audio(7, 25), audio(8, 20)

    async def scenario(url: str, t: ServerThread):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/api/sessions") as r:
                token = (await r.json())["session"]
            first = await converse(url, a, f"?session={token}")
            # the state is saved when the client leaves
            path = t.server.store.path(token)
            await wait_for(lambda: asyncio.sleep(0, path.is_file()), "the saved state")
            # refusal: one session is connected, a second is refused at once with a reason
            async with http.ws_connect(f"{url}/api/chat") as busy:
                assert await busy.receive_bytes() == b"\x00"
                start = time.monotonic()
                async with http.ws_connect(f"{url}/api/chat") as refused:
                    msg = await refused.receive()
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1013
                assert "server full" in msg.extra and time.monotonic() - start < 5
            # an unknown token is refused; a new token starts from the initial state
            async with http.ws_connect(f"{url}/api/chat?session=guess") as ws:
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008
            # resume: the TTT state is restored bit for bit before the handshake
            async with http.ws_connect(f"{url}/api/chat?session={token}") as ws:
                assert await ws.receive_bytes() == b"\x00"
                restored = t.server.pool.submit(t.server.engine.ttt_state, 0).result()
            second = await converse(url, b, f"?session={token}")
            return first, second, restored, path

    with make_server(model, tmp_path, max_sessions=1) as t:
        first, second, restored, path = run(scenario(t.url, t))
        saved = load_file(str(path))
    # reference: the TTT state kept, everything else reset, at the same frame
    pa, pb = opus_roundtrip(a), opus_roundtrip(b)
    ref = offline(lm, mimi, [pa, pa[:0], pb])  # connection 2 (no audio) changes nothing
    assert saved.keys() == restored.keys() == ref[2]["ttt"].keys()
    # restored == saved after the first connection == offline state after ``a``, bit for bit
    assert all(torch.equal(restored[k], ref[0]["ttt"][k]) for k in restored)
    assert all(torch.equal(saved[k], ref[2]["ttt"][k]) for k in saved)  # after ``b``
    pieces = [
        p
        for p in (tok.id_to_piece(x).replace("▁", " ") for x in ref[2]["tokens"] if x not in (0, 3))
    ]
    assert second["text"] == pieces and second["audio"] == ref[2]["audio"]
    assert first["audio"] == ref[0]["audio"]
    # without the memory (a fresh state), the answer to ``b`` differs
    fresh = offline(lm, mimi, [pb])[0]
    assert fresh["tokens"] != ref[2]["tokens"] or fresh["audio"] != ref[2]["audio"]


def test_a_new_connection_with_its_token_takes_the_conversation_over(tmp_path):
    """A client reconnecting while its old connection is still open (a dropped network the
    server has not noticed yet) or still saving (resuming right after it left) gets the
    conversation and its memory, never a refusal: the older connection is closed first and its
    memory saved. Found by the hour-long soak: 30 of 5,334 resumes were refused as "already
    connected"."""
    model = load_tiny()  # its own: the shared server's model is streaming
    a = audio(9, 20)

    async def scenario(url: str, t: ServerThread):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/api/sessions") as r:
                token = (await r.json())["session"]
            async with http.ws_connect(f"{url}/api/chat?session={token}") as old:
                assert await old.receive_bytes() == b"\x00"
                for page in opus_pages(a):
                    await old.send_bytes(b"\x01" + page)
                frames = len(opus_roundtrip(a)) // FRAME

                async def heard() -> bool:
                    rows = (await stats(http, url))["per_session"]
                    return bool(rows) and rows[0]["frames_in"] >= frames

                await wait_for(heard, "the old connection's frames")
                async with http.ws_connect(f"{url}/api/chat?session={token}") as new:
                    msg = await old.receive(DEADLINE_S)
                    while msg.type == aiohttp.WSMsgType.BINARY:  # its last outputs, then closed
                        msg = await old.receive(DEADLINE_S)
                    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1000, msg
                    assert "replaced by a newer connection" in msg.extra
                    assert await new.receive_bytes() == b"\x00"
                    restored = t.server.pool.submit(t.server.engine.ttt_state, 0).result()
                    saved = load_file(str(t.server.store.path(token)))
            # at once after it leaves, before its save may have ended: resumed, not refused
            async with http.ws_connect(f"{url}/api/chat?session={token}") as again:
                assert await again.receive_bytes() == b"\x00"
            return restored, saved, await stats(http, url)

    with make_server(model, tmp_path, max_sessions=1) as t:
        restored, saved, st = run(scenario(t.url, t))
    assert saved.keys() == restored.keys() and saved
    assert all(torch.equal(restored[k], saved[k]) for k in saved)  # the old connection's memory
    assert st["taken_over"] >= 1 and st["restored"] == 2 and st["refused"] == 0, st


def test_cli_serve_checks_flags_before_loading(capsys):
    from moshi_ttt.cli import main

    assert main(["serve", "--tiny", "--static", "none", "--max-sessions", "0"]) == 2
    assert "--max-sessions: expected a value >= 1, got int 0" in capsys.readouterr().err
    assert main(["serve", "--tiny", "--static", "/nonexistent-ui"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_loses_at_most_the_last_snapshot(tmp_path):
    """A real server process, killed with SIGKILL mid-conversation, restarted on the same
    --state-dir: the conversation resumes from its last snapshot (--snapshot-every)."""
    import signal
    import subprocess
    import sys

    state_dir, port = tmp_path / "states", _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moshi_ttt.cli", "serve", "--tiny", "--static", "none",
           "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(state_dir),
           "--snapshot-every", "0.3", "--max-sessions", "1", "--greedy"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1"}

    async def up(http: aiohttp.ClientSession) -> bool:
        try:
            await stats(http, url)
            return True
        except aiohttp.ClientError:
            return False

    async def first_life() -> str:
        async with aiohttp.ClientSession() as http:
            await wait_for(lambda: up(http), "the server", timeout=120)
            async with http.post(f"{url}/api/sessions") as r:
                token = (await r.json())["session"]
            async with http.ws_connect(f"{url}/api/chat?session={token}") as ws:
                assert await ws.receive_bytes() == b"\x00"
                for page in opus_pages(audio(3, 12)):
                    await ws.send_bytes(b"\x01" + page)

                async def snapshotted() -> bool:
                    return (await stats(http, url))["snapshots"] >= 1

                await wait_for(snapshotted, "a snapshot", timeout=60)
                server.send_signal(signal.SIGKILL)  # mid-conversation: nothing saved on leave
                server.wait(timeout=30)
            return token

    async def second_life(token: str) -> dict:
        async with aiohttp.ClientSession() as http:
            await wait_for(lambda: up(http), "the restarted server", timeout=120)
            async with http.ws_connect(f"{url}/api/chat?session={token}") as ws:
                assert await ws.receive_bytes() == b"\x00"  # an unknown token would be refused
                return await stats(http, url)

    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        token = asyncio.run(asyncio.wait_for(first_life(), 240))
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == -signal.SIGKILL
    assert list(state_dir.glob("*.safetensors")), "no snapshot on disk"
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        after = asyncio.run(asyncio.wait_for(second_life(token), 240))
    finally:
        server.kill()
        server.wait(timeout=30)
    assert after["restored"] == 1


# -- the memory panel: stats, memory-only reset, opt-in reports, moshi.client unaffected -------
def e2e_config() -> TTTConfig:
    """The end-to-end memory (an update every 4 frames) with the recall memory beside it."""
    return TTTConfig(kind="e2e", layers="top:1", e2e_hidden=64, e2e_chunk=4, e2e_lr=0.3,
                     recall_keys=256, recall_active=8, recall_context=4)  # fmt: skip


def tiny_engine(config: TTTConfig, batch: int = 2):
    from moshi_ttt.serve import Engine

    model = load_base_lm("tiny", dtype=torch.float32)
    apply_ttt(model.lm, config)
    model.lm.eval()
    mimi, _ = load_codec(model)
    return Engine(model.lm, mimi, batch, greedy=True)


def drive(engine, frames: int, rows=(0, 1), seed: int = 0, same: bool = False) -> list:
    """Step ``frames`` frames of the ``rows`` (``same``: every row hears the same voice)."""
    pcm = np.stack([audio(seed + (0 if same else b), frames) for b in range(engine.batch_size)])
    active = np.zeros(engine.batch_size, dtype=bool)
    active[list(rows)] = True
    return [engine.step(pcm[:, i * FRAME : (i + 1) * FRAME], active) for i in range(frames)]


@pytest.mark.parametrize("layers", ["top:1", "quarter"])
def test_memory_stats_of_the_end_to_end_memory_per_row(layers):
    engine = tiny_engine(dataclasses.replace(e2e_config(), layers=layers))
    try:
        stats = engine.memory
        assert stats.kinds() == ["e2e", "recall"] and stats.describe()["chunk"] == 4
        engine.join(0)
        engine.join(1)
        stats.watch(0, True)  # only row 0 is watched: only its updates are scored
        outs = drive(engine, 22, same=True)
        # watching changes nothing of what Moshi says (both rows hear the same, greedy)
        for out in outs:
            assert (out[0] is None) == (out[1] is None)
            if out[0] is not None:
                assert out[0].text_token == out[1].text_token
                assert np.array_equal(out[0].pcm, out[1].pcm)
        r0, r1 = stats.report(0, point={"frame_ms": 12.5}), stats.report(1)
        assert r1["points"][-1]["e2e_distance"] == r0["points"][-1]["e2e_distance"]
        # both rows learned (22 frames, an update every 4 once LMGen's delays are past)
        assert r0["updates"] == r1["updates"] >= 4 and r0["rollbacks"] == 0
        assert engine.live.streamer.updates == r0["updates"] + r1["updates"]
        scored = [e for e in r0["events"] if "before" in e]
        assert len(scored) == r0["updates"]
        assert all(e["after"] < e["before"] for e in scored)  # a step descends its own loss
        assert not any("before" in e for e in r1["events"])  # not watched: not scored
        point = r0["points"][-1]
        assert point["t"] == pytest.approx(22 * 0.08) and point["frame_ms"] == 12.5
        assert point["e2e_distance"] > 0 and point["recall_distance"] > 0
        # a memory-only reset: row 0's memories back to a conversation's start, row 1's and
        # the rest of row 0's streaming state untouched
        other = engine.ttt_state(1)
        offset = engine.gen._streaming_state.offsets.clone()
        engine.reset_memory(0)
        engine.join(1)  # reference: a fresh row, what join resets the memories to
        fresh = engine.ttt_state(1)
        now = engine.ttt_state(0)
        assert all(torch.equal(now[k], fresh[k]) for k in now)
        assert any(not torch.equal(other[k], fresh[k]) for k in other)
        assert engine.gen._streaming_state.offsets[0] == offset[0]  # the conversation goes on
        after = stats.report(0)
        assert after["resets"] == 1 and after["events"][-1]["reset"] is True
        assert after["points"][-1]["e2e_distance"] == 0 == after["points"][-1]["recall_distance"]
        drive(engine, 10, rows=(0,))  # it learns again, from the start
        assert stats.report(0)["updates"] > r0["updates"]
        # the counters and history go through a saved session
        saved = json.loads(json.dumps(stats.export(0)))
        engine.join(0, memory=saved)
        again = stats.report(0)
        assert again["updates"] == saved["updates"] and again["resets"] == 1
        assert again["points"][: len(saved["points"])] == saved["points"]
        engine.join(0, memory={"updates": "x", "points": 3, "events": [1, {"t": 1}]})  # junk
        assert stats.report(0)["updates"] == 0
    finally:
        engine.close()


def test_memory_stats_of_gated_ttt_layers():
    engine = tiny_engine(TTTConfig())
    try:
        stats = engine.memory
        assert stats.kinds() == ["gated"]
        engine.join(0)
        drive(engine, 20, rows=(0,))  # not watched: no probe, no inner losses
        assert "inner_before" not in stats.report(0)["points"][-1]
        stats.watch(0, True)
        drive(engine, 20, rows=(0,))
        point = stats.report(0)["points"][-1]
        assert -1 <= point["gate"] <= 1 and point["ttt_distance"] > 0
        assert point["inner_after"] < point["inner_before"]  # each step lowers its inner loss
        stats.watch(0, False)
        assert all(m.layer.probe is None for _, m in stats.gated)
    finally:
        engine.close()


async def memory_conversation(url: str, pcm: np.ndarray, query: str, reset_after: int = 0):
    """Talk with ``?memory=1``; the decoded 0x10 reports (after ``reset_after`` reports, ask for
    a memory reset), and the kinds received."""
    reports, kinds = [], set()
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{url}/api/chat?memory=1{query}") as ws,
    ):
        assert await ws.receive_bytes() == b"\x00"
        for page in opus_pages(pcm):
            await ws.send_bytes(b"\x01" + page)
        frames = len(opus_roundtrip(pcm)) // FRAME
        start = None
        while start is None or reports[-1]["t"] < start + (frames - 2) * 0.08 - 1e-6:
            msg = await ws.receive(DEADLINE_S)
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            kinds.add(msg.data[0])
            if msg.data[0] == 0x10:
                reports.append(json.loads(msg.data[1:]))
                start = reports[0]["t"] if start is None else start
                if len(reports) == reset_after:
                    await ws.send_bytes(b"\x11")
    return reports, kinds


def test_memory_reports_are_opt_in_and_survive_a_resume(tmp_path):
    lm, mimi, tok = load_tiny_e2e()
    with make_server((lm, mimi, tok), tmp_path, max_sessions=1) as t:

        async def scenario():
            async with aiohttp.ClientSession() as http, http.post(f"{t.url}/api/sessions") as r:
                token = (await r.json())["session"]
            first, kinds = await memory_conversation(t.url, audio(4, 30), f"&session={token}", 3)
            path = t.server.store.path(token)
            await wait_for(lambda: asyncio.sleep(0, path.is_file()), "the saved state")
            second, _ = await memory_conversation(t.url, audio(5, 10), f"&session={token}")
            async with aiohttp.ClientSession() as http:

                async def left() -> bool:
                    return (await stats(http, t.url))["saved"] == 2

                await wait_for(left, "the second connection saved")
            plain = await converse(t.url, audio(6, 10))  # moshi's clients: no 0x10, ever
            return first, kinds, second, plain

        first, kinds, second, plain = run(scenario())
    assert kinds == {1, 2, 0x10} and plain["kinds"] == {1, 2}
    hello = first[0]
    assert hello["hello"] and not hello["resumed"] and hello["kinds"] == ["e2e", "recall"]
    assert hello["budget_ms"] == 80 and hello["max_sessions"] == 1
    assert any(r["resets"] == 1 for r in first)  # the 0x11 reset, reported
    last = first[-1]
    assert last["updates"] >= 3 and last["points"] and "frame_ms" in last["points"][-1]
    assert any(e.get("reset") for r in first for e in r["events"])
    # resumed: the panel's history and counters are back with the memory
    back = second[0]
    assert back["hello"] and back["resumed"] and back["updates"] == last["updates"]
    history = [p for r in first for p in r["points"]]
    assert back["points"][: len(history)] == history
    assert second[-1]["t"] > last["t"]  # the conversation's clock goes on


def load_tiny_e2e():
    model = load_base_lm("tiny", dtype=torch.float32)
    apply_ttt(model.lm, e2e_config())
    model.lm.eval()
    mimi, tokenizer = load_codec(model)
    return model.lm, mimi, tokenizer


def test_moshi_client_protocol_code_works_against_serve(server, monkeypatch):
    """moshi.client's own ``Connection`` (its audio devices stubbed: no sounddevice here)
    talks to ``serve``: Moshi's voice reaches its output queue, its words its printer, and it
    meets no message kind it does not know but moshi.server's handshake."""
    import sys
    import types

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setitem(
        sys.modules, "sounddevice", types.SimpleNamespace(InputStream=Stream, OutputStream=Stream)
    )
    import moshi

    # imported afresh on the stub, and forgotten after the test (monkeypatch restores both)
    monkeypatch.setitem(sys.modules, "moshi.client", None)
    monkeypatch.setattr(moshi, "client", None, raising=False)
    del sys.modules["moshi.client"]
    from moshi.client import Connection

    class Printer:
        def __init__(self):
            self.tokens, self.logs = [], []

        def print_token(self, token):
            self.tokens.append(token)

        def log(self, level, msg):
            self.logs.append((level, msg))

        def print_pending(self):
            pass

        def print_lag(self):
            pass

    async def talk():
        printer = Printer()
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.url}/api/chat") as ws:
            conn = Connection(printer, ws, asyncio.get_running_loop())
            receiving = asyncio.ensure_future(conn._recv_loop())
            pcm = audio(11, 20)

            def microphone():  # sounddevice's callback thread
                for i in range(len(pcm) // FRAME):
                    conn._on_audio_input(pcm[i * FRAME : (i + 1) * FRAME, None], FRAME, None, None)

            await asyncio.to_thread(microphone)
            await wait_for(lambda: asyncio.sleep(0, conn._output_queue.qsize() >= 10), "audio")
            await ws.close()
            await receiving
        return printer, conn

    printer, conn = run(talk())
    assert printer.tokens and conn._output_queue.qsize() >= 10
    assert [m for _, m in printer.logs if "unknown message kind" in m] == [
        "unknown message kind 0"  # moshi.server's handshake, which moshi.client never reads
    ]


def test_the_page_is_served_by_default_and_whole(tmp_path):
    """``serve`` without ``--static`` serves the package's page; every file it loads (its
    HTML's and the modules' imports) is there, so it works without a browser check too."""
    import re

    from moshi_ttt.cli import serve as serve_cli
    from moshi_ttt.serve import WEB_DIR

    assert serve_cli._static_dir(None) == str(WEB_DIR)
    html = (WEB_DIR / "index.html").read_text()
    wanted = set(re.findall(r'(?:src|href)="([^":]+)"', html))
    for js in WEB_DIR.glob("*.js"):
        wanted |= set(re.findall(r'from "\./([^"]+)"', js.read_text()))
        wanted |= set(re.findall(r'new URL\("\./([^"]+)"', js.read_text()))
    assert {"app.js", "style.css", "capture-worklet.js", "ogg.js"} <= wanted
    assert all((WEB_DIR / name).is_file() for name in wanted), wanted

    async def fetch(url: str):
        async with aiohttp.ClientSession() as http:
            pages = {}
            for path in ("/", "/app.js"):
                async with http.get(url + path) as r:
                    pages[path] = (r.status, r.content_type, await r.text())
            return pages

    lm, mimi, tok = load_tiny()
    cfg = ServeConfig(max_sessions=1)
    server = ChatServer(lm, mimi, tok, cfg, SessionStore(tmp_path), static=str(WEB_DIR))
    with ServerThread(server) as t:
        pages = run(fetch(t.url))
    assert pages["/"][:2] == (200, "text/html") and "moshi-ttt" in pages["/"][2]
    assert pages["/app.js"][0] == 200 and "javascript" in pages["/app.js"][1]
