"""Every wait says what it waits for: an instance the planner cannot place yet names who holds the
runners (`place --wait`, `exojet state`, `explain`, the page), a chat for a model with no instance
names the model and what is placed. The reason comes from the supervisors' queries (the planner's
own rule), never from the log."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx2 as httpx
import pytest

from testbed.tiny_model import write_tiny_llama
from tests.api_stack import API_KEY, ApiStack, start_stack
from tests.procs import REPO

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    root = tmp_path_factory.mktemp("waits")
    write_tiny_llama(root / "models" / "local--tiny")
    s = start_stack(root, root / "models")
    yield s
    s.close()


def _run(stack: ApiStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exojet.cli.main", *args, "--nats", stack.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_instance_with_no_free_runner_says_who_holds_them_everywhere(stack: ApiStack) -> None:
    placed = _run(stack, "place", "nobody/none", "--wait", "--timeout", "3")
    instance_id = placed.stdout.strip()
    holds = "waiting for a free runner: r1 serves inst-"
    assert placed.returncode == 1 and f"{instance_id}: Placing ({holds}" in placed.stderr, placed.stderr
    assert "was not Ready within 3" in placed.stderr

    state = _run(stack, "state")
    [row] = [line for line in state.stdout.splitlines() if line.startswith(instance_id)]
    assert "Placing" in row and holds in row

    explained = _run(stack, "explain", instance_id)
    assert f"cause: {instance_id} (nobody/none) is Placing since seq" in explained.stdout
    assert holds in explained.stdout

    page = httpx.get(f"http://127.0.0.1:{stack.port}/", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert holds in page.text
    _run(stack, "delete", instance_id)


def test_a_chat_for_a_model_with_no_instance_names_it_and_what_is_placed(stack: ApiStack) -> None:
    chat = _run(stack, "chat", "--model", "nobody/none", "hi")
    assert chat.returncode == 1
    assert "no instance of nobody/none is placed (placed: local/tiny Ready on r1)" in chat.stderr, chat.stderr
    assert "`exojet place nobody/none`" in chat.stderr


def test_what_waits_is_read_from_the_planner_not_the_log(stack: ApiStack) -> None:
    # Nothing in the log says "waiting": the reason is the projection's, as of when it is asked.
    replay = _run(stack, "replay", "--json")
    assert "waiting for" not in replay.stdout
