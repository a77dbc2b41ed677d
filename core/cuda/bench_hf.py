"""transformers on the same card, for `archkit bench --compare-hf`: its decode (generate) and prefill (eager
forward) figures, measured the way ours are (core/cuda/bench.py)."""

from __future__ import annotations

import statistics
import time

from ..bench_shapes import DECODE_TOKENS, PREFILL_LENGTHS, PROMPT_TOKENS, hf_generate_seconds

def hf_model(raw: dict | None, path: str | None, dtype: str):
    """transformers' model of a checkpoint `path` or of config.json contents `raw` (random weights), on the GPU."""
    import torch
    import transformers

    td = getattr(torch, dtype)
    if path is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=td).to("cuda").eval()
    cfg = transformers.AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=td)
    return model.to(td).eval()


def bench_hf(raw: dict | None, path: str | None, dtype: str, max_pos: int) -> dict:
    """transformers' decode tok/s (generate, timed from the first new token) and prefill tok/s, same card."""
    import torch

    model = hf_model(raw, path, dtype)
    V = model.config.vocab_size
    res = {}
    try:
        with torch.no_grad():
            ids = torch.randint(0, V, (1, PROMPT_TOKENS), device="cuda")
            hf_generate_seconds(model, ids, 8)  # warm-up
            # as time_decode: the prompt's pass and the first token (a one-token generate) are not counted
            first = hf_generate_seconds(model, ids, 1)
            res["decode_tok_s"] = DECODE_TOKENS / (hf_generate_seconds(model, ids, DECODE_TOKENS + 1) - first)
            for T in PREFILL_LENGTHS:
                res[f"prefill{T}_tok_s"] = hf_prefill(model, V, T) if T <= max_pos else None
    finally:
        del model
        torch.cuda.empty_cache()
    return res


def hf_prefill(model, V: int, T: int, reps: int = 3) -> float:
    """transformers' eager forward over T random tokens, tokens per second (median of reps)."""
    import torch

    ids = torch.randint(0, V, (1, T), device="cuda")
    times = []
    for i in range(reps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return T / statistics.median(times)


# -- the entry point the CLI calls ---------------------------------------------------------------------
