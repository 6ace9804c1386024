"""A bare grpcio sync server answering ``/faceseal.v1.FaceSealService/Match``: the baseline of
bench/match_vs_echo.py and bench/workers.py.

It is set up as the daemon's server is (server/daemon.py), from the same faceseal.toml: the same
server certificate and client CA through ``grpc.dynamic_ssl_server_credentials`` with a client
certificate required, a ``ThreadPoolExecutor`` of ``server.max_workers`` threads, the same
channel arguments (``server_options``) and ``maximum_concurrent_rpcs``. What it leaves out is
everything of ours: no interceptors (metrics, authentication, policy), no guard, no audit, no
gallery. The handler parses the MatchRequest as the real service does (the same deserializer)
and returns a constant ``MatchResponse(match=True)``: the same bytes on the wire as the daemon's
decision-only answer to a genuine probe.

    .venv/bin/python bench/echo_server.py --config DEV/faceseal.toml --listen 127.0.0.1:50052

Prints ``listening PORT PID`` on stdout once serving, then runs until SIGTERM / SIGINT.
``--reuseport`` lets several copies share one port (SO_REUSEPORT), as ``server.workers`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from faceseal.server.config import load_config
from faceseal.server.daemon import server_options
from faceseal.v1 import faceseal_pb2

MATCH = "/faceseal.v1.FaceSealService/Match"


def build(config_path: Path, listen: str, *, reuseport: bool = False) -> tuple[grpc.Server, int]:
    config = load_config(config_path)
    s = config.server
    if reuseport:
        s = dataclasses.replace(s, workers=2)  # server_options turns grpc.so_reuseport on for workers > 1
    answer = faceseal_pb2.MatchResponse(match=True)

    def match(request: faceseal_pb2.MatchRequest, context: grpc.ServicerContext) -> faceseal_pb2.MatchResponse:
        return answer

    handler = grpc.method_handlers_generic_handler(
        "faceseal.v1.FaceSealService",
        {
            "Match": grpc.unary_unary_rpc_method_handler(
                match,
                request_deserializer=faceseal_pb2.MatchRequest.FromString,
                response_serializer=faceseal_pb2.MatchResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(
        ThreadPoolExecutor(max_workers=s.max_workers, thread_name_prefix="rpc"),
        handlers=[handler],
        options=server_options(dataclasses.replace(s, listen=listen)),
        maximum_concurrent_rpcs=s.max_concurrent_rpcs,
    )
    initial = grpc.ssl_server_certificate_configuration(
        [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())], root_certificates=s.client_ca.read_bytes()
    )

    def fetch() -> Any:
        return None  # "no change", as the daemon answers between reloads

    credentials = grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)
    port = server.add_secure_port(listen, credentials)
    return server, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="a faceseal.toml (its TLS files and [server])")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (loopback; port 0 picks a free one)")
    parser.add_argument("--reuseport", action="store_true", help="share the port with other copies")
    args = parser.parse_args(argv)
    server, port = build(args.config, args.listen, reuseport=args.reuseport)
    if port == 0:
        print(f"echo_server: cannot listen on {args.listen}", file=sys.stderr)
        return 1
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stopping.set())
    server.start()
    print(f"listening {port} {os.getpid()}", flush=True)
    stopping.wait()
    server.stop(2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
