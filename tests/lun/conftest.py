"""The ``lu`` fixture of the logical unit tests (test_unit, test_sanitize,
test_xcopy): a 2-nexus LU with the stub reservation table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prmigrate.lun.unit import LogicalUnit

from .test_unit import BLOCKS, BS, A, B, StubPR


@pytest.fixture
def lu(tmp_path: Path) -> Iterator[LogicalUnit]:
    u = LogicalUnit(tmp_path / "img", BLOCKS * BS, name="lu-under-test", serial="SN0001", state_dir=tmp_path,
                    pr_factory=StubPR)
    u.attach(A)
    u.attach(B)
    yield u
    u.close()
