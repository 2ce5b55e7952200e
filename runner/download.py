"""Model download: put a Hugging Face repo into the models directory, resumably.

`download_model` returns the model's folder (`models.store.model_dir`). It never
touches the network when the folder is already complete or when the Hugging Face
cache holds the model (the cache is hard-linked or copied in). Otherwise it reads
the repo's file list (sizes, hashes, commit) through `huggingface_hub` and streams
the files itself: `huggingface_hub` 2.x writes each attempt to a uniquely named
temporary file that it deletes on failure, so it cannot resume across retries,
and resuming a multi-GB shard after a dropped connection is the point here.

Files land in a staging folder `MODELS/.partial/<org--name>@<commit>/` as
`<file>.incomplete`, are checked against the Hub's sha256 (LFS) or git blob id,
renamed, and the whole folder is renamed into place at the end: a failed or
interrupted download never looks complete, and the next attempt (even after a
restart) resumes from the bytes already on disk with HTTP Range requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import inspect
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar
from urllib.parse import quote

import httpx2
from huggingface_hub import HfApi, get_token, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from loguru import logger

from exojet.models.store import InvalidModelId, is_complete, model_dir

if TYPE_CHECKING:
    from loguru import Logger

T = TypeVar("T")

ErrorType = Literal["InvalidModelId", "ModelNotFound", "Unauthorized", "DownloadFailed", "Offline"]

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
DEFAULT_ENDPOINT = "https://huggingface.co"
PARTIAL_DIR = ".partial"
_CHUNK = 1024 * 1024
# The commit names the staging folder, so it must be a plain name (the Hub sends 40 hex digits).
_SAFE_COMMIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# HTTP statuses worth retrying: the Hub or its CDN being busy or briefly down.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class DownloadStatus:
    """Progress of one model download, in bytes and files, counting resumed bytes."""

    model_id: str
    downloaded_bytes: int
    total_bytes: int
    completed_files: int
    total_files: int


ProgressCallback = Callable[[DownloadStatus], Awaitable[None] | None]


class DownloadError(Exception):
    """A download that failed for a reason a person can act on.

    `error_type` is one of "InvalidModelId", "ModelNotFound", "Unauthorized",
    "DownloadFailed" (transient errors outlasted the retries) or "Offline".
    """

    def __init__(self, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type: ErrorType = error_type
        self.message = message

    def __reduce__(self) -> tuple[type[DownloadError], tuple[ErrorType, str]]:
        # Keeps both fields when the error crosses a process boundary.
        return (DownloadError, (self.error_type, self.message))


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff for transient errors.

    `max_attempts` counts consecutive failures that made no progress, so a long
    download over a flaky link keeps going while a dead endpoint gives up after
    about `sum(delays)` seconds (0.2 + 0.4 + ... capped at 5 s: ~16 s by default).
    """

    base_delay: float = 0.2
    max_delay: float = 5.0
    max_attempts: int = 8

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row, jittered so runners spread out."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)


class _Transient(Exception):
    """A failure worth retrying (server error, dropped connection, bad checksum)."""


