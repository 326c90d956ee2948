"""HTTP byte ranges (RFC 9110 §14): parse a ``Range`` header, format ``Content-Range``, and frame
``multipart/byteranges`` bodies (§14.6).

Pure logic: no aiohttp, no I/O. The GET handler asks ``parse_range`` which bytes to send and uses
``MultipartByteranges`` for the exact framing and Content-Length of a multi-part 206; it never
hand-builds a Content-Range or a boundary line. This module must never decide anything about
preconditions (``conditions.py`` does: only GET honours Range, and If-Range may veto it).

Why not a library: aiohttp's ``request.http_range`` handles one range only, and werkzeug's
``parse_range_header`` neither resolves multi-range satisfiability nor coalesces; neither has the
abuse limits below.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

__all__ = [
    "ByteRange",
    "MultipartByteranges",
    "Unsatisfiable",
    "content_range",
    "parse_range",
    "unsatisfied_range",
]

# RFC 9110 §14.1.2: first-pos "-" [ last-pos ]  /  "-" suffix-length. ASCII digits only:
# str.isdigit() and int() would accept "²" or "٣", which are not DIGIT.
_INT_RANGE = re.compile(r"([0-9]+)-([0-9]*)", re.ASCII)
_SUFFIX_RANGE = re.compile(r"-([0-9]+)", re.ASCII)
# range-unit is a token (§5.6.2); compared case-insensitively (§14.1).
_UNIT = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)
# OWS is SP / HTAB only (§5.6.3); str.strip() would also eat CR, LF, VT and FF.
_OWS = " \t"
# Positions longer than this many digits are past the end of any object we could store; capping
# them keeps the arithmetic cheap and avoids int()'s 4300-digit ValueError on hostile input.
_MAX_DIGITS = 30
_HUGE: int = 10**_MAX_DIGITS

# Abuse limits (RFC 9110 §14.2 lets a server ignore a Range with "more than two overlapping
# ranges, or a set of many small ranges"): see parse_range's docstring.
_SPECS_PER_ALLOWED_PART = 4
_MAX_OVERLAPPING_SPECS = 2


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, end)`` of a representation: half-open, so ``end - start`` is the length.

    May be empty (the whole of a zero-length object is ``ByteRange(0, 0)``), but ``parse_range``
    never returns an empty one, and no Content-Range can describe one."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"not a byte range: [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start


class Unsatisfiable(Exception):
    """A valid Range none of whose ranges overlaps the representation: answer 416 with
    ``Content-Range: bytes */SIZE`` (``unsatisfied_range``)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"no requested range overlaps the {size} bytes of the representation")
        self.size = size


def _position(digits: str) -> int:
    significant = digits.lstrip("0")
    if len(significant) > _MAX_DIGITS:
        return _HUGE
    return int(significant or "0")


# One parsed range-spec: ("int", first, last or None) or ("suffix", length, None).
_Spec = tuple[str, int, "int | None"]


def _parse_specs(header: str) -> list[_Spec] | None:
    """The range-specs of a ``bytes`` ranges-specifier, or None if the header is not one."""
    value = header.strip(_OWS)
    unit, eq, range_set = value.partition("=")
    if not eq or not _UNIT.fullmatch(unit) or unit.lower() != "bytes":
        return None
    specs: list[_Spec] = []
    # §5.6.1: a recipient accepts empty list elements and OWS around the commas. We also accept
    # OWS right after "=", which the grammar does not allow but no client means anything else by.
    for element in range_set.split(","):
        element = element.strip(_OWS)
        if not element:
            continue
        if m := _INT_RANGE.fullmatch(element):
            first = _position(m.group(1))
            last = _position(m.group(2)) if m.group(2) else None
            if last is not None and last < first:
                # §14.1.1: an int-range with last-pos < first-pos is invalid, and so the header is.
                return None
            specs.append(("int", first, last))
        elif m := _SUFFIX_RANGE.fullmatch(element):
            specs.append(("suffix", _position(m.group(1)), None))
        else:
            return None  # an other-range or garbage: not a valid bytes range-set
    return specs or None  # 1#range-spec: at least one


def _resolve(spec: _Spec, size: int) -> ByteRange | None:
    """The bytes a range-spec selects, or None when it is unsatisfiable (§14.1.2)."""
    kind, a, b = spec
    if kind == "int":
        if a >= size:
            return None
        # A missing or too large last-pos means "to the end".
        end = size if b is None or b >= size else b + 1
        return ByteRange(a, end)
    if a == 0 or size == 0:
        return None
    # A suffix longer than the representation selects all of it.
    return ByteRange(max(0, size - a), size)


def _overlapping_specs(ranges: list[ByteRange]) -> int:
    """How many ranges share at least one byte with another range of the list. Quadratic, which
    is fine: parse_range has already capped the list at 4 * max_ranges members."""
    return sum(
        any(i != j and r.start < o.end and o.start < r.end for j, o in enumerate(ranges))
        for i, r in enumerate(ranges)
    )


def _coalesce(ranges: list[ByteRange]) -> list[ByteRange]:
    """Merge overlapping and adjacent ranges. Each merged range takes the place of the first
    requested range it absorbed, because RFC 9110 §15.3.7.2 says parts SHOULD come in the order
    the client asked for them (excluding ranges coalesced into others)."""
    order = sorted(range(len(ranges)), key=lambda i: (ranges[i].start, ranges[i].end))
    merged: list[tuple[int, int, int]] = []  # (first request index, start, end)
    for i in order:
        r = ranges[i]
        if merged and r.start <= merged[-1][2]:
            first, start, end = merged[-1]
            merged[-1] = (min(first, i), start, max(end, r.end))
        else:
            merged.append((i, r.start, r.end))
    merged.sort()
    return [ByteRange(start, end) for _, start, end in merged]


