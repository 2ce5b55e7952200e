"""An auth directory: one nkey seed file per identity (mode 0600) and the server include `auth.conf`.

The seeds are the only secrets; nothing here logs or prints one. `auth.conf` holds
public keys and permissions only, and is rebuilt from the seed files each time, so
it always matches them.
"""

from __future__ import annotations

import os
import secrets
import signal
from pathlib import Path

import nkeys
import psutil

from exojet.bus import subjects
from exojet.bus.nats import client, stream_setup
from exojet.bus.nats.connect_options import ConnectOptions
from exojet.bus.ops import certs
from exojet.bus.ops.permissions import ADMIN, FIXED_IDENTITIES, render_auth_conf, runner_identity

AUTH_CONF = "auth.conf"
SEED_SUFFIX = ".nk"
# The server started by `exojet nats --auth DIR` writes its pid here, so add-runner can reload it.
PID_FILE = "nats-server.pid"
ROUTE_SECRET = "route.secret"


class AuthDirError(ValueError):
    """The auth directory or an identity in it is not usable."""


def seed_path(directory: Path, identity: str) -> Path:
    return directory / f"{identity}{SEED_SUFFIX}"


def _new_seed() -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def _write_seed(path: Path) -> bool:
    """Create a fresh seed file, readable by its owner only; False if it already exists (never rotated silently)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(_new_seed() + b"\n")
    return True


def public_keys(directory: Path) -> dict[str, str]:
    """{identity: public nkey} of every seed file in `directory`."""
    users = {}
    for path in sorted(directory.glob(f"*{SEED_SUFFIX}")):
        if path.stat().st_mode & 0o077:
            raise AuthDirError(f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o}): chmod 600 it")
        try:
            keypair = nkeys.from_seed(bytearray(path.read_bytes().strip()))
        except nkeys.NkeysError:
            raise AuthDirError(f"{path} holds no valid nkey seed") from None
        users[path.name[: -len(SEED_SUFFIX)]] = keypair.public_key.decode()
    return users


def write_auth_conf(directory: Path) -> Path:
    """Rebuild `auth.conf` from the seed files."""
    conf = directory / AUTH_CONF
    conf.write_text(render_auth_conf(public_keys(directory)))
    return conf


def route_secret(directory: Path) -> str:
    """The secret a cluster's routes log in with (`ROUTE_SECRET`, 0600), made once, by `init`
    for a new dir (so every node the dir is copied to has the same one)."""
    path = directory / ROUTE_SECRET
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text().strip()


def init(directory: Path, runner_ids: list[str]) -> list[Path]:
    """Seeds for admin, supervisor, client and each runner (existing ones kept), then auth.conf; the files written."""
    for rid in runner_ids:
        if problem := subjects.id_problem(rid):
            raise AuthDirError(problem)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    identities = [*FIXED_IDENTITIES, *(runner_identity(rid) for rid in runner_ids)]
    written = [seed_path(directory, i) for i in identities if _write_seed(seed_path(directory, i))]
    route_secret(directory)
    return [*written, write_auth_conf(directory)]


def add_runner(directory: Path, runner_id: str) -> Path:
    """A seed for `runner-<id>` and the rebuilt auth.conf; the seed file. Raises AuthDirError if it exists."""
    if problem := subjects.id_problem(runner_id):
        raise AuthDirError(problem)
    if not (directory / AUTH_CONF).exists():
        raise AuthDirError(f"{directory} is no auth directory (run `exojet auth init {directory}` first)")
    path = seed_path(directory, runner_identity(runner_id))
    if not _write_seed(path):
        raise AuthDirError(f"{path} exists already: runner {runner_id} has an identity")
    write_auth_conf(directory)
    return path


def options_for(directory: Path, identity: str) -> ConnectOptions:
    """How `identity` connects: its seed file, and the directory's CA when it has one."""
    ca = directory / certs.CA_FILE
    return ConnectOptions(nkey=seed_path(directory, identity), tlsca=ca if ca.exists() else None)


def reload_server(directory: Path) -> int | None:
    """SIGHUP the server `exojet nats --auth DIR` runs from `directory` (it re-reads auth.conf); its pid, or None."""
    try:
        pid = int((directory / PID_FILE).read_text().strip())
        # A stale pid file must not send SIGHUP to whatever process has that pid now.
        if "nats-server" not in psutil.Process(pid).name():
            return None
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, psutil.Error):
        return None
    return pid


async def create_streams(url: str, directory: Path, replicas: int | None = None, wait: bool = False) -> None:
    """Create or update the streams and the KV bucket as `admin`, the only identity that may
    (`replicas` if it creates them; `wait`: until the server and its JetStream answer)."""
    nc = await client.connect(url, name="exojet-admin", options=options_for(directory, ADMIN), wait=wait)
    try:
        await client.until_done(lambda: stream_setup.ensure_streams(nc.jetstream(), replicas), "create the streams")
    finally:
        await nc.close()
