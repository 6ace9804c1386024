"""Shared pieces of the end-to-end tests: a dev setup to edit, clients, and daemons to run.

``Dev`` wraps a directory written by ``init_dev``: it edits faceseal.toml and policy.toml, issues
more client certificates from the dev CA and opens channels and clients with them.
``InProcessDaemon`` runs ``faceseal.server.daemon.Daemon`` in this process; ``SubprocessDaemon``
runs ``faceseald serve`` for the tests that need a real process (signals, kill -9).
Every wait polls with a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from faceseal.client import AdminClient, FaceSealClient
from faceseal.server import pki
from faceseal.server.config import load_config
from faceseal.server.daemon import Daemon
from faceseal.v1 import faceseal_pb2_grpc

DIM = 128
TRUST_DOMAIN = "spiffe://faceseal.dev"
STARTUP_DEADLINE = 30.0
DATA_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "face_encodings_dlib128.npz"
FACESEALD = Path(sys.executable).parent / "faceseald"

F32 = npt.NDArray[np.float32]
T = TypeVar("T")


# ------------------------------------------------------------------------------ small utilities


def free_port() -> int:
    """A port nobody listens on right now (the caller retries if someone takes it meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def poll(what: str, check: Callable[[], T | None], *, deadline: float = 15.0, every: float = 0.05) -> T:
    """Call ``check`` until it returns something other than None; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline:g} s waiting for {what}")
        time.sleep(every)


def random_encodings(n: int, *, seed: int, dim: int = DIM) -> F32:
    """``n`` random unit-length vectors: any two are about 1.41 apart, far beyond a 0.6 threshold."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim))
    unit: F32 = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return unit


def nearby(encoding: F32, distance: float, *, seed: int) -> F32:
    """A vector ``distance`` away from ``encoding`` (euclidean, up to float32 rounding)."""
    rng = np.random.default_rng(seed)
    step = rng.standard_normal(encoding.shape[0])
    step = step * (distance / float(np.linalg.norm(step)))
    moved: F32 = (encoding.astype(np.float64) + step).astype(np.float32)
    return moved


def euclidean(a: F32, b: F32) -> float:
    """The distance the daemon computes: float64 over the float32 values that travel on the wire."""
    return float(np.linalg.norm(a.astype(np.float32).astype(np.float64) - b.astype(np.float32)))


def load_real_encodings() -> tuple[F32, npt.NDArray[np.str_]]:
    """The 140 dlib encodings of /work/shared/data (never printed: they are biometric data)."""
    if not DATA_FILE.is_file():
        raise AssertionError(f"test data missing: {DATA_FILE} (face_encodings_dlib128.npz, see shared/data/README.md)")
    with np.load(DATA_FILE, allow_pickle=False) as data:
        encodings = np.asarray(data["encodings"], dtype=np.float32)
        labels = np.asarray(data["labels"])
    assert encodings.shape == (140, DIM), "unexpected shape of the test encodings"
    return encodings, labels


def db_snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read through a read-only connection (the daemon may be running)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert "templates" in tables, tables
        assert "meta" in tables, tables
        # The table names come from sqlite_master, not from a request.
        return {t: sorted(db.execute(f'SELECT * FROM "{t}"').fetchall()) for t in sorted(tables)}  # noqa: S608


def db_revision(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])


def db_execute(path: Path, sql: str, params: Iterable[Any] = ()) -> int:
    """Write to the store file behind the daemon's back (it must be stopped); returns rowcount."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        with db:
            rowcount = db.execute(sql, tuple(params)).rowcount
        return rowcount


# ------------------------------------------------------------------------------------ TOML writer


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string with \u escapes is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for faceseal.toml: scalars, arrays of scalars and nested tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}.{key}" if prefix else key
            out += f"\n[{name}]\n" + dump_toml(value, name)
    return out


def dump_policy(callers: list[dict[str, Any]]) -> str:
    out = ""
    for caller in callers:
        out += "[[callers]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in caller.items()) + "\n"
    return out


def write_atomically(path: Path, text: str) -> None:
    """Replace a file in one step, so a daemon reading it never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- dev setups


