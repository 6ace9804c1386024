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

    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            return _init(args.dev, force=args.force, listen=args.listen)
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


def _serve(config: Path) -> int:
    # Imported here so `init` works without loading gRPC and the rest of the daemon.
    from faceseal.server.daemon import serve

    return serve(config)


if __name__ == "__main__":
    raise SystemExit(main())
