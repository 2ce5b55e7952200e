"""A local Hugging Face Hub stand-in: serves test-made repos over real HTTP.

There is no internet in tests, so this speaks just enough of the Hub's protocol
for `huggingface_hub` and our downloader: the model info API (with file sizes,
blob ids and LFS hashes), `resolve` URLs with HEAD, GET and Range, the headers
the client library reads (ETag, X-Repo-Commit, X-Linked-*, X-Error-Code), and
per-file fault injection so tests can prove retries and resumes happen.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

# Files the Hub stores in LFS; everything else is a plain git blob.
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pth", ".model")
_CHUNK = 16 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding `data` (what the Hub calls `blobId`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RepoFile:
    """One served file and the hashes the Hub reports for it."""

    name: str
    data: bytes
    lfs_sha256: str | None
    blob_id: str

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or self.blob_id


@dataclass
class Repo:
    """A served repo: its files at a single commit, and an optional access token."""

    repo_id: str
    commit: str
    files: dict[str, RepoFile]
    token: str | None = None


@dataclass
class FileFaults:
    """What goes wrong for one file (or, with filename None, the repo's info API)."""

    fail_times: int = 0
    fail_status: int = 500
    drop_after: int | None = None
    drop_times: int = 0
    chunk_delay: float = 0.0


@dataclass
class RequestRecord:
    """One request as the server saw it, logged when it arrives and filled in as it is
    answered (status and byte counts are set before the bytes go out, so a client
    that has its response never sees a stale record)."""

    method: str
    path: str
    repo_id: str | None
    filename: str | None
    range: str | None
    authorization: str | None
    status: int
    bytes_sent: int = 0


@dataclass
class _State:
    repos: dict[str, Repo] = field(default_factory=dict)
    faults: dict[tuple[str, str | None], FileFaults] = field(default_factory=dict)
    requests: list[RequestRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class HFEndpoint:
    """A threaded HTTP server on 127.0.0.1 that behaves like the Hub for downloads.

    Use as a context manager (or call `close()`); point `HF_ENDPOINT` at `url`.
    """

    def __init__(self) -> None:
        self._state = _State()
        handler = type("_BoundHandler", (_Handler,), {"state": self._state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval keeps close() (and each test's teardown) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="hf-endpoint", daemon=True
        )
        self._thread.start()

    def add_repo(self, repo_id: str, folder: Path, *, token: str | None = None) -> str:
        """Serve every file under `folder` as `repo_id`; returns the commit sha it gets.

        With `token`, requests without `Authorization: Bearer <token>` get 401.
        """
        files: dict[str, RepoFile] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            if name.endswith(_LFS_SUFFIXES):
                sha256 = hashlib.sha256(data).hexdigest()
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
                files[name] = RepoFile(name, data, sha256, git_blob_sha1(pointer.encode()))
            else:
                files[name] = RepoFile(name, data, None, git_blob_sha1(data))
        listing = "".join(f"{f.name}:{f.blob_id}\n" for f in files.values())
        commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        with self._state.lock:
            self._state.repos[repo_id] = Repo(repo_id, commit, files, token)
        return commit

    def faults(self, repo_id: str, filename: str | None) -> FileFaults:
        """The (mutable) faults of one file; `filename=None` targets the info API."""
        with self._state.lock:
            return self._state.faults.setdefault((repo_id, filename), FileFaults())

    def fail(self, repo_id: str, filename: str | None, times: int, status: int = 500) -> None:
        """Answer the next `times` GETs of the file (or info API) with `status`."""
        f = self.faults(repo_id, filename)
        f.fail_times, f.fail_status = times, status

    def drop(self, repo_id: str, filename: str, after_bytes: int, times: int = 1) -> None:
        """For the next `times` GETs: send full headers, `after_bytes` of body, then cut the socket."""
        f = self.faults(repo_id, filename)
        f.drop_after, f.drop_times = after_bytes, times

    def slow(self, repo_id: str, filename: str, chunk_delay: float) -> None:
        """Sleep `chunk_delay` seconds before each 16 KiB chunk of the file's body."""
        self.faults(repo_id, filename).chunk_delay = chunk_delay

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._state.lock:
            return list(self._state.requests)

    def file_requests(self, filename: str, method: str = "GET") -> list[RequestRecord]:
        """Logged requests of one file's resolve URL."""
        return [r for r in self.requests if r.filename == filename and r.method == method]

    def bytes_served(self, filename: str) -> int:
        """Body bytes sent for `filename` across all its GETs."""
        return sum(r.bytes_sent for r in self.file_requests(filename))

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HFEndpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State

    def log_message(self, format: str, *args: object) -> None:
        """Silence per-request stderr lines; the request log is the record."""

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        record = RequestRecord(
            method=self.command,
            path=self.path,
            repo_id=None,
            filename=None,
            range=self.headers.get("Range"),
            authorization=self.headers.get("Authorization"),
            status=0,
        )
        with self.state.lock:
            self.state.requests.append(record)
        if path.startswith("/api/models/"):
            self._api(path.removeprefix("/api/models/"), record, head)
        elif "/resolve/" in path:
            self._resolve(path.lstrip("/"), record, head)
        else:
            self._error(record, 404, "RepoNotFound", "Not found")

    def _find_repo(self, rest: str) -> tuple[Repo | None, str]:
        """Split `org/name/<rest>` on the longest known repo id."""
        with self.state.lock:
            repos = sorted(self.state.repos.values(), key=lambda r: -len(r.repo_id))
        for repo in repos:
            if rest == repo.repo_id or rest.startswith(repo.repo_id + "/"):
                return repo, rest[len(repo.repo_id) :].lstrip("/")
        return None, rest

    def _authorized(self, repo: Repo, record: RequestRecord) -> bool:
        if repo.token is None or record.authorization == f"Bearer {repo.token}":
            return True
        self._error(record, 401, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
        return False

    def _take_failure(self, repo_id: str, filename: str | None) -> int | None:
        with self.state.lock:
            f = self.state.faults.get((repo_id, filename))
            if f is None or f.fail_times <= 0:
                return None
            f.fail_times -= 1
            return f.fail_status

    def _api(self, rest: str, record: RequestRecord, head: bool) -> None:
        repo, tail = self._find_repo(rest)
        if repo is None:
            self._error(record, 404, "RepoNotFound", "Repository not found")
            return
        record.repo_id = repo.repo_id
        if not self._authorized(repo, record):
            return
        kind, _, revision_and_path = tail.partition("/")
        revision, _, subpath = revision_and_path.partition("/")
        if tail and (kind not in ("revision", "tree") or revision not in ("main", repo.commit)):
            self._error(record, 404, "RevisionNotFound", "Invalid rev id")
            return
        if (status := self._take_failure(repo.repo_id, None)) is not None:
            self._error(record, status, None, "Injected failure")
            return
        if kind == "tree":
            self._send_json(record, self._tree(repo, subpath), head)
            return
        siblings = []
        for f in repo.files.values():
            sibling: dict[str, object] = {"rfilename": f.name, "size": len(f.data), "blobId": f.blob_id}
            if f.lfs_sha256 is not None:
                sibling["lfs"] = {"sha256": f.lfs_sha256, "size": len(f.data), "pointerSize": 130}
            siblings.append(sibling)
        info = {
            "_id": repo.commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": repo.commit,
            "private": repo.token is not None,
            "siblings": siblings,
        }
        self._send_json(record, info, head)

    @staticmethod
    def _tree(repo: Repo, subpath: str) -> list[dict[str, object]]:
        """A recursive listing under `subpath`, files only plus their parent folders."""
        prefix = f"{subpath}/" if subpath else ""
        entries: dict[str, dict[str, object]] = {}
        for f in repo.files.values():
            if not f.name.startswith(prefix):
                continue
            parts = f.name.split("/")
            for depth in range(prefix.count("/") + 1, len(parts)):
                folder = "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "oid": repo.commit, "size": 0, "path": folder})
            entry: dict[str, object] = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": f.name}
            if f.lfs_sha256 is not None:
                entry["lfs"] = {"oid": f.lfs_sha256, "size": len(f.data), "pointerSize": 130}
            entries[f.name] = entry
        return list(entries.values())

    def _send_json(self, record: RequestRecord, payload: object, head: bool) -> None:
        body = json.dumps(payload).encode()
        record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            record.bytes_sent = len(body)
            self.wfile.write(body)

    def _resolve(self, rest: str, record: RequestRecord, head: bool) -> None:
        repo, tail = self._find_repo(rest)
        if repo is None or not tail.startswith("resolve/"):
            self._error(record, 404, "RepoNotFound", "Repository not found")
            return
        record.repo_id = repo.repo_id
        revision, _, filename = tail.removeprefix("resolve/").partition("/")
        record.filename = filename
        if not self._authorized(repo, record):
            return
        if revision not in ("main", repo.commit):
            self._error(record, 404, "RevisionNotFound", "Invalid rev id", commit=None)
            return
        file = repo.files.get(filename)
        if file is None:
            self._error(record, 404, "EntryNotFound", "Entry not found", commit=repo.commit)
            return
        if not head and (status := self._take_failure(repo.repo_id, filename)) is not None:
            self._error(record, status, None, "Injected failure", commit=repo.commit)
            return

        start, end = 0, len(file.data) - 1
        status = 200
        if (rng := record.range) and not head:
            spec = rng.removeprefix("bytes=")
            first, _, last = spec.partition("-")
            start = int(first)
            end = int(last) if last else end
            if start > end or start >= len(file.data):
                self._error(record, 416, None, "Range Not Satisfiable", commit=repo.commit)
                return
            status = 206
        body = file.data[start : end + 1]

        record.status = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{file.etag}"')
        self.send_header("X-Repo-Commit", repo.commit)
        if file.lfs_sha256 is not None:
            self.send_header("X-Linked-Etag", f'"{file.lfs_sha256}"')
            self.send_header("X-Linked-Size", str(len(file.data)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(file.data)}")
        self.end_headers()
        if not head:
            self._send_body(repo.repo_id, filename, body, record)

    def _send_body(self, repo_id: str, filename: str, body: bytes, record: RequestRecord) -> None:
        with self.state.lock:
            f = self.state.faults.get((repo_id, filename), FileFaults())
            cut = f.drop_after if f.drop_times > 0 else None
            if cut is not None:
                f.drop_times -= 1
            delay = f.chunk_delay
        limit = len(body) if cut is None else min(cut, len(body))
        try:
            for offset in range(0, limit, _CHUNK):
                if delay:
                    time.sleep(delay)
                chunk = body[offset : min(offset + _CHUNK, limit)]
                record.bytes_sent += len(chunk)
                self.wfile.write(chunk)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if cut is not None:
            # Headers promised the full length: closing now is a connection dropped mid-file.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _error(
        self, record: RequestRecord, status: int, code: str | None, message: str, commit: str | None = None
    ) -> None:
        record.status = status
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
