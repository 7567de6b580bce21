"""A local stand-in for the Hugging Face Hub's HTTP API (127.0.0.1 only), for ranged-read tests.

It serves repositories laid out by :meth:`HubServer.add` the way the Hub answers the requests
huggingface_hub 2.x makes (found by reading its source and by logging what it asks):

- ``GET /api/models/{org}/{name}`` and ``/api/models/{org}/{name}/revision/{rev}``: model info
  JSON (``id``, ``sha``, ``siblings`` [{``rfilename``, ``size``}]) for ``HfApi.model_info``.
- ``HEAD /{org}/{name}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag``,
  ``X-Linked-Size``, ``Content-Length``, ``Accept-Ranges`` (``get_hf_file_metadata``).
- ``GET /api/models/{org}/{name}/tree/{rev}``: the file list (``snapshot_download``).
- ``GET /{org}/{name}/resolve/{rev}/{file}``: a small file (JSON) is served directly; a
  ``.safetensors`` file answers ``302`` to ``/cdn/{org}/{name}/{commit}/{file}`` as the Hub
  redirects LFS files to its CDN, which serves ``Range: bytes=a-b`` as ``206`` with
  ``Content-Range`` (and the whole file as ``200`` without a range).
- Errors as the Hub sends them: ``401`` + ``X-Error-Code: GatedRepo`` for a gated repo,
  ``404`` + ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``.

Counters: ``served[path]`` (body bytes per request path), :attr:`file_bytes` (bodies of
``resolve/`` and ``cdn/`` requests: file contents), :attr:`api_bytes`, ``log`` (method, path,
Range). Failure injection: :meth:`fail` (the next matching requests answer a status code, e.g.
500), :meth:`cut` (the next matching ranged responses announce their full length, send half
and close the connection).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Path] = field(default_factory=dict)
    gated: bool = False


@functools.cache
def _etag(f: Path) -> str:
    """The file's ETag, as the Hub gives an LFS file's: its SHA-256 (files never change here)."""
    return '"' + hashlib.sha256(f.read_bytes()).hexdigest() + '"'


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hanging up (injected cuts, refused answers) are expected: stay quiet."""


