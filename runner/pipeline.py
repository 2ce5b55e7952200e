"""Pipeline parallelism over the MLX ring backend.

A group of ``world_size`` processes serves one model: rank ``r`` holds the
contiguous layers ``[start_layer, end_layer)`` (ranks in layer order, rank 0
holds the first layers), receives the hidden states from rank ``r - 1``, runs
its layers with its own KV cache and sends the result to rank ``r + 1``. The
last rank's hidden states are then shared with every rank (one ``all_gather``)
so that every rank computes the same logits and its sampler picks the same
token: ``mlx_lm.stream_generate`` runs unchanged, in lockstep, on every rank.

Everything here runs inside the process that owns the model (the engine
child): joining a ring group is process-global and cannot be undone, so a
process whose group failed must exit and be restarted.

What the ring backend does when a peer goes away (measured with mlx 0.32.4 on
loopback, see ``tests/test_pipeline.py``):

* the peer process exits or is killed (its sockets close): every pending or
  later ``send``/``recv``/``all_gather`` raises
  ``RuntimeError("[ring] connection to a peer was lost")`` within
  milliseconds;
* the peer is alive but stalled (SIGSTOP, swapped out, a host that vanished
  without closing its sockets): the ring waits forever, in ``mx.eval``,
  ``array.item()``, ``mx.async_eval`` (which release the GIL) or in
  ``mx.clear_cache()`` (which does not). :class:`StallWatchdog` ends the
  process after a deadline without progress.
* during ``mx.distributed.init`` the ring ``accept()`` blocks forever if the
  left neighbour never connects, and holds the GIL while it does; only a
  signal interrupts it, which is why :func:`connect_group` assembles the ring
  with its own handshake first and bounds ``init`` with ``SIGALRM``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self, cast

import mlx.core as mx
from loguru import logger
from mlx import nn
from mlx_lm.generate import generation_stream
from mlx_lm.models.base import create_attention_mask
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load as mlx_load

# Model types whose inner model is exactly ``embed_tokens -> layers(h, mask,
# cache) -> norm``: our pipeline stage reproduces that forward pass.
# ("mistral" is loaded by mlx-lm as llama.)
PIPELINE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# mlx's ring connect retries a refused connection after 1, 2, 4 and 8 s, so
# ``init`` may legitimately take that long after every rank is known to be up.
INIT_GRACE_S = 16.0

_HELLO = "EXOJET-RING"
_joined_group: str | None = None


class GroupConnectError(Exception):
    """The ring group could not be assembled within the time bound."""


def split_layers(n_layers: int, weights: list[float]) -> list[tuple[int, int]]:
    """Split ``n_layers`` into contiguous ``[start, end)`` ranges, one per weight.

    Each rank gets a share proportional to its weight (e.g. its free memory),
    at least one layer; the ranges cover every layer in order.
    """
    if not weights:
        raise ValueError("weights must not be empty")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {weights}")
    if n_layers < len(weights):
        raise ValueError(f"cannot give {len(weights)} ranks at least one of {n_layers} layers")
    total = sum(weights)
    ranges: list[tuple[int, int]] = []
    start = 0
    cumulative = 0.0
    for i, w in enumerate(weights):
        cumulative += w
        ranks_after = len(weights) - i - 1
        end = round(n_layers * cumulative / total)
        # Keep one layer for this rank and one for every rank after it.
        end = min(max(end, start + 1), n_layers - ranks_after)
        ranges.append((start, end))
        start = end
    return ranges


def _parse_host(host: str) -> tuple[str, int]:
    ip, sep, port = host.rpartition(":")
    if not sep or not ip or not port.isdigit():
        raise ValueError(f"host {host!r} is not 'ip:port'")
    return ip, int(port)


def _read_line(sock: socket.socket, deadline: float) -> str:
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data.decode().strip()


def _expect_token(sock: socket.socket, token: str, peer: str, deadline: float) -> None:
    got = _read_line(sock, deadline)
    if got != token:
        raise GroupConnectError(f"{peer} sent {got!r} instead of {token!r}")


def _accept_left(
    listener: socket.socket,
    expected: str,
    left: int,
    deadline: float,
    result: dict[str, Any],
) -> None:
    """Accept the left neighbour's hello; reject strays and keep listening."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        listener.settimeout(remaining)
        try:
            conn, _ = listener.accept()
        except (TimeoutError, OSError):
            return
        try:
            hello = _read_line(conn, deadline)
        except (TimeoutError, OSError):
            conn.close()
            continue
        if hello != expected:
            result["error"] = f"rank {left} sent {hello!r}, expected {expected!r}"
            conn.sendall(b"NO wrong group, world size or rank\n")
            conn.close()
            continue
        # Close before answering: the left neighbour starts the real ring
        # connect only after our answer, and that connect must reach mlx's
        # listener, never this one's backlog.
        listener.close()
        conn.sendall(b"OK\n")
        result["sock"] = conn
        return


