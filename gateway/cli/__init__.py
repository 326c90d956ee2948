"""The ``chunkgate`` command: serve, sign, put, get, gc, fsck -- one module each here.

Every failure a user can cause ends in one line on stderr and a non-zero exit (2 for bad
configuration), never a traceback. This module only dispatches; each command imports what it
needs when it runs.
"""

from __future__ import annotations

import sys
from typing import Sequence


def fail(message: str, code: int = 2) -> int:
    print(f"chunkgate: {message}", file=sys.stderr)
    return code


COMMANDS = {
    "serve": ("run the gateway", "gateway.cli.serve:cmd_serve"),
    "sign": ("print a signed read URL", "gateway.cli.sign:cmd_sign"),
    "put": ("upload a file (resumable, tus)", "gateway.cli.client:cmd_put"),
    "get": ("download an object", "gateway.cli.client:cmd_get"),
    "gc": ("delete unreferenced chunks and expired uploads", "gateway.cli.maintenance:cmd_gc"),
    "fsck": ("check every manifest against its chunks", "gateway.cli.maintenance:cmd_fsck"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: chunkgate COMMAND [options]\n\ncommands:")
        for name, (summary, _) in COMMANDS.items():
            print(f"  {name:<6} {summary}")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        return fail(f"unknown command {name!r}; try: {', '.join(COMMANDS)}")
    module_name, func_name = COMMANDS[name][1].split(":")
    import importlib

    # Imported on demand so `chunkgate serve` doesn't load the client's or gc's dependencies.
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)
