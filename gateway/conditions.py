"""HTTP conditional requests (RFC 9110 §13): decide 304 / 412 / proceed, and whether a Range may
be honoured, from If-Match, If-Unmodified-Since, If-None-Match, If-Modified-Since and If-Range.

Pure logic: no aiohttp, no I/O. Handlers pass the request headers and the current validators;
this module returns a decision and never builds a response, so the mapping to HTTP status
stays in the handler. It must never look at a Range header's content (``ranges.py`` does) nor
invent validators: the ETag and Last-Modified it compares against are the ones the response sends.

Why not a library: aiohttp parses If-Modified-Since/If-Unmodified-Since/If-Range as dates only
(an If-Range ETag is lost) and offers no If-Match/If-None-Match evaluation. ``email.utils``
parses more than HTTP-date (numeric zones, dates without a weekday, a list of dates that
§13.1.3 says to ignore) and reads two-digit years with a fixed 1969/2068 pivot where §5.6.7
wants the 50-year rule, so HTTP-date is matched here with three small patterns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from enum import Enum
from typing import Literal

__all__ = [
    "Decision",
    "Outcome",
    "evaluate",
    "evaluate_write",
    "http_date",
    "parse_etag_list",
    "parse_http_date",
    "strong_match",
    "weak_match",
]

_OWS = " \t"


class Outcome(Enum):
    PROCEED = "proceed"
    NOT_MODIFIED = "not_modified"  # 304
    PRECONDITION_FAILED = "precondition_failed"  # 412


@dataclass(frozen=True)
class Decision:
    """What to do with a request. ``honor_range`` is True only for a GET that has a Range header
    the handler should apply (no If-Range, or an If-Range that matched); otherwise any Range
    is ignored and the whole representation is sent."""

    outcome: Outcome
    honor_range: bool


# ---------------------------------------------------------------------------- entity tags

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text (§8.8.3).
# "W/" is case-sensitive. A comma is a legal etagc, hence a scanner rather than split(",").
_ETAG = re.compile(r'(?:W/)?"[\x21\x23-\x7e\x80-\U0010ffff]*"')


def parse_etag_list(value: str) -> list[str] | Literal["*"]:
    """The entity-tags of an If-Match / If-None-Match value, or ``"*"``.

    Elements that are not entity-tags (say an unquoted ``abc``) are skipped rather than
    failing the whole field: an If-Match of only junk then matches nothing (412, the safe
    answer for a write), and an If-None-Match of only junk matches nothing (a full 200).
    """
    text = value.strip(_OWS)
    if text == "*":
        return "*"
    tags: list[str] = []
    pos, n = 0, len(text)
    while pos < n:
        while pos < n and text[pos] in " \t,":
            pos += 1
        if pos >= n:
            break
        m = _ETAG.match(text, pos)
        if m:
            after = m.end()
            while after < n and text[after] in _OWS:
                after += 1
            if after >= n or text[after] == ",":
                tags.append(m.group())
                pos = after
                continue
        comma = text.find(",", pos)
        pos = n if comma < 0 else comma
    return tags


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def strong_match(a: str, b: str) -> bool:
    """Strong comparison (§8.8.3.2): neither is weak and the opaque-tags are identical."""
    return not a.startswith("W/") and not b.startswith("W/") and a == b


def weak_match(a: str, b: str) -> bool:
    """Weak comparison (§8.8.3.2): the opaque-tags are identical, weak or not."""
    return _opaque(a) == _opaque(b)


# ---------------------------------------------------------------------------- HTTP-date

_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_DAY_LONG = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = r"(?P<month>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(?P<h>[0-9]{2}):(?P<m>[0-9]{2}):(?P<s>[0-9]{2})"
_MONTHS = {m: i for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}
# §5.6.7 says HTTP-date is case-sensitive but also encourages robust parsing: names are matched
# case-insensitively, the shapes exactly, so a list of dates or any other text is not a date.
_IMF_FIXDATE = re.compile(
    rf"{_DAY}, (?P<d>[0-9]{{2}}) {_MONTH} (?P<y>[0-9]{{4}}) {_TIME} GMT", re.ASCII | re.I
)
_RFC850 = re.compile(
    rf"{_DAY_LONG}, (?P<d>[0-9]{{2}})-{_MONTH}-(?P<yy>[0-9]{{2}}) {_TIME} GMT", re.ASCII | re.I
)
_ASCTIME = re.compile(
    rf"{_DAY} {_MONTH} (?P<d>[0-9]{{2}}| [0-9]) {_TIME} (?P<y>[0-9]{{4}})", re.ASCII | re.I
)


def _two_digit_year(yy: int, now: datetime | None) -> int:
    # §5.6.7: a two-digit year that looks more than 50 years ahead is the latest past year with
    # those digits; so pick the year in (this year - 50, this year + 50] ending in yy.
    this_year = (now or datetime.now(timezone.utc)).year
    year = this_year - this_year % 100 + yy
    if year > this_year + 50:
        year -= 100
    elif year <= this_year - 50:
        year += 100
    return year


def parse_http_date(value: str, *, now: datetime | None = None) -> datetime | None:
    """An HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime forms) as an aware UTC
    datetime, or None if ``value`` is not exactly one such date. ``now`` anchors the 50-year
    rule for RFC 850's two-digit years (defaults to the current time)."""
    text = value.strip(_OWS)
    m = _IMF_FIXDATE.fullmatch(text) or _ASCTIME.fullmatch(text)
    if m:
        year = int(m.group("y"))
    elif m := _RFC850.fullmatch(text):
        year = _two_digit_year(int(m.group("yy")), now)
    else:
        return None
    # second may be 60 (a leap second, §5.6.7); datetime cannot hold it.
    second = min(int(m.group("s")), 59)
    try:
        return datetime(
            year,
            _MONTHS[m.group("month").lower()],
            int(m.group("d")),
            int(m.group("h")),
            int(m.group("m")),
            second,
            tzinfo=timezone.utc,
        )
    except ValueError:  # 31 Feb, hour 25, year 0000
        return None


