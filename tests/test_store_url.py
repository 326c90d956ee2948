"""``--store`` values (API.md) become the right backend; bad ones fail with one clear line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.backends.fs import FsBackend
from storage.backends.memory import MemoryBackend
from storage.backends.open import open_backend
from storage.backends.s3 import S3Backend
from tests.support.servers import use_dummy_credentials


async def test_a_relative_directory_is_created_and_named_absolutely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = open_backend("chunkgate-data/sub")
    try:
        assert isinstance(backend, FsBackend)
        assert backend.name == f"fs:{tmp_path}/chunkgate-data/sub"
        assert (tmp_path / "chunkgate-data" / "sub").is_dir()
        await backend.check()  # type: ignore[attr-defined]
        await backend.put("k", b"v")
        same = open_backend(str(tmp_path / "chunkgate-data/sub"))
        assert (await same.get("k")).data == b"v"
        await same.close()
    finally:
        await backend.close()


async def test_a_file_url_names_an_absolute_directory(tmp_path: Path) -> None:
    for url in (f"file://{tmp_path}/a%20b", f"file://localhost{tmp_path}/a%20b"):
        backend = open_backend(url)
        assert isinstance(backend, FsBackend)
        assert backend.name == f"fs:{tmp_path}/a b"
        await backend.close()


S3_CASES = [
    # (store, bucket, prefix, name)
    ("s3://bucket", "bucket", "", "s3://bucket"),
    ("s3://bucket/", "bucket", "", "s3://bucket"),
    ("s3://my.bucket-1/pre", "my.bucket-1", "pre/", "s3://my.bucket-1/pre"),
    ("s3://bucket/deep/pre/fix/", "bucket", "deep/pre/fix/", "s3://bucket/deep/pre/fix"),
]


@pytest.mark.parametrize(("store", "bucket", "prefix", "name"), S3_CASES)
async def test_s3_urls_name_bucket_and_prefix(store: str, bucket: str, prefix: str, name: str) -> None:
    use_dummy_credentials()
    backend = open_backend(store, s3_endpoint_url="http://127.0.0.1:9", s3_region="eu-west-1")
    try:
        assert isinstance(backend, S3Backend)
        assert (backend.bucket, backend.prefix, backend.name) == (bucket, prefix, name)
        assert backend._client.meta.endpoint_url == "http://127.0.0.1:9"
        assert backend._client.meta.region_name == "eu-west-1"
    finally:
        await backend.close()


async def test_s3_endpoint_comes_from_aws_endpoint_url(monkeypatch: pytest.MonkeyPatch) -> None:
    use_dummy_credentials()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:19")
    backend = open_backend("s3://bucket")
    try:
        assert backend._client.meta.endpoint_url == "http://127.0.0.1:19"  # type: ignore[attr-defined]
    finally:
        await backend.close()


async def test_memory_url() -> None:
    backend = open_backend("memory://")
    assert isinstance(backend, MemoryBackend)
    await backend.check()


BAD_STORES = [
    ("", "empty"),
    ("   ", "empty"),
    ("ftp://host/x", "unsupported scheme 'ftp://'"),
    ("s3://", "no bucket"),
    ("s3:///prefix", "no bucket"),
    ("s3://Bad_Bucket", "not a valid S3 bucket name"),
    ("s3://ab", "not a valid S3 bucket name"),
    ("s3://bucket/a//b", "empty, '.' or '..' segment"),
    ("s3://bucket/../x", "empty, '.' or '..' segment"),
    ("s3://bucket?versioning=1", "no '?query'"),
    ("file://otherhost/x", "local path"),
    ("file://", "absolute path"),
    ("memory://x", "memory:// takes no host"),
    ("data\nmore", "newline"),
]


@pytest.mark.parametrize(("store", "says"), BAD_STORES)
def test_bad_store_values_raise_one_line_value_errors(store: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        open_backend(store)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message


def test_a_store_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "plain-file"
    target.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        open_backend(str(target))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can create directories anywhere")
def test_an_uncreatable_store_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="cannot create directory"):
        open_backend(str(locked / "store"))
