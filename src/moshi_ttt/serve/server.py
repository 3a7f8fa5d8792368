"""``moshi-ttt serve``: moshi's websocket protocol, several conversations, TTT memory per session.

Protocol (``moshi.server``'s, unchanged, so the moshi web UI and ``moshi.client`` connect):
``GET /api/chat`` upgrades to a websocket; the server sends ``0x00`` (handshake) once the
conversation is ready, then ``0x01`` + Ogg/Opus pages (Moshi's voice) and ``0x02`` + UTF-8 text
(Moshi's words); the client sends ``0x01`` + Ogg/Opus pages (the user's voice, 24 kHz mono).

Beyond moshi:
- ``--max-sessions B`` conversations run in one batched ``LMGen`` step (``engine.Engine``); a
  client beyond B is refused with a websocket close (code 1013, a reason saying why), not queued;
- ``POST /api/sessions`` issues a session token; ``/api/chat?session=TOKEN`` saves the
  conversation's TTT state when the client leaves and restores it when it comes back
  (``sessions.SessionStore``); without a token a conversation starts from the initial state and
  nothing is kept, as in moshi;
- ``GET /api/stats``: sessions, per-frame processing time (p50/p99 against the 80 ms budget),
  frames dropped, refusals, bad clients;
- a bad client (text or unknown messages, garbage, oversized or non-Opus messages, not reading,
  gone mid-frame) is logged and its connection closed; the other rows never see it;
- the memory panel of the web page (``web/``): with ``/api/chat?memory=1`` the server also sends
  ``0x10`` + UTF-8 JSON (``MemoryStats.report``: the memory's updates, losses, distances, frame
  times), once after the handshake and every ``REPORT_EVERY`` frames; moshi's clients never ask
  for it, so they never see this kind. A client may send ``0x11`` (no payload): reset this
  conversation's memory only (``Engine.reset_memory``), the conversation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import sphn
from aiohttp import web

from .. import schema
from ..generate import token_text
from ..schema import option
from .engine import Engine, RowOutput, is_text
from .sessions import SessionStore

log = logging.getLogger("moshi_ttt.serve")
FRAME_BUDGET_MS = 80.0
OGG_MAGIC = b"OggS"
CLOSE_NORMAL = 1000
TAKEOVER_TIMEOUT_S = 30.0  # how long a resuming connection waits for the one it replaces
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY = 1008
CLOSE_UNSUPPORTED = 1003
CLOSE_TOO_BIG = 1009
SESSION_ID_HEADER = "X-Moshi-TTT-Session-Id"
KIND_AUDIO, KIND_TEXT = 0x01, 0x02  # moshi's
KIND_MEMORY = 0x10  # server -> client, JSON memory stats (only with ?memory=1)
KIND_RESET_MEMORY = 0x11  # client -> server: reset this conversation's memory only
REPORT_EVERY = 5  # frames between two memory reports (0.4 s)


@dataclass
class ServeConfig:
    """Limits and sampling of ``moshi-ttt serve`` (the CLI flags of the same names), checked on
    construction (``moshi_ttt.schema``)."""

    max_sessions: int = option(4, ge=1)
    max_message_bytes: int = option(1 << 18, ge=1)  # one websocket message (Opus page ~300 B)
    max_backlog_frames: int = option(25, ge=1)  # input frames waiting per session; oldest dropped
    max_send_backlog: int = option(50, ge=1)  # output frames a client may leave unsent
    send_timeout_s: float = option(10.0, gt=0)  # one send blocked longer: client stopped reading
    send_buffer_bytes: int = option(1 << 16, ge=0)  # kernel send buffer (0: system default)
    undecoded_bytes_limit: int = option(1 << 16, ge=1)  # Ogg bytes without any audio: not Opus
    greedy: bool = False
    temp: float = option(0.8, ge=0)
    temp_text: float = option(0.7, ge=0)
    seed: int = 42424242
    snapshot_every_s: float = option(30.0, ge=0)  # resumable memories saved while open (0: off)

    def __post_init__(self) -> None:
        schema.validate(self)


class Session:
    """One connected client: its row, Opus streams, input frames and output queue."""

    def __init__(
        self,
        sid: int,
        ws: web.WebSocketResponse,
        row: int,
        token: str | None,
        frame: int,
        sample_rate: int,
        send_backlog: int,
    ):
        self.id = sid
        self.ws, self.row, self.token, self.frame = ws, row, token, frame
        self.transport: asyncio.BaseTransport | None = None
        self.reader = sphn.OpusStreamReader(sample_rate)
        self.writer = sphn.OpusStreamWriter(sample_rate)
        self.pending = np.zeros(0, dtype=np.float32)  # decoded samples short of a frame
        self.frames: deque[np.ndarray] = deque()
        self.out: asyncio.Queue[RowOutput | dict | None] = asyncio.Queue(maxsize=send_backlog)
        self.ready = False  # joined the engine
        self.closed = False
        self.close_reason: str | None = None
        self.frames_in = self.frames_out = self.dropped = 0
        self.ogg_bytes = self.samples_in = 0
        self.resumed_frames = 0  # frames of the conversation before this connection
        self.snapshot_frames = 0  # frames_in at its last snapshot
        self.left = asyncio.Event()  # set once gone: row freed, memory saved, token released
        self.watch = False  # sends memory reports (``?memory=1``)
        self.max_ms = 0.0  # longest frame since the last memory report

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "frames_dropped": self.dropped,
            "backlog": len(self.frames),
            "resumed": self.token is not None and self.resumed_frames > 0,
        }


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class ChatServer:
    """The aiohttp application around an ``Engine``: ``app()`` gives the ``web.Application``."""

    def __init__(
        self,
        lm: Any,
        mimi: Any,
        tokenizer: Any | None,
        config: ServeConfig,
        store: SessionStore,
        static: str | None = None,
    ):
        schema.validate(config)  # a field may have been set after construction
        self.config, self.store, self.tokenizer, self.static = config, store, tokenizer, static
        import torch

        torch.manual_seed(config.seed)
        self.engine = Engine(
            lm,
            mimi,
            config.max_sessions,
            greedy=config.greedy,
            temp=config.temp,
            temp_text=config.temp_text,
        )
        self.sample_rate = int(mimi.sample_rate)
        self.frame = self.engine.frame_size
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moshi-ttt-engine")
        self.rows: list[Session | None] = [None] * config.max_sessions
        self.reserved: set[int] = set()
        self.live: dict[str, Session] = {}  # token -> the connection that holds it
        self.frame_ms: deque[float] = deque(maxlen=2000)
        self.counters = dict.fromkeys(
            (
                "frames",
                "over_budget",
                "frames_dropped",
                "refused",
                "bad_clients",
                "not_reading",
                "saved",
                "snapshots",
                "restored",
                "taken_over",
                "connections",
            ),
            0,
        )
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._snapshots: asyncio.Task | None = None

    # -- application ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/chat", self.handle_chat)
        app.router.add_get("/api/stats", self.handle_stats)
        app.router.add_post("/api/sessions", self.handle_new_session)
        if self.static is not None:
            static = self.static

            async def handle_root(_: web.Request) -> web.FileResponse:
                return web.FileResponse(Path(static) / "index.html")

            app.router.add_get("/", handle_root)
            app.router.add_static("/", path=static, follow_symlinks=True, name="static")
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run_engine())
        self._snapshots = (asyncio.create_task(self._snapshot_loop())
                           if self.config.snapshot_every_s > 0 else None)  # fmt: skip

    async def _stop(self, _: web.Application) -> None:
        for s in list(self.rows):
            if s is not None:
                self._fail(s, "server shutting down", 1001, bad=False)
        for task in (self._task, self._snapshots):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.pool.submit(self.engine.close).result()
        self.pool.shutdown(wait=True)

    # -- the engine loop -----------------------------------------------------------------------
    async def _run_engine(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            pcm = np.zeros((self.config.max_sessions, self.frame), dtype=np.float32)
            active = np.zeros(self.config.max_sessions, dtype=bool)
            batch: list[Session | None] = [None] * self.config.max_sessions
            for row, s in enumerate(self.rows):
                if s is not None and s.ready and not s.closed and s.frames:
                    pcm[row] = s.frames.popleft()
                    active[row], batch[row] = True, s
            if not active.any():
                continue
            due = [
                row
                for row, s in enumerate(batch)
                if s is not None and s.watch and (s.frames_in + 1) % REPORT_EVERY == 0
            ]
            try:
                outs, ms, reports = await loop.run_in_executor(
                    self.pool, self._tick, pcm, active, due, batch
                )
            except Exception:  # a bug, not a client's doing: log it, keep serving
                log.exception("engine step failed")
                continue
            self.frame_ms.append(ms)
            self.counters["frames"] += 1
            self.counters["over_budget"] += ms > FRAME_BUDGET_MS
            n = int(active.sum())
            log.debug("frame handled in %.1f ms (%d sessions)", ms, n)
            if self.counters["frames"] % 250 == 0:
                vals = list(self.frame_ms)
                log.info(
                    "frames: %d, p50 %.1f ms, p99 %.1f ms (budget 80 ms), sessions %d",
                    self.counters["frames"],
                    _percentile(vals, 50),
                    _percentile(vals, 99),
                    self.sessions_count(),
                )
            for row, s in enumerate(batch):
                if s is None:
                    continue
                s.frames_in += 1
                if row in reports and not s.closed:
                    self._report(s, reports[row])
                out = outs[row]
                if out is None or s.closed:
                    continue
                try:
                    s.out.put_nowait(out)
                except asyncio.QueueFull:
                    self._not_reading(s, f"{s.out.qsize()} frames unsent")
            if any(s is not None and s.ready and s.frames for s in self.rows):
                self._wake.set()

    def _tick(
        self, pcm: np.ndarray, active: np.ndarray, due: list[int], batch: list[Session | None]
    ) -> tuple[list[RowOutput | None], float, dict[int, dict]]:
        """On the engine's thread: one step (timed), then the memory reports of the ``due``
        rows (their sessions watch the memory)."""
        start = time.perf_counter()
        outs = self.engine.step(pcm, active)
        ms = 1000 * (time.perf_counter() - start)
        reports = {}
        for s in batch:
            if s is not None:
                s.max_ms = max(s.max_ms, ms)
        for row in due:
            s = batch[row]
            assert s is not None
            reports[row] = self.engine.memory.report(row, point={"frame_ms": round(s.max_ms, 2)})
            s.max_ms = 0.0
        return outs, ms, reports

    def _report(self, s: Session, report: dict[str, Any]) -> None:
        """Queue a memory report for ``s`` with the frame counters of now (dropped if the
        client is behind: the next one carries the same counters)."""
        vals = list(self.frame_ms)
        report.update(
            frames_dropped=s.dropped,
            backlog=len(s.frames),
            budget_ms=FRAME_BUDGET_MS,
            frame_ms={
                "p50": _percentile(vals, 50),
                "p99": _percentile(vals, 99),
                "last": vals[-1] if vals else None,
            },  # fmt: skip
            sessions=self.sessions_count(),
            max_sessions=self.config.max_sessions,
        )
        with contextlib.suppress(asyncio.QueueFull):
            s.out.put_nowait(report)

    async def _reset_memory(self, s: Session) -> None:
        """The client asked: reset its conversation's memory only, then report at once."""
        if not s.ready or s.closed:
            return
        loop = asyncio.get_running_loop()

        def reset() -> dict[str, Any]:
            self.engine.reset_memory(s.row)
            return self.engine.memory.report(s.row)

        report = await loop.run_in_executor(self.pool, reset)
        log.info("session %d: memory reset by the client", s.id)
        if s.watch and not s.closed:
            self._report(s, report)

    # -- HTTP endpoints ------------------------------------------------------------------------
    def sessions_count(self) -> int:
        return sum(s is not None for s in self.rows)

    def stats(self) -> dict[str, Any]:
        vals = list(self.frame_ms)
        return {
            "sessions": self.sessions_count(),
            "max_sessions": self.config.max_sessions,
            "budget_ms": FRAME_BUDGET_MS,
            "frame_ms": {
                "p50": _percentile(vals, 50),
                "p99": _percentile(vals, 99),
                "max": max(vals) if vals else None,
                "window": len(vals),
            },
            **self.counters,
            "per_session": [s.stats() for s in self.rows if s is not None],
        }

    async def handle_stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def handle_new_session(self, _: web.Request) -> web.Response:
        return web.json_response({"session": self.store.issue()})

    # -- a conversation ------------------------------------------------------------------------
    def _not_reading(self, s: Session, why: str) -> None:
        """Cut ``s`` (no close handshake): its client stopped reading what we send."""
        self.counters["not_reading"] += 1
        self._fail(s, f"client is not reading: {why}", CLOSE_POLICY, abort=True)

    def _fail(
        self, s: Session, reason: str, code: int, bad: bool = True, abort: bool = False
    ) -> None:
        """Close ``s`` (only) with ``reason``; counted as a bad client if ``bad``."""
        if s.closed:
            return
        s.closed, s.close_reason = True, reason
        if bad:
            self.counters["bad_clients"] += 1
        log.warning("session %d: closing: %s", s.id, reason)
        with contextlib.suppress(asyncio.QueueFull):
            s.out.put_nowait(None)
        if abort and s.transport is not None:  # no close handshake with a client not reading
            s.transport.abort()
        else:
            asyncio.ensure_future(s.ws.close(code=code, message=reason.encode()[:120]))

    async def _refuse(
        self, ws: web.WebSocketResponse, code: int, reason: str
    ) -> web.WebSocketResponse:
        self.counters["refused"] += 1
        log.warning("refused a connection: %s", reason)
        await ws.close(code=code, message=reason.encode()[:120])
        return ws

    async def handle_chat(self, request: web.Request) -> web.WebSocketResponse:
        limit = self.config.send_buffer_bytes
        ws = web.WebSocketResponse(
            max_msg_size=self.config.max_message_bytes,
            timeout=2.0,
            **({"writer_limit": limit} if limit > 0 else {}),
        )
        self.counters["connections"] += 1
        sid = self.counters["connections"]
        ws.headers[SESSION_ID_HEADER] = str(sid)  # the id in /api/stats (not the token)
        await ws.prepare(request)
        transport = request.transport
        if transport is not None and limit > 0:  # a client that stops reading shows up soon
            with contextlib.suppress(OSError, AttributeError, NotImplementedError):
                transport.set_write_buffer_limits(high=limit)
                transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, limit
                )
        token = request.query.get("session") or None
        if token is not None and not self.store.known(token):
            return await self._refuse(ws, CLOSE_POLICY, "unknown or expired session token")
        s = Session(sid, ws, -1, token, self.frame, self.sample_rate, self.config.max_send_backlog)
        s.transport = transport
        s.watch = request.query.get("memory") == "1"
        try:
            if token is not None and not await self._claim(s, token):
                return await self._refuse(ws, CLOSE_POLICY, s.close_reason or "")
            free = [r for r, x in enumerate(self.rows) if x is None and r not in self.reserved]
            if not free:
                b = self.config.max_sessions
                return await self._refuse(
                    ws,
                    CLOSE_TRY_AGAIN_LATER,
                    f"server full: {b} conversations at most (--max-sessions {b}); try again later",
                )
            row = s.row = free[0]
            self.rows[row] = s
        finally:
            if s.row < 0:  # never joined: give the token back to whoever waits for it
                if token is not None and self.live.get(token) is s:
                    del self.live[token]
                s.left.set()
        loop = asyncio.get_running_loop()
        sender = None
        try:
            saved, meta = None, {}
            if token is not None:
                try:
                    loaded = await loop.run_in_executor(None, self.store.load, token)
                except (ValueError, OSError) as e:
                    log.warning("session %d: cannot load its saved state: %s", s.id, e)
                    self._fail(s, "saved session state unreadable", CLOSE_POLICY, bad=False)
                    return ws
                if loaded is not None:
                    saved, meta = loaded
                    s.resumed_frames = int(meta.get("frames", 0))
            try:
                hello = await loop.run_in_executor(
                    self.pool, self._join, row, saved, meta.get("memory"), s.watch
                )
            except ValueError as e:
                log.warning("session %d: %s", s.id, e)
                self._fail(
                    s, "saved session state does not fit this model", CLOSE_POLICY, bad=False
                )
                return ws
            if saved is not None:
                self.counters["restored"] += 1
            log.info(
                "session %d: row %d, %s",
                s.id,
                row,
                "resumed" if saved is not None else "new conversation",
            )
            await ws.send_bytes(b"\x00")
            if hello is not None:  # the memory panel: what the model has, the restored history
                hello.update(hello=True, resumed=saved is not None, session_id=s.id)
                self._report(s, hello)
            s.ready = True
            sender = asyncio.create_task(self._send_loop(s))
            await self._recv_loop(s)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as e:
            log.info("session %d: connection lost: %s", s.id, e)
        finally:
            s.ready = False
            if not s.closed:
                s.closed = True
                with contextlib.suppress(asyncio.QueueFull):
                    s.out.put_nowait(None)
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender
            await self._leave(s)
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()
            log.info(
                "session %d: closed (%d frames in, %d out, %d dropped)%s",
                s.id,
                s.frames_in,
                s.frames_out,
                s.dropped,
                f": {s.close_reason}" if s.close_reason else "",
            )
        return ws

    def _join(
        self, row: int, saved: dict | None, memory: dict | None, watch: bool
    ) -> dict[str, Any] | None:
        """On the engine's thread: start the row (``Engine.join``); for a client that watches
        the memory, its first report (with the history a resumed session saved)."""
        self.engine.join(row, saved, memory)
        self.engine.memory.watch(row, watch)
        if not watch:
            return None
        return {**self.engine.memory.report(row), **self.engine.memory.describe()}

    async def _snapshot_loop(self) -> None:
        """Every ``snapshot_every_s``: save the memory of each open resumable conversation that
        heard something since its last save (atomic writes: a crash keeps the previous one)."""
        while True:
            await asyncio.sleep(self.config.snapshot_every_s)
            for s in list(self.rows):
                if s is None or s.token is None or s.closed or s.frames_in == s.snapshot_frames:
                    continue
                try:
                    await self._save(s)
                    s.snapshot_frames = s.frames_in
                    self.counters["snapshots"] += 1
                except Exception:
                    log.exception("session %d: snapshot failed", s.id)

    async def _save(self, s: Session) -> Path | None:
        """Save the row's memory under the session's token (from the engine's thread)."""
        loop = asyncio.get_running_loop()

        def state() -> tuple[dict, dict]:
            return self.engine.ttt_state(s.row), self.engine.memory.export(s.row)

        tensors, memory = await loop.run_in_executor(self.pool, state)
        meta = {"frames": s.resumed_frames + s.frames_in, "memory": memory}
        assert s.token is not None
        return await loop.run_in_executor(None, self.store.save, s.token, tensors, meta)

    async def _claim(self, s: Session, token: str) -> bool:
        """Make ``s`` the holder of ``token``. A connection that holds it already is replaced:
        closed (``taken_over``), its memory saved, and only then is ``s`` let in to resume it.
        This is a client reconnecting after its connection dropped (the server may not have
        noticed yet), or one resuming right after it left, before the save ended. False (with
        ``s.close_reason``) when the older connection does not leave in ``TAKEOVER_TIMEOUT_S``
        or a newer one claimed the token meanwhile."""
        prev = self.live.get(token)
        self.live[token] = s
        if prev is not None:
            self.counters["taken_over"] += 1
            log.info("session %d: takes over session %d (same session token)", s.id, prev.id)
            self._fail(prev, "replaced by a newer connection with its session token",
                       CLOSE_NORMAL, bad=False)  # fmt: skip
            try:
                await asyncio.wait_for(prev.left.wait(), TAKEOVER_TIMEOUT_S)
            except asyncio.TimeoutError:
                s.close_reason = "the connection holding this session token did not close"
                return False
        if self.live.get(token) is not s:
            s.close_reason = "replaced by a newer connection with its session token"
            return False
        return True

    async def _leave(self, s: Session) -> None:
        """Free the row; with a token, save the row's TTT state first, then release the token
        (a connection waiting to take the conversation over resumes from that save)."""
        self.reserved.add(s.row)
        self.rows[s.row] = None
        try:
            if s.watch:  # before the save: once it ends, the row may be taken at once
                await asyncio.get_running_loop().run_in_executor(
                    self.pool, self.engine.memory.watch, s.row, False
                )
            if s.token is not None and s.frames_in > 0:
                path = await self._save(s)
                if path is not None:
                    self.counters["saved"] += 1
                    log.info("session %d: TTT state saved (%d frames)", s.id,
                             s.resumed_frames + s.frames_in)  # fmt: skip
        except Exception:
            log.exception("session %d: saving its state failed", s.id)
        finally:
            self.reserved.discard(s.row)
            if s.token is not None and self.live.get(s.token) is s:
                del self.live[s.token]
            s.left.set()

    async def _recv_loop(self, s: Session) -> None:
        ws = s.ws
        while not s.closed:
            msg = await ws.receive()
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            ):
                return
            if msg.type == aiohttp.WSMsgType.ERROR:
                exc = ws.exception()
                text = str(exc).lower()
                too_big = (
                    "exceeds limit" in text or "too big" in text or ws.close_code == CLOSE_TOO_BIG
                )
                self._fail(
                    s,
                    f"{'oversized message' if too_big else 'websocket error'}: {exc}",
                    CLOSE_TOO_BIG if too_big else CLOSE_POLICY,
                )
                return
            if msg.type != aiohttp.WSMsgType.BINARY:
                self._fail(s, f"unexpected {msg.type.name.lower()} message", CLOSE_UNSUPPORTED)
                return
            data: bytes = msg.data
            if not data:
                self._fail(s, "empty message", CLOSE_UNSUPPORTED)
                return
            if data[0] == KIND_RESET_MEMORY and len(data) == 1:
                asyncio.ensure_future(self._reset_memory(s))
                continue
            if data[0] != KIND_AUDIO:
                self._fail(s, f"unknown message kind {data[0]}", CLOSE_UNSUPPORTED)
                return
            self._audio(s, data[1:])

    def _audio(self, s: Session, payload: bytes) -> None:
        if not payload.startswith(OGG_MAGIC):
            self._fail(s, "audio payload is not Ogg/Opus", CLOSE_UNSUPPORTED)
            return
        try:
            pcm = s.reader.append_bytes(payload)
        except (ValueError, RuntimeError) as e:
            self._fail(s, f"audio payload is not Ogg/Opus: {e}", CLOSE_UNSUPPORTED)
            return
        s.ogg_bytes += len(payload)
        if pcm.size == 0:
            if s.samples_in == 0 and s.ogg_bytes > self.config.undecoded_bytes_limit:
                self._fail(s, f"no Opus audio in {s.ogg_bytes} bytes", CLOSE_UNSUPPORTED)
            return
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if not np.isfinite(pcm).all():
            self._fail(s, "non-finite audio", CLOSE_UNSUPPORTED)
            return
        s.samples_in += pcm.size
        buf = np.concatenate([s.pending, pcm])
        n = len(buf) // self.frame
        for i in range(n):
            s.frames.append(buf[i * self.frame : (i + 1) * self.frame])
        s.pending = buf[n * self.frame :]
        while len(s.frames) > self.config.max_backlog_frames:
            s.frames.popleft()
            s.dropped += 1
            self.counters["frames_dropped"] += 1
        if n and self._wake is not None:
            self._wake.set()

    async def _send_loop(self, s: Session) -> None:
        timeout = self.config.send_timeout_s
        while True:
            out = await s.out.get()
            if out is None:
                return
            if isinstance(out, dict):  # a memory report
                try:
                    data = bytes([KIND_MEMORY]) + json.dumps(out, allow_nan=False).encode()
                    await asyncio.wait_for(s.ws.send_bytes(data), timeout)
                except asyncio.TimeoutError:
                    self._not_reading(s, f"a send blocked {timeout:g} s")
                    return
                except (ConnectionResetError, aiohttp.ClientConnectionResetError,
                        RuntimeError) as e:  # fmt: skip
                    self._fail(s, f"connection lost while sending: {e}", CLOSE_POLICY, bad=False)
                    return
                except ValueError:  # a non-finite number slipped through: skip this report
                    log.warning("session %d: memory report not JSON-able", s.id)
                continue
            try:
                opus = s.writer.append_pcm(out.pcm)
                if len(opus) > 0:
                    await asyncio.wait_for(s.ws.send_bytes(b"\x01" + opus), timeout)
                if is_text(out.text_token):
                    piece = token_text(self.tokenizer, out.text_token)
                    await asyncio.wait_for(s.ws.send_bytes(b"\x02" + piece.encode()), timeout)
            except asyncio.TimeoutError:
                self._not_reading(s, f"a send blocked {timeout:g} s")
                return
            except (ConnectionResetError, aiohttp.ClientConnectionResetError, RuntimeError) as e:
                self._fail(s, f"connection lost while sending: {e}", CLOSE_POLICY, bad=False)
                return
            s.frames_out += 1


# -- running it ------------------------------------------------------------------------------------
class ServerThread:
    """A ``ChatServer`` on ``host:port`` (port 0: a free one) in a background thread, for tests,
    benchmarks and notebooks: ``with ServerThread(server) as t: ... t.url``."""

    def __init__(self, server: ChatServer, host: str = "127.0.0.1", port: int = 0):
        self.server, self.host, self.port = server, host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="moshi-ttt-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._open())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _open(self) -> None:
        self._runner = web.AppRunner(self.server.app(), handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def config_dict(config: ServeConfig) -> str:
    return json.dumps(asdict(config))
