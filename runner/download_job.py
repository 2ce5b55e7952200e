"""One model download, run in worker threads: the models-dir lock, the Hugging
Face cache shortcut, the file list, the staging folder and the swap into place.

Files land in `MODELS/.partial/<org--name>@<commit>/` (the transfer resumes them
there), and the whole folder is renamed into place at the end: a failed or
interrupted download never looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from huggingface_hub import HfApi, get_token, try_to_load_from_cache
from huggingface_hub.utils import build_hf_headers
from loguru import logger

from exojet.models.store import is_complete
from exojet.runner import download_verify
from exojet.runner.download_common import Counters, DownloadCancelled, DownloadError, DownloadStatus, RetryPolicy
from exojet.runner.download_transfer import Transfer

DEFAULT_ENDPOINT = "https://huggingface.co"
PARTIAL_DIR = ".partial"
# The commit names the staging folder, so it must be a plain name (the Hub sends 40 hex digits).
_SAFE_COMMIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import)."""
    if env := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "huggingface" / "hub"


def _wanted(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


class DownloadJob:
    """Makes one model folder complete; the asyncio side reads `status()` and sets `cancel`."""

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
        self.max_workers = max_workers
        self.partial_root = final.parent / PARTIAL_DIR
        self.endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.offline = _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
        self.counters = Counters(model_id)
        self.transfer = Transfer(model_id, revision, self.endpoint, final.parent, retry, timeout, self.counters)
        self.cancel = self.transfer.cancel
        self.log = logger.bind(model_id=model_id)

    def status(self) -> DownloadStatus:
        return self.counters.status()

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
                self.counters.set_from_folder(self.final)
                return
            if self._adopt_from_hf_cache():
                return
            if self.offline:
                raise DownloadError(
                    "Offline",
                    f"model {self.model_id} is neither in {self.final} nor in the Hugging Face cache "
                    f"{hf_cache_dir()}, and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to download it, "
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
                        raise DownloadCancelled() from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _adopt_from_hf_cache(self) -> bool:
        """Link (or copy) a complete snapshot from the HF cache into the models dir."""
        cache = hf_cache_dir()
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
        self.counters.set_from_folder(self.final)
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
        headers = build_hf_headers(token=token or False)
        # Sizes must be exact for Range resumes and progress, so no compression.
        headers["Accept-Encoding"] = "identity"
        self.transfer.headers = headers
        api = HfApi(endpoint=self.endpoint, token=token or False)
        info = self.transfer.with_retries(
            "the file list",
            lambda: api.model_info(
                self.model_id, revision=self.revision, files_metadata=True, timeout=self.transfer.timeout
            ),
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
            download_verify.check_path(staging, s.rfilename)
            dest = staging / s.rfilename
            partial = dest.with_name(dest.name + ".incomplete")
            on_disk = dest.stat().st_size if dest.is_file() else partial.stat().st_size if partial.is_file() else 0
            self.counters.expect(s.rfilename, s.size if s.size is not None else on_disk, on_disk, dest.is_file())
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
            futures = [pool.submit(self.transfer.fetch_file, staging, commit, s) for s in files]
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
