#!/usr/bin/env python3
"""The seed's command line on the GPU: `python -m mixload.adapters.sglang.launch
--enable-mixed-precision --mixed-precision-config mix.yaml ...` starts a real SGLang HTTP server;
then GET /mixload (plan + what each rank loaded) and POST /generate. Writes launch.json to --out.

Serves configs/gpu/fp8-awq.yaml (FP8 attention, AWQ-int4 experts on the tiny MoE family).
usage (SGLang kit on PYTHONPATH): python3 tests/gpu/sglang_launch.py --out $OUT [--port 30000]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity import COMMON_ENV, ENGINE_ENV, MIXES, PROMPTS  # noqa: E402


def http(url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--timeout", type=float, default=240)
    a = ap.parse_args()
    from tokenizers import Tokenizer

    from mixload.core.config import load
    from mixload.core.plan import build_plan

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = MIXES / "fp8-awq.yaml"
    base = build_plan(load(mix)).sources["bf16"].path   # makes the tiny family on first use
    prompt = Tokenizer.from_file(str(base / "tokenizer.json")).encode(PROMPTS[0]).ids
    argv = [sys.executable, "-m", "mixload.adapters.sglang.launch",
            "--enable-mixed-precision", "--mixed-precision-config", str(mix),
            "--model-path", str(base), "--tp-size", "1", "--dp-size", "1",
            "--host", "127.0.0.1", "--port", str(a.port), "--max-running-requests", "64",
            "--max-total-tokens", "16384", "--dtype", "bfloat16",
            # not the seed's: what this one-GPU test box needs
            "--attention-backend", "triton", "--sampling-backend", "pytorch",
            "--disable-cuda-graph", "--mem-fraction-static", "0.3", "--skip-tokenizer-init"]
    log = open(out / "launch.log", "w")
    p = subprocess.Popen(argv, env={**os.environ, **COMMON_ENV, **ENGINE_ENV["sglang"]}, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    result: dict = {"argv": argv[3:]}
    t0 = time.time()
    try:
        while time.time() - t0 < a.timeout:
            if p.poll() is not None:
                raise RuntimeError(f"launcher exited with {p.returncode}")
            try:
                http(f"http://127.0.0.1:{a.port}/health_generate", timeout=5)
                break
            except Exception:   # noqa: BLE001 - not up yet
                time.sleep(2)
        result["t_ready"] = round(time.time() - t0, 1)
        info = http(f"http://127.0.0.1:{a.port}/mixload")
        result["mixload"] = {"enabled": info["enabled"], "loaded": info["loaded"],
                             "fingerprint": info["plan"]["fingerprint"],
                             "memory": info["plan"]["memory"]["by_precision"],
                             "ranks": [{k: r[k] for k in ("rank", "fingerprint",
                                                          "planned_rank_bytes",
                                                          "measured_rank_bytes", "bytes_read")}
                                       for r in info["ranks"]]}
        gen = http(f"http://127.0.0.1:{a.port}/generate", {
            "input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8,
                                                         "ignore_eos": True}})
        result["generate"] = gen.get("output_ids")
        result["ok"] = bool(info["loaded"]) and len(result["generate"] or []) == 8
    except Exception as exc:   # noqa: BLE001 - reported
        result["ok"], result["error"] = False, f"{type(exc).__name__}: {exc}"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    (out / "launch.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