class Dev:
    """A directory written by ``init_dev``, with edits and credentials for the tests."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._closers: list[Callable[[], None]] = []

    # -- files ---------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.dir / "faceseal.toml"

    @property
    def policy_path(self) -> Path:
        return self.dir / "policy.toml"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "faceseal.db"

    def kek(self) -> bytes:
        return (self.dir / "seal.key").read_bytes()

    # -- configuration ---------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return tomllib.loads(self.config_path.read_text(encoding="utf-8"))

    def edit_config(self, edit: Callable[[dict[str, Any]], None]) -> None:
        config = self.config()
        edit(config)
        write_atomically(self.config_path, dump_toml(config))
        load_config(self.config_path)  # the edit itself must leave a valid config

    def set_server(self, **settings: Any) -> None:
        self.edit_config(lambda c: c["server"].update(settings))

    def add_gallery(
        self, name: str, *, dimension: int = DIM, metric: str = "euclidean", threshold: float = 0.6
    ) -> None:
        gallery = {"dimension": dimension, "metric": metric, "threshold": threshold}
        self.edit_config(lambda c: c["galleries"].__setitem__(name, gallery))

    # -- policy ----------------------------------------------------------------------------------

    def policy(self) -> list[dict[str, Any]]:
        callers: list[dict[str, Any]] = tomllib.loads(self.policy_path.read_text(encoding="utf-8"))["callers"]
        return callers

    def write_policy(self, callers: list[dict[str, Any]]) -> None:
        write_atomically(self.policy_path, dump_policy(callers))

    def edit_caller(self, profile: str, **fields: Any) -> None:
        """Change fields of the policy entry of ``spiffe://faceseal.dev/<profile>``."""
        callers = self.policy()
        (entry,) = [c for c in callers if c["identity"] == f"{TRUST_DOMAIN}/{profile}"]
        entry.update(fields)
        self.write_policy(callers)

    def add_caller(
        self,
        profile: str,
        permissions: list[str],
        *,
        galleries: tuple[str, ...] = ("*",),
        disclosure: str = "decision",
    ) -> None:
        """A new policy entry and a client certificate for it, usable as ``profile``."""
        self.issue_client(profile)
        callers = self.policy()
        callers.append(
            {
                "identity": f"{TRUST_DOMAIN}/{profile}",
                "permissions": permissions,
                "galleries": list(galleries),
                "disclosure": disclosure,
            }
        )
        self.write_policy(callers)

    def ca(self) -> pki.Issued:
        cert = x509.load_pem_x509_certificate((self.dir / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), password=None)
        return pki.Issued(cert=cert, key=key)  # type: ignore[arg-type]

    def issue_client(self, profile: str, *, spiffe_id: str | None = None) -> None:
        """A client certificate from the dev CA (no policy entry), stored as profile ``profile``."""
        issued = pki.issue_client(self.ca(), profile, spiffe_id=spiffe_id or f"{TRUST_DOMAIN}/{profile}")
        issued.write(self.dir / "clients" / f"{profile}.crt", self.dir / "clients" / f"{profile}.key")

    # -- channels and clients ------------------------------------------------------------------

    def credentials(self, profile: str | None) -> grpc.ChannelCredentials:
        """Mutual-TLS credentials for ``profile``; None gives server verification only (no cert)."""
        ca = (self.dir / "ca.crt").read_bytes()
        if profile is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(self.dir / "clients" / f"{profile}.key").read_bytes(),
            certificate_chain=(self.dir / "clients" / f"{profile}.crt").read_bytes(),
        )

    def channel(self, target: str, profile: str | None) -> grpc.Channel:
        channel = grpc.secure_channel(target, self.credentials(profile))
        self._closers.append(channel.close)
        return channel

    def stub(self, target: str, profile: str) -> faceseal_pb2_grpc.FaceSealServiceStub:
        return faceseal_pb2_grpc.FaceSealServiceStub(self.channel(target, profile))

    def client(self, target: str, profile: str, *, timeout: float = 10.0) -> FaceSealClient:
        client = FaceSealClient.from_profile(profile, dev_dir=self.dir, target=target, timeout=timeout)
        self._closers.append(client.close)
        return client

    def close(self) -> None:
        """Close every channel and client handed out (pytest turns a leaked one into an error)."""
        while self._closers:
            self._closers.pop()()


