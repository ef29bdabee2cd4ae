"""The official scFoundation checkpoint on this machine: download, cache and integrity check.

:func:`scfoundation_checkpoint` returns a local path to ``models.ckpt``, from one of three
sources:

- the Hugging Face mirror ``genbio-ai/scFoundation`` (the default), through
  :func:`huggingface_hub.hf_hub_download` and its cache (``HF_HUB_OFFLINE``, ``HF_ENDPOINT``,
  ``HF_HUB_CACHE`` / ``HF_HOME`` are read when it is called, a ``revision`` is pinned when given);
- a URL the user names, streamed into scxtrimo's cache with resume of a partial download
  (HTTP ``Range``) and an atomic rename once complete;
- a local file the user names.

A downloaded file is checked against the expected SHA-256 (and size) before it is returned; the
hash of a file is computed once, in chunks, and remembered by path, size and modification time.
Nothing here imports scvi-tools, Lightning or torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Literal

from scxtrimo._version import __version__

__all__ = [
    "ACCEPT_SHA256_ENV",
    "SCFOUNDATION_FILENAME",
    "SCFOUNDATION_REPO_ID",
    "SCFOUNDATION_SHA256",
    "SCFOUNDATION_SIZE",
    "ChecksumMismatchError",
    "file_sha256",
    "scfoundation_checkpoint",
]

logger = logging.getLogger("scxtrimo")

#: The Hugging Face repository that mirrors the official checkpoint.
SCFOUNDATION_REPO_ID = "genbio-ai/scFoundation"
#: The checkpoint's file name, in the mirror and in the official release.
SCFOUNDATION_FILENAME = "models.ckpt"
#: SHA-256 of the official ``models.ckpt``, as third-party reports give it (scxtrimo's authors
#: have not downloaded the file themselves; see docs/scfoundation.md).
SCFOUNDATION_SHA256 = "9f40bf324d3d0084c4b288d06f5af4fddd12206e2a3f022551d12e89e33a0ea9"
#: Size in bytes of the official ``models.ckpt``, as the same third-party report gives it.
SCFOUNDATION_SIZE = 1_432_587_886
#: Environment variable naming SHA-256 values (comma-separated) to accept in place of the
#: expected one: the deliberate route for a file whose hash differs.
ACCEPT_SHA256_ENV = "SCXTRIMO_ACCEPT_CHECKPOINT_SHA256"

DOWNLOAD_LICENSE_NOTICE = (
    "Downloading the scFoundation weights (models.ckpt, about 1.4 GB) from a third-party "
    "mirror. The weights are released by BioMap Research under the scFoundation Model License: "
    "NON-COMMERCIAL research use only (MODEL_LICENSE in "
    "https://github.com/biomap-research/scFoundation). scxtrimo does not distribute them; "
    "make sure your use complies with that licence."
)

_CHUNK = 8 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "on", "yes", "true"}
_license_shown = False


class ChecksumMismatchError(ValueError):
    """A checkpoint's SHA-256 (or size) is not the expected one; the file is not loaded."""


# ----------------------------------------------------------------------------------------
# Locations
# ----------------------------------------------------------------------------------------