def _connect_right(host: str, hello: str, deadline: float) -> socket.socket:
    ip, port = _parse_host(host)
    last_error: Exception = TimeoutError()
    while time.monotonic() < deadline:
        remaining = deadline - time.monotonic()
        try:
            sock = socket.create_connection((ip, port), timeout=min(remaining, 2.0))
        except OSError as e:
            last_error = e
            # The neighbour may simply not be listening yet: retry briefly.
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            continue
        try:
            sock.sendall((hello + "\n").encode())
            answer = _read_line(sock, deadline)
        except (TimeoutError, OSError) as e:
            sock.close()
            last_error = e
            continue
        if answer != "OK":
            sock.close()
            raise GroupConnectError(f"rank at {host} refused to join: {answer}")
        return sock
    raise TimeoutError(str(last_error))


def _assemble_ring(
    group_id: str,
    world_size: int,
    rank: int,
    hosts: list[str],
    deadline: float,
    timeout_s: float,
) -> None:
    """Check both ring neighbours, then pass two tokens around the ring.

    The first token proves that every rank has both neighbours; the second
    releases all ranks into ``mx.distributed.init`` within milliseconds of
    each other, so mlx's own connect retries (15 s in all) never run out.
    """
    left, right = (rank - 1) % world_size, (rank + 1) % world_size
    ip, port = _parse_host(hosts[rank])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((ip, port))
    except OSError as e:
        listener.close()
        raise GroupConnectError(f"rank {rank} cannot listen on {hosts[rank]}: {e}") from e
    listener.listen(4)
    accepted: dict[str, Any] = {}
    acceptor = threading.Thread(
        target=_accept_left,
        args=(
            listener,
            f"{_HELLO} {group_id} {world_size} {left}",
            left,
            deadline,
            accepted,
        ),
        daemon=True,
    )
    acceptor.start()
    right_sock: socket.socket | None = None
    try:
        try:
            right_sock = _connect_right(hosts[right], f"{_HELLO} {group_id} {world_size} {rank}", deadline)
        except TimeoutError as e:
            raise GroupConnectError(f"could not reach rank {right} at {hosts[right]} within {timeout_s} s ({e})") from e
        acceptor.join(max(0.0, deadline - time.monotonic()))
        left_sock = accepted.get("sock")
        if left_sock is None:
            reason = accepted.get("error", "it never connected")
            raise GroupConnectError(f"rank {left} at {hosts[left]} did not join within {timeout_s} s ({reason})")
        with left_sock:
            last = world_size - 1
            # READY goes all the way round: back at rank 0 it proves every
            # rank has both neighbours. GO then releases the ranks into init
            # in ring order and stops at the last rank: that rank connects to
            # rank 0 first, so rank 0 must be the first to listen.
            for token in ("READY", "GO"):
                try:
                    if rank > 0:
                        _expect_token(left_sock, token, f"rank {left} at {hosts[left]}", deadline)
                    if rank < last or token == "READY":
                        right_sock.sendall(f"{token}\n".encode())
                    if rank == 0 and token == "READY":
                        _expect_token(left_sock, token, f"rank {left} at {hosts[left]}", deadline)
                except (TimeoutError, OSError) as e:
                    raise GroupConnectError(
                        f"the ring did not assemble within {timeout_s} s: no {token} from "
                        f"rank {left} at {hosts[left]} (a rank further round the ring is "
                        f"unreachable or gone: {e!r})"
                    ) from e
    finally:
        listener.close()
        if right_sock is not None:
            right_sock.close()


