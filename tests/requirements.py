"""External components the integration tests need, and what to do when one is missing.

Outside CI a missing component skips its tests with a message saying what to install; under
CI=true the same absence fails, because `make test` installs everything when it runs as root and
a skipped integration test there would hide a broken install step.
"""

from __future__ import annotations

import os
import shutil

import pytest


def missing(what: str, install: str) -> None:
    """Skip (or, under CI, fail) because ``what`` is not available."""
    message = f"{what} is not available; install it with: {install}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


def require_binary(name: str, install: str) -> str:
    """The full path of ``name`` on the PATH, or skip/fail saying how to install it."""
    path = shutil.which(name)
    if path is None:
        missing(f"the program '{name}'", install)
        raise AssertionError("unreachable")
    return path
