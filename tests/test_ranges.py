"""Range parsing, Content-Range formatting and multipart/byteranges framing (gateway/ranges.py)."""

from __future__ import annotations

import re

import pytest

from gateway.ranges import (
    ByteRange,
    MultipartByteranges,
    Unsatisfiable,
    content_range,
    parse_range,
    unsatisfied_range,
)

R = ByteRange

# (header, size, expected ranges as (start, end) pairs)
SERVED = [
    ("bytes=0-1", 10, [(0, 2)], "first two bytes are exactly two bytes"),
    ("bytes=0-0", 10, [(0, 1)], "a one byte range is one byte"),
    ("bytes=0-9", 10, [(0, 10)], "the whole object by explicit positions"),
    ("bytes=3-", 10, [(3, 10)], "an open range runs to the end"),
    ("bytes=0-", 10, [(0, 10)], "an open range from zero is the whole object"),
    ("bytes=9-", 10, [(9, 10)], "an open range from the last byte is one byte"),
    ("bytes=-3", 10, [(7, 10)], "a suffix range is the last n bytes"),
    ("bytes=-10", 10, [(0, 10)], "a suffix range as long as the object is all of it"),
    ("bytes=-1000", 10, [(0, 10)], "a suffix range longer than the object is all of it"),
    ("bytes=5-1000", 10, [(5, 10)], "a last position past the end is clamped"),
    ("bytes=5-10", 10, [(5, 10)], "a last position equal to the size is clamped"),
    ("bytes=0-" + "9" * 5000, 10, [(0, 10)], "a last position with thousands of digits is clamped"),
    ("bytes=-" + "9" * 5000, 10, [(0, 10)], "a suffix with thousands of digits is the whole object"),
    ("bytes=007-008", 10, [(7, 9)], "leading zeros are plain decimal"),
    ("Bytes=0-1", 10, [(0, 2)], "the range unit is case insensitive"),
    ("BYTES=0-1", 10, [(0, 2)], "an upper case range unit is accepted"),
    ("  bytes=0-1\t", 10, [(0, 2)], "whitespace around the field value is ignored"),
    ("bytes=0-1, 4-5", 10, [(0, 2), (4, 6)], "two disjoint ranges give two parts"),
    ("bytes=0-1 ,\t4-5", 10, [(0, 2), (4, 6)], "spaces and tabs around commas are accepted"),
    ("bytes=0-1,,4-5,", 10, [(0, 2), (4, 6)], "empty list elements are ignored"),
    ("bytes=, 0-1", 10, [(0, 2)], "a leading empty element is ignored"),
    ("bytes= 0-1", 10, [(0, 2)], "a space after the equals sign is tolerated"),
    ("bytes=4-5,0-1", 10, [(4, 6), (0, 2)], "disjoint parts keep the order they were asked in"),
    ("bytes=0-4,3-8", 10, [(0, 9)], "two overlapping ranges merge into one part"),
    ("bytes=0-1,2-3", 10, [(0, 4)], "two adjacent ranges merge into one part"),
    ("bytes=2-3,0-1", 10, [(0, 4)], "adjacent ranges in reverse order merge into one part"),
    ("bytes=0-1,5-6,2-4", 10, [(0, 7)], "a range bridging two others merges all three"),
    ("bytes=6-7,0-1,1-2", 10, [(6, 8), (0, 3)], "a merged part sits where its first member was asked"),
    ("bytes=0-1,-2", 10, [(0, 2), (8, 10)], "an int range and a suffix range give two parts"),
    ("bytes=-2,8-", 10, [(8, 10)], "a suffix and an open range over the same bytes merge"),
    ("bytes=0-1,20-30", 10, [(0, 2)], "an unsatisfiable member is dropped"),
    ("bytes=20-30,-0,3-4", 10, [(3, 5)], "only the satisfiable member of a set remains"),
    ("bytes=0-1,0-1", 10, [(0, 2)], "a range asked twice is one part"),
]


@pytest.mark.parametrize(("header", "size", "expected"), [s[:3] for s in SERVED], ids=[s[3] for s in SERVED])
def test_parse_range_selects_the_bytes_asked_for(header: str, size: int, expected: list[tuple[int, int]]) -> None:
    assert parse_range(header, size) == [R(a, b) for a, b in expected]


