"""Write a random checkpoint for any registered spec, in that family's own hub layout.

The inverse of loading: each weight rule's first pattern names the tensor (transposed or fused back
as the rule says) and each config key's first key names the config.json entry. transformers can load
what this writes, which is how `archkit bench` compares against it on the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import float32_to_bf16_bits
from .config import ModelConfig
from .spec import Derived, ModelSpec
from .weights import condition, expected_shape, stack_count


def hf_config_dict(spec: ModelSpec, c: ModelConfig) -> dict:
    """config.json content for `c`: every field its key writes back as is. Through a transform only a switch can be
    written back (a true or false that the transform maps onto the value: StableLM's qk_layernorm); a computed field
    or another transformed one is left to the family default, so what the result reads back as
    (ModelConfig.from_hf) can differ from `c` there, and write_checkpoint builds its tensors from that."""
    d: dict = {"architectures": list(spec.detection.architectures[:1]), "model_type": (spec.detection.model_types or ("",))[0]}
    for key in spec.config:
        if not key.keys or key.compute is not None:
            continue
        v = getattr(c, key.field)
        if key.transform is not None:
            switch = [b for b in (True, False) if _maps_to(key.transform, b, v)]
            if switch and v != key.default:
                d[key.keys[0]] = switch[0]
            continue
        if key.field == "eos_token_ids":
            v = (list(v) if len(v) > 1 else v[0]) if v else None
        d[key.keys[0]] = v
    if c.rope is not None:
        r = c.rope
        params = {"rope_type": r.type, "rope_theta": r.theta}
        if r.type != "default":
            params["factor"] = r.factor
        if r.type == "llama3":
            params.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                          original_max_position_embeddings=r.original_max_position_embeddings)
        d["rope_parameters"] = params
    return d


def _maps_to(transform, raw, value) -> bool:
    try:
        return transform(raw) == value
    except Exception:  # a plugin's function given a value it was not written for
        return False


def checkpoint_tensors(spec: ModelSpec, c: ModelConfig):
    """Yield (checkpoint name, rule, layer) for every tensor the spec expects under `c`, in rule order; of rules
    that are alternative layouts of the same roles only the first is written, and per-expert (per-head) patterns
    once per expert (head)."""
    seen: set[str] = set()
    for rule in spec.weights:
        if seen & set(rule.targets):
            continue
        seen |= set(rule.targets)
        for layer in (range(c.num_layers) if rule.per_layer else [None]):
            if not condition(rule.when, c, layer):
                continue
            name = rule.patterns[0].replace("{layer}", str(layer))
            for e in range(stack_count(rule, c, spec)) if rule.stacked else [None]:
                yield (name if e is None else name.replace("{expert}", str(e)).replace("{head}", str(e))), rule, layer


def stored_shape(rule, c: ModelConfig, spec: ModelSpec | None = None) -> tuple[int, ...]:
    """The shape a rule's tensor has in the checkpoint (fused parts stacked, one expert's (head's) slice for
    per-expert (per-head) patterns, transposed back as stored)."""
    shape = expected_shape(rule.targets[0], c, spec)
    axis = 1 if rule.targets[0].startswith("experts.") else 0
    if rule.split:
        shape = shape[:axis] + (sum(getattr(c, s) for s in rule.split),) + shape[axis + 1:]
    if rule.stacked:
        shape = shape[1:]
    return tuple(shape[:-2]) + tuple(shape[-2:][::-1]) if rule.transpose and len(shape) > 1 else tuple(shape)


def random_tensors(spec: ModelSpec, c: ModelConfig, seed: int = 0, std: float = 0.02):
    """Yield (checkpoint name, float32 array) for every tensor the spec expects under `c`."""
    rng = np.random.default_rng(seed)
    for name, rule, _ in checkpoint_tensors(spec, c):
        parts = []
        for role in rule.targets:
            shape = expected_shape(role, c, spec)[1 if rule.stacked else 0:]
            if role.endswith("norm.weight"):
                parts.append((1.0 - c.norm_offset + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            elif len(shape) == 1:
                parts.append((std * rng.standard_normal(shape)).astype(np.float32))
            else:
                parts.append((std * rng.standard_normal(shape, dtype=np.float32)))
        x = np.concatenate(parts, axis=1 if rule.targets[0].startswith("experts.") and not rule.stacked else 0) \
            if len(parts) > 1 else parts[0]
        if rule.transpose and x.ndim > 1:
            x = np.ascontiguousarray(np.swapaxes(x, -1, -2))
        yield name, x


def write_checkpoint(spec: ModelSpec, c: ModelConfig, path: str | Path, dtype: str = "float32", seed: int = 0,
                     std: float = 0.02, shard_bytes: int | None = None) -> Path:
    """Write config.json and model.safetensors (or shards + index) with random weights; return path."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = hf_config_dict(spec, c)
    # the tensors follow the config the checkpoint will be read as (a transformed field falls back to its default)
    c = ModelConfig.from_hf(spec, raw, source=f"synthetic {spec.name} config")
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    shards: list[dict] = [{}]
    size = 0
    for name, x in random_tensors(spec, c, seed, std):
        if dtype == "float16":
            x = x.astype(np.float16)
        elif dtype == "bfloat16":
            x = float32_to_bf16_bits(x)  # saved as raw BF16 bits below
        if shard_bytes and size and size + x.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, tensors in zip(files, shards):
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        if dtype == "bfloat16":
            _retag_bf16(path / fname)
    if len(shards) > 1:
        wm = {n: f for f, t in zip(files, shards) for n in t}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=2))
    return path


def _retag_bf16(f: Path) -> None:
    # numpy has no bfloat16: the bits were saved as U16; relabel them in the header (same byte size).
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for k, v in header.items():
        if k != "__metadata__" and v["dtype"] == "U16":
            v["dtype"] = "BF16"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))  # "BF16" is one character longer than "U16"; pad back to 8-byte alignment
    pad = (-(8 + len(new))) % 8
    new += b" " * pad
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def make_config(spec: ModelSpec, **sizes) -> ModelConfig:
    """A ModelConfig for `spec` from HF-style sizes, through the spec's own key map."""
    raw = {"architectures": list(spec.detection.architectures[:1])}
    field_keys = {k.field: k.keys[0] for k in spec.config if k.keys}
    for field, value in sizes.items():
        if field in field_keys:
            raw[field_keys[field]] = value
        else:
            raw[field] = value
    return ModelConfig.from_hf(spec, raw, source=f"synthetic {spec.name} config")


__all__ = ["hf_config_dict", "random_tensors", "write_checkpoint", "make_config", "Derived"]
