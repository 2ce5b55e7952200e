"""Hosts for tests: Linux network namespaces on one bridge, with links that can be cut.

`Lan(["n1", "r1", ...])` makes a namespace per host and one for the switch (a
bridge), joins each host to it with a veth pair and gives it an address of
`SUBNET`, which exists only inside these namespaces (nothing is added to the
test machine's own network). `host.popen(...)` runs a command on a host,
`host.link_down()` cuts its cable at the switch, `with lan.inside(host):` runs
the calling thread (the test's event loop) on a host. Everything is removed on
exit, failure or not. Needs root and `ip`; `unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

SUBNET = "10.213.0"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"exj-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as err:
        return f"cannot make a network namespace: {err}"
    _ip("netns", "del", probe)
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Host:
    """One host: a namespace with `address`, cabled to the switch through `port`."""

    def __init__(self, lan: Lan, name: str, index: int) -> None:
        self.lan = lan
        self.name = name
        self.ns = f"{lan.tag}-{name}"
        self.address = f"{SUBNET}.{index + 1}"
        self.port = f"p{index}"

    def popen(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """`args` run on this host, output appended to `log`."""
        out = open(log, "ab")
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def link_down(self) -> None:
        """Unplug the cable at the switch: the host's sockets stay open, nothing goes through."""
        _ip("-n", self.lan.switch, "link", "set", self.port, "down")

    def link_up(self) -> None:
        _ip("-n", self.lan.switch, "link", "set", self.port, "up")


class Lan:
    """Hosts on one switch (see the module docstring)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.tag = f"exj{uuid.uuid4().hex[:6]}"
        self.switch = f"{self.tag}-switch"
        self.hosts = {name: Host(self, name, i) for i, name in enumerate(names)}
        self._made: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Lan:
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host in self.hosts.values():
                self._add_ns(host.ns)
                _ip(
                    "-n",
                    self.switch,
                    "link",
                    "add",
                    host.port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    host.ns,
                )
                _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
                _ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.ns, "link", "set", "eth0", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        # Each host's own loopback (a nats-server's monitoring port listens there).
        _ip("-n", ns, "link", "set", "lo", "up")

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Delete every namespace made (the veth pairs go with them)."""
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()

    @contextlib.contextmanager
    def inside(self, host: Host) -> Iterator[None]:
        """Run the calling thread on `host` (sockets it opens meanwhile stay there), then back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{host.ns}", os.O_RDONLY)
        try:
            _setns(there)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(there)
            os.close(home)
