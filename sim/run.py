"""One seed, start to end: draw the cluster, the workload and the faults; run with faults on;
heal everything; run until the cluster settles; check the invariants.

`run(seed)` is deterministic: the same seed gives the same steps, the same log
and the same verdict, on any machine (no wall clock, no threads, no asyncio).
"""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass

from exojet.bus import subjects
from exojet.bus.codec import encode
from exojet.bus.commands import (
    Command,
    DeleteInstance,
    DrainRunner,
    PlaceInstance,
    RouteChatCompletion,
    UndrainRunner,
)
from exojet.bus.ids import instance_id_of
from exojet.bus.tasks import ChatMessage
from exojet.projections.instances import DELETED, FAILED, READY
from exojet.projections.state import state_hash
from exojet.sim import invariants
from exojet.sim.kernel import Actor, NextTask, Publish, Sleep
from exojet.sim.runner import N_LAYERS, Body, SimRunner
from exojet.sim.supervisor import SimSupervisor
from exojet.sim.world import Faults, Violation, World
from exojet.supervisor.actions import PlannerConfig, SendTask
from exojet.supervisor.planner import plan

# Sim seconds with faults on, then at most this long for the healed cluster to settle.
FAULT_TIME_S = 40.0
SETTLE_TIME_S = 400.0
# A run that takes more steps than this without settling is stuck.
MAX_STEPS = 200_000
WIDE = 0.1
# The share of seeds that drain a runner (and undrain it before the faults stop).
DRAINS = 0.25


@dataclass
class Result:
    seed: int
    problems: list[str]
    steps: int
    sim_time: float
    log_length: int
    world: World

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self, trace_lines: int | None = 60) -> str:
        """The verdict, the tail of the trace (all of it with None) and how to replay."""
        head = f"seed {self.seed}: {self.steps} steps, {self.sim_time:.1f} sim s, {self.log_length} messages"
        if self.ok:
            return f"{head}: ok"
        shown = "the whole trace" if trace_lines is None else f"the last {trace_lines} steps"
        return "\n".join(
            [
                f"{head}: FAILED",
                *(f"  - {p}" for p in self.problems),
                f"{shown}:",
                self.world.trace.render(trace_lines),
                f"replay: python -m exojet.sim --seed {self.seed} --trace",
            ]
        )


class Client(Actor):
    """Publishes the workload's commands at their times, each retried until stored (like the API)."""

    def __init__(self, world: World, commands: list[tuple[float, Command]]) -> None:
        super().__init__("client")
        self.world = world
        self.commands = commands
        self.done = False

    def body(self) -> Body:
        for at, command in self.commands:
            yield Sleep(max(0.0, at - self.world.now))
            publish = Publish(subjects.COMMANDS, encode(command), command.command_id, None, type(command).__name__)
            yield from self.world.until_done(publish)
        self.done = True


