#!/usr/bin/env bash
# Cut a big file into pieces that each travel in their own git-ignored folder
# (.c01/part, .c02/part, ...) at the repo root, so that back-to-back `run` calls can
# each carry ONE folder (the device tool sends at most 64 MiB per call).
#   usage: bash tools/gpu/split_for_carry.sh BIGFILE [CHUNK] [REPO_ROOT]
#   CHUNK defaults to 61M: with the trimmed 107.6 MiB vllm tar.xz that gives .c01 = 61 MiB
#   and .c02 = 46.6 MiB, which still fits next to the 16.3 MiB .whl/ in one 64 MiB call.
set -euo pipefail
BIG=${1:?usage: split_for_carry.sh BIGFILE [CHUNK] [REPO_ROOT]}
CHUNK=${2:-61M}
ROOT=${3:-$(git rev-parse --show-toplevel)}
BIG=$(readlink -f "$BIG")
cd "$ROOT"
EXC=.git/info/exclude
rm -rf .c[0-9][0-9]
tmp=$(mktemp -d)
split -b "$CHUNK" -d -a 2 "$BIG" "$tmp/p"
i=1
for p in "$tmp"/p*; do
  d=$(printf '.c%02d' "$i")
  mkdir -p "$d"; mv "$p" "$d/part"
  grep -qxF "/$d/" "$EXC" || echo "/$d/" >> "$EXC"
  echo "$d/part $(stat -c %s "$d/part") bytes"
  i=$((i+1))
done
rmdir "$tmp"
sha256sum "$BIG" | awk '{print $1}' > .c01/SHA256   # checked after reassembly
basename "$BIG" > .c01/NAME                          # tells install_on_device.sh the format
echo "now: run #1 carry [.c01] (command: install_on_device.sh stash), run #2 carry [.c02 .whl]"
echo "     (command: install_on_device.sh), back to back, < 30 s apart"
