"""`exojet auth init|add-runner`: identities (nkey seeds), the server's auth.conf, a private CA."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exojet.bus.ops import certs, identities
from exojet.cli.options import Subparsers


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("auth", help="identities and TLS for a server shared by several teams")
    asub = p.add_subparsers(dest="auth_command", required=True)
    q = asub.add_parser(
        "init", help="write DIR/auth.conf and a seed file (0600) for admin, supervisor, client and each runner"
    )
    q.add_argument("dir", type=Path, help="the auth dir to write (created if missing)")
    q.add_argument("--runners", default="", help="runner ids, comma-separated (add more later with add-runner)")
    q.add_argument("--tls", action="store_true", help="also a private CA and a server certificate")
    q.add_argument("--hosts", default="", help="with --tls: names/addresses the server is reached by, comma-separated")
    q.set_defaults(func=run)
    q = asub.add_parser("add-runner", help="a seed for runner-ID, auth.conf rebuilt; a running `exojet nats` reloads")
    q.add_argument("dir", type=Path, help="the auth dir `exojet auth init` wrote")
    q.add_argument("id", help="the new runner's id (its identity is runner-ID)")
    q.set_defaults(func=run)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    try:
        if args.auth_command == "init":
            written = identities.init(args.dir, _split(args.runners))
            if args.tls:
                written += certs.write_ca_and_server_cert(args.dir, _split(args.hosts))
            for path in written:
                print(f"wrote {path}")
            print(
                f"start the server with `exojet nats --auth {args.dir}`; each process connects with its own seed, "
                f"e.g. `exojet runner --id ID --nkey {args.dir}/runner-ID.nk"
                + (f" --tlsca {args.dir}/{certs.CA_FILE}`" if certs.has_tls(args.dir) else "`")
            )
            return 0
        path = identities.add_runner(args.dir, args.id)
        print(f"wrote {path} and {args.dir / identities.AUTH_CONF}")
        pid = identities.reload_server(args.dir)
        if pid:
            print(f"reloaded the server (pid {pid}): runner {args.id} may connect now")
        else:
            print("no `exojet nats --auth` server runs from this dir: copy auth.conf to each node and reload it")
        return 0
    except (identities.AuthDirError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