def _utc_whole_seconds(dt: datetime) -> datetime:
    # Last-Modified is sent with 1-second resolution, so a client can only ever echo whole
    # seconds back; comparing the sub-second part would make every If-Modified-Since miss.
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).replace(microsecond=0)


def http_date(dt: datetime) -> str:
    """``dt`` as an IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``). Naive means UTC."""
    return format_datetime(_utc_whole_seconds(dt), usegmt=True)


# ---------------------------------------------------------------------------- evaluation

_CONDITIONAL_FIELDS = frozenset(
    ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range", "range")
)


def _fields(headers: Mapping[str, str]) -> dict[str, str]:
    """The conditional fields by lower-case name. A field sent on several lines is joined with
    commas (§5.3): right for the ETag lists, and it makes a repeated date an invalid date,
    which §13.1.3/§13.1.4 say to ignore. ``items()`` of aiohttp's CIMultiDictProxy yields every
    line, so repeats are seen."""
    found: dict[str, list[str]] = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname in _CONDITIONAL_FIELDS:
            found.setdefault(lname, []).append(value)
    return {name: ", ".join(values) for name, values in found.items()}


def _if_match(value: str, etag: str | None) -> bool:
    tags = parse_etag_list(value)
    if tags == "*":
        return etag is not None
    return etag is not None and any(strong_match(t, etag) for t in tags)


def _if_none_match(value: str, etag: str | None) -> bool:
    tags = parse_etag_list(value)
    if tags == "*":
        return etag is None
    return etag is None or not any(weak_match(t, etag) for t in tags)


