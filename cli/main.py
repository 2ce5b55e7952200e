"""`exojet`: one entry point that dispatches to the parts."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from exojet import __version__
from exojet.bus.nats import connect_options
from exojet.bus.nats.client import NatsRefused, NatsUnreachable, default_url
from exojet.bus.nats.connection import BadNatsUrl, server_urls
from exojet.bus.nats.stream_setup import ReplicasRefused, wanted_replicas
from exojet.bus.streams import LOG_MAX_AGE_S, LOG_MAX_BYTES, LogLimits
from exojet.cli.api_key import BadApiKeyFile, NoApiKey, add_key_arguments, api_key_from_args
from exojet.cli.logs import setup_logging
from exojet.models.store import default_models_dir
from exojet.projections.state import Retention

if TYPE_CHECKING:
    from exojet.api.app import ApiConfig


def _nats_url(value: str) -> str:
    """argparse's check of `--nats` (and of `$NATS_URL`, its default): a named error, not a traceback."""
    try:
        server_urls(value)
    except BadNatsUrl as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _add_nats(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nats",
        type=_nats_url,
        default=default_url(),
        help="NATS server URL, or several comma-separated (a cluster) (default $NATS_URL, else nats://127.0.0.1:4222)",
    )
    connect_options.add_arguments(p)


def _add_replicas(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--replicas",
        type=int,
        choices=range(1, 6),
        default=wanted_replicas(),
        help="replicas of the streams if this creates them (default $EXO_REPLICAS, else 3 on a cluster, 1 alone)",
    )


def add_api_options(p: argparse.ArgumentParser) -> None:
    """`exojet api`'s options (also what `exojet up` passes on)."""
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; beyond loopback only with an API key or --allow-no-key)",
    )
    p.add_argument("--port", type=int, default=52415, help="port to listen on (default 52415)")
    add_key_arguments(p)
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="also accept this Host header name (default: loopback names on a loopback bind, else the bound one)",
    )
    p.add_argument("--cors-origin", action="append", default=[], help="allow browsers from this origin (CORS)")
    p.add_argument("--max-tokens-limit", type=int, default=16_384, help="largest max_tokens a request may ask")
    p.add_argument(
        "--liveness-timeout",
        type=float,
        default=5.0,
        help="end a chat with an error once its runner has sent no heartbeat for this long",
    )


def api_config(args: argparse.Namespace, nats_url: str) -> ApiConfig:
    """The API's configuration from `add_api_options`' arguments (BadApiKeyFile, NoApiKey:
    see cli/api_key.py)."""
    from exojet.api.app import ApiConfig
    from exojet.api.main import allowed_hosts

    return ApiConfig(
        nats_url=nats_url,
        api_key=api_key_from_args(args, args.host),
        allowed_hosts=allowed_hosts(args.host, tuple(args.allowed_host)),
        cors_origins=tuple(args.cors_origin),
        max_tokens_limit=args.max_tokens_limit,
        liveness_timeout=args.liveness_timeout,
    )


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "mlx", "llamacpp"],
        help="engines a model may load on (auto: the fastest installed that runs the model)",
    )


