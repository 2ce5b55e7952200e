"""Schemathesis (`--checks all`) finds nothing against /openapi.json on a real stack.

The stack serves the tiny model on llama.cpp, the engine that serves every field the document
describes first (tools, response_format; logprobs and n come to it before MLX): schemathesis's
positive-data check counts a 400 to a body the document allows as a failure, whatever the document
says of that 400, and an engine that cannot do a field answers one. The API's max_tokens limit is
small so that generated chats stay quick to answer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from testbed import REPO
from tests.api_stack import API_KEY, MODEL, ApiStack, start_stack
from tests.gguf_tiny import as_gguf

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[ApiStack]:
    folder = tmp_path / "models" / "local--tiny"
    shutil.copytree(tiny_model_dir, folder)
    # A GGUF in the folder: the runner serves it on llama.cpp.
    as_gguf(tiny_model_dir, folder / "model.gguf")
    s = start_stack(tmp_path, tmp_path / "models", api_args=("--max-tokens-limit", "16"))
    yield s
    s.close()


def test_schemathesis_finds_nothing_against_openapi_json(stack: ApiStack, tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    schema = _wait_schema(f"http://127.0.0.1:{stack.port}/openapi.json", auth)
    assert schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["examples"] == [MODEL]
    schema_file = tmp_path / "openapi.json"
    schema_file.write_text(json.dumps(schema))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            str(schema_file),
            "--url",
            f"http://127.0.0.1:{stack.port}",
            "--header",
            f"Authorization: Bearer {API_KEY}",
            "--max-examples",
            "10",
            "--checks",
            "all",
            "--seed",
            "1",
            "--no-color",
        ],
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
        # The rules no JSON Schema can state, kept in the positive cases (tests/schemathesis_hooks.py).
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    # The failures first: a long generated body would push them out of the message.
    report = run.stdout[run.stdout.find("FAILURES") :]
    assert run.returncode == 0, report[:8000] + run.stderr[-2000:]


def _wait_schema(url: str, headers: dict[str, str], timeout: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return httpx.get(url, headers=headers, timeout=1.0).raise_for_status().json()
        except httpx.HTTPError:
            time.sleep(0.1)  # poll interval while the API process starts
    raise AssertionError(f"no schema at {url} within {timeout} s")
