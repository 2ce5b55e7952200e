"""`exojet nats` (the embedded nats-server, alone or as a cluster node) and `exojet streams` (replicas)."""

from __future__ import annotations

import argparse
import asyncio
import signal
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
from exojet.bus.ops import full_store
from exojet.bus.ops.server import (
    DEFAULT_CLUSTER_NAME,
    DEFAULT_HOST,
    DEFAULT_MONITOR_PORT,
    DEFAULT_PORT,
    ClusterConfig,
    NatsServer,
    ServerError,
)
from exojet.cli.options import Subparsers, add_nats, add_replicas


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("nats", help="run the embedded nats-server (repo's nats.conf), alone or as a cluster node")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="client port (default %(default)s; 0: any free one)")
    p.add_argument("--listen", default=None, metavar="HOST:PORT", help="client address (sets --host and --port)")
    p.add_argument(
        "--monitor-port",
        type=int,
        default=DEFAULT_MONITOR_PORT,
        help="HTTP monitoring port (default %(default)s; 0: any free one)",
    )
    p.add_argument("--name", default=None, help="this node's name, unique in its cluster (default: the host's name)")
    p.add_argument("--cluster", default=None, metavar="URL", help="where this node's routes listen: nats://HOST:PORT")
    p.add_argument("--cluster_name", default=DEFAULT_CLUSTER_NAME, help="the cluster's name (default %(default)s)")
    p.add_argument(
        "--routes",
        default="",
        metavar="URL,URL",
        help="every node's --cluster URL, comma-separated (its own may be listed)",
    )
    add_replicas(p)
    p.add_argument("--store-dir", type=Path, default=None, help="JetStream store (default ~/.local/share/exo/nats)")
    p.add_argument(
        "--auth",
        type=Path,
        default=None,
        help="auth dir of `exojet auth init`: users by nkey with least privilege, TLS when it holds certificates",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (default %(default)s; beyond loopback only with --auth)",
    )
    p.set_defaults(func=run_nats)


def add_streams_parser(sub: Subparsers) -> None:
    p = sub.add_parser("streams", help="the streams' replicas: show them, or change them with --replicas")
    p.add_argument("--replicas", type=int, choices=range(1, 6), default=None, help="move every stream to N replicas")
    add_nats(p)
    p.set_defaults(func=run_streams)


def run_nats(args: argparse.Namespace) -> int:
    """Run nats-server until Ctrl-C or SIGTERM (with `--auth` alone, its streams created as admin)."""
    server: NatsServer | None = None
    try:
        host, port = listen_address(args.listen, args.host, args.port)
        cluster = cluster_config(args.name, args.cluster, args.cluster_name, args.routes)
        server = NatsServer(
            port=port,
            monitor_port=args.monitor_port,
            store_dir=args.store_dir,
            host=host,
            auth_dir=args.auth,
            cluster=cluster,
        ).start()
        if args.auth and cluster is None:
            from exojet.bus.ops import identities

            asyncio.run(identities.create_streams(server.url, args.auth, args.replicas))
        elif args.auth:
            # A cluster's JetStream answers once enough nodes are up: create them meanwhile.
            create_streams_later(server.url, args.auth, args.replicas)
    except (ServerError, client.NatsRefused, client.NatsUnreachable, ValueError) as err:
        if server is not None:
            server.stop()
        print(f"error: {err}", file=sys.stderr)
        return 1
    secured = f", auth from {args.auth}" if args.auth else ""
    node = f", node {cluster.name} of cluster {cluster.cluster_name} (routes on {cluster.listen})" if cluster else ""
    print(f"nats-server on {host}:{server.port} (store {server.store_dir}{secured}{node}); Ctrl-C stops it", flush=True)
    # SIGTERM too must stop the server, or it outlives this process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return full_store.serve(server)
    except KeyboardInterrupt:
        return 0
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        server.stop()


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


def run_streams(args: argparse.Namespace) -> int:
    return asyncio.run(streams_cmd(args.nats, args.replicas))


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
