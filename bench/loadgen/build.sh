#!/usr/bin/env bash
# Build the C++ load generator into build/loadgen/loadgen (build/ is not committed).
# Needs Debian's libgrpc++-dev (gRPC C++ 1.51 on bookworm) and g++; as root, installs the
# package when it is missing. Prints the binary's path.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/build/loadgen"
if ! pkg-config --exists grpc++ 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgrpc++-dev g++ pkg-config >/dev/null
  else
    echo "build.sh: libgrpc++-dev is not installed (apt-get install libgrpc++-dev g++ pkg-config)" >&2
    exit 1
  fi
fi
mkdir -p "$out"
if [ ! -x "$out/loadgen" ] || [ "$here/loadgen.cc" -nt "$out/loadgen" ]; then
  # shellcheck disable=SC2046  # pkg-config output is a list of flags
  g++ -O2 -std=c++17 -Wall -Wextra -o "$out/loadgen.tmp" "$here/loadgen.cc" \
    $(pkg-config --cflags --libs grpc++ grpc protobuf) -pthread
  mv "$out/loadgen.tmp" "$out/loadgen"
fi
echo "$out/loadgen"
