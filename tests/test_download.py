"""runner.download against a real local HTTP endpoint that speaks the Hub's protocol."""

from __future__ import annotations

import asyncio
import itertools
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from exojet.models.store import is_complete, model_dir
from exojet.runner.download import DownloadError, DownloadStatus, RetryPolicy, download_model
from testbed.tiny_model import write_tiny_llama
from tests.hf_endpoint import HFEndpoint

REPO = "org/tiny"
WEIGHTS = "model.safetensors"
FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05, max_attempts=4)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture
def endpoint(tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HFEndpoint]:
    with HFEndpoint() as ep:
        ep.add_repo(REPO, tiny_src)
        monkeypatch.setenv("HF_ENDPOINT", ep.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        for var in (
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_HUB_OFFLINE",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
        ):
            monkeypatch.delenv(var, raising=False)
        yield ep


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


def assert_same_files(got: Path, want: Path) -> None:
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


@pytest.mark.timeout(30)
async def test_full_download_reports_monotonic_progress(endpoint: HFEndpoint, models: Path, tiny_src: Path) -> None:
    statuses: list[DownloadStatus] = []

    async def on_progress(status: DownloadStatus) -> None:
        statuses.append(status)

    path = await download_model(REPO, models, on_progress=on_progress, retry=FAST_RETRY)

    assert path == model_dir(models, REPO) and is_complete(path)
    assert_same_files(path, tiny_src)
    total = sum(p.stat().st_size for p in tiny_src.iterdir())
    final = statuses[-1]
    assert final == DownloadStatus(REPO, total, total, 5, 5)
    downloaded = [s.downloaded_bytes for s in statuses]
    assert downloaded == sorted(downloaded)
    assert all(s.total_bytes == total and s.total_files == 5 for s in statuses)
    # Every file fetched exactly once, and no staging folder left behind.
    assert sorted(r.filename for r in endpoint.requests if r.filename) == sorted(p.name for p in tiny_src.iterdir())
    assert list((models / ".partial").glob("org--tiny@*")) == []


@pytest.mark.timeout(30)
async def test_complete_local_model_makes_no_request(endpoint: HFEndpoint, models: Path) -> None:
    write_tiny_llama(models / "local--tiny")
    statuses: list[DownloadStatus] = []

    path = await download_model("local/tiny", models, on_progress=statuses.append)

    assert path == models.resolve() / "local--tiny"
    assert endpoint.requests == []
    assert len(statuses) == 1 and statuses[0].downloaded_bytes == statuses[0].total_bytes > 0


@pytest.mark.timeout(30)
async def test_model_in_hf_cache_is_linked_without_requests(
    endpoint: HFEndpoint, models: Path, tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf_home" / "hub"
    for f in tiny_src.iterdir():
        hf_hub_download(REPO, f.name, cache_dir=cache, endpoint=endpoint.url)
    seen = len(endpoint.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    path = await download_model(REPO, models, on_progress=None)

    assert len(endpoint.requests) == seen
    assert is_complete(path)
    assert_same_files(path, tiny_src)
    blob = (cache / "models--org--tiny" / "snapshots").glob(f"*/{WEIGHTS}").__next__().resolve()
    assert (path / WEIGHTS).stat().st_ino == blob.stat().st_ino


@pytest.mark.timeout(30)
async def test_offline_and_not_cached_fails_without_requests(
    endpoint: HFEndpoint, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as err:
        await download_model(REPO, models, on_progress=None)
    assert err.value.error_type == "Offline"
    assert REPO in err.value.message and "HF_HUB_OFFLINE" in err.value.message
    assert endpoint.requests == []


@pytest.mark.timeout(30)
async def test_server_errors_are_retried(endpoint: HFEndpoint, models: Path, tiny_src: Path) -> None:
    endpoint.fail(REPO, WEIGHTS, times=2)
    endpoint.fail(REPO, None, times=1)

    path = await download_model(REPO, models, on_progress=None, retry=FAST_RETRY)

    assert_same_files(path, tiny_src)
    assert [r.status for r in endpoint.file_requests(WEIGHTS)] == [500, 500, 200]
    assert [r.status for r in endpoint.requests if r.filename is None] == [500, 200]


@pytest.mark.timeout(30)
async def test_dropped_connection_resumes_with_range(endpoint: HFEndpoint, models: Path, tiny_src: Path) -> None:
    size = (tiny_src / WEIGHTS).stat().st_size
    endpoint.drop(REPO, WEIGHTS, after_bytes=size // 2)

    path = await download_model(REPO, models, on_progress=None, retry=FAST_RETRY)

    assert_same_files(path, tiny_src)
    first, second = endpoint.file_requests(WEIGHTS)
    assert first.range is None and first.bytes_sent == size // 2
    assert second.status == 206 and second.range is not None
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= size // 2
    assert endpoint.bytes_served(WEIGHTS) < 2 * size


@pytest.mark.timeout(30)
async def test_failed_download_is_incomplete_and_next_call_resumes(
    endpoint: HFEndpoint, models: Path, tiny_src: Path
) -> None:
    size = (tiny_src / WEIGHTS).stat().st_size
    endpoint.drop(REPO, WEIGHTS, after_bytes=size // 3, times=1)
    one_shot = RetryPolicy(base_delay=0.01, max_delay=0.01, max_attempts=1)

    with pytest.raises(DownloadError) as err:
        await download_model(REPO, models, on_progress=None, retry=one_shot)
    assert err.value.error_type == "DownloadFailed" and WEIGHTS in err.value.message
    assert not is_complete(model_dir(models, REPO))

    path = await download_model(REPO, models, on_progress=None, retry=one_shot)
    assert_same_files(path, tiny_src)
    retry = endpoint.file_requests(WEIGHTS)[-1]
    assert retry.range == f"bytes={size // 3}-" and retry.bytes_sent == size - size // 3


@pytest.mark.timeout(30)
async def test_corrupt_partial_is_detected_and_fetched_again(
    endpoint: HFEndpoint, models: Path, tiny_src: Path
) -> None:
    size = (tiny_src / WEIGHTS).stat().st_size
    endpoint.drop(REPO, WEIGHTS, after_bytes=size // 2)
    with pytest.raises(DownloadError):
        await download_model(REPO, models, on_progress=None, retry=RetryPolicy(0.01, 0.01, 1))
    (partial,) = (models / ".partial").glob(f"org--tiny@*/{WEIGHTS}.incomplete")
    with partial.open("r+b") as f:
        f.write(b"garbage!")

    path = await download_model(REPO, models, on_progress=None, retry=FAST_RETRY)

    assert_same_files(path, tiny_src)
    assert [r.range for r in endpoint.file_requests(WEIGHTS)[1:]] == [f"bytes={size // 2}-", None]


@pytest.mark.timeout(30)
async def test_unknown_repo_is_model_not_found_without_retries(endpoint: HFEndpoint, models: Path) -> None:
    with pytest.raises(DownloadError) as err:
        await download_model("org/missing", models, on_progress=None, retry=FAST_RETRY)
    assert err.value.error_type == "ModelNotFound"
    assert "org/missing" in err.value.message and endpoint.url in err.value.message
    assert len(endpoint.requests) == 1


@pytest.mark.timeout(30)
async def test_unknown_revision_is_model_not_found(endpoint: HFEndpoint, models: Path) -> None:
    with pytest.raises(DownloadError) as err:
        await download_model(REPO, models, revision="v9", on_progress=None, retry=FAST_RETRY)
    assert err.value.error_type == "ModelNotFound" and "revision v9" in err.value.message
    assert len(endpoint.requests) == 1


@pytest.mark.timeout(30)
async def test_token_required(
    endpoint: HFEndpoint, models: Path, tiny_src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint.add_repo("org/gated", tiny_src, token="hf_secret")

    with pytest.raises(DownloadError) as err:
        await download_model("org/gated", models, on_progress=None, retry=FAST_RETRY)
    assert err.value.error_type == "Unauthorized" and "HF_TOKEN" in err.value.message
    assert len(endpoint.requests) == 1

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = await download_model("org/gated", models, on_progress=None, retry=FAST_RETRY)
    assert_same_files(path, tiny_src)
    assert endpoint.requests[-1].authorization == "Bearer hf_secret"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bad_id", ["../etc", "a/b/c", "/abs", ""])
async def test_bad_ids_fail_without_requests(endpoint: HFEndpoint, models: Path, bad_id: str) -> None:
    with pytest.raises(DownloadError) as err:
        await download_model(bad_id, models, on_progress=None)
    assert err.value.error_type == "InvalidModelId" and repr(bad_id) in err.value.message
    assert endpoint.requests == []


@pytest.mark.timeout(30)
async def test_unreachable_endpoint_fails_after_bounded_retries(
    endpoint: HFEndpoint, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = HFEndpoint()
    dead.close()
    monkeypatch.setenv("HF_ENDPOINT", dead.url)
    with pytest.raises(DownloadError) as err:
        await download_model(REPO, models, on_progress=None, retry=FAST_RETRY)
    assert err.value.error_type == "DownloadFailed"
    assert dead.url in err.value.message and "4 times" in err.value.message


@pytest.mark.timeout(30)
async def test_slow_body_keeps_event_loop_responsive(endpoint: HFEndpoint, models: Path, tiny_src: Path) -> None:
    endpoint.slow(REPO, WEIGHTS, chunk_delay=0.03)
    loop = asyncio.get_running_loop()
    ticks: list[float] = []
    reports: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(loop.time())
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    try:
        path = await download_model(REPO, models, on_progress=lambda s: reports.append(loop.time()))
    finally:
        ticking.cancel()

    assert_same_files(path, tiny_src)
    elapsed = ticks[-1] - ticks[0]
    assert elapsed > 1.0
    # A blocked loop would stall for the whole download (over a second); allow for a busy CI box.
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 0.5
    # Throttled: at least one report mid-download, none closer than the interval (bar the final one).
    assert len(reports) >= 2
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(reports[:-1]))


@pytest.mark.timeout(30)
async def test_cancel_stops_the_download_and_keeps_the_partial(
    endpoint: HFEndpoint, models: Path, tiny_src: Path
) -> None:
    size = (tiny_src / WEIGHTS).stat().st_size
    endpoint.slow(REPO, WEIGHTS, chunk_delay=0.05)
    moving = asyncio.Event()

    def on_progress(status: DownloadStatus) -> None:
        # More than all the small files together: the weights have started to arrive.
        if status.downloaded_bytes > status.total_bytes - size:
            moving.set()

    task = asyncio.create_task(download_model(REPO, models, on_progress=on_progress, progress_interval=0.05))
    await asyncio.wait_for(moving.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # The worker thread has stopped by now, so the partial file no longer changes.
    assert not is_complete(model_dir(models, REPO))
    (partial,) = (models / ".partial").glob(f"org--tiny@*/{WEIGHTS}.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < size

    endpoint.slow(REPO, WEIGHTS, chunk_delay=0.0)
    path = await download_model(REPO, models, on_progress=None)
    assert_same_files(path, tiny_src)
    assert endpoint.file_requests(WEIGHTS)[-1].range == f"bytes={kept}-"


@pytest.mark.timeout(30)
async def test_repo_without_safetensors_is_rejected_before_downloading(
    endpoint: HFEndpoint, models: Path, tmp_path: Path
) -> None:
    gguf_only = tmp_path / "gguf_only"
    gguf_only.mkdir()
    (gguf_only / "config.json").write_text("{}")
    (gguf_only / "model.gguf").write_bytes(b"GGUF" + bytes(64))
    endpoint.add_repo("org/gguf", gguf_only)

    with pytest.raises(DownloadError) as err:
        await download_model("org/gguf", models, on_progress=None)
    assert err.value.error_type == "ModelNotFound" and "model.gguf" in err.value.message
    assert [r.filename for r in endpoint.requests] == [None]


@pytest.mark.timeout(10)
def test_download_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(DownloadError("Unauthorized", "model x needs a token")))
    assert (err.error_type, err.message, str(err)) == (
        "Unauthorized",
        "model x needs a token",
        "model x needs a token",
    )
