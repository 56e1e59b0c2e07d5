#!/usr/bin/env bash
# Download (here, with PyPI access) what SGLang 0.5.17 needs on the GPU machine, whose image
# already has torch 2.11.0+cu130, triton 3.6, numpy, safetensors, httpx, aiohttp, uvloop, ...
#   usage: bash tools/gpu/sglang/fetch_wheels.sh [WHL_DIR=.whl] [KIT_DIR=.kit]
# WHL_DIR gets the small wheels (30 files, 39 MiB); KIT_DIR gets sglang and sglang-kernel
# (22 MB + 383 MB). Both must be git-ignored (.git/info/exclude), never under shared/.
# Then: bash tools/gpu/sglang/pack_sglang.sh (one tar.xz, 44.4 MiB: one carry call).
set -euo pipefail
WHL=${1:-.whl}; KIT=${2:-.kit}
mkdir -p "$WHL" "$KIT"
WHEELS=(
  # imported by `import sglang` / sglang.srt.entrypoints.engine (module level)
  orjson==3.13.0 pyzmq==27.3.0 msgspec==0.22.0 pybase64==1.5.1 setproctitle==1.3.8
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  fastapi==0.136.3 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34
  openai==2.6.1 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 partial-json-parser==0.2.1.1.post7
  ipython==9.18.1 traitlets==5.16.1   # sglang/utils.py: from IPython.display import HTML
  dill==0.4.0                         # sglang.srt.sampling.custom_logit_processor
  xgrammar==0.2.8                     # sglang pins 0.2.1, whose wheel is 45 MB (static lib)
  apache-tvm-ffi==0.1.11              # xgrammar + SGLang's JIT kernels (nvcc via tvm-ffi)
  gguf==0.19.0 compressed-tensors==0.17.0 loguru==0.7.3   # quantization registry
  flashinfer-python==0.6.15.post1     # fp8_utils: from flashinfer import bmm_fp8 (CUDA only);
                                      # its data/ headers also serve SGLang's JIT kernels
  # transformers 5.17 (image) registers 'qwen3_asr' itself -> sglang's AutoConfig.register
  # fails; sglang pins 5.12.1, which needs tokenizers<=0.23.0 (image: 0.23.2; 0.23.0 is not
  # on PyPI)
  transformers==5.12.1 tokenizers==0.22.2
  interegular==0.3.3                  # optional (grammar backends); tiny
  # the HTTP server (launch_server), beyond what the Engine API imports
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
  rpds-py==2026.9.1 attrs==26.1.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
  # mixload itself (plus a mixload wheel built here, so the entry points are installed)
  pluggy==1.7.0 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 tqdm==4.70.1
)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64
      --platform manylinux_2_34_x86_64 --platform any)
DL=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
    --implementation cp "${PLAT[@]}")
"${DL[@]}" -d "$WHL" "${WHEELS[@]}"
"${DL[@]}" -d "$KIT" sglang==0.5.17 sglang-kernel==0.4.5
ls "$WHL" | wc -l; du -sh "$WHL" "$KIT"
