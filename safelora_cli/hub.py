"""Hub files read by byte ranges, through huggingface_hub's own HTTP stack (DESIGN §3).

Contract:

- :func:`hub_endpoint` ``() -> str``: ``HF_ENDPOINT`` as it is now (huggingface_hub reads it
  once, at import), else huggingface_hub's default. Every Hub call of safelora passes it.
- :func:`open_file` ``(repo_id, filename, *, commit, revision, token, endpoint) -> HubFile``:
  one ``HEAD`` on the file's ``resolve/<commit>/`` URL (``get_hf_file_metadata``: token,
  redirects, retries) for its size; the answer must be for ``commit``. SourceError otherwise
  (401/403/404 mapped by :func:`safelora_cli.sources.hub_error`).
- :class:`HubFile` (a :class:`safelora_cli.reader.ByteSource`): ``size``, ``read(offset, n)``,
  ``read_into(offset, views)``, ``fetched`` (bytes received). Each read asks for exactly its
  bytes with ``Range: bytes=a-b`` through ``huggingface_hub.utils.http_stream_backoff`` (the
  shared ``get_session()`` client: proxies, the ``resolve/`` redirect to a CDN followed with
  the range kept, retries with backoff on 429/5xx and connection errors). A read larger than
  :data:`REQUEST_BYTES` is split into requests of at most that size, :data:`IN_FLIGHT` at a
  time, each streamed straight into the caller's buffer (no read-ahead, nothing else held).
  A response that is not ``206`` with the asked ``Content-Range`` is refused unread (a server
  ignoring ``Range`` would otherwise send the whole file); more bytes than asked are refused; a
  connection cut mid-body (or a short body) resumes from the first missing byte, up to
  :data:`MAX_RETRIES` times with exponential backoff, then a SourceError saying what was
  received and that a rerun resumes.

Nothing here writes a file: ranged bytes go only into the caller's buffers (the projection
cache is the only thing kept), never into the Hugging Face cache, which would later hand a
partial file out as complete.
"""

from __future__ import annotations

import bisect
import importlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from safelora_cli.errors import FetchError, SafeLoraError, SourceError

# One request asks for at most this many bytes; a longer read is split, IN_FLIGHT at a time.
REQUEST_BYTES = 16 << 20
IN_FLIGHT = 4
# Retries of one request (connection cut, short body), on top of huggingface_hub's own retries
# of the request itself (429/5xx, connection errors): waits RETRY_WAIT, 2x, 4x ... MAX_WAIT s.
MAX_RETRIES = 5
RETRY_WAIT = 1.0
MAX_WAIT = 8.0
# Seconds without a byte before a request counts as failed (then retried).
TIMEOUT = 60.0
_CHUNK = 1 << 20
_RESUME_HINT = (
    "check the network and run the same command again: finished cache entries are kept and "
    "only the missing ones are fetched"
)


def hub_endpoint() -> str:
    """The Hub endpoint: ``HF_ENDPOINT`` read now, else huggingface_hub's default."""
    v = (os.environ.get("HF_ENDPOINT") or "").strip()
    if v:
        return v.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _http_module() -> Any:
    """The HTTP library huggingface_hub's session is built on (httpx2 in 2.x, httpx before)."""
    from huggingface_hub.utils import get_session

    return importlib.import_module(type(get_session()).__module__.split(".")[0])


class _Cut(Exception):
    """The body of a ranged response ended early (connection reset, short read)."""


class _Sink:
    """Contiguous file bytes from ``offset`` on, written into consecutive buffers."""

    def __init__(self, offset: int, views: list[memoryview]):
        self.offset = offset
        self.views = [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in views]
        self.starts: list[int] = []
        pos = 0
        for v in self.views:
            self.starts.append(pos)
            pos += v.nbytes
        self.nbytes = pos

    def write(self, pos: int, data: bytes) -> None:
        rel = pos - self.offset
        mv = memoryview(data)
        while len(mv):
            i = bisect.bisect_right(self.starts, rel) - 1
            v = self.views[i]
            at = rel - self.starts[i]
            n = min(len(mv), v.nbytes - at)
            v[at : at + n] = mv[:n]
            mv = mv[n:]
            rel += n


