#!/usr/bin/env bash
# Download (here, with PyPI access) the small wheels that vLLM 0.26.0 needs on the GPU
# machine, whose image already has torch 2.11.0+cu130, transformers 5.17, triton 3.6,
# numpy, tokenizers, safetensors, httpx, anyio, aiohttp, ... (see README.md).
#   usage: bash tools/gpu/fetch_wheels.sh DEST_DIR [--with-vllm]
# DEST_DIR is normally the repo's git-ignored .whl/ (never shared/).
# The versions are the ones that ran on the GPU machine; 25 wheels, 16.3 MiB.
set -euo pipefail
DEST=${1:?usage: fetch_wheels.sh DEST_DIR [--with-vllm]}
mkdir -p "$DEST"
WHEELS=(
  # imported by `from vllm import LLM` (module level)
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  cachetools==8.0.1 cbor2==6.3.0 msgspec==0.22.0 pyzmq==27.3.0 pybase64==1.5.1
  openai==2.54.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1   # openai 3.x needs httpx2: keep 2.x
  openai-harmony==0.0.8
  fastapi==0.136.3 starlette==1.10.0
  partial-json-parser==0.2.1.1.post7
  # imported by vllm.v1.structured_output (class annotations force the lazy modules)
  llguidance==1.6.1            # vllm asks >=1.7,<1.8; 1.6.1 is the newest this registry has
  xgrammar==0.2.8
  apache-tvm-ffi==0.1.11       # vllm pins 0.1.10, but xgrammar 0.2.8 needs >=0.1.11
  # imported by vllm's quantization registry for any quantized checkpoint
  compressed-tensors==0.17.0 loguru==0.7.3
  # optional: not imported by plain generate, tiny, were present in the tested run
  setproctitle==1.3.8 lm-format-enforcer==0.11.3 interegular==0.3.3
  # mixload itself (plus a mixload wheel built here, so the entry points are installed)
  pluggy==1.7.0 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 tqdm==4.70.1
  orjson==3.13.0
)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLAT[@]}" -d "$DEST" "${WHEELS[@]}"
if [ "${2:-}" = "--with-vllm" ]; then   # 304 MB; pack it with pack_vllm.sh, keep it out of DEST
  mkdir -p "$DEST/../.kit"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLAT[@]}" -d "$DEST/../.kit" vllm==0.26.0
fi
ls "$DEST" | wc -l; du -sh "$DEST"