def parse_range(header: str | None, size: int, *, max_ranges: int = 16) -> list[ByteRange] | None:
    """The byte ranges to send for a ``Range`` header on a representation of ``size`` bytes.

    Returns None when the header is to be ignored and the whole representation sent with 200:
    - absent, not the ``bytes`` unit, or not a valid range-set (any member malformed, or an
      int-range whose last-pos is below its first-pos: §14.1.1);
    - ``size == 0`` with a non-zero suffix-range: RFC 9110 calls that satisfiable, yet no
      Content-Range can describe it, so the empty 200 is the answer (httpwg/http-core#395);
    - abusive (§14.2 allows ignoring these): more than ``4 * max_ranges`` range-specs in the
      header; more than two satisfiable range-specs that overlap another one; or more than
      ``max_ranges`` parts left after coalescing.

    Raises ``Unsatisfiable`` (-> 416) when the set is valid but no member overlaps ``[0, size)``:
    every int-range starts at or past the end, every suffix-range has length 0, or the
    representation is empty and nothing above applies.

    Otherwise returns at least one non-empty range inside ``[0, size)``. Unsatisfiable members are
    dropped; overlapping or adjacent members are merged, so two requested ranges that touch give
    one part (a plain 206, not multipart). Parts keep the order the client asked for them in.
    """
    if size < 0:
        raise ValueError(f"a representation cannot have {size} bytes")
    if max_ranges < 1:
        raise ValueError("max_ranges must be at least 1")
    if header is None:
        return None
    specs = _parse_specs(header)
    if specs is None or len(specs) > _SPECS_PER_ALLOWED_PART * max_ranges:
        return None
    satisfiable = [r for r in (_resolve(s, size) for s in specs) if r is not None]
    if not satisfiable:
        if size == 0 and any(kind == "suffix" and n > 0 for kind, n, _ in specs):
            return None
        raise Unsatisfiable(size)
    if _overlapping_specs(satisfiable) > _MAX_OVERLAPPING_SPECS:
        return None
    parts = _coalesce(satisfiable)
    if len(parts) > max_ranges:
        return None
    return parts


def content_range(r: ByteRange, size: int) -> str:
    """The ``Content-Range`` value of a 206 part: ``bytes FIRST-LAST/SIZE``, LAST inclusive."""
    if r.end > size or r.start == r.end:
        raise ValueError(f"range [{r.start}, {r.end}) is empty or past the end of {size} bytes")
    return f"bytes {r.start}-{r.end - 1}/{size}"


def unsatisfied_range(size: int) -> str:
    """The ``Content-Range`` value of a 416: ``bytes */SIZE`` (§14.4)."""
    return f"bytes */{size}"


# RFC 2046 §5.1.1: 1-70 bchars, not ending in a space. We only ever generate hex, but a caller may
# supply its own boundary (tests do), and a quote-free one never needs quoting in the header.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=?-]{1,70}", re.ASCII)
_HEADER_VALUE = re.compile(r"[\x20-\x7e]+", re.ASCII)


class MultipartByteranges:
    """The framing of a ``multipart/byteranges`` body (RFC 9110 §14.6, RFC 2046 §5.1.1).

    The body is, for each part ``i``: ``part_header(i)`` then the part's bytes; and finally
    ``trailer()``. The first part starts directly with its dash-boundary (no preamble, the form
    RFC 2046 gives); every later one is preceded by the CRLF that belongs to its delimiter.
    ``content_length()`` is the exact byte count of that whole body.
    """

    def __init__(
        self,
        ranges: list[ByteRange],
        size: int,
        content_type: str,
        boundary: str | None = None,
    ) -> None:
        if not ranges:
            raise ValueError("a multipart/byteranges body needs at least one part")
        for r in ranges:
            content_range(r, size)  # raises for an empty part or one past the end
        # A CR or LF here would let a stored content type inject header lines into the body.
        if not _HEADER_VALUE.fullmatch(content_type):
            raise ValueError(f"not a usable part Content-Type: {content_type!r}")
        if boundary is None:
            boundary = secrets.token_hex(16)
        elif not _BOUNDARY.fullmatch(boundary):
            raise ValueError(f"not a valid multipart boundary: {boundary!r}")
        self.ranges = list(ranges)
        self.size = size
        self.content_type = content_type
        self.boundary = boundary
        self.content_type_header = f"multipart/byteranges; boundary={boundary}"

    def part_header(self, i: int) -> bytes:
        """The delimiter and header lines that precede part ``i``'s bytes."""
        lead = "" if i == 0 else "\r\n"
        return (
            f"{lead}--{self.boundary}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Range: {content_range(self.ranges[i], self.size)}\r\n"
            "\r\n"
        ).encode("ascii")

    def trailer(self) -> bytes:
        """The close-delimiter that ends the body."""
        return f"\r\n--{self.boundary}--\r\n".encode("ascii")

    def content_length(self) -> int:
        """The exact length of the whole multipart body, for the Content-Length header."""
        return sum(len(self.part_header(i)) + r.length for i, r in enumerate(self.ranges)) + len(
            self.trailer()
        )
