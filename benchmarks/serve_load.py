"""Load test of ``moshi-ttt serve``: K simulated clients stream a wav through Opus over loopback.

    python benchmarks/serve_load.py --tiny --clients 4 --seconds 10      # starts its own server
    python benchmarks/serve_load.py --url http://127.0.0.1:8998 --clients 2 --wav user.wav
    python benchmarks/serve_load.py --tiny --clients 4 --soak 600           # a 10-minute soak

Each client sends one 80 ms frame of Ogg/Opus every 80 ms (real time; ``--fast``: as fast as it
can) and decodes Moshi's audio as it arrives. Printed: the server's per-frame processing time
(p50/p99 from /api/stats, against the 80 ms budget), the real-time factor (p50 frame time / 80 ms;
< 1 keeps up), the client-side latency (p50/p99 of: time the output audio reaches sample s minus
the time the input audio up to sample s was sent; includes the model's one-frame delay and Opus
buffering), and frames dropped. Loopback only; every loop is bounded in count and time.

``--soak SECONDS``: for that long, each of ``--clients`` clients keeps doing one of: talk (a
new resumable conversation, 1-4 s of audio), resume its last conversation (``?session=``, after
the server saved it on leave), send garbage (a message that is not Opus), stall (send, never
read). Printed: frames served, p99 frame time, dropped frames, conversations resumed and
**lost** (a saved conversation refused on resume: must be 0), refusals (server full), and the
server's RSS at start and end (the tiny server runs in this process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import sphn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

FRAME, RATE = 1920, 24000


def synthetic(seconds: float, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    x = sum(0.1 * np.sin(2 * np.pi * f * t) for f in g.uniform(120, 900, 3))
    return (x * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t)) + 0.01 * g.normal(size=t.size)).astype(
        np.float32
    )


async def client(url: str, pcm: np.ndarray, fast: bool, deadline: float) -> dict:
    frames = len(pcm) // FRAME
    writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
    sent_at: list[float] = []
    lat: list[float] = []
    received = 0
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/api/chat") as ws:
        first = await asyncio.wait_for(ws.receive(), 30)
        if first.type != aiohttp.WSMsgType.BINARY or first.data != b"\x00":
            return {"refused": f"{first.type.name} {first.data} {first.extra}"}

        async def send():
            start = time.perf_counter()
            for i in range(frames):
                if not fast:
                    await asyncio.sleep(max(0.0, start + i * 0.08 - time.perf_counter()))
                page = writer.append_pcm(pcm[i * FRAME : (i + 1) * FRAME])
                sent_at.append(time.perf_counter())
                if len(page):
                    await ws.send_bytes(b"\x01" + page)

        sender = asyncio.ensure_future(send())
        expected = (frames - 2) * FRAME  # LMGen's delay and Opus buffering
        while received < expected and time.perf_counter() < deadline:
            try:
                msg = await asyncio.wait_for(ws.receive(), 5)
            except asyncio.TimeoutError:
                break
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            if msg.data[0] == 1:
                out = reader.append_bytes(msg.data[1:])
                now = time.perf_counter()
                for s in range(received // FRAME, (received + out.size) // FRAME):
                    if s < len(sent_at):
                        lat.append(1000 * (now - sent_at[s]))
                received += out.size
        sender.cancel()
    return {"frames": frames, "received_frames": received // FRAME, "latency_ms": lat}


async def load(url: str, pcm: np.ndarray, clients: int, fast: bool, timeout: float) -> dict:
    deadline = time.perf_counter() + timeout
    start = time.perf_counter()
    results = await asyncio.gather(*(client(url, pcm, fast, deadline) for _ in range(clients)))
    wall = time.perf_counter() - start
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/stats") as r:
        stats = await r.json()
    lat = [x for r in results for x in r.get("latency_ms", [])]
    p50 = stats["frame_ms"]["p50"]
    return {
        "clients": clients,
        "audio_s": len(pcm) / RATE,
        "wall_s": round(wall, 2),
        "refused": [r["refused"] for r in results if "refused" in r],
        "frame_ms_p50": p50,
        "frame_ms_p99": stats["frame_ms"]["p99"],
        "rtf": None if p50 is None else p50 / 80.0,
        "client_latency_ms_p50": float(np.percentile(lat, 50)) if lat else None,
        "client_latency_ms_p99": float(np.percentile(lat, 99)) if lat else None,
        "frames_dropped": stats["frames_dropped"],
        "frames_received": [r.get("received_frames") for r in results],
    }


def rss_mib() -> float:
    """This process's resident memory (MiB), from /proc (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def soak(url: str, clients: int, seconds: float, seed: int = 0) -> dict:
    """The ``--soak`` mix of the module docstring; returns its counts."""
    end = time.monotonic() + seconds
    counts = dict.fromkeys(("talk", "resume", "garbage", "stall", "refused_full", "lost",
                            "resumed", "errors"), 0)  # fmt: skip
    error_kinds: dict[str, int] = {}  # "attempt kind: exception type" -> count

    async def converse(http: aiohttp.ClientSession, query: str, pcm: np.ndarray,
                       read: bool) -> str:  # fmt: skip
        async with http.ws_connect(f"{url}/api/chat{query}") as ws:
            first = await asyncio.wait_for(ws.receive(), 30)
            if first.type != aiohttp.WSMsgType.BINARY:
                return f"closed {first.data}"
            writer = sphn.OpusStreamWriter(RATE)
            for i in range(len(pcm) // FRAME):
                page = writer.append_pcm(pcm[i * FRAME : (i + 1) * FRAME])
                if len(page):
                    await ws.send_bytes(b"\x01" + page)
                await asyncio.sleep(0.08)
                if read:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(ws.receive(), 0.001)
            return "ok"

    async def one(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        saved: str | None = None
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < end:
                kind = str(
                    rng.choice(["talk", "resume", "garbage", "stall"], p=[0.45, 0.35, 0.1, 0.1])
                )
                if kind == "resume" and saved is None:
                    kind = "talk"
                pcm = synthetic(float(rng.uniform(1, 4)), int(rng.integers(1 << 30)))
                try:
                    if kind == "talk":
                        async with http.post(f"{url}/api/sessions") as r:
                            token = (await r.json())["session"]
                        got = await converse(http, f"?session={token}", pcm, read=True)
                        if got == "ok":
                            saved = token
                    elif kind == "resume":
                        got = await converse(http, f"?session={saved}", pcm, read=True)
                        if got == "ok":
                            counts["resumed"] += 1
                        elif "1008" in got:  # a saved conversation refused: lost
                            counts["lost"] += 1
                    elif kind == "garbage":
                        async with http.ws_connect(f"{url}/api/chat") as ws:
                            first = await asyncio.wait_for(ws.receive(), 30)
                            got = "ok" if first.type == aiohttp.WSMsgType.BINARY else (
                                f"closed {first.data}")  # fmt: skip
                            if got == "ok":  # accepted: now the garbage
                                await ws.send_bytes(
                                    b"\x01" + bytes(rng.integers(0, 256, 4000, dtype=np.uint8))
                                )
                                await asyncio.wait_for(ws.receive(), 30)
                    else:
                        got = await converse(http, "", pcm, read=False)
                    if "1013" in got:
                        counts["refused_full"] += 1
                    counts[kind] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    counts["errors"] += 1
                    what = f"{kind}: {type(e).__name__}"
                    error_kinds[what] = error_kinds.get(what, 0) + 1
                await asyncio.sleep(float(rng.uniform(0, 0.5)))

    await asyncio.gather(*(one(i) for i in range(clients)))
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/stats") as r:
        stats = await r.json()
    return {**counts, "error_kinds": error_kinds, "frames_served": stats["frames"],
            "frame_ms_p99": stats["frame_ms"]["p99"], "frames_dropped": stats["frames_dropped"],
            "saved": stats["saved"], "restored": stats["restored"],
            "taken_over": stats["taken_over"], "not_reading": stats["not_reading"],
            "bad_clients": stats["bad_clients"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8998")
    where.add_argument("--tiny", action="store_true", help="start a tiny-model server in-process")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-sessions", type=int, help="with --tiny (default: --clients)")
    p.add_argument("--wav", help="the audio every client streams (default: synthetic)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fast", action="store_true", help="send as fast as possible, not real time")
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this long")
    p.add_argument("--json", action="store_true", help="print the figures as JSON only")
    p.add_argument("--soak", type=float, metavar="SECONDS",
                   help="clients join, leave, resume and misbehave for this long")  # fmt: skip
    args = p.parse_args()
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        p.error("--url must be a loopback address (127.0.0.1 / localhost)")
    if args.wav:
        from moshi_ttt.generate import read_wav

        pcm = read_wav(args.wav)[: int(args.seconds * RATE)]
    else:
        pcm = synthetic(args.seconds, 0)
    if args.tiny:
        import torch

        from moshi_ttt.integration import TTTConfig, apply_ttt
        from moshi_ttt.models.load import load_base_lm, load_codec
        from moshi_ttt.serve import ChatServer, ServeConfig, ServerThread, SessionStore

        torch.set_num_threads(1)
        model = load_base_lm("tiny")
        lm = model.lm
        apply_ttt(lm, TTTConfig())
        mimi, tok = load_codec(model)
        lm.eval()
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            cfg = ServeConfig(max_sessions=args.max_sessions or args.clients)
            srv = ChatServer(lm, mimi, tok, cfg, SessionStore(tmp))
            with ServerThread(srv) as t:
                if args.soak:
                    before = rss_mib()
                    res = asyncio.run(soak(t.url, args.clients, args.soak))
                    res.update(rss_mib_start=round(before, 1), rss_mib_end=round(rss_mib(), 1))
                else:
                    res = asyncio.run(load(t.url, pcm, args.clients, args.fast, args.timeout))
    elif args.soak:
        res = asyncio.run(soak(args.url, args.clients, args.soak))
    else:
        res = asyncio.run(load(args.url, pcm, args.clients, args.fast, args.timeout))
    if args.soak:
        print(json.dumps(res) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))
        return
    if args.json:
        print(json.dumps(res))
        return
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"{res['clients']} clients x {res['audio_s']:.1f} s of audio, wall {res['wall_s']} s")
    print(
        f"server frame time p50 {f(res['frame_ms_p50'])} ms, p99 {f(res['frame_ms_p99'])} ms "
        f"(budget 80 ms); real-time factor {res['rtf']:.3f}"
    )
    print(
        f"client latency p50 {f(res['client_latency_ms_p50'])} ms, "
        f"p99 {f(res['client_latency_ms_p99'])} ms"
    )
    print(
        f"frames dropped: {res['frames_dropped']}; frames received per client: "
        f"{res['frames_received']}; refused: {res['refused'] or 'none'}"
    )


if __name__ == "__main__":
    main()