class HubFile:
    """One file of a Hub repo at a commit, read by byte ranges (see the module docstring)."""

    def __init__(
        self,
        repo_id: str,
        filename: str,
        *,
        commit: str,
        revision: str | None,
        size: int,
        url: str,
        headers: dict[str, str],
    ):
        self.repo_id = repo_id
        self.filename = filename
        self.commit = commit
        self.revision = revision
        self.size = size
        self.url = url
        self._headers = dict(headers)
        self._lock = threading.Lock()
        self._fetched = 0
        self.requests = 0

    def __repr__(self) -> str:
        return f"HubFile({self.repo_id}@{self.commit[:12]}/{self.filename}, {self.size} bytes)"

    @property
    def fetched(self) -> int:
        """Bytes received so far (every response body byte, retries included)."""
        return self._fetched

    def _what(self) -> str:
        return f"{self.filename} of Hub repo {self.repo_id}@{self.commit[:12]}"

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset``."""
        buf = bytearray(n)
        if n:
            self.read_into(offset, [memoryview(buf)])
        return bytes(buf)

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        """Fill ``views`` with the bytes from ``offset`` on (see the module docstring)."""
        sink = _Sink(offset, views)
        end = offset + sink.nbytes
        if offset < 0 or end > self.size:
            raise SourceError(
                f"{self._what()}: bytes {offset}-{end - 1} asked, but the file has {self.size}",
                hint="the file changed on the Hub or its header is inconsistent; retry",
                path=self.repo_id,
            )
        if sink.nbytes == 0:
            return
        pieces = [(a, min(a + REQUEST_BYTES, end)) for a in range(offset, end, REQUEST_BYTES)]
        if len(pieces) == 1:
            self._get(*pieces[0], sink)
            return
        # Set when the caller gives up (an error in another piece, Ctrl-C): the other requests
        # stop at their next chunk instead of finishing, so an interrupt is not held up by them.
        stop = threading.Event()
        with ThreadPoolExecutor(
            min(IN_FLIGHT, len(pieces)), thread_name_prefix="safelora-fetch"
        ) as ex:
            futures = [ex.submit(self._get, a, b, sink, stop) for a, b in pieces]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                stop.set()
                for f in futures:
                    f.cancel()
                raise

    def _get(self, start: int, end: int, sink: _Sink, stop: threading.Event | None = None) -> None:
        """Bytes ``[start, end)`` into ``sink``: one request, resumed after a cut. Returns
        early, leaving the rest unread, once ``stop`` is set."""
        from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

        http = _http_module()
        n = end - start
        got = 0
        tries = 0
        last: BaseException | None = None
        while got < n:
            if stop is not None and stop.is_set():
                return
            headers = {**self._headers, "Range": f"bytes={start + got}-{end - 1}"}
            try:
                with http_stream_backoff(
                    "GET",
                    self.url,
                    headers=headers,
                    max_retries=MAX_RETRIES,
                    base_wait_time=RETRY_WAIT,
                    max_wait_time=MAX_WAIT,
                    timeout=TIMEOUT,
                ) as r:
                    with self._lock:
                        self.requests += 1
                    if r.status_code >= 400:
                        r.read()
                        hf_raise_for_status(r)
                    self._check_range(r, start + got, end)
                    try:
                        for chunk in r.iter_bytes(_CHUNK):
                            if stop is not None and stop.is_set():
                                return
                            if got + len(chunk) > n:
                                raise SourceError(
                                    f"{self._what()}: the server sent more than the "
                                    f"{n} bytes asked for at {start}",
                                    hint="the server does not honour byte ranges; "
                                    "use --download full",
                                    path=self.repo_id,
                                )
                            sink.write(start + got, chunk)
                            got += len(chunk)
                            with self._lock:
                                self._fetched += len(chunk)
                    except http.TransportError as e:
                        raise _Cut(str(e)) from e
            except _Cut as e:
                last = e.__cause__ or e
            except SafeLoraError:
                raise
            except Exception as e:
                from safelora_cli.sources import hub_error, is_hub_failure

                if not is_hub_failure(e):
                    raise
                err = hub_error(e, self.repo_id, self.revision, self.filename)
                status = getattr(getattr(e, "response", None), "status_code", None)
                if status is not None and status < 500 and status != 429:
                    raise err from None  # 401/403/404...: retrying will not help
                raise FetchError(err.message, hint=_RESUME_HINT, path=self.repo_id) from None
            if got < n:
                tries += 1
                if tries > MAX_RETRIES:
                    why = f": {str(last).strip().splitlines()[0]}" if last and str(last) else ""
                    raise FetchError(
                        f"{self._what()}: the connection dropped {tries} times while fetching "
                        f"bytes {start}-{end - 1} ({got} of {n} received){why}",
                        hint=_RESUME_HINT,
                        path=self.repo_id,
                    )
                time.sleep(min(MAX_WAIT, RETRY_WAIT * 2 ** (tries - 1)))

    def _check_range(self, r: Any, start: int, end: int) -> None:
        """SourceError unless ``r`` is a 206 for bytes starting at ``start``, within ``end``."""
        hint = "the server does not honour byte ranges; use --download full"
        if r.status_code != 206:
            raise SourceError(
                f"{self._what()}: asked for a byte range, got HTTP {r.status_code} instead of 206",
                hint=hint,
                path=self.repo_id,
            )
        cr = (r.headers.get("Content-Range") or "").strip()
        try:
            unit, rest = cr.split(" ", 1)
            span, total = rest.split("/", 1)
            a, b = (int(x) for x in span.split("-", 1))
        except ValueError:
            raise SourceError(
                f"{self._what()}: a 206 answer without a valid Content-Range ({cr!r})",
                hint=hint,
                path=self.repo_id,
            ) from None
        size_ok = total.strip() == "*" or total.strip() == str(self.size)
        if unit != "bytes" or a != start or b >= end or b < a or not size_ok:
            raise SourceError(
                f"{self._what()}: asked for bytes {start}-{end - 1}, the server sent {cr!r}",
                hint="the file changed on the Hub, or the server does not honour byte ranges; "
                "retry, or use --download full",
                path=self.repo_id,
            )


def open_file(
    repo_id: str,
    filename: str,
    *,
    commit: str,
    revision: str | None,
    token: str | None,
    endpoint: str,
) -> HubFile:
    """``filename`` of ``repo_id`` at ``commit``, ready for ranged reads (one HEAD request)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from safelora_cli.sources import hub_error, is_hub_failure

    url = hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint, retry_on_errors=True)
    except Exception as e:
        if is_hub_failure(e):
            raise hub_error(e, repo_id, revision, filename) from None
        raise
    what = f"{filename} of Hub repo {repo_id}@{commit[:12]}"
    if meta.size is None:
        raise SourceError(
            f"{what}: the Hub did not say the file's size",
            hint="use --download full",
            path=repo_id,
        )
    if meta.commit_hash is not None and meta.commit_hash != commit:
        raise SourceError(
            f"{what}: the Hub answered for commit {meta.commit_hash[:12]}",
            hint="the revision moved during the run; run the same command again",
            path=repo_id,
        )
    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"  # byte offsets of the stored file, not of a gzip
    return HubFile(
        repo_id,
        filename,
        commit=commit,
        revision=revision,
        size=int(meta.size),
        url=url,
        headers=headers,
    )
