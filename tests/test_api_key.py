"""`exojet api`'s key: from `--api-key`, `--api-key-file` or `$EXO_API_KEY`, and no API beyond
loopback without one unless `--allow-no-key` says so."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from exojet.bus.ops.server import NatsServer, free_port
from exojet.cli.api_key import API_KEY_ENV, BadApiKeyFile, NoApiKey, check_exposure, read_key_file, resolve_key
from exojet.cli.up_cmd import ApiOptions
from testbed import REPO
from tests.procs import start_api, stop

KEY = "sesame-7f3a"
NO_KEY = {API_KEY_ENV: ""}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    return {**env, **extra}


def _run_api(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`exojet api ARGS` expected to exit on its own (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "exojet.cli.main", "api", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=60,
    )


@pytest.fixture
def api_proc() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        stop(proc)


# -- where the key comes from ---------------------------------------------------------------


def test_precedence_flag_then_file_then_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    env = {API_KEY_ENV: "from-env"}
    assert resolve_key("from-flag", None, env) == "from-flag"
    assert resolve_key(None, key_file, env) == KEY
    assert resolve_key(None, None, env) == "from-env"
    assert resolve_key(None, None, {API_KEY_ENV: ""}) is None
    assert resolve_key(None, None, {}) is None


def test_an_unreadable_or_empty_key_file_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(BadApiKeyFile, match="cannot read API key file .*missing"):
        read_key_file(tmp_path / "missing")
    with pytest.raises(BadApiKeyFile, match="cannot read API key file"):
        read_key_file(tmp_path)  # a directory
    (tmp_path / "empty").write_text("\n \n")
    with pytest.raises(BadApiKeyFile, match="holds no key"):
        read_key_file(tmp_path / "empty")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BadApiKeyFile, match="not text"):
        read_key_file(tmp_path / "binary")


def test_only_loopback_is_served_without_a_key() -> None:
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "LOCALHOST"):
        check_exposure(host, None, allow_no_key=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(NoApiKey, match=f"refusing to serve the API on {host} without an API key"):
            check_exposure(host, None, allow_no_key=False)
        check_exposure(host, KEY, allow_no_key=False)
        check_exposure(host, None, allow_no_key=True)


# -- the command ----------------------------------------------------------------------------


def test_api_beyond_loopback_without_a_key_refuses_to_start() -> None:
    done = _run_api("--host", "0.0.0.0", "--port", str(free_port()), "--nats", f"nats://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "error: NoApiKey: refusing to serve the API on 0.0.0.0 without an API key" in done.stderr
    assert "--api-key-file" in done.stderr and "--allow-no-key" in done.stderr
    assert "exojet API on" not in done.stdout  # refused before anything else


def test_api_with_an_unreadable_key_file_refuses_to_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-key"
    done = _run_api("--api-key-file", str(missing), "--nats", f"nats://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert f"error: BadApiKeyFile: cannot read API key file {missing}" in done.stderr


def test_api_key_and_key_file_are_exclusive(tmp_path: Path) -> None:
    done = _run_api("--api-key", KEY, "--api-key-file", str(tmp_path / "k"))
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr


def test_api_open_beyond_loopback_with_allow_no_key_warns(
    nats_server: NatsServer, tmp_path: Path, api_proc: list[subprocess.Popen[bytes]]
) -> None:
    port, log = free_port(), tmp_path / "api.log"
    # An empty key is no key (a key in the test's own environment must not count).
    proc = start_api(port, "--host", "0.0.0.0", "--allow-no-key", "--nats", nats_server.url, log=log, env=NO_KEY)
    api_proc.append(proc)
    assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=15).status_code == 200
    assert "with no API key (--allow-no-key)" in log.read_text()


@pytest.mark.parametrize("source", ["env", "file"])
def test_api_key_from_the_environment_or_a_file_is_required_and_not_on_the_command_line(
    source: str, nats_server: NatsServer, tmp_path: Path, api_proc: list[subprocess.Popen[bytes]]
) -> None:
    port, log = free_port(), tmp_path / "api.log"
    args = ["--host", "0.0.0.0", "--nats", nats_server.url]
    if source == "env":
        env = {API_KEY_ENV: KEY}
    else:
        (tmp_path / "key").write_text(KEY + "\n")
        args += ["--api-key-file", str(tmp_path / "key")]
        env = NO_KEY
    proc = start_api(port, *args, log=log, env=env)
    api_proc.append(proc)
    guarded = f"http://127.0.0.1:{port}/openapi.json"
    assert httpx.get(guarded, timeout=5).status_code == 401
    assert httpx.get(guarded, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    assert httpx.get(guarded, headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200
    assert KEY not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
    assert "no API key" not in log.read_text()


# -- exojet up's API ------------------------------------------------------------------------


def test_up_with_its_api_beyond_loopback_and_no_key_refuses_before_starting_anything(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exojet.cli.main", "up", "--api-host", "0.0.0.0", "--port", str(free_port())]
        + ["--store-dir", str(tmp_path / "nats"), "--models-dir", str(tmp_path / "models")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert done.returncode == 1
    assert "error: NoApiKey: refusing to serve the API on 0.0.0.0 without an API key" in done.stderr
    assert "--api-host 127.0.0.1" in done.stderr
    assert not (tmp_path / "nats").exists() and not (tmp_path / "models").exists()


def test_up_hands_its_api_the_key_in_the_environment_not_the_command_line() -> None:
    args, env = ApiOptions(host="0.0.0.0", key=KEY).child("nats://127.0.0.1:4222", 52415)
    assert KEY not in " ".join(args)
    assert args[args.index("--host") + 1] == "0.0.0.0" and "--allow-no-key" not in args
    assert env is not None and env[API_KEY_ENV] == KEY
    args, env = ApiOptions(host="0.0.0.0", allow_no_key=True).child("nats://127.0.0.1:4222", 52415)
    assert "--allow-no-key" in args and env is None
    assert ApiOptions().url(52415) == "http://127.0.0.1:52415"
    assert ApiOptions(host="::").url(1) == "http://127.0.0.1:1"
    assert ApiOptions(host="::1").url(1) == "http://[::1]:1"