class Simulation:
    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.seed = seed
        self.world = world = World(rng, Faults.draw(rng))
        # Most clusters are small (2-4 runners, 1-2 instances); one in ten is busier.
        wide = rng.random() < WIDE
        self.runners = [
            SimRunner(world, f"r{i}", rng.choice((8, 16, 32)) * 2**30, rng.uniform(0.75, 1.0))
            for i in range(1, (rng.randint(3, 6) if wide else rng.randint(2, 4)) + 1)
        ]
        self.catalog = {}
        self.config = PlannerConfig()
        commands: list[tuple[float, Command]] = []
        free = len(self.runners)
        models = []
        sizes: dict[str, int] = {}
        for i in range(rng.randint(2, 4) if wide else rng.randint(1, 2)):
            if free == 0:
                break
            size = 2 if free >= 2 and rng.random() < 0.4 else 1
            free -= size
            model = f"org/model-{i}"
            models.append(model)
            sizes[model] = size
            n_layers = None
            if size > 1 and rng.random() < 0.5:
                n_layers = N_LAYERS
            else:
                self.catalog[model] = N_LAYERS
            place = PlaceInstance(command_id=f"place{i}", model_id=model, min_runners=size, n_layers=n_layers)
            placed_at = rng.uniform(0, 10)
            commands.append((placed_at, place))
            if rng.random() < (0.4 if wide else 0.15):
                delete = DeleteInstance(command_id=f"delete{i}", instance_id=instance_id_of(place.command_id, 0))
                commands.append((rng.uniform(placed_at, FAULT_TIME_S), delete))
        for j in range(rng.randint(2, 8) if wide else rng.randint(0, 4)):
            chat = RouteChatCompletion(
                command_id=f"chat{j}", messages=(ChatMessage("user", "hi"),), model_id=rng.choice(models)
            )
            commands.append((rng.uniform(0, FAULT_TIME_S), chat))
        commands += self._later_workload(seed, [m for m, size in sizes.items() if size > 1])
        commands.sort(key=lambda c: c[0])
        self.supervisors = [
            SimSupervisor(world, f"s{i}", self.config, self.catalog) for i in range(1, rng.randint(2, 3) + 1)
        ]
        self.client = Client(world, commands)
        self.processes: list[SimRunner | SimSupervisor] = [*self.runners, *self.supervisors]

    def _later_workload(self, seed: int, groups: list[str]) -> list[tuple[float, Command]]:
        """What was added to the workload later: groups split from the layer counts their downloads
        report (no count in the command or the catalog), and a runner drained, then undrained. Drawn
        from a second generator derived from the seed, so that a seed without them runs exactly as it
        did before they were added (the regression seeds stay what they were)."""
        later = random.Random(f"exojet-sim-later-{seed}")
        for model in groups:
            if model in self.catalog and later.random() < 0.3:
                del self.catalog[model]
        if later.random() >= DRAINS:
            return []
        runner_id = later.choice(self.runners).runner_id
        drained_at = later.uniform(5.0, FAULT_TIME_S - 10.0)
        return [
            (drained_at, DrainRunner(command_id=f"drain-{runner_id}", runner_id=runner_id)),
            (
                later.uniform(drained_at, FAULT_TIME_S),
                UndrainRunner(command_id=f"undrain-{runner_id}", runner_id=runner_id),
            ),
        ]

    def run(self) -> Result:
        world = self.world
        problems: list[str] = []
        try:
            for process in self.processes:
                process.start()
            world.spawn(self.client, "commands", self.client.body())
            world.clock.after(1.0, self._heartbeats)
            while world.now < FAULT_TIME_S and world.steps < MAX_STEPS:
                world.step()
                self._maybe_fault()
            self._heal()
            # Checked once per sim second: settling is slow next to a step.
            next_check = world.now
            settled = False
            while world.steps < MAX_STEPS and world.now <= FAULT_TIME_S + SETTLE_TIME_S:
                if world.now >= next_check:
                    if settled := self._settled():
                        break
                    next_check = world.now + 1.0
                world.step()
            if not settled:
                problems.append(f"the cluster did not settle by {world.now:.1f} sim s: {self._unsettled()}")
            else:
                problems += invariants.at_end(world.truth, [(s.name, s.state) for s in self.supervisors])
        except Violation as err:
            problems.append(str(err))
        except Exception as err:  # noqa: BLE001 - real code that raises is a finding too, with its seed
            world.say("world", "".join(traceback.format_exception(err)).rstrip())
            problems.append(f"raised {err!r} (the trace ends with its traceback)")
        return Result(self.seed, problems, world.steps, world.now, world.stream.last_seq, world)

    # Faults -------------------------------------------------------------------------

    def _heartbeats(self) -> None:
        world = self.world
        self._compare_supervisors()
        for runner in self.runners:
            if not runner.alive or not runner.beating or world.paused(runner) or world.cut(runner):
                continue
            for sup in self.supervisors:
                if sup.alive and not world.paused(sup) and not world.cut(sup):
                    if not world.chance(world.faults.lose_heartbeat):
                        sup.heard(runner.runner_id)
        world.clock.after(1.0, self._heartbeats)

    def _compare_supervisors(self) -> None:
        """Two supervisors that folded the same log agree, whatever their restarts and snapshots."""
        by_seq: dict[int, str] = {}
        for sup in self.supervisors:
            if not sup.alive or sup.state.seq == 0:
                continue
            digest = state_hash(sup.state)
            if by_seq.setdefault(sup.state.seq, digest) != digest:
                raise Violation(f"supervisor {sup.name} disagrees with another at seq {sup.state.seq}")

    def _maybe_fault(self) -> None:
        world, rng, faults = self.world, self.world.rng, self.world.faults
        if world.chance(faults.crash):
            victim = rng.choice(self.processes)
            if victim.alive:
                world.say(victim.name, "CRASH", "crash")
                world.kill(victim)
                world.clock.after(rng.uniform(0.5, 15.0), lambda: self._restart(victim))
        if world.chance(faults.freeze):
            victim = rng.choice(self.processes)
            victim.paused_until = max(victim.paused_until, world.now + rng.uniform(1.0, 12.0))
            world.say(victim.name, f"FROZEN until {victim.paused_until:.3f}", "freeze")
        if world.chance(faults.cut):
            victim = rng.choice(self.processes)
            victim.cut_until = max(victim.cut_until, world.now + rng.uniform(1.0, 12.0))
            world.say(victim.name, f"CUT OFF from NATS until {victim.cut_until:.3f}", "cut off")
            if isinstance(victim, SimSupervisor):
                world.clock.at(victim.cut_until, lambda: self._reconnected(victim))

    def _restart(self, process: SimRunner | SimSupervisor) -> None:
        if not process.alive:
            process.start()

    def _reconnected(self, sup: SimSupervisor) -> None:
        if sup.alive and not self.world.cut(sup):
            sup.reconnected()

    def _heal(self) -> None:
        """No more faults: every process is back, thawed and connected."""
        world = self.world
        world.faulty = False
        world.say("world", "faults off: every process restarted, thawed and reconnected")
        for process in self.processes:
            process.paused_until = min(process.paused_until, world.now)
            if world.cut(process):
                process.cut_until = world.now
                if isinstance(process, SimSupervisor):
                    self._reconnected(process)
            self._restart(process)

    # Settling -------------------------------------------------------------------------

    def _settled(self) -> bool:
        return not self._unsettled()

    def _unsettled(self) -> str:
        """What still moves (empty: the cluster has settled)."""
        world = self.world
        if not self.client.done:
            return "commands not all published"
        if world.requests or world.replies:
            return f"{len(world.requests)} requests and {len(world.replies)} replies on the wire"
        for sup in self.supervisors:
            if not sup.caught_up or sup.state.seq < world.stream.last_seq:
                return f"supervisor {sup.name} at seq {sup.state.seq} of {world.stream.last_seq}"
        for runner in self.runners:
            fiber = runner.fibers[0] if runner.fibers else None
            if fiber is None or not isinstance(fiber.waiting, NextTask) or not runner.consumer.idle:
                return f"runner {runner.runner_id} is busy ({runner.status})"
            if runner.consumer.deliverable(world.now) is not None:
                return f"runner {runner.runner_id} has a task to take"
        truth = world.truth
        for inst in truth.instances.values():
            if inst.status not in (READY, DELETED) and not (inst.status == FAILED and inst.gave_up):
                return f"instance {inst.instance_id} is {inst.status} (attempt {inst.attempt})"
        for action in plan(truth, self.catalog, self.config):
            if not isinstance(action, SendTask) or action.task.task_id not in truth.tasks:
                return f"the planner still wants {type(action).__name__}"
        return ""


def run(seed: int) -> Result:
    """Run one seed (see the module docstring)."""
    return Simulation(seed).run()
