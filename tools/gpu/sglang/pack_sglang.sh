#!/usr/bin/env bash
# Build ONE tar.xz holding sglang 0.5.17, a trimmed sglang-kernel 0.4.5 and the small wheels,
# laid out as a site-packages folder (install_on_device.sh extracts it into /tmp/site).
#   usage: bash tools/gpu/sglang/pack_sglang.sh [WHL_DIR=.whl] [KIT_DIR=.kit] [OUT]
# OUT defaults to /tmp/sglang-kit-0.5.17.tar.xz (44.4 MiB; ~70 s on 2 cores).
# Dropped from sglang-kernel (1.2 GB unpacked -> 20 MB): sgl_kernel/flash_ops.abi3.so (FA3,
# 1.1 GB; only sgl_kernel.flash_attn imports it), sgl_kernel/sm100/ (Blackwell build of
# common_ops; an H100 loads sm90/), infllm_ops*.so (loaded lazily) and flashmla_ops.abi3.so
# (imported inside try/except). Nothing is dropped from sglang itself.
set -euo pipefail
WHL=$(readlink -f "${1:-.whl}"); KIT=$(readlink -f "${2:-.kit}")
OUTF=$(readlink -m "${3:-/tmp/sglang-kit-0.5.17.tar.xz}")
st=$(mktemp -d)
( cd "$st" && unzip -q "$KIT"/sglang-0.5.17-*.whl \
  && unzip -q "$KIT"/sglang_kernel-0.4.5-*.whl -x 'sgl_kernel/flash_ops.abi3.so' \
       'sgl_kernel/sm100/*' 'sgl_kernel/infllm_ops*' 'sgl_kernel/flashmla_ops.abi3.so' )
# install (not just unzip) the small wheels, for cp312 / x86_64, whatever Python runs here
python3 -m pip install -q --no-deps --no-index --no-compile --target "$st" \
  --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "$WHL"/*.whl 2>&1 | grep -v "^WARNING: Location" || true
( cd "$st" && tar cf - . | xz -T0 -9 > "$OUTF" )
echo "$(du -sh "$st" | cut -f1) unpacked, $(ls "$st" | grep -c dist-info) dists"
rm -rf "$st"
ls -la "$OUTF"
