"""exojet 0.1.0 in a venv of its own, for the tests that run old and new processes side by side.

Built once per machine from commit a554f59 (tag v0.1.0; a CI clone may not have the tag, the commit
is in main's history): a shared clone at that commit, its wheel built, installed into a venv at the
versions of that commit's constraints.txt. The venv is kept under a path keyed by the commit
(`$EXO_TEST_CACHE`, else ~/.cache/exojet-tests), so a second test run reuses it; a build that was
interrupted leaves no `complete` mark and is built again.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec

from testbed import REPO

OLD_COMMIT = "a554f59db3c41a749c5dad421521ab59173fb551"
OLD_VERSION = "0.1.0"
# pip resolves 0.1.0's dependencies from its own cache after the first build; the first on a
# loaded 2-core machine took 2 minutes.
BUILD_TIMEOUT_S = 900


def cache_root() -> Path:
    root = os.environ.get("EXO_TEST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "exojet-tests"


def old_python() -> Path:
    """The interpreter of a venv holding exojet 0.1.0 (built on first use, then reused)."""
    home = cache_root() / f"exojet-{OLD_VERSION}-{OLD_COMMIT[:12]}"
    home.mkdir(parents=True, exist_ok=True)
    python = home / "venv" / "bin" / "python"
    with open(home / "lock", "w") as lock:
        # Two test runs on one machine build it once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "complete").exists():
            _build(home)
            (home / "complete").write_text(OLD_COMMIT + "\n")
    return python


def _run(*args: str | Path, cwd: Path | None = None) -> None:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, args))} exited {done.returncode}: {(done.stdout + done.stderr)[-3000:]}"
        )


def _build(home: Path) -> None:
    shutil.rmtree(home / "venv", ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, dist = Path(tmp) / "src", Path(tmp) / "dist"
        _run("git", "clone", "--quiet", "--shared", "--no-checkout", REPO, src)
        _run("git", "-C", src, "checkout", "--quiet", OLD_COMMIT)
        _run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, src)
        [wheel] = dist.glob("exojet-*.whl")
        base = getattr(sys, "_base_executable", sys.executable)
        _run(base, "-m", "venv", home / "venv")
        pip = home / "venv" / "bin" / "pip"
        _run(pip, "install", "--quiet", "-c", src / "constraints.txt", wheel)
    _run(home / "venv" / "bin" / "python", "-c", f"import exojet; assert exojet.__version__ == {OLD_VERSION!r}")


# What 0.1.0 knows of each task: the fields of each tagged struct (a task carrying any other is a
# field it would ignore).
_FIELDS = """
import json, typing, msgspec
from exojet.bus import tasks
out = {}
for cls in typing.get_args(tasks.Task):
    out[cls.__struct_config__.tag] = sorted(f.encode_name for f in msgspec.structs.fields(cls))
print(json.dumps(out))
"""


def old_task_fields() -> dict[str, set[str]]:
    """Task type -> the field names (with `type`) exojet 0.1.0 reads in it."""
    done = subprocess.run([old_python(), "-c", _FIELDS], capture_output=True, text=True, timeout=60, check=True)
    return {tag: {"type", *names} for tag, names in msgspec.json.decode(done.stdout).items()}
