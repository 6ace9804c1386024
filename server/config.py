"""The daemon's configuration: one TOML file, validated completely before anything starts.

Every error names the file and the dotted key, and unknown keys are errors too: a typo such as
``thresold`` must stop the daemon, not silently fall back to a default. Relative paths are
relative to the config file's folder, so a config directory can be moved as a whole.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from faceseal.server.errors import ConfigError

Metric = Literal["euclidean", "cosine"]
GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
MAX_DIMENSION = 4096


@dataclass(frozen=True, slots=True)
class GalleryConfig:
    """One gallery's model: every template in it has this dimension and is compared this way."""

    name: str
    dimension: int
    metric: Metric
    threshold: float


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The gRPC listener: mutual TLS files, the policy, and the transport limits (docs/configuration.md)."""

    listen: str
    tls_cert: Path
    tls_key: Path
    client_ca: Path
    policy: Path
    grace_seconds: float
    max_message_bytes: int
    max_workers: int
    max_top_k: int
    max_batch: int
    # The most probes one IdentifyBatch may carry.
    max_identify_batch: int = 64
    # Daemon processes sharing the listening port (server/workers.py); 1 = this process serves.
    workers: int = 1
    # Pin worker i to the i-th CPU this process may use (mod their number): a GIL-bound process
    # left to float between cores loses time to migrations and cross-core GIL handoffs.
    pin_workers: bool = False
    # Transport limits. Defaults here so tests and tools can build a ServerConfig by hand.
    max_concurrent_rpcs: int = 128
    max_concurrent_streams: int = 100
    max_connections: int = 1000
    max_reflection_streams: int = 2
    handshake_timeout_seconds: float = 10.0
    max_connection_idle_seconds: float = 300.0
    max_connection_age_seconds: float = 0.0
    max_connection_age_grace_seconds: float = 60.0
    keepalive_time_seconds: float = 300.0
    keepalive_timeout_seconds: float = 20.0
    min_ping_interval_seconds: float = 60.0
    max_ping_strikes: int = 2
    permit_keepalive_without_calls: bool = False


@dataclass(frozen=True, slots=True)
class FileSealConfig:
    """Dev only: a 32-byte KEK in a 0600 file."""

    key_file: Path
    type: Literal["file"] = "file"


@dataclass(frozen=True, slots=True)
class Pkcs11SealConfig:
    """A non-extractable AES-256 key object in a PKCS#11 token (HSM)."""

    module: Path
    token_label: str
    key_label: str
    pin_file: Path
    type: Literal["pkcs11"] = "pkcs11"


@dataclass(frozen=True, slots=True)
class TransitSealConfig:
    """A Vault / OpenBao Transit key; the token comes from a file, never the command line."""

    address: str
    key_name: str
    token_file: Path
    mount: str = "transit"
    ca_cert: Path | None = None
    timeout_seconds: float = 5.0
    type: Literal["transit"] = "transit"


