"""One S3 library on one job, in a fresh process: what ``bench/s3_libs.py`` measures.

The parent runs this file with the venv that has both libraries (see ``s3_libs.py``),
so every measurement starts cold and pays the same process costs. Only the standard
library is imported at the top: the jobs that time transfers import the library and
build the client before the clock starts, so the time covers the requests alone.

    python bench/s3_libs_child.py --lib aiobotocore|obstore --job import|small|large|get|caps
        --endpoint URL --bucket B [--files DIR] [--file F] [--part-size N] [--parallel N]

Credentials and region come from the environment (``AWS_ACCESS_KEY_ID``, ...), which
the parent sets. Prints one JSON object. Both libraries send a checksum the store
checks on every upload, as the archive needs: aiobotocore ``Content-MD5`` (and no
CRC32 of its own on top: ``request_checksum_calculation="when_required"``), obstore
``x-amz-checksum-sha256``, the only kind it offers besides CRC64NVME.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

LIBS = ("aiobotocore", "obstore")
JOBS = ("import", "small", "large", "get", "caps")
DISTRIBUTIONS = {"aiobotocore": ("aiobotocore", "botocore", "aiohttp"), "obstore": ("obstore",)}
READ_CHUNK = 1024 * 1024
#: The archive's own threshold: files over this go up in parts.
MULTIPART_OVER = 16 * 1024 * 1024


def vmhwm_kib() -> int:
    """This process's peak RSS since its exec (``ru_maxrss`` would carry the forker's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def part_ranges(size: int, part: int) -> list[tuple[int, int]]:
    return [(start, min(part, size - start)) for start in range(0, size, part)]


