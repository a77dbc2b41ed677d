"""Rotary embeddings (core/rope.py and ops.rope) against transformers, the oracle.

Tables: for every rope type, our RopeTable's inv_freq and scale equal what transformers' rope init function
computes from the same config.json dict; for the sequence-length-dependent types (dynamic NTK, longrope) they
follow a transformers rotary embedding module through a generation. transformers computes inv_freq in float32
(its exponent arange/dim is rounded to float32 before the pow), we in float64 rounded once, so inv_freq is
compared to RTOL (a few float32 ulps; more for llama3, see rtol()); the cos/sin scale must be equal exactly.

The op: ops.rope with rotate-half / interleaved pairing, partial rotary and a scale against transformers'
own apply_rotary_pos_emb (GPT-NeoX, GPT-J, Cohere). Also parse_rope's precedence, legacy spellings and errors.
"""

from __future__ import annotations

import copy
import importlib
import math

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from conftest import needs_torch
from core import ops
from core.errors import ConfigError
from core.rope import ROPE_TYPES, RopeConfig, RopeTable, parse_rope

RTOL = 1e-6  # inv_freq: float64-then-round vs transformers' float32 pow


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    """transformers warns about unusual (but valid) rope combinations the strategies draw."""
    try:
        from transformers.utils import logging
    except ImportError:
        yield
        return
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(level)


# --- strategies ------------------------------------------------------------------------------------------------

THETA = st.one_of(st.sampled_from([10000.0, 500000.0, 1e6]), st.floats(20.0, 2e6))
FACTOR = st.floats(1.0, 40.0)


@st.composite
def geometry(draw, rtype: str):
    """(raw config.json keys for the head geometry, head_dim), partial rotary included."""
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 12, 16, 32, 64, 80, 128]))
    prf = draw(st.sampled_from([None, 1.0, 0.5, 0.25, 0.75, 0.4]))
    dim = int(head_dim * (prf or 1.0))
    assume(dim % 2 == 0 and dim >= (4 if rtype == "dynamic" else 2))
    raw = {"hidden_size": heads * head_dim, "num_attention_heads": heads, "head_dim": head_dim,
           "max_position_embeddings": draw(st.integers(16, 4096)), "rope_theta": draw(THETA)}
    if prf is not None:
        raw["partial_rotary_factor"] = prf
    return raw, head_dim


@st.composite
def scaling(draw, rtype: str, raw: dict, head_dim: int) -> dict:
    """A rope dict of rtype with the optional keys sometimes present."""
    maybe = lambda key, strategy: {key: draw(strategy)} if draw(st.booleans()) else {}  # noqa: E731
    mpe = raw["max_position_embeddings"]
    orig = maybe("original_max_position_embeddings", st.integers(4, mpe))
    if rtype == "default":
        return {"rope_type": "default"}
    if rtype in ("linear", "dynamic"):
        return {"rope_type": rtype, "factor": draw(FACTOR)}
    if rtype == "llama3":
        lo = draw(st.floats(0.5, 2.0))
        return {"rope_type": "llama3", "factor": draw(FACTOR), "low_freq_factor": lo,
                "high_freq_factor": lo + draw(st.floats(0.5, 8.0)),
                "original_max_position_embeddings": draw(st.integers(4, mpe))}
    if rtype == "yarn":
        d = {"rope_type": "yarn", **orig, **maybe("attention_factor", st.floats(0.5, 2.0)),
             **maybe("beta_fast", st.sampled_from([0, 4, 16.0, 32, 64])), **maybe("beta_slow", st.sampled_from([0, 0.5, 1, 2])),
             **maybe("truncate", st.sampled_from([True, False, None]))}
        if draw(st.booleans()):  # DeepSeek style
            d.update(mscale=draw(st.sampled_from([0, 0.707, 1.0])), mscale_all_dim=draw(st.sampled_from([0, 0.707, 1.0])))
        # factor null: transformers uses max_position_embeddings / original_max_position_embeddings
        d["factor"] = draw(FACTOR) if draw(st.booleans()) or not orig else None
        return d
    assert rtype == "longrope"
    n = int(head_dim * (raw.get("partial_rotary_factor") or 1.0)) // 2
    factors = st.lists(st.floats(1.0, 64.0), min_size=n, max_size=n)
    return {"rope_type": "longrope", "short_factor": draw(factors), "long_factor": draw(factors), **orig,
            **maybe("factor", FACTOR), **maybe("attention_factor", st.floats(0.5, 2.0))}


