#!/usr/bin/env bash
# Installs the real components the integration tests run against (never mocks):
# SoftHSM2 for PKCS#11, PostgreSQL, Prometheus. Python-side tools (OpenBao's `bao`, grpcurl)
# come with the venv's dev extras. As root it installs what is missing; otherwise it only says
# what is missing, and those tests skip (or fail under CI=true) with the same advice.
set -euo pipefail

declare -A wanted=(
  [softhsm2-util]=softhsm2
  [prometheus]=prometheus
  [promtool]=prometheus
  [systemd-analyze]=systemd
)
# PostgreSQL's server binaries live outside the PATH on Debian.
pg_ok() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }

missing=()
for bin in "${!wanted[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("${wanted[$bin]}")
done
pg_ok || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" -ne 0 ]; then
  echo "not root: the integration tests that need ${missing[*]} will skip; install with:" >&2
  echo "  sudo apt-get install -y ${missing[*]}" >&2
  exit 0
fi
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian packages start services; the tests run their own throwaway instances instead.
for svc in prometheus postgresql; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
  service "$svc" stop >/dev/null 2>&1 || true
done
