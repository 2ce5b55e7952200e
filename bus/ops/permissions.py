"""Who may publish and subscribe what: the least-privilege contract, as nats-server permissions.

Identities: `admin` (streams, everything), `supervisor`, `client`, and `runner-<id>` per
runner. docs/security.md has the table in words; tests/test_security.py holds the
server to it. Each identity subscribes only its own inbox prefix `_INBOX.<public key>`,
so no one sees another's replies. The JetStream API is allowed call by call: a
consumer's filter is part of the API subject (`CONSUMER.CREATE.<stream>.<name>.<filter>`,
which the server checks against the request), so a runner can only ever create
consumers on its own tasks and events, and nobody but runner `<id>` can touch the
durable `runner-<id>` that holds its queue.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from exojet.bus import subjects
from exojet.bus.streams import CHUNKS_STREAM, LOG_STREAM, SNAPSHOT_BUCKET, task_consumer_name

ADMIN = "admin"
SUPERVISOR = "supervisor"
CLIENT = "client"
RUNNER_PREFIX = "runner-"
FIXED_IDENTITIES = (ADMIN, SUPERVISOR, CLIENT)

_API = "$JS.API"
_KV_STREAM = f"KV_{SNAPSHOT_BUCKET}"


@dataclass(frozen=True)
class Permissions:
    """One identity's nats-server `permissions` block (deny wins over allow)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    allow_responses: bool = False


def runner_identity(runner_id: str) -> str:
    """`runner-<id>`: the identity (and seed file name) of a runner."""
    return f"{RUNNER_PREFIX}{runner_id}"


def runner_id_of(identity: str) -> str | None:
    """The runner id of a `runner-<id>` identity, else None."""
    return identity[len(RUNNER_PREFIX) :] if identity.startswith(RUNNER_PREFIX) else None


def _durable(runner_id: str) -> str:
    return task_consumer_name(runner_id)


def _keep_off_queues(runner_ids: Iterable[str]) -> tuple[str, ...]:
    """Deny every consumer API call on these runners' task queues (create, info, delete, next, ...)."""
    denied: list[str] = []
    for rid in runner_ids:
        name = _durable(rid)
        denied += [
            f"{_API}.CONSUMER.*.{LOG_STREAM}.{name}",
            f"{_API}.CONSUMER.*.{LOG_STREAM}.{name}.>",
            f"{_API}.CONSUMER.*.*.{LOG_STREAM}.{name}",
            f"$JS.ACK.{LOG_STREAM}.{name}.>",
        ]
    return tuple(denied)


def _reader(*streams: str) -> tuple[str, ...]:
    """Read any message of these streams: ephemeral consumers, direct gets.

    On EXO_LOG only named creates (`CONSUMER.CREATE.EXO_LOG.<name>[.<filter>]`): the
    stream-wide `CONSUMER.CREATE.EXO_LOG` takes the name from its body, past the
    deny rules, and could re-point a runner's queue at another filter.
    """
    allowed = [f"{_API}.INFO", f"{_API}.STREAM.INFO.*", "$JS.FC.>"]
    for s in streams:
        if s != LOG_STREAM:
            allowed.append(f"{_API}.CONSUMER.CREATE.{s}")
        allowed += [
            f"{_API}.CONSUMER.CREATE.{s}.>",
            f"{_API}.CONSUMER.MSG.NEXT.{s}.*",
            f"{_API}.CONSUMER.INFO.{s}.*",
            f"{_API}.CONSUMER.DELETE.{s}.*",
            f"{_API}.DIRECT.GET.{s}",
            f"{_API}.DIRECT.GET.{s}.>",
            f"{_API}.STREAM.MSG.GET.{s}",
        ]
    return tuple(allowed)


