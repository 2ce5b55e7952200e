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

from exojet.bus import subjects
from exojet.bus.nats import client, stream_setup
from exojet.models.store import default_models_dir
from exojet.runner.deadlines import CHAT_GRACE_S, CHAT_SECONDS_PER_TOKEN, BadDeadline, Deadlines
from exojet.runner.engine_choice import EngineWanted
from exojet.runner.heartbeat import heartbeat
from exojet.runner.registration import advertised_address
from exojet.runner.task_loop import Runner
from exojet.runner.write_chain import TwinRunning

# On a stop signal, how long the runner's last writes (Cancelled, Shutdown) may wait for NATS.
LAST_WORDS_S = 10.0


async def run_runner(
    runner_id: str,
    nats_url: str,
    models_dir: Path,
    deadlines: Deadlines | None = None,
    engine: EngineWanted = "auto",
    chat_grace_s: float = CHAT_GRACE_S,
) -> int:
    """Connect, register, serve until Shutdown or a signal; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Waits for a server at start and never gives up on it afterwards.
    nc = await client.connect(nats_url, name=f"runner-{runner_id}", wait=True)
    runner = Runner(runner_id, nc, models_dir, advertised_address(nats_url), deadlines, engine, chat_grace_s)
    beat: asyncio.Task[None] | None = None
    try:
        await client.until_done(lambda: stream_setup.ensure_streams(runner.js), "create the streams")
        await runner.start()
        beat = asyncio.ensure_future(heartbeat(nc, runner_id, lambda: runner.incarnation))
        serving = asyncio.ensure_future(runner.serve())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if serving.done():
            return serving.result()
        runner.log.info("stopping on signal")
        try:
            # Writes wait for NATS as long as it takes, except these last ones: a
            # service manager's stop must not hang on a server that is gone.
            async with asyncio.timeout(LAST_WORDS_S):
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
                await runner.shutdown(None)
        except TimeoutError:
            runner.log.warning(f"NATS did not store this runner's last words within {LAST_WORDS_S:g} s; exiting")
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
        await client.close(nc)


def main(
    runner_id: str,
    nats_url: str,
    models_dir: Path | None,
    deadlines: list[str] | None = None,
    chat_seconds_per_token: float = CHAT_SECONDS_PER_TOKEN,
    engine: EngineWanted = "auto",
    chat_grace_s: float = CHAT_GRACE_S,
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
    return asyncio.run(
        run_runner(runner_id, nats_url, models_dir or default_models_dir(), limits, engine, chat_grace_s)
    )
