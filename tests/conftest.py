"""Fixtures of the end-to-end tests: a fresh dev setup per test and daemons over real mutual TLS.

* ``dev``: ``init_dev`` into the test's tmp_path (listen on port 0), as a ``helpers.Dev``.
* ``harness``: an in-process daemon on that setup, not started yet (edit the config first).
* ``daemon``: the same, started with the generated config.
* ``subprocess_daemon``: ``faceseald serve`` as a child process, not started yet.

Every channel, client and daemon is closed at teardown, because pytest turns leaks into errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Dev, InProcessDaemon, SubprocessDaemon

from faceseal.server.devinit import init_dev


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    directory = tmp_path / "dev"
    init_dev(directory, listen="127.0.0.1:0")
    setup = Dev(directory)
    yield setup
    setup.close()


@pytest.fixture
def harness(dev: Dev) -> Iterator[InProcessDaemon]:
    runner = InProcessDaemon(dev)
    yield runner
    dev.close()
    runner.stop()


@pytest.fixture
def daemon(harness: InProcessDaemon) -> InProcessDaemon:
    return harness.start()


@pytest.fixture
def subprocess_daemon(dev: Dev, tmp_path: Path) -> Iterator[SubprocessDaemon]:
    runner = SubprocessDaemon(dev, tmp_path / "faceseald.log")
    yield runner
    dev.close()
    runner.ensure_stopped()
