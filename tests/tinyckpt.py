"""Tiny llama-layout checkpoints written with numpy alone (no torch), and tools to damage them.

The raw material of test_errors.py, test_fuzz.py and tools/measure_load_rss.py. Tensor names and
shapes are written out by hand from transformers' LlamaForCausalLM (not derived from archkit's spec),
so a wrong name or shape in archkit shows up as a failure here rather than being copied.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "core" / "data" / "demo_tokenizer.json"

# A hand-written config.json of the Llama layout: 2 layers, hidden 16, 4 heads of 4, 2 kv heads.
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name → shape for a LlamaForCausalLM config dict (HF names, [out, in])."""
    V, D, I = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim", D // H)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (H * hd, D),
            p + "self_attn.k_proj.weight": (KV * hd, D),
            p + "self_attn.v_proj.weight": (KV * hd, D),
            p + "self_attn.o_proj.weight": (D, H * hd),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (I, D),
            p + "mlp.up_proj.weight": (I, D),
            p + "mlp.down_proj.weight": (D, I),
        })
    return shapes


# HF tensor name (layer replaced by {i}) → archkit canonical role; how the fuzz oracle finds a loaded role's source.
LLAMA_ROLES = {
    "model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm.weight", "lm_head.weight": "lm_head",
    "model.layers.{i}.input_layernorm.weight": "attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "q.weight", "model.layers.{i}.self_attn.k_proj.weight": "k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "v.weight", "model.layers.{i}.self_attn.o_proj.weight": "o.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "gate.weight", "model.layers.{i}.mlp.up_proj.weight": "up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "down.weight",
}


def role_of(name: str) -> tuple[str, int | None] | None:
    """(role, layer) of a Llama checkpoint tensor name, or None."""
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "layers" and parts[2].isdigit():
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        return (LLAMA_ROLES[key], int(parts[2])) if key in LLAMA_ROLES else None
    return (LLAMA_ROLES[name], None) if name in LLAMA_ROLES else None


def random_tensors(cfg: dict, seed: int = 0, dtype=np.float32):
    """Yield (name, array) for every tensor of `cfg`, norms near 1 and matrices ~N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    for name, shape in llama_shapes(cfg).items():
        x = 1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.1 * rng.standard_normal(shape)
        yield name, x.astype(dtype)


def write_checkpoint(path, cfg: dict | None = None, *, shards: int = 1, seed: int = 0, dtype=np.float32,
                     tokenizer: bool = False, generation_config: dict | None = None) -> Path:
    """Write config.json + model.safetensors (or `shards` shards + index.json); return the directory.

    Shards are written one at a time, so a large checkpoint never sits in memory whole.
    """
    from safetensors.numpy import save_file

    cfg = dict(LLAMA_CONFIG if cfg is None else cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    if tokenizer:
        shutil.copy(DEMO_TOKENIZER, path / "tokenizer.json")
    shapes = llama_shapes(cfg)
    itemsize = np.dtype(dtype).itemsize
    total = sum(int(np.prod(s)) * itemsize for s in shapes.values())
    per = -(-total // shards)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else ["model.safetensors"]
    weight_map, current, size, k = {}, {}, 0, 0
    for name, x in random_tensors(cfg, seed, dtype):
        if current and size + x.nbytes > per and k < shards - 1:
            save_file(current, str(path / names[k]), metadata={"format": "pt"})
            current, size, k = {}, 0, k + 1
        current[name] = x
        weight_map[name] = names[k]
        size += x.nbytes
    save_file(current, str(path / names[k]), metadata={"format": "pt"})
    if shards > 1:
        assert k == shards - 1, f"only {k + 1} of {shards} shards filled; use fewer shards"
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def read_raw(file: Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file, parsed independently of archkit."""
    raw = Path(file).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(file: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    """Write a safetensors file from a header (dict or raw bytes), data bytes, and an optional forged length."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(file).write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)


def edit_header(file: Path, fn) -> None:
    """Rewrite a safetensors header in place: fn(header dict) mutates it."""
    header, data = read_raw(file)
    fn(header)
    write_raw(file, header, data)


def last_tensor(file: Path) -> str:
    """Name of the tensor whose data ends last in `file`."""
    header, _ = read_raw(file)
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def edit_json(file: Path, fn) -> None:
    """Rewrite a JSON file in place: fn(dict) mutates it."""
    d = json.loads(Path(file).read_text())
    fn(d)
    Path(file).write_text(json.dumps(d))
