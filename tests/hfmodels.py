"""Random-init Hugging Face checkpoints of each family, saved in the exact hub layout (the parity oracle).

Needs torch + transformers (the `test` extra). Every checkpoint is written by transformers'
`save_pretrained` and can be rewritten to an older hub layout:
  - gpt2 "legacy": tensor names without the "transformer." prefix (the original upload);
  - rope families "legacy": `rope_theta` + `rope_scaling` instead of `rope_parameters`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FAMILIES = {
    # family: (transformers config class, model class)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM"),  # the out-of-tree plugin's family
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "phi": ("PhiConfig", "PhiForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


def hf_config(family: str, *, layers=2, hidden=64, heads=4, kv_heads=None, head_dim=None, intermediate=None,
              vocab=256, tie=None, rope_theta=10000.0, rope_scaling=None, max_pos=256, **extra):
    """A transformers config object with a wide init (initializer_range=0.15) so greedy is not noise."""
    import transformers

    cfg_cls = getattr(transformers, FAMILIES[family][0]) if family in FAMILIES else getattr(transformers, family)
    common = dict(vocab_size=vocab, initializer_range=0.15, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if tie is not None:
        common["tie_word_embeddings"] = tie
    if family == "gpt2":
        kw = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_pos, n_inner=intermediate)
    else:
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or 2 * hidden,
                  max_position_embeddings=max_pos, rope_theta=rope_theta)
        if head_dim is not None:
            kw["head_dim"] = head_dim
        if rope_scaling is not None:
            kw["rope_scaling"] = dict(rope_scaling)
    kw.update(common)
    kw.update(extra)
    return cfg_cls(**kw)


def save_model(family: str, path: Path, config=None, *, seed=0, dtype="float32", shard_kb=None, layout="hub",
               norm_noise=0.0, **cfg_kw) -> Path:
    """Build a random model of `family` (or a transformers model class name), save it to `path`, return path.

    norm_noise: std of Gaussian noise added to every norm weight (they init to exactly 1, or 0 in Gemma's
    1 + w form, which would leave how a norm applies its weight untested).
    """
    import torch
    import transformers

    config = config if config is not None else hf_config(family, **cfg_kw)
    model_cls = getattr(transformers, FAMILIES[family][1] if family in FAMILIES else cfg_kw.get("model_cls"))
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if norm_noise:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * norm_noise)
    model = model.to({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    path = Path(path)
    kw = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    model.save_pretrained(path, **kw)
    if layout == "legacy":
        to_legacy(family, path)
    return path


def to_legacy(family: str, path: Path) -> None:
    """Rewrite a saved checkpoint to the older hub layout of its family (see module docstring)."""
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if family == "gpt2":
        rename_tensors(path, lambda n: n.removeprefix("transformer."))
        return
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
    rtype = params.pop("rope_type", "default")
    if rtype != "default":
        cfg["rope_scaling"] = {"type" if rtype == "linear" else "rope_type": rtype, **params}
    cfg_file.write_text(json.dumps(cfg, indent=2))


def rename_tensors(path: Path, fn) -> None:
    """Rename every tensor in every safetensors file (and the index) of a checkpoint."""
    from safetensors.torch import load_file as tload, save_file as tsave

    for f in sorted(path.glob("*.safetensors")):
        tensors = tload(str(f))
        tsave({fn(k): v.contiguous() for k, v in tensors.items()}, str(f), metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {fn(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def hf_reference(path: Path):
    """transformers' own loading of the same files, in float32 on the CPU."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_logits(model, ids) -> np.ndarray:
    """float32 logits [T, V] from a transformers model."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))[None]).logits[0].float().numpy()


def hf_greedy(model, ids, n: int) -> list[int]:
    """transformers' greedy generate(): the n new token ids."""
    import torch

    ids_t = torch.as_tensor(np.asarray(ids))[None]
    with torch.no_grad():
        out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, ids_t.shape[1]:].tolist()


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