def scxtrimo_cache_dir() -> Path:
    """Scxtrimo's own cache folder.

    ``SCXTRIMO_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/scxtrimo``, else
    ``~/.cache/scxtrimo``. It holds downloads from a URL and the remembered file hashes.
    """
    env = os.environ.get("SCXTRIMO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "scxtrimo"


def _hub_cache_dir(cache_dir: str | os.PathLike[str] | None) -> str | None:
    """The Hugging Face cache folder: ``cache_dir``, else ``HF_HUB_CACHE`` / ``HF_HOME`` read now."""
    if cache_dir is not None:
        return str(Path(cache_dir).expanduser())
    if os.environ.get("HF_HUB_CACHE"):
        return str(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None  # huggingface_hub's default


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _manual_route(reason: str) -> str:
    return (
        f"{reason} To use the scFoundation weights without a download, get "
        f"'{SCFOUNDATION_FILENAME}' yourself on a machine with internet (from "
        f"https://huggingface.co/{SCFOUNDATION_REPO_ID}/blob/main/{SCFOUNDATION_FILENAME} or "
        "the links in https://github.com/biomap-research/scFoundation/tree/main/model), copy it "
        "here and pass its path: XTrimoGene.from_scfoundation('path/to/models.ckpt') (or "
        "`--model path/to/models.ckpt` on the command line)."
    )


# ----------------------------------------------------------------------------------------
# Hashing, remembered by path, size and modification time
# ----------------------------------------------------------------------------------------


def _record_path(real: Path) -> Path:
    key = hashlib.sha256(str(real).encode()).hexdigest()[:32]
    return scxtrimo_cache_dir() / "sha256" / f"{key}.json"


def _hash_file(real: Path, size: int, progress_bar: bool | None, label: str) -> str:
    """SHA-256 of ``real``, read in chunks, with a progress bar."""
    if progress_bar is None:
        from scxtrimo._settings import settings

        progress_bar = settings.progress_bar
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with (
        real.open("rb") as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"SHA-256 of {label}",
            disable=not progress_bar,
        ) as bar,
    ):
        while n := f.readinto(buffer):
            digest.update(view[:n])
            bar.update(n)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str], *, progress_bar: bool | None = None) -> str:
    """SHA-256 of a file, computed in chunks and remembered.

    The digest is stored in scxtrimo's cache (:func:`scxtrimo_cache_dir`, ``sha256/``) with the
    file's resolved path, size and modification time; a later call on the unchanged file reads
    it instead of hashing again (1.4 GB take several seconds).

    Parameters
    ----------
    path
        The file (symbolic links are followed).
    progress_bar
        Show a progress bar while hashing (default ``scxtrimo.settings.progress_bar``).

    Returns
    -------
    The lower-case hexadecimal digest.
    """
    real = Path(path).expanduser().resolve()
    stat = real.stat()
    record = _record_path(real)
    try:
        saved = json.loads(record.read_text())
        if (
            saved.get("path") == str(real)
            and saved.get("size") == stat.st_size
            and saved.get("mtime_ns") == stat.st_mtime_ns
            and _HEX64.fullmatch(str(saved.get("sha256", "")))
        ):
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # no usable record: hash the file

    hexdigest = _hash_file(real, stat.st_size, progress_bar, Path(path).name)
    content = {
        "path": str(real),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": hexdigest,
    }
    try:  # best effort: a read-only cache only costs a second hash next time
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(content))
        os.replace(tmp, record)
    except OSError as err:
        logger.debug("Could not remember the SHA-256 of %s: %s", real, err)
    return hexdigest


def _accepted_from_env() -> set[str]:
    value = os.environ.get(ACCEPT_SHA256_ENV, "")
    return {item.strip().lower() for item in re.split(r"[,\s]+", value) if item.strip()}


def verify_checkpoint(
    path: Path, sha256: str | None, *, size: int | None = None, source: str = ""
) -> None:
    """Check a file against an expected SHA-256 (and size); raise if it differs.

    Parameters
    ----------
    path
        The file.
    sha256
        Expected hexadecimal digest; ``None`` skips the check (with a warning).
    size
        Expected size in bytes, or ``None``.
    source
        Where the file came from, for the messages.

    Raises
    ------
    ChecksumMismatchError
        If the digest (or size) differs and the file's digest is not named in
        ``SCXTRIMO_ACCEPT_CHECKPOINT_SHA256``.
    """
    if sha256 is None:
        logger.warning(
            "The integrity of %s is not checked (sha256=None): make sure it is the file you "
            "expect.",
            path,
        )
        return
    expected = sha256.strip().lower()
    actual = file_sha256(path)
    actual_size = path.stat().st_size
    if actual == expected and (size is None or actual_size == size):
        return
    if actual in _accepted_from_env():
        logger.warning(
            "%s has SHA-256 %s, not the expected %s; loading it because %s names it.",
            path,
            actual,
            expected,
            ACCEPT_SHA256_ENV,
        )
        return
    size_note = (
        f" Its size is {actual_size:,} bytes; the expected file has {size:,} bytes."
        if size is not None and actual_size != size
        else ""
    )
    provenance = (
        " (the value third-party reports give for the official models.ckpt)"
        if expected == SCFOUNDATION_SHA256
        else ""
    )
    raise ChecksumMismatchError(
        f"Refusing to load {path}{f' (from {source})' if source else ''}: its SHA-256 is "
        f"{actual}, but {expected} was expected{provenance}.{size_note} The file may be "
        "incomplete, damaged or a different release. To download it again, pass "
        "force_download=True. To load it deliberately, pass sha256=None (no check) or "
        f"sha256='{actual}', or set the environment variable {ACCEPT_SHA256_ENV}={actual}."
    )


# ----------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------


def _show_license_once() -> None:
    global _license_shown
    if not _license_shown:
        _license_shown = True
        logger.warning(DOWNLOAD_LICENSE_NOTICE)


