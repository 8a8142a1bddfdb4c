"""An archive in an S3-compatible bucket, through aiobotocore (botocore on aiohttp).

Objects have the keys a folder archive has paths, under the bucket URL's prefix:
``PREFIX/<folder>/00.png``, ``PREFIX/<folder>/task.json``; fetcher's own objects
live under ``PREFIX/.fetcher/`` (the lock, the state snapshot). The state itself
and the work folder stay on this machine (:func:`state_path`): downloads stage
there, resumable, and go up only whole and verified, with a ``Content-MD5`` the
store checks, and their SHA-256 as ``x-amz-meta-sha256`` so ``verify`` can
compare with a HEAD. Files over :data:`SINGLE_PUT_LIMIT` go up in a multipart
upload of :data:`PARTS_IN_FLIGHT` parts at a time: memory is part size times
parts in flight, whatever the file's size; a failed one is aborted.

Before a file goes up, a small marker beside its work file names the object; a
run killed after the upload and before its row was committed finds the object
by that marker (one HEAD) instead of downloading the file again.

Credentials, region and endpoint are botocore's, as the AWS CLI takes them
(``AWS_*`` variables, ``AWS_PROFILE`` and ``~/.aws``); the secret never leaves
botocore's signer. botocore's own retries are off: throttling, 5xx and dropped
connections are retried once, by :class:`~fetcher.retry.RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import platformdirs
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from ..durable import make_folders
from ..errors import ArchiveError, LockedError, StoreFailing, StoreRefused
from ..retry import RETRY_STATUSES, RetryPolicy, attempts, parse_retry_after
from ..state.address import DatabaseUrl
from . import BucketUrl, Placed
from .local import SIDECAR_NAME, archive_error, clean_work_folder, work_file
from .rooms import RunRoom, open_room, remove_if_empty
from .s3lock import BucketLock

if TYPE_CHECKING:
    from ..config import Settings

META = ".fetcher"
#: Larger files go up in parts.
SINGLE_PUT_LIMIT = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
#: S3 allows at most this many parts; a larger file gets larger parts.
MAX_PARTS = 10_000
#: Parts uploaded at once: one part at a time was slower than curl followed by rclone.
PARTS_IN_FLIGHT = 3
SNAPSHOT = "state.sqlite"
#: The marker that says a work file's object was being, or was, uploaded.
MARKER = ".stored"

#: Error codes that say the credentials are wrong, whatever the status.
_BAD_CREDENTIALS = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
    }
)
_DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem"})
_FULL = frozenset({"QuotaExceeded", "XMinioAdminBucketQuotaExceeded", "XMinioStorageFull"})
#: Worth another attempt: throttling, the store's own trouble, a body damaged on the way.
_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "BadDigest",
        "InvalidDigest",
    }
)
_CONNECTION_ERRORS = (
    HTTPClientError,
    BotoConnectionError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
)

_log = logging.getLogger("fetcher")


def state_path(url: BucketUrl) -> Path:
    """Where a bucket archive's state lives by default: one file per bucket and prefix."""
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:12]
    return Path(platformdirs.user_data_dir("fetcher")) / "buckets" / f"{url.bucket}-{digest}.sqlite"