def _add_models_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models-dir",
        type=Path,
        default=default_models_dir(),
        help="models dir (default $EXO_MODELS_DIR, else ~/.local/share/exo/models)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `exojet` subcommand."""
    parser = argparse.ArgumentParser(prog="exojet", description="Event-sourced LLM runners on NATS JetStream")
    parser.add_argument("--version", action="version", version=f"exojet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("nats", help="run the embedded nats-server (repo's nats.conf), alone or as a cluster node")
    p.add_argument("--port", type=int, default=4222, help="client port (default 4222; 0: any free one)")
    p.add_argument("--listen", default=None, metavar="HOST:PORT", help="client address (sets --host and --port)")
    p.add_argument(
        "--monitor-port", type=int, default=8222, help="HTTP monitoring port (default 8222; 0: any free one)"
    )
    p.add_argument("--name", default=None, help="this node's name, unique in its cluster (default: the host's name)")
    p.add_argument("--cluster", default=None, metavar="URL", help="where this node's routes listen: nats://HOST:PORT")
    p.add_argument("--cluster_name", default="exojet", help="the cluster's name (default exojet)")
    p.add_argument(
        "--routes",
        default="",
        metavar="URL,URL",
        help="every node's --cluster URL, comma-separated (its own may be listed)",
    )
    _add_replicas(p)
    p.add_argument("--store-dir", type=Path, default=None, help="JetStream store (default ~/.local/share/exo/nats)")
    p.add_argument(
        "--auth",
        type=Path,
        default=None,
        help="auth dir of `exojet auth init`: users by nkey with least privilege, TLS when it holds certificates",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback only with --auth)")

    from exojet.cli.auth_cmd import add_parsers as add_auth_parsers

    add_auth_parsers(sub)

    p = sub.add_parser("supervisor", help="run a supervisor: fold the log, serve exo.supervisor.* queries")
    p.add_argument("--id", default=None, help="supervisor id (default host-pid)")
    p.add_argument("--snapshot-every", type=int, default=10_000, help="store a snapshot every N events")
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=5.0,
        help="declare a runner lost after this many seconds without a heartbeat or event",
    )
    p.add_argument("--max-attempts", type=int, default=3, help="placement attempts before an instance stays Failed")
    p.add_argument(
        "--keep-finished",
        type=int,
        default=Retention().finished,
        help="finished tasks, chats and ended instances kept in the projection (each; older ones: the log)",
    )
    p.add_argument(
        "--keep-age",
        type=float,
        default=Retention().age_s,
        help="seconds (of log time) finished work stays in the projection",
    )
    p.add_argument("--keep-anomalies", type=int, default=Retention().anomalies, help="newest anomalies kept")
    p.add_argument(
        "--log-max-age",
        type=float,
        default=None,
        help=f"set EXO_LOG's max age in seconds, 0 = none (a new log gets {LOG_MAX_AGE_S:g})",
    )
    p.add_argument(
        "--log-max-bytes",
        type=int,
        default=None,
        help=f"set EXO_LOG's max size in bytes, 0 = none (a new log gets {LOG_MAX_BYTES})",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="routed chats that may wait in an instance's runner queue once it serves as many as it can; "
        "past it a chat is refused (ChatRefused, HTTP 429)",
    )
    p.add_argument(
        "--group-ports",
        default="52400-52999",
        help="port range START-END that pipeline groups listen on (default 52400-52999)",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="read layer counts from models here (an override: runners report them when their downloads complete)",
    )
    _add_replicas(p)
    _add_nats(p)

    p = sub.add_parser("streams", help="the streams' replicas: show them, or change them with --replicas")
    p.add_argument("--replicas", type=int, choices=range(1, 6), default=None, help="move every stream to N replicas")
    _add_nats(p)

    from exojet.cli.orchestration_cmds import add_parsers

    add_parsers(sub, _add_nats)

    p = sub.add_parser("task", help="validate and publish a task on exo.tasks.RUNNER_ID")
    p.add_argument("runner_id", help="the runner whose queue gets the task (exo.tasks.RUNNER_ID)")
    p.add_argument("json", help='the task, e.g. \'{"type":"StartWarmup"}\'')
    p.add_argument("--wait", action="store_true", help="follow it to its terminal status (print a chat's text)")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="with --wait: seconds before giving up, exit 1 (default 600)"
    )
    _add_nats(p)

    p = sub.add_parser("state", help="the supervisor's projection")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--runner", default=None, help="only this runner")
    g.add_argument("--task", default=None, help="only this task")
    g.add_argument("--instance", default=None, help="only this instance")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--min-seq", type=int, default=0, help="answer once the projection reached this seq")
    p.add_argument("--offset", type=int, default=0, help="page: skip this many runners, instances and tasks")
    p.add_argument("--limit", type=int, default=100, help="page: at most this many of each (max 500)")
    _add_nats(p)

    p = sub.add_parser("replay", help="the log's timeline, rebuilt locally (no supervisor needed)")
    p.add_argument("--runner", default=None, help="only the messages about this runner")
    p.add_argument("--task", default=None, help="only the messages about this task")
    p.add_argument("--from", dest="from_seq", type=int, default=1, help="first log sequence (default 1)")
    p.add_argument("--to", dest="to_seq", type=int, default=None, help="last log sequence (default: the newest)")
    p.add_argument("--json", action="store_true", help="one JSON object a line: seq, subject, time, message")
    p.add_argument("--state", action="store_true", help="print the projection as of --to (instead of the timeline)")
    p.add_argument(
        "--check",
        action="store_true",
        help="list anomalies, unfinished tasks and stuck runners (instead of the timeline); exit 1 if any",
    )
    p.add_argument("--file", type=Path, default=None, help="read an archive `exojet log export` wrote, not EXO_LOG")
    p.add_argument(
        "--html",
        type=Path,
        default=None,
        help="write the timeline as one self-contained HTML file (instead of printing it)",
    )
    p.add_argument(
        "--html-max-bytes",
        type=int,
        default=20 * 1024 * 1024,
        help="embed the cluster state of the newest marks up to this many bytes (default 20 MiB)",
    )
    _add_nats(p)

    p = sub.add_parser("explain", help="how a task, runner, instance or chat got its status, and why (from the log)")
    p.add_argument("id", help="a runner, task, instance or routed chat id")
    p.add_argument("--json", action="store_true", help="print JSON instead of words")
    p.add_argument("--file", type=Path, default=None, help="read an archive `exojet log export` wrote, not EXO_LOG")
    _add_nats(p)

    p = sub.add_parser("log", help="the log itself")
    log_sub = p.add_subparsers(dest="log_command", required=True)
    p = log_sub.add_parser("export", help="archive a range of EXO_LOG as gzip JSON lines (`replay --file` reads it)")
    p.add_argument("--from", dest="from_seq", type=int, default=1, help="first log sequence (default 1)")
    p.add_argument("--to", dest="to_seq", type=int, default=None, help="last log sequence (default: the newest)")
    p.add_argument("file", type=Path, help="the archive to write (gzip-compressed JSON lines)")
    _add_nats(p)

    p = sub.add_parser(
        "up", help="start nats-server, a supervisor and a runner; drive it to Ready on the default model"
    )
    p.add_argument("--runner-id", default="r1", help="the runner's id (default r1)")
    _add_engine(p)
    p.add_argument("--port", type=int, default=4222, help="nats-server's client port on 127.0.0.1 (default 4222)")
    p.add_argument("--monitor-port", type=int, default=8222, help="nats-server's HTTP monitoring port (default 8222)")
    p.add_argument("--store-dir", type=Path, default=None, help="JetStream store (default ~/.local/share/exo/nats)")
    p.add_argument("--api-port", type=int, default=52415, help="the OpenAI-compatible API's port (0: no API)")
    p.add_argument(
        "--api-host",
        default="127.0.0.1",
        help="address the API listens on (default 127.0.0.1; beyond loopback only with an API key or --allow-no-key)",
    )
    add_key_arguments(p)
    _add_models_dir(p)

    p = sub.add_parser("chat", help="ask a Ready runner; the answer streams as it is generated")
    p.add_argument("prompt", help="the user message to send")
    p.add_argument(
        "--runner",
        default=None,
        help="send to this runner directly (default: routed by the supervisors to a Ready instance)",
    )
    p.add_argument("--model", default=None, help="only instances/runners serving this model id")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the whole answer, exit 1 past it (default 600)",
    )
    _add_nats(p)

    p = sub.add_parser("api", help="serve the OpenAI-compatible HTTP API (a stateless NATS client)")
    add_api_options(p)
    _add_nats(p)

    p = sub.add_parser("models", help="the models dir: list, import-gguf")
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("list", help="complete models with their sizes")
    _add_models_dir(q)
    q = msub.add_parser("import-gguf", help="import a llama GGUF (Q4_0, Q4_1, Q8_0, F16, F32) as an mlx-lm model")
    q.add_argument("path", type=Path, help="the GGUF file")
    q.add_argument("--name", required=True, help="model id to import it as, e.g. local/my-llama")
    q.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="scales, biases and dense tensors (float32 is fastest on a CPU)",
    )
    q.add_argument("--dequantize", action="store_true", help="write dense weights instead of quantized ones")
    _add_models_dir(q)

    p = sub.add_parser("runner", help="run a runner process")
    p.add_argument("--id", required=True, help="runner id (letters, digits, '-', '_')")
    p.add_argument(
        "--deadline",
        action="append",
        default=[],
        metavar="TYPE=SECONDS",
        help="a task type's deadline, from when the runner starts it (a chat's: its base); repeatable",
    )
    p.add_argument(
        "--chat-seconds-per-token",
        type=float,
        default=0.5,
        help="what each max_tokens adds to a chat's deadline (default 0.5)",
    )
    p.add_argument(
        "--chat-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long chats in flight may run on once a Shutdown or UnloadModel is next, before "
        "they are cancelled (default 30)",
    )
    _add_engine(p)
    _add_models_dir(p)
    _add_nats(p)
    return parser


