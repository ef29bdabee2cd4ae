"""The scFoundation weights in one call, tested against a loopback stand-in for the Hub.

A stdlib HTTP server on 127.0.0.1 serves the official-format parity fixture under the mirror's
URL layout (``/{repo_id}/resolve/{revision}/{filename}``, with the headers hf_hub_download
reads: ``ETag``, ``X-Repo-Commit``, ``Content-Length``) and supports ``HEAD`` and ``Range``.
``HF_ENDPOINT`` points at it in every test, every cache is a temporary folder, and a guard
refuses any connection that is not to the loopback address: no test touches the network.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import re
import socket
import threading
from pathlib import Path

import pytest

from scxtrimo.model import _download
from scxtrimo.model._download import (
    ACCEPT_SHA256_ENV,
    SCFOUNDATION_FILENAME,
    SCFOUNDATION_REPO_ID,
    SCFOUNDATION_SHA256,
    ChecksumMismatchError,
    file_sha256,
    scfoundation_checkpoint,
)

FIXTURE = Path(__file__).parent / "data" / "parity_small" / "models.ckpt"
CONTENT = FIXTURE.read_bytes()
FIXTURE_SHA256 = hashlib.sha256(CONTENT).hexdigest()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)")


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves ``CONTENT`` as the mirror's models.ckpt and at ``/files/models.ckpt``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range header
        self.body_bytes = 0  # bytes of file content sent
        self.cut_next = 0  # how many of the next GETs stop after `cut_at` bytes
        self.cut_at = len(CONTENT) // 3
        self.honour_range = True
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _not_found(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, with_body: bool) -> None:
        hub = self.server
        with hub.lock:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
        match = RESOLVE.fullmatch(self.path)
        if match is not None:
            if match["repo"] != SCFOUNDATION_REPO_ID:
                return self._not_found("RepoNotFound")
            if match["revision"] not in ("main", COMMIT):
                return self._not_found("RevisionNotFound")
            if match["filename"] != SCFOUNDATION_FILENAME:
                return self._not_found("EntryNotFound")
        elif self.path != "/files/models.ckpt":
            return self._not_found("EntryNotFound")

        total = len(CONTENT)
        start = 0
        range_header = self.headers.get("Range")
        if range_header and hub.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(total - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{FIXTURE_SHA256}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if not with_body:
            return None
        body = CONTENT[start:]
        cut = False
        with hub.lock:
            if hub.cut_next > 0:
                hub.cut_next -= 1
                body = body[: hub.cut_at]
                cut = True
            hub.body_bytes += len(body)
        self.wfile.write(body)
        self.wfile.flush()
        if cut:  # the connection drops before the promised Content-Length
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        return None

    def do_HEAD(self) -> None:
        self._serve(with_body=False)

    def do_GET(self) -> None:
        self._serve(with_body=True)


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Refuse every connection that is not to the loopback address."""
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ConnectionRefusedError(f"test_download: no network ({host})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for name in ("HF_HUB_OFFLINE", ACCEPT_SHA256_ENV, "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("SCXTRIMO_CACHE_DIR", str(tmp_path / "scxtrimo-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-default"))
    monkeypatch.setattr(_download, "_license_shown", False)
    try:  # huggingface_hub >= 2 fetches an "agent harness" list once per process: not here
        from huggingface_hub.utils import _detect_agent

        empty = {"standardEnvVars": [], "harnesses": {}}
        monkeypatch.setattr(_detect_agent, "_registry", empty, raising=False)
    except ImportError:
        pass
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def scx_log():
    """Records of the ``scxtrimo`` logger (it does not propagate to the root logger)."""
    records: list[logging.LogRecord] = []

    class _ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _ListHandler(level=logging.DEBUG)
    logger = logging.getLogger("scxtrimo")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _messages(records: list[logging.LogRecord], level: int = logging.WARNING) -> str:
    return "\n".join(r.getMessage() for r in records if r.levelno >= level)


# ----------------------------------------------------------------------------------------
# The mirror
# ----------------------------------------------------------------------------------------


def test_first_download_then_cache_without_request(hub, tmp_path, scx_log):
    cache = tmp_path / "hf"
    path = scfoundation_checkpoint(cache_dir=cache, sha256=FIXTURE_SHA256)
    assert path.read_bytes() == CONTENT
    assert cache in path.parents
    assert f"/snapshots/{COMMIT}/" in path.as_posix()
    assert [r[0] for r in hub.requests] == ["HEAD", "GET"]
    assert hub.requests[1][1] == f"/{SCFOUNDATION_REPO_ID}/resolve/main/{SCFOUNDATION_FILENAME}"
    assert hub.body_bytes == len(CONTENT)
    assert "NON-COMMERCIAL" in _messages(scx_log)  # the licence, on the first download

    hub.requests.clear()
    scx_log.clear()
    again = scfoundation_checkpoint(cache_dir=cache, sha256=FIXTURE_SHA256)
    assert again == path
    assert hub.requests == []  # served from the cache: no request at all
    assert "NON-COMMERCIAL" not in _messages(scx_log)


def test_second_call_does_not_hash_again(hub, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    scfoundation_checkpoint(cache_dir=cache, sha256=FIXTURE_SHA256)
    calls = []
    real = _download._hash_file
    monkeypatch.setattr(_download, "_hash_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    scfoundation_checkpoint(cache_dir=cache, sha256=FIXTURE_SHA256)
    assert calls == []  # the remembered digest (same path, size and mtime) is used


def test_pinned_revision(hub, tmp_path):
    path = scfoundation_checkpoint(
        revision=COMMIT, cache_dir=tmp_path / "hf", sha256=FIXTURE_SHA256
    )
    assert path.read_bytes() == CONTENT
    assert all(f"/resolve/{COMMIT}/" in r[1] for r in hub.requests)
    hub.requests.clear()
    assert (
        scfoundation_checkpoint(revision=COMMIT, cache_dir=tmp_path / "hf", sha256=FIXTURE_SHA256)
        == path
    )
    assert hub.requests == []


def test_interrupted_download_resumes(hub, tmp_path):
    from huggingface_hub import constants

    # huggingface_hub writes what it received in chunks of DOWNLOAD_CHUNK_SIZE: cut the first
    # GET after more than one chunk, so that there is something to resume from.
    hub.cut_next = 1
    hub.cut_at = min(constants.DOWNLOAD_CHUNK_SIZE + 1_000_000, len(CONTENT) - 1)
    path = scfoundation_checkpoint(cache_dir=tmp_path / "hf", sha256=FIXTURE_SHA256)
    assert path.read_bytes() == CONTENT
    gets = hub.gets()
    assert len(gets) == 2
    assert gets[0][2] is None
    resumed_from = int(re.fullmatch(r"bytes=(\d+)-", gets[1][2] or "").group(1))
    assert 0 < resumed_from <= hub.cut_at  # resumed, not restarted
    assert hub.body_bytes == len(CONTENT) + hub.cut_at - resumed_from


def test_hash_mismatch_is_refused(hub, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    # The default expectation is the official file's hash, which the fixture does not have.
    with pytest.raises(ChecksumMismatchError) as info:
        scfoundation_checkpoint(cache_dir=cache)
    message = str(info.value)
    assert SCFOUNDATION_SHA256 in message
    assert FIXTURE_SHA256 in message
    assert "sha256=None" in message
    assert f"{ACCEPT_SHA256_ENV}={FIXTURE_SHA256}" in message
    assert "1,432,587,886 bytes" in message  # the size differs too

    # Accepted deliberately: by argument, or by the environment variable; no new download.
    hub.requests.clear()
    assert scfoundation_checkpoint(cache_dir=cache, sha256=None).read_bytes() == CONTENT
    monkeypatch.setenv(ACCEPT_SHA256_ENV, FIXTURE_SHA256)
    assert scfoundation_checkpoint(cache_dir=cache).read_bytes() == CONTENT
    assert hub.requests == []


def test_offline_with_an_empty_cache(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        scfoundation_checkpoint(cache_dir=tmp_path / "hf", sha256=FIXTURE_SHA256)
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message
    assert "from_scfoundation('path/to/models.ckpt')" in message
    assert "models.ckpt" in message
    assert hub.requests == []


def test_offline_with_the_file_cached(hub, tmp_path, monkeypatch):
    path = scfoundation_checkpoint(cache_dir=tmp_path / "hf", sha256=FIXTURE_SHA256)
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert scfoundation_checkpoint(cache_dir=tmp_path / "hf", sha256=FIXTURE_SHA256) == path
    assert hub.requests == []


def test_unreachable_hub_names_the_manual_route(hub, tmp_path, monkeypatch):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    # huggingface_hub retries a refused connection with a back-off (~23 s): no waiting here.
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    with pytest.raises(FileNotFoundError, match=r"pass its path: XTrimoGene\.from_scfoundation"):
        scfoundation_checkpoint(cache_dir=tmp_path / "hf", sha256=FIXTURE_SHA256)


# ----------------------------------------------------------------------------------------
# A URL the user names, and a local file
# ----------------------------------------------------------------------------------------


def test_url_download_cached_and_checked(hub, tmp_path):
    url = f"{hub.url}/files/models.ckpt"
    path = scfoundation_checkpoint(url=url, cache_dir=tmp_path / "dl", sha256=FIXTURE_SHA256)
    assert path.read_bytes() == CONTENT
    assert path.name == "models.ckpt"
    assert not path.with_name("models.ckpt.part").exists()
    hub.requests.clear()
    assert (
        scfoundation_checkpoint(url=url, cache_dir=tmp_path / "dl", sha256=FIXTURE_SHA256) == path
    )
    assert hub.requests == []
    with pytest.raises(ChecksumMismatchError, match=FIXTURE_SHA256):
        scfoundation_checkpoint(url=url, cache_dir=tmp_path / "dl")


def test_url_interrupted_download_resumes(hub, tmp_path):
    hub.cut_next = 1
    url = f"{hub.url}/files/models.ckpt"
    path = scfoundation_checkpoint(url=url, cache_dir=tmp_path / "dl", sha256=FIXTURE_SHA256)
    assert path.read_bytes() == CONTENT
    assert [g[2] for g in hub.gets()] == [None, f"bytes={hub.cut_at}-"]
    assert hub.body_bytes == len(CONTENT)


def test_url_partial_file_from_an_earlier_run_resumes(hub, tmp_path):
    url = f"{hub.url}/files/models.ckpt"
    destination = _download._url_destination(url, tmp_path / "dl")
    destination.parent.mkdir(parents=True)
    kept = 1_000_000
    destination.with_name("models.ckpt.part").write_bytes(CONTENT[:kept])
    path = scfoundation_checkpoint(url=url, cache_dir=tmp_path / "dl", sha256=FIXTURE_SHA256)
    assert path == destination
    assert path.read_bytes() == CONTENT
    assert [g[2] for g in hub.gets()] == [f"bytes={kept}-"]
    assert hub.body_bytes == len(CONTENT) - kept


def test_url_server_without_range_support_restarts_cleanly(hub, tmp_path):
    hub.honour_range = False
    url = f"{hub.url}/files/models.ckpt"
    destination = _download._url_destination(url, tmp_path / "dl")
    destination.parent.mkdir(parents=True)
    destination.with_name("models.ckpt.part").write_bytes(b"x" * 1000)
    path = scfoundation_checkpoint(url=url, cache_dir=tmp_path / "dl", sha256=FIXTURE_SHA256)
    assert path.read_bytes() == CONTENT


def test_url_not_found_is_a_clear_error(hub, tmp_path):
    with pytest.raises(OSError, match="HTTP 404"):
        scfoundation_checkpoint(url=f"{hub.url}/files/nothing.ckpt", cache_dir=tmp_path / "dl")


def test_local_path(hub, tmp_path):
    # A local file is the user's own: returned as it is, checked only when a digest is named.
    assert scfoundation_checkpoint(FIXTURE) == FIXTURE
    assert scfoundation_checkpoint(FIXTURE, sha256=FIXTURE_SHA256) == FIXTURE
    with pytest.raises(ChecksumMismatchError, match=FIXTURE_SHA256):
        scfoundation_checkpoint(FIXTURE, sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scfoundation_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="64 hexadecimal"):
        scfoundation_checkpoint(FIXTURE, sha256="abc")
    assert hub.requests == []


def test_file_sha256_is_remembered_until_the_file_changes(hub, tmp_path, monkeypatch):
    file = tmp_path / "f.bin"
    file.write_bytes(b"abc")
    calls = []
    real = _download._hash_file
    monkeypatch.setattr(_download, "_hash_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert file_sha256(file) == hashlib.sha256(b"abc").hexdigest()
    assert file_sha256(file) == hashlib.sha256(b"abc").hexdigest()
    assert len(calls) == 1
    file.write_bytes(b"abcd")
    assert file_sha256(file) == hashlib.sha256(b"abcd").hexdigest()
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------
# The model and the tools
# ----------------------------------------------------------------------------------------


def test_from_scfoundation_without_a_path_downloads(hub, tmp_path):
    from scxtrimo.model import XTrimoGene

    model = XTrimoGene.from_scfoundation(cache_dir=tmp_path / "hf", sha256=FIXTURE_SHA256)
    reference = XTrimoGene.from_scfoundation(FIXTURE)
    assert model.config == reference.config
    state, expected = model.module.state_dict(), reference.module.state_dict()
    assert state.keys() == expected.keys()
    assert all((state[k] == expected[k]).all() for k in expected)
    assert [r[0] for r in hub.requests] == ["HEAD", "GET"]
    with pytest.raises(ChecksumMismatchError):  # the official hash is expected by default
        XTrimoGene.from_scfoundation(cache_dir=tmp_path / "hf")


def test_cli_model_scfoundation(hub, tmp_path, monkeypatch, pbmc):
    import anndata as ad

    from scxtrimo._cli import main

    # Neither the tools nor the CLI take a hash: the environment variable accepts the fixture.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-env"))
    monkeypatch.setenv(ACCEPT_SHA256_ENV, FIXTURE_SHA256)
    source, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    pbmc[:16].copy().write_h5ad(source)
    assert main(["-q", "embed", str(source), "-o", str(out), "--model", "scfoundation"]) == 0
    assert ad.read_h5ad(out).obsm["X_scxtrimo"].shape == (16, 4 * 64)  # the fixture's width
    assert [r[0] for r in hub.requests] == ["HEAD", "GET"]
    assert any((tmp_path / "hf-env").rglob(SCFOUNDATION_FILENAME))
