"""``chunkgate sign``: print a signed, expiring read URL (per key, or for a whole prefix)."""

from __future__ import annotations

import argparse
from typing import Sequence

from gateway.cli import fail
from gateway.config import parse_duration


def cmd_sign(argv: Sequence[str]) -> int:
    import os

    from gateway.auth import PrefixError, prefix_signed_url, signed_url, validate_prefix
    from storage.keys import BadKey, validate_key

    parser = argparse.ArgumentParser(prog="chunkgate sign", description="Print a signed, expiring read URL.")
    parser.add_argument("key")
    parser.add_argument("--prefix", default=None,
                        help="also admit every key that starts with PREFIX (the URL carries the credential in its "
                             "path, so what an HLS/DASH playlist names relative to it is admitted too)")
    parser.add_argument("--expires-in", default="1h")
    parser.add_argument("--signing-key", default=os.environ.get("CHUNKGATE_SIGNING_KEY"))
    parser.add_argument("--url", default=os.environ.get("CHUNKGATE_URL", "http://127.0.0.1:8080"))
    args = parser.parse_args(list(argv))
    if not args.signing_key:
        return fail("--signing-key: needed (or CHUNKGATE_SIGNING_KEY)")
    try:
        validate_key(args.key)
        expires_in = parse_duration(args.expires_in)
        if args.prefix is not None:
            validate_prefix(args.prefix)
    except BadKey as exc:
        return fail(f"KEY: {exc}")
    except PrefixError as exc:
        return fail(f"--prefix: {exc}")
    except ValueError as exc:
        return fail(f"--expires-in: {exc}")
    if args.prefix is None:
        print(signed_url(args.url, args.signing_key, args.key, expires_in))
    elif not args.key.startswith(args.prefix):
        return fail(f"KEY: {args.key!r} does not start with --prefix {args.prefix!r}")
    else:
        print(prefix_signed_url(args.url, args.signing_key, args.key, args.prefix, expires_in))
    return 0
