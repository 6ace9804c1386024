#!/bin/sh
# One-shot setup of OpenBao for the Compose trial, run by the `bao-init` service (OpenBao image,
# uid 10001 so the token file belongs to the daemon's uid). Against the dev server it:
#   - enables the Transit engine and creates the key "faceseal" (aes256-gcm96, never exportable,
#     no plaintext backup: the KEK cannot leave OpenBao);
#   - writes a policy with exactly what faceseald needs (server/seal/transit.py): encrypt and
#     decrypt for serving, read/rotate/config/trim on the key for KEK retirement;
#   - creates a token with that policy only and writes it to /trial/transit-token (mode 0600; TRIAL_DIR overrides /trial).
# The dev server keeps everything in memory: restarting the openbao container loses the key, and
# with it every template sealed in the trial. Start over with: docker compose down -v
set -eu

: "${BAO_ADDR:?}" "${BAO_TOKEN:?}"
token_file="${TRIAL_DIR:-/trial}/transit-token"

i=0
until bao status >/dev/null 2>&1; do
  i=$((i + 1))
  [ "$i" -le 60 ] || { echo "bao-init: OpenBao at $BAO_ADDR did not answer" >&2; exit 1; }
  sleep 1
done

if bao read -format=json transit/keys/faceseal >/dev/null 2>&1 && [ -s "$token_file" ]; then
  echo "bao-init: Transit key and token already present"
  exit 0
fi

bao secrets list -format=json | grep -q '"transit/"' || bao secrets enable transit
bao write -f transit/keys/faceseal type=aes256-gcm96 exportable=false allow_plaintext_backup=false
bao policy write faceseal-seal - <<'POLICY'
path "transit/encrypt/faceseal" { capabilities = ["update"] }
path "transit/decrypt/faceseal" { capabilities = ["update"] }
path "transit/keys/faceseal" { capabilities = ["read"] }
path "transit/keys/faceseal/rotate" { capabilities = ["update"] }
path "transit/keys/faceseal/config" { capabilities = ["update"] }
path "transit/keys/faceseal/trim" { capabilities = ["update"] }
POLICY

umask 077
# faceseald does not renew its token: a periodic token lasts one period (32 days) unless an
# agent renews it. In production let an OpenBao agent keep the file fresh (the daemon re-reads
# it on every call).
bao token create -policy=faceseal-seal -no-default-policy -orphan -period=768h -field=token \
  >"$token_file.tmp"
mv "$token_file.tmp" "$token_file"
echo "bao-init: Transit key faceseal and a token for it written to $token_file"
