"""Run an SGLang model's own forward on CPU, the way its scheduler would: a real
TorchNativeAttnBackend over real ReqToTokenPool / MHATokenToKVPool, one EXTEND batch (the prompt)
then DECODE batches (greedy). Measured recipe: shared/engine-facts/sglang-cpu/build_and_load.py."""
from __future__ import annotations

import types

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import (CaptureHiddenMode, ForwardBatch,
                                                          ForwardMode)
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context


def _backend(cfg, dtype: torch.dtype, max_tokens: int = 64) -> TorchNativeAttnBackend:
    r2t = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=max_tokens, page_size=1, dtype=dtype, head_num=cfg.num_key_value_heads,
                          head_dim=cfg.head_dim, layer_num=cfg.num_hidden_layers, device="cpu",
                          enable_memory_saver=False, enable_alt_stream=False)
    return TorchNativeAttnBackend(types.SimpleNamespace(device="cpu", req_to_token_pool=r2t,
                                                        token_to_kv_pool=kv))


def _extend(backend, ids: list[int], req: int = 1, start: int = 1) -> ForwardBatch:
    n = len(ids)
    slots = torch.arange(start, start + n, dtype=torch.int64)
    backend.req_to_token_pool.req_to_token[req, :n] = slots.to(torch.int32)
    return ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=1, input_ids=torch.tensor(ids),
        req_pool_indices=torch.tensor([req]), seq_lens=torch.tensor([n]), out_cache_loc=slots,
        seq_lens_sum=n, seq_lens_cpu=torch.tensor([n]), positions=torch.arange(n),
        extend_num_tokens=n, extend_seq_lens=torch.tensor([n]), extend_prefix_lens=torch.tensor([0]),
        extend_start_loc=torch.tensor([0]), extend_seq_lens_cpu=[n], extend_prefix_lens_cpu=[0],
        extend_logprob_start_lens_cpu=[n], capture_hidden_mode=CaptureHiddenMode.NULL)


def _decode(backend, tok: int, pos: int, req: int = 1, start: int = 1) -> ForwardBatch:
    slot = start + pos
    backend.req_to_token_pool.req_to_token[req, pos] = slot
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=1, input_ids=torch.tensor([tok]),
        req_pool_indices=torch.tensor([req]), seq_lens=torch.tensor([pos + 1]),
        out_cache_loc=torch.tensor([slot]), seq_lens_sum=pos + 1, seq_lens_cpu=torch.tensor([pos + 1]),
        positions=torch.tensor([pos]), capture_hidden_mode=CaptureHiddenMode.NULL)


def greedy(model, hf_config, dtype: torch.dtype, prompt: list[int], steps: int
           ) -> tuple[list[int], list[torch.Tensor]]:
    """(prompt + generated tokens, next-token logits of each step) from SGLang's forward."""
    be = _backend(hf_config, dtype)
    seq, logits = list(prompt), []
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=be)):
        fb = _extend(be, seq)
        be.init_forward_metadata(fb)
        logits.append(model.forward(fb.input_ids, fb.positions, fb).next_token_logits[0].float())
        for _ in range(steps):
            seq.append(int(logits[-1].argmax()))
            fb = _decode(be, seq[-1], len(seq) - 1)
            be.init_forward_metadata(fb)
            logits.append(model.forward(fb.input_ids, fb.positions, fb).next_token_logits[0].float())
    return seq, logits
