"""The least-privilege contract (docs/security.md) against a real nats-server with nkey auth and TLS.

Each refusal is observed as the server's permissions violation naming the subject,
and the log is checked (as admin) to hold nothing new.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2 as httpx
import msgspec
import nats
import nkeys
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from exojet.bus import subjects
from exojet.bus.codec import encode
from exojet.bus.commands import PlaceInstance
from exojet.bus.events import RunnerLost, RunnerStatusUpdated
from exojet.bus.ids import instance_id_of
from exojet.bus.nats import client, connect_options
from exojet.bus.nats.chat_client import route_chat
from exojet.bus.nats.connect_options import ConnectOptions
from exojet.bus.nats.query_client import first_answer
from exojet.bus.ops import certs, identities
from exojet.bus.ops.server import NatsServer, ServerError, free_port
from exojet.bus.statuses import RunnerIdle
from exojet.bus.streams import CHUNKS_STREAM, LOG_STREAM
from exojet.bus.tasks import ChatMessage
from exojet.projections.state import state_hash
from testbed.api_process import until_healthy_async
from testbed.log_watcher import LogWatch
from tests.procs import exojet, group_ports, stop

RUNNERS = ["r1", "r2"]


@pytest.fixture(scope="module")
def auth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("auth") / "auth"
    identities.init(d, RUNNERS)
    certs.write_ca_and_server_cert(d, ["exojet.test"])
    return d


@pytest.fixture(scope="module")
def secured(auth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One server with auth and TLS for the module, its streams created by admin."""
    logs = tmp_path_factory.mktemp("nats")
    server = NatsServer(
        port=0, monitor_port=0, store_dir=logs / "store", log_file=logs / "nats.log", auth_dir=auth_dir
    ).start()
    try:
        asyncio.run(identities.create_streams(server.url, auth_dir))
        yield server
    finally:
        server.stop()


class Violations:
    """A connection's asynchronous errors: the server's permission refusals land here."""

    def __init__(self) -> None:
        self.errors: asyncio.Queue[str] = asyncio.Queue()

    async def on_error(self, err: Exception) -> None:
        self.errors.put_nowait(str(err))

    async def expect(self, subject: str, timeout: float = 5.0) -> str:
        """The permissions violation naming `subject` (other errors before it are skipped)."""
        seen = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    error = await self.errors.get()
                    if "permissions violation" in error.lower() and f'"{subject.lower()}"' in error.lower():
                        return error
                    seen.append(error)
        except TimeoutError:
            raise AssertionError(f"no permissions violation for {subject} within {timeout} s; saw {seen}") from None


async def _connect(server: NatsServer, auth_dir: Path, identity: str) -> tuple[NATS, Violations]:
    violations = Violations()
    options = identities.options_for(auth_dir, identity)
    nc = await nats.connect(
        server.url, error_cb=violations.on_error, max_reconnect_attempts=0, connect_timeout=5, **options.nats_kwargs()
    )
    return nc, violations


@pytest.fixture
async def admin(secured: NatsServer, auth_dir: Path) -> AsyncIterator[NATS]:
    nc, _ = await _connect(secured, auth_dir, "admin")
    yield nc
    await nc.close()


@pytest.fixture
async def r1(secured: NatsServer, auth_dir: Path) -> AsyncIterator[tuple[NATS, Violations]]:
    nc, violations = await _connect(secured, auth_dir, "runner-r1")
    yield nc, violations
    await nc.close()


async def _stored(admin: NATS) -> tuple[int, int]:
    js = admin.jetstream()
    return (await js.stream_info(LOG_STREAM)).state.last_seq, (await js.stream_info(CHUNKS_STREAM)).state.last_seq


def _lost(runner_id: str) -> RunnerLost:
    return RunnerLost(event_id="x", runner_id=runner_id, incarnation=1, at=0.0, supervisor_id="evil", reason="forged")


FORBIDDEN_FOR_R1 = {
    "a task for itself": (subjects.task_subject("r1"), {"type": "StartWarmup"}),
    "a task for r2": (subjects.task_subject("r2"), {"type": "Shutdown"}),
    "an event of r2": (
        subjects.runner_events_subject("r2"),
        RunnerStatusUpdated(event_id="x", runner_id="r2", incarnation=1, at=0.0, runner_status=RunnerIdle()),
    ),
    "a RunnerLost of r2": (subjects.runner_events_subject("r2"), _lost("r2")),
    "a supervisor event": (subjects.SUPERVISOR_EVENTS, {"type": "InstancePlaced"}),
    "a command": (subjects.COMMANDS, PlaceInstance(model_id="local/tiny")),
    "chunks of r2's task": (subjects.chunks_subject("r2", "t"), {"index": 0, "text": "forged"}),
}