def _from_hub(
    *,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    force_download: bool,
    retries: int = 2,
) -> Path:
    """``models.ckpt`` through ``huggingface_hub``'s cache: no request when it is cached."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:  # pragma: no cover - a dependency of scxtrimo
        raise ImportError(
            "Downloading the scFoundation weights needs huggingface_hub: pip install "
            "huggingface_hub (or pass the path of a models.ckpt you downloaded yourself)."
        ) from err

    hub_cache = _hub_cache_dir(cache_dir)
    kwargs = {
        "repo_id": SCFOUNDATION_REPO_ID,
        "filename": SCFOUNDATION_FILENAME,
        "revision": revision,
        "cache_dir": hub_cache,
        "library_name": "scxtrimo",
        "library_version": __version__,
    }
    # huggingface_hub reads HF_ENDPOINT when it is imported; read it now, so that it can be
    # set (or changed) in a running session.
    if os.environ.get("HF_ENDPOINT"):
        kwargs["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/")
    where = f"the Hugging Face cache ({hub_cache or 'the default folder'})"
    if not force_download:
        # The weights do not change: a cached copy is used without asking the server again
        # (hf_hub_download itself would send a request to check a branch such as "main").
        try:
            return Path(hf_hub_download(**kwargs, local_files_only=True))
        except LocalEntryNotFoundError:
            pass
    if _hub_offline():
        state = "force_download=True was passed" if force_download else f"they are not in {where}"
        raise FileNotFoundError(
            _manual_route(
                f"The scFoundation weights cannot be downloaded: {state} and downloads are off "
                "(HF_HUB_OFFLINE is set)."
            )
        )
    _show_license_once()
    logger.info(
        "Downloading %s from %s%s (revision %s).",
        SCFOUNDATION_FILENAME,
        kwargs.get("endpoint", "https://huggingface.co"),
        f"/{SCFOUNDATION_REPO_ID}",
        revision or "main",
    )
    attempts = 1 if force_download else 1 + retries
    for attempt in range(1, attempts + 1):
        try:
            return Path(hf_hub_download(**kwargs, force_download=force_download))
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(
                _manual_route(
                    f"The scFoundation weights could not be downloaded from the Hugging Face Hub "
                    f"({SCFOUNDATION_REPO_ID}) and are not in {where}: {err}"
                )
            ) from err
        except HfHubHTTPError:
            raise  # the server answered (not found, no access...): retrying will not help
        except Exception as err:  # the transfer broke off
            if attempt == attempts:
                raise
            # huggingface_hub < 1 keeps the partial file and resumes from it on the next call;
            # later versions resume within a call and start again here.
            logger.warning("Download interrupted (%s); trying again.", err)
    raise AssertionError("unreachable")  # pragma: no cover


def _url_destination(url: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else scxtrimo_cache_dir()
    name = Path(urllib.parse.urlsplit(url).path).name or SCFOUNDATION_FILENAME
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return root / "checkpoints" / key / name


def _content_range(header: str | None) -> tuple[int, int | None] | None:
    """``(first byte, total or None)`` of a ``Content-Range: bytes a-b/total`` header."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", header or "")
    if match is None:
        return None
    total = match.group(2)
    return int(match.group(1)), None if total == "*" else int(total)


def _stream_once(url: str, part: Path, *, timeout: float, progress_bar: bool) -> None:
    """One request: append to ``part`` from its current size (or restart); raise if cut short."""
    from tqdm.auto import tqdm

    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"scxtrimo/{__version__}", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:
            # Nothing left after `start`: the partial file is complete if the server says so.
            parsed = _content_range(
                err.headers.get("Content-Range", "").replace("bytes */", "bytes 0-0/")
            )
            if parsed is not None and parsed[1] == start:
                return
            part.unlink()  # longer than the file on the server: start again
        raise
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        if status == 206 and start:
            parsed = _content_range(response.headers.get("Content-Range"))
            if parsed is None or parsed[0] != start:
                raise OSError(f"{url} answered a resumed request with the wrong range.")
            total = parsed[1]
            mode = "ab"
        else:  # the server sent the whole file (no resume support): start again
            start = 0
            total = int(length) if length is not None else None
            mode = "wb"
        written = start
        with (
            part.open(mode) as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress_bar,
            ) as bar,
        ):
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written != total:
        raise ConnectionError(f"the transfer stopped after {written:,} of {total:,} bytes")


