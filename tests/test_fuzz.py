"""Property tests (hypothesis): key validation against a reference written from API.md, and
manifest parsing of hostile input — ManifestError or a manifest whose chunks tile [0, size)."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from storage.keys import BadKey, validate_key
from storage.manifest import FORMAT, Manifest, ManifestError

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------ keys
def reference_key_ok(key: str, controls: str = "Cc") -> bool:
    """API.md: UTF-8, 1..1024 bytes, no NUL or control characters, no empty, '.' or '..'
    segments, no leading '/'. ``controls``: "Cc" (every Unicode control character, C1 included:
    API.md read literally, and what the code does) or "C0" (U+0000-U+001F and DEL only)."""
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    if not 1 <= len(raw) <= 1024:
        return False
    if controls == "Cc" and any(unicodedata.category(ch) == "Cc" for ch in key):
        return False
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        return False
    return not key.startswith("/") and all(seg not in ("", ".", "..") for seg in key.split("/"))


def accepted(key: str) -> bool:
    try:
        return validate_key(key) == key
    except BadKey:
        return False


segment = st.one_of(
    st.sampled_from(["", ".", "..", "...", "a", "é", "\x00", "\x7f", "\x1f", "\\", " ", "%2e"]),
    st.text(min_size=0, max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
)
keys_like = st.one_of(
    st.lists(segment, min_size=1, max_size=6).map("/".join),
    st.text(max_size=40),
    st.builds(lambda n, c: c * n, st.integers(1000, 1100), st.sampled_from(["a", "é", "€", "𝄞"])),
)


@FUZZ
@given(keys_like)
@example("a" * 1024)
@example("é" * 512)
@example("a" * 1025)
@example("a/\ud800")
def test_validate_key_agrees_with_the_api_rules(key: str) -> None:
    assert accepted(key) == reference_key_ok(key), repr(key)


@pytest.mark.parametrize("key", ["a\u0085b", "a\u009bb"])
def test_c1_control_characters_are_refused(key: str) -> None:
    assert accepted(key) == reference_key_ok(key, controls="Cc") == False  # noqa: E712


# ------------------------------------------------------------------------------ manifests
def valid_doc(sizes: list[int], chunk_size: int) -> dict[str, Any]:
    chunks, offset = [], 0
    for i, s in enumerate(sizes):
        chunks.append({"index": i, "offset": offset, "size": s, "sha256": "ab" * 32})
        offset += s
    return {"format": FORMAT, "key": "v/a.mp4", "version": "0190f0a0b0c0d0e0", "size": offset,
            "content_type": "video/mp4", "created": "2026-11-22T10:00:00Z", "chunk_size": chunk_size, "chunks": chunks}


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=10))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
FIELDS = ["format", "key", "version", "size", "content_type", "created", "chunk_size", "chunks", "etag"]
CHUNK_FIELDS = ["index", "offset", "size", "sha256"]


@st.composite
def hostile_manifest(draw: Any) -> bytes:
    """A valid manifest, then a few mutations: fields replaced by arbitrary JSON, removed, or
    numbers nudged, in the document or in one chunk; sometimes raw byte damage on top."""
    sizes = draw(st.lists(st.integers(0, 5000), max_size=6))
    doc = valid_doc(sizes, draw(st.integers(0, 6000)))
    for _ in range(draw(st.integers(0, 4))):
        target = doc
        fields = FIELDS
        if doc.get("chunks") and isinstance(doc["chunks"], list) and draw(st.booleans()):
            target = draw(st.sampled_from(doc["chunks"]))
            fields = CHUNK_FIELDS
            if not isinstance(target, dict):
                continue
        name = draw(st.sampled_from(fields))
        action = draw(st.sampled_from(["replace", "remove", "nudge"]))
        if action == "remove":
            target.pop(name, None)
        elif action == "nudge" and isinstance(target.get(name), int):
            target[name] += draw(st.integers(-3, 3))
        else:
            target[name] = draw(json_value)
    raw = json.dumps(doc).encode()
    if draw(st.integers(0, 9)) == 0:
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.binary(max_size=4)) + raw[cut + 1:]
    return raw


@FUZZ
@given(hostile_manifest())
def test_a_hostile_manifest_is_rejected_or_describes_a_consistent_object(raw: bytes) -> None:
    try:
        m = Manifest.from_json(raw)
    except ManifestError:
        return
    offset = 0
    for i, ref in enumerate(m.chunks):
        assert ref.index == i and ref.offset == offset and ref.size >= 0
        offset += ref.size
    assert offset == m.size
    # every range computation stays inside [0, size)
    for start, end in [(0, m.size), (0, 1), (max(0, m.size - 1), m.size), (m.size // 2, m.size)]:
        for ref in m.chunks_for(start, end):
            assert 0 <= ref.offset and ref.end <= m.size
            assert ref.offset < end and ref.end > start
    # and it survives its own round trip
    again = Manifest.from_json(m.to_json())
    assert again.chunks == m.chunks and again.size == m.size


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_never_anything_but_a_manifest_error(raw: bytes) -> None:
    # Random bytes are (almost) never a manifest; whatever parses must be internally consistent
    # and round-trip, and anything else must be a ManifestError (not a KeyError, TypeError...).
    try:
        m = Manifest.from_json(raw)
    except ManifestError:
        return
    assert sum(c.size for c in m.chunks) == m.size
    assert Manifest.from_json(m.to_json()).chunks == m.chunks


@FUZZ
@given(st.integers(1, 5000), st.integers(1, 8), st.integers(0, 4999), st.data())
def test_chunks_for_returns_exactly_the_chunks_a_range_touches(chunk_size: int, count: int, last: int, data: Any) -> None:
    # As the object layer writes them: every chunk but the last is chunk_size long.
    m = Manifest.from_dict(valid_doc([chunk_size] * (count - 1) + [last % chunk_size + 1], chunk_size))
    start = data.draw(st.integers(0, m.size - 1))
    end = data.draw(st.integers(start + 1, m.size))
    got = list(m.chunks_for(start, end))
    want = [c for c in m.chunks if c.offset < end and c.end > start and c.size > 0]
    assert [c for c in got if c.size > 0] == want


def test_chunks_for_finds_bytes_in_a_chunk_longer_than_chunk_size() -> None:
    m = Manifest.from_dict(valid_doc([1010, 1000, 1000], 1000))  # chunk 0 grew by 10 (tolerated drift)
    assert [c.index for c in m.chunks_for(1005, 1006)] == [0]


def test_a_deeply_nested_manifest_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(b"[" * 100_000)