def permissions(identity: str, public_key: str, runner_ids: Iterable[str]) -> Permissions:
    """The permissions of `identity` (whose nkey is `public_key`) in a cluster of `runner_ids`."""
    inbox = f"_INBOX.{public_key}.>"
    all_runners = sorted(set(runner_ids))
    if identity == ADMIN:
        return Permissions(publish=(">",), subscribe=(">",), allow_responses=True)
    if identity == SUPERVISOR:
        return Permissions(
            publish=(
                f"{subjects.TASKS_PREFIX}.*",
                subjects.SUPERVISOR_EVENTS,
                # RunnerLost goes on the runner's own subject, fenced by its last sequence.
                f"{subjects.RUNNER_EVENTS_PREFIX}.*",
                f"$KV.{SNAPSHOT_BUCKET}.>",
                *_reader(LOG_STREAM, CHUNKS_STREAM, _KV_STREAM),
            ),
            subscribe=(inbox, subjects.HEARTBEATS, f"{subjects.QUERY_PREFIX}.>", "$SRV.>"),
            publish_deny=_keep_off_queues(all_runners),
            allow_responses=True,
        )
    if identity == CLIENT:
        return Permissions(
            publish=(
                subjects.COMMANDS,
                f"{subjects.TASKS_PREFIX}.*",
                f"{subjects.CANCEL_PREFIX}.*",
                f"{subjects.QUERY_PREFIX}.>",
                "$SRV.>",
                # The snapshots too: the API's page folds the log from the newest one.
                *_reader(LOG_STREAM, CHUNKS_STREAM, _KV_STREAM),
            ),
            # Heartbeats: the HTTP API ends a stream whose runner went silent. Chunks: it and the
            # CLI read a chat's as they are published too (what EXO_CHUNKS, readable anyway, stores).
            subscribe=(inbox, subjects.HEARTBEATS, f"{subjects.CHUNKS_PREFIX}.>"),
            publish_deny=_keep_off_queues(all_runners),
        )
    rid = runner_id_of(identity)
    if rid is None or subjects.id_problem(rid):
        raise ValueError(f"unknown identity {identity!r}: admin, supervisor, client or runner-<id>")
    events = subjects.runner_events_subject(rid)
    tasks = subjects.task_subject(rid)
    cancels = subjects.cancel_subject(rid)
    return Permissions(
        publish=(
            events,
            subjects.heartbeat_subject(rid),
            subjects.runner_chunks(rid),
            f"{_API}.INFO",
            f"{_API}.STREAM.INFO.*",
            f"{_API}.CONSUMER.CREATE.{LOG_STREAM}.*.{tasks}",
            f"{_API}.CONSUMER.CREATE.{LOG_STREAM}.*.{events}",
            f"{_API}.CONSUMER.CREATE.{LOG_STREAM}.*.{cancels}",
            f"{_API}.CONSUMER.MSG.NEXT.{LOG_STREAM}.*",
            f"{_API}.CONSUMER.INFO.{LOG_STREAM}.*",
            f"{_API}.CONSUMER.DELETE.{LOG_STREAM}.*",
            f"{_API}.DIRECT.GET.{LOG_STREAM}.{events}",
            f"$JS.ACK.{LOG_STREAM}.{_durable(rid)}.>",
        ),
        # Its own events too: a RunnerLost the supervisor writes there tells an idle runner it was declared lost.
        subscribe=(inbox, subjects.heartbeat_subject(rid), events, cancels),
        publish_deny=_keep_off_queues(r for r in all_runners if r != rid),
    )


def _conf_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def render_auth_conf(users: dict[str, str]) -> str:
    """The nats-server include `auth.conf` for `users` ({identity: public nkey})."""
    runner_ids = [rid for rid in (runner_id_of(i) for i in users) if rid is not None]
    lines = [
        "# Generated by `exojet auth`: users by nkey, least privilege (docs/security.md).",
        "# Regenerated by `exojet auth add-runner`; a running server picks it up on reload (SIGHUP).",
        "authorization {",
        "  users = [",
    ]
    for identity in sorted(users):
        perms = permissions(identity, users[identity], runner_ids)
        publish = f"allow: {_conf_list(perms.publish)}"
        if perms.publish_deny:
            publish += f", deny: {_conf_list(perms.publish_deny)}"
        block = f"publish: {{{publish}}}, subscribe: {{allow: {_conf_list(perms.subscribe)}}}"
        if perms.allow_responses:
            block += ", allow_responses: true"
        lines.append(f"    # {identity}")
        lines.append(f'    {{nkey: "{users[identity]}", permissions: {{{block}}}}}')
    lines += ["  ]", "}", ""]
    return "\n".join(lines)
