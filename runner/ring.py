"""Joining a pipeline's ring group (MLX ring backend), bounded in time.

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
  ``mx.clear_cache()`` (which does not). ``pipeline.StallWatchdog`` ends the
  process after a deadline without progress.
* during ``mx.distributed.init`` the ring ``accept()`` blocks forever if the
  left neighbour never connects, and holds the GIL while it does; only a
  signal interrupts it, which is why :func:`connect_group` assembles the ring
  with its own handshake first and bounds ``init`` with ``SIGALRM``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from loguru import logger

from exojet.runner import ring_identity
from exojet.runner.ring_identity import GroupKeys

# mlx's ring connect retries a refused connection after 1, 2, 4 and 8 s, so
# ``init`` may legitimately take that long after every rank is known to be up.
INIT_GRACE_S = 16.0

_HELLO = "EXOJET-RING"
_joined_group: str | None = None


class GroupConnectError(Exception):
    """The ring group could not be assembled within the time bound."""


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
    ring: GroupKeys | None,
) -> None:
    """Accept the left neighbour's hello (and, with `ring`, its proof); refuse strays,
    name them in `result["refused"]`, and keep listening."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        listener.settimeout(remaining)
        try:
            conn, peer = listener.accept()
        except (TimeoutError, OSError):
            return
        try:
            refusal = _admit(conn, expected, left, deadline, ring)
        except (TimeoutError, OSError):
            conn.close()
            continue
        if refusal is not None:
            stranger = f"{peer[0]}:{peer[1]} {refusal}"
            logger.warning("ring: refused {}", stranger)
            result.setdefault("refused", []).append(stranger)
            result["error"] = stranger
            with contextlib.suppress(OSError):
                conn.sendall(f"NO {refusal}\n".encode())
            conn.close()
            continue
        # Close before answering: the left neighbour starts the real ring
        # connect only after our answer, and that connect must reach mlx's
        # listener, never this one's backlog.
        listener.close()
        conn.sendall(b"OK\n")
        result["sock"] = conn
        return


def _admit(conn: socket.socket, expected: str, left: int, deadline: float, ring: GroupKeys | None) -> str | None:
    """Why the peer on `conn` is not our left neighbour, or None if it is.

    With `ring`, the hello carries the peer's nonce: we answer it with our own proof
    and a nonce of ours, and the peer must answer that with its proof as rank `left`.
    """
    hello = _read_line(conn, deadline)
    words = hello.split(" ")
    if ring is None:
        return None if hello == expected else f"sent {hello[:200]!r}, expected {expected!r}"
    if " ".join(words[:-1]) != expected or len(words[-1]) != 32:
        return f"sent {hello[:200]!r}, expected {expected!r} and a nonce (an unsigned or foreign hello)"
    mine = ring_identity.nonce()
    conn.sendall(f"PROVE {ring.proof(words[-1])} {mine}\n".encode())
    answer = _read_line(conn, deadline).split(" ")
    if len(answer) != 2 or answer[0] != "PROOF":
        return f"answered the challenge with {' '.join(answer)[:200]!r}, not a PROOF"
    try:
        ring.check(left, mine, answer[1])
    except ring_identity.BadProof as err:
        return f"claims rank {left} but {err}"
    return None


def _connect_right(host: str, hello: str, right: int, deadline: float, ring: GroupKeys | None) -> socket.socket:
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
            answer = _introduce(sock, hello, right, deadline, ring)
        except (TimeoutError, OSError) as e:
            sock.close()
            last_error = e
            continue
        if answer != "OK":
            sock.close()
            raise GroupConnectError(f"rank {right} at {host} refused to join: {answer}")
        return sock
    raise TimeoutError(str(last_error))


def _introduce(sock: socket.socket, hello: str, right: int, deadline: float, ring: GroupKeys | None) -> str:
    """Say hello to the right neighbour (with `ring`: check its proof, give ours); its last answer."""
    if ring is None:
        sock.sendall((hello + "\n").encode())
        return _read_line(sock, deadline)
    mine = ring_identity.nonce()
    sock.sendall(f"{hello} {mine}\n".encode())
    challenge = _read_line(sock, deadline).split(" ")
    if len(challenge) != 3 or challenge[0] != "PROVE":
        return " ".join(challenge)[:200]
    try:
        ring.check(right, mine, challenge[1])
    except ring_identity.BadProof as err:
        sock.sendall(b"NO your proof does not verify\n")
        raise GroupConnectError(f"the peer listening for rank {right} is not rank {right}: {err}") from None
    sock.sendall(f"PROOF {ring.proof(challenge[2])}\n".encode())
    return _read_line(sock, deadline)


def _assemble_ring(
    group_id: str,
    world_size: int,
    rank: int,
    hosts: list[str],
    deadline: float,
    timeout_s: float,
    keys: GroupKeys | None,
) -> list[str]:
    """Check both ring neighbours (with `keys`, each proves its rank), then pass two
    tokens around the ring; returns the strangers refused on the way.

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
            keys,
        ),
        daemon=True,
    )
    acceptor.start()
    right_sock: socket.socket | None = None
    try:
        try:
            right_sock = _connect_right(hosts[right], f"{_HELLO} {group_id} {world_size} {rank}", right, deadline, keys)
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
    return list(accepted.get("refused", []))


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
    group_id: str, world_size: int, rank: int, hosts: list[str], timeout_s: float, keys: GroupKeys | None = None
) -> tuple[mx.distributed.Group, list[str]]:
    """Join the ring group ``group_id`` as ``rank``; return it, verified, and the strangers
    refused on the way (each named with its address and why).

    With ``keys`` every neighbour proves it holds the key of the rank it claims (see
    `runner/ring_identity.py`); without, a plain hello naming the group is enough.

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
    refused = _assemble_ring(group_id, world_size, rank, hosts, deadline, timeout_s, keys)

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
    return group, refused
