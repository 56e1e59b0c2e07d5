#!/usr/bin/env bash
# Repack the vLLM wheel into a smaller .tar.xz for the trip to the GPU machine.
#   usage: bash tools/gpu/pack_vllm.sh VLLM_WHEEL OUT.tar.xz [--full]
# Default (trimmed) drops what an H100 never loads in offline use:
#   vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so  (FA2; Hopper uses FA3, FA2 import is optional)
#   vllm/vllm-rs                              (Rust HTTP front end binary)
#   vllm/third_party/deep_gemm/_C.cpython-3{10,11,13,14}-*.so (other Pythons)
# 304 MB wheel -> 112.8 MB tar.xz in ~1.5-2 min on 2 cores (2 carry calls instead of 5).
# --full keeps everything (size not measured; or split the wheel itself, see README).
set -euo pipefail
WHL=$(readlink -f "${1:?usage: pack_vllm.sh VLLM_WHEEL OUT.tar.xz [--full]}")
OUTF=$(readlink -m "${2:?usage: pack_vllm.sh VLLM_WHEEL OUT.tar.xz [--full]}")
MODE=${3:-trim}
st=$(mktemp -d)
( cd "$st" && unzip -q "$WHL" )
if [ "$MODE" != "--full" ]; then
  rm -f "$st"/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so "$st"/vllm/vllm-rs \
        "$st"/vllm/third_party/deep_gemm/_C.cpython-31[0134]-x86_64-linux-gnu.so
fi
( cd "$st" && tar cf - vllm vllm-*.dist-info | xz -T0 -9 > "$OUTF" )
rm -rf "$st"
ls -la "$OUTF"
