"""A TCP proxy in front of nats-server that loses the connection on cue.

`cut_after(n)`: the next connection's server-to-client side is cut after n bytes
(a connection lost mid-read). `drop_next_ack(marker)`: the next server-to-client
chunk that contains `marker` (a publish ack, say) is not forwarded and every
connection is cut at that moment, so the server has stored the write and the
client never hears it did (a lost ack).
"""

from __future__ import annotations

import asyncio


class NatsProxy:
    def __init__(self, target_port: int = 0) -> None:
        self.target_port = target_port
        self.connections = 0
        self.acks_dropped = 0
        self._cut_budget: int | None = None
        self._ack_marker: bytes | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def cut_after(self, n_bytes: int) -> None:
        self._cut_budget = n_bytes

    def drop_next_ack(self, marker: bytes = b'"stream":"EXO_LOG","seq":') -> None:
        self._ack_marker = marker

    def cut_all(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        budget, self._cut_budget = self._cut_budget, None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]

        async def upstream() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            nonlocal budget
            while data := await up_reader.read(65536):
                if self._ack_marker is not None and self._ack_marker in data:
                    self._ack_marker = None
                    self.acks_dropped += 1
                    self.cut_all()
                    return
                if budget is not None:
                    data = data[:budget]
                    budget -= len(data)
                writer.write(data)
                await writer.drain()
                if budget == 0:
                    return

        # Either side ending (or the cut) ends the connection for both.
        pipes = {asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())}
        _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pending:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        writer.close()
        up_writer.close()

    def close(self) -> None:
        self.cut_all()
        if self._server is not None:
            self._server.close()
