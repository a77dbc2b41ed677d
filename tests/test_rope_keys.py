"""parse_rope's policy for rope-dict keys (core/rope.py, _READ / _INERT / _FAMILY_KEYS), and the two family keys
it implements rather than refuses, against transformers as the oracle:

- longrope's short_mscale / long_mscale (Phi-3.5-MoE): the cos/sin scale below / above the pretraining context,
  as PhimoeRotaryEmbedding applies it;
- dynamic's alpha (HunYuan): a fixed NTK-aware base, as HunYuan's rotary embeddings compute it (no growth).

Every other key that a transformers family gives a meaning archkit does not implement, and every unknown key, is a
ConfigError naming the key and the rope type; the rope dicts of popular hub configs still parse.
"""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest

from conftest import needs_torch
from core.errors import ConfigError
from core.rope import _FAMILY_KEYS, parse_rope
from test_rope import BASES, RTOL, _quiet_transformers, assert_table, hf_config  # noqa: F401  (autouse fixture)

SHORT, LONG = [1.0, 1.5, 2.0, 3.0] * 2, [2.0, 4.0, 8.0, 16.0] * 2  # 8 frequencies: head_dim 16


def cos_sin_check(table, cos, sin, pos):
    """transformers' cos / sin [T, rotary_dim] equal our table's at positions pos (the tolerance of test_rope's
    generation test: RTOL of inv_freq times the largest angle)."""
    ang = pos.astype(np.float32)[:, None] * table.inv_freq
    atol = 4 * RTOL * float(ang.max()) * table.scale + 1e-6
    half = table.rotary_dim // 2
    np.testing.assert_allclose(cos[:, :half], np.cos(ang) * np.float32(table.scale), rtol=0, atol=atol)
    np.testing.assert_allclose(sin[:, :half], np.sin(ang) * np.float32(table.scale), rtol=0, atol=atol)


# --- longrope short_mscale / long_mscale: PhimoeRotaryEmbedding -------------------------------------------------

@needs_torch
@pytest.mark.parametrize("mscales", [(1.243163121016122, 1.243163121016122), (1.1, 1.3)])  # Phi-3.5-MoE's; unequal
@pytest.mark.parametrize("extra", [{}, {"attention_factor": 0.9, "factor": 4.0}])  # mscales win over both
def test_longrope_mscale_matches_phimoe(mscales, extra):
    """Our table's scale is the one PhimoeRotaryEmbedding multiplies cos/sin by at every length, short_mscale up to
    original_max_position_embeddings and long_mscale past it; inv_freq is the short / long one.

    transformers 5.25's PhimoeRotaryEmbedding.forward recomputes inv_freq with rope_init_fn(config) (no seq_len),
    so past the pretraining context its cos/sin use the *short* factors with long_mscale, while the module's own
    inv_freq buffer (dynamic_rope_update), Phi3RotaryEmbedding and Phi-3.5-MoE's reference code take the long ones;
    we follow the latter, so past the limit the scale is checked on cos/sin and inv_freq against that buffer."""
    import torch
    from transformers.models.phimoe.modeling_phimoe import PhimoeRotaryEmbedding
    raw = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
           "original_max_position_embeddings": 64, "rope_theta": 10000.0,
           "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG, "short_mscale": mscales[0],
                            "long_mscale": mscales[1], "original_max_position_embeddings": 64, **extra}}
    r = parse_rope(raw)
    assert r.type == "longrope" and r.dynamic
    emb = PhimoeRotaryEmbedding(hf_config(raw, "PhimoeConfig"))
    for seq in (1, 63, 64, 65, 300, 40):  # ... and back below the limit, as a new conversation
        pos = np.arange(seq)
        cos, sin = (t[0].numpy() for t in emb(torch.zeros(1, seq, 16), torch.from_numpy(pos)[None]))
        table = r.table(16, seq)
        assert cos[0, 0] == np.float32(table.scale) and sin[0, 0] == 0  # position 0: cos = the scale exactly
        assert table.scale == (mscales[1] if seq > 64 else mscales[0])
        np.testing.assert_allclose(table.inv_freq, emb.inv_freq.numpy(), rtol=RTOL, atol=0)
        if seq <= 64:
            cos_sin_check(table, cos, sin, pos)
    assert r.table(16) is r.table(16, 64) and r.table(16, 65) is r.table(16, 10 ** 6)  # one object per table


