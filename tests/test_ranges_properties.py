"""Property tests: parse_range against a naive byte-set model, and fuzzing of every pure header
parser in gateway/ (ranges, conditions, mediatypes) with garbage."""

from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.conditions import Outcome, evaluate, parse_etag_list, parse_http_date
from gateway.mediatypes import guess_content_type, normalize_content_type
from gateway.ranges import ByteRange, MultipartByteranges, Unsatisfiable, parse_range

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A spec is ("int", first, last or None) or ("suffix", length, None), as a client would send.
Spec = tuple[str, int, "int | None"]


@st.composite
def specs(draw: st.DrawFn, size: int) -> Spec:
    limit = size + 5  # reach a little past the end so unsatisfiable and clamped cases occur
    kind = draw(st.sampled_from(["int", "int", "int", "int", "open", "suffix"]))
    if kind == "suffix":
        return ("suffix", draw(st.integers(0, limit)), None)
    first = draw(st.integers(0, limit))
    if kind == "open":
        return ("int", first, None)
    # Mostly short ranges, so that several fit side by side and multi-part answers are common.
    return ("int", first, first + draw(st.one_of(st.integers(0, 3), st.integers(0, limit))))


def render(spec: Spec, zeros: int) -> str:
    kind, a, b = spec
    pad = "0" * zeros
    if kind == "suffix":
        return f"-{pad}{a}"
    return f"{pad}{a}-" + ("" if b is None else f"{pad}{b}")


@st.composite
def range_requests(draw: st.DrawFn) -> tuple[str, int, list[Spec], int]:
    size = draw(st.one_of(st.integers(0, 3), st.integers(0, 60)))
    if draw(st.booleans()):
        count = draw(st.one_of(st.integers(1, 4), st.integers(1, 22)))
        members = draw(st.lists(specs(size), min_size=count, max_size=count))
    else:
        # Spread-out short ranges in any order: the multi-part answers, and their coalescing and
        # ordering, which random specs rarely reach because they overlap too often.
        starts = draw(st.lists(st.integers(0, size + 2), min_size=1, max_size=8, unique=True))
        members = [("int", a, a + draw(st.integers(0, 2))) for a in draw(st.permutations(starts))]
    unit = draw(st.sampled_from(["bytes", "Bytes", "BYTES"]))
    ows = st.sampled_from(["", " ", "\t", "  "])
    parts = []
    for spec in members:
        text = render(spec, draw(st.integers(0, 2)))
        if draw(st.booleans()):
            text = draw(ows) + text + draw(ows)
        parts.append(text)
        if draw(st.integers(0, 9)) == 0:
            parts.append(draw(ows))  # an empty list element
    header = f"{unit}={','.join(parts)}"
    max_ranges = draw(st.integers(1, 6))
    return header, size, members, max_ranges


def reference(members: list[Spec], size: int, max_ranges: int) -> list[ByteRange] | None | type[Unsatisfiable]:
    """parse_range's contract, computed naively from the set of byte offsets each spec selects."""
    if len(members) > 4 * max_ranges:
        return None
    chosen: list[tuple[int, set[int]]] = []
    for i, (kind, a, b) in enumerate(members):
        if kind == "int":
            offsets = {o for o in range(size) if o >= a and (b is None or o <= b)}
        else:
            offsets = set(range(max(0, size - a), size)) if a > 0 else set()
        if offsets:
            chosen.append((i, offsets))
    if not chosen:
        if size == 0 and any(kind == "suffix" and a > 0 for kind, a, _ in members):
            return None
        return Unsatisfiable
    overlapping = sum(
        any(i != j and s & t for j, (_, t) in enumerate(chosen)) for i, (_, s) in enumerate(chosen)
    )
    if overlapping > 2:
        return None
    union = set().union(*(s for _, s in chosen))
    runs: list[tuple[int, int]] = []
    for o in sorted(union):
        if runs and runs[-1][1] == o:
            runs[-1] = (runs[-1][0], o + 1)
        else:
            runs.append((o, o + 1))
    if len(runs) > max_ranges:
        return None
    # Each run is placed where the client first asked for any of its bytes.
    first_asked = {run: min(i for i, s in chosen if any(run[0] <= o < run[1] for o in s)) for run in runs}
    return [ByteRange(a, b) for a, b in sorted(runs, key=lambda run: first_asked[run])]


@SETTINGS
@given(range_requests())
def test_parse_range_agrees_with_a_naive_byte_set_model(request: tuple[str, int, list[Spec], int]) -> None:
    header, size, members, max_ranges = request
    expected = reference(members, size, max_ranges)
    try:
        got: list[ByteRange] | None | type[Unsatisfiable] = parse_range(header, size, max_ranges=max_ranges)
    except Unsatisfiable:
        got = Unsatisfiable
    assert got == expected


