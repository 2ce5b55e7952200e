"""Creating exojet's streams, task consumers and KV bucket on a server, idempotently."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace

from loguru import logger
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, BucketNotFoundError, NotFoundError

from exojet.bus import subjects
from exojet.bus.streams import (
    CHUNKS_MAX_AGE_S,
    CHUNKS_STREAM,
    CLUSTER_REPLICAS,
    DUPLICATE_WINDOW_S,
    LOG_STREAM,
    SNAPSHOT_BUCKET,
    STREAM_NAMES,
    TASK_ACK_WAIT_S,
    TASK_MAX_ACK_PENDING,
    TASK_MAX_DELIVER,
    LogLimits,
    task_consumer_name,
)

# JetStream's code for "not clustered".
NOT_CLUSTERED = 10074
REPLICAS_WAIT_LOG_S = 30.0


class ReplicasRefused(Exception):
    """More than one replica was asked of a server that is not in a cluster."""


def log_stream_config(replicas: int = 1, limits: LogLimits | None = None) -> api.StreamConfig:
    """`EXO_LOG`: tasks, events, commands and cancels in one total order; nothing is deleted or
    purged, only the oldest messages once the log outgrows its limits."""
    limits = limits or LogLimits()
    return api.StreamConfig(
        name=LOG_STREAM,
        subjects=list(subjects.LOG_SUBJECTS),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_age=limits.max_age_s,
        max_bytes=limits.max_bytes or -1,
        discard=api.DiscardPolicy.OLD,
        allow_direct=True,
        deny_delete=True,
        deny_purge=True,
        description="exojet event log: tasks, runner and supervisor events, commands, cancels",
    )


def chunks_stream_config(replicas: int = 1) -> api.StreamConfig:
    """`EXO_CHUNKS`: generated tokens, kept an hour so a late client can replay them."""
    return api.StreamConfig(
        name=CHUNKS_STREAM,
        subjects=list(subjects.CHUNK_SUBJECTS),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_age=CHUNKS_MAX_AGE_S,
        max_bytes=-1,
        duplicate_window=DUPLICATE_WINDOW_S,
        allow_direct=True,
        description="exojet generated token chunks, one subject per task",
    )


def task_consumer_config(runner_id: str) -> api.ConsumerConfig:
    """The durable pull consumer a runner reads its tasks through."""
    return api.ConsumerConfig(
        # `name` too: nats-py then creates it through `CONSUMER.CREATE.<stream>.<name>.<filter>`,
        # whose filter the server checks, so a runner's key can be allowed its own queue only.
        name=task_consumer_name(runner_id),
        durable_name=task_consumer_name(runner_id),
        filter_subject=subjects.task_subject(runner_id),
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=TASK_ACK_WAIT_S,
        max_deliver=TASK_MAX_DELIVER,
        # A runner pulls one task at a time, and a further chat while it runs fewer than its
        # capacity: the bound is the most chats an engine serves at once.
        max_ack_pending=TASK_MAX_ACK_PENDING,
        description=f"tasks of runner {runner_id}",
    )


def wanted_replicas() -> int | None:
    """`$EXO_REPLICAS`, the default of every `--replicas` (None: 3 on a cluster, 1 on a single server)."""
    value = os.environ.get("EXO_REPLICAS")
    return int(value) if value else None


async def _create(js: JetStreamContext, config: api.StreamConfig, replicas: int | None) -> int:
    """Add the stream with `replicas`, else 3 on a cluster and 1 on a single server.

    Whether the server is clustered is what it answers to 3 replicas; a cluster with
    fewer than 3 JetStream servers up yet (a node-by-node start) is waited for."""
    log = logger.bind(stream=config.name)
    waiting_since: float | None = None
    while True:
        try:
            info = await js.add_stream(replace(config, num_replicas=replicas or CLUSTER_REPLICAS))
            break
        except APIError as err:
            if replicas is None and err.err_code == NOT_CLUSTERED:
                info = await js.add_stream(replace(config, num_replicas=1))
                break
            if replicas is not None and replicas > 1 and err.err_code == NOT_CLUSTERED:
                raise ReplicasRefused(
                    f"{config.name}: {replicas} replicas need a JetStream cluster; this server is alone "
                    "(--replicas 1, or join it to a cluster: `exojet nats --cluster ... --routes ...`)"
                ) from None
            now = time.monotonic()
            if waiting_since is None or now - waiting_since > REPLICAS_WAIT_LOG_S:
                wanted = replicas or CLUSTER_REPLICAS
                log.warning(
                    f"cannot create {config.name} with {wanted} replicas yet ({err.description}); "
                    "waiting for enough JetStream servers (or pass --replicas / set EXO_REPLICAS)"
                )
                waiting_since = now
            await asyncio.sleep(1.0)
    created: int = info.config.num_replicas or 1
    log.bind(replicas=created).info("created stream")
    return created


def _replicas_note(name: str, have: int, clustered: bool, replicas: int | None) -> str | None:
    """What to say when an existing stream's replicas are not what this start wants (never changed here)."""
    if replicas is not None and replicas != have:
        return f"{name} has {have} replica(s), not the {replicas} asked for; it is left as it is"
    if replicas is None and clustered and have < CLUSTER_REPLICAS:
        return f"{name} has {have} replica(s) on a cluster: a lost node can take it away"
    return None