@pytest.mark.parametrize("what", FORBIDDEN_FOR_R1)
async def test_runner_key_cannot_publish_outside_its_own_subjects(
    what: str, admin: NATS, r1: tuple[NATS, Violations]
) -> None:
    nc, violations = r1
    subject, message = FORBIDDEN_FOR_R1[what]
    before = await _stored(admin)
    await nc.publish(subject, encode(message) if isinstance(message, msgspec.Struct) else msgspec.json.encode(message))
    await nc.flush()
    await violations.expect(subject)
    assert await _stored(admin) == before


async def test_runner_key_cannot_read_another_runners_tasks_or_chunks(admin: NATS, r1: tuple[NATS, Violations]) -> None:
    nc, violations = r1
    for subject in (subjects.task_subject("r2"), subjects.runner_chunks("r2"), "exo.>", "_INBOX.>"):
        await nc.subscribe(subject)
        await nc.flush()
        await violations.expect(subject)
    js = nc.jetstream(timeout=0.5)
    attempts = {
        # A consumer of its own naming on r2's queue; the stream-wide legacy create; r2's durable itself.
        f"$JS.API.CONSUMER.CREATE.{LOG_STREAM}.spy.exo.tasks.r2": lambda: js.add_consumer(
            LOG_STREAM, api.ConsumerConfig(name="spy", filter_subject=subjects.task_subject("r2"))
        ),
        f"$JS.API.CONSUMER.CREATE.{LOG_STREAM}": lambda: js.add_consumer(
            LOG_STREAM, api.ConsumerConfig(filter_subject=subjects.task_subject("r2"))
        ),
        f"$JS.API.CONSUMER.CREATE.{CHUNKS_STREAM}": lambda: js.add_consumer(
            CHUNKS_STREAM, api.ConsumerConfig(filter_subject=subjects.runner_chunks("r2"))
        ),
        f"$JS.API.CONSUMER.MSG.NEXT.{LOG_STREAM}.runner-r2": lambda: nc.request(
            f"$JS.API.CONSUMER.MSG.NEXT.{LOG_STREAM}.runner-r2", b'{"batch":1}', timeout=0.5
        ),
        f"$JS.API.CONSUMER.DELETE.{LOG_STREAM}.runner-r2": lambda: js.delete_consumer(LOG_STREAM, "runner-r2"),
        f"$JS.API.DIRECT.GET.{LOG_STREAM}.exo.tasks.r2": lambda: js.get_last_msg(
            LOG_STREAM, subjects.task_subject("r2"), direct=True
        ),
        f"$JS.API.STREAM.DELETE.{LOG_STREAM}": lambda: js.delete_stream(LOG_STREAM),
    }
    for subject, call in attempts.items():
        with pytest.raises(nats.errors.TimeoutError):
            await call()
        await violations.expect(subject)
    assert (await admin.jetstream().stream_info(LOG_STREAM)).config.name == LOG_STREAM