def health(dev: Dev, target: str, *, timeout: float = 2.0) -> str:
    """The daemon's overall health status, or the gRPC code name when the call itself fails."""
    with grpc.secure_channel(target, dev.credentials("admin")) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as err:
            return str(err.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def rpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    """Make a raw stub call that must fail; return its status code."""
    try:
        call()
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    raise AssertionError("the call succeeded; it should have been refused")


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    try:
        call()
    except grpc.RpcError as err:
        return err
    raise AssertionError("the call succeeded; it should have been refused")


# --------------------------------------------------------------------------------------- daemons


class InProcessDaemon:
    """``Daemon`` in this process on an ephemeral port; ``start`` returns once it is SERVING."""

    def __init__(self, dev: Dev) -> None:
        self.dev = dev
        self.daemon: Daemon | None = None

    @property
    def target(self) -> str:
        assert self.daemon is not None, "the daemon is not running"
        return f"127.0.0.1:{self.daemon.port}"

    def start(self) -> InProcessDaemon:
        assert self.daemon is None, "already running"
        self.daemon = Daemon(load_config(self.dev.config_path))
        self.daemon.start()
        poll("the daemon to report SERVING", lambda: health(self.dev, self.target) == "SERVING" or None)
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(0)
            self.daemon = None

    def restart(self) -> InProcessDaemon:
        self.stop()
        return self.start()

    def client(self, profile: str, *, timeout: float = 10.0) -> FaceSealClient:
        return self.dev.client(self.target, profile, timeout=timeout)

    def stub(self, profile: str) -> faceseal_pb2_grpc.FaceSealServiceStub:
        return self.dev.stub(self.target, profile)


class SubprocessDaemon:
    """``faceseald serve`` as a child process; stdout and stderr go to ``log_path``.

    Each ``start`` writes a free port into the config (retrying if another process takes it
    between the probe and the bind) and returns once health says SERVING.
    """

    def __init__(self, dev: Dev, log_path: Path) -> None:
        self.dev = dev
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def start(self) -> SubprocessDaemon:
        assert self.proc is None, "already running"
        for _attempt in range(5):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.launch()
            status = poll("the daemon to report SERVING or exit", self._started, deadline=STARTUP_DEADLINE)
            if status == "SERVING":
                return self
            if "cannot listen" not in self.log()[offset:]:
                raise AssertionError(f"faceseald exited with {status} at start; its log:\n{self.log()}")
            self.proc = None  # someone took the port meanwhile: pick another
        raise AssertionError("could not find a free port for faceseald")

    def launch(self) -> None:
        """Start the process on a free port and return at once, without waiting for it to serve."""
        self.port = free_port()
        self.dev.set_server(listen=self.target)
        self.dev.edit_config(lambda c: c.setdefault("metrics", {}).update(listen="127.0.0.1:0"))
        assert FACESEALD.is_file(), f"{FACESEALD} is missing: is the package installed in this venv?"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(FACESEALD), "serve", "--config", str(self.dev.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def _started(self) -> str | None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            return f"exit code {code}"
        return "SERVING" if health(self.dev, self.target, timeout=1.0) == "SERVING" else None

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None, "the daemon was not started"
        assert self.proc.poll() is None, "the daemon is not running"
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; return its exit code."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill9(self) -> None:
        self.send(signal.SIGKILL)
        code = self.wait(10)
        assert code == -signal.SIGKILL, code

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit code (0 for a clean drain)."""
        self.send(signal.SIGTERM)
        return self.wait(timeout)

    def ensure_stopped(self) -> None:
        """Teardown: never leave a child behind, whatever the test did."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


# ------------------------------------------------------------ admin client, backups, seal migration
# (appended for tests/test_admin.py, test_rotation.py and test_seal_migrate.py; reusable by the
# PKCS#11 and Transit seal tests: write_seal_toml + migrate_and_restart work for any seal type)

# Keys of a [seal] table that hold paths, resolved against the file the table was read from.
SEAL_PATH_KEYS = ("key_file", "module", "pin_file", "token_file", "ca_cert")


def admin_client(dev: Dev, target: str, *, profile: str = "admin", timeout: float = 10.0) -> AdminClient:
    """An ``AdminClient`` with ``profile``'s certificate, closed with the other clients of ``dev``."""
    client = AdminClient.from_profile(profile, dev_dir=dev.dir, target=target, timeout=timeout)
    dev._closers.append(client.close)
    return client


def sqlite_backup(source: Path, destination: Path) -> None:
    """A consistent copy of a live SQLite store, taken with SQLite's online backup API."""
    with (
        contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src,
        contextlib.closing(sqlite3.connect(destination)) as dst,
    ):
        src.backup(dst)


def key_versions_in_db(path: Path) -> tuple[dict[int, int], list[int]]:
    """(templates per data-key version, data-key versions in the wrapped keyring), read from the file."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT key_version, count(*) FROM templates GROUP BY key_version").fetchall()
        wrapped = db.execute("SELECT version FROM wrapped_keys WHERE purpose = 'data' ORDER BY version")
        return {int(v): int(n) for v, n in rows}, [int(v) for (v,) in wrapped.fetchall()]


def write_key_file(path: Path, data: bytes | None = None, *, mode: int = 0o600) -> bytes:
    """A file-seal key file (32 random bytes unless ``data``), created 0600, then set to ``mode``."""
    key = secrets.token_bytes(32) if data is None else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    path.chmod(mode)
    return key


def write_seal_toml(path: Path, seal: dict[str, Any]) -> Path:
    """A TOML file holding only a [seal] table: what ``faceseald seal migrate --to`` reads."""
    write_atomically(path, dump_toml({"seal": seal}))
    return path


def run_seal_migrate(config_path: Path, target_seal_toml: Path) -> subprocess.CompletedProcess[str]:
    """``faceseald seal migrate --config C --to T`` as a child process (the daemon must be stopped)."""
    assert FACESEALD.is_file(), f"{FACESEALD} is missing: is the package installed in this venv?"
    return subprocess.run(
        [str(FACESEALD), "seal", "migrate", "--config", str(config_path), "--to", str(target_seal_toml)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def use_seal(dev: Dev, seal_toml: Path) -> None:
    """Replace the [seal] table of the dev config with the one in ``seal_toml`` (paths made absolute)."""
    table = dict(tomllib.loads(seal_toml.read_text(encoding="utf-8"))["seal"])
    for key in SEAL_PATH_KEYS:
        if isinstance(table.get(key), str) and table[key]:
            table[key] = str(seal_toml.parent / table[key])  # an absolute value stays as it is
    dev.edit_config(lambda c: c.__setitem__("seal", table))


def migrate_and_restart(
    daemon: InProcessDaemon, target_seal_toml: Path, *, between: Callable[[], None] | None = None
) -> str:
    """Stop the daemon, migrate its keyring to the seal in ``target_seal_toml`` (must exit 0), put
    that seal into the config, call ``between`` (e.g. delete the old key), start it again (SERVING).

    Returns the migrate command's stdout.
    """
    daemon.stop()
    result = run_seal_migrate(daemon.dev.config_path, target_seal_toml)
    assert result.returncode == 0, f"seal migrate exited {result.returncode}:\n{result.stderr}"
    use_seal(daemon.dev, target_seal_toml)
    if between is not None:
        between()
    daemon.start()
    return result.stdout


class SealedSubprocessDaemon(SubprocessDaemon):
    """``faceseald serve`` that is expected to stay sealed: ``start`` returns once it is up and
    reports NOT_SERVING (the base class's start loop waits for ``_started`` to say "SERVING",
    which here means "listening and sealed")."""

    def _started(self) -> str | None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            return f"exit code {code}"
        return "SERVING" if health(self.dev, self.target, timeout=1.0) == "NOT_SERVING" else None


def log_records(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a daemon log (other lines, e.g. a traceback, are skipped)."""
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def lift_rate_limit(dev: Dev) -> None:
    """For tests that make hundreds of calls a second from one caller and are not about the abuse
    guard: raise its per-caller request rate (200/s by default) out of the way before the daemon
    starts. Lockouts and failure budgets stay as configured."""
    dev.edit_config(lambda c: c.setdefault("guard", {}).update(caller_rate=1_000_000.0))


# ------------------------------------------------------------------------ the abuse guard's clock


class GuardClock:
    """The abuse guard's clock in a running ``InProcessDaemon``, under the test's control.

    The guard reads the wall clock for its request rate, lockouts and budgets, so a test that
    counts on seconds passing (or not passing) between two calls depends on how fast the machine
    runs. Installed (after ``start``; a restart brings the wall clock back), this clock starts at
    the guard's current time, follows the wall clock for ``runs_for`` seconds (by default not at
    all) and then stands still; ``advance`` moves it on. Nothing else in the daemon reads it.
    """

    def __init__(self, harness: InProcessDaemon, *, runs_for: float = 0.0) -> None:
        assert harness.daemon is not None, "start the daemon first"
        guard = harness.daemon.core.guard
        self._wall: Callable[[], float] = guard._clock
        self._start = self._wall()
        self._runs_for = runs_for
        self._advanced = 0.0
        guard._clock = self

    def __call__(self) -> float:
        ran = min(self._wall() - self._start, self._runs_for) if self._runs_for else 0.0
        return self._start + ran + self._advanced

    def advance(self, seconds: float) -> None:
        self._advanced += seconds
