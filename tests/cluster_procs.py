"""Runner and supervisor processes of one test, and the steps orchestration tests share:
wait for runners to be Idle or an instance to reach a status, place an instance."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nats.aio.client import Client as NATS

from exojet.bus import subjects
from exojet.bus.commands import PlaceInstance
from exojet.bus.ids import instance_id_of
from exojet.bus.nats import client
from testbed.log_watcher import LogWatch, Predicate
from tests.procs import exojet, group_ports, start_runner, stop


class Procs:
    """Runner and supervisor processes of one test, stopped at its end."""

    def __init__(self, url: str, models_dir: Path, logs: Path, heartbeat_timeout: float = 5.0) -> None:
        self.url, self.models_dir, self.logs = url, models_dir, logs
        self.heartbeat_timeout = heartbeat_timeout
        self.group_ports = group_ports()
        self.runners: dict[str, subprocess.Popen[bytes]] = {}
        self.supervisors: list[subprocess.Popen[bytes]] = []

    def runner(self, runner_id: str) -> subprocess.Popen[bytes]:
        proc = start_runner(runner_id, self.url, self.models_dir, self.logs)
        self.runners[runner_id] = proc
        return proc

    def supervisor(self) -> subprocess.Popen[bytes]:
        n = len(self.supervisors)
        proc = exojet(
            "supervisor",
            "--nats",
            self.url,
            "--id",
            f"s{n}",
            "--heartbeat-timeout",
            str(self.heartbeat_timeout),
            "--group-ports",
            self.group_ports,
            log=self.logs / f"s{n}.log",
        )
        self.supervisors.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in [*self.supervisors, *self.runners.values()]:
            stop(proc)


def runners_idle(*runner_ids: str) -> Predicate:
    return lambda s: all(s.runners.get(r) is not None and s.runners[r].status == "RunnerIdle" for r in runner_ids)


def instance_in(instance_id: str, *statuses: str) -> Predicate:
    return lambda s: instance_id in s.instances and s.instances[instance_id].status in statuses


async def place_instance(nc: NATS, **fields: object) -> str:
    ack = await client.publish(nc.jetstream(), subjects.COMMANDS, PlaceInstance(**fields))
    return instance_id_of(None, ack.seq)


async def ready_pipeline_instance(procs: Procs, watch: LogWatch, nc: NATS) -> str:
    """Runners r1 and r2 and a supervisor; the tiny model placed over both, Ready."""
    for r in ("r1", "r2"):
        procs.runner(r)
    procs.supervisor()
    await watch.until(runners_idle("r1", "r2"), 60, "r1, r2 Idle")
    instance_id = await place_instance(nc, model_id="local/tiny", min_runners=2)
    await watch.until(instance_in(instance_id, "Ready", "Failed"), 90, f"{instance_id} Ready")
    assert watch.state.instances[instance_id].status == "Ready", watch.state.instances[instance_id].reason
    return instance_id