async def test_client_key_cannot_write_runner_events_or_delete_streams(
    secured: NatsServer, auth_dir: Path, admin: NATS
) -> None:
    nc, violations = await _connect(secured, auth_dir, "client")
    try:
        before = await _stored(admin)
        event = RunnerStatusUpdated(event_id="x", runner_id="r1", incarnation=1, at=0.0, runner_status=RunnerIdle())
        for subject, payload in (
            (subjects.runner_events_subject("r1"), encode(event)),
            (subjects.runner_events_subject("r1"), encode(_lost("r1"))),
            (subjects.SUPERVISOR_EVENTS, b'{"type":"InstancePlaced"}'),
            (subjects.chunks_subject("r1", "t"), b'{"index":0,"text":"forged"}'),
            (subjects.heartbeat_subject("r1"), b"{}"),
        ):
            await nc.publish(subject, payload)
            await nc.flush()
            await violations.expect(subject)
        js = nc.jetstream(timeout=0.5)
        for subject, call in {
            f"$JS.API.STREAM.DELETE.{LOG_STREAM}": lambda: js.delete_stream(LOG_STREAM),
            f"$JS.API.STREAM.PURGE.{CHUNKS_STREAM}": lambda: js.purge_stream(CHUNKS_STREAM),
            f"$JS.API.STREAM.UPDATE.{LOG_STREAM}": lambda: js.update_stream(
                api.StreamConfig(name=LOG_STREAM, subjects=["exo.>"])
            ),
            f"$JS.API.CONSUMER.DELETE.{LOG_STREAM}.runner-r1": lambda: js.delete_consumer(LOG_STREAM, "runner-r1"),
        }.items():
            with pytest.raises(nats.errors.TimeoutError):
                await call()
            await violations.expect(subject)
        # The stream-wide create names its consumer in the body, past the deny rules: it
        # could re-point runner r1's queue at r2's tasks, so only admin may use it.
        body = {"stream_name": LOG_STREAM, "config": {"name": "runner-r1", "filter_subject": "exo.tasks.r2"}}
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(f"$JS.API.CONSUMER.CREATE.{LOG_STREAM}", msgspec.json.encode(body), timeout=0.5)
        await violations.expect(f"$JS.API.CONSUMER.CREATE.{LOG_STREAM}")
        assert await _stored(admin) == before
        # What a client may do: publish a task and a command (stored), read the log.
        ack = await client.publish(js, subjects.task_subject("r1"), {"type": "StartWarmup", "task_id": "ok"})
        assert ack.stream == LOG_STREAM
    finally:
        await nc.close()


async def _refusal(url: str, options: ConnectOptions) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(client.NatsRefused) as refused:
        await client.connect(url, options=options, connect_timeout=2.0)
    return str(refused.value), time.monotonic() - start


async def test_no_key_a_wrong_key_or_an_unknown_ca_is_named_within_seconds(
    secured: NatsServer, auth_dir: Path, tmp_path: Path
) -> None:
    ca = auth_dir / certs.CA_FILE
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)))
    stranger.chmod(0o600)
    other_ca = tmp_path / "other"
    other_ca.mkdir()
    certs.write_ca_and_server_cert(other_ca, [])
    cases = {
        "no credentials were given": ConnectOptions(tlsca=ca),
        "is not a user of this server": ConnectOptions(nkey=stranger, tlsca=ca),
        "is not trusted": ConnectOptions(nkey=identities.seed_path(auth_dir, "client")),
        "--tlsca": ConnectOptions(nkey=identities.seed_path(auth_dir, "client"), tlsca=other_ca / certs.CA_FILE),
        "holds no user nkey seed": ConnectOptions(nkey=ca, tlsca=ca),
    }
    for named, options in cases.items():
        message, took = await _refusal(secured.url, options)
        assert named in message, message
        assert took < 10.0, (named, took)


def test_no_server_listens_beyond_loopback_without_auth(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="without auth"):
        NatsServer(port=0, monitor_port=0, store_dir=tmp_path, host="0.0.0.0")


def test_seed_files_are_owner_only_and_auth_conf_holds_no_secret(auth_dir: Path) -> None:
    seeds = sorted(p.name for p in auth_dir.glob("*.nk"))
    assert seeds == ["admin.nk", "client.nk", "runner-r1.nk", "runner-r2.nk", "supervisor.nk"]
    conf = (auth_dir / identities.AUTH_CONF).read_text()
    for path in auth_dir.glob("*.nk"):
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.read_text().strip() not in conf
    assert (auth_dir / certs.SERVER_KEY_FILE).stat().st_mode & 0o777 == 0o600


async def test_an_added_runner_connects_once_the_server_reloads(secured: NatsServer, auth_dir: Path) -> None:
    rid = f"r{len(list(auth_dir.glob('runner-*.nk'))) + 1}"
    identities.add_runner(auth_dir, rid)
    options = identities.options_for(auth_dir, f"runner-{rid}")
    with pytest.raises(client.NatsRefused, match="not a user"):
        await client.connect(secured.url, options=options, connect_timeout=2.0)
    assert identities.reload_server(auth_dir) == secured.process.pid  # type: ignore[union-attr]
    async with asyncio.timeout(10):
        while True:
            try:
                nc = await client.connect(secured.url, options=options, connect_timeout=2.0)
                break
            except client.NatsRefused:
                continue  # the reload is asynchronous: the next attempt finds the new user
    try:
        await nc.publish(subjects.heartbeat_subject(rid), b"{}")
        await nc.flush()
        assert nc.is_connected
    finally:
        await nc.close()


