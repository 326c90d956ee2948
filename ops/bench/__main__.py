"""``python -m ops.bench``: see ``ops.bench.cli``."""

from __future__ import annotations

from ops.bench.cli import main

raise SystemExit(main())
