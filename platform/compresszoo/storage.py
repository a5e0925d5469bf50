"""One job: turn a URI (local path, file://, s3://bucket/prefix) into a pyarrow filesystem
and a path, plus the few byte-level helpers every other part needs (atomic write, read, exists).

S3 settings come only from the environment, never from code, and are never logged:

    AWS_ENDPOINT_URL or COMPRESSZOO_S3_ENDPOINT   e.g. http://127.0.0.1:9000 (unset: AWS)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY       unset: the AWS SDK's default chain
    AWS_REGION (or AWS_DEFAULT_REGION)             default us-east-1

Writes are atomic: a local file is written to a temporary name in the same folder and
renamed over the target (os.replace); an S3 object only appears when its upload completes.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = [
    "resolve",
    "join",
    "is_remote",
    "exists",
    "read_bytes",
    "write_bytes",
    "staged_file",
    "size",
    "delete",
    "remove_stale_temporaries",
]

_TMP_MARK = ".tmp-"


def _s3_filesystem() -> pafs.S3FileSystem:
    # Without this the AWS SDK probes the EC2 metadata service and stalls for seconds
    # whenever credentials are not in the environment (tests, MinIO, laptops).
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = os.environ.get("COMPRESSZOO_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict = {"region": region}
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path, file:// URI or s3://bucket/key."""
    uri = os.fspath(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{uri!r}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
        return _s3_filesystem(), f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise ValueError(f"{uri!r}: unsupported scheme {parsed.scheme!r}; use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def is_remote(uri: str | os.PathLike) -> bool:
    return urlparse(os.fspath(uri)).scheme == "s3"


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join relative path parts onto a URI or local path with '/' (keeps the scheme).

    The result always stays under `base`: a part that is absolute or has a '..' component
    (which os.path.join would let replace or climb out of `base`) raises ValueError.
    """
    base = os.fspath(base)
    for part in parts:
        text = os.fspath(part)
        pieces = text.replace(os.sep, "/").split("/")
        if text.startswith(("/", os.sep)) or os.path.isabs(text) or "://" in text or ".." in pieces:
            raise ValueError(f"path part {text!r} is absolute or climbs with '..'; "
                             f"give a path relative to {base!r}")
    if "://" in base:
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def exists(uri: str | os.PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(uri: str | os.PathLike) -> int | None:
    """Size in bytes of a file, or None if there is none."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def delete(uri: str | os.PathLike) -> None:
    """Delete a file; a missing file is not an error."""
    fs, path = resolve(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `uri` atomically: readers see the old content or the new, never a part."""
    with staged_file(uri) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def staged_file(uri: str | os.PathLike) -> Iterator[str]:
    """Yield a local path to write; on a clean exit it atomically becomes `uri`.

    Local targets are staged next to the target (same filesystem, so os.replace is atomic);
    S3 targets are staged in the system temp folder and uploaded in one request. On an
    exception the staged file is removed and `uri` is left untouched.
    """
    fs, path = resolve(uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    if local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
    else:
        fd, tmp = tempfile.mkstemp(prefix="compresszoo-")
        os.close(fd)
    try:
        yield tmp
        if local:
            os.replace(tmp, path)
        else:
            _upload(fs, tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _upload(fs: pafs.FileSystem, local_path: str, path: str) -> None:
    # One PutObject (or one multipart upload for big files): S3 makes the object visible
    # only when the upload completes, so a crash never leaves a partial object.
    with open(local_path, "rb") as src, fs.open_output_stream(path) as dst:
        while chunk := src.read(8 << 20):
            dst.write(chunk)


def remove_stale_temporaries(uri: str | os.PathLike) -> int:
    """Delete leftovers of interrupted local atomic writes under a folder; return how many."""
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem) or not os.path.isdir(path):
        return 0
    removed = 0
    for name in os.listdir(path):
        if _TMP_MARK in name:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, name))
                removed += 1
    return removed


def ray_storage(uri: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig from a local path or s3:// URI."""
    if is_remote(uri):
        fs, path = resolve(uri)
        return path, fs
    return os.path.abspath(uri), None
