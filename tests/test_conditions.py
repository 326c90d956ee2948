"""Precondition evaluation, ETag lists and HTTP-dates (gateway/conditions.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.conditions import (
    Decision,
    Outcome,
    evaluate,
    evaluate_write,
    http_date,
    parse_etag_list,
    parse_http_date,
)

PROCEED = Outcome.PROCEED
NOT_MODIFIED = Outcome.NOT_MODIFIED
FAILED = Outcome.PRECONDITION_FAILED

ETAG = '"v1"'
# Sub-second part on purpose: Last-Modified is sent at whole seconds, so clients echo those.
MODIFIED = datetime(2024, 5, 1, 12, 0, 0, 730000, tzinfo=timezone.utc)
SAME = "Wed, 01 May 2024 12:00:00 GMT"
EARLIER = "Wed, 01 May 2024 11:59:59 GMT"
LATER = "Wed, 01 May 2024 12:00:01 GMT"
RANGE = {"Range": "bytes=0-1"}

# (method, headers, expected outcome, expected honor_range)
CASES = [
    # no conditions
    ("GET", {}, PROCEED, False, "a plain get proceeds without a range"),
    ("GET", RANGE, PROCEED, True, "a plain range get honours the range"),
    ("HEAD", RANGE, PROCEED, False, "head never honours a range"),
    ("POST", RANGE, PROCEED, False, "post never honours a range"),
    ("get", RANGE, PROCEED, False, "method names are case sensitive"),
    # If-Match (strong)
    ("GET", {"If-Match": ETAG}, PROCEED, False, "if match with the current etag proceeds"),
    ("GET", {"If-Match": '"old", "v1"'}, PROCEED, False, "if match with a list containing the etag proceeds"),
    ("GET", {"If-Match": '"old"'}, FAILED, False, "if match with another etag fails"),
    ("GET", {"If-Match": 'W/"v1"'}, FAILED, False, "if match uses strong comparison so a weak tag fails"),
    ("GET", {"If-Match": "*"}, PROCEED, False, "if match star proceeds when the object exists"),
    ("GET", {"If-Match": "v1"}, FAILED, False, "if match with an unquoted tag fails"),
    ("GET", {"If-Match": ""}, FAILED, False, "if match with an empty list fails"),
    ("GET", {"If-Match": '"v1"', **RANGE}, PROCEED, True, "a passing if match keeps the range"),
    ("GET", {"If-Match": '"x"', **RANGE}, FAILED, False, "a failing if match is 412 even with a range"),
    # If-Unmodified-Since
    ("GET", {"If-Unmodified-Since": SAME}, PROCEED, False, "unmodified since the exact second proceeds"),
    ("GET", {"If-Unmodified-Since": LATER}, PROCEED, False, "unmodified since a later date proceeds"),
    ("GET", {"If-Unmodified-Since": EARLIER}, FAILED, False, "modified after the if unmodified since date fails"),
    ("GET", {"If-Unmodified-Since": "yesterday"}, PROCEED, False, "an invalid if unmodified since is ignored"),
    ("GET", {"If-Unmodified-Since": f"{EARLIER}, {LATER}"}, PROCEED, False, "a list of dates is ignored"),
    ("GET", {"If-Match": ETAG, "If-Unmodified-Since": EARLIER}, PROCEED, False, "if match overrides if unmodified since"),
    ("GET", {"If-Match": '"x"', "If-Unmodified-Since": LATER}, FAILED, False, "a failing if match is not rescued by the date"),
    # If-None-Match (weak)
    ("GET", {"If-None-Match": ETAG}, NOT_MODIFIED, False, "if none match with the current etag is not modified"),
    ("HEAD", {"If-None-Match": ETAG}, NOT_MODIFIED, False, "head with a matching if none match is not modified"),
    ("GET", {"If-None-Match": 'W/"v1"'}, NOT_MODIFIED, False, "if none match uses weak comparison"),
    ("GET", {"If-None-Match": '"a", "v1"'}, NOT_MODIFIED, False, "if none match with a list containing the etag"),
    ("GET", {"If-None-Match": '"old"'}, PROCEED, False, "if none match with another etag proceeds"),
    ("GET", {"If-None-Match": "*"}, NOT_MODIFIED, False, "if none match star on an existing object is not modified"),
    ("GET", {"If-None-Match": "junk"}, PROCEED, False, "if none match with junk proceeds"),
    ("GET", {"If-None-Match": '"old"', **RANGE}, PROCEED, True, "a passing if none match keeps the range"),
    ("GET", {"If-None-Match": ETAG, **RANGE}, NOT_MODIFIED, False, "a matching if none match wins over a range"),
    ("PUT", {"If-None-Match": ETAG}, FAILED, False, "a matching if none match on a write fails"),
    ("DELETE", {"If-None-Match": "*"}, FAILED, False, "if none match star on a write to an existing object fails"),
    ("GET", {"If-Unmodified-Since": EARLIER, "If-None-Match": ETAG}, FAILED, False, "if unmodified since is checked before if none match"),
    ("GET", {"If-Match": '"x"', "If-None-Match": '"x"'}, FAILED, False, "if match is checked before if none match"),
    # If-Modified-Since
    ("GET", {"If-Modified-Since": SAME}, NOT_MODIFIED, False, "not modified since the exact second"),
    ("GET", {"If-Modified-Since": LATER}, NOT_MODIFIED, False, "not modified since a later date"),
    ("GET", {"If-Modified-Since": EARLIER}, PROCEED, False, "modified since an earlier date proceeds"),
    ("HEAD", {"If-Modified-Since": SAME}, NOT_MODIFIED, False, "head honours if modified since"),
    ("PUT", {"If-Modified-Since": SAME}, PROCEED, False, "if modified since is ignored for writes"),
    ("GET", {"If-Modified-Since": "not a date"}, PROCEED, False, "an invalid if modified since is ignored"),
    ("GET", {"If-Modified-Since": f"{SAME}, {SAME}"}, PROCEED, False, "an if modified since list is ignored"),
    ("GET", {"If-None-Match": '"old"', "If-Modified-Since": SAME}, PROCEED, False, "if none match overrides if modified since"),
    ("GET", {"If-Modified-Since": EARLIER, **RANGE}, PROCEED, True, "a modified object keeps the range"),
    # If-Range
    ("GET", {"If-Range": ETAG, **RANGE}, PROCEED, True, "if range with the current etag honours the range"),
    ("GET", {"If-Range": '"old"', **RANGE}, PROCEED, False, "if range with another etag sends the whole object"),
    ("GET", {"If-Range": 'W/"v1"', **RANGE}, PROCEED, False, "if range with a weak etag never matches"),
    ("GET", {"If-Range": SAME, **RANGE}, PROCEED, True, "if range with the exact last modified date honours the range"),
    ("GET", {"If-Range": LATER, **RANGE}, PROCEED, False, "if range with a later date sends the whole object"),
    ("GET", {"If-Range": EARLIER, **RANGE}, PROCEED, False, "if range with an earlier date sends the whole object"),
    ("GET", {"If-Range": "garbage", **RANGE}, PROCEED, False, "if range with garbage sends the whole object"),
    ("GET", {"If-Range": '"v1", "v1"', **RANGE}, PROCEED, False, "if range with a list is not an entity tag"),
    ("GET", {"If-Range": ETAG}, PROCEED, False, "if range without a range has nothing to honour"),
    ("HEAD", {"If-Range": ETAG, **RANGE}, PROCEED, False, "if range on head does not honour a range"),
    ("GET", {"if-range": ETAG, "range": "bytes=0-1"}, PROCEED, True, "header names are case insensitive"),
]


@pytest.mark.parametrize(("method", "headers", "outcome", "honor_range"), [c[:4] for c in CASES], ids=[c[4] for c in CASES])
def test_evaluate_follows_rfc_9110_order(
    method: str, headers: dict[str, str], outcome: Outcome, honor_range: bool
) -> None:
    assert evaluate(method, headers, etag=ETAG, last_modified=MODIFIED) == Decision(outcome, honor_range)


ABSENT = [
    ("GET", {"If-Match": "*"}, PROCEED, "get of a missing object ignores if match so it can be a 404"),
    ("HEAD", {"If-None-Match": "*"}, PROCEED, "head of a missing object ignores if none match"),
    ("PUT", {"If-Match": "*"}, FAILED, "if match star on a write to a missing object fails"),
    ("PUT", {"If-Match": '"v1"'}, FAILED, "if match with a tag on a write to a missing object fails"),
    ("PUT", {"If-None-Match": "*"}, PROCEED, "if none match star on a write to a missing object proceeds"),
    ("PUT", {"If-Unmodified-Since": EARLIER}, PROCEED, "if unmodified since on a missing object is ignored"),
]


@pytest.mark.parametrize(("method", "headers", "outcome"), [c[:3] for c in ABSENT], ids=[c[3] for c in ABSENT])
def test_evaluate_on_a_missing_object(method: str, headers: dict[str, str], outcome: Outcome) -> None:
    decision = evaluate(method, headers, etag=None, last_modified=None, exists=False)
    assert decision.outcome is outcome


def test_dates_are_ignored_without_a_last_modified() -> None:
    headers = {"If-Modified-Since": SAME, "If-Unmodified-Since": EARLIER}
    assert evaluate("GET", headers, etag=ETAG, last_modified=None).outcome is PROCEED
    range_headers = {"If-Range": SAME, **RANGE}
    assert evaluate("GET", range_headers, etag=ETAG, last_modified=None).honor_range is False


def test_naive_last_modified_is_read_as_utc() -> None:
    naive = MODIFIED.replace(tzinfo=None)
    assert evaluate("GET", {"If-Modified-Since": SAME}, etag=ETAG, last_modified=naive).outcome is NOT_MODIFIED


def test_last_modified_in_another_zone_compares_by_instant() -> None:
    paris = MODIFIED.astimezone(timezone(timedelta(hours=2)))
    assert evaluate("GET", {"If-Modified-Since": SAME}, etag=ETAG, last_modified=paris).outcome is NOT_MODIFIED


def test_repeated_if_none_match_lines_are_one_list() -> None:
    headers = CIMultiDictProxy(CIMultiDict([("If-None-Match", '"a"'), ("if-none-match", '"v1"')]))
    assert evaluate("GET", headers, etag=ETAG, last_modified=MODIFIED).outcome is NOT_MODIFIED


def test_repeated_if_modified_since_lines_are_an_invalid_date() -> None:
    headers = CIMultiDictProxy(CIMultiDict([("If-Modified-Since", SAME), ("If-Modified-Since", SAME)]))
    assert evaluate("GET", headers, etag=ETAG, last_modified=MODIFIED).outcome is PROCEED


WRITES = [
    ({}, '"v1"', PROCEED, "an unconditional write proceeds"),
    ({"If-None-Match": "*"}, None, PROCEED, "create only proceeds when the key is free"),
    ({"If-None-Match": "*"}, '"v1"', FAILED, "create only fails when the key exists"),
    ({"If-Match": '"v1"'}, '"v1"', PROCEED, "an update of the current version proceeds"),
    ({"If-Match": '"v0"'}, '"v1"', FAILED, "an update of a stale version fails"),
    ({"If-Match": '"v0", "v1"'}, '"v1"', PROCEED, "an update naming the current version in a list proceeds"),
    ({"If-Match": '"v1"'}, None, FAILED, "an update of a missing object fails"),
    ({"If-Match": "*"}, '"v1"', PROCEED, "if match star on an existing object proceeds"),
    ({"If-Match": 'W/"v1"'}, '"v1"', FAILED, "a weak tag never passes if match"),
    ({"If-None-Match": '"v1"'}, '"v1"', FAILED, "a write unless the current version fails when it is"),
    ({"If-None-Match": 'W/"v1"'}, '"v1"', FAILED, "if none match on a write compares weakly"),
    ({"If-None-Match": '"v0"'}, '"v1"', PROCEED, "a write unless another version proceeds"),
]


@pytest.mark.parametrize(("headers", "current", "outcome"), [w[:3] for w in WRITES], ids=[w[3] for w in WRITES])
def test_evaluate_write(headers: dict[str, str], current: str | None, outcome: Outcome) -> None:
    assert evaluate_write(headers, current_etag=current) is outcome


def test_evaluate_write_honours_if_unmodified_since_when_given_a_date() -> None:
    headers = {"If-Unmodified-Since": EARLIER}
    assert evaluate_write(headers, current_etag=ETAG, last_modified=MODIFIED) is FAILED
    assert evaluate_write(headers, current_etag=ETAG) is PROCEED


# ------------------------------------------------------------------ ETag lists

ETAG_LISTS = [
    ("*", "*", "a star"),
    ("  *\t", "*", "a star with whitespace"),
    ('"a"', ['"a"'], "one strong tag"),
    ('W/"a"', ['W/"a"'], "one weak tag"),
    ('"a", W/"b" ,"c"', ['"a"', 'W/"b"', '"c"'], "a list with whitespace around commas"),
    ('"a,b", "c"', ['"a,b"', '"c"'], "a comma inside quotes belongs to the tag"),
    ('""', ['""'], "an empty opaque tag"),
    ('"a",,"b",', ['"a"', '"b"'], "empty list elements are skipped"),
    ('abc, "d"', ['"d"'], "an unquoted element is skipped"),
    ('w/"a"', [], "a lower case weak prefix is not an entity tag"),
    ('"a b"', [], "a space is not allowed inside a tag"),
    ('"a"x, "b"', ['"b"'], "trailing junk after a tag skips that element"),
    ('"open, "b"', ['"b"'], "an unterminated tag is skipped"),
    ('*, "a"', ['"a"'], "a star inside a list is not a wildcard"),
    ("", [], "an empty field is an empty list"),
]


@pytest.mark.parametrize(("value", "expected"), [e[:2] for e in ETAG_LISTS], ids=[e[2] for e in ETAG_LISTS])
def test_parse_etag_list(value: str, expected: list[str] | str) -> None:
    assert parse_etag_list(value) == expected


# ------------------------------------------------------------------ HTTP-date

NOW = datetime(2026, 11, 22, tzinfo=timezone.utc)
NOV_6_1994 = datetime(1994, 11, 6, 8, 49, 37, tzinfo=timezone.utc)

DATES = [
    ("Sun, 06 Nov 1994 08:49:37 GMT", NOV_6_1994, "an imf fixdate"),
    ("Sunday, 06-Nov-94 08:49:37 GMT", NOV_6_1994, "an obsolete rfc 850 date"),
    ("Sun Nov  6 08:49:37 1994", NOV_6_1994, "an obsolete asctime date"),
    ("Sun Nov 16 08:49:37 1994", NOV_6_1994.replace(day=16), "an asctime date with a two digit day"),
    ("sun, 06 nov 1994 08:49:37 GMT", NOV_6_1994, "lower case names are accepted"),
    (" Sun, 06 Nov 1994 08:49:37 GMT ", NOV_6_1994, "surrounding whitespace is ignored"),
    ("Thursday, 01-Jan-76 00:00:00 GMT", datetime(2076, 1, 1, tzinfo=timezone.utc), "a two digit year up to fifty years ahead stays ahead"),
    ("Friday, 01-Jan-77 00:00:00 GMT", datetime(1977, 1, 1, tzinfo=timezone.utc), "a two digit year more than fifty years ahead is in the past"),
    ("Wed, 31 Dec 2008 23:59:60 GMT", datetime(2008, 12, 31, 23, 59, 59, tzinfo=timezone.utc), "a leap second is read as the second before"),
    ("Sun, 06 Nov 1994 08:49:37 +0000", None, "a numeric zone is not an http date"),
    ("Sun, 06 Nov 1994 08:49:37 UTC", None, "utc is not gmt"),
    ("06 Nov 1994 08:49:37 GMT", None, "a date without a weekday is not an http date"),
    ("Sun, 6 Nov 1994 08:49:37 GMT", None, "a one digit day in an imf fixdate is invalid"),
    ("Sun, 31 Feb 1994 08:49:37 GMT", None, "a day that does not exist is invalid"),
    ("Sun, 06 Nov 1994 25:49:37 GMT", None, "an hour that does not exist is invalid"),
    ("Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT", None, "a list of dates is invalid"),
    ("1994-11-06T08:49:37Z", None, "iso 8601 is not an http date"),
    ("", None, "an empty value is not a date"),
]


@pytest.mark.parametrize(("value", "expected"), [d[:2] for d in DATES], ids=[d[2] for d in DATES])
def test_parse_http_date(value: str, expected: datetime | None) -> None:
    assert parse_http_date(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("dt", "expected"),
    [
        (NOV_6_1994, "Sun, 06 Nov 1994 08:49:37 GMT"),
        (NOV_6_1994.replace(microsecond=999999), "Sun, 06 Nov 1994 08:49:37 GMT"),
        (NOV_6_1994.astimezone(timezone(timedelta(hours=-5))), "Sun, 06 Nov 1994 08:49:37 GMT"),
        (NOV_6_1994.replace(tzinfo=None), "Sun, 06 Nov 1994 08:49:37 GMT"),
        (datetime(2024, 3, 9, 1, 2, 3, tzinfo=timezone.utc), "Sat, 09 Mar 2024 01:02:03 GMT"),
    ],
    ids=["utc", "sub second part dropped", "other zone converted to gmt", "naive is utc", "zero padded fields"],
)
def test_http_date_is_an_imf_fixdate(dt: datetime, expected: str) -> None:
    assert http_date(dt) == expected


def test_http_date_round_trips_through_parse_http_date() -> None:
    assert parse_http_date(http_date(MODIFIED)) == MODIFIED.replace(microsecond=0)