def _init_ring_bounded(bound_s: float) -> mx.distributed.Group:
    """``mx.distributed.init`` interrupted by SIGALRM after ``bound_s``.

    The ring's blocking ``accept``/``connect`` hold the GIL, so no Python
    thread can stop them; a signal makes the syscall fail with EINTR and mlx
    raises. The timer repeats so that a retry loop inside mlx is cut too.
    """
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, bound_s, 0.2)
    try:
        return mx.distributed.init(backend="ring", strict=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def connect_group(
    group_id: str, world_size: int, rank: int, hosts: list[str], timeout_s: float
) -> mx.distributed.Group:
    """Join the ring group ``group_id`` as ``rank`` and return it, verified.

    ``hosts[r]`` is rank r's ``"ip:port"``; every rank listens on its own
    address and connects to its right neighbour ``(r + 1) % world_size``
    (that is the ring backend's layout). Call this in the main thread of the
    process that will run the model (the engine child), once: the ring group
    is process-global, cannot be left, and mlx's ``init`` can only be bounded
    with a signal, which Python delivers to the main thread only.

    Raises :class:`GroupConnectError`, naming the rank and host at fault, if
    the group is not up within ``timeout_s`` (plus at most ``INIT_GRACE_S``
    for mlx's own connect retries once every rank is known to be up).
    """
    global _joined_group
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("connect_group must run in the main thread (it bounds init with SIGALRM)")
    if _joined_group is not None:
        raise GroupConnectError(
            f"this process already tried to join group {_joined_group!r}; a ring group "
            "cannot be left or retried, start a new process"
        )
    if len(hosts) != world_size or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} and {len(hosts)} hosts do not fit world size {world_size}")
    if world_size < 2:
        raise ValueError("a ring group needs at least 2 ranks")
    for host in hosts:
        _parse_host(host)

    started = time.monotonic()
    deadline = started + timeout_s
    logger.info("group {}: rank {}/{} assembling ring {}", group_id, rank, world_size, hosts)
    _assemble_ring(group_id, world_size, rank, hosts, deadline, timeout_s)

    fd, hostfile = tempfile.mkstemp(prefix=f"exojet-ring-{rank}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump([[h] for h in hosts], f)
    os.environ["MLX_HOSTFILE"] = hostfile
    os.environ["MLX_RANK"] = str(rank)
    bound = max(deadline - time.monotonic(), 0.0) + INIT_GRACE_S
    # From here on the process is committed: a failed init may leave mlx
    # half-connected, so it is never retried in the same process.
    _joined_group = group_id
    try:
        group = _init_ring_bounded(bound)
    except RuntimeError as e:
        raise GroupConnectError(
            f"ring init for group {group_id!r} failed (rank {rank}, left {hosts[rank - 1]}, "
            f"right {hosts[(rank + 1) % world_size]}): {e}"
        ) from e
    finally:
        Path(hostfile).unlink(missing_ok=True)

    total = mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu).item()
    if group.size() != world_size or group.rank() != rank or total != world_size:
        raise GroupConnectError(f"group check failed: size {group.size()}, rank {group.rank()}, all_sum {total}")
    logger.info(
        "group {}: rank {}/{} connected in {:.2f} s",
        group_id,
        rank,
        world_size,
        time.monotonic() - started,
    )
    return group


class PipelineStage(nn.Module):
    """Replaces a model's inner ``model``: embeddings, this rank's layers, norm.

    ``layers`` holds only the local layers, so ``model.layers``,
    ``model.make_cache()`` and ``mlx_lm.models.cache.make_prompt_cache`` make
    KV caches for the local layers only. The embeddings and the final norm
    stay on every rank: ``recv_like`` needs the hidden states' shape, and
    every rank computes the logits itself so that no logits cross the wire.
    """

    def __init__(self, inner: nn.Module, group: mx.distributed.Group, start: int, end: int):
        super().__init__()
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers[start:end]
        self.norm = inner.norm
        self.sliding_window = getattr(inner, "sliding_window", None)
        self.start_layer = start
        self.end_layer = end
        self._group = group

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        """Run this rank's layers between the previous and the next rank."""
        rank, size = self._group.rank(), self._group.size()
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)

        if rank > 0:
            h = mx.distributed.recv_like(h, rank - 1, group=self._group)

        masks: dict[bool, Any] = {}
        for layer, c in zip(self.layers, cache, strict=True):
            sliding = bool(getattr(layer, "use_sliding", False))
            if sliding not in masks:
                window = self.sliding_window if sliding else None
                masks[sliding] = create_attention_mask(h, c, window_size=window)
            h = layer(h, masks[sliding], cache=c)

        if rank < size - 1:
            h = mx.distributed.send(h, rank + 1, group=self._group)
            # generate_step evaluates only the caches during prefill: tie the
            # send to them or it would never run and the next rank would wait.
            if cache[-1] is not None:
                cache[-1].keys = mx.depends(cache[-1].keys, h)

        # Every rank takes the last rank's hidden states, inside the graph.
        batch = h.shape[0]
        h = mx.distributed.all_gather(h, group=self._group)[(size - 1) * batch :]
        return self.norm(h)