def _from_url(
    url: str,
    *,
    cache_dir: str | os.PathLike[str] | None,
    force_download: bool,
    retries: int = 5,
    timeout: float = 60.0,
) -> Path:
    """Stream ``url`` to scxtrimo's cache, resuming a partial download; rename when complete."""
    from filelock import FileLock

    from scxtrimo._settings import settings

    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"url must be an http(s) URL, got {url!r}; pass a local file as path.")
    destination = _url_destination(url, cache_dir)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    with FileLock(str(destination.with_name(destination.name + ".lock"))):
        if destination.exists() and not force_download:
            return destination
        if force_download:
            part.unlink(missing_ok=True)
        _show_license_once()
        logger.info("Downloading %s to %s.", url, destination)
        for attempt in range(retries + 1):
            try:
                _stream_once(url, part, timeout=timeout, progress_bar=settings.progress_bar)
                break
            except urllib.error.HTTPError as err:
                if err.code < 500 and err.code not in (408, 416, 429):
                    raise OSError(
                        f"Downloading {url} failed: HTTP {err.code} {err.reason}."
                    ) from err
                error: Exception = err
            except (OSError, urllib.error.URLError) as err:  # connection lost, timeout, cut
                error = err
            if attempt == retries:
                kept = part.stat().st_size if part.exists() else 0
                raise OSError(
                    f"Downloading {url} failed after {retries + 1} attempts ({error}); "
                    f"{kept:,} bytes are kept in {part} and the next call resumes from there."
                ) from error
            logger.warning("Download of %s interrupted (%s); resuming.", url, error)
            time.sleep(min(2.0**attempt, 30.0) * 0.25)
        os.replace(part, destination)
    return destination


# ----------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------


def scfoundation_checkpoint(
    path: str | os.PathLike[str] | None = None,
    *,
    url: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    sha256: str | Literal["auto"] | None = "auto",
    force_download: bool = False,
) -> Path:
    """A local path to the official scFoundation ``models.ckpt``, downloaded if needed.

    With neither ``path`` nor ``url``, the file comes from the Hugging Face mirror
    ``genbio-ai/scFoundation`` through :func:`huggingface_hub.hf_hub_download`: downloaded
    once into the Hugging Face cache (about 1.4 GB), then served from it without any request.
    ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HOME`` are honoured. The
    first download logs the weights' non-commercial licence.

    Parameters
    ----------
    path
        A ``models.ckpt`` you already have: returned as it is (checked only when ``sha256``
        names a digest).
    url
        Download from this http(s) URL instead of the mirror. The file is streamed to
        ``cache_dir`` (default: scxtrimo's cache, ``SCXTRIMO_CACHE_DIR`` or
        ``~/.cache/scxtrimo``), an interrupted download resumes where it stopped (HTTP
        ``Range``), and the file gets its final name only once complete.
    revision
        Branch, tag or commit of the mirror (default ``"main"``); a commit hash pins the file.
    cache_dir
        Folder of the Hugging Face cache (mirror) or of URL downloads.
    sha256
        Expected SHA-256. ``"auto"``: for a download, the official file's
        (:data:`SCFOUNDATION_SHA256`, as third-party reports give it, together with its size,
        :data:`SCFOUNDATION_SIZE`); for ``path``, no check. A digest: checked for any source.
        ``None``: no check (a warning is logged). A file whose digest is named in the
        environment variable ``SCXTRIMO_ACCEPT_CHECKPOINT_SHA256`` is accepted as well.
    force_download
        Download again even if the file is cached.

    Returns
    -------
    The path of the checked file.

    Raises
    ------
    ChecksumMismatchError
        If the file's SHA-256 or size is not the expected one; the message names both digests
        and how to accept the file deliberately.
    FileNotFoundError
        If ``path`` does not exist, or the file is not cached and cannot be downloaded (offline);
        the message says how to download it by hand.
    """
    if path is not None and url is not None:
        raise ValueError("Pass either path (a local file) or url (a download), not both.")
    if sha256 is not None and sha256 != "auto" and not _HEX64.fullmatch(sha256.strip().lower()):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, 'auto' or None, got {sha256!r}.")
    if path is not None:
        if revision is not None or cache_dir is not None or force_download:
            raise ValueError(
                "revision, cache_dir and force_download apply to downloads, not to a local path."
            )
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                _manual_route(f"{file} does not exist or is not a file.")
                + " Without a path, XTrimoGene.from_scfoundation() downloads the file."
            )
        if sha256 != "auto":
            verify_checkpoint(file, sha256, source="the path you passed")
        return file

    if url is not None:
        if revision is not None:
            raise ValueError("revision applies to the Hugging Face mirror, not to a url.")
        file = _from_url(url, cache_dir=cache_dir, force_download=force_download)
        source = url
    else:
        file = _from_hub(revision=revision, cache_dir=cache_dir, force_download=force_download)
        source = f"huggingface.co/{SCFOUNDATION_REPO_ID}"
    if sha256 == "auto":
        verify_checkpoint(file, SCFOUNDATION_SHA256, size=SCFOUNDATION_SIZE, source=source)
    else:
        verify_checkpoint(file, sha256, source=source)
    return file