IGNORED = [
    (None, 10, "no range header serves the whole object"),
    ("", 10, "an empty header is ignored"),
    ("bytes=", 10, "a range set with no ranges is ignored"),
    ("bytes=,", 10, "a range set of only commas is ignored"),
    ("items=0-1", 10, "an unknown range unit is ignored"),
    ("bytes 0-1", 10, "a header without an equals sign is ignored"),
    ("bytes =0-1", 10, "a space before the equals sign is invalid"),
    ("bytes=5-2", 10, "a last position before the first is invalid"),
    ("bytes=0-1,5-2", 10, "one invalid member invalidates the whole set"),
    ("bytes=-", 10, "a lone dash is invalid"),
    ("bytes=1-2-3", 10, "two dashes are invalid"),
    ("bytes=a-b", 10, "letters are invalid"),
    ("bytes=0 - 1", 10, "spaces inside a range are invalid"),
    ("bytes=+1-2", 10, "a sign is invalid"),
    ("bytes=0x1-2", 10, "hexadecimal is invalid"),
    ("bytes=\u0661-\u0662", 10, "non ascii digits are invalid"),
    ("bytes=0-1;2-3", 10, "semicolons do not separate ranges"),
    ("bytes=0-1\r\n", 10, "a trailing newline is not whitespace"),
    ("bytes=-5", 0, "a nonzero suffix of an empty object is satisfiable but unrepresentable"),
    ("bytes=0-0,-5", 0, "an empty object with any nonzero suffix member gets a 200"),
    ("bytes=0-9,1-9,2-9", 10, "three overlapping ranges are abusive"),
    ("bytes=0-0,0-0,0-0", 10, "the same byte asked three times is abusive"),
    (",".join(f"{i}-{i}" for i in range(0, 34, 2)).join(["bytes=", ""]), 40, "seventeen parts exceed sixteen"),
    ("bytes=" + ",".join(["0-0", "1-1"] * 33), 10, "more than sixty four range specs are abusive"),
]


@pytest.mark.parametrize(("header", "size"), [s[:2] for s in IGNORED], ids=[s[2] for s in IGNORED])
def test_parse_range_ignores_the_header(header: str | None, size: int) -> None:
    assert parse_range(header, size) is None


UNSATISFIABLE = [
    ("bytes=10-", 10, "an open range starting at the size"),
    ("bytes=10-20", 10, "a range starting at the size"),
    ("bytes=11-11", 10, "a range past the end"),
    ("bytes=" + "9" * 5000 + "-", 10, "a first position with thousands of digits"),
    ("bytes=-0", 10, "a zero length suffix"),
    ("bytes=-000", 10, "a zero length suffix written with zeros"),
    ("bytes=0-0", 0, "any int range of an empty object"),
    ("bytes=0-", 0, "an open range of an empty object"),
    ("bytes=-0", 0, "a zero length suffix of an empty object"),
    ("bytes=10-,20-30,-0", 10, "a set whose members all miss"),
]


@pytest.mark.parametrize(("header", "size"), [s[:2] for s in UNSATISFIABLE], ids=[s[2] for s in UNSATISFIABLE])
def test_parse_range_raises_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable) as caught:
        parse_range(header, size)
    assert caught.value.size == size


def test_sixteen_disjoint_parts_are_served() -> None:
    header = "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 32, 2))
    assert parse_range(header, 40) == [R(i, i + 1) for i in range(0, 32, 2)]


def test_many_adjacent_ranges_that_coalesce_below_the_limit_are_served() -> None:
    header = "bytes=" + ",".join(f"{i}-{i}" for i in range(40))
    assert parse_range(header, 40) == [R(0, 40)]


def test_max_ranges_is_configurable() -> None:
    assert parse_range("bytes=0-0,2-2,4-4", 10, max_ranges=2) is None
    assert parse_range("bytes=0-0,2-2", 10, max_ranges=2) == [R(0, 1), R(2, 3)]


def test_two_overlapping_ranges_are_not_abusive() -> None:
    assert parse_range("bytes=0-5,3-8,20-21", 30) == [R(0, 9), R(20, 22)]


@pytest.mark.parametrize(
    ("r", "size", "expected"),
    [
        (R(0, 2), 10, "bytes 0-1/10"),
        (R(0, 10), 10, "bytes 0-9/10"),
        (R(9, 10), 10, "bytes 9-9/10"),
    ],
    ids=["first two bytes", "whole object", "last byte"],
)
def test_content_range_uses_inclusive_last_position(r: ByteRange, size: int, expected: str) -> None:
    assert content_range(r, size) == expected


