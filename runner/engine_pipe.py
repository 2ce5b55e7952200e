"""The engine child's end of the protocol pipe: blocking frame I/O on the two
descriptors it took over from stdin and stdout (see `runner/engine_protocol.py`)."""

from __future__ import annotations

import os
import select
import threading

from exojet.runner.engine_protocol import Reply, Request, encode_frame, frame_length, request_decoder


class Pipe:
    """Blocking frame I/O on the two protocol descriptors."""

    def __init__(self, fd_in: int, fd_out: int) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        # Generations in threads write their replies too: one frame at a time.
        self._writing = threading.Lock()

    def _read_exactly(self, n: int) -> bytes | None:
        chunks: list[bytes] = []
        while n:
            chunk = os.read(self.fd_in, n)
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def read(self) -> Request | None:
        """The next request, or None when the parent closed the pipe."""
        header = self._read_exactly(4)
        if header is None:
            return None
        body = self._read_exactly(frame_length(header))
        if body is None:
            return None
        return request_decoder.decode(body)

    def readable(self) -> bool:
        """Whether a request is waiting, without blocking."""
        ready, _, _ = select.select([self.fd_in], [], [], 0)
        return bool(ready)

    def write(self, reply: Reply) -> None:
        """Write one reply frame (a single syscall unless the pipe is full)."""
        view = memoryview(encode_frame(reply))
        with self._writing:
            while view:
                view = view[os.write(self.fd_out, view) :]
