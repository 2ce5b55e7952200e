"""`exojet nats` as a cluster node, and `exojet streams` (replicas)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

from loguru import logger
from nats.js import api
from nats.js.errors import NotFoundError

from exojet.bus import streams
from exojet.bus.nats import client, stream_setup
from exojet.bus.ops.server import ClusterConfig


def listen_address(listen: str | None, host: str, port: int) -> tuple[str, int]:
    """`--listen HOST:PORT` (nats-server's flag), else `--host` and `--port`."""
    if listen is None:
        return host, port
    parsed = urlparse(f"nats://{listen}")
    try:
        listen_port = parsed.port
    except ValueError:
        listen_port = None
    if not parsed.hostname or listen_port is None:
        raise ValueError(f"--listen {listen!r} is not HOST:PORT")
    return parsed.hostname, listen_port


def cluster_config(name: str | None, cluster: str | None, cluster_name: str, routes: str) -> ClusterConfig | None:
    """The node's cluster settings from nats-server's own flags, or None to run alone."""
    if cluster is None:
        if routes:
            raise ValueError("--routes needs --cluster (where this node's own routes listen)")
        return None
    listed = tuple(r.strip() for r in routes.split(",") if r.strip())
    for url in (cluster, *listed):
        parsed = urlparse(url)
        try:
            port = parsed.port
        except ValueError:
            port = None
        if parsed.scheme != "nats" or not parsed.hostname or port is None:
            raise ValueError(f"{url!r} is not a route URL (nats://HOST:PORT)")
    if not listed:
        raise ValueError("--cluster needs --routes: the other nodes' --cluster URLs (a JetStream cluster has routes)")
    return ClusterConfig(name=name or socket.gethostname(), listen=cluster, cluster_name=cluster_name, routes=listed)


def create_streams_later(url: str, auth_dir: Path, replicas: int | None) -> None:
    """Create the streams as admin in the background, once the cluster's JetStream answers."""
    from exojet.bus.ops import identities

    def create() -> None:
        try:
            asyncio.run(identities.create_streams(url, auth_dir, replicas, wait=True))
        except Exception:
            logger.exception("could not create the streams")

    threading.Thread(target=create, name="create-streams", daemon=True).start()


async def streams_cmd(nats_url: str, replicas: int | None) -> int:
    """Print each stream's replicas and where its leader is; with `replicas`, change them first."""
    nc = await client.connect(nats_url, name="exojet-cli")
    try:
        js = nc.jetstream()
        # Through a leader election JetStream answers "temporarily unavailable": asked again, bounded.
        async with asyncio.timeout(client.ELECTION_S):
            if replicas is not None:
                changed = await client.until_done(
                    lambda: stream_setup.set_replicas(js, replicas), "change the replicas"
                )
                print(f"moved {', '.join(changed)} to {replicas} replica(s)" if changed else "nothing to change")
            for name in streams.STREAM_NAMES:
                print(_describe(name, await client.until_done(partial(js.stream_info, name), "read the streams")))
    except NotFoundError:
        print("error: the streams are not created yet (a supervisor or runner creates them)", file=sys.stderr)
        return 1
    except TimeoutError:
        print(
            f"error: JetStream did not answer within {client.ELECTION_S:g} s (has the cluster a quorum?)",
            file=sys.stderr,
        )
        return 1
    finally:
        await client.close(nc)
    return 0


def _describe(name: str, info: api.StreamInfo) -> str:
    cluster = info.cluster
    line = f"{name}: {info.config.num_replicas} replica(s), leader {(cluster.leader if cluster else None) or '-'}"
    followers = (
        [f"{r.name}{'' if r.current else ' (catching up)'}" for r in (cluster.replicas or [])] if cluster else []
    )
    return line + (f", followers {', '.join(followers)}" if followers else "")
