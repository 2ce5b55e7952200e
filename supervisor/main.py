"""`exojet supervisor`: fold the log, answer queries, until told to stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

from loguru import logger

from exojet.bus.nats import client, connection, stream_setup
from exojet.bus.replies import Connections
from exojet.bus.streams import LogLimits
from exojet.bus.views import Retention
from exojet.supervisor.actions import DEFAULT_CONFIG, PlannerConfig
from exojet.supervisor.liveness import DEFAULT_HEARTBEAT_TIMEOUT_S, Liveness
from exojet.supervisor.projector import DEFAULT_SNAPSHOT_EVERY, Projector
from exojet.supervisor.reconciler import Reconciler
from exojet.supervisor.service import start_service

DEFAULT_RETENTION = Retention()


def default_supervisor_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def run_supervisor(
    nats_url: str,
    supervisor_id: str | None = None,
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
    stop: asyncio.Event | None = None,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
    models_dir: Path | None = None,
    planner: PlannerConfig = DEFAULT_CONFIG,
    retention: Retention = DEFAULT_RETENTION,
    log_limits: LogLimits | None = None,
    replicas: int | None = None,
) -> int:
    """Run one supervisor until `stop` is set (or SIGINT/SIGTERM); returns the exit code.

    It folds the log, answers queries, declares silent runners lost
    (`heartbeat_timeout`), and places instances and routes chats (`planner`;
    `models_dir`, if given, overrides the layer counts runners report); finished
    work stays in its projection as long as `retention` says. `log_limits`, when
    given, become `EXO_LOG`'s limits; `replicas`, the streams' if it creates them.
    """
    supervisor_id = supervisor_id or default_supervisor_id()
    log = logger.bind(supervisor_id=supervisor_id)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Waits for a server at start and never gives up on it afterwards.
    nc = await client.connect(nats_url, name=f"supervisor-{supervisor_id}", wait=True)
    try:
        js = nc.jetstream()
        await client.until_done(
            lambda: stream_setup.ensure_streams(js, replicas, log_limits=log_limits), "create the streams"
        )
        projector = Projector(nc, snapshot_every=snapshot_every, max_snapshot_bytes=nc.max_payload, retention=retention)
        await client.until_done(projector.start, "fold the log")
        liveness = Liveness(nc, js, projector, supervisor_id, heartbeat_timeout)

        def connections() -> Connections:
            return Connections(
                supervisors={supervisor_id: connection.watch(nc).summary()}, runners=dict(liveness.connections)
            )

        service = await start_service(nc, projector, supervisor_id, connections)
        await liveness.start()
        reconciler = Reconciler(js, projector, supervisor_id, planner, models_dir)
        reconciler.start()
        log.bind(seq=projector.state.seq).info("supervisor serving queries on exo.supervisor.*, reconciling")
        await stop.wait()
        await reconciler.stop()
        await liveness.stop()
        await service.stop()
        await projector.stop()
        try:
            await projector.snapshot()
        except client.TRANSIENT_ERRORS as err:
            # Only a shortcut for the next start: the log has everything.
            log.warning(f"no snapshot stored on the way out: {err!r}")
        log.bind(seq=projector.state.seq).info("supervisor stopped")
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await client.close(nc)
