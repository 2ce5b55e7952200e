"""What the cut-off matrix (tests/test_cluster_cutoffs.py) adds to testbed/hosts_harness.py: an
`exojet api` on a host of its own, `exojet` commands run on the client host as a user types them,
a streamed chat through the API, and which node a process is connected to (the node's `/connz`).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
from nats.aio.client import Client as NATS

from exojet.bus import streams
from exojet.bus.envelope import Envelope
from exojet.bus.nats import client
from exojet.bus.ops import identities
from exojet.bus.ops.permissions import CLIENT
from testbed import REPO
from testbed.hosts_harness import NODES, Deployment
from testbed.netns import Host

API_PORT = 52415
API_KEY = "cutoff-test-key"
# The monitoring port `exojet nats` gives its server, on each node host's own loopback.
MONITOR_PORT = 8222


def start_api(d: Deployment, host: Host) -> None:
    """`exojet api` on `host` (beyond loopback, so with a key), as the `client` identity."""
    key_file = d.root / "api.key"
    key_file.write_text(API_KEY + "\n")
    args = ["api", "--host", host.address, "--port", str(API_PORT), "--api-key-file", str(key_file)]
    d.procs[host.name] = d._exojet(host, args, CLIENT)


def api_url(d: Deployment, host: Host) -> str:
    return f"http://{host.address}:{API_PORT}"


async def _in_ns(host: Host, *args: str, timeout: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", host.ns, *args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{' '.join(args)} on {host.name} did not end within {timeout} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class Ran:
    """One `exojet` command run to its end: exit code, output, and when it ended."""

    code: int
    out: str
    err: str
    ended: float


async def cli(d: Deployment, host: Host, *args: str, timeout: float = 120.0) -> Ran:
    """`exojet ARGS` on `host` with the cluster's server list and the `client` identity."""
    env = [f"NATS_URL={d.url}", f"EXOJET_NKEY={identities.seed_path(d.auth, CLIENT)}"]
    code, out, err = await _in_ns(host, "env", *env, sys.executable, "-m", "exojet.cli.main", *args, timeout=timeout)
    return Ran(code, out, err, time.monotonic())


async def connected_node(d: Deployment, connection_name: str) -> str:
    """The node a connection named `connection_name` is on (asked again while it moves between nodes)."""
    async with asyncio.timeout(60):
        while True:
            for node in NODES:
                url = f"http://127.0.0.1:{MONITOR_PORT}/connz?limit=4096"
                code, out, _ = await _in_ns(d.lan[node], "curl", "-sf", "--max-time", "2", url, timeout=10)
                if code == 0 and any(c.get("name") == connection_name for c in json.loads(out)["connections"] or []):
                    return node
            await asyncio.sleep(0.2)  # poll: a reconnect has no event another process can wait on


class ApiChat:
    """A chat streamed through the API: its text, and when its last event came."""

    def __init__(self, base_url: str, prompt: str, max_tokens: int) -> None:
        self.base_url = base_url
        self.body = {
            "model": "local/tiny",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        self.text = ""
        self.chat_id: str | None = None
        self.first_chunk = asyncio.Event()
        self.ended = 0.0

    async def run(self, timeout: float = 180.0) -> str:
        """The whole answer; AssertionError naming the API's error event or status otherwise."""
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(timeout=timeout) as http:
            async with http.stream(
                "POST", f"{self.base_url}/v1/chat/completions", json=self.body, headers=headers
            ) as resp:
                if resp.status_code != 200:
                    raise AssertionError(f"API answered {resp.status_code}: {(await resp.aread()).decode()}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event: dict[str, Any] = json.loads(line[len("data: ") :])
                    if "error" in event:
                        raise AssertionError(f"the API's stream ended with an error: {event['error']}")
                    self.chat_id = event.get("id", self.chat_id)
                    for choice in event.get("choices", []):
                        self.text += choice.get("delta", {}).get("content") or ""
                    self.first_chunk.set()
        self.ended = time.monotonic()
        return self.text


async def stored_answer(nc: NATS, chat_id: str) -> str:
    """A chat's text as `EXO_CHUNKS` holds it: every index from 0 to its `done` chunk once, joined."""
    texts: dict[int, list[str]] = {}
    done: list[int] = []

    def on_chunk(env: Envelope) -> None:
        if env.subject.endswith(f".{chat_id}"):
            chunk = json.loads(env.data)
            texts.setdefault(chunk["index"], []).append(chunk.get("text", ""))
            if chunk.get("done"):
                done.append(chunk["index"])

    await client.replay(nc, on_chunk, stream=streams.CHUNKS_STREAM, timeout=60)
    assert len(done) == 1 and sorted(texts) == list(range(done[0] + 1)), (chat_id, sorted(texts), done)
    assert all(len(copies) == 1 for copies in texts.values()), f"{chat_id}: an index stored twice"
    return "".join(texts[i][0] for i in range(done[0] + 1))
