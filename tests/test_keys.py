"""storage.keys: the key rules of API.md and the one place the store layout is written down."""

from __future__ import annotations

import pytest

from storage import keys

VALID = ["a", "videos/a.mp4", "é/日本語/🎬.mp4", "back\\slash", "a..b", "...", ".hidden", "x" * 1024,
         "a b", "%2e%2e", "é" * 512]
INVALID = [("", "empty"), ("/a", "leading slash"), ("a//b", "empty segment"), ("a/./b", "dot segment"),
           ("a/../b", "dot-dot segment"), ("..", "dot-dot"), ("a/", "trailing empty segment"),
           ("x" * 1025, "over 1024 bytes"), ("é" * 513, "over 1024 UTF-8 bytes"), ("a\0b", "NUL"),
           ("a\nb", "newline"), ("a\x7fb", "DEL"), ("a\u0085b", "C1 control"), ("a/\ud800", "not UTF-8")]


@pytest.mark.parametrize("key", VALID)
def test_valid_keys_are_accepted(key: str) -> None:
    assert keys.validate_key(key) == key


@pytest.mark.parametrize(("key", "why"), INVALID, ids=[w for _, w in INVALID])
def test_invalid_keys_are_refused(key: str, why: str) -> None:
    with pytest.raises(keys.BadKey):
        keys.validate_key(key)


def test_the_layout_prefixes_are_distinct_and_records_never_collide() -> None:
    prefixes = [keys.MANIFEST_PREFIX, keys.CHUNK_PREFIX, keys.UPLOAD_PREFIX, keys.INTENT_PREFIX,
                keys.LEASE_PREFIX, keys.OUTBOX_PREFIX]
    assert len(set(p[0] for p in prefixes)) == len(prefixes)
    assert keys.manifest_key("v/a.mp4") == "m/v/a.mp4"
    assert keys.object_key_of_manifest(keys.manifest_key("v/a.mp4")) == "v/a.mp4"


@pytest.mark.parametrize("key", ["a", "x" * 1024, "é/日本語"])
def test_chunk_keys_have_a_fixed_length_whatever_the_object_key(key: str) -> None:
    version = keys.new_version(1_800_000_000.0)
    ck = keys.chunk_key(key, version, 7)
    assert ck == keys.chunk_prefix(key, version) + "00000007"
    assert len(ck) == len(keys.chunk_key("b", version, 7))
    assert keys.lease_key(key).startswith(keys.LEASE_PREFIX) and len(keys.lease_key(key)) == 2 + 32


def test_versions_sort_by_creation_and_carry_their_time() -> None:
    early, late = keys.new_version(1_800_000_000.0), keys.new_version(1_800_000_000.5)
    assert early < late and early != keys.new_version(1_800_000_000.0)
    assert keys.version_time(early) == pytest.approx(1_800_000_000.0, abs=0.001)
