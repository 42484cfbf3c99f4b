"""The human-written sets of ``$PROMPTKIT_DATA`` in tests: a missing file skips with the reason, and fails under CI."""

from __future__ import annotations

import os

import pytest


def missing_data(error: FileNotFoundError) -> None:
    """Skip the test with ``error``'s message (which names the file); under ``CI=true``, fail it instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(str(error))
    pytest.skip(str(error))
