"""Object storage behind one small interface: a local directory or S3.

Objects are written whole and never modified in place, except pointer objects
(a run's HEAD), which are replaced atomically. `delete` is a purge: on a versioned
bucket it removes every version and delete marker of the key, because a deleted
record must not survive in an older version (ALGORITHMS.md rule 6).

Values are bytes; callers store safetensors and JSON only, and nothing read back
is ever unpickled. Content-addressed objects (named `<sha256>.<ext>`) are checked on
every read, so a flipped byte on disk or in a bucket fails the read instead of changing a
prediction or being built on by the next deletion.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from typing import Protocol

from .errors import IntegrityError, UnlearnError
from .records import shown_path

DEFAULT_STORE = "./unlearn-store"


class Store(Protocol):
    uri: str

    def put(self, key: str, data: bytes) -> None: ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; False if it did (an atomic test-and-set)."""

    def get(self, key: str) -> bytes:
        """The object's bytes; KeyError if absent. If the key's last component is
        `<64 lowercase hex>.<ext>`, the bytes' SHA-256 must equal that hex, else
        IntegrityError (see `checked`)."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]: ...

    def list_all(self, prefix: str) -> list[str]:
        """Every key under `prefix` that still has bytes anywhere: current objects, older
        versions, keys hidden behind a delete marker, half-written temporary files.
        Garbage collection and `drop` walk this, so interrupted purges are finished."""

    def delete(self, key: str) -> None: ...

    def prune_versions(self, key: str) -> None:
        """Drop every version of `key` but the current one (no-op where there are none)."""

    def stale_temporary(self, prefix: str, older_than_s: float) -> list[str]:
        """Temporary objects a killed writer left under `prefix`, older than `older_than_s`."""

    def check(self) -> None:
        """Raise UnlearnError if the store cannot be written (before any work starts)."""


_CONTENT_NAME = re.compile(r"([0-9a-f]{64})\.[A-Za-z0-9]+")


def checked(uri: str, key: str, data: bytes) -> bytes:
    """`data` as read from `key`, after checking a content-addressed name against it.
    Every backend's `get` goes through here: objects are named by their SHA-256 when
    written, and nothing else would notice bit rot or an edit that kept the name. One
    pass of SHA-256 over bytes already in memory; other keys (HEAD, LOCK, checkpoints,
    request logs) pass unchecked."""
    match = _CONTENT_NAME.fullmatch(key.rsplit("/", 1)[-1])
    if match:
        got = hashlib.sha256(data).hexdigest()
        if got != match.group(1):
            raise IntegrityError(f"store {uri}: object {key} is corrupted (its SHA-256 is {got[:16]}..., not the "
                                 f"one in its name); nothing was built on it")
    return data


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}")


_TEMP = re.compile(r"\.tmp-([0-9a-f]{12})-(\d+)-(\d*)-")


def temporary_prefix() -> str:
    """`.tmp-<machine>-<pid>-<start>-`: a temporary file names its writer, so the next
    deletion can tell at once that a killed writer left it (and remove what it may say)."""
    pid = os.getpid()  # per call: a forked child writes under its own name
    return _writer_prefix(pid)


@functools.lru_cache(maxsize=4)
def _writer_prefix(pid: int) -> str:
    from .procs import machine_id, process_start

    return f".tmp-{machine_id()}-{pid}-{process_start(pid)}-"


def temporary_writer_gone(name: str) -> bool | None:
    """Whether the writer of temporary file `name` is gone: None when it cannot be told
    here (another machine, or a name without its writer)."""
    from .procs import machine_id, process_alive

    m = _TEMP.match(name)
    if not m or m.group(1) != machine_id():
        return None
    return not process_alive(int(m.group(2)), m.group(3))


class LocalStore:
    """A directory tree; writes go to a temporary file, fsync, then rename."""

    def __init__(self, root: str):
        _check_controls(root, root)
        self.root = os.path.abspath(root)
        self.uri = self.root

    def _path(self, key: str) -> str:
        _check_key(key)
        return os.path.join(self.root, *key.split("/"))

    def _publish(self, key: str, data: bytes, exclusive: bool) -> bool:
        """Write `data` to a temporary file next to the key, fsync it, then make it the
        key: by rename (replacing), or by hard link, which fails if the key exists (create
        only if absent). Readers never see a partial object, and a crash never leaves an
        empty one (for a lock, one nobody could attribute)."""
        path = self._path(key)
        for attempt in range(5):  # a concurrent delete may remove the folder once it is empty
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=temporary_prefix())
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise UnlearnError(f"store {shown_path(self.root)}: cannot write {key}: its folder keeps vanishing") from None
            except OSError as exc:
                raise UnlearnError(f"store {shown_path(self.root)}: cannot write {key}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
            _fsync_dir(os.path.dirname(path))  # the rename itself must survive a power cut
            return True
        except OSError as exc:
            raise UnlearnError(f"store {shown_path(self.root)}: cannot write {key}: {exc.strerror}") from None
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def put(self, key: str, data: bytes) -> None:
        self._publish(key, data, exclusive=False)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._publish(key, data, exclusive=True)

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise UnlearnError(f"store {shown_path(self.root)}: cannot read {key}: {exc.strerror}") from None
        return checked(self.root, key, data)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def _walk(self, prefix: str, temporary: bool) -> list[str]:
        base = os.path.join(self.root, *[p for p in prefix.split("/") if p])
        if not os.path.isdir(base):
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-") and not temporary:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                out.append(rel.replace(os.sep, "/"))
        return sorted(k for k in out if k.startswith(prefix))

    def list(self, prefix: str) -> list[str]:
        return self._walk(prefix, temporary=False)

    def stale_temporary(self, prefix: str, older_than_s: float) -> list[str]:
        """Temporary files a killed writer left under `prefix`: they may hold what was
        deleted. A file named by a writer on this machine is stale as soon as that process
        is gone, and never while it runs; any other (another machine sharing the folder, an
        older name) once older than `older_than_s`, so a write in progress is not among them."""
        import time

        now = time.time()
        out = []
        for key in self._walk(prefix, temporary=True):
            name = key.rsplit("/", 1)[-1]
            if not name.startswith(".tmp-"):
                continue
            gone = temporary_writer_gone(name)
            if gone is None:
                try:
                    gone = now - os.path.getmtime(self._path(key)) > older_than_s
                except OSError:
                    continue
            if gone:
                out.append(key)
        return out

    def list_all(self, prefix: str) -> list[str]:
        return self._walk(prefix, temporary=True)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise UnlearnError(f"store {shown_path(self.root)}: cannot delete {key}: {exc.strerror}") from None
        # remove directories left empty, up to the store root
        d = os.path.dirname(path)
        while d != self.root and d.startswith(self.root):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)

    def prune_versions(self, key: str) -> None:
        return None

    def check(self) -> None:
        probe = self.root
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
            raise UnlearnError(f"store {shown_path(self.root)}: {shown_path(probe)} is not a writable directory")


class S3Store:
    """`s3://bucket/prefix` through boto3, configured by the standard AWS_* variables
    (AWS_ENDPOINT_URL for a local server such as SeaweedFS)."""

    def __init__(self, bucket: str, prefix: str = "", client=None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3",
                region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
            )
        self.client = client

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise KeyError(kwargs.get("Key", "")) from None
            raise UnlearnError(f"{self.uri}: {what} failed: {code or exc}") from None
        except BotoCoreError as exc:
            raise UnlearnError(f"{self.uri}: {what} failed: {exc}") from None

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise UnlearnError(f"{self.uri}: bucket {self.bucket!r} does not exist (NoSuchBucket)") from None
            if code in ("403", "AccessDenied", "Forbidden"):
                raise UnlearnError(f"{self.uri}: access denied; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
            raise UnlearnError(f"{self.uri}: cannot reach the bucket: {code or exc}") from None
        except BotoCoreError as exc:
            raise UnlearnError(f"{self.uri}: cannot reach the bucket: {exc}") from None

    def put(self, key: str, data: bytes) -> None:
        self._call("put", self.client.put_object, Key=self._key(key), Body=data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise UnlearnError(f"{self.uri}: put failed: {exc.response.get('Error', {}).get('Code') or exc}") from None

    def get(self, key: str) -> bytes:
        data = self._call("get", self.client.get_object, Key=self._key(key))["Body"].read()
        return checked(self.uri, key, data)

    def exists(self, key: str) -> bool:
        try:
            self._call("head", self.client.head_object, Key=self._key(key))
            return True
        except KeyError:
            return False

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        keys: list[str] = []
        token = None
        while True:
            kwargs = {"Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", self.client.list_objects_v2, **kwargs)
            for obj in resp.get("Contents", []):
                k = obj["Key"]
                keys.append(k[len(self.prefix) + 1:] if self.prefix else k)
            if not resp.get("IsTruncated"):
                break
            token = resp.get("NextContinuationToken")
        return sorted(keys)

    def stale_temporary(self, prefix: str, older_than_s: float) -> list[str]:
        return []  # a PUT is atomic: no temporary objects

    def _version_pages(self, prefix: str):
        kwargs: dict = {"Prefix": prefix}
        while True:
            resp = self._call("list versions", self.client.list_object_versions, **kwargs)
            yield resp.get("Versions", []) + resp.get("DeleteMarkers", [])
            if not resp.get("IsTruncated"):
                return
            kwargs = {"Prefix": prefix, "KeyMarker": resp.get("NextKeyMarker"),
                      "VersionIdMarker": resp.get("NextVersionIdMarker")}

    def _versions(self, key: str) -> list[dict]:
        """Every version and delete marker of exactly `key` (the "null" version included)."""
        full = self._key(key)
        return [v for page in self._version_pages(full) for v in page if v["Key"] == full]

    def list_all(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        keys = {v["Key"] for page in self._version_pages(full) for v in page}
        return sorted(k[len(self.prefix) + 1:] if self.prefix else k for k in keys)

    def _delete_versions(self, key: str, versions: list[dict]) -> None:
        """Delete these exact versions. The "null" version (written while versioning was
        off) is deleted by that id too: a plain delete would only hide it behind a marker."""
        full = self._key(key)
        for v in versions:
            vid = v.get("VersionId")
            if vid:
                self._call("delete version", self.client.delete_object, Key=full, VersionId=vid)
            else:
                self._call("delete", self.client.delete_object, Key=full)

    def delete(self, key: str) -> None:
        versions = self._versions(key)
        self._delete_versions(key, versions)
        if self._versions(key):  # a server that ignores VersionId="null" on unversioned buckets
            self._call("delete", self.client.delete_object, Key=self._key(key))
            left = self._versions(key)
            if left:
                raise UnlearnError(f"{self.uri}: {key} still has {len(left)} version(s) after the purge")

    def prune_versions(self, key: str) -> None:
        versions = self._versions(key)
        latest = [v for v in versions if v.get("IsLatest") and "Size" in v]
        keep = latest[0].get("VersionId") if latest else None
        self._delete_versions(key, [v for v in versions if v.get("VersionId") != keep])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_controls(path: str, uri: str, what: str = "the directory's path") -> None:
    """A local store's directory (after percent-decoding) may not contain NUL (no system
    call takes it) or other control characters (each message naming the store would carry
    them to the terminal); nor may an S3 URI."""
    bad = next((c for c in path if ord(c) < 32 or 127 <= ord(c) < 160), None)
    if bad is not None:
        raise UnlearnError(f"store {shown_path(uri)}: {what} contains the control character "
                           f"U+{ord(bad):04X}; choose one without control characters")


def local_path(uri: str) -> str:
    """The directory a `file:` URI names: `file:///abs/path` (or `file:/abs/path`, `file://localhost/abs/path`),
    percent-escapes decoded, as Ray, pyarrow and fsspec read them. A host other than
    localhost would be another machine's file system, which this backend cannot reach."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise UnlearnError(f"store {uri!r}: file URIs name a local path (file:///abs/path); host "
                           f"{parts.netloc!r} is not this machine: mount it and give the directory")
    if parts.query or parts.fragment or not parts.path.startswith("/"):
        raise UnlearnError(f"store {uri!r}: expected file:///absolute/path")
    return unquote(parts.path, errors="surrogateescape")


def open_store(uri: str | None = None) -> Store:
    """`s3://bucket[/prefix]`, a local directory or `file:///directory`; default
    $UNLEARN_STORE or ./unlearn-store."""
    uri = uri or os.environ.get("UNLEARN_STORE") or DEFAULT_STORE
    if uri.startswith("s3://"):
        _check_controls(uri, uri, "the URI")
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UnlearnError(f"store {uri!r}: missing bucket name (s3://bucket/prefix)")
        return S3Store(bucket, prefix)
    path = local_path(uri) if uri[:6].lower() == "file:/" else uri
    _check_controls(path, uri)
    if "://" in path:
        raise UnlearnError(f"store {uri!r}: unsupported scheme; use a directory, file:///directory or s3://bucket/prefix")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UnlearnError(f"store {uri!r}: exists and is not a directory")
    return LocalStore(path)