def test_longrope_mscale_errors():
    base = {"max_position_embeddings": 64, "rope_scaling": {"type": "longrope", "short_factor": SHORT,
                                                             "long_factor": LONG}}
    for k, other in (("short_mscale", "long_mscale"), ("long_mscale", "short_mscale")):
        raw = copy.deepcopy(base)
        raw["rope_scaling"][k] = 1.2
        with pytest.raises(ConfigError, match=r"longrope needs both rope_scaling\.short_mscale and "
                                              r"rope_scaling\.long_mscale or neither"):
            parse_rope(raw)
        raw["rope_scaling"][other] = "big"
        with pytest.raises(ConfigError, match=rf"rope_scaling\.{other} to be a finite number .* got 'big'"):
            parse_rope(raw)


# --- dynamic + alpha: HunYuan's NTK-alpha -----------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("family", ["hunyuan_v1_dense", "hunyuan_v1_moe"])
@pytest.mark.parametrize("alpha,head_dim,theta", [(1000.0, 16, 10000.0), (2.5, 128, 500000.0), (50, 8, 1e6)])
def test_ntk_alpha_matches_hunyuan(family, alpha, head_dim, theta):
    """dynamic + alpha is a static table (no growth past max_position_embeddings; factor unused) equal to
    HunYuan's rotary embedding at every length; the A13B-style yarn keys beside it are inert."""
    import torch
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = "HunYuanDenseV1" if family.endswith("dense") else "HunYuanMoEV1"
    raw = {"hidden_size": 4 * head_dim, "num_attention_heads": 4, "head_dim": head_dim, "max_position_embeddings": 64,
           "rope_theta": theta, "rope_scaling": {"type": "dynamic", "alpha": alpha, "factor": 3.0, "beta_fast": 32,
                                                 "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
    r = parse_rope(raw)
    assert (r.type, r.alpha, r.dynamic) == ("dynamic", float(alpha), False)
    emb = getattr(mod, f"{cls}RotaryEmbedding")(hf_config(raw, f"{cls}Config"))
    for seq in (1, 64, 65, 300):
        pos = np.arange(seq)
        cos, sin = (t[0].numpy() for t in emb(torch.zeros(1, seq, head_dim), torch.from_numpy(pos)[None]))
        table = r.table(head_dim, seq)
        assert table is r.table(head_dim)
        assert_table(table, emb.inv_freq.numpy(), emb.attention_scaling)
        cos_sin_check(table, cos, sin, pos)


@needs_torch
@pytest.mark.parametrize("alpha", [0, None])
def test_ntk_alpha_falsy_is_plain_dynamic(alpha):
    """transformers tests `rope_parameters.get("alpha")` for truth: 0 or null leave plain, growing dynamic NTK."""
    from transformers.models.hunyuan_v1_dense.modeling_hunyuan_v1_dense import HunYuanDenseV1RotaryEmbedding
    raw = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "max_position_embeddings": 64,
           "rope_scaling": {"type": "dynamic", "alpha": alpha, "factor": 2.0}}
    r = parse_rope(raw)
    assert r.alpha is None and r.dynamic
    emb = HunYuanDenseV1RotaryEmbedding(hf_config(raw, "HunYuanDenseV1Config"))
    assert emb.rope_type == "dynamic"
    assert_table(r.table(16), emb.inv_freq.numpy(), emb.attention_scaling)


# --- refused keys -----------------------------------------------------------------------------------------------

FAMILY_CASES = [(k, t) for k, (types, _) in _FAMILY_KEYS.items() for t in types]


@pytest.mark.parametrize("key,rtype", FAMILY_CASES)
def test_family_keys_refused(key, rtype):
    """Each key a transformers family reads for this type (changing the output) but archkit does not implement is
    a ConfigError naming the key, the type and who reads it."""
    params = copy.deepcopy(BASES[rtype] if rtype != "default" else {"rope_type": "default"})
    params[key] = 1.25
    with pytest.raises(ConfigError, match=rf"^config\.json: rope_scaling\.{key}=1\.25 is not supported with rope "
                                          rf"type '{rtype}': .*(Phi-MoE|Ministral 3)") as ei:
        parse_rope({"max_position_embeddings": 64, "rope_scaling": params})
    assert len(str(ei.value)) < 400


@pytest.mark.parametrize("params,key", [
    ({"rope_type": "dynamic", "factor": 2.0, "ntk_alpha": 4.0}, "ntk_alpha"),  # not a key transformers reads
    ({"rope_type": "default", "interleaved": True}, "interleaved"),  # Qwen3-Omni's, not archkit's pairing flag
    ({"type": "linear", "factor": 2.0, "xdrope_section": [16, 16]}, "xdrope_section"),  # HunYuan-VL's own type's
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "scale": 2}, "scale"),
    ({"rope_type": "yarn", "factor": 4.0, "k" * 10_000: 1}, "k" * 57 + r"\.\.\."),
])
def test_unknown_keys_refused(params, key):
    with pytest.raises(ConfigError, match=rf"^config\.json: rope_scaling\.{key} is not a key of rope type "
                                          rf"'{params.get('rope_type') or params.get('type')}' \(it reads .*\); an "
                                          r"unknown rope key may change the output") as ei:
        parse_rope({"max_position_embeddings": 64, "rope_scaling": params})
    assert len(str(ei.value)) < 400


