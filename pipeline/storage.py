"""URIs for local paths and ``s3://`` object storage, one fsspec code path for both.

S3 goes through s3fs; the endpoint comes from ``AWS_ENDPOINT_URL`` so any S3-compatible store
(MinIO, moto in tests) works, credentials from the standard AWS chain (environment, instance
role) — never from code or configs. ``arrow_filesystem`` hands the same filesystem to pyarrow
and Ray Data.

Snapshots are published atomically: everything is written under a staging prefix, then the
manifest is written last. Readers take a folder as complete only if its manifest exists.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any, Iterator

import fsspec

# botocore's "standard" retry mode backs off on throttling and 5xx/connection errors: transient
# object-store failures are retried instead of failing a long job.
S3_RETRIES = {"max_attempts": 10, "mode": "standard"}


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _s3_options() -> dict[str, Any]:
    options: dict[str, Any] = {"config_kwargs": {"retries": S3_RETRIES}}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a local path, ``file://`` or ``s3://`` URI."""
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        import s3fs

        # No listing cache: Ray workers write objects this process must see at once (staging
        # folders, checkpoints); a cached listing made `exists` miss fresh files.
        fs = s3fs.S3FileSystem(use_listings_cache=False, **_s3_options())
        return fs, uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    return fsspec.filesystem("file"), os.path.abspath(uri)


def arrow_filesystem(uri: str):
    """(pyarrow FileSystem, path) for pyarrow.parquet and Ray Data ``filesystem=`` arguments."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join path components; keeps the scheme of remote URIs."""
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *[p.strip("/") for p in parts])
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_npy(uri: str):
    import numpy as np

    # allow_pickle=False: an .npy from a dataset can never execute code.
    return np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False)


def write_npy(uri: str, array) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes(uri, buf.getvalue())


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under ``uri``; empty if it does not exist."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def walk_files(uri: str, suffix: str = "") -> Iterator[str]:
    """Relative paths of every file under ``uri`` ending with ``suffix`` (sorted)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return iter(())
    found = fs.find(path)
    base = path.rstrip("/") + "/"
    rels = [p[len(base):] if p.startswith(base) else p for p in found]
    return iter(sorted(r for r in rels if r.endswith(suffix)))


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


def redact(text: str) -> str:
    """Remove anything that looks like an AWS credential from text meant for logs or errors."""
    import re

    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(key)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(?i)(aws_secret_access_key|aws_session_token|secret|token)=\S+", r"\1=***", text)