class HubServer:
    """See the module docstring. Use as a context manager; ``endpoint`` is its base URL."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.repos: dict[str, _Repo] = {}
        self.lock = threading.Lock()
        self.served: dict[str, int] = {}
        self.file_bytes = 0
        self.api_bytes = 0
        self.log: list[tuple[str, str, str | None]] = []
        self._fail: list[tuple[str, int]] = []
        self._cut: list[tuple[str, int]] = []
        # True: answer a ranged GET with 200 and the whole file (a server that ignores Range).
        self.ignore_ranges = False
        # Set: redirect resolve/ to the CDN path on this host name (another origin for the
        # client, e.g. "localhost"), as the Hub redirects to its CDN.
        self.cdn_host: str | None = None
        # (path, Authorization header or None) of every request.
        self.auth: list[tuple[str, str | None]] = []
        server = self

        class Handler(_Handler):
            hub = server

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- repos ------------------------------------------------------------------------------

    def add(
        self,
        repo_id: str,
        src: Path,
        *,
        commit: str,
        refs: tuple[str, ...] = ("main",),
        gated: bool = False,
    ) -> None:
        """Serve ``src``'s files as ``repo_id`` at ``commit`` (``refs`` point to it)."""
        repo = self.repos.setdefault(repo_id, _Repo())
        dest = self.root / repo_id.replace("/", "--") / commit
        shutil.copytree(src, dest)
        repo.commits[commit] = dest
        for r in refs:
            repo.refs[r] = commit
        repo.gated = repo.gated or gated

    def fail(self, status: int, *, match: str = "", times: int = 1) -> None:
        """The next ``times`` requests whose path contains ``match`` answer ``status``."""
        with self.lock:
            self._fail += [(match, status)] * times

    def cut(self, *, match: str = "", times: int = 1, min_start: int = 0) -> None:
        """The next ``times`` ranged GETs whose path contains ``match`` (and whose range starts
        at ``min_start`` or later: headers pass) stop half way."""
        with self.lock:
            self._cut += [(match, min_start)] * times

    def reset_counters(self) -> None:
        with self.lock:
            self.served.clear()
            self.file_bytes = 0
            self.api_bytes = 0
            self.log.clear()

    def ranged_gets(self) -> list[tuple[str, str, str | None]]:
        return [e for e in self.log if e[0] == "GET" and e[2]]

    # -- internals --------------------------------------------------------------------------

    def _take(self, queue: list, path: str, start: int = 0) -> object | None:
        with self.lock:
            for i, (m, arg) in enumerate(queue):
                if m in path and (queue is not self._cut or start >= arg):
                    return queue.pop(i)
        return None

    def _count(self, path: str, n: int, *, api: bool) -> None:
        with self.lock:
            self.served[path] = self.served.get(path, 0) + n
            if api:
                self.api_bytes += n
            else:
                self.file_bytes += n


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # -- helpers ----------------------------------------------------------------------------

    def _error(self, status: int, code: str | None = None, message: str = "") -> None:
        body = json.dumps({"error": message or code or "error"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: object, path: str) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.hub._count(path, len(body), api=True)

    def _repo(self, repo_id: str, rev: str | None) -> tuple[_Repo, str] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        rev = rev or "main"
        commit = rev if rev in repo.commits else repo.refs.get(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo, commit

    def _pre(self) -> str | None:
        path = unquote(urlsplit(self.path).path)
        rng = self.headers.get("Range")
        with self.hub.lock:
            self.hub.log.append((self.command, path, rng))
            self.hub.auth.append((path, self.headers.get("Authorization")))
        failed = self.hub._take(self.hub._fail, path)
        if failed is not None:
            self._error(failed[1], None, "injected failure")  # type: ignore[index]
            return None
        return path

    # -- verbs ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._error(404, None, "not implemented in the test server")

    def _serve(self, *, head: bool) -> None:
        path = self._pre()
        if path is None:
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m:
            found = self._repo(m.group(1), m.group(2))
            if found is None:
                return
            repo, commit = found
            d = repo.commits[commit]
            siblings = [
                {"rfilename": f.relative_to(d).as_posix(), "size": f.stat().st_size}
                for f in sorted(d.rglob("*"))
                if f.is_file()
            ]
            self._json(
                {"id": m.group(1), "sha": commit, "siblings": siblings, "private": False}, path
            )
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:  # list_repo_tree (snapshot_download): one page, recursive
            found = self._repo(m.group(1), m.group(2))
            if found is None:
                return
            repo, commit = found
            d = repo.commits[commit]
            self._json(
                [
                    {
                        "type": "file",
                        "path": f.relative_to(d).as_posix(),
                        "size": f.stat().st_size,
                        "oid": hashlib.sha1(f.read_bytes()).hexdigest(),
                    }
                    for f in sorted(d.rglob("*"))
                    if f.is_file()
                ],
                path,
            )
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo_id, rev, name = m.groups()
            found = self._repo(repo_id, rev)
            if found is None:
                return
            repo, commit = found
            if repo.gated and not (self.headers.get("Authorization") or "").endswith("granted"):
                self._error(401, "GatedRepo", "Access to model is restricted")
                return
            f = repo.commits[commit] / name
            if not f.is_file():
                self._error(404, "EntryNotFound", "Entry not found")
                return
            if head or not name.endswith(".safetensors"):
                self._file(f, path, commit, head=head)
                return
            self.send_response(302)
            where = f"/cdn/{repo_id}/{commit}/{name}"
            if self.hub.cdn_host:
                where = f"http://{self.hub.cdn_host}:{self.server.server_address[1]}{where}"
            self.send_header("Location", where)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        m = re.fullmatch(r"/cdn/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", path)
        if m:
            repo_id, commit, name = m.groups()
            repo = self.hub.repos.get(repo_id)
            f = repo.commits.get(commit, Path("/nonexistent")) / name if repo else None
            if f is None or not f.is_file():
                self._error(404, None, "no such object")
                return
            self._file(f, path, commit, head=head)
            return
        self._error(404, None, f"unknown path {path}")

    def _file(self, f: Path, path: str, commit: str, *, head: bool) -> None:
        size = f.stat().st_size
        etag = _etag(f)
        rng = self.headers.get("Range")
        start, end = 0, size - 1
        status = 200
        if rng and not head and not self.hub.ignore_ranges:
            m = _RANGE.match(rng.strip())
            if not m:
                self._error(416, None, "bad range")
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            if start > end or start >= size:
                self._error(416, None, "range not satisfiable")
                return
            status = 206
        n = end - start + 1
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", etag)
        self.send_header("X-Linked-Etag", etag)
        self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(n))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        with open(f, "rb") as fh:
            fh.seek(start)
            data = fh.read(n)
        if status == 206 and self.hub._take(self.hub._cut, path, start) is not None:
            half = data[: n // 2]
            self.wfile.write(half)
            self.wfile.flush()
            self.hub._count(path, len(half), api=False)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        sent = 0
        try:
            for k in range(0, len(data), 1 << 16):
                self.wfile.write(data[k : k + (1 << 16)])
                sent += len(data[k : k + (1 << 16)])
        except OSError:  # the client hung up (e.g. it refused a 200 unread)
            self.close_connection = True
        self.hub._count(path, sent, api=False)