def make_pipelined(model: nn.Module, group: mx.distributed.Group, start_layer: int, end_layer: int) -> nn.Module:
    """Turn ``model`` (lazy or loaded) into this rank's pipeline stage, in place.

    Layers outside ``[start_layer, end_layer)`` are dropped, so when the model
    was loaded lazily their weights are never read. Every rank of ``group``
    must call this with its own range; the ranges must be contiguous and in
    rank order (checked across the group). Supports the model types in
    ``PIPELINE_MODEL_TYPES``. mlx-lm's own ``model.model.pipeline()`` is not
    used: it gives rank 0 the *last* layers, contrary to our shard layout.
    """
    model_type = getattr(model, "model_type", None)
    if model_type not in PIPELINE_MODEL_TYPES:
        raise NotImplementedError(f"pipeline parallelism supports {sorted(PIPELINE_MODEL_TYPES)}, not {model_type!r}")
    n_layers = len(model.model.layers)
    if not 0 <= start_layer < end_layer <= n_layers:
        raise ValueError(f"layers [{start_layer}, {end_layer}) are not within 0..{n_layers}")
    gathered = mx.distributed.all_gather(
        mx.array([[start_layer, end_layer]], dtype=mx.int32), group=group, stream=mx.cpu
    )
    ranges = cast(list[list[int]], gathered.tolist())
    expected_start = 0
    for r, (s, e) in enumerate(ranges):
        if s != expected_start:
            raise ValueError(f"rank {r} holds [{s}, {e}) but should start at {expected_start}: {ranges}")
        expected_start = e
    if expected_start != n_layers:
        raise ValueError(f"the ranks' layers {ranges} do not cover all {n_layers} layers")
    model.model = PipelineStage(model.model, group, start_layer, end_layer)
    logger.info(
        "rank {}/{}: pipeline stage with layers [{}, {}) of {}",
        group.rank(),
        group.size(),
        start_layer,
        end_layer,
        n_layers,
    )
    return model


def load_shard(
    model_path: str | Path,
    group: mx.distributed.Group,
    start_layer: int,
    end_layer: int,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load only layers ``[start_layer, end_layer)`` of an mlx-lm model folder.

    The weights are opened lazily and the other layers are dropped before
    anything is evaluated, so they never occupy memory. Returns once every
    rank has loaded its shard.
    """
    model, tokenizer = cast(tuple[nn.Module, TokenizerWrapper], mlx_load(str(model_path), lazy=True))
    make_pipelined(model, group, start_layer, end_layer)
    mx.eval(model.parameters())
    # A barrier, so that no rank starts generating while another still loads.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, tokenizer


def pipeline_barrier(
    group: mx.distributed.Group,
    stream: mx.Stream | mx.ThreadLocalStream = generation_stream,
) -> None:
    """Return once every rank has finished the pipeline work it queued.

    ``generate_step`` queues one step beyond the last token it yields, on
    every rank. A rank that moves on (exits, or stops taking part) before
    its peers have finished that step breaks their ring connection, so call
    this on every rank after each generation, from the generating thread,
    with the stream it generated on (mlx-lm's default is thread-local).
    """
    mx.synchronize(stream)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


class StallWatchdog:
    """Ends the process if no progress is reported for about ``timeout_s`` seconds.

    A stalled ring peer makes the ring wait forever and nothing in the process
    can interrupt it. Some of those waits hold the GIL (``mx.clear_cache()``,
    which ``generate_step`` calls every 256 tokens, synchronises the streams
    without releasing it), so no Python thread could act: this uses
    ``faulthandler``'s C watchdog thread instead. On a stall it writes
    ``Timeout (h:mm:ss)!`` and every thread's Python stack to stderr and exits
    with status 1. The timer is process-global (one per process). Use it
    around generation and call :meth:`beat` for every token::

        with StallWatchdog(20.0) as watchdog:
            for response in stream_generate(...):
                watchdog.beat()
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        # Re-arming starts a new C thread; doing it at most every tenth of
        # the timeout keeps beat() cheap at thousands of tokens per second.
        self._rearm_every = timeout_s / 10
        self._armed_at = 0.0

    def __enter__(self) -> Self:
        self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        faulthandler.cancel_dump_traceback_later()

    def beat(self) -> None:
        """Report progress (one token generated)."""
        if time.monotonic() - self._armed_at >= self._rearm_every:
            self._arm()

    def _arm(self) -> None:
        self._armed_at = time.monotonic()
        faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)