def test_content_range_refuses_a_range_past_the_end() -> None:
    with pytest.raises(ValueError):
        content_range(R(5, 11), 10)


def test_unsatisfied_range_names_the_size() -> None:
    assert unsatisfied_range(10) == "bytes */10"
    assert unsatisfied_range(0) == "bytes */0"


@pytest.mark.parametrize(("start", "end"), [(-1, 2), (4, 2)], ids=["negative", "reversed"])
def test_byte_range_refuses_negative_or_reversed_ranges(start: int, end: int) -> None:
    with pytest.raises(ValueError):
        ByteRange(start, end)


def test_the_whole_of_an_empty_object_is_an_empty_byte_range() -> None:
    assert ByteRange(0, 0).length == 0


def test_content_range_refuses_an_empty_range() -> None:
    with pytest.raises(ValueError):
        content_range(R(0, 0), 0)


def test_negative_size_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        parse_range("bytes=0-1", -1)


# ------------------------------------------------------------------ multipart/byteranges

DATA = bytes(range(48, 48 + 40))  # "0123456789:;<=>?@ABC..."


def _body(m: MultipartByteranges, data: bytes) -> bytes:
    out = b"".join(m.part_header(i) + data[r.start : r.end] for i, r in enumerate(m.ranges))
    return out + m.trailer()


def test_multipart_body_matches_rfc_9110_example_layout() -> None:
    m = MultipartByteranges([R(0, 3), R(10, 12)], 40, "video/mp4", boundary="SEP")
    assert m.content_type_header == "multipart/byteranges; boundary=SEP"
    assert _body(m, DATA) == (
        b"--SEP\r\n"
        b"Content-Type: video/mp4\r\n"
        b"Content-Range: bytes 0-2/40\r\n"
        b"\r\n"
        b"012"
        b"\r\n--SEP\r\n"
        b"Content-Type: video/mp4\r\n"
        b"Content-Range: bytes 10-11/40\r\n"
        b"\r\n"
        b":;"
        b"\r\n--SEP--\r\n"
    )


@pytest.mark.parametrize(
    "ranges",
    [[R(0, 1)], [R(0, 3), R(10, 12)], [R(30, 40), R(0, 5), R(7, 9)]],
    ids=["one part", "two parts", "three parts out of order"],
)
def test_multipart_content_length_is_the_exact_body_length(ranges: list[ByteRange]) -> None:
    m = MultipartByteranges(ranges, 40, "application/octet-stream")
    assert m.content_length() == len(_body(m, DATA))


def test_multipart_body_parses_back_with_the_email_parser() -> None:
    import email.parser
    import email.policy

    m = MultipartByteranges([R(0, 3), R(10, 12), R(39, 40)], 40, "video/mp4")
    raw = f"Content-Type: {m.content_type_header}\r\n\r\n".encode() + _body(m, DATA)
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    parts = list(msg.iter_parts())
    assert [p["Content-Range"] for p in parts] == ["bytes 0-2/40", "bytes 10-11/40", "bytes 39-39/40"]
    assert [p.get_payload(decode=True) for p in parts] == [b"012", b":;", DATA[39:40]]


def test_generated_boundaries_are_fresh_and_valid() -> None:
    a = MultipartByteranges([R(0, 1)], 10, "video/mp4")
    b = MultipartByteranges([R(0, 1)], 10, "video/mp4")
    assert a.boundary != b.boundary
    assert re.fullmatch(r"[0-9a-f]{32}", a.boundary)


@pytest.mark.parametrize(
    ("ranges", "content_type", "boundary"),
    [
        ([], "video/mp4", None),
        ([R(0, 11)], "video/mp4", None),
        ([R(3, 3)], "video/mp4", None),
        ([R(0, 1)], "video/mp4\r\nX-Injected: 1", None),
        ([R(0, 1)], "video/mp4", "has\r\nnewline"),
        ([R(0, 1)], "video/mp4", "x" * 71),
    ],
    ids=[
        "no parts",
        "a part past the end",
        "an empty part",
        "a content type with a newline",
        "a boundary with a newline",
        "a boundary longer than 70 characters",
    ],
)
def test_multipart_refuses_bad_input(ranges: list[ByteRange], content_type: str, boundary: str | None) -> None:
    with pytest.raises(ValueError):
        MultipartByteranges(ranges, 10, content_type, boundary=boundary)