def read_range(path: Path, start: int, length: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(start)
        return handle.read(length)


async def workers(count: int, items: list[Any], job: Callable[[Any], Awaitable[None]]) -> None:
    """``count`` workers take the next item until none is left: that many in flight."""
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            await job(item)

    await asyncio.gather(*(worker() for _ in range(count)))


# -- aiobotocore --------------------------------------------------------------------------


def botocore_config(parallel: int, addressing: str = "path") -> Any:
    from aiobotocore.config import AioConfig

    return AioConfig(
        max_pool_connections=parallel,
        s3={"addressing_style": addressing},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


class Boto:
    """aiobotocore: ``put_object`` with Content-MD5; multipart by hand, as the archive does."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def client(self) -> Any:
        import aiobotocore.session

        session = aiobotocore.session.get_session()
        config = botocore_config(self.args.parallel)
        return session.create_client("s3", endpoint_url=self.args.endpoint, config=config)

    async def small(self, client: Any, files: list[Path]) -> int:
        async def put(path: Path) -> None:
            body = path.read_bytes()
            key = f"small/{path.name}"
            await client.put_object(
                Bucket=self.args.bucket, Key=key, Body=body, ContentMD5=md5_b64(body)
            )

        await workers(self.args.parallel, files, put)
        return len(files)

    async def large(self, client: Any, path: Path) -> int:
        bucket, key, size = self.args.bucket, f"large/{path.name}", path.stat().st_size
        upload = await client.create_multipart_upload(Bucket=bucket, Key=key)
        upload_id = upload["UploadId"]
        done: dict[int, str] = {}

        async def put(item: tuple[int, tuple[int, int]]) -> None:
            number, (start, length) = item
            body = await asyncio.to_thread(read_range, path, start, length)
            digest = await asyncio.to_thread(md5_b64, body)
            answer = await client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ContentMD5=digest,
            )
            done[number] = answer["ETag"]

        try:
            parts = list(enumerate(part_ranges(size, self.args.part_size), start=1))
            await workers(self.args.part_parallel, parts, put)
            listing = [{"PartNumber": n, "ETag": done[n]} for n in sorted(done)]
            await client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": listing}
            )
        except BaseException:
            await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        return size

    async def get(self, client: Any, path: Path) -> int:
        answer = await client.get_object(Bucket=self.args.bucket, Key=f"large/{path.name}")
        total = 0
        async with answer["Body"] as body:
            async for chunk in body.iter_chunks(READ_CHUNK):
                total += len(chunk)
        return total


# -- obstore ------------------------------------------------------------------------------


def obstore_store(endpoint: str, bucket: str, *, virtual: bool = False) -> Any:
    from obstore.store import S3Store

    return S3Store(
        bucket,
        endpoint=endpoint,
        region=os.environ["AWS_REGION"],
        access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        virtual_hosted_style_request=virtual,
        checksum_algorithm="sha256",
        client_options={"allow_http": True},
    )


class Obstore:
    """obstore: ``put_async`` from a path; it splits files over ``chunk_size`` into parts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def client(self) -> Any:
        import obstore  # noqa: F401 (imported before the clock, like aiobotocore's session)

        return _Plain(obstore_store(self.args.endpoint, self.args.bucket))

    async def small(self, store: Any, files: list[Path]) -> int:
        import obstore

        async def put(path: Path) -> None:
            await obstore.put_async(store, f"small/{path.name}", path)

        await workers(self.args.parallel, files, put)
        return len(files)

    async def large(self, store: Any, path: Path) -> int:
        import obstore

        await obstore.put_async(
            store,
            f"large/{path.name}",
            path,
            use_multipart=True,
            chunk_size=self.args.part_size,
            max_concurrency=self.args.part_parallel,
        )
        return path.stat().st_size

    async def get(self, store: Any, path: Path) -> int:
        import obstore

        answer = await obstore.get_async(store, f"large/{path.name}")
        total = 0
        async for chunk in answer.stream(min_chunk_size=READ_CHUNK):
            total += len(chunk)
        return total


class _Plain:
    """An async context manager around a store that needs no closing."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def __aenter__(self) -> Any:
        return self.store

    async def __aexit__(self, *exc: object) -> None:
        return None


# -- import time --------------------------------------------------------------------------


async def time_import(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds to import the library, then to build a client (no request is sent)."""
    started = time.perf_counter()
    if args.lib == "aiobotocore":
        import aiobotocore.session
        from aiobotocore.config import AioConfig  # noqa: F401 (part of what a client costs)

        imported = time.perf_counter()
        session = aiobotocore.session.get_session()
        async with session.create_client(
            "s3", endpoint_url=args.endpoint, config=botocore_config(args.parallel)
        ):
            built = time.perf_counter()
    else:
        import obstore.store  # noqa: F401

        imported = time.perf_counter()
        obstore_store(args.endpoint, args.bucket)
        built = time.perf_counter()
    return {"import_s": imported - started, "client_s": built - imported}


# -- what the archive needs ---------------------------------------------------------------


def head_checksum(endpoint: str, bucket: str, key: str) -> str | None:
    """The SHA-256 the store holds for ``key``, asked by botocore for either library."""
    import botocore.session

    session = botocore.session.get_session()
    s3 = session.create_client("s3", endpoint_url=endpoint)
    try:
        answer = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    finally:
        s3.close()
    return answer.get("ChecksumSHA256")


def profile_files(folder: Path) -> dict[str, str]:
    """A ``~/.aws`` pair naming profile ``bench``; returns the variables that select it."""
    (folder / "credentials").write_text(
        "[bench]\naws_access_key_id = AKIAPROFILEBENCH0000\n"
        "aws_secret_access_key = profile-secret-not-a-secret\n",
        encoding="utf-8",
    )
    (folder / "config").write_text("[profile bench]\nregion = eu-west-3\n", encoding="utf-8")
    return {
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "credentials"),
        "AWS_CONFIG_FILE": str(folder / "config"),
        "AWS_PROFILE": "bench",
    }


async def caps_boto(args: argparse.Namespace) -> dict[str, str]:
    import aiobotocore.session
    from botocore.exceptions import ClientError

    def code(error: ClientError) -> str:
        return str(error.response.get("Error", {}).get("Code", "?"))

    found: dict[str, str] = {}
    bucket = args.bucket
    session = aiobotocore.session.get_session()
    config = botocore_config(4)
    async with session.create_client("s3", endpoint_url=args.endpoint, config=config) as s3:
        body = b"caps"
        await s3.put_object(Bucket=bucket, Key="caps/md5", Body=body, ContentMD5=md5_b64(body))
        try:
            await s3.put_object(
                Bucket=bucket, Key="caps/md5-bad", Body=body, ContentMD5=md5_b64(b"other")
            )
            found["content_md5"] = "yes (ContentMD5=); this server stored a wrong one unchecked"
        except ClientError as error:
            found["content_md5"] = f"yes (ContentMD5=): a wrong one refused, {code(error)}"
        await s3.put_object(Bucket=bucket, Key="caps/sha", Body=body, ChecksumAlgorithm="SHA256")
        held = head_checksum(args.endpoint, bucket, "caps/sha")
        found["checksum"] = f"yes (ChecksumAlgorithm=, any of 5); store holds sha256 {held}"
        try:
            await s3.put_object(Bucket=bucket, Key="caps/md5", Body=body, IfNoneMatch="*")
            found["if_none_match"] = "sent (IfNoneMatch=); the store overwrote"
        except ClientError as error:
            found["if_none_match"] = f"yes (IfNoneMatch='*'): second put {code(error)}"
        etag = (await s3.head_object(Bucket=bucket, Key="caps/md5"))["ETag"]
        try:
            await s3.put_object(Bucket=bucket, Key="caps/md5", Body=body, IfMatch='"0"')
            found["if_match"] = "sent (IfMatch=); the store overwrote"
        except ClientError as error:
            await s3.put_object(Bucket=bucket, Key="caps/md5", Body=body, IfMatch=etag)
            found["if_match"] = f"yes (IfMatch=): stale ETag {code(error)}, current one taken"
        upload = await s3.create_multipart_upload(Bucket=bucket, Key="caps/open")
        listed = await s3.list_multipart_uploads(Bucket=bucket, Prefix="caps/")
        before = len(listed.get("Uploads", []))
        await s3.abort_multipart_upload(Bucket=bucket, Key="caps/open", UploadId=upload["UploadId"])
        listed = await s3.list_multipart_uploads(Bucket=bucket, Prefix="caps/")
        after = len(listed.get("Uploads", []))
        found["list_uploads"] = f"yes (list_multipart_uploads): {before} open listed"
        found["abort_upload"] = f"yes (abort_multipart_upload): {after} open after"
    with tempfile.TemporaryDirectory() as folder:
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
        os.environ.update(profile_files(Path(folder)))
        try:
            profiled = aiobotocore.session.get_session()
            creds = await profiled.get_credentials()
            key = creds.access_key if creds else None
            region = profiled.get_config_variable("region")
        finally:
            for k in [k for k in os.environ if k.startswith("AWS_")]:
                del os.environ[k]
            os.environ.update(saved)
    found["aws_profile"] = f"yes: profile's key {key}, region {region}"
    urls = []
    for style in ("path", "virtual"):
        config = botocore_config(1, style)
        async with session.create_client(
            "s3", endpoint_url="http://s3.example.test", config=config
        ) as s3:
            url = await s3.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=60
            )
            urls.append(f"{style}: {url.split('?')[0]}")
    found["addressing"] = "yes (s3.addressing_style): " + "; ".join(urls)
    return found


