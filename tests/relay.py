"""A recording relay: what an edge really put on the wire, captured between it and a server
runtime on real websockets (the tests read the wire, not the server's internals)."""

from __future__ import annotations

import asyncio
import threading

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from fedsea_shared.protocol import Open, decode, encode


class RecordingRelay:
    """A websocket relay between edge and server that keeps every edge -> server frame.
    While `forget` is set it strips the prefix an `open` names: the server then holds
    nothing for the session, as after it evicted the prefix, and the edge re-sends it."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.frames: list[bytes] = []
        self.forget = False
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        async def start():
            return await serve(self._relay, "127.0.0.1", 0, compression=None, max_size=None)

        self._server = self._loop.run_until_complete(start())
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        started.set()
        self._loop.run_forever()

    async def _relay(self, edge) -> None:
        async with connect(self.upstream, compression=None, max_size=None) as server:
            async def up():
                async for frame in edge:
                    message, _ = decode(frame)
                    if self.forget and isinstance(message, Open):
                        frame = encode(message.model_copy(update={"prefix": None, "partial": None}))
                    self.frames.append(bytes(frame))
                    await server.send(frame)
                await server.close()

            async def down():
                async for frame in server:
                    await edge.send(frame)
                await edge.close()

            await asyncio.gather(up(), down(), return_exceptions=True)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