def _if_range(value: str, etag: str | None, last_modified: datetime | None) -> bool:
    text = value.strip(_OWS)
    if text.startswith(('"', "W/")):
        # §13.1.5: an entity-tag matches only if it exactly matches the ETag we would send,
        # i.e. strong comparison; a weak tag never does.
        return etag is not None and _ETAG.fullmatch(text) is not None and strong_match(text, etag)
    # §13.1.5 wants a date to be a strong validator and to equal Last-Modified exactly. We treat
    # Last-Modified as strong: a manifest is committed once and never rewritten in place, so
    # two versions within the same second are the one case this could miss.
    date = parse_http_date(text)
    return date is not None and last_modified is not None and date == last_modified


def evaluate(
    method: str,
    headers: Mapping[str, str],
    *,
    etag: str | None,
    last_modified: datetime | None,
    exists: bool = True,
) -> Decision:
    """Evaluate the preconditions of a request in RFC 9110 §13.2.2 order.

    1. If-Match (strong comparison; ``*`` = the object exists) -> 412 when false.
    2. Else If-Unmodified-Since -> 412 when modified after the date.
    3. If-None-Match (weak comparison; ``*`` = exists) -> when false, 304 for GET/HEAD, else 412.
    4. Else, for GET/HEAD only, If-Modified-Since -> 304 when not modified since the date.
    5. For GET with a Range: If-Range decides ``honor_range``.

    Invalid dates are ignored (§13.1.3, §13.1.4), as is a date condition when there is no
    ``last_modified``. Dates compare at whole seconds. ``exists=False`` for GET/HEAD proceeds
    without evaluating anything: the answer will be 404, and §13.2.1 says preconditions are
    ignored when the unconditional answer would not be 2xx or 412. For other methods
    ``exists=False`` means "no current representation" (``If-Match: *`` fails, ``If-None-Match:
    *`` passes). Method names are case-sensitive (§9.1).

    Only GET honours Range (§14.2: it is the only method range handling is defined for), so a
    HEAD gets the headers of a 200.
    """
    safe = method in ("GET", "HEAD")
    if safe and not exists:
        return Decision(Outcome.PROCEED, honor_range=False)
    current = etag if exists else None
    modified = _utc_whole_seconds(last_modified) if exists and last_modified is not None else None
    fields = _fields(headers)

    if "if-match" in fields:
        if not _if_match(fields["if-match"], current):
            return Decision(Outcome.PRECONDITION_FAILED, honor_range=False)
    elif "if-unmodified-since" in fields:
        date = parse_http_date(fields["if-unmodified-since"])
        if date is not None and modified is not None and modified > date:
            return Decision(Outcome.PRECONDITION_FAILED, honor_range=False)

    if "if-none-match" in fields:
        if not _if_none_match(fields["if-none-match"], current):
            failed = Outcome.NOT_MODIFIED if safe else Outcome.PRECONDITION_FAILED
            return Decision(failed, honor_range=False)
    elif safe and "if-modified-since" in fields:
        date = parse_http_date(fields["if-modified-since"])
        if date is not None and modified is not None and modified <= date:
            return Decision(Outcome.NOT_MODIFIED, honor_range=False)

    honor_range = (
        method == "GET"
        and "range" in fields
        and ("if-range" not in fields or _if_range(fields["if-range"], current, modified))
    )
    return Decision(Outcome.PROCEED, honor_range=honor_range)


def evaluate_write(
    headers: Mapping[str, str],
    *,
    current_etag: str | None,
    last_modified: datetime | None = None,
) -> Outcome:
    """Preconditions of a PUT or DELETE against the current object (``current_etag`` None =
    absent): ``PROCEED`` or ``PRECONDITION_FAILED``. ``If-None-Match: *`` fails when the object
    exists; ``If-Match`` fails unless it names the current ETag (or is ``*`` and the object
    exists). If-Unmodified-Since is honoured when ``last_modified`` is given.

    A DELETE of an absent key should answer 404 without calling this (§13.2.1: preconditions
    are ignored when the unconditional answer is not 2xx/412)."""
    return evaluate(
        "PUT",
        headers,
        etag=current_etag,
        last_modified=last_modified,
        exists=current_etag is not None,
    ).outcome
