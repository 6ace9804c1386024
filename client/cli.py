"""The ``faceseal`` command: one RPC per invocation, for operators, scripts and smoke tests.

Exit codes: 0 an answer (a non-match is an answer), 1 an RPC or local error (or a health status
other than SERVING, so the command works as a container health check), 2 a usage error.
With ``--json`` stdout carries exactly one JSON object, errors included, so scripts parse one thing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from faceseal.client._client import DEFAULT_TARGET, DEFAULT_TIMEOUT, FaceSealClient
from faceseal.client._encodings import load_encoding
from faceseal.client._errors import FaceSealClientError

_Number = TypeVar("_Number", int, float)
JsonValue = str | int | float | bool | None | list["JsonValue"] | dict[str, "JsonValue"]


@dataclass(frozen=True, slots=True)
class _Output:
    data: dict[str, JsonValue]
    text: str
    exit_code: int = 0


def _distance(distance: float | None) -> str:
    return "" if distance is None else f" (distance {distance:.3f})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _enroll(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    encoding = load_encoding(args.encoding_file)
    r = client.enroll(args.subject_id, encoding, gallery=args.gallery, replace=args.replace)
    return _Output(
        {"subject_id": r.subject_id, "template_id": r.template_id, "template_count": r.template_count},
        f"enrolled {r.subject_id} (template {r.template_id}, {_plural(r.template_count, 'template')})",
    )


def _match(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    probe = load_encoding(args.probe_file)
    r = client.match(args.subject_id, probe, gallery=args.gallery)
    return _Output(
        {"match": r.match, "distance": r.distance},
        ("match" if r.match else "no match") + _distance(r.distance),
    )


def _identify(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    probe = load_encoding(args.probe_file)
    candidates = client.identify(probe, top_k=args.top_k, gallery=args.gallery)
    lines = [c.subject_id + _distance(c.distance) for c in candidates]
    return _Output(
        {"candidates": [{"subject_id": c.subject_id, "distance": c.distance} for c in candidates]},
        "\n".join(lines) if lines else "no candidate within threshold",
    )


def _delete(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    deleted = client.delete(args.subject_id, gallery=args.gallery)
    return _Output({"deleted": deleted}, f"deleted {_plural(deleted, 'template')}")


def _health(client: FaceSealClient, args: argparse.Namespace) -> _Output:
    status = client.health()
    return _Output({"status": status}, status, 0 if status == "SERVING" else 1)


def _positive(kind: Callable[[str], _Number]) -> Callable[[str], _Number]:
    def parse(text: str) -> _Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Add the options twice (main parser and each subcommand) so they may go before or after it.

    On subcommands the defaults are suppressed, or they would overwrite what was given earlier.
    """

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=default(DEFAULT_TARGET), help="host:port of faceseald")
    group.add_argument(
        "--profile", default=default(None), help="dev client certificate to use (env FACESEAL_PROFILE)"
    )
    group.add_argument(
        "--dev-dir", type=Path, default=default(None), help="dev PKI folder (env FACESEAL_DEV_DIR, or dev)"
    )
    group.add_argument(
        "--server-name", default=default(None), help="name to verify in the server's certificate"
    )
    group.add_argument("--ca", type=Path, default=default(None), help="CA certificate (PEM)")
    group.add_argument("--cert", type=Path, default=default(None), help="client certificate (PEM)")
    group.add_argument("--key", type=Path, default=default(None), help="client private key (PEM)")
    group.add_argument(
        "--timeout",
        type=_positive(float),
        default=default(DEFAULT_TIMEOUT),
        help="deadline per call in seconds",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faceseal", description="Talk to a faceseald daemon over mutual TLS."
    )
    _add_global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[..., _Output], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_global_options(sub, defaults=False)
        sub.set_defaults(handler=handler)
        return sub

    def gallery(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--gallery", default="", help="gallery name (default: the daemon's default)")

    sub = command("enroll", _enroll, "seal an encoding as a new template of a subject")
    sub.add_argument("subject_id")
    sub.add_argument("encoding_file", type=Path, help=".npy or .json")
    gallery(sub)
    sub.add_argument("--replace", action="store_true", help="drop the subject's existing templates")

    sub = command("match", _match, "1:1 - does the probe belong to this subject?")
    sub.add_argument("subject_id")
    sub.add_argument("probe_file", type=Path, help=".npy or .json")
    gallery(sub)

    sub = command("identify", _identify, "1:N - which subjects is the probe close to?")
    sub.add_argument("probe_file", type=Path, help=".npy or .json")
    sub.add_argument("--top-k", type=_positive(int), default=5, help="most candidates wanted (default 5)")
    gallery(sub)

    sub = command("delete", _delete, "remove every template of a subject")
    sub.add_argument("subject_id")
    gallery(sub)

    command("health", _health, "print the daemon's health: SERVING or NOT_SERVING")
    return parser


def _connect(parser: argparse.ArgumentParser, args: argparse.Namespace) -> FaceSealClient:
    """Explicit files win over a profile; a profile comes from --profile, then FACESEAL_PROFILE."""
    files = (args.ca, args.cert, args.key)
    if any(f is not None for f in files):
        if any(f is None for f in files):
            parser.error("--ca, --cert and --key go together")
        if args.profile:
            parser.error("use either --profile or --ca/--cert/--key, not both")
        return FaceSealClient.from_files(
            args.target,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            timeout=args.timeout,
            server_name=args.server_name,
        )
    profile = args.profile or os.environ.get("FACESEAL_PROFILE")
    if not profile:
        parser.error(
            "no credentials: pass --profile NAME (or set FACESEAL_PROFILE), or --ca, --cert and --key"
        )
    dev_dir = args.dev_dir or os.environ.get("FACESEAL_DEV_DIR") or "dev"
    return FaceSealClient.from_profile(
        profile, dev_dir=dev_dir, target=args.target, timeout=args.timeout, server_name=args.server_name
    )


def _fail(args: argparse.Namespace, code: str, message: str) -> int:
    print(f"faceseal: {code}: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message}}))
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _connect(parser, args) as client:
            output: _Output = args.handler(client, args)
    except FaceSealClientError as err:
        return _fail(args, err.code.name, err.message)
    except (OSError, ValueError) as err:
        # Local trouble (a missing certificate, a malformed encoding file): no RPC was made.
        return _fail(args, "CLIENT_ERROR", str(err))
    print(json.dumps(output.data) if args.json else output.text)
    return output.exit_code


if __name__ == "__main__":
    sys.exit(main())
