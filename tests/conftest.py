"""Fixtures of the end-to-end tests: a fresh dev setup per test and daemons over real mutual TLS.

* ``dev``: ``init_dev`` into the test's tmp_path (listen on port 0), as a ``helpers.Dev``, with
  the seal of ``seal_kind`` in its config.
* ``seal_kind``: "file" (init_dev's key file) unless a module parametrises it, as the
  end-to-end modules do with ``pytestmark = seals.EACH_SEAL`` ("file", "pkcs11", "transit").
* ``seal_setup``: the test's fresh KEK for that seal and the secrets that must never reach a
  file or a log (see tests/seals.py).
* ``harness``: an in-process daemon on that setup, not started yet (edit the config first).
* ``daemon``: the same, started with the generated config.
* ``subprocess_daemon``: ``faceseald serve`` as a child process, not started yet.
* ``softhsm_token`` (tests/softhsm.py) and ``shared_openbao`` (one OpenBao dev server for the
  session; tests/openbao.py) back the PKCS#11 and Transit seals.

Every channel, client and daemon is closed at teardown, because pytest turns leaks into errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Dev, InProcessDaemon, SubprocessDaemon
from seals import SealSetup, apply_seal, make_seal_setup, tests_module

from faceseal.server.devinit import init_dev

try:
    from tests.softhsm import softhsm_token
except ModuleNotFoundError:  # plain `pytest` (not `python -m pytest`): only tests/ is on sys.path
    from softhsm import softhsm_token  # type: ignore[no-redef] # noqa: F401


@pytest.fixture(scope="session")
def shared_openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One OpenBao dev server for the session; each test provisions its own key and token on it."""
    bao = tests_module("openbao").OpenBao(tmp_path_factory.mktemp("openbao-shared"))
    try:
        bao.start()
        yield bao
    finally:
        bao.stop()


@pytest.fixture
def seal_kind(request: pytest.FixtureRequest) -> str:
    kind: str = getattr(request, "param", "file")
    return kind


@pytest.fixture
def seal_setup(seal_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> SealSetup:
    return make_seal_setup(seal_kind, request, tmp_path / "seal")


@pytest.fixture
def dev(tmp_path: Path, seal_setup: SealSetup) -> Iterator[Dev]:
    directory = tmp_path / "dev"
    init_dev(directory, listen="127.0.0.1:0")
    setup = Dev(directory)
    apply_seal(setup, seal_setup)
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