def test_null_and_zero_family_values_pass():
    """A null key is absent (as transformers' .get); a llama_4_scaling_beta of 0 scales queries by 1."""
    base = {"max_position_embeddings": 64, "rope_theta": 1e6}
    parse_rope({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "llama_4_scaling_beta": 0}})
    parse_rope({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "llama_4_scaling_beta": None,
                                         "foo": None, "short_mscale": None}})


# --- real configs ---------------------------------------------------------------------------------------------------

PHI_FACTORS = {"short_factor": [1.05] * 48, "long_factor": [1.0 + i / 10 for i in range(48)]}  # head_dim 96
REAL = {
    "llama-3.1": ({"rope_theta": 500000.0, "max_position_embeddings": 131072},
                  {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                   "rope_type": "llama3"}, "llama3"),
    "llama-3.2": ({"rope_theta": 500000.0, "max_position_embeddings": 131072},
                  {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                   "rope_type": "llama3"}, "llama3"),
    "qwen2.5-yarn": ({"rope_theta": 1e6, "max_position_embeddings": 32768},
                     {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}, "yarn"),
    "qwen3-yarn": ({"rope_theta": 1e6, "max_position_embeddings": 40960},
                   {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, "yarn"),
    "deepseek-v3": ({"rope_theta": 10000, "max_position_embeddings": 163840},
                    {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"}, "yarn"),
    "gpt-oss": ({"rope_theta": 150000, "max_position_embeddings": 131072},
                {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                 "rope_type": "yarn", "truncate": False}, "yarn"),
    "yarn-llama-2": ({"max_position_embeddings": 65536},
                     {"factor": 16.0, "original_max_position_embeddings": 4096, "type": "yarn", "finetuned": True}, "yarn"),
    "phi-3-mini-128k": ({"rope_theta": 10000.0, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096},
                        {**PHI_FACTORS, "type": "su"}, "longrope"),
    "phi-3.5-mini": ({"rope_theta": 10000.0, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096},
                     {**PHI_FACTORS, "type": "longrope"}, "longrope"),
    "phi-3.5-moe": ({"rope_theta": 10000.0, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096},
                    {**PHI_FACTORS, "long_mscale": 1.243163121016122, "short_mscale": 1.243163121016122,
                     "original_max_position_embeddings": 4096, "type": "longrope"}, "longrope"),
    "minicpm3": ({"rope_theta": 10000.0, "max_position_embeddings": 32768},
                 {**PHI_FACTORS, "type": "longrope", "original_max_position_embeddings": 32768}, "longrope"),
    "gemma-3": ({"rope_theta": 1e6, "max_position_embeddings": 131072}, {"factor": 8.0, "rope_type": "linear"}, "linear"),
    "mistral": ({"rope_theta": 1e6, "max_position_embeddings": 32768}, None, "default"),
    "old-linear": ({"max_position_embeddings": 4096}, {"factor": 4.0, "type": "linear"}, "linear"),
    "old-dynamic": ({"max_position_embeddings": 32768}, {"factor": 2.0, "type": "dynamic"}, "dynamic"),
    "hunyuan-a13b": ({"rope_theta": 10000.0, "max_position_embeddings": 32768},
                     {"alpha": 1000.0, "beta_fast": 32, "beta_slow": 1, "factor": 1.0, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "type": "dynamic"}, "dynamic"),
    "both-spellings": ({"max_position_embeddings": 262144},
                       {"type": "yarn", "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16384,
                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                        "max_position_embeddings": 262144, "rope_theta": 1e6}, "yarn"),
    "default-with-leftovers": ({}, {"rope_type": "default", "factor": 1.0, "mrope_section": [16, 24, 24],
                                    "mrope_interleaved": True, "rope_theta": 5e6}, "default"),
}


@pytest.mark.parametrize("name", REAL)
def test_real_configs_parse(name):
    """The rope dicts of popular hub configs (factor lists shortened) parse, as rope_scaling and as transformers-5
    rope_parameters, and give finite tables below and past their pretraining context."""
    top, rope, rtype = REAL[name]
    for layout in ("rope_scaling", "rope_parameters"):
        raw = {**top, layout: copy.deepcopy(rope)}
        r = parse_rope(raw)
        assert r.type == rtype
        head_dim = 96 if rtype == "longrope" else 128
        for seq in (None, 10, 300_000):
            t = r.table(head_dim, seq)
            assert np.isfinite(t.inv_freq).all() and t.scale > 0