SealConfig = FileSealConfig | Pkcs11SealConfig | TransitSealConfig


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str
    pool_size: int = 8
    follow_interval_seconds: float = 0.5

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith(("postgresql://", "postgres://"))

    def sqlite_path(self, base: Path) -> Path:
        """``sqlite:rel/path`` is relative to ``base``; ``sqlite:///abs/path`` is absolute."""
        rest = self.url.removeprefix("sqlite:")
        if rest.startswith("//"):
            rest = rest[2:]
        path = Path(rest)
        return path if path.is_absolute() else base / path


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus listener: its own port, loopback by default, TLS when cert and key are set."""

    listen: str  # empty: no metrics listener
    tls_cert: Path | None
    tls_key: Path | None


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Where the HMAC-chained audit log lives, and when a segment is closed for the next."""

    dir: Path
    max_bytes: int


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Abuse-guard defaults (DESIGN.md); the policy may override the per-caller ones per caller."""

    enabled: bool = True
    subject_failures: int = 5
    subject_window_seconds: float = 60.0
    lockout_seconds: float = 30.0
    lockout_max_seconds: float = 3600.0
    caller_rate: float = 200.0
    caller_failures_per_hour: int = 1000
    identify_per_hour: int = 3600
    similar_probe_fraction: float = 0.25
    similar_probe_count: int = 8
    probe_history: int = 64


def for_worker(config: Config, index: int) -> Config:
    """The config one worker process of ``server.workers`` runs with: its own audit chain, and its
    own metrics port (``port + index``) unless the port is 0 (any free port)."""
    audit = replace(config.audit, dir=config.audit.dir / f"worker-{index}")
    metrics = config.metrics
    if metrics.listen:
        host, port = metrics.listen.rsplit(":", 1)
        if int(port) != 0:
            metrics = replace(metrics, listen=f"{host}:{int(port) + index}")
    return replace(config, audit=audit, metrics=metrics)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port), brackets removed."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    mode: Literal["dev", "production"]
    default_gallery: str
    server: ServerConfig
    store: StoreConfig
    seal: SealConfig
    galleries: dict[str, GalleryConfig]
    metrics: MetricsConfig
    audit: AuditConfig
    guard: GuardConfig

    @property
    def base_dir(self) -> Path:
        return self.path.parent


class _Table:
    """A view of one TOML table that knows its dotted name and which keys were read."""

    def __init__(self, file: Path, name: str, data: dict[str, Any]) -> None:
        self.file, self.name, self.data = file, name, data
        self.seen: set[str] = set()

    def fail(self, key: str, why: str) -> ConfigError:
        dotted = f"{self.name}.{key}" if self.name else key
        return ConfigError(f"{self.file}: key '{dotted}': {why}")

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "is required")
            return default
        value = self.data[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            if not -1e308 < value < 1e308:  # TOML integers are unbounded; float() would overflow
                raise self.fail(key, "is out of range")
            value, ok = float(value), True
        if not ok:
            raise self.fail(key, f"must be a {kind.__name__}")
        return value

    def table(self, key: str, *, required: bool = True) -> _Table:
        value = self.get(key, dict, ... if required else {})
        return _Table(self.file, f"{self.name}.{key}" if self.name else key, value)

    def path(self, key: str, base: Path, default: str | None = None) -> Path:
        raw = self.get(key, str, ... if default is None else default)
        if not raw:
            raise self.fail(key, "must not be empty")
        p = Path(raw)
        return p if p.is_absolute() else base / p

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.fail(unknown[0], "is not a known setting")


def _bounded(t: _Table, key: str, kind: type, default: Any, lo: float, hi: float) -> Any:
    value = t.get(key, kind, default)
    if not (lo <= value <= hi) or (isinstance(value, float) and not math.isfinite(value)):
        raise t.fail(key, f"must be between {lo:g} and {hi:g}")
    return value


def parse_seal(table: dict[str, Any], file: Path, base: Path, mode: str, name: str = "seal") -> SealConfig:
    """Validate one seal table; also used by ``faceseald seal migrate --to``."""
    return _seal(_Table(file, name, table), base, mode)


def _seal(se: _Table, base: Path, mode: str) -> SealConfig:
    seal_type = se.get("type", str)
    seal: SealConfig
    if seal_type == "file":
        if mode != "dev":
            raise se.fail(
                "type",
                'the file seal keeps the key-encryption key beside the data and is refused unless mode = "dev"',
            )
        seal = FileSealConfig(key_file=se.path("key_file", base))
    elif seal_type == "pkcs11":
        seal = Pkcs11SealConfig(
            module=se.path("module", base),
            token_label=se.get("token_label", str),
            key_label=se.get("key_label", str),
            pin_file=se.path("pin_file", base),
        )
    elif seal_type == "transit":
        address = se.get("address", str)
        if not re.fullmatch(r"https?://[^\s/]+/?", address):
            raise se.fail("address", "must be http(s)://HOST:PORT")
        ca = se.get("ca_cert", str, "")
        seal = TransitSealConfig(
            address=address.rstrip("/"),
            key_name=se.get("key_name", str),
            token_file=se.path("token_file", base),
            mount=se.get("mount", str, "transit"),
            ca_cert=(base / ca) if ca else None,
            timeout_seconds=_bounded(se, "timeout_seconds", float, 5.0, 0.1, 300),
        )
    else:
        raise se.fail("type", "must be 'file', 'pkcs11' or 'transit'")
    se.done()
    return seal


def _check_address(t: _Table, key: str, value: str) -> None:
    ok = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})", value)
    if not ok or int(ok.group(2)) > 65535:
        raise t.fail(key, "must be HOST:PORT (e.g. 127.0.0.1:50051 or [::1]:50051)")


def _server(s: _Table, base: Path) -> ServerConfig:
    d = {f.name: f.default for f in fields(ServerConfig)}  # the dataclass defaults are the documented ones
    max_workers = _bounded(s, "max_workers", int, 16, 1, 1024)
    server = ServerConfig(
        listen=s.get("listen", str, "127.0.0.1:50051"),
        tls_cert=s.path("tls_cert", base),
        tls_key=s.path("tls_key", base),
        client_ca=s.path("client_ca", base),
        policy=s.path("policy", base),
        grace_seconds=_bounded(s, "grace_seconds", float, 10.0, 0, 3600),
        max_message_bytes=_bounded(s, "max_message_bytes", int, 1 << 20, 1024, 64 << 20),
        max_workers=max_workers,
        max_top_k=_bounded(s, "max_top_k", int, 100, 1, 10_000),
        max_batch=_bounded(s, "max_batch", int, 10_000, 1, 1_000_000),
        max_identify_batch=_bounded(s, "max_identify_batch", int, 64, 1, 4096),
        workers=_bounded(s, "workers", int, d["workers"], 1, 64),
        pin_workers=s.get("pin_workers", bool, d["pin_workers"]),
        max_concurrent_rpcs=_bounded(s, "max_concurrent_rpcs", int, d["max_concurrent_rpcs"], 1, 100_000),
        max_concurrent_streams=_bounded(s, "max_concurrent_streams", int, d["max_concurrent_streams"], 1, 10_000),
        max_connections=_bounded(s, "max_connections", int, d["max_connections"], 1, 1_000_000),
        # Reflection streams hold a worker thread each while open: at least one worker is always
        # left for the real calls (a setup with one worker has no reflection).
        max_reflection_streams=_bounded(
            s, "max_reflection_streams", int, min(d["max_reflection_streams"], max_workers - 1), 0, max_workers - 1
        ),
        handshake_timeout_seconds=_bounded(
            s, "handshake_timeout_seconds", float, d["handshake_timeout_seconds"], 0.1, 300
        ),
        max_connection_idle_seconds=_bounded(
            s, "max_connection_idle_seconds", float, d["max_connection_idle_seconds"], 0, 7 * 86400
        ),
        max_connection_age_seconds=_bounded(
            s, "max_connection_age_seconds", float, d["max_connection_age_seconds"], 0, 30 * 86400
        ),
        max_connection_age_grace_seconds=_bounded(
            s, "max_connection_age_grace_seconds", float, d["max_connection_age_grace_seconds"], 0, 86400
        ),
        keepalive_time_seconds=_bounded(s, "keepalive_time_seconds", float, d["keepalive_time_seconds"], 1, 7 * 86400),
        keepalive_timeout_seconds=_bounded(
            s, "keepalive_timeout_seconds", float, d["keepalive_timeout_seconds"], 0.1, 3600
        ),
        min_ping_interval_seconds=_bounded(
            s, "min_ping_interval_seconds", float, d["min_ping_interval_seconds"], 0, 86400
        ),
        max_ping_strikes=_bounded(s, "max_ping_strikes", int, d["max_ping_strikes"], 1, 1000),
        permit_keepalive_without_calls=s.get(
            "permit_keepalive_without_calls", bool, d["permit_keepalive_without_calls"]
        ),
    )
    _check_address(s, "listen", server.listen)
    s.done()
    return server


def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise ConfigError naming the file and key on any problem."""
    path = path.resolve()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    base = path.parent
    top = _Table(path, "", raw)

    mode = top.get("mode", str, "production")
    if mode not in ("dev", "production"):
        raise top.fail("mode", "must be 'dev' or 'production'")

    server = _server(top.table("server"), base)

    m = top.table("metrics", required=False)
    metrics_listen = m.get("listen", str, "127.0.0.1:9464")
    if metrics_listen:
        _check_address(m, "listen", metrics_listen)
    cert = m.path("tls_cert", base) if "tls_cert" in m.data else None
    key = m.path("tls_key", base) if "tls_key" in m.data else None
    if (cert is None) != (key is None):
        raise m.fail("tls_cert" if cert is None else "tls_key", "tls_cert and tls_key go together")
    metrics = MetricsConfig(metrics_listen, cert, key)
    m.done()

    a = top.table("audit", required=False)
    audit = AuditConfig(
        dir=a.path("dir", base, "audit"),
        max_bytes=_bounded(a, "max_bytes", int, 64 << 20, 4096, 1 << 40),
    )
    a.done()

    gd = top.table("guard", required=False)
    d = GuardConfig()
    guard = GuardConfig(
        enabled=gd.get("enabled", bool, d.enabled),
        subject_failures=_bounded(gd, "subject_failures", int, d.subject_failures, 1, 1_000_000),
        subject_window_seconds=_bounded(gd, "subject_window_seconds", float, d.subject_window_seconds, 1, 86400),
        lockout_seconds=_bounded(gd, "lockout_seconds", float, d.lockout_seconds, 0.001, 86400),
        lockout_max_seconds=_bounded(gd, "lockout_max_seconds", float, d.lockout_max_seconds, 0.001, 30 * 86400),
        caller_rate=_bounded(gd, "caller_rate", float, d.caller_rate, 0.01, 1e6),
        caller_failures_per_hour=_bounded(gd, "caller_failures_per_hour", int, d.caller_failures_per_hour, 1, 10**9),
        identify_per_hour=_bounded(gd, "identify_per_hour", int, d.identify_per_hour, 1, 10**9),
        similar_probe_fraction=_bounded(gd, "similar_probe_fraction", float, d.similar_probe_fraction, 0.0, 1.0),
        similar_probe_count=_bounded(gd, "similar_probe_count", int, d.similar_probe_count, 1, 4096),
        probe_history=_bounded(gd, "probe_history", int, d.probe_history, 1, 4096),
    )
    if guard.lockout_max_seconds < guard.lockout_seconds:
        raise gd.fail("lockout_max_seconds", "must be at least lockout_seconds")
    gd.done()

    st = top.table("store", required=False)
    store = StoreConfig(
        url=st.get("url", str, "sqlite:faceseal.db"),
        pool_size=_bounded(st, "pool_size", int, 8, 1, 1000),
        follow_interval_seconds=_bounded(st, "follow_interval_seconds", float, 0.5, 0.01, 3600),
    )
    if not store.is_postgres and (not store.url.startswith("sqlite:") or store.url in ("sqlite:", "sqlite:///")):
        raise st.fail(
            "url",
            "must be sqlite:PATH (relative to the config file), sqlite:///ABSOLUTE/PATH or postgresql://...",
        )
    st.done()

    seal = _seal(top.table("seal"), base, mode)

    g = top.table("galleries")
    galleries: dict[str, GalleryConfig] = {}
    for name in list(g.data):
        if not GALLERY_NAME.fullmatch(name):
            raise g.fail(name, "a gallery name is 1-64 characters of [A-Za-z0-9._-]")
        gt = g.table(name)
        metric = gt.get("metric", str)
        if metric not in ("euclidean", "cosine"):
            raise gt.fail("metric", "must be 'euclidean' or 'cosine'")
        galleries[name] = GalleryConfig(
            name=name,
            dimension=_bounded(gt, "dimension", int, ..., 1, MAX_DIMENSION),
            metric=metric,
            # A cosine distance lies in [0, 2], a unit-scale euclidean one in [0, 4]: a threshold at
            # or past the top would accept every probe.
            threshold=_bounded(gt, "threshold", float, ..., 1e-9, 1.999 if metric == "cosine" else 4.0),
        )
        gt.done()
    if not galleries:
        raise top.fail("galleries", "at least one gallery is required")

    default = top.get("default_gallery", str, next(iter(galleries)) if len(galleries) == 1 else ...)
    if default not in galleries:
        raise top.fail("default_gallery", "must name a gallery defined under [galleries]")
    top.done()
    return Config(path, mode, default, server, store, seal, galleries, metrics, audit, guard)