class Expected(Exception):
    """Internal: the store answered one of the statuses the caller asked to handle itself."""

    def __init__(self, status: int, response: Mapping[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.response = response


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """What the store takes from the settings."""

    endpoint: str | None = None
    addressing: str = "auto"
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 30.0
    connections: int = 4


class Bucket:
    """One bucket through one client; every request retried under the run's policy.

    A refusal that no retry can change (wrong key, no such bucket, denied) is
    :class:`StoreRefused` at once; a full quota is :class:`ArchiveError`, as a
    full disk is; what is still failing after the retries is :class:`ArchiveError`.
    """

    def __init__(self, url: BucketUrl, options: StoreOptions) -> None:
        self.url = url
        self.options = options
        self._stack = AsyncExitStack()
        self._client: Any = None
        self.endpoint = options.endpoint or ""
        #: Requests sent, by operation (tests and the benchmark read it).
        self.sent: dict[str, int] = {}

    async def open(self) -> None:
        session = get_session()
        style = self.options.addressing
        if style == "auto":
            style = "path" if _is_local(self.options.endpoint) else "virtual"
        client = await self._stack.enter_async_context(self._make(session, style))
        if self.options.addressing == "auto" and _is_local(client.meta.endpoint_url):
            # An endpoint from AWS_ENDPOINT_URL*: bucket.127.0.0.1 resolves nowhere.
            await self._stack.aclose()
            self._stack = AsyncExitStack()
            client = await self._stack.enter_async_context(self._make(session, "path"))
        self._client = client
        self.endpoint = str(client.meta.endpoint_url)

    def _make(self, session: Any, style: str) -> Any:
        config = AioConfig(
            retries={"total_max_attempts": 1},
            # The body is covered by the Content-MD5 the store checks: SigV4 would otherwise
            # SHA-256 every byte again, in the event loop, on any endpoint that is not HTTPS.
            s3={"addressing_style": style, "payload_signing_enabled": False},
            connect_timeout=self.options.timeout,
            read_timeout=self.options.timeout,
            max_pool_connections=self.options.connections * PARTS_IN_FLIGHT + 4,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return session.create_client("s3", endpoint_url=self.options.endpoint, config=config)

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    async def request(self, operation: str, *, expect: tuple[int, ...] = (), **params: Any) -> Any:
        """``operation`` (botocore's snake-case name) on this bucket; its response dict.

        A status in ``expect`` is raised as :class:`Expected` for the caller to handle.
        """
        call = getattr(self._client, operation)
        policy = self.options.policy
        attempt = 0
        while True:
            attempt += 1
            self.sent[operation] = self.sent.get(operation, 0) + 1
            try:
                return await call(Bucket=self.url.bucket, **params)
            except ClientError as exc:
                status, code = _status(exc), _code(exc)
                if status in expect:
                    raise Expected(status, exc.response) from None
                self._refuse(operation, status, code)
                reason = f"{code or 'HTTP ' + str(status)}"
                retry_after = parse_retry_after(_header(exc.response, "retry-after"))
                retryable = status in RETRY_STATUSES or code in _RETRY_CODES
            except (NoCredentialsError, PartialCredentialsError):
                raise StoreRefused(
                    "no usable AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,"
                    " or AWS_PROFILE"
                ) from None
            except _CONNECTION_ERRORS as exc:
                reason, retry_after, retryable = _connection_reason(exc), None, True
            if not retryable or attempt > policy.retries:
                raise StoreFailing(
                    f"bucket {self.url.bucket!r}: {_verb(operation)} failed: {reason}"
                    f" ({attempts(attempt)})"
                )
            _log.debug("%s: %s; trying again", operation, reason)
            await asyncio.sleep(policy.delay(attempt, retry_after))

    def _refuse(self, operation: str, status: int, code: str) -> None:
        """Raise what no retry can change: the credentials, the bucket, a denial, a full quota."""
        bucket = self.url.bucket
        if code in _BAD_CREDENTIALS:
            raise StoreRefused(
                f"the store rejected the AWS credentials ({code}) for bucket {bucket!r}"
            )
        if code == "NoSuchBucket" or (status == 404 and operation == "head_bucket"):
            raise StoreRefused(f"bucket {bucket!r} does not exist at {_host(self.endpoint)}")
        if code in _FULL:
            raise StoreFailing(f"bucket {bucket!r} is full ({code}) while writing")
        if code in _DENIED or status == 403:
            raise StoreRefused(f"access denied to bucket {bucket!r} ({_verb(operation)}: {code})")

    # -- objects ----------------------------------------------------------------------

    async def put(
        self, key: str, path: Path, *, size: int, sha256: str, content_type: str | None
    ) -> None:
        """Upload ``path`` to ``key``: one PUT, or a multipart upload for a large file."""
        extra: dict[str, Any] = {"Metadata": {"sha256": sha256}}
        if content_type:
            extra["ContentType"] = content_type
        if size <= SINGLE_PUT_LIMIT:
            data, md5 = await asyncio.to_thread(_read_at, path, 0, size + 1)
            if len(data) != size:
                raise ArchiveError(f"work file {str(path)!r} changed size before its upload")
            await self.request("put_object", Key=key, Body=data, ContentMD5=md5, **extra)
            return
        await self._multipart(key, path, size, extra)

    async def _multipart(self, key: str, path: Path, size: int, extra: dict[str, Any]) -> None:
        started = await self.request("create_multipart_upload", Key=key, **extra)
        upload_id = started["UploadId"]
        part_size = max(PART_SIZE, -(-size // MAX_PARTS))
        etags: dict[int, str] = {}
        try:
            slots = asyncio.Semaphore(PARTS_IN_FLIGHT)
            async with asyncio.TaskGroup() as group:
                for number, offset in enumerate(range(0, size, part_size), start=1):
                    # A slot is taken before the part is read: at most PARTS_IN_FLIGHT in memory.
                    await slots.acquire()
                    part = await asyncio.to_thread(_read_at, path, offset, part_size)
                    group.create_task(self._part(key, upload_id, number, part, slots, etags))
            parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
            await self.request(
                "complete_multipart_upload",
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException as exc:
            with suppress(Exception):
                await asyncio.shield(self.abort(key, upload_id))
            if isinstance(exc, BaseExceptionGroup):
                first = _first_error(exc)
                if first is not None:
                    raise first from None
            raise

    async def _part(
        self,
        key: str,
        upload_id: str,
        number: int,
        part: tuple[bytes, str],
        slots: asyncio.Semaphore,
        etags: dict[int, str],
    ) -> None:
        data, md5 = part
        try:
            answer = await self.request(
                "upload_part",
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ContentMD5=md5,
            )
            etags[number] = answer["ETag"]
        finally:
            slots.release()

    async def abort(self, key: str, upload_id: str) -> None:
        await self.request("abort_multipart_upload", Key=key, UploadId=upload_id, expect=(404,))

    async def abort_all(self, prefix: str) -> int:
        """Abort every multipart upload still open under ``prefix``; how many there were."""
        count = 0
        params: dict[str, Any] = {"Prefix": prefix}
        while True:
            page = await self.request("list_multipart_uploads", **params)
            for upload in page.get("Uploads", []):
                with suppress(Expected):
                    await self.abort(upload["Key"], upload["UploadId"])
                count += 1
            if not page.get("IsTruncated"):
                return count
            params = {
                "Prefix": prefix,
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }

    async def head(self, key: str) -> Mapping[str, Any] | None:
        """The object's HEAD, or None when there is no such object."""
        try:
            answer: Mapping[str, Any] = await self.request("head_object", Key=key, expect=(404,))
        except Expected:
            return None
        return answer

    async def read(self, key: str, sink: Callable[[bytes], object]) -> str | None:
        """The object's bytes handed to ``sink`` block by block; their SHA-256, or None when
        there is no object."""
        try:
            answer = await self.request("get_object", Key=key, expect=(404,))
        except Expected:
            return None
        digest = hashlib.sha256()
        try:
            async with answer["Body"] as body:
                while chunk := await body.read(1024 * 1024):
                    digest.update(chunk)
                    sink(chunk)
        except _CONNECTION_ERRORS as exc:
            raise StoreFailing(
                f"bucket {self.url.bucket!r}: reading {key!r} failed: {_connection_reason(exc)}"
            ) from None
        return digest.hexdigest()


class S3Store:
    """The :class:`~fetcher.stores.ArchiveStore` of a bucket."""

    def __init__(self, url: BucketUrl, settings: Settings | None = None) -> None:
        self.url = url
        self.name = str(url)
        state = settings.state if settings is not None else None
        #: A PostgreSQL state: no SQLite file here, and no snapshot in the bucket.
        self.state_url = state if isinstance(state, DatabaseUrl) else None
        local = state if isinstance(state, Path) else None
        self.db_path = local.expanduser().absolute() if local else state_path(url)
        self.work_dir = self.db_path.with_name(self.db_path.name + ".work")
        options = StoreOptions()
        if settings is not None:
            options = StoreOptions(
                endpoint=settings.s3_endpoint,
                addressing=settings.s3_addressing,
                policy=RetryPolicy(retries=settings.retries, base=settings.retry_wait),
                timeout=settings.timeout,
                connections=settings.downloads,
            )
        self.bucket = Bucket(url, options)
        self.lock = BucketLock(self.bucket, url.key(f"{META}/lock"))
        #: Markers of files this run placed or picked up: dropped once the state is closed.
        self._settled: list[Path] = []
        #: On a shared state, the run's own work folder (:meth:`work_in_room`).
        self._room: RunRoom | None = None

    def exists(self) -> bool:
        return self.state_url is not None or self.db_path.is_file()

    async def open(self) -> None:
        try:
            make_folders(self.work_dir)
        except OSError as exc:
            raise archive_error(exc, self.work_dir) from exc
        await self.bucket.open()
        await self.bucket.request("head_bucket")

    async def close(self) -> None:
        await self.bucket.close()

    @asynccontextmanager
    async def wait_lock(
        self,
        wait: float | None,
        stop: asyncio.Event | None = None,
        waiting: Callable[[], None] | None = None,
    ) -> AsyncIterator[bool]:
        held = await self.lock.acquire(wait, stop or asyncio.Event(), waiting, self.name)
        try:
            yield held
        finally:
            if held:
                await self.lock.release()
        if self.lock.lost is not None:
            raise LockedError(self.lock.lost)

    async def clean(self) -> None:
        """Restore the state from the snapshot when this host has none; abort open uploads."""
        await self.restore_state()
        aborted = await self.bucket.abort_all(self.url.root)
        if aborted:
            _log.info("aborted %d multipart upload(s) an earlier run left open", aborted)
        try:
            clean_work_folder(self.work_dir, keep=(MARKER,))
        except OSError as exc:
            raise archive_error(exc, self.work_dir) from exc

    async def restore_state(self) -> bool:
        """A host with no state for this bucket starts from its snapshot; False: there is none."""
        if self.exists():
            return True
        make_folders(self.db_path.parent)
        temp = self.db_path.with_name(self.db_path.name + ".restore")
        key = self.url.key(f"{META}/{SNAPSHOT}")
        with temp.open("wb") as handle:
            digest = await self.bucket.read(key, handle.write)
        if digest is None:
            return False
        head = await self.bucket.head(key)
        recorded = (head or {}).get("Metadata", {}).get("sha256")
        if recorded and recorded != digest:
            temp.unlink(missing_ok=True)
            raise ArchiveError(f"the state snapshot in {self.name} does not match its checksum")
        for leftover in ("-wal", "-shm"):
            self.db_path.with_name(self.db_path.name + leftover).unlink(missing_ok=True)
        temp.replace(self.db_path)
        _log.info("state restored from %s/%s/%s", self.name, META, SNAPSHOT)
        return True

    def work_path(self, task_id: str, index: int) -> Path:
        if self._room is not None:
            return self._room.file(task_id, index)
        return work_file(self.work_dir, task_id, index)

    def work_in_room(self, run_id: str, live: Callable[[], Collection[str]]) -> None:
        self._room = open_room(self.work_dir, run_id, live, keep=(MARKER,))

    def leave_room(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            room.close()

    async def stored(self, task_id: str, index: int) -> Placed | None:
        marker = self.work_path(task_id, index).with_suffix(MARKER)
        try:
            placed = Placed(**json.loads(marker.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            marker.unlink(missing_ok=True)
            return None
        head = await self.bucket.head(self.url.key(placed.path))
        if head is not None and _matches(head, placed):
            self._settled.append(marker)
            marker.with_suffix(".part").unlink(missing_ok=True)
            return placed
        marker.unlink(missing_ok=True)
        return None

    async def put_file(self, work_file: Path, placed: Placed) -> None:
        key = self._key(placed.path)
        marker = work_file.with_suffix(MARKER)
        try:
            _write_synced(marker, json.dumps(_placed_json(placed)).encode())
        except OSError as exc:
            raise archive_error(exc, marker) from exc
        await self.bucket.put(
            key,
            work_file,
            size=placed.size,
            sha256=placed.sha256,
            content_type=placed.content_type,
        )
        self._settled.append(marker)
        work_file.unlink(missing_ok=True)

    async def put_sidecar(self, folder: PurePosixPath, document: Mapping[str, Any]) -> None:
        data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
        await self.bucket.request(
            "put_object",
            Key=self._key(folder / SIDECAR_NAME),
            Body=data,
            ContentMD5=_md5(data),
            ContentType="application/json",
            Metadata={"sha256": hashlib.sha256(data).hexdigest()},
        )

    async def quarantine(self, relative: str) -> str | None:
        """Copy the object at ``relative`` under ``.fetcher/quarantine/`` before it is replaced.

        The store copies it (no byte through this host); it keeps its relative path
        there, and a name already taken gets ``.1``, ``.2``, ... Returns where it went
        (archive-relative), or None when there was no object.
        """
        source = self._key(relative)
        if await self.bucket.head(source) is None:
            return None
        base = f"{META}/quarantine/{PurePosixPath(relative)}"
        target, n = base, 0
        while await self.bucket.head(self.url.key(target)) is not None:
            n += 1
            target = f"{base}.{n}"
        copy = {"Bucket": self.url.bucket, "Key": source}
        await self.bucket.request("copy_object", Key=self.url.key(target), CopySource=copy)
        return target

    def has_file(self, relative: str) -> bool:
        """The state's record stands: checking would be a request on an archived object."""
        return True

    async def committed(self) -> None:
        """Store a snapshot of the state when it changed; drop the markers of recorded files.

        Not after the lock was lost: the snapshot is the run's that holds it now; and
        none of a PostgreSQL state, which is shared where it is.
        """
        if self.lock.lost is None and self.state_url is None:
            await self.snapshot()
        for marker in self._settled:
            marker.unlink(missing_ok=True)
            if marker.parent != self.work_dir:  # a run's own folder, left when the run ended
                remove_if_empty(marker.parent)
        self._settled.clear()

    async def snapshot(self) -> bool:
        """Upload a consistent copy of the state (SQLite's backup API) if it changed."""
        copy = self.work_dir / f"{SNAPSHOT}.copy"
        try:
            _backup(self.db_path, copy)
        except sqlite3.Error as exc:
            copy.unlink(missing_ok=True)
            raise ArchiveError(f"cannot copy the state {str(self.db_path)!r}: {exc}") from exc
        try:
            digest = _file_sha256(copy)
            key = self.url.key(f"{META}/{SNAPSHOT}")
            head = await self.bucket.head(key)
            if head is not None and head.get("Metadata", {}).get("sha256") == digest:
                return False
            await self.bucket.put(
                key,
                copy,
                size=copy.stat().st_size,
                sha256=digest,
                content_type="application/vnd.sqlite3",
            )
        finally:
            copy.unlink(missing_ok=True)
        return True

    def _key(self, relative: PurePosixPath | str) -> str:
        """The object key of an archive-relative path; never outside the prefix or in META."""
        path = PurePosixPath(relative)
        if path.parts and path.parts[0] == META:
            raise ArchiveError(f"refusing path {str(relative)!r}: inside the archive's own folder")
        try:
            return self.url.key(path)
        except ValueError:
            raise ArchiveError(f"refusing path {str(relative)!r}: outside the archive") from None


def _matches(head: Mapping[str, Any], placed: Placed) -> bool:
    return bool(
        head.get("ContentLength") == placed.size
        and head.get("Metadata", {}).get("sha256") == placed.sha256
    )


def _placed_json(placed: Placed) -> dict[str, Any]:
    return {
        "path": placed.path,
        "size": placed.size,
        "sha256": placed.sha256,
        "content_type": placed.content_type,
    }


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _backup(source: Path, target: Path) -> None:
    src = sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _read_at(path: Path, offset: int, size: int) -> tuple[bytes, str]:
    """``size`` bytes of ``path`` from ``offset``, and their Content-MD5: read and hashed in
    the caller's worker thread (hashlib lets go of the GIL), not in the event loop."""
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    return data, _md5(data)


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 (S3's own check)


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def _header(response: Mapping[str, Any], name: str) -> str | None:
    value = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(name)
    return str(value) if value is not None else None


def _connection_reason(exc: BaseException) -> str:
    """A dropped or refused connection in a few words; never the request's headers."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"connection failed ({type(exc).__name__})"


def _verb(operation: str) -> str:
    return operation.replace("_", " ")


def _host(endpoint: str | None) -> str:
    return urlsplit(endpoint or "").netloc.rpartition("@")[2] or "the default endpoint"


def _is_local(endpoint: str | None) -> bool:
    """Whether an endpoint is an IP address or localhost: no DNS name for bucket.host there."""
    if not endpoint:
        return False
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_error(exc)
            if found is not None:
                return found
        elif isinstance(exc, Exception):
            return exc
    return None