def _run_nats(args: argparse.Namespace) -> int:
    import signal

    from exojet.bus.ops.server import NatsServer, ServerError
    from exojet.cli.nats_cmd import cluster_config, create_streams_later, listen_address

    server: NatsServer | None = None
    try:
        host, port = listen_address(args.listen, args.host, args.port)
        cluster = cluster_config(args.name, args.cluster, args.cluster_name, args.routes)
        server = NatsServer(
            port=port,
            monitor_port=args.monitor_port,
            store_dir=args.store_dir,
            host=host,
            auth_dir=args.auth,
            cluster=cluster,
        ).start()
        if args.auth and cluster is None:
            from exojet.bus.ops import identities

            asyncio.run(identities.create_streams(server.url, args.auth, args.replicas))
        elif args.auth:
            # A cluster's JetStream answers once enough nodes are up: create them meanwhile.
            create_streams_later(server.url, args.auth, args.replicas)
    except (ServerError, NatsRefused, NatsUnreachable, ValueError) as err:
        if server is not None:
            server.stop()
        print(f"error: {err}", file=sys.stderr)
        return 1
    secured = f", auth from {args.auth}" if args.auth else ""
    node = f", node {cluster.name} of cluster {cluster.cluster_name} (routes on {cluster.listen})" if cluster else ""
    print(f"nats-server on {host}:{server.port} (store {server.store_dir}{secured}{node}); Ctrl-C stops it", flush=True)
    # SIGTERM too must stop the server, or it outlives this process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return server.process.wait() if server.process else 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def _log_limits(max_age: float | None, max_bytes: int | None) -> LogLimits | None:
    """The limits a supervisor sets on EXO_LOG, if told any (the other one stays the default)."""
    if max_age is None and max_bytes is None:
        return None
    default = LogLimits()
    return LogLimits(
        max_age_s=default.max_age_s if max_age is None else max_age,
        max_bytes=default.max_bytes if max_bytes is None else max_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging()
    if hasattr(args, "nkey"):
        connect_options.use(connect_options.from_args(args))
    try:
        return _dispatch(args)
    except (NatsUnreachable, NatsRefused, ReplicasRefused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    match args.command:
        case "nats":
            return _run_nats(args)
        case "auth":
            from exojet.cli.auth_cmd import run as run_auth

            return run_auth(args)
        case "supervisor":
            from exojet.supervisor.main import run_supervisor
            from exojet.supervisor.planner import PlannerConfig

            start, _, end = args.group_ports.partition("-")
            planner = PlannerConfig(
                max_attempts=args.max_attempts,
                port_base=int(start),
                port_count=int(end or start) - int(start) + 1,
                max_chats_per_instance=args.max_queue,
            )
            return asyncio.run(
                run_supervisor(
                    args.nats,
                    args.id,
                    args.snapshot_every,
                    heartbeat_timeout=args.heartbeat_timeout,
                    models_dir=args.models_dir,
                    planner=planner,
                    retention=Retention(
                        finished=args.keep_finished, age_s=args.keep_age, anomalies=args.keep_anomalies
                    ),
                    log_limits=_log_limits(args.log_max_age, args.log_max_bytes),
                    replicas=args.replicas,
                )
            )
        case "streams":
            from exojet.cli.nats_cmd import streams_cmd

            return asyncio.run(streams_cmd(args.nats, args.replicas))
        case "place" | "delete" | "drain" | "undrain":
            from exojet.cli.orchestration_cmds import run

            return run(args)
        case "task":
            from exojet.cli.log_cmds import publish_task

            return asyncio.run(publish_task(args.nats, args.runner_id, args.json, args.wait, args.timeout))
        case "state":
            from exojet.cli.log_cmds import Scope, show_state
            from exojet.projections.queries import Paging

            return asyncio.run(
                show_state(
                    args.nats,
                    Scope(runner_id=args.runner, task_id=args.task, instance_id=args.instance),
                    args.json,
                    args.min_seq,
                    Paging(offset=args.offset, limit=args.limit),
                )
            )
        case "replay":
            from exojet.cli.log_cmds import replay_log

            return asyncio.run(
                replay_log(
                    args.nats,
                    args.runner,
                    args.task,
                    args.from_seq,
                    args.to_seq,
                    args.json,
                    args.state,
                    args.check,
                    args.file,
                    args.html,
                    args.html_max_bytes,
                )
            )
        case "explain":
            from exojet.cli.log_cmds import explain_id

            return asyncio.run(explain_id(args.nats, args.id, args.file, args.json))
        case "log":
            from exojet.cli.log_cmds import export_log

            return asyncio.run(export_log(args.nats, args.from_seq, args.to_seq, args.file))
        case "up":
            from exojet.cli.up_cmd import ApiOptions, up

            try:
                key = api_key_from_args(args, args.api_host, "--api-host") if args.api_port else None
            except (BadApiKeyFile, NoApiKey) as err:
                print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
                return 1
            return up(
                args.port,
                args.monitor_port,
                args.models_dir,
                args.runner_id,
                args.store_dir,
                args.api_port,
                args.engine,
                ApiOptions(host=args.api_host, key=key, allow_no_key=args.allow_no_key),
            )
        case "chat":
            from exojet.cli.chat_cmd import chat

            return asyncio.run(
                chat(args.nats, args.prompt, args.runner, args.model, args.max_tokens, args.temperature, args.timeout)
            )
        case "models" if args.models_command == "list":
            from exojet.cli.models_cmd import list_models_cmd

            return list_models_cmd(args.models_dir)
        case "models":
            from exojet.cli.models_cmd import import_gguf_cmd

            return import_gguf_cmd(args.path, args.name, args.models_dir, args.dtype, args.dequantize)
        case "api":
            from exojet.api.main import serve

            try:
                config = api_config(args, args.nats)
            except (BadApiKeyFile, NoApiKey) as err:
                print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
                return 1
            return serve(config, args.host, args.port)
        case "runner":
            from exojet.runner.main import main as runner_main

            return runner_main(
                runner_id=args.id,
                nats_url=args.nats,
                models_dir=args.models_dir,
                deadlines=args.deadline,
                chat_seconds_per_token=args.chat_seconds_per_token,
                engine=args.engine,
                chat_grace_s=args.chat_grace,
            )
    return 2


if __name__ == "__main__":
    sys.exit(main())
