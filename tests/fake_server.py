"""A fake server runtime for tests: speaks fedsea's protocol (fedsea_shared.protocol) and
answers each step the way `mode` says, from well-formed (the identity as the middle
blocks) to hostile (oversized frames, wrong shapes and dtypes, NaN) or slow (held)."""

from __future__ import annotations

import asyncio
import struct

import orjson

import torch
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from fedsea_shared.protocol import (
    Close, Closed, Error, ErrorCode, Fork, Hello, Open, Opened, Output, Step, TrainBackward, TrainForward, TrainGrad,
    TrainJoin, TrainJoined, TrainOutput, Welcome, decode, encode, tensor_meta,
)


class FakeServer:
    """Answers hello/open/close properly; answers steps according to `self.mode`."""

    def __init__(self, max_sessions: int = 256):
        self.mode = "echo"  # echo: the identity as the middle blocks, a well-formed reply
        self.max_sessions = max_sessions
        self.closed_sids: list[int] = []
        self.held = 0  # steps waiting in mode "hold"
        # The load figure Welcome and Opened report (a dict, sent as is, well-formed or not;
        # or a function of this server giving one); None: none.
        self.load = None
        self.open_sessions = 0  # over all connections
        self.release = asyncio.Event()  # lets the held steps answer
        self._replies: set[asyncio.Task] = set()
        self.url = ""

    async def __aenter__(self):
        self._server = await serve(self._handle, "127.0.0.1", 0, compression=None, max_size=None)
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self._server.close()

    async def _handle(self, ws):
        try:
            await self._serve(ws)
        except ConnectionClosed:
            pass  # the edge hangs up on oversized frames

    async def _serve(self, ws):
        open_sids: set[int] = set()
        lengths: dict[int, int] = {}  # tokens each session holds, for forks
        async for data in ws:
            msg, tensor = decode(data)
            if isinstance(msg, Hello):
                await ws.send(self._with_load(encode(Welcome(
                    layers=msg.layers, dtype=msg.dtype, noise_min=0, noise_max=4, block_size=16,
                    max_context=1 << 20, max_sessions=self.max_sessions, max_message_bytes=1 << 40))))
            elif isinstance(msg, (Open, Fork)):
                if len(open_sids) >= self.max_sessions:  # as the real server: a per-connection cap
                    await ws.send(encode(Error(code=ErrorCode.LIMIT, message="too many sessions", sid=msg.sid)))
                    continue
                self.open_sessions += msg.sid not in open_sids
                open_sids.add(msg.sid)
                lengths[msg.sid] = lengths.get(msg.parent, 0) if isinstance(msg, Fork) else 0
                await ws.send(self._with_load(encode(Opened(sid=msg.sid, cached=lengths[msg.sid]))))
            elif isinstance(msg, Close):
                self.open_sessions -= msg.sid in open_sids
                open_sids.discard(msg.sid)
                self.closed_sids.append(msg.sid)
                await ws.send(encode(Closed(sid=msg.sid)))
            elif isinstance(msg, TrainJoin):
                await ws.send(encode(TrainJoined(sid=msg.sid, job=msg.job, params=1, resumed=False)))
            elif isinstance(msg, (Step, TrainForward, TrainBackward)):  # concurrently: held steps hold up no others
                if isinstance(msg, Step):
                    for sid, pos, n in msg.rows:
                        lengths[sid] = pos + n
                task = asyncio.get_running_loop().create_task(self._reply(ws, msg, tensor))
                self._replies.add(task)
                task.add_done_callback(self._replies.discard)

    async def _reply(self, ws, request, x: torch.Tensor) -> None:
        try:
            await self._answer(ws, request, x)
        except ConnectionClosed:
            pass

    def _with_load(self, frame: bytes) -> bytes:
        """`frame` (a tensorless message) with `self.load` in its header, framed by hand."""
        load = self.load(self) if callable(self.load) else self.load
        if load is None:
            return frame
        header = {**orjson.loads(frame[4:]), "load": load}
        raw = orjson.dumps(header)
        return struct.pack(">I", len(raw)) + raw

    @staticmethod
    def _frame(request, x: torch.Tensor, pos_offset: int = 0) -> bytes:
        """The reply to `request` carrying `x` (the middle blocks' output or a gradient)."""
        meta = tensor_meta(x)
        if isinstance(request, Step):
            if x.shape[0] != meta.shape[0] or x.shape[0] != sum(n for _, _, n in request.rows):
                # A reply whose rows do not add up to its tensor is not well-formed: frame it by hand.
                header = {"type": "output", "rows": [list(r) for r in request.rows], "tensor": meta.model_dump()}
                raw = orjson.dumps(header)
                return struct.pack(">I", len(raw)) + raw + x.contiguous().view(torch.uint8).numpy().tobytes()
            rows = [(sid, pos + pos_offset, n) for sid, pos, n in request.rows]
            return encode(Output(rows=rows, tensor=meta), x)
        if isinstance(request, TrainForward):
            return encode(TrainOutput(sid=request.sid, tensor=meta), x)
        return encode(TrainGrad(sid=request.sid, stepped=True, tensor=meta), x)

    async def _answer(self, ws, request, x: torch.Tensor) -> None:
        mode = self.mode
        if mode == "hold":  # a slow server: the step is answered (well-formed) once released
            self.held += 1
            await self.release.wait()
            self.held -= 1
        if mode == "flood":  # a flood of undecodable frames, then a well-formed reply
            for _ in range(3000):
                await ws.send(b"\x00\x00\x00\x02{}")
        if mode == "preempted":  # a server that preempts every step, forever
            for sid in request.sids:
                await ws.send(encode(Error(code=ErrorCode.PREEMPTED, message="preempted", sid=sid)))
            return
        if mode == "huge_frame":
            # Only the header of a 600 MiB binary frame: an edge that waits for its payload hangs.
            ws.transport.write(b"\x82\x7f" + struct.pack(">Q", 600 * 2**20))
            return
        if mode == "oversized":
            x = x.repeat(100, 1)  # a well-formed frame, larger than any reply the edge can ask for
        elif mode == "wrong_shape":
            x = x[:, :-1]
        elif mode == "extra_rows":
            x = torch.cat([x, x])
        elif mode == "wrong_dtype":
            x = x.to(torch.float16)
        elif mode == "nan":
            x = x.clone()
            x[0, 0] = float("nan")
        elif mode == "inf":
            x = x.clone()
            x[-1, -1] = float("inf")
        elif mode == "payload_mismatch":
            await ws.send(self._frame(request, x)[:-4])
            return
        await ws.send(self._frame(request, x, pos_offset=int(mode == "wrong_pos")))
