"""More seeds for the randomized tests, for a longer hunt than CI's.

``PRMIGRATE_SEEDS=300 pytest tests/device/test_differential.py
tests/device/test_differential_iscsi.py tests/migration/test_random_states.py``
adds seeds 100..399 to each of their pinned cases (with the other parameters
drawn from the seed's bits). CI runs the pinned seeds only.
"""

from __future__ import annotations

import os


def extra_seeds() -> range:
    n = int(os.environ.get("PRMIGRATE_SEEDS", "0") or 0)
    return range(100, 100 + max(0, n))
