from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


def needs_root() -> pytest.MarkDecorator:
    ok = os.geteuid() == 0 and shutil.which("ip") is not None
    return pytest.mark.skipif(not ok, reason="needs root and iproute2 (network namespaces)")
