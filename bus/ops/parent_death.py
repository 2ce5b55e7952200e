"""Children that never outlive the process that started them.

On Linux a child can ask the kernel for a signal when its parent dies
(`prctl(PR_SET_PDEATHSIG)`): however the parent goes (SIGKILL included), the
child follows within moments instead of holding a port or a model for hours.
`preexec(sig)` is a `preexec_fn` for subprocess that asks for it between fork
and exec (it survives the exec), and exits at once if the parent is already
gone by then. Elsewhere it is None and children are stopped by their parent's
own cleanup only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def preexec(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A subprocess `preexec_fn` delivering `sig` to the child when this process dies (None off Linux).

    The signal is tied to the thread that forks: spawn from a thread that lives
    as long as the process (the main thread, an event loop's thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    # Resolved here, before the fork: the child should do as little as possible.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return set_parent_death_signal
