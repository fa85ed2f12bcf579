"""A dataset directory on an object store (`--data s3://bucket/dataset`), staged once per node.

`FeatureDataset.open("s3://...")` copies the directory through pyarrow's filesystem (the same one
Ray Train and `dedn.storage` use; endpoint, credentials and region from the standard `AWS_*`
variables) into `$DEDN_HOME/data-cache/` on the node, checking every file's sha256 against the
manifest as it streams, and opens that copy. The reader, the resident decode and the node-shared
copies then read local Parquet as they do for any dataset. Why a copy rather than reading row groups
from the store: every epoch reads every shard again (in a new order), and a local disk serves that
at disk speed where the store would charge a GET per row group per epoch.

One copy per node and dataset version: the cache folder is named by the URI and the manifest's
sha256; processes on the node take a file lock, and the first copies while the others wait and then
find it whole. The copy is built under a temporary name and renamed into place, the manifest last
written, so a copy that was cut short is never used; older versions of the same URI are removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from dedn.atomic import file_lock
from dedn.data.format import MANIFEST_FILE
from dedn.errors import DatasetError
from dedn.home import dedn_home
from dedn.storage import filesystem, join, store_reason

__all__ = ["stage", "upload", "CACHE_DIR"]

CACHE_DIR = "data-cache"
CHUNK = 8 * 2**20


def _read(uri: str) -> bytes:
    try:
        fs, path = filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(uri, "file", "a dataset directory on the object store (its dataset.json)",
                           "no such object") from None
    except (OSError, ValueError) as e:  # pyarrow: OSError from the store, ArrowInvalid (a ValueError) for the URI
        raise DatasetError(uri, "file", "a dataset directory the object store lets this node read",
                           store_reason(e)) from None


def _files(uri: str, manifest: dict) -> list[tuple[str, str, int]]:
    """(file, sha256, bytes or -1) of the class side and every shard the manifest lists."""
    try:
        cs = manifest["class_side"]
        out = [(str(cs["file"]), str(cs["sha256"]), -1)]
        for entry in manifest["splits"].values():
            out += [(str(s["file"]), str(s["sha256"]), int(s.get("bytes", -1))) for s in entry["shards"]]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise DatasetError(join(uri, MANIFEST_FILE), "keys", "class_side {file, sha256} and splits {name: {shards: "
                           "[{file, sha256, bytes}]}}", f"{type(e).__name__}: {e}") from None
    for name, _, _ in out:
        if name.startswith("/") or ".." in Path(name).parts:
            raise DatasetError(join(uri, MANIFEST_FILE), "files", "paths inside the dataset directory", name)
    return out


def _copy(uri: str, name: str, sha256: str, dest: Path) -> None:
    """Stream one file from the store to `dest`, hashing as it goes; a mismatch is refused by name."""
    fs, path = filesystem(join(uri, name))
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fs.open_input_stream(path) as src, open(dest, "wb") as out:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except FileNotFoundError:
        raise DatasetError(join(uri, name), "file", "the file dataset.json lists", "no such object") from None
    except OSError as e:
        if isinstance(e, (PermissionError, IsADirectoryError)) or e.errno:
            raise DatasetError(dest, "file", "a node-local copy of the dataset ($DEDN_HOME/data-cache)",
                               f"{type(e).__name__}: {e}") from None
        raise DatasetError(join(uri, name), "file", "an object this node can read", store_reason(e)) from None
    if digest.hexdigest() != sha256:
        raise DatasetError(join(uri, name), "sha256", f"{sha256} (dataset.json)", digest.hexdigest())


def stage(uri: str) -> Path:
    """The node-local copy of the dataset at `uri`, made (verified) when this node has none of this version."""
    uri = uri.rstrip("/")
    manifest_bytes = _read(join(uri, MANIFEST_FILE))
    try:
        manifest = json.loads(manifest_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(join(uri, MANIFEST_FILE), "file", "valid JSON", f"{type(e).__name__}: {e}") from None
    if not isinstance(manifest, dict):
        raise DatasetError(join(uri, MANIFEST_FILE), "file", "a JSON object", type(manifest).__name__)
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    cache = dedn_home() / CACHE_DIR
    local = cache / f"{key}-{hashlib.sha256(manifest_bytes).hexdigest()[:16]}"
    if (local / MANIFEST_FILE).is_file():
        return local
    files = _files(uri, manifest)
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f"{key}.lock"):
        if (local / MANIFEST_FILE).is_file():  # another process on this node made it while this one waited
            return local
        need = sum(max(0, b) for _, _, b in files)
        free = shutil.disk_usage(cache).free
        if need > free:
            raise DatasetError(cache, "free space", f"{need / 2**30:.1f} GiB for a copy of {uri}",
                               f"{free / 2**30:.1f} GiB free (set DEDN_HOME to a larger disk)")
        tmp = cache / f".{local.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for name, sha, _ in files:
                _copy(uri, name, sha, tmp / name)
            (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)  # last: a folder without it is never used
            os.replace(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in cache.glob(f"{key}-*"):  # earlier versions of this URI
            if old != local:
                shutil.rmtree(old, ignore_errors=True)
    return local


def upload(local: Path, uri: str) -> None:
    """Copy the dataset directory `local` to `uri`, its manifest last: a reader of `uri` finds either the
    whole dataset or no dataset.json (the state an upload cut short leaves, which nothing opens)."""
    from dedn.errors import OutputError

    uri = uri.rstrip("/")
    files = sorted((p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST_FILE),
                   key=lambda p: str(p)) + [local / MANIFEST_FILE]
    try:
        fs, base = filesystem(uri)
        for p in files:
            with open(p, "rb") as src, fs.open_output_stream(f"{base}/{p.relative_to(local).as_posix()}") as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
    except (OSError, ValueError) as e:
        raise OutputError(uri, store_reason(e)) from None
