"""Checking downloaded files: the hash the Hub publishes for each, and file names
that must stay inside the model folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

from huggingface_hub.hf_api import RepoSibling

from exojet.runner.download_common import DownloadError

_CHUNK = 1024 * 1024


def hasher(sibling: RepoSibling) -> hashlib._Hash | None:
    """The hash the Hub publishes for this file: sha256 for LFS, git's blob sha1 otherwise."""
    if sibling.lfs is not None:
        return hashlib.sha256()
    if sibling.blob_id is not None and sibling.size is not None:
        return hashlib.sha1(b"blob %d\0" % sibling.size)
    return None


def expected_hash(sibling: RepoSibling) -> str | None:
    return sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id


def hash_prefix(digest: hashlib._Hash, partial: Path, length: int) -> None:
    """Feed the first `length` bytes of `partial` to `digest`: a resumed file's hash covers them too."""
    with partial.open("rb") as prefix:
        remaining = length
        while remaining and (block := prefix.read(min(_CHUNK, remaining))):
            digest.update(block)
            remaining -= len(block)


def check_path(staging: Path, name: str) -> None:
    """Refuse a file name the Hub listed that would land outside the model folder."""
    dest = (staging / name).resolve()
    if not dest.is_relative_to(staging.resolve()) or name.startswith("/"):
        raise DownloadError("DownloadFailed", f"the Hub listed a file name {name!r} that escapes the model folder")
