"""The live page in a real browser (Debian's chromium, driven by Playwright), `/metrics`, and
`exojet replay --html` opened in the same browser. Screenshots are kept in the test's tmp dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from testbed import REPO
from tests.api_stack import API_KEY, ApiStack, start_stack

CHROMIUM = Path(os.environ.get("EXOJET_CHROMIUM", "/usr/bin/chromium"))
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# How soon a status change in the log must show on the page.
LIVE_WITHIN_S = 1.0

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ApiStack]:
    root = tmp_path_factory.mktemp("page")
    models = root / "models"
    shutil.copytree(tiny_model_dir, models / "local--tiny")
    s = start_stack(root, models)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM} (run-tests.sh installs it as root on Debian)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield b
        b.close()


def _page(browser: Any, errors: list[str], **options: Any) -> Any:
    context = browser.new_context(
        extra_http_headers={"Authorization": f"Bearer {API_KEY}"}, viewport={"width": 1280, "height": 1000}, **options
    )
    page = context.new_page()
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return page


def _log(stack: ApiStack) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stack.cli("replay", "--json").splitlines()]


def test_first_view_reads_without_scripts(stack: ApiStack, browser: Any) -> None:
    errors: list[str] = []
    page = _page(browser, errors, java_script_enabled=False)
    page.goto(f"http://127.0.0.1:{stack.port}/")
    assert page.locator("#runner-r1 td.status").inner_text() == "RunnerReady"
    instance = page.locator("#instances tbody tr").first
    assert "Ready" in instance.inner_text() and "local/tiny" in instance.inner_text()
    assert page.locator("#conn").inner_text().startswith("static view")
    page.context.close()
    assert errors == []


def test_live_page_status_chat_timeline(
    stack: ApiStack, browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shots = tmp_path_factory.mktemp("screenshots")
    errors: list[str] = []
    page = _page(browser, errors)
    page.goto(f"http://127.0.0.1:{stack.port}/")
    assert page.locator("#runner-r1 td.status").inner_text() == "RunnerReady"
    page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=10_000)

    # A status change in the log: a second runner registers and goes Idle. The page notes
    # (by its own clock, the same machine's) when its row first shows RunnerIdle.
    page.evaluate(
        """() => new MutationObserver((_, obs) => {
            const cell = document.querySelector('#runner-r2 td.status');
            if (cell && cell.textContent === 'RunnerIdle') { window.r2IdleAt = Date.now() / 1000; obs.disconnect(); }
        }).observe(document.querySelector('#runners tbody'), {childList: true, subtree: true})"""
    )
    stack.runner("r2")
    page.wait_for_function("window.r2IdleAt !== undefined", timeout=60_000)
    seen_at = page.evaluate("window.r2IdleAt")
    idle = [
        e
        for e in _log(stack)
        if e["subject"] == "exo.events.runner.r2" and e["message"].get("runner_status", {}).get("type") == "RunnerIdle"
    ]
    assert idle, "r2 wrote no RunnerIdle"
    late = seen_at - idle[0]["time"]
    assert late < LIVE_WITHIN_S, f"the page showed r2 Idle {late:.2f} s after the log"
    print(f"the page showed r2 Idle {late * 1000:.0f} ms after the log got it")

    # r2 loads the model: its bar goes live from the runner's LoadProgress, layer by layer.
    shard = '"shard": {"model_id": "local/tiny"}'
    for task in ("DownloadModel", "LoadModel"):
        stack.cli("task", "r2", f'{{"type": "{task}", {shard}}}', "--wait", "--timeout", "90")
    page.wait_for_function(
        "document.querySelector('#load-r2 span')?.textContent.includes('layer 4 of 4')", timeout=10_000
    )
    assert "r2 load local/tiny: layer 4 of 4" in page.locator("#load-r2").inner_text()

    # A chat streams through the API into the page, a change at a time.
    page.evaluate(
        """() => { window.chatChanges = 0; new MutationObserver(() => window.chatChanges++)
            .observe(document.getElementById('chat-output'),
                     {childList: true, characterData: true, subtree: true}); }"""
    )
    assert page.locator("#chat-model").input_value() == "local/tiny"
    page.fill("#chat-input", "Hello there")
    page.click("#chat-form button")
    page.wait_for_function("document.getElementById('chat-output').dataset.state === 'done'", timeout=60_000)
    answer = page.locator("#chat-output").inner_text()
    assert answer and "error" not in answer
    assert page.evaluate("window.chatChanges") >= 2

    # Its task row says where its time went, and its runner's chart shows the tokens it made.
    page.wait_for_function(
        "[...document.querySelectorAll('#tasks tbody tr')].some(tr => tr.cells[1].textContent === 'ChatCompletion'"
        " && tr.cells[5].textContent.includes('prefill'))",
        timeout=10_000,
    )
    times = [t for t in page.locator("#tasks tbody tr td:nth-child(6)").all_inner_texts() if "prefill" in t]
    assert re.search(r"in its runner's queue, prefill [\d.]+ s \(\d+ prompt tokens\), decode [\d.]+ s", times[0])
    page.wait_for_function(
        "[...document.querySelectorAll('#load svg.rate-chart')].some(svg => Number(svg.dataset.peak) > 0)",
        timeout=20_000,
    )
    assert page.locator("#load tbody tr").count() == 2  # r1 and r2

    # The timeline: a mark per message, r1's lane; a click shows the message and the state after it.
    mark = page.locator('.tl-lane[data-lane="r1"] .tl-mark.st-good').last
    seq = mark.get_attribute("data-seq")
    mark.click()
    page.wait_for_function(f"document.getElementById('event-detail').dataset.seq === '{seq}'", timeout=10_000)
    detail = page.locator("#event-detail").inner_text()
    assert f"cluster state after seq {seq} (the Python fold)" in detail
    assert "runner r1:" in detail and '"subject": "exo.events.runner.r1"' in detail
    assert page.locator('.tl-lane[data-lane="supervisors"] .tl-mark').count() > 0
    page.screenshot(path=str(shots / "page.png"), full_page=True)
    page.context.close()
    assert errors == []
    print(f"screenshot: {shots / 'page.png'}")


def test_page_asks_for_the_api_key_once(stack: ApiStack, browser: Any) -> None:
    errors: list[str] = []
    # A plain browser: no Authorization header.
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    first = page.goto(f"http://127.0.0.1:{stack.port}/")
    assert first is not None and first.status == 401
    page.fill("input[name=key]", "not-the-key")
    page.click("button[type=submit]")
    assert "That is not the API key." in page.content()
    page.fill("input[name=key]", API_KEY)
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('conn')?.textContent === 'live'", timeout=10_000)
    assert page.locator("#runner-r1 td.status").inner_text() == "RunnerReady"
    [cookie] = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and API_KEY not in cookie["value"]
    # The chat box streams through the API on the cookie alone.
    page.fill("#chat-input", "Hello there")
    page.click("#chat-form button")
    page.wait_for_function("document.getElementById('chat-output').dataset.state === 'done'", timeout=60_000)
    assert "error" not in page.locator("#chat-output").inner_text()
    context.close()
    assert errors == []
    # Without the key or the cookie the API itself still answers 401.
    assert httpx.get(f"http://127.0.0.1:{stack.port}/v1/models", timeout=10).status_code == 401


def test_metrics(stack: ApiStack) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    base = f"http://127.0.0.1:{stack.port}"
    chat = {"model": "local/tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    for _ in range(2):
        assert httpx.post(f"{base}/v1/chat/completions", json=chat, headers=headers, timeout=60).status_code == 200
    text = httpx.get(f"{base}/metrics", headers=headers, timeout=30).text
    for kind, least in (("LoadModel", 1), ("ChatCompletion", 2)):
        done = re.search(rf'^exojet_tasks_total\{{status="Complete",type="{kind}"\}} (\S+)$', text, re.M)
        assert done is not None and float(done.group(1)) >= least, kind
    assert 'exojet_runners{status="RunnerReady"} 1.0' in text
    assert "exojet_projection_lag 0.0" in text  # the scrape waited for the fold to catch up
    assert "exojet_nats_reconnects 0.0" in text
    for name in ("exojet_first_token_seconds", "exojet_token_seconds", "exojet_tokens_per_second"):
        count = re.search(rf"^{name}_count (\S+)$", text, re.M)
        assert count is not None and float(count.group(1)) >= 2, name


def test_replay_html_report(stack: ApiStack, browser: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("report")
    report = out / "log.html"
    done = subprocess.run(
        [sys.executable, "-m", "exojet.cli.main", "replay", "--html", str(report), "--nats", stack.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    written = re.search(r": (\d+) messages, the cluster state embedded for the newest (\d+)", done.stdout)
    assert written is not None, done.stdout
    assert written.group(1) == written.group(2)  # a small log: every state fits under the cap
    assert "src=" not in report.read_text()  # self-contained: nothing fetched
    errors: list[str] = []
    page = _page(browser, errors)
    page.goto(report.as_uri())
    marks = page.locator(".tl-mark")
    assert marks.count() == int(written.group(1)) > 10
    marks.nth(2).click()
    page.wait_for_function("document.getElementById('event-detail').dataset.seq !== undefined", timeout=10_000)
    assert "cluster state after seq" in page.locator("#event-detail").inner_text()
    page.screenshot(path=str(out / "report.png"), full_page=True)
    page.context.close()
    assert errors == []
    print(f"screenshot: {out / 'report.png'}")
