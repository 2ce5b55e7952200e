"""A JetStream cluster of three real nats-server processes on loopback: server lists, replicas,
and publishes, follows and queries carried through the loss of the `EXO_LOG` leader."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from exojet.bus import streams, subjects
from exojet.bus.commands import PlaceInstance
from exojet.bus.nats import client, query_client, stream_setup
from exojet.bus.ops.server import ClusterConfig, NatsServer, free_port
from testbed import REPO
from testbed.nats_cluster import NatsCluster
from tests.procs import exojet, exojet_output, stop


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path_factory.mktemp("cluster")).start()
    yield nodes
    nodes.stop()


async def _leader(nodes: NatsCluster, stream: str, timeout: float = 30.0) -> str:
    """The node leading `stream`, once one is elected (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (leader := nodes.stream_leader(stream)) is None:
        assert loop.time() < deadline, f"no leader of {stream} within {timeout} s"
        await asyncio.sleep(0.1)  # poll: elections have no event to wait on from outside
    return leader


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exojet.cli.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


async def test_streams_get_three_replicas_and_a_start_never_changes_them(cluster: NatsCluster) -> None:
    nc = await client.connect(cluster.url, name="test")
    try:
        js = nc.jetstream()
        await client.until_done(lambda: stream_setup.ensure_streams(js), "create the streams")
        for name in streams.STREAM_NAMES:
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3, name
        # A start asking for one replica runs with the three that are there.
        await stream_setup.ensure_streams(js, replicas=1)
        assert (await js.stream_info(streams.LOG_STREAM)).config.num_replicas == 3
    finally:
        await nc.close()
    shown = await exojet_output("streams", "--nats", cluster.url)
    assert "EXO_LOG: 3 replica(s), leader n" in shown


async def test_publishes_and_queries_go_on_through_two_leader_kills(cluster: NatsCluster, tmp_path: Path) -> None:
    sup = exojet("supervisor", "--nats", cluster.url, "--id", "s1", log=tmp_path / "sup.log")
    nc = await client.connect(cluster.url, name="test")
    try:
        js = nc.jetstream()
        await client.until_done(lambda: stream_setup.ensure_streams(js), "create the streams")
        await query_client.first_answer(nc, timeout=60.0)
        for kill in range(2):
            leader = await _leader(cluster, streams.LOG_STREAM)
            victim = cluster.node(leader)
            victim.kill()
            # Published while the stream elects a new leader: each is stored exactly once.
            acks = [
                await client.publish(
                    js,
                    subjects.COMMANDS,
                    PlaceInstance(command_id=f"k{kill}-{i}", model_id="local/none", min_runners=1),
                    msg_id=f"k{kill}-{i}",
                )
                for i in range(5)
            ]
            assert not any(a.duplicate for a in acks)
            assert len({a.seq for a in acks}) == 5
            # The supervisor's fold went on too: it answers with the last of them folded.
            reply = await query_client.query(
                nc, "instance", timeout=30.0, instance_id=f"inst-k{kill}-4", min_seq=acks[-1].seq
            )
            assert reply.instance.instance_id == f"inst-k{kill}-4"
            assert await _leader(cluster, streams.LOG_STREAM) != leader
            victim.start()
        assert sup.poll() is None, "the supervisor exited"
    finally:
        await nc.close()
        stop(sup)


async def test_a_single_server_gets_one_replica_and_refuses_three(nats_server: NatsServer) -> None:
    nc = await client.connect(nats_server.url, name="test")
    try:
        js = nc.jetstream()
        await stream_setup.ensure_streams(js)
        assert (await js.stream_info(streams.LOG_STREAM)).config.num_replicas == 1
        await js.delete_stream(streams.CHUNKS_STREAM)
        with pytest.raises(stream_setup.ReplicasRefused, match="need a JetStream cluster"):
            await stream_setup.ensure_streams(js, replicas=3)
    finally:
        await nc.close()


def test_a_bad_server_list_is_a_named_error_not_a_traceback() -> None:
    bad = _cli("state", "--nats", "nats://127.0.0.1:4222,nats://host:notaport")
    assert bad.returncode == 2
    assert "has a bad port" in bad.stderr and "Traceback" not in bad.stderr
    env_bad = _cli("state", env={"NATS_URL": "http://example.org", "PATH": "/usr/bin"})
    assert env_bad.returncode == 2
    assert "is not a NATS server URL" in env_bad.stderr and "Traceback" not in env_bad.stderr


def test_a_cluster_node_beyond_loopback_needs_auth(tmp_path: Path) -> None:
    refused = _cli(
        "nats",
        "--store-dir",
        str(tmp_path),
        "--cluster",
        "nats://10.9.8.7:6222",
        "--routes",
        "nats://10.9.8.6:6222",
    )
    assert refused.returncode == 1
    assert "refusing to listen on 10.9.8.7 without auth" in refused.stderr


async def test_a_connection_fails_over_to_another_server_of_its_list(cluster: NatsCluster) -> None:
    nc = await client.connect(cluster.url, name="test")
    try:
        js = nc.jetstream()
        await client.until_done(lambda: stream_setup.ensure_streams(js), "create the streams")
        assert nc.connected_url is not None
        on = next(s for s in cluster.servers if s.port == nc.connected_url.port)
        on.kill()
        ack = await client.publish(js, subjects.COMMANDS, PlaceInstance(model_id="local/none"), msg_id="failover-1")
        assert ack.seq > 0
        assert nc.connected_url.port != on.port
        assert client.watch(nc).outages == 1
        on.start()
    finally:
        await nc.close()


async def test_a_cluster_short_of_three_nodes_is_waited_for_then_gets_three_replicas(tmp_path: Path) -> None:
    nodes = NatsCluster(tmp_path, size=2).start()
    routes = tuple(s.cluster.listen for s in nodes.servers if s.cluster is not None)
    own = f"nats://127.0.0.1:{free_port()}"
    third = NatsServer(
        port=0,
        monitor_port=0,
        store_dir=tmp_path / "n3",
        cluster=ClusterConfig(name="n3", listen=own, routes=(*routes, own)),
    )
    warned = asyncio.Event()
    sink = logger.add(lambda m: warned.set(), filter=lambda r: "waiting for enough JetStream servers" in r["message"])
    try:
        nc = await client.connect(nodes.url, name="test")
        try:
            js = nc.jetstream()
            creating = asyncio.ensure_future(client.until_done(lambda: stream_setup.ensure_streams(js), "create"))
            await asyncio.wait_for(warned.wait(), 60)
            assert not creating.done()
            third.start()  # joins the cluster through its routes
            await asyncio.wait_for(creating, 60)
            assert (await js.stream_info(streams.LOG_STREAM)).config.num_replicas == 3
        finally:
            await nc.close()
    finally:
        logger.remove(sink)
        third.stop()
        nodes.stop()


async def test_exojet_streams_moves_every_stream_to_other_replicas(cluster: NatsCluster) -> None:
    nc = await client.connect(cluster.url, name="test")
    try:
        await client.until_done(lambda: stream_setup.ensure_streams(nc.jetstream()), "create the streams")
    finally:
        await nc.close()
    said = await exojet_output("streams", "--replicas", "1", "--nats", cluster.url)
    assert "moved EXO_LOG, EXO_CHUNKS, KV_EXO_SNAPSHOTS to 1 replica(s)" in said
    assert "EXO_LOG: 1 replica(s)" in said
    said = await exojet_output("streams", "--replicas", "3", "--nats", cluster.url)
    assert "EXO_LOG: 3 replica(s)" in said