async def caps_obstore(args: argparse.Namespace) -> dict[str, str]:
    from datetime import timedelta

    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    found: dict[str, str] = {}
    store = obstore_store(args.endpoint, args.bucket)
    found["content_md5"] = "no: put has no such option"
    await obstore.put_async(store, "caps/sha", b"caps")
    held = head_checksum(args.endpoint, args.bucket, "caps/sha")
    found["checksum"] = f"yes (checksum_algorithm, sha256 or crc64nvme); store holds {held}"
    result = await obstore.put_async(store, "caps/one", b"caps", mode="create")
    try:
        await obstore.put_async(store, "caps/one", b"caps", mode="create")
        found["if_none_match"] = "sent (mode='create'); the store overwrote"
    except AlreadyExistsError:
        found["if_none_match"] = "yes (mode='create'): second put AlreadyExistsError"
    try:
        await obstore.put_async(store, "caps/one", b"caps", mode={"e_tag": '"0"'})
        found["if_match"] = "sent (mode={'e_tag': ...}); the store overwrote"
    except PreconditionError:
        await obstore.put_async(store, "caps/one", b"caps", mode={"e_tag": result["e_tag"]})
        found["if_match"] = "yes (mode={'e_tag': ...}): stale ETag refused, current one taken"
    names = [n for n in dir(obstore) if "multipart" in n.lower() or "upload" in n.lower()]
    found["list_uploads"] = f"no: no call lists open uploads (names with 'upload': {names})"
    found["abort_upload"] = "no: only its own failed put is aborted, by the library"
    with tempfile.TemporaryDirectory() as folder:
        variables = profile_files(Path(folder))
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
        os.environ.update(variables)
        try:
            from obstore.store import S3Store

            # No request is sent: with no key found it would ask instance metadata.
            config = S3Store("b", region="us-east-1").config
            key = config.get("access_key_id")
        finally:
            for k in [k for k in os.environ if k.startswith("AWS_")]:
                del os.environ[k]
            os.environ.update(saved)
    found["aws_profile"] = (
        f"no: key read from the profile {key}; only via credential_provider= "
        "(obstore.auth.boto3, which needs boto3)"
    )
    urls = []
    for virtual, endpoint in (
        (False, "http://s3.example.test"),
        (True, "http://b.s3.example.test"),
    ):
        signer = obstore_store(endpoint, "b", virtual=virtual)
        url = obstore.sign(signer, "GET", "k", timedelta(seconds=60))
        urls.append(f"{'virtual' if virtual else 'path'}: {url.split('?')[0]}")
    found["addressing"] = "yes (virtual_hosted_style_request): " + "; ".join(urls)
    return found


# -- main ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.job == "import":
        return await time_import(args)
    if args.job == "caps":
        found = await (caps_boto(args) if args.lib == "aiobotocore" else caps_obstore(args))
        return {"caps": found}
    lib = Boto(args) if args.lib == "aiobotocore" else Obstore(args)
    async with lib.client() as client:
        started = time.perf_counter()
        if args.job == "small":
            files = sorted(args.files.iterdir())
            count = await lib.small(client, files)
            moved = sum(p.stat().st_size for p in files)
        elif args.job == "large":
            moved = await lib.large(client, args.file)
            count = 1
        else:
            moved = await lib.get(client, args.file)
            count = 1
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "objects": count, "bytes": moved}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--lib", choices=LIBS, required=True)
    parser.add_argument("--job", choices=JOBS, required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--files", type=Path, help="small: the folder whose files go up")
    parser.add_argument("--file", type=Path, help="large/get: the file (its name is the key)")
    parser.add_argument("--part-size", type=int, default=MULTIPART_OVER)
    parser.add_argument("--parallel", type=int, default=16, help="small: puts in flight")
    parser.add_argument("--part-parallel", type=int, default=4, help="large: parts in flight")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    versions = {name: metadata.version(name) for name in DISTRIBUTIONS[args.lib]}
    result.update(lib=args.lib, job=args.job, versions=versions, vmhwm_kib=vmhwm_kib())
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