class _Cancelled(Exception):
    """The asyncio caller went away; the worker threads stop at the next chunk."""


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import)."""
    if env := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "huggingface" / "hub"


def _wanted(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _folder_status(model_id: str, folder: Path) -> DownloadStatus:
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    return DownloadStatus(model_id, size, size, len(files), len(files))


class _Job:
    """One download, run in worker threads; the asyncio side only reads `status()`."""

    def __init__(
        self,
        model_id: str,
        final: Path,
        revision: str | None,
        patterns: tuple[str, ...],
        retry: RetryPolicy,
        max_workers: int,
        timeout: float,
    ) -> None:
        self.model_id = model_id
        self.final = final
        self.revision = revision
        self.patterns = patterns
        self.retry = retry
        self.max_workers = max_workers
        self.timeout = timeout
        self.partial_root = final.parent / PARTIAL_DIR
        self.endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.offline = _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
        self.cancel = threading.Event()
        self.headers: dict[str, str] = {}
        self.log = logger.bind(model_id=model_id)
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._done: set[str] = set()

    def status(self) -> DownloadStatus:
        """A consistent snapshot of the counters (called from the event loop)."""
        with self._lock:
            return DownloadStatus(
                self.model_id,
                sum(self._bytes.values()),
                sum(self._sizes.values()),
                len(self._done),
                len(self._sizes),
            )

    def run(self) -> Path:
        """Make `final` complete: already there, adopted from the HF cache, or downloaded."""
        try:
            self._run_locked()
        except OSError as exc:
            raise DownloadError(
                "DownloadFailed",
                f"model {self.model_id}: cannot write the models directory {self.final.parent}: {exc}",
            ) from exc
        return self.final

    def _run_locked(self) -> None:
        self.partial_root.mkdir(parents=True, exist_ok=True)
        with self._exclusive(self.partial_root / f"{self.final.name}.lock"):
            if is_complete(self.final):
                self._set_from_folder(self.final)
                return
            if self._adopt_from_hf_cache():
                return
            if self.offline:
                raise DownloadError(
                    "Offline",
                    f"model {self.model_id} is neither in {self.final} nor in the Hugging Face cache "
                    f"{_hf_cache_dir()}, and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to download it, "
                    "or copy the model there",
                )
            self._download()

    @contextlib.contextmanager
    def _exclusive(self, lock_path: Path) -> Iterator[None]:
        """Hold an flock so two runners sharing a models dir never write the same files."""
        with lock_path.open("a") as handle:
            waiting_logged = False
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waiting_logged:
                        self.log.info("waiting for another process downloading {}", self.model_id)
                        waiting_logged = True
                    if self.cancel.wait(0.2):
                        raise _Cancelled() from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _set_from_folder(self, folder: Path) -> None:
        with self._lock:
            for p in folder.rglob("*"):
                if p.is_file():
                    name = p.relative_to(folder).as_posix()
                    self._sizes[name] = self._bytes[name] = p.stat().st_size
                    self._done.add(name)

    def _adopt_from_hf_cache(self) -> bool:
        """Link (or copy) a complete snapshot from the HF cache into the models dir."""
        cache = _hf_cache_dir()
        hit = try_to_load_from_cache(self.model_id, "config.json", cache_dir=cache, revision=self.revision)
        if not isinstance(hit, str):
            return False
        snapshot = Path(hit).parent
        if not is_complete(snapshot):
            return False
        staging = self.partial_root / f"{self.final.name}.{uuid.uuid4().hex[:8]}.adopt"
        staging.mkdir(parents=True)
        try:
            for src in snapshot.rglob("*"):
                name = src.relative_to(snapshot).as_posix()
                if not src.is_file() or not _wanted(name, self.patterns):
                    continue
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                blob = src.resolve()
                try:
                    # A hard link shares the cache's blob (no extra disk) and, unlike a
                    # symlink, survives the user cleaning their HF cache.
                    os.link(blob, dest)
                except OSError:
                    shutil.copyfile(blob, dest)
            self._publish(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._set_from_folder(self.final)
        self.log.info("model {} taken from the Hugging Face cache {}", self.model_id, snapshot)
        return True

    def _publish(self, staging: Path) -> None:
        """Swap `staging` in as the model folder; anything there before was incomplete."""
        if self.final.exists():
            old = self.partial_root / f"{self.final.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(self.final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, self.final)

    def _download(self) -> None:
        token = get_token()
        self.headers = build_hf_headers(token=token or False)
        # Sizes must be exact for Range resumes and progress, so no compression.
        self.headers["Accept-Encoding"] = "identity"
        api = HfApi(endpoint=self.endpoint, token=token or False)
        info = self._with_retries(
            "the file list",
            lambda: api.model_info(self.model_id, revision=self.revision, files_metadata=True, timeout=self.timeout),
        )
        files = [s for s in info.siblings or [] if _wanted(s.rfilename, self.patterns)]
        names = {s.rfilename for s in files}
        if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
            found = ", ".join(sorted(s.rfilename for s in info.siblings or [])[:20]) or "no files"
            raise DownloadError(
                "ModelNotFound",
                f"model {self.model_id} at {self.endpoint} has no config.json with *.safetensors weights "
                f"matching {list(self.patterns)} that MLX can load (it has: {found}); pick an "
                "MLX/safetensors repo",
            )
        commit = info.sha or self.revision or "main"
        if not _SAFE_COMMIT.fullmatch(commit):
            raise DownloadError(
                "DownloadFailed",
                f"model {self.model_id}: {self.endpoint} sent an unusable commit id {commit!r}",
            )
        staging = self.partial_root / f"{self.final.name}@{commit}"
        for s in files:
            self._check_path(staging, s.rfilename)
            dest = staging / s.rfilename
            partial = dest.with_name(dest.name + ".incomplete")
            on_disk = dest.stat().st_size if dest.is_file() else partial.stat().st_size if partial.is_file() else 0
            with self._lock:
                self._sizes[s.rfilename] = s.size if s.size is not None else on_disk
                self._bytes[s.rfilename] = on_disk
                if dest.is_file():
                    self._done.add(s.rfilename)
        resumed = self.status()
        self.log.info(
            "downloading {} ({} files, {:.1f} MB) from {} at commit {}{}",
            self.model_id,
            resumed.total_files,
            resumed.total_bytes / 1e6,
            self.endpoint,
            commit[:12],
            f", resuming from {resumed.downloaded_bytes / 1e6:.1f} MB" if resumed.downloaded_bytes else "",
        )

        with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="download") as pool:
            futures = [pool.submit(self._fetch_file, staging, commit, s) for s in files]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                # One fatal error dooms the model: stop the other files at their next chunk.
                self.cancel.set()
                wait(futures)
                raise failed.exception()  # type: ignore[misc]

        if not is_complete(staging):
            raise DownloadError("DownloadFailed", f"model {self.model_id}: downloaded files do not form a model")
        self._publish(staging)
        for stale in self.partial_root.glob(f"{self.final.name}@*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.log.info("model {} downloaded to {}", self.model_id, self.final)

    @staticmethod
    def _check_path(staging: Path, name: str) -> None:
        dest = (staging / name).resolve()
        if not dest.is_relative_to(staging.resolve()) or name.startswith("/"):
            raise DownloadError("DownloadFailed", f"the Hub listed a file name {name!r} that escapes the model folder")

    def _with_retries(self, what: str, attempt: Callable[[], T], progress: Callable[[], int] | None = None) -> T:
        """Run `attempt`, retrying transient errors with backoff; map the rest to DownloadError."""
        failures = 0
        while True:
            if self.cancel.is_set():
                raise _Cancelled()
            before = progress() if progress else 0
            try:
                return attempt()
            except (DownloadError, _Cancelled):
                raise
            except Exception as exc:
                cause = self._classify(exc, what)
                after = progress() if progress else 0
                failures = 1 if after > before else failures + 1
                if failures >= self.retry.max_attempts:
                    raise DownloadError(
                        "DownloadFailed",
                        f"model {self.model_id}: fetching {what} from {self.endpoint} failed "
                        f"{failures} times in a row, last with {cause}; check the network or HF_ENDPOINT "
                        "and retry",
                    ) from exc
                delay = self.retry.delay(failures)
                self.log.warning(
                    "model {}: {} failed ({}), retry {} in {:.2f} s",
                    self.model_id,
                    what,
                    cause,
                    failures,
                    delay,
                )
                if self.cancel.wait(delay):
                    raise _Cancelled() from exc

    def _classify(self, exc: Exception, what: str) -> str:
        """Describe a transient error, or raise the DownloadError a person needs to see."""
        if isinstance(exc, _Transient):
            return str(exc)
        if isinstance(exc, OfflineModeIsEnabled):
            raise DownloadError(
                "Offline", f"model {self.model_id} is not on disk and Hugging Face offline mode is on: {exc}"
            ) from exc
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            status = exc.response.status_code
            code = exc.response.headers.get("X-Error-Code", "")
            if status in _TRANSIENT_STATUS:
                return f"HTTP {status}"
            if status in (401, 403):
                hint = (
                    " (the Hub also answers 401 for a repo that does not exist: check the id)"
                    if code == "RepoNotFound"
                    else ""
                )
                raise DownloadError(
                    "Unauthorized",
                    f"model {self.model_id} needs a token or access at {self.endpoint} (HTTP {status}): "
                    "set HF_TOKEN to a token that can read it, and accept the model's terms if it is "
                    f"gated{hint}",
                ) from exc
            if status == 404:
                subject = {
                    "RevisionNotFound": f"revision {self.revision or 'main'} of model {self.model_id}",
                    "EntryNotFound": f"{what} of model {self.model_id}",
                }.get(code, f"model {self.model_id}")
                raise DownloadError(
                    "ModelNotFound",
                    f"{subject} was not found at {self.endpoint}: check the id and the revision",
                ) from exc
            raise DownloadError(
                "DownloadFailed", f"model {self.model_id}: {what} answered HTTP {status}: {exc}"
            ) from exc
        if isinstance(exc, (httpx2.UnsupportedProtocol, httpx2.InvalidURL)):
            raise DownloadError(
                "DownloadFailed", f"HF_ENDPOINT {self.endpoint!r} is not a valid http(s) URL: {exc}"
            ) from exc
        if isinstance(exc, httpx2.TransportError):
            return f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError):
            reason = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
            raise DownloadError(
                "DownloadFailed",
                f"model {self.model_id}: cannot write {what} under {self.final.parent}: {reason}",
            ) from exc
        raise DownloadError("DownloadFailed", f"model {self.model_id}: {what} failed: {exc!r}") from exc

    def _fetch_file(self, staging: Path, commit: str, sibling: RepoSibling) -> None:
        name = sibling.rfilename
        dest = staging / name
        if dest.is_file():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".incomplete")
        url = f"{self.endpoint}/{self.model_id}/resolve/{quote(commit, safe='')}/{quote(name)}"

        def on_disk() -> int:
            with self._lock:
                return self._bytes[name]

        self._with_retries(name, lambda: self._stream(url, partial, sibling), progress=on_disk)
        os.replace(partial, dest)
        with self._lock:
            self._done.add(name)

    def _stream(self, url: str, partial: Path, sibling: RepoSibling) -> None:
        """One GET of a file, appending to `partial` from where it stopped, then verify it."""
        name = sibling.rfilename
        offset = partial.stat().st_size if partial.is_file() else 0
        if sibling.size is not None and offset > sibling.size:
            offset = 0
        hasher = self._hasher(sibling)
        if offset and hasher is not None:
            # Resuming: the hash must cover the bytes already on disk too.
            with partial.open("rb") as prefix:
                remaining = offset
                while remaining and (block := prefix.read(min(_CHUNK, remaining))):
                    hasher.update(block)
                    remaining -= len(block)

        if sibling.size is None or offset < sibling.size:
            headers = dict(self.headers)
            if offset:
                headers["Range"] = f"bytes={offset}-"
            timeout = httpx2.Timeout(self.timeout, connect=min(self.timeout, 10.0))
            with get_session().stream("GET", url, headers=headers, timeout=timeout) as response:
                if response.status_code == 416:
                    partial.unlink(missing_ok=True)
                    self._set_bytes(name, 0)
                    raise _Transient(f"{name}: the server refused to resume at byte {offset}")
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                if response.status_code != 206 and offset:
                    # The server ignored Range and sends the whole file: start over.
                    offset = 0
                    hasher = self._hasher(sibling)
                with partial.open("r+b" if partial.exists() else "wb") as out:
                    out.seek(offset)
                    out.truncate()
                    self._set_bytes(name, offset)
                    # No chunk_size: buffering would lose the bytes already received when the link drops.
                    for chunk in response.iter_bytes():
                        if self.cancel.is_set():
                            raise _Cancelled()
                        out.write(chunk)
                        if hasher is not None:
                            hasher.update(chunk)
                        with self._lock:
                            self._bytes[name] += len(chunk)

        size = partial.stat().st_size
        if sibling.size is not None and size != sibling.size:
            raise _Transient(f"{name}: got {size} of {sibling.size} bytes")
        if hasher is not None and hasher.hexdigest() != self._expected_hash(sibling):
            partial.unlink(missing_ok=True)
            self._set_bytes(name, 0)
            raise _Transient(f"{name}: checksum mismatch, downloading it again")
        if sibling.size is None:
            with self._lock:
                self._sizes[name] = size

    def _set_bytes(self, name: str, value: int) -> None:
        with self._lock:
            self._bytes[name] = value

    @staticmethod
    def _hasher(sibling: RepoSibling) -> hashlib._Hash | None:
        """The hash the Hub publishes for this file: sha256 for LFS, git's blob sha1 otherwise."""
        if sibling.lfs is not None:
            return hashlib.sha256()
        if sibling.blob_id is not None and sibling.size is not None:
            return hashlib.sha1(b"blob %d\0" % sibling.size)
        return None

    @staticmethod
    def _expected_hash(sibling: RepoSibling) -> str | None:
        return sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id


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
    retry: RetryPolicy = RetryPolicy(),
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

    job = _Job(
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
            # Mark the job's own outcome (its _Cancelled, usually) as seen: the caller's cancel wins.
            future.exception()
        raise

    path = future.result()
    await _report(on_progress, job.status(), log)
    return path
