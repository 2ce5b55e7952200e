"""The engine child's end of the protocol pipe: blocking frame I/O on the two
descriptors it took over from stdin and stdout (see `runner/engine_protocol.py`)."""

from __future__ import annotations

import os
import select
import threading

import msgspec
from loguru import logger

from exojet.runner.engine_protocol import Reply, Request, RequestFailed, encode_frame, frame_length, request_decoder


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
        """The next request, or None when the parent closed the pipe. A request whose fields break
        the protocol's types or bounds (bus/sampling.py's: max_tokens 0, top_p 2) is answered here
        with an InvalidRequest naming the field, and the next one read: the child serves on."""
        while True:
            header = self._read_exactly(4)
            if header is None:
                return None
            body = self._read_exactly(frame_length(header))
            if body is None:
                return None
            try:
                return request_decoder.decode(body)
            except msgspec.ValidationError as err:
                logger.bind(error_type="InvalidRequest").warning(f"request refused: {err}")
                self.write(RequestFailed("InvalidRequest", str(err), _request_id(body)))

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


def _request_id(body: bytes) -> int:
    """The `request_id` of a request that does not read as one (0: it names none), so that its
    refusal reaches the generation that sent it."""
    try:
        message = msgspec.msgpack.decode(body)
    except msgspec.DecodeError:  # its type broke before its bytes did: none to read
        return 0
    request_id = message.get("request_id") if isinstance(message, dict) else None
    return request_id if isinstance(request_id, int) else 0