async def _ensure_stream(
    js: JetStreamContext, config: api.StreamConfig, set_limits: bool = True, replicas: int | None = None
) -> int:
    """Create or update the stream; its replicas (what it was created with, or has)."""
    # The configs built above always name their stream; StreamConfig types the name optional.
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        return await _create(js, config, replicas)
    # A start never changes replicas (moving a stream's data is an operator's decision):
    # it says what differs and how to change it.
    have = info.config.num_replicas or 1
    note = _replicas_note(config.name, have, info.cluster is not None and bool(info.cluster.name), replicas)
    if note is not None:
        logger.bind(stream=config.name).warning(
            f"{note}; change it with `exojet streams --replicas N` (as admin under --auth)"
        )
    config = replace(config, num_replicas=have)
    if not set_limits:
        # Only a process told the limits changes them; the others keep what is there.
        config = replace(config, max_age=info.config.max_age, max_bytes=info.config.max_bytes)
    if changed := _differing(info.config, config):
        try:
            await js.update_stream(config)
            logger.bind(stream=config.name).info(f"updated stream config: {', '.join(changed)}")
        except BadRequestError as err:
            # Some settings (storage type, ...) cannot change on a live stream;
            # run with what is there rather than refuse to start.
            logger.bind(stream=config.name).warning(f"stream config not updated: {err}")
        except NatsTimeout:
            # Under least privilege only admin may change a stream: the server
            # drops the request (docs/security.md). Run with what is there.
            logger.bind(stream=config.name).warning(
                "stream config not updated: no answer (with `exojet nats --auth`, only admin changes streams)"
            )
    return have


# What a start may change on an existing stream (never its replicas: see `_ensure_stream`).
_FIELDS = (
    "subjects",
    "retention",
    "max_age",
    "max_bytes",
    "duplicate_window",
    "allow_direct",
    "deny_delete",
    "deny_purge",
    "description",
)


def _differing(current: api.StreamConfig, wanted: api.StreamConfig) -> list[str]:
    return [f for f in _FIELDS if getattr(current, f) != getattr(wanted, f)]


async def ensure_streams(
    js: JetStreamContext, replicas: int | None = None, log_limits: LogLimits | None = None
) -> None:
    """Create or update `EXO_LOG`, `EXO_CHUNKS` and the KV `EXO_SNAPSHOTS`; `log_limits` set
    `EXO_LOG`'s limits (without them, a new log gets the defaults and an existing one keeps its own).
    `replicas` (default `$EXO_REPLICAS`, else 3 on a cluster and 1 on a single server) apply to
    what is created; existing streams keep theirs (see `set_replicas`). What `EXO_LOG` has is
    what the other two are created with."""
    replicas = replicas or wanted_replicas()
    log_replicas = await _ensure_stream(
        js, log_stream_config(1, log_limits), set_limits=log_limits is not None, replicas=replicas
    )
    await _ensure_stream(js, chunks_stream_config(1), replicas=replicas or log_replicas)
    try:
        await js.key_value(SNAPSHOT_BUCKET)
    except BucketNotFoundError:
        await js.create_key_value(
            api.KeyValueConfig(
                bucket=SNAPSHOT_BUCKET,
                history=1,
                storage=api.StorageType.FILE,
                replicas=replicas or log_replicas,
                description="exojet projection snapshots {seq, state}",
            )
        )
        logger.bind(bucket=SNAPSHOT_BUCKET).info("created KV bucket")


async def set_replicas(js: JetStreamContext, replicas: int) -> list[str]:
    """Change the replicas of every exojet stream (the server moves the data); what changed."""
    changed = []
    for name in STREAM_NAMES:
        info = await js.stream_info(name)
        if info.config.num_replicas != replicas:
            await js.update_stream(replace(info.config, num_replicas=replicas))
            changed.append(name)
    return changed
