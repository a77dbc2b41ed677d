"""A checkpoint's generation defaults: generation_config.json's sampling keys, as transformers applies them.

transformers and vLLM use `do_sample`, `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty` and
`max_new_tokens` / `max_length` from generation_config.json whenever the caller does not give them (Qwen3
ships temperature 0.6, top_p 0.95, top_k 20 and loops under greedy decoding). `GenerationDefaults` holds
what the file states, None for what it does not; `resolve` fills a caller's unset (None) keywords from it.

>>> d = read_generation_config("Qwen3-0.6B")  # doctest: +SKIP
>>> d                                                     # doctest: +SKIP
GenerationDefaults(do_sample=True, temperature=0.6, top_p=0.95, top_k=20, ...)
>>> d.resolve({"temperature": None, "top_k": 5}, prompt_len=10, context=40960)  # doctest: +SKIP
{'temperature': 0.6, 'top_k': 5, 'top_p': 0.95, ...}
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import attrs

from .config import read_json
from .errors import ConfigError, brief

# The keys a caller's None defers to the checkpoint, besides max_new_tokens (which max_length can also give).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# Keys that only matter when sampling: transformers ignores them (with a warning) unless do_sample is true.
SAMPLE_ONLY = ("temperature", "top_p", "top_k", "min_p")


@attrs.frozen
class GenerationDefaults:
    """generation_config.json's sampling keys; None = the file does not give it.

    `temperature` is already the effective one: 0.0 (greedy) when the file sets do_sample false, or gives
    sampling keys without do_sample true (transformers then decodes greedily and ignores them), and 1.0 when
    do_sample is true without a temperature (transformers' default). top_k / top_p are the file's own: where it
    has none, transformers would add its own top_k=50 and we add nothing, as vLLM does.
    """

    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens, as transformers counts it; resolve() converts it

    @classmethod
    def from_hf(cls, raw: dict, source: str = "generation_config.json") -> "GenerationDefaults":
        """Read the sampling keys of a parsed generation_config.json; ConfigError naming `source` and the key."""
        v = {name: _check(name, raw.get(name), source) for name in attrs.fields_dict(cls)}
        if v["do_sample"] is True:
            if v["temperature"] is None:
                v["temperature"] = 1.0
        elif v["do_sample"] is False or any(v[k] is not None for k in SAMPLE_ONLY):
            v["temperature"] = 0.0
        return cls(**v)

    def given(self) -> dict:
        """The keys the file states (effective temperature included), in field order."""
        return {k: x for k, x in attrs.asdict(self).items() if x is not None}

    def resolve(self, kw: dict, prompt_len: int = 0, context: int | None = None) -> dict:
        """`kw` (generate's keywords) with each SAMPLING_KEYS and max_new_tokens value that is None taken from here.

        A key neither gives stays None (the caller's own default applies). max_new_tokens defaults to the file's
        max_new_tokens, else max_length - prompt_len; a default never runs past `context` positions, since a
        default that made generation fail would be worse than none.
        """
        out = dict(kw)
        for key in SAMPLING_KEYS:
            if out.get(key) is None:
                out[key] = getattr(self, key)
        if kw.get("max_new_tokens") is None:
            n = self.max_new_tokens
            if n is None and self.max_length is not None:
                n = max(self.max_length - prompt_len, 0)
            if n is not None and context is not None:
                n = max(min(n, context - prompt_len), 0)
            out["max_new_tokens"] = n
        return out


def read_generation_config(path: str | os.PathLike) -> GenerationDefaults:
    """The GenerationDefaults of a checkpoint directory (or of a generation_config.json file itself).

    A directory without generation_config.json has no defaults: GenerationDefaults() (every field None).
    """
    path = Path(path)
    f = path / "generation_config.json" if path.is_dir() else path
    if not f.exists():
        return GenerationDefaults()
    return GenerationDefaults.from_hf(read_json(f, "generation_config.json"), str(f))


def _check(name: str, v, source: str):
    """The value of key `name`, or ConfigError naming the file, the key and the rule; null is not given."""
    if v is None:
        return None
    if name == "do_sample":
        if not isinstance(v, bool):
            raise ConfigError(f"{source}: do_sample={brief(v, 40)} must be true or false")
        return v
    is_int = isinstance(v, int) and not isinstance(v, bool)
    if name in ("top_k", "max_new_tokens", "max_length"):
        if not is_int or v < 0:
            raise ConfigError(f"{source}: {name}={brief(v, 40)} must be an integer >= 0")
        return v
    try:  # an integer too large for a float (10**400) is as bad as inf
        finite = (is_int or isinstance(v, float)) and math.isfinite(float(v))
    except OverflowError:
        finite = False
    if not finite:
        raise ConfigError(f"{source}: {name}={brief(v, 40)} must be a finite number")
    ok, rule = {"temperature": (v >= 0, ">= 0 (0 = greedy)"), "top_p": (0 < v <= 1, "in (0, 1]"),
                "min_p": (0 <= v <= 1, "in [0, 1]"), "repetition_penalty": (v > 0, "> 0 (1 = off)")}[name]
    if not ok:
        raise ConfigError(f"{source}: {name}={v!r} must be {rule}")
    return float(v)


