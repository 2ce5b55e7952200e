"""A runner in a pipeline group (RunnerConnected): what it refuses, and DownloadModel returning to Connected."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from exojet.bus.events import RunnerStatusUpdated, TaskStatusUpdated
from exojet.bus.ops.server import NatsServer, free_port
from exojet.bus.statuses import TaskStatus, status_name
from testbed.log_watcher import LogWatcher
from tests.procs import stop
from tests.runner_harness import (
    DOWNLOAD,
    assert_refused_everywhere_else,
    run_task,
    send,
    start_runner,
)

pytestmark = pytest.mark.timeout(90)


async def test_connected_runner_refuses_other_tasks_and_downloads_back_to_connected(
    nats_server: NatsServer,
    nc: NATS,
    watcher: LogWatcher,
    models_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    ranks = ("g0", "g1")
    for runner_id in ranks:
        handle = await start_runner(nats_server.url, models_dir, watcher, tmp_path, runner_id)
        request.addfinalizer(lambda proc=handle.proc: stop(proc))
    hosts = [f"127.0.0.1:{free_port()}" for _ in ranks]
    for rank, runner_id in enumerate(ranks):
        await send(
            nc,
            runner_id,
            {
                "type": "ConnectToGroup",
                "task_id": f"join-{runner_id}",
                "group": {"group_id": "g", "world_size": 2, "rank": rank, "hosts": hosts},
            },
        )
    for runner_id in ranks:
        joined = await watcher.task_done(f"join-{runner_id}", timeout=60)
        assert joined.task_status == TaskStatus.COMPLETE, joined
        assert status_name(watcher.runner_events(runner_id)[-2].runner_status) == "RunnerConnected"
    await assert_refused_everywhere_else(nc, watcher, "RunnerConnected", "connected", runner_id="g0")
    # Connected -> Downloading -> Connected: the group survives a download.
    before = watcher.entries[-1][0].seq
    done = await run_task(nc, watcher, {**DOWNLOAD, "task_id": "dl-g0"}, runner_id="g0")
    assert done.task_status == TaskStatus.COMPLETE
    statuses = [
        status_name(e.runner_status) for e in watcher.runner_events("g0", before) if isinstance(e, RunnerStatusUpdated)
    ]
    assert statuses == ["RunnerDownloading", "RunnerConnected"]
    assert [e.task_status for e in watcher.runner_events("g0", before) if isinstance(e, TaskStatusUpdated)] == [
        TaskStatus.RUNNING,
        TaskStatus.COMPLETE,
    ]
