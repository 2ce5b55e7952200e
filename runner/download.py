"""Model download: put a Hugging Face repo into the models directory, resumably.

`download_model` returns the model's folder (`models.store.model_dir`). It never
touches the network when the folder is already complete or when the Hugging Face
cache holds the model (the cache is hard-linked or copied in). Otherwise it reads
the repo's file list (sizes, hashes, commit) through `huggingface_hub` and streams
the files itself: `huggingface_hub` 2.x writes each attempt to a uniquely named
temporary file that it deletes on failure, so it cannot resume across retries,
and resuming a multi-GB shard after a dropped connection is the point here.

The parts: this module runs the job from the event loop and reports progress;
`download_job.py` owns the models-dir lock, the HF cache, the staging folder and
the file list; `download_transfer.py` the HTTP GETs (Range resume, retries, error
classification); `download_verify.py` the hashes; `download_common.py` the shared
types and counters.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from exojet.models.store import InvalidModelId, is_complete, model_dir
from exojet.runner.download_common import DownloadError, DownloadStatus, ProgressCallback, RetryPolicy
from exojet.runner.download_job import DownloadJob

if TYPE_CHECKING:
    from loguru import Logger

__all__ = ["DEFAULT_ALLOW_PATTERNS", "DownloadError", "DownloadStatus", "RetryPolicy", "download_model"]

# What mlx-lm needs to load a model: weights, configs, tokenizer files and chat
# templates (and `*.py` for repos whose tokenizer needs `trust_remote_code`, as
# mlx-lm's own downloader does). Never `.bin`/`.pth`/`.gguf` duplicates.
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.json",
    "*.safetensors",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jsonl",
    "*.jinja",
    "*.py",
)

DEFAULT_RETRY = RetryPolicy()


def _folder_status(model_id: str, folder: Path) -> DownloadStatus:
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    return DownloadStatus(model_id, size, size, len(files), len(files))


async def _report(callback: ProgressCallback | None, status: DownloadStatus, log: Logger) -> None:
    if callback is None:
        return
    try:
        result = callback(status)
        if inspect.isawaitable(result):
            await result
    except Exception:
        # Progress is advisory: a failed report (say, the bus is briefly away) must not fail the download.
        log.opt(exception=True).warning("progress callback failed")


async def download_model(
    model_id: str,
    models_dir: Path,
    *,
    revision: str | None = None,
    on_progress: ProgressCallback | None = None,
    allow_patterns: list[str] | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    max_workers: int = 4,
    timeout: float = 30.0,
    progress_interval: float = 0.5,
    log_interval: float = 5.0,
) -> Path:
    """Make `model_id` complete in `models_dir` and return its folder.

    No network when the folder is complete or the Hugging Face cache holds the
    model; otherwise downloads from `$HF_ENDPOINT` (with `$HF_TOKEN`) in worker
    threads, so the event loop stays free. `on_progress` (sync or async) gets a
    `DownloadStatus` at most every `progress_interval` seconds while bytes move,
    plus one final call. Transient errors are retried per `retry`, resuming
    partial files; everything else raises `DownloadError` at once.
    """
    log = logger.bind(model_id=model_id)
    try:
        final = model_dir(models_dir, model_id)
    except InvalidModelId as exc:
        raise DownloadError("InvalidModelId", str(exc)) from exc

    if is_complete(final):
        await _report(on_progress, _folder_status(model_id, final), log)
        return final

    job = DownloadJob(
        model_id,
        final,
        revision,
        tuple(allow_patterns) if allow_patterns is not None else DEFAULT_ALLOW_PATTERNS,
        retry,
        max_workers,
        timeout,
    )
    future = asyncio.ensure_future(asyncio.to_thread(job.run))
    started = last_log = time.monotonic()
    last_status: DownloadStatus | None = None
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=progress_interval)
            if done:
                break
            status = job.status()
            if status != last_status:
                await _report(on_progress, status, log)
                last_status = status
            now = time.monotonic()
            if now - last_log >= log_interval and status.total_bytes:
                last_log = now
                log.info(
                    "downloading {}: {:.1f}/{:.1f} MB ({:.0f}%), {}/{} files, {:.1f} MB/s",
                    model_id,
                    status.downloaded_bytes / 1e6,
                    status.total_bytes / 1e6,
                    100 * status.downloaded_bytes / status.total_bytes,
                    status.completed_files,
                    status.total_files,
                    status.downloaded_bytes / 1e6 / (now - started),
                )
    except asyncio.CancelledError:
        # The thread cannot be killed: tell it to stop, and wait so nothing writes after we return.
        job.cancel.set()
        await asyncio.wait({future})
        if not future.cancelled():
            # Mark the job's own outcome (its DownloadCancelled, usually) as seen: the caller's cancel wins.
            future.exception()
        raise

    path = future.result()
    await _report(on_progress, job.status(), log)
    return path
