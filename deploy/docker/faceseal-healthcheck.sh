#!/bin/sh
# faceseal-healthcheck [ready|alive]: the container's health check, over mutual TLS.
#
#   ready  exit 0 only when the daemon answers SERVING (unsealed, keys unwrapped, galleries open):
#          Docker's HEALTHCHECK and Kubernetes' readiness probe.
#   alive  exit 0 when the daemon answers the health service at all, SERVING or NOT_SERVING:
#          Kubernetes' liveness and startup probes. A daemon that is sealed because its HSM or
#          Transit engine is down is alive (it retries by itself); restarting it would not help.
#
# The daemon has no plaintext port, so the probe presents a client certificate from the
# deployment's CA. It needs no policy entry: the health service is open to any peer the TLS
# handshake accepted, and nothing else is. Paths and names come from the environment:
#
#   FACESEAL_PROBE_TARGET       default 127.0.0.1:50051
#   FACESEAL_PROBE_SERVER_NAME  a name in the server certificate (unset: the target's host)
#   FACESEAL_PROBE_CA           default /etc/faceseal/tls/ca.crt
#   FACESEAL_PROBE_CERT         default /etc/faceseal/probe/tls.crt
#   FACESEAL_PROBE_KEY          default /etc/faceseal/probe/tls.key
#   FACESEAL_PROBE_TIMEOUT      seconds, default 5
set -u

mode="${1:-ready}"
case "$mode" in
  ready | alive) ;;
  *)
    echo "usage: faceseal-healthcheck [ready|alive]" >&2
    exit 2
    ;;
esac

set -- --target "${FACESEAL_PROBE_TARGET:-127.0.0.1:50051}" \
  --ca "${FACESEAL_PROBE_CA:-/etc/faceseal/tls/ca.crt}" \
  --cert "${FACESEAL_PROBE_CERT:-/etc/faceseal/probe/tls.crt}" \
  --key "${FACESEAL_PROBE_KEY:-/etc/faceseal/probe/tls.key}" \
  --timeout "${FACESEAL_PROBE_TIMEOUT:-5}"
if [ -n "${FACESEAL_PROBE_SERVER_NAME:-}" ]; then
  set -- "$@" --server-name "$FACESEAL_PROBE_SERVER_NAME"
fi

# --json: stdout is exactly one object, {"status": "..."} or {"error": {...}}.
answer=$(faceseal "$@" --json health 2>/dev/null)
code=$?
echo "$answer"
case "$mode" in
  ready) [ "$code" -eq 0 ] && exit 0 ;;
  alive)
    case "$answer" in
      '{"status": "'*) exit 0 ;;
    esac
    ;;
esac
exit 1