def _secured_exojet(auth_dir: Path, identity: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """`exojet ARGS` connecting as `identity`, through the environment as an operator would set it."""
    env = {"EXOJET_NKEY": str(identities.seed_path(auth_dir, identity)), "NATS_CA": str(auth_dir / certs.CA_FILE)}
    return exojet(*args, log=log, env=env)


@pytest.mark.timeout(240)
async def test_seed_workflow_pipeline_routed_chat_catch_up_and_replay_under_least_privilege_with_tls(
    auth_dir: Path, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = NatsServer(
        port=0, monitor_port=0, store_dir=tmp_path / "nats", log_file=tmp_path / "nats.log", auth_dir=auth_dir
    ).start()
    procs: list[subprocess.Popen[bytes]] = []
    client_options = identities.options_for(auth_dir, "client")
    # route_chat connects as the CLI would, with the process's options: the client's.
    monkeypatch.setattr(connect_options, "_process_options", client_options)
    try:
        await identities.create_streams(server.url, auth_dir)
        nc = await client.connect(server.url, name="test-client", options=client_options)
        watch = LogWatch()
        await watch.start(nc)
        common = ("--nats", server.url, "--models-dir", str(models_dir))
        for rid in RUNNERS:
            procs.append(
                _secured_exojet(auth_dir, f"runner-{rid}", "runner", "--id", rid, *common, log=tmp_path / f"{rid}.log")
            )
        supervise = (*common, "--group-ports", group_ports())
        procs.append(
            _secured_exojet(auth_dir, "supervisor", "supervisor", "--id", "s0", *supervise, log=tmp_path / "s0.log")
        )
        await watch.until(
            lambda s: all(r in s.runners and s.runners[r].status == "RunnerIdle" for r in RUNNERS), 60, "runners Idle"
        )
        ack = await client.publish(
            nc.jetstream(), subjects.COMMANDS, PlaceInstance(model_id="local/tiny", min_runners=2)
        )
        instance_id = instance_id_of(None, ack.seq)
        await watch.until(
            lambda s: instance_id in s.instances and s.instances[instance_id].status in ("Ready", "Failed"),
            90,
            "the pipeline instance Ready",
        )
        assert watch.state.instances[instance_id].status == "Ready", watch.state.instances[instance_id].reason
        chat = route_chat(server.url, [ChatMessage("user", "hello")], "local/tiny", max_tokens=4, timeout=60)
        assert "".join([t async for t in chat])
        # The ring's ranks proved who they are with the keys their runners registered.
        connects = [t for t in watch.state.tasks.values() if t.task_type == "ConnectToGroup"]
        assert len(connects) == 2 and all(t.result and t.result["signed"] for t in connects)

        # The API as the client identity: a chat, its models, the page.
        api_port = free_port()
        procs.append(
            _secured_exojet(
                auth_dir, "client", "api", "--nats", server.url, "--port", str(api_port), log=tmp_path / "api.log"
            )
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=60) as http:
            await until_healthy_async(f"http://127.0.0.1:{api_port}", procs[-1], tmp_path / "api.log", 60)
            models = await http.get("/v1/models")
            assert [m["id"] for m in models.json()["data"]] == ["local/tiny"]
            body = {"model": "local/tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
            answer = await http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"]
            page = await http.get("/")
            assert page.status_code == 200 and "RunnerReady" in page.text

        # A supervisor started later catches up from the log to the same state.
        stop(procs.pop())
        procs.append(
            _secured_exojet(auth_dir, "supervisor", "supervisor", "--id", "s1", *supervise, log=tmp_path / "s1.log")
        )
        seq = (await nc.jetstream().stream_info(LOG_STREAM)).state.last_seq
        await watch.until(lambda s: s.seq >= seq, 10, "the watch at the log's end")
        answer = await first_answer(nc, timeout=30, min_seq=seq, hash=True)
        assert answer.seq == seq == watch.state.seq
        assert answer.state_hash == state_hash(watch.state)

        replay = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "exojet.cli.main",
            "replay",
            "--runner",
            "r2",
            "--nats",
            server.url,
            "--nkey",
            str(identities.seed_path(auth_dir, "client")),
            "--tlsca",
            str(auth_dir / certs.CA_FILE),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(replay.communicate(), 60)
        assert replay.returncode == 0, err.decode()
        assert "RunnerReady" in out.decode()
        await nc.close()
    finally:
        for proc in procs:
            stop(proc)
        server.stop()
    # Nobody in the whole workflow needed a permission its identity lacks.
    assert "Permissions Violation" not in (tmp_path / "nats.log").read_text()