@SETTINGS
@given(range_requests(), st.integers(0, 21))
def test_one_reversed_member_makes_the_whole_header_ignored(
    request: tuple[str, int, list[Spec], int], where: int
) -> None:
    header, size, _, _ = request
    unit, _, rest = header.partition("=")
    members = rest.split(",")
    members.insert(where % (len(members) + 1), "9-3")
    assert parse_range(f"{unit}={','.join(members)}", size) is None


def assert_well_formed(result: list[ByteRange] | None, size: int) -> None:
    if result is None:
        return
    assert result, "a served range set is never empty"
    for r in result:
        assert 0 <= r.start < r.end <= size
    ordered = sorted(result, key=lambda r: r.start)
    for left, right in zip(ordered, ordered[1:], strict=False):
        assert left.end < right.start, "parts never overlap or touch: they would have been merged"


RANGE_ALPHABET = "bytes=BYTES-0123456789,; \t\r\n*\"xX+"


@SETTINGS
@given(
    st.one_of(
        st.text(),
        st.text(alphabet=RANGE_ALPHABET),
        st.text(alphabet=RANGE_ALPHABET).map(lambda s: "bytes=" + s),
    ),
    st.integers(0, 2**63),
)
def test_garbage_range_headers_never_raise_anything_but_unsatisfiable(header: str, size: int) -> None:
    try:
        result = parse_range(header, size)
    except Unsatisfiable:
        return
    assert_well_formed(result, size)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 99), st.integers(1, 50)), min_size=1, max_size=8), st.text(min_size=1, max_size=20, alphabet="abcdef/+.-"))
def test_multipart_content_length_matches_the_framed_body(pairs: list[tuple[int, int]], ctype: str) -> None:
    size = 150
    ranges = [ByteRange(a, a + n) for a, n in pairs]
    data = bytes(size)
    framing = MultipartByteranges(ranges, size, ctype)
    body = b"".join(framing.part_header(i) + data[r.start : r.end] for i, r in enumerate(ranges))
    body += framing.trailer()
    assert framing.content_length() == len(body)
    assert body.count(f"--{framing.boundary}".encode()) == len(ranges) + 1


HEADER_NAMES = ["If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range", "Range"]
CONDITION_ALPHABET = "W/\"*, \tabcv1-:GMTSunNov0123456789"


@SETTINGS
@given(
    st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "POST"]),
    st.dictionaries(
        st.sampled_from(HEADER_NAMES),
        st.one_of(st.text(), st.text(alphabet=CONDITION_ALPHABET)),
        max_size=len(HEADER_NAMES),
    ),
    st.one_of(st.none(), st.sampled_from(['"v1"', '"a,b"', 'W/"weak"'])),
    st.one_of(st.none(), st.datetimes(timezones=st.just(timezone.utc))),
    st.booleans(),
)
def test_garbage_conditional_headers_never_raise(
    method: str,
    headers: dict[str, str],
    etag: str | None,
    last_modified: datetime | None,
    exists: bool,
) -> None:
    decision = evaluate(method, headers, etag=etag, last_modified=last_modified, exists=exists)
    assert isinstance(decision.outcome, Outcome)
    if decision.honor_range:
        assert method == "GET" and "Range" in headers and decision.outcome is Outcome.PROCEED


@SETTINGS
@given(st.one_of(st.text(), st.text(alphabet=CONDITION_ALPHABET)))
def test_garbage_etag_lists_and_dates_never_raise(value: str) -> None:
    tags = parse_etag_list(value)
    assert tags == "*" or all(t.endswith('"') and '"' in t[:-1] for t in tags)
    date = parse_http_date(value)
    assert date is None or date.tzinfo is timezone.utc


@SETTINGS
@given(st.one_of(st.none(), st.text(), st.text(alphabet="abcxyz/;=\"\\ \t+.-*\r\n\x00")))
def test_normalized_content_types_are_stable_and_header_safe(value: str | None) -> None:
    normalized = normalize_content_type(value)
    if normalized is not None:
        assert normalize_content_type(normalized) == normalized
        assert normalized.isascii() and all(" " <= ch <= "~" for ch in normalized)
        assert len(normalized) <= 255


@SETTINGS
@given(st.text())
def test_guessed_content_types_are_valid_content_types(key: str) -> None:
    guessed = guess_content_type(key)
    assert normalize_content_type(guessed) == guessed
