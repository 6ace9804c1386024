"""The ``faceseald`` command: ``init --dev`` to bootstrap a laptop, ``serve`` to run the daemon."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from faceseal.server.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faceseald", description="faceseal daemon")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="write a configuration, PKI and seal key")
    # Only the dev flavour exists: production brings its own PKI and seal, so --dev is required
    # to make the "not for production" choice visible on the command line.
    init.add_argument("--dev", metavar="DIR", type=Path, required=True, help="directory to write")
    init.add_argument("--force", action="store_true", help="replace an existing setup and its database")
    init.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:50051")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", metavar="PATH", type=Path, required=True)

    seal = commands.add_parser("seal", help="seal operations")
    seal_commands = seal.add_subparsers(dest="seal_command", required=True)
    migrate = seal_commands.add_parser(
        "migrate",
        help="re-wrap the keyring under another seal (dev key file -> HSM); template blobs are untouched",
    )
    migrate.add_argument("--config", metavar="PATH", type=Path, required=True, help="the daemon's config")
    migrate.add_argument(
        "--to",
        metavar="PATH",
        type=Path,
        required=True,
        help="a TOML file whose [seal] table is the new seal",
    )

    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check the audit chain; exit 0 if intact, else name the first broken record"
    )
    verify.add_argument(
        "--config", metavar="PATH", type=Path, help="the daemon's config: unwraps the audit key to check every HMAC"
    )
    verify.add_argument("paths", metavar="PATH", type=Path, nargs="*", help="segments in order (default: all)")

    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            return _init(args.dev, force=args.force, listen=args.listen)
        if args.command == "audit":
            return _audit_verify(args.config, args.paths)
        if args.command == "seal":
            return _seal_migrate(args.config, args.to)
        return _serve(args.config)
    except ConfigError as exc:
        print(f"faceseald: {exc}", file=sys.stderr)
        return 2


def _init(directory: Path, *, force: bool, listen: str) -> int:
    from faceseal.server.devinit import init_dev

    init_dev(directory, force=force, listen=listen)
    print(f"wrote a development setup to {directory}/ (not for production)")
    print(f"  config:  {directory / 'faceseal.toml'}")
    print(f"  policy:  {directory / 'policy.toml'}")
    print(f"  CA:      {directory / 'ca.crt'}")
    print(f"  clients: {directory / 'clients'}/{{enroller,gateway,admin}}.{{crt,key}}")
    print(f"run it:    faceseald serve --config {directory / 'faceseal.toml'}")
    return 0


def _seal_migrate(config_path: Path, target_path: Path) -> int:
    import tomllib

    from faceseal.server.config import load_config, parse_seal
    from faceseal.server.crypto import vault
    from faceseal.server.daemon import open_store
    from faceseal.server.seal import seal_from_config
    from faceseal.server.seal.base import SealError

    config = load_config(config_path)
    target_path = target_path.resolve()
    try:
        raw = tomllib.loads(target_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{target_path}: cannot read the target seal: {exc}") from None
    table = raw.get("seal")
    if not isinstance(table, dict):
        raise ConfigError(f"{target_path}: a [seal] table is required")
    target = parse_seal(table, target_path, target_path.parent, config.mode)
    old = seal_from_config(config.seal, config.path)
    new = seal_from_config(target, target_path)
    store = open_store(config)
    try:
        count = vault.migrate(store, old, new)
    except SealError as exc:
        print(f"faceseald: seal migration failed, nothing changed: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"re-wrapped {count} keys from {old.describe()} to {new.describe()}")
    print(f"now replace the [seal] table of {config.path} with the one in {target_path} and restart")
    return 0


def _audit_verify(config_path: Path | None, paths: list[Path]) -> int:
    from faceseal.server.audit.log import derive_audit_key, segments
    from faceseal.server.audit.verify import verify

    key: bytes | None = None
    if config_path is not None:
        from faceseal.server.config import load_config
        from faceseal.server.crypto import vault
        from faceseal.server.daemon import open_store
        from faceseal.server.seal import seal_from_config
        from faceseal.server.seal.base import SealError

        config = load_config(config_path)
        store = open_store(config)
        try:
            key = derive_audit_key(vault.load(store, seal_from_config(config.seal, config.path)).index_key.reveal())
        except SealError as exc:
            print(f"faceseald: cannot unwrap the audit key: {exc}", file=sys.stderr)
            return 2
        finally:
            store.close()
        if not paths:
            paths = segments(config.audit.dir)
    if not paths:
        print("faceseald: no audit segments given (pass PATH... or --config)", file=sys.stderr)
        return 2
    if key is None:
        print("faceseald: warning: without --config only the hash chain is checked, not the HMACs", file=sys.stderr)
    verdict = verify(paths, key)
    if verdict.ok:
        print(f"ok: {verdict.records} records, chain intact" + ("" if key else " (HMACs not checked)"))
        return 0
    print(f"broken: {verdict.problem} (after {verdict.records} good records)")
    return 1


def _serve(config: Path) -> int:
    # Imported here so `init` works without loading gRPC and the rest of the daemon.
    from faceseal.server.daemon import serve

    return serve(config)


if __name__ == "__main__":
    raise SystemExit(main())
