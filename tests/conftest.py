"""Suite-wide set-up: the tests and every subprocess they start (``python3 -m
prmigrate.cli ...``) use this checkout's sources, whatever is installed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
_pp = os.environ.get("PYTHONPATH", "")
if SRC not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = SRC + (os.pathsep + _pp if _pp else "")

# Hypothesis judges correctness here, not speed: its per-example deadline
# (200 ms) is a timed assertion, and on a shared 2-core machine a loaded
# moment fails it. Speed is measured in benchmarks/.
from hypothesis import settings  # noqa: E402

settings.register_profile("prmigrate", deadline=None)
settings.load_profile("prmigrate")
