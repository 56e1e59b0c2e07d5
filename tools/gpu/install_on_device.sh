#!/usr/bin/env bash
# On the GPU machine, from the repo root.
#   bash tools/gpu/install_on_device.sh stash   # in every chunk-carrying call but the last
#   bash tools/gpu/install_on_device.sh         # in the last one: stash, reassemble, install
#   export PYTHONPATH=/tmp/site                       # then use vLLM
# Why "stash": the device keeps /tmp between calls while it stays warm, but NOT the repo's
# git-ignored folders: a call that carries .c02 finds no .c01 from the previous call. So each
# call copies what it carried (.cNN/ and .whl/) to $PARTS (default /tmp/parts).
# Installs into $SITE (default /tmp/site); the image's own venv is left untouched.
# Accepts a split wheel (.c01/NAME ends in .whl) or a split tar.xz made by pack_vllm.sh.
set -euo pipefail
SITE=${SITE:-/tmp/site}
PARTS=${PARTS:-/tmp/parts}
PY=${PY:-/opt/torch/.venv/bin/python3}; [ -x "$PY" ] || PY=python3
SECONDS=0
mkdir -p "$PARTS"
for d in .c[0-9][0-9] .whl; do
  [ -d "$d" ] || continue
  rm -rf "${PARTS:?}/$d"; cp -r "$d" "$PARTS/"
done
echo "stash: $PARTS holds: $(cd "$PARTS" && ls -d .c[0-9][0-9] .whl 2>/dev/null | tr '\n' ' ')"
[ "${1:-}" = stash ] && exit 0
cd "$PARTS"
if [ ! -f "$SITE/.kit_ok" ]; then
  ls -d .c[0-9][0-9] >/dev/null 2>&1 || { echo "install: no .cNN parts in $PARTS"; exit 2; }
  NAME=$(cat .c01/NAME 2>/dev/null || echo vllm-pack)
  PACK=/tmp/$NAME
  cat .c[0-9][0-9]/part > "$PACK"
  if [ -f .c01/SHA256 ] && [ "$(sha256sum "$PACK" | awk '{print $1}')" != "$(cat .c01/SHA256)" ]; then
    echo "install: checksum mismatch; parts present: $(ls -d .c[0-9][0-9] | tr '\n' ' ')"
    rm -f "$PACK"; exit 3
  fi
  mkdir -p "$SITE"
  case "$NAME" in
    *.whl) "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
             --target "$SITE" "$PACK" ;;
    *)     "$PY" - "$PACK" "$SITE" <<'PYEOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], filter="fully_trusted")
PYEOF
    ;;
  esac
  rm -f "$PACK"
  touch "$SITE/.kit_ok"
else
  echo "install: vllm already in $SITE"
fi
if ls .whl/*.whl >/dev/null 2>&1; then   # (re)install the small wheels: a few seconds
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl 2>&1 | grep -v "^WARNING: Target directory" || true
fi
echo "install: done in ${SECONDS} s; $(du -sh "$SITE" | cut -f1) in $SITE; now: export PYTHONPATH=$SITE"
