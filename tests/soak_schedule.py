"""The soak's faults (tests/test_soak.py): a schedule that is a pure function of its seed.

`schedule(seed)` is the same list of faults on every machine and every run, so a failing seed is
replayed with `--soak-seed N`; how many of them a run injects depends on its length and on how
long the cluster takes to recover from each. What a target is resolved to at run time (the
`EXO_LOG` leader's node, the engine child's pid) is not part of the schedule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from testbed.hosts_harness import NODES, RUNNERS, SUPERVISORS

# Processes a fault may hit, by name: the nodes' nats-servers, the supervisors, the runners, a
# runner's engine child (`engine-rN`) and the API; hosts are named as their process is.
ENGINES = tuple(f"engine-{r}" for r in RUNNERS)
API = "api"
PROCESSES = (*NODES, *SUPERVISORS, *RUNNERS, *ENGINES, API)
HOSTS = (*NODES, *SUPERVISORS, *RUNNERS, API)

# The kinds, each as likely as the others: SIGKILL (and a restart) of a process, SIGSTOP (and
# SIGCONT) of one, a host's cable pulled (and put back), the EXO_LOG leader's server killed, a
# node's store filled (and emptied).
KILL = "kill"
STOP = "stop"
CUT = "cut"
LEADER = "leader"
STORE = "store"
KINDS = (KILL, STOP, CUT, LEADER, STORE)

# Quiet time between a recovery and the next fault: "every few seconds".
GAP_S = (2.0, 6.0)
CUT_S = (3.0, 20.0)
STORE_FULL_S = (3.0, 15.0)
# More than a run of hours can inject (each fault and its recovery take 10 s or more).
LENGTH = 2000


@dataclass(frozen=True)
class Fault:
    """The n-th fault: `kind` on `target` after `gap_s` of quiet, lasting `hold_s` (0: a kill)."""

    n: int
    gap_s: float
    kind: str
    target: str
    hold_s: float

    def __str__(self) -> str:
        held = f" for {self.hold_s:.1f} s" if self.hold_s else ""
        return f"#{self.n} {self.kind} {self.target}{held} (after {self.gap_s:.1f} s)"


def _fault(rng: random.Random, n: int, heartbeat_timeout_s: float) -> Fault:
    gap = round(rng.uniform(*GAP_S), 1)
    kind = rng.choice(KINDS)
    if kind == KILL:
        return Fault(n, gap, kind, rng.choice(PROCESSES), 0.0)
    if kind == STOP:
        # Up to twice the heartbeat timeout: long enough to be declared lost, or just short of it.
        return Fault(n, gap, kind, rng.choice(PROCESSES), round(rng.uniform(0.5, 2 * heartbeat_timeout_s), 1))
    if kind == CUT:
        return Fault(n, gap, kind, rng.choice(HOSTS), round(rng.uniform(*CUT_S), 1))
    if kind == LEADER:
        return Fault(n, gap, kind, "EXO_LOG leader", 0.0)
    return Fault(n, gap, kind, rng.choice(NODES), round(rng.uniform(*STORE_FULL_S), 1))


def schedule(seed: int, heartbeat_timeout_s: float) -> list[Fault]:
    """The faults of seed `seed`, in order (a pure function of its arguments)."""
    rng = random.Random(seed)
    return [_fault(rng, n, heartbeat_timeout_s) for n in range(1, LENGTH + 1)]


def describe(seed: int, faults: list[Fault]) -> str:
    """What a failure prints: the seed to replay and the faults injected so far."""
    lines = [f"soak seed {seed} (replay: pytest -m soak --soak-seed {seed}); faults injected:"]
    return "\n".join([*lines, *(f"  {f}" for f in faults)])
