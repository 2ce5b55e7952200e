"""Stream, consumer and KV definitions, created idempotently."""

from __future__ import annotations

from dataclasses import replace

import msgspec
from loguru import logger
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

from exojet.bus import subjects

LOG_STREAM = "EXO_LOG"
CHUNKS_STREAM = "EXO_CHUNKS"
SNAPSHOT_BUCKET = "EXO_SNAPSHOTS"

DUPLICATE_WINDOW_S = 120.0
CHUNKS_MAX_AGE_S = 3600.0
# EXO_LOG's limits by default: what a laptop holds. The oldest messages go first;
# snapshots (stored at least every `--snapshot-every` messages) keep a rebuild
# possible, and `exojet log export` keeps history where users want it.
LOG_MAX_AGE_S = 30 * 24 * 3600.0
LOG_MAX_BYTES = 2 * 1024**3
TASK_MAX_DELIVER = 5
# Short, so that a runner restarted after a crash gets the task its previous
# incarnation held (to answer it) within seconds; a live runner extends it with
# in-progress acks while it works.
TASK_ACK_WAIT_S = 6.0


class LogLimits(msgspec.Struct, frozen=True, kw_only=True):
    """How much of `EXO_LOG` the server keeps (0: no limit)."""

    max_age_s: float = LOG_MAX_AGE_S
    max_bytes: int = LOG_MAX_BYTES


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
        duplicate_window=DUPLICATE_WINDOW_S,
        allow_direct=True,
        description="exojet generated token chunks, one subject per task",
    )


def task_consumer_name(runner_id: str) -> str:
    return f"runner-{runner_id}"


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
        max_ack_pending=1,
        description=f"tasks of runner {runner_id}",
    )


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig, set_limits: bool = True) -> None:
    # The configs built above always name their stream; StreamConfig types the name optional.
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        logger.bind(stream=config.name).info("created stream")
        return
    if not set_limits:
        # Only a process told the limits changes them; the others keep what is there.
        config = replace(config, max_age=info.config.max_age, max_bytes=info.config.max_bytes)
    if _differs(info.config, config):
        try:
            await js.update_stream(config)
            logger.bind(stream=config.name).info("updated stream config")
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


def _differs(current: api.StreamConfig, wanted: api.StreamConfig) -> bool:
    fields = (
        "subjects",
        "retention",
        "max_age",
        "max_bytes",
        "duplicate_window",
        "allow_direct",
        "deny_delete",
        "deny_purge",
        "num_replicas",
        "description",
    )
    return any(getattr(current, f) != getattr(wanted, f) for f in fields)


async def ensure_streams(js: JetStreamContext, replicas: int = 1, log_limits: LogLimits | None = None) -> None:
    """Create or update `EXO_LOG`, `EXO_CHUNKS` and the KV `EXO_SNAPSHOTS`; `log_limits` set
    `EXO_LOG`'s limits (without them, a new log gets the defaults and an existing one keeps its own)."""
    await _ensure_stream(js, log_stream_config(replicas, log_limits), set_limits=log_limits is not None)
    await _ensure_stream(js, chunks_stream_config(replicas))
    try:
        await js.key_value(SNAPSHOT_BUCKET)
    except BucketNotFoundError:
        await js.create_key_value(
            api.KeyValueConfig(
                bucket=SNAPSHOT_BUCKET,
                history=1,
                storage=api.StorageType.FILE,
                replicas=replicas,
                description="exojet projection snapshots {seq, state}",
            )
        )
        logger.bind(bucket=SNAPSHOT_BUCKET).info("created KV bucket")