# --- the oracle ------------------------------------------------------------------------------------------------

def hf_config(raw: dict, cls_name: str = "LlamaConfig"):
    """The transformers config for raw, as from_pretrained builds it (a copy: transformers edits the dicts)."""
    import transformers
    return getattr(transformers, cls_name)(**copy.deepcopy(raw))


def hf_init(config, seq_len):
    """(inv_freq float32 numpy, attention_scaling) from transformers' init function of config's rope type."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    rtype = config.rope_parameters["rope_type"]
    if rtype == "default":  # no entry in ROPE_INIT_FUNCTIONS; GPT-NeoX's honours partial_rotary_factor
        inv, scale = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv, scale = ROPE_INIT_FUNCTIONS[rtype](config, device=None, seq_len=seq_len)
    return inv.numpy(), scale


def rtol(r: RopeConfig) -> float:
    """RTOL, and for llama3 transformers' float32 rounding of its smoothing factor, which the smoothed inverse
    frequency ((1 - s) / factor + s) * inv amplifies by up to factor * high_freq_factor / (high - low)."""
    if r.type != "llama3":
        return RTOL
    return RTOL + 2 * 2.0 ** -24 * r.factor * r.high_freq_factor / (r.high_freq_factor - r.low_freq_factor)


def assert_table(ours: RopeTable, inv, scale, rtol: float = RTOL):
    assert ours.inv_freq.dtype == np.float32 and ours.inv_freq.shape == inv.shape
    np.testing.assert_allclose(ours.inv_freq, inv, rtol=rtol, atol=0)
    assert ours.scale == scale


# --- tables ----------------------------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("rtype", ROPE_TYPES)
@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
@given(data=st.data())
def test_table_matches_transformers(rtype, layout, data):
    import torch
    raw, head_dim = data.draw(geometry(rtype))
    rope = data.draw(scaling(rtype, raw, head_dim))
    if layout == "rope_scaling" and data.draw(st.booleans()):
        rope["type"] = rope.pop("rope_type")  # the older hub spelling
    raw[layout] = rope
    mpe = raw["max_position_embeddings"]
    seq_len = data.draw(st.one_of(st.none(), st.integers(1, 4 * mpe)))
    cfg = parse_rope(raw)
    assert cfg.type == rtype and cfg.dynamic == (rtype in ("dynamic", "longrope"))
    grows = rtype == "dynamic" and seq_len is not None and seq_len > mpe
    inv, scale = hf_init(hf_config(raw), torch.tensor(seq_len) if grows else seq_len)  # a tensor, as the module's
    assert_table(cfg.table(head_dim, seq_len), inv, scale, rtol(cfg))
    if seq_len is None:
        np.testing.assert_array_equal(cfg.inv_freq(head_dim), cfg.table(head_dim).inv_freq)


@needs_torch
@pytest.mark.parametrize("rtype,module", [("dynamic", "LlamaRotaryEmbedding"), ("longrope", "Phi3RotaryEmbedding"),
                                          ("longrope", "LlamaRotaryEmbedding"), ("yarn", "LlamaRotaryEmbedding")])
@given(data=st.data())
def test_generation_follows_transformers_module(rtype, module, data):
    """A prompt, decode steps past the pretraining context, then a fresh short prompt: at every forward our
    table(head_dim, max(position) + 1) gives the inv_freq, scale, cos and sin of transformers' rotary module."""
    import torch
    raw, head_dim = data.draw(geometry(rtype))
    raw["max_position_embeddings"] = mpe = data.draw(st.integers(16, 512))
    rope = data.draw(scaling(rtype, raw, head_dim))
    cls_name = "Phi3Config" if module.startswith("Phi3") else "LlamaConfig"
    if cls_name == "Phi3Config":  # Phi-3 keeps the pretraining context at the top level (and defaults it to 4096)
        raw["original_max_position_embeddings"] = rope.pop("original_max_position_embeddings", data.draw(st.integers(4, mpe)))
        del raw["head_dim"]  # Phi3Config derives it from hidden_size / num_attention_heads
    raw["rope_parameters"] = rope
    cfg = parse_rope(raw)
    limit = cfg.max_position_embeddings if rtype == "dynamic" else cfg.original_max_position_embeddings
    family = cls_name.removesuffix("Config").lower()
    emb = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), module)(hf_config(raw, cls_name))
    prompt = data.draw(st.integers(1, limit + 3))
    steps = [(0, prompt)] + [(p, 1) for p in range(prompt, max(prompt, limit) + data.draw(st.integers(1, 4)))]
    steps.append((0, data.draw(st.integers(1, limit - 1))))  # a new conversation: transformers resets below the limit
    for start, n in steps:
        pos = np.arange(start, start + n)
        cos, sin = emb(torch.zeros(1, n, head_dim), torch.from_numpy(pos)[None])
        table = cfg.table(head_dim, start + n)
        assert_table(table, emb.inv_freq.numpy(), emb.attention_scaling)
        ang = pos.astype(np.float32)[:, None] * table.inv_freq
        # the angle error grows with the position: RTOL of inv_freq, times the largest angle
        atol = 4 * RTOL * float(ang.max()) * table.scale + 1e-6
        half = table.rotary_dim // 2
        np.testing.assert_allclose(cos[0, :, :half].numpy(), np.cos(ang) * np.float32(table.scale), rtol=0, atol=atol)
        np.testing.assert_allclose(sin[0, :, :half].numpy(), np.sin(ang) * np.float32(table.scale), rtol=0, atol=atol)


