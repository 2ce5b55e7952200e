"""A JetStream cluster of real nats-server processes on loopback, for tests and benches."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from exojet.bus.ops.server import ClusterConfig, NatsServer, free_port


class NatsCluster:
    """`size` nodes named n1.., each routed to all; `url` lists every node (exojet's --nats)."""

    def __init__(self, root: Path, size: int = 3, name: str = "exojet") -> None:
        ports = [free_port() for _ in range(size)]
        routes = tuple(f"nats://127.0.0.1:{p}" for p in ports)
        self.servers = [
            NatsServer(
                port=0,
                monitor_port=0,
                store_dir=root / f"n{i + 1}",
                log_file=root / f"n{i + 1}.log",
                cluster=ClusterConfig(name=f"n{i + 1}", listen=routes[i], cluster_name=name, routes=routes),
            )
            for i in range(size)
        ]

    def start(self) -> NatsCluster:
        for server in self.servers:
            server.start()
            # Restarts keep the port clients know.
        return self

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    def node(self, name: str) -> NatsServer:
        return next(s for s in self.servers if s.cluster is not None and s.cluster.name == name)

    def stream_leader(self, stream: str) -> str | None:
        """The name of the node leading `stream` (from a live node's monitoring), or None during an election."""
        for server in self.servers:
            if server.process is None or server.process.poll() is not None:
                continue
            url = f"http://127.0.0.1:{server.monitor_port}/jsz?streams=true"
            with urllib.request.urlopen(url, timeout=2) as resp:
                info = json.load(resp)
            for account in info.get("account_details", []):
                for detail in account.get("stream_detail", []):
                    if detail["name"] == stream:
                        leader: str | None = detail.get("cluster", {}).get("leader")
                        if leader:
                            return leader
        return None

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
