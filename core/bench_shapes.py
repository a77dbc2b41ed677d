"""Named model shapes for benchmarks (data/bench_configs.json), the plugin detection picks for each, and the
bytes a decode step of a loaded model reads (the decode roofline is copy bandwidth / those bytes), and the timing of
one transformers generate() that every comparison uses.

Shared by the CPU bench (core/bench.py, `archkit bench`) and the GPU bench (core/cuda/bench.py); it imports
neither, so neither imports the other's module to reach these.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import ModelConfig
from .detect import score_config
from .errors import ConfigError
from .registry import default_registry

CONFIGS_FILE = Path(__file__).parent / "data" / "bench_configs.json"
# GPU decode is timed over DECODE_TOKENS new tokens after a PROMPT_TOKENS prompt; prefill at PREFILL_LENGTHS tokens.
DECODE_TOKENS, PROMPT_TOKENS, PREFILL_LENGTHS = 128, 8, (512, 2048)


def named_configs() -> dict[str, dict]:
    """The named shapes: config.json contents keyed by name (data, so core names no family)."""
    return {k: v for k, v in json.loads(CONFIGS_FILE.read_text()).items() if not k.startswith("_")}


def resolve(name: str) -> tuple[str, dict]:
    """A named shape by exact name or unique prefix ("tinyllama" → "tinyllama-1.1b")."""
    configs = named_configs()
    key = name.lower()
    hits = [key] if key in configs else [k for k in configs if k.startswith(key)]
    if len(hits) != 1:
        raise ConfigError(f"bench config {name!r} is {'ambiguous' if hits else 'unknown'}; "
                          f"known: {sorted(configs)} (or pass a checkpoint directory)")
    return hits[0], configs[hits[0]]


def pick_spec(raw: dict, registry=None):
    """The registered spec that detection would pick for these config.json contents."""
    reg = registry if registry is not None else default_registry()
    scores = {name: score_config(reg[name].spec, raw) for name in reg}
    best = max(scores.values(), default=0)
    winners = [n for n, s in scores.items() if s == best]
    if best <= 0 or len(winners) != 1:
        raise ConfigError(f"no unique plugin for architectures={raw.get('architectures')} "
                          f"model_type={raw.get('model_type')!r} (scores {scores})")
    return reg[winners[0]].spec


def named_config(name: str):
    """(spec, ModelConfig) of a named bench shape."""
    key, raw = resolve(name)
    spec = pick_spec(raw)
    return spec, ModelConfig.from_hf(spec, raw, source=f"bench config {key!r}")


def bytes_per_token(model) -> int:
    """Weight bytes one batch-1 decode step reads, in the model's dtype: every weight once, except the token and
    position tables, of which a step reads one row each (not counted); a tied embedding is read whole, as the
    output projection. In a mixture-of-experts layer a token reads only its top_k experts: the stacked expert
    weights (experts.* roles, [num_experts, ...]) count top_k / num_experts of their size, while attention, the
    norms, the router and any shared expert (shared.*, dense) count whole. This is the active-bytes roofline of
    MoE decode (the CUDA grouped GEMVs, core/cuda/moe.py, read exactly these bytes). A weight kept quantized (the
    CUDA backend's QTensor, `quantized` true) counts the bytes the device holds for it."""
    W, per = model.weights, {"float32": 4, "float16": 2, "bfloat16": 2}[model.dtype]
    c = model.config
    E, k = getattr(c, "num_experts", 0), getattr(c, "num_experts_per_tok", 0)

    def nbytes(t):
        return t.nbytes if getattr(t, "quantized", False) else t.size * per

    n = 0
    for L in W.layers:
        for role, t in L.items():
            n += nbytes(t) // E * k if E and role.startswith("experts.") else nbytes(t)
    n += sum(nbytes(t) for role, t in W.globals.items() if role not in ("embed", "pos_embed"))
    if "lm_head" not in W.globals:
        n += nbytes(W.globals["embed"])  # tied: the embedding is read whole as lm_head
    return int(n)


def hf_generate_seconds(model, ids, n: int) -> float:
    """Seconds of one greedy transformers generate() of exactly n new tokens for `ids` [B, T] (no padding)."""
    import torch

    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    if cuda:
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + n
    return time.perf_counter() - t
