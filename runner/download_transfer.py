"""HTTP transfer of a model's files: one GET per attempt, resumed with a Range
request from the bytes already on disk, retried with backoff while errors are
transient, and every other error turned into the `DownloadError` a person needs.

Runs in worker threads; `cancel` stops every transfer at its next chunk.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import httpx2
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import get_session, hf_raise_for_status
from loguru import logger

from exojet.runner import download_verify
from exojet.runner.download_common import Counters, DownloadCancelled, DownloadError, RetryPolicy, TransientError

T = TypeVar("T")

# HTTP statuses worth retrying: the Hub or its CDN being busy or briefly down.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class Transfer:
    """The HTTP side of one model's download (`counters` shows its progress)."""

    def __init__(
        self,
        model_id: str,
        revision: str | None,
        endpoint: str,
        models_dir: Path,
        retry: RetryPolicy,
        timeout: float,
        counters: Counters,
    ) -> None:
        self.model_id = model_id
        self.revision = revision
        self.endpoint = endpoint
        self.models_dir = models_dir
        self.retry = retry
        self.timeout = timeout
        self.counters = counters
        self.cancel = threading.Event()
        self.headers: dict[str, str] = {}
        self.log = logger.bind(model_id=model_id)

    def with_retries(self, what: str, attempt: Callable[[], T], progress: Callable[[], int] | None = None) -> T:
        """Run `attempt`, retrying transient errors with backoff; map the rest to DownloadError."""
        failures = 0
        while True:
            if self.cancel.is_set():
                raise DownloadCancelled()
            before = progress() if progress else 0
            try:
                return attempt()
            except (DownloadError, DownloadCancelled):
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
                    raise DownloadCancelled() from exc

    def _classify(self, exc: Exception, what: str) -> str:
        """Describe a transient error, or raise the DownloadError a person needs to see."""
        if isinstance(exc, TransientError):
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
                f"model {self.model_id}: cannot write {what} under {self.models_dir}: {reason}",
            ) from exc
        raise DownloadError("DownloadFailed", f"model {self.model_id}: {what} failed: {exc!r}") from exc

    def fetch_file(self, staging: Path, commit: str, sibling: RepoSibling) -> None:
        """Put one file into `staging`, resuming its `.incomplete` part, verified."""
        name = sibling.rfilename
        dest = staging / name
        if dest.is_file():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".incomplete")
        url = f"{self.endpoint}/{self.model_id}/resolve/{quote(commit, safe='')}/{quote(name)}"
        self.with_retries(
            name, lambda: self._stream(url, partial, sibling), progress=lambda: self.counters.on_disk(name)
        )
        os.replace(partial, dest)
        self.counters.done(name)

    def _stream(self, url: str, partial: Path, sibling: RepoSibling) -> None:
        """One GET of a file, appending to `partial` from where it stopped, then verify it."""
        name = sibling.rfilename
        offset = partial.stat().st_size if partial.is_file() else 0
        if sibling.size is not None and offset > sibling.size:
            offset = 0
        hasher = download_verify.hasher(sibling)
        if offset and hasher is not None:
            # Resuming: the hash must cover the bytes already on disk too.
            download_verify.hash_prefix(hasher, partial, offset)

        if sibling.size is None or offset < sibling.size:
            headers = dict(self.headers)
            if offset:
                headers["Range"] = f"bytes={offset}-"
            timeout = httpx2.Timeout(self.timeout, connect=min(self.timeout, 10.0))
            with get_session().stream("GET", url, headers=headers, timeout=timeout) as response:
                if response.status_code == 416:
                    partial.unlink(missing_ok=True)
                    self.counters.set_bytes(name, 0)
                    raise TransientError(f"{name}: the server refused to resume at byte {offset}")
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                if response.status_code != 206 and offset:
                    # The server ignored Range and sends the whole file: start over.
                    offset = 0
                    hasher = download_verify.hasher(sibling)
                with partial.open("r+b" if partial.exists() else "wb") as out:
                    out.seek(offset)
                    out.truncate()
                    self.counters.set_bytes(name, offset)
                    # No chunk_size: buffering would lose the bytes already received when the link drops.
                    for chunk in response.iter_bytes():
                        if self.cancel.is_set():
                            raise DownloadCancelled()
                        out.write(chunk)
                        if hasher is not None:
                            hasher.update(chunk)
                        self.counters.add_bytes(name, len(chunk))

        size = partial.stat().st_size
        if sibling.size is not None and size != sibling.size:
            raise TransientError(f"{name}: got {size} of {sibling.size} bytes")
        if hasher is not None and hasher.hexdigest() != download_verify.expected_hash(sibling):
            partial.unlink(missing_ok=True)
            self.counters.set_bytes(name, 0)
            raise TransientError(f"{name}: checksum mismatch, downloading it again")
        if sibling.size is None:
            self.counters.set_size(name, size)
