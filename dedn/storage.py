"""A run's storage location, on a local (or shared) disk or on an object store, behind one set of calls.

Ray Train keeps a run's checkpoints under its storage path, which may be a folder every node can
see (a shared filesystem) or an object-store URI (`s3://bucket/prefix`, `gs://...`): on a cluster
without a shared filesystem that is the only way the checkpoints of a worker on one node reach a
restarted worker on another. dedn keeps two small records beside them (the MLflow run a resumed
run continues, the error that ended a run for good), so it reads and writes them through the same
filesystem Ray Train uses: pyarrow's, which takes the endpoint, credentials and region of an
S3-compatible store from the standard variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION`, or the node's instance role).

A local write goes to a temporary name and is renamed; an object-store write is one PUT, which
the store makes visible whole or not at all.
"""
from __future__ import annotations

import os
import posixpath
import re
import socket
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from dedn.atomic import write_text as write_local_text
from dedn.errors import ConfigError, OutputError, os_reason

__all__ = ["is_uri", "join", "resolve", "filesystem", "read_text", "write_text", "remove", "check_writable",
           "local_path", "store_reason"]

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(location: str | Path) -> bool:
    """Whether `location` names an object store (`s3://...`), not a path on this machine."""
    return bool(_SCHEME.match(str(location))) and not str(location).startswith("file://")


def resolve(location: str | Path) -> str:
    """An absolute path (`~` expanded) or the URI unchanged: what every node and Ray Train take."""
    if is_uri(location):
        return str(location).rstrip("/")
    text = str(location)
    return str(Path(text[len("file://"):] if text.startswith("file://") else text).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    return posixpath.join(location, *parts) if is_uri(location) else str(Path(location, *parts))


def local_path(location: str) -> Path | None:
    """The local path, or None for an object store."""
    return None if is_uri(location) else Path(location)


def filesystem(uri: str):  # -> (pyarrow FileSystem, path inside it)
    import pyarrow.fs  # pyarrow is always there (the shards); imported on use to keep this module light

    return pyarrow.fs.FileSystem.from_uri(uri)


def read_text(location: str) -> str | None:
    """The file's text, or None when there is none."""
    if not is_uri(location):
        p = Path(location)
        return p.read_text() if p.is_file() else None
    import pyarrow.fs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str, text: str) -> None:
    """Write the whole file (a local one atomically); OutputError naming `location` when it cannot."""
    if not is_uri(location):
        write_local_text(Path(location), text)
        return
    try:
        fs, path = filesystem(location)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
    except OSError as e:
        raise OutputError(location, store_reason(e)) from None


def remove(location: str) -> None:
    """Delete the file if it is there."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    import pyarrow.fs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        fs.delete_file(path)


_NO_ENDPOINT = "no S3 endpoint answers (AWS_ENDPOINT_URL, or AWS's own when unset)"
# what an S3 client's error says, in words a user acts on (pyarrow's message names the AWS error)
_STORE_ERRORS = (
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("NoSuchBucket", "the bucket does not exist"),
    ("NETWORK_CONNECTION", _NO_ENDPOINT),
    ("InvalidAccessKeyId", "the access key is not known to the store (AWS_ACCESS_KEY_ID)"),
    ("INVALID_ACCESS_KEY_ID", "the access key is not known to the store (AWS_ACCESS_KEY_ID)"),
    ("SignatureDoesNotMatch", "the secret key does not match the access key (AWS_SECRET_ACCESS_KEY)"),
    ("SIGNATURE_DOES_NOT_MATCH", "the secret key does not match the access key (AWS_SECRET_ACCESS_KEY)"),
    ("ACCESS_DENIED", "access denied for these credentials"),
    ("AccessDenied", "access denied for these credentials"),
)


def store_reason(e: BaseException) -> str:
    """A short reason for an object-store error: the cause in words where known, else its first line."""
    text = str(e)
    for marker, words in _STORE_ERRORS:
        if marker in text:
            return words
    return os_reason(e) if isinstance(e, OSError) and e.errno else text.splitlines()[0][:300]


def _endpoint_refuses(uri: str) -> bool:
    """Whether the S3 endpoint of AWS_ENDPOINT_URL refuses a TCP connection. pyarrow's client retries
    a refused connection for about 6 s before it says so (measured); a wrong endpoint variable is the
    usual cause, and one connect tells at once. Without the variable (AWS's own endpoint), with
    options in the URI (`?endpoint_override=...`), or when the endpoint answers, is slow or cannot be
    resolved: False, and the store's own request says what is wrong."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not uri.startswith("s3://") or "?" in uri or not endpoint:
        return False
    try:
        where = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        port = where.port or (443 if where.scheme == "https" else 80)
        with socket.create_connection((where.hostname or "", port), timeout=3):
            return False
    except ConnectionRefusedError:
        return True
    except (OSError, ValueError):  # unreachable, slow, unresolvable, malformed: the request will say
        return False


def check_writable(location: str, key: str) -> None:
    """Write and delete a probe under `location`: a store that cannot be reached or written (wrong
    bucket, endpoint or credentials; a read-only folder) is one ConfigError naming it, before Ray starts."""
    if not is_uri(location):
        folder = Path(location)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".dedn-write-probe-"):
                pass
        except OSError as e:
            raise ConfigError(key, "a writable folder", f"{folder} ({type(e).__name__}: {e.strerror or e})",
                              "preflight") from None
        return
    if _endpoint_refuses(location):
        raise ConfigError(key, "an object-store location this machine can write",
                          f"{location}: {_NO_ENDPOINT}", "preflight")
    probe = join(location, f".dedn-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = filesystem(probe)
        with fs.open_output_stream(path) as f:
            f.write(b"")
        fs.delete_file(path)
    except (OSError, ValueError) as e:  # ValueError: a scheme pyarrow does not know
        raise ConfigError(key, "an object-store location this machine can write", f"{location}: {store_reason(e)}",
                          "preflight") from None
