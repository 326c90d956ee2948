"""Each fix of the commit-protocol issue, reverted one at a time, to show the simulator finds it.

Every ``m*.py`` here is a small edit script that undoes one fix in a copy of the source tree
(never in the tree itself). ``find(name, seeds)`` copies the tree to a temporary directory,
applies the script, and runs the simulator's soak there until the first violated invariant.

    python -m tests.sim --mutants                  # every mutant, seeds 0:5000
    python -m tests.sim --mutants m1_tus_recommit  # one
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
NAMES = sorted(p.stem for p in HERE.glob("m*.py"))
_FAILED = re.compile(r"seed (\d+) FAILED after (\d+) steps: (.*)")


@dataclass(frozen=True)
class Found:
    mutant: str
    seed: int | None  # None: not found in the seeds tried
    steps: int
    message: str
    seeds_tried: int

    def line(self) -> str:
        if self.seed is None:
            return f"{self.mutant}: NOT found in {self.seeds_tried} seeds"
        return f"{self.mutant}: seed {self.seed}, after {self.steps} operations: {self.message}"


def describe(name: str) -> str:
    return (HERE / f"{name}.py").read_text().splitlines()[0].lstrip("# ")


def find(name: str, seeds: str = "0:5000", *, jobs: int = 1, timeout: float = 3000) -> Found:
    """Revert fix ``name`` in a copy of the tree and soak until the first violation."""
    with tempfile.TemporaryDirectory(prefix=f"chunkgate-{name}-") as tmp:
        for part in ("storage", "gateway", "tests/sim", "tests/__init__.py"):
            src, dst = ROOT / part, Path(tmp) / part
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        subprocess.run([sys.executable, str(HERE / f"{name}.py")], cwd=tmp, check=True)
        env = dict(os.environ, PYTHONPATH=tmp)
        done = subprocess.run([sys.executable, "-m", "tests.sim", "--seeds", seeds, "--stop-at-first",
                               "--jobs", str(jobs)], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    match = _FAILED.search(done.stdout)
    tried = re.search(r"(\d+) workloads", done.stdout)
    count = int(tried.group(1)) if tried else 0
    if match is None:
        return Found(name, None, 0, "", count)
    return Found(name, int(match.group(1)), int(match.group(2)), match.group(3), count)