def test_tables_are_cached_by_identity():
    """The CUDA backend keys device buffers on the table object: one object per distinct table."""
    static = [RopeConfig(), RopeConfig(type="linear", factor=2.0), RopeConfig(type="llama3", factor=8.0),
              RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=64, partial_rotary_factor=0.5)]
    for r in static:
        assert not r.dynamic
        assert len({id(r.table(64, s)) for s in (None, 1, 63, 64, 65, 10 ** 6)}) == 1
        assert r.inv_freq(64) is r.table(64).inv_freq
    dyn = RopeConfig(type="dynamic", factor=2.0, max_position_embeddings=100)
    assert dyn.dynamic and len({id(dyn.table(64, s)) for s in (None, 1, 99, 100)}) == 1
    assert dyn.table(64, 101) is dyn.table(64, 101) and dyn.table(64, 101) is not dyn.table(64, 100)
    assert dyn.table(64, 150).inv_freq[-1] < dyn.table(64, 101).inv_freq[-1] < dyn.table(64).inv_freq[-1]
    lr = RopeConfig(type="longrope", short_factor=(1.0,) * 4, long_factor=(2.0,) * 4, original_max_position_embeddings=10)
    short, long = lr.table(8, 10), lr.table(8, 11)
    assert short is lr.table(8) is lr.table(8, 1) and long is lr.table(8, 500) and short is not long
    np.testing.assert_array_equal(long.inv_freq * 2, short.inv_freq)
    with pytest.raises(ValueError):
        short.inv_freq[0] = 0  # shared: read-only


@pytest.mark.parametrize("rtype", ["default", "linear", "llama3"])
@given(theta=THETA, head_dim=st.sampled_from([2, 4, 8, 12, 64, 96, 128, 256]), factor=FACTOR)
def test_old_types_bit_identical(rtype, theta, head_dim, factor):
    """The types archkit had before keep exactly the inv_freq they had (the old RopeConfig.inv_freq, inlined)."""
    r = RopeConfig(theta=theta, type=rtype, factor=factor if rtype != "default" else 1.0, original_max_position_embeddings=8192)
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rtype == "linear":
        inv = inv / factor
    elif rtype == "llama3":
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > 8192 / 1.0, inv / factor, inv)
        smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        inv = np.where((wavelen >= 8192 / 4.0) & (wavelen <= 8192 / 1.0), smoothed, scaled)
    np.testing.assert_array_equal(r.table(head_dim, 12345).inv_freq, inv.astype(np.float32))
    assert r.table(head_dim).scale == 1.0 and r.table(head_dim).interleaved is False


# --- the op ----------------------------------------------------------------------------------------------------

