"""`exojet runner --id ID`: a runner process.

The process wiring lives here: connect to NATS, install the signal handlers, start
the heartbeat, run the runner (`runner/task_loop.py`) until a Shutdown task, a
signal or the connection's end, and always end the engine child. The runner
registers a new incarnation on its own subject (fenced on the previous write) and
runs its tasks one at a time through the state machine (`runner/state_machine.py`,
written by `runner/transitions.py`). MLX runs in a child process
(`runner/engine.py`), so downloads, loads and generations never stall the heartbeat.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from exojet.bus import client, streams, subjects
from exojet.models.store import default_models_dir
from exojet.runner.deadlines import CHAT_SECONDS_PER_TOKEN, BadDeadline, Deadlines
from exojet.runner.engine_choice import EngineWanted
from exojet.runner.heartbeat import heartbeat
from exojet.runner.registration import TwinRunning, advertised_address
from exojet.runner.task_loop import Runner


async def run_runner(
    runner_id: str, nats_url: str, models_dir: Path, deadlines: Deadlines | None = None, engine: EngineWanted = "auto"
) -> int:
    """Connect, register, serve until Shutdown or a signal; returns the exit code."""
    stop = asyncio.Event()
    lost_connection = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = await client.connect(
        nats_url, name=f"runner-{runner_id}", reconnect_attempts=60, on_closed=lost_connection.set
    )
    runner = Runner(runner_id, nc, models_dir, advertised_address(nats_url), deadlines, engine)
    beat: asyncio.Task[None] | None = None
    try:
        await streams.ensure_streams(runner.js)
        await runner.start()
        beat = asyncio.ensure_future(heartbeat(nc, runner_id, lambda: runner.incarnation))
        serving = asyncio.ensure_future(runner.serve())
        stopped = asyncio.ensure_future(stop.wait())
        gone = asyncio.ensure_future(lost_connection.wait())
        await asyncio.wait({serving, stopped, gone}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stopped, gone):
            waiter.cancel()
        if serving.done():
            return serving.result()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        if lost_connection.is_set():
            runner.log.error("lost the connection to NATS for good; exiting")
            return 1
        runner.log.info("stopping on signal")
        await runner.shutdown(None)
        return 0
    except TwinRunning as err:
        print(f"error: {err}", file=sys.stderr)
        runner.log.error(str(err))
        return 1
    finally:
        if beat is not None:
            beat.cancel()
        await runner.executor.engine.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if not nc.is_closed:
            await nc.close()


def main(
    runner_id: str,
    nats_url: str,
    models_dir: Path | None,
    deadlines: list[str] | None = None,
    chat_seconds_per_token: float = CHAT_SECONDS_PER_TOKEN,
    engine: EngineWanted = "auto",
) -> int:
    """Entry point of `exojet runner`."""
    if problem := subjects.id_problem(runner_id):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        limits = Deadlines.parse(deadlines or [], chat_seconds_per_token)
    except BadDeadline as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return asyncio.run(run_runner(runner_id, nats_url, models_dir or default_models_dir(), limits, engine))