@st.composite
def op_case(draw):
    """(x [T, H, Dh] float32, positions, RopeTable) with partial rotary, any pairing and scale."""
    head_dim = draw(st.sampled_from([2, 4, 8, 12, 16, 64, 80]))
    rot = draw(st.sampled_from([d for d in range(2, head_dim + 1, 2)]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    T, H = draw(st.integers(1, 9)), draw(st.integers(1, 4))
    start = draw(st.integers(0, 5000))
    x = rng.standard_normal((T, H, head_dim)).astype(np.float32)
    inv = RopeConfig(theta=draw(THETA)).table(rot).inv_freq
    table = RopeTable(inv, scale=draw(st.sampled_from([1.0, 0.8, 1.2247])), interleaved=draw(st.booleans()))
    return x, np.arange(start, start + T), table


@needs_torch
@given(case=op_case())
def test_op_matches_transformers_apply(case):
    """Rotate-half against GPT-NeoX's apply_rotary_pos_emb (partial: rotates cos.shape[-1] dims), interleaved
    against GPT-J's (rotate_every_two on the rotary slice, the rest concatenated back) and Cohere's (full head)."""
    import torch
    from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_apply
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply
    x, pos, table = case
    got = ops.rope(x, pos, table)
    assert got.dtype == np.float32 and got.shape == x.shape
    freqs = torch.from_numpy(pos)[None, :, None].float() * torch.tensor(table.inv_freq)  # [1, T, R/2]
    cos, sin = freqs.cos() * table.scale, freqs.sin() * table.scale
    xt = torch.from_numpy(x)[None]  # [1, T, H, Dh]
    r = table.rotary_dim
    if not table.interleaved:
        q = xt.transpose(1, 2)  # [1, H, T, Dh], unsqueeze_dim=1
        want, _ = neox_apply(q, q, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
        want = want.transpose(1, 2)
    else:
        want = torch.cat([gptj_apply(xt[..., :r], sin, cos), xt[..., r:]], dim=-1)
        if r == x.shape[-1]:
            q = xt.transpose(1, 2)
            co, _ = cohere_apply(q, q, cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1))
            np.testing.assert_allclose(got, co.transpose(1, 2)[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[..., r:], x[..., r:])  # the pass-through dims are untouched


@given(case=op_case())
def test_op_bare_inv_freq_is_the_old_op(case):
    """A bare inv_freq array means RopeTable(inv_freq), and full rotate-half is bit for bit the old op."""
    x, pos, table = case
    inv = table.inv_freq
    np.testing.assert_array_equal(ops.rope(x, pos, inv), ops.rope(x, pos, RopeTable(inv)))
    full = RopeConfig(theta=5000.0).inv_freq(x.shape[-1])
    ang = pos.astype(np.float32)[:, None] * full[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    h = x.shape[-1] // 2
    old = np.concatenate([x[..., :h] * cos - x[..., h:] * sin, x[..., h:] * cos + x[..., :h] * sin], axis=-1)
    np.testing.assert_array_equal(ops.rope(x, pos, full), old)


def test_interleaved_pairs_adjacent_dims():
    """By hand: position 1, one frequency of 1 rad, scale 2: interleaved rotates (x0, x1), rotate-half (x0, x2)."""
    x = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 4)  # [1, 2, 3, 4]
    c, s = 2 * math.cos(1.0), 2 * math.sin(1.0)
    inv = np.array([1.0, 0.0], np.float32)
    got = ops.rope(x, np.array([1]), RopeTable(inv, scale=2.0, interleaved=True))[0, 0]
    np.testing.assert_allclose(got, [1 * c - 2 * s, 2 * c + 1 * s, 3 * 2, 4 * 2], rtol=1e-6)
    got = ops.rope(x, np.array([1]), RopeTable(inv[:1], interleaved=False))[0, 0]  # rotary_dim 2 of 4
    np.testing.assert_allclose(got, [math.cos(1) - 2 * math.sin(1), 2 * math.cos(1) + math.sin(1), 3, 4], rtol=1e-6)


# --- parse_rope: precedence, legacy spellings, partial rotary --------------------------------------------------

def test_precedence():
    """Inside the rope dict, then the keyword argument, then the top-level key, then the default."""
    inner = {"rope_parameters": {"rope_type": "default", "rope_theta": 111.0, "partial_rotary_factor": 0.5}}
    top = {"rope_theta": 333.0, "partial_rotary_factor": 0.25}
    assert parse_rope({**inner, **top}, theta=222.0, partial_rotary_factor=0.75).theta == 111.0
    assert parse_rope({**inner, **top}, theta=222.0, partial_rotary_factor=0.75).partial_rotary_factor == 0.5
    r = parse_rope(top, theta=222.0, partial_rotary_factor=0.75)
    assert (r.theta, r.partial_rotary_factor) == (222.0, 0.75)
    r = parse_rope(top)
    assert (r.theta, r.partial_rotary_factor) == (333.0, 0.25)
    r = parse_rope({})
    assert (r.theta, r.partial_rotary_factor, r.type, r.rotary_dim, r.interleaved) == (10000.0, 1.0, "default", None, False)
    # an explicit rotary dim wins over the factor; the model's max_position_embeddings over raw's
    r = parse_rope({"partial_rotary_factor": 0.25, "max_position_embeddings": 10}, rotary_dim=8, interleaved=True,
                   max_position_embeddings=20)
    assert (r.rotary_dims(64), r.max_position_embeddings, r.table(64).interleaved) == (8, 20, True)
    assert r.table(64).rotary_dim == 8


@needs_torch
def test_precedence_as_transformers():
    """The cases where transformers decides: rope_scaling over rope_parameters, a top-level
    original_max_position_embeddings over the rope dict's, and GPT-NeoX's rotary_emb_base / rotary_pct keys."""
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    geo = {"hidden_size": 64, "num_attention_heads": 2, "head_dim": 32, "max_position_embeddings": 256}
    raw = {**geo, "rope_parameters": {"rope_type": "linear", "factor": 3.0}, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert parse_rope(raw).factor == 2.0 and hf_config(raw).rope_parameters["factor"] == 2.0
    raw = {**geo, "original_max_position_embeddings": 40, "rope_scaling": {"rope_type": "yarn", "factor": 3.0,
                                                                            "original_max_position_embeddings": 20}}
    assert parse_rope(raw).original_max_position_embeddings == 40
    assert_table(parse_rope(raw).table(32), *hf_init(hf_config(raw), None))
    neox = {"hidden_size": 64, "num_attention_heads": 2, "max_position_embeddings": 256, "rotary_emb_base": 777.0,
            "rotary_pct": 0.5}
    r = parse_rope(neox, theta=neox.get("rotary_emb_base", 10000.0), partial_rotary_factor=neox.get("rotary_pct", 0.25))
    emb = GPTNeoXRotaryEmbedding(hf_config(neox, "GPTNeoXConfig"))
    assert_table(r.table(32), emb.inv_freq.numpy(), emb.attention_scaling)


@needs_torch
@pytest.mark.parametrize("spelling", [{"type": "su"}, {"rope_type": "su"}, {"type": "yarn"}, {"type": "longrope"}])
def test_phi3_legacy_spellings(spelling):
    """Phi-3's "su" and short/long-factor "yarn" are longrope, as Phi3Config converts them; its table and the
    long/short switch follow Phi3RotaryEmbedding."""
    import torch
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    raw = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 512, "original_max_position_embeddings": 64,
           "rope_theta": 10000.0, "rope_scaling": {**spelling, "short_factor": [1.0, 1.5, 2.0, 3.0] * 2,
                                                    "long_factor": [2.0, 4.0, 8.0, 16.0] * 2}}
    r = parse_rope(raw)
    assert r.type == "longrope" and r.factor == 8.0
    emb = Phi3RotaryEmbedding(hf_config(raw, "Phi3Config"))
    for seq in (64, 65):
        emb(torch.zeros(1, 1, 16), torch.tensor([[seq - 1]]))
        assert_table(r.table(16, seq), emb.inv_freq.numpy(), emb.attention_scaling)


def test_plain_yarn_stays_yarn():
    r = parse_rope({"max_position_embeddings": 100, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert (r.type, r.original_max_position_embeddings, r.beta_fast, r.beta_slow, r.truncate) == ("yarn", 100, 32.0, 1.0, True)
    assert r.table(16).scale == pytest.approx(0.1 * math.log(4.0) + 1)


# --- parse_rope: errors ----------------------------------------------------------------------------------------

LONG = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
ERRORS = [
    ({"rope_theta": float("nan")}, {}, r"rope_theta=nan must be a finite number > 1"),
    ({"rope_parameters": {"rope_theta": 1}}, {}, r"rope_parameters\.rope_theta=1 must be a finite number > 1"),
    ({}, {"theta": "big"}, r"rope_theta='big' must be a finite number > 1"),
    ({"rope_parameters": [1]}, {}, r"rope_parameters must be an object or null"),
    ({"rope_scaling": "linear"}, {}, r"rope_scaling must be an object or null"),
    ({"rope_scaling": {"type": "ntk"}}, {},
     r"rope type 'ntk' \(rope_scaling\.rope_type\) is not supported \(supported: \['default', 'linear', 'llama3', "
     r"'dynamic', 'yarn', 'longrope'\]\)"),
    ({"rope_scaling": {"type": 3}}, {}, r"rope type 3 .* is not supported"),
    ({"rope_scaling": {"type": "linear"}}, {}, r"rope type 'linear' needs rope_scaling\.factor to be a finite number in \[1e-06, 1e\+06\], got None"),
    ({"rope_parameters": {"rope_type": "linear", "factor": -2}}, {}, r"rope_parameters\.factor .* got -2"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "2"}}, {}, r"rope_parameters\.factor .* got '2'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": float("inf")}}, {}, r"rope_parameters\.factor .* got inf"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, {}, r"needs max_position_embeddings .* got None"),
    ({"max_position_embeddings": 8.5, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, {},
     r"needs max_position_embeddings .* got 8\.5"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                       "original_max_position_embeddings": 64}}, {}, r"rope_scaling\.high_freq_factor > rope_scaling\.low_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}, {},
     r"rope type 'llama3' needs max_position_embeddings .* for original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 10 ** 400}}, {}, r"rope_scaling\.original_max_position_embeddings=1000"),
    ({"original_max_position_embeddings": True, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, {},
     r"^config\.json: original_max_position_embeddings=True must be an integer"),
    ({"max_position_embeddings": 64, "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0}}, {},
     r"rope_scaling\.attention_factor to be a finite number in \[1e-06, 1e\+06\], got 0"),
    ({"max_position_embeddings": 64, "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": "yes"}}, {},
     r"rope_scaling\.truncate='yes' must be true or false"),
    ({"max_position_embeddings": 64, "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "mscale": float("nan")}}, {},
     r"rope_scaling\.mscale=nan must be a finite number in \[-1e\+06, 1e\+06\]"),
    ({"max_position_embeddings": 64, "rope_scaling": {"rope_type": "yarn", "factor": math.e, "mscale": 1,
                                                      "mscale_all_dim": -10}}, {}, r"attention factor .* is nan"),
    ({"max_position_embeddings": 64, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": -20,
                                                      "mscale_all_dim": 1}}, {}, r"the yarn attention factor .* must be a finite number > 0"),
    ({"max_position_embeddings": 64, "rope_scaling": {"rope_type": "yarn", "beta_fast": "x"}}, {},
     r"rope_scaling\.beta_fast to be a finite number in \[1e-06, 1e\+06\]"),
    ({"max_position_embeddings": 64, "rope_scaling": {"type": "longrope", "long_factor": [1.0]}}, {},
     r"longrope needs rope_scaling\.short_factor to be a list of finite numbers in \[1e-06, 1e\+06\], got None"),
    ({"max_position_embeddings": 64, "rope_scaling": {"type": "su", **LONG, "short_factor": [1.0, 0.0]}}, {},
     r"rope_scaling\.short_factor to be a list of finite numbers in \[1e-06, 1e\+06\], got \[1\.0, 0\.0\]"),
    ({"max_position_embeddings": 64, "original_max_position_embeddings": 1, "rope_scaling": {"type": "su", **LONG}}, {},
     r"longrope needs original_max_position_embeddings >= 2"),
    ({"rope_scaling": {"type": "su", **LONG}}, {}, r"rope type 'longrope' needs max_position_embeddings"),
    ({"partial_rotary_factor": 0}, {}, r"partial_rotary_factor=0 must be a number in \(0, 1\]"),
    ({"rope_parameters": {"partial_rotary_factor": 1.5}}, {}, r"rope_parameters\.partial_rotary_factor=1\.5 must be"),
    ({}, {"partial_rotary_factor": float("nan")}, r"partial_rotary_factor=nan must be"),
    ({}, {"rotary_dim": "64"}, r"rotary_dim='64' must be an integer"),
    ({}, {"interleaved": 1}, r"interleaved=1 must be true or false"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "chunked_attention": {"rope_type": "default"}}},
     {}, r"rope_parameters nests 'chunked_attention'; a rope dict nested per layer type has only"),
    ({"rope_parameters": {"full_attention": {"rope_type": "ntk"}}}, {},
     r"rope type 'ntk' \(rope_parameters\.full_attention\.rope_type\) is not supported"),
]


@pytest.mark.parametrize("raw,kwargs,message", ERRORS)
def test_parse_errors(raw, kwargs, message):
    with pytest.raises(ConfigError, match=message if message.startswith("^") else r"^config\.json: .*" + message):
        parse_rope(raw, **kwargs)


@pytest.mark.parametrize("raw,kwargs,head_dim,message", [
    ({"partial_rotary_factor": 0.25}, {}, 12, r"rotary dim 3 \(head_dim 12 x partial_rotary_factor 0\.25\) must be even"),
    ({"partial_rotary_factor": 0.1}, {}, 8, r"rotary dim 0 .* must be even and in \[2, head_dim=8\]"),
    ({}, {"rotary_dim": 72}, 64, r"rotary dim 72 \(rotary_dim=72\) must be even and in \[2, head_dim=64\]"),
    ({"max_position_embeddings": 64, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, {"rotary_dim": 2}, 8,
     r"dynamic rope needs a rotary dim > 2"),
    ({"max_position_embeddings": 64, "rope_scaling": {"type": "su", **LONG}}, {}, 12,
     r"longrope short_factor has 8 entries; it needs rotary_dim / 2 = 6"),
    ({"max_position_embeddings": 64, "rope_scaling": {"type": "su", **LONG}}, {"partial_rotary_factor": 0.5}, 32,
     r"longrope short_factor has 8 entries; it needs rotary_dim / 2 = 8|^$"),  # fits: no error
])
def test_rotary_dim_errors(raw, kwargs, head_dim, message):
    """Checks that need head_dim raise at rotary_dims (model config validation) and on the first table()."""
    r = parse_rope(raw, **kwargs)
    if message.endswith("|^$"):
        assert r.rotary_dims(head_dim) == 16 and r.table(head_dim).rotary_dim == 16
        return
    for call in (lambda: r.rotary_dims(head_dim, "m/config.json"), lambda: r.table(head_dim, 5)):
        with pytest.raises(ConfigError, match=message):
            call()


# --- parse_rope: every number bounded (issue 17) ---------------------------------------------------------------

BASES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
             "mscale_all_dim": 1.0, "attention_factor": 1.1},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                 "original_max_position_embeddings": 32},
    "phimoe": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
               "original_max_position_embeddings": 32, "short_mscale": 1.2, "long_mscale": 1.3},
    "hunyuan": {"rope_type": "dynamic", "factor": 1.0, "alpha": 1000.0},
}
EXTREME = [1e-320, 5e-324, 1e-7, 1e7, 1e300, 10 ** 30, 2 ** 63, 10 ** 400, -1e-320]


@pytest.mark.parametrize("rtype,key", [(t, k) for t, d in BASES.items() for k, v in d.items() if k != "rope_type"])
@pytest.mark.parametrize("value", EXTREME)
def test_extreme_rope_numbers_are_config_errors(rtype, key, value):
    """A factor of 1e-320 used to give NaN logits silently (issue 17): each number is refused naming its key and
    range, or (mscale, 0 allowed) gives a finite table; never NaN, inf or an OverflowError."""
    params = copy.deepcopy(BASES[rtype])
    params[key] = [value] * 8 if isinstance(params[key], list) else value
    raw = {"max_position_embeddings": 64, "rope_scaling": params}
    try:
        r = parse_rope(raw)
    except ConfigError as e:
        rule = "must be an integer in [1, 2147483648]" if key.endswith("position_embeddings") else "1e+06]"
        assert f"rope_scaling.{key}" in str(e) and rule in str(e), str(e)
        assert len(str(e)) < 400
        return
    # accepted: an mscale (any finite number up to 1e6, 0 included) or a whole position count up to 2**31
    assert (key in ("mscale", "mscale_all_dim") and abs(value) <= 1e6) or \
        (key.endswith("position_embeddings") and value == int(value) and 1 <= value <= 2 ** 31)
    for seq in (None, 16, 200):
        t = r.table(16, seq)
        assert np.isfinite(t.inv_freq).all() and math.isfinite(t.scale) and t.scale > 0


@pytest.mark.parametrize("theta", [1e16, 1e300, 10 ** 400, 1.0 + 1e-16])
def test_extreme_rope_theta_is_a_config_error(theta):
    with pytest.raises(ConfigError, match=r"rope_theta=.* must be a finite number > 1 and at most 1e\+15"):
        parse_rope({"rope_theta": theta})


def test_long_rope_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as ei:
        parse_rope({"rope_scaling": {"rope_type": "x" * 10_000_000}})
    assert len(str(ei.value)) < 400
