"""The vocabulary's per-layer RoPE switch (nope_layers) and values computed from several config keys
(ConfigKey.compute), and a RoPE of the sliding-window layers' own (sliding_rope), tried from outside as
tests/test_vocabulary.py tries the rest: Gemma 3 (text; local layers on base 10000, global ones on 1e6 with
linear scaling, as a rope dict nested per layer type or as hub configs spell it), SmolLM3 (NoPE layers from
no_rope_layers or an interval over num_hidden_layers, a window only under use_sliding_window), EXAONE 4 (local RoPE
layers, global NoPE layers, post-norms, q/k head norms: the fused norm-and-RoPE path cannot be taken on a NoPE
layer) and Falcon (kv heads and the block layout from three keys each), each a pure plugin in tests/vocab_plugins/.
The oracle is transformers: random-init models of each family's class, every 1-D parameter (norm weights, biases)
perturbed, saved by save_pretrained; prefill logits, decode through the KV cache, greedy tokens."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import core
from core.config import ModelConfig
from core.errors import ConfigError

from conftest import needs_torch
from test_families import prompt
from test_vocabulary import S, VOCAB, assert_parity, plugin, registry

pytestmark = needs_torch

FEW = settings(max_examples=3)
FAMILIES = ("smollm3", "exaone4", "falcon", "gemma3")


def build(family: str, tmp: str, seed: int, **cfg) -> Path:
    """A random transformers model of the family's class, every 1-D parameter perturbed (Falcon's ln_attn /
    ln_f have no "norm" in their names, and its biases init to zero), saved by save_pretrained."""
    import torch
    import transformers

    cls = getattr(transformers, plugin(family).SPEC.detection.architectures[0])
    config = cls.config_class(vocab_size=VOCAB, initializer_range=0.15, bos_token_id=None, eos_token_id=None,
                              pad_token_id=None, max_position_embeddings=128, **cfg)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    path = Path(tmp) / family
    model.save_pretrained(path)
    return path


def dims(heads, layers, hidden=64, intermediate=96, theta=10000.0) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads[0],
                num_key_value_heads=heads[1], intermediate_size=intermediate,
                rope_parameters={"rope_type": "default", "rope_theta": theta})


@FEW
@given(heads=S.heads, layers=st.integers(2, 5), nope=st.one_of(st.sampled_from([2, 3]), st.just("list")),
       window=st.sampled_from([None, 5]), bias=st.booleans(), tie=st.booleans(), seed=S.seed)
def test_smollm3_parity(heads, layers, nope, window, bias, tie, seed):
    rng = np.random.default_rng(seed)
    flags = dict(no_rope_layers=[int(x) for x in rng.integers(0, 2, layers)]) if nope == "list" else \
        dict(no_rope_layer_interval=nope)
    slide = dict(use_sliding_window=True, sliding_window=window) if window else {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build("smollm3", tmp, seed, **dims(heads, layers), **flags, **slide, attention_bias=bias,
                     tie_word_embeddings=tie)
        raw = json.loads((ckpt / "config.json").read_text())
        c = assert_parity("smollm3", ckpt, prompt(seed, 16, VOCAB)).config
        assert c.nope_layers == tuple(i for i, f in enumerate(raw["no_rope_layers"]) if not f)
        assert [c.window(i) for i in range(layers)] == [window if t == "sliding_attention" and window else None
                                                        for t in raw["layer_types"]]


@FEW
@given(heads=S.heads, layers=st.integers(2, 5), pattern=st.sampled_from([2, 3]), window=st.sampled_from([5, 64]),
       tie=st.booleans(), seed=S.seed)
def test_exaone4_parity(heads, layers, pattern, window, tie, seed):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build("exaone4", tmp, seed, **dims(heads, layers), head_dim=16, sliding_window=window,
                     sliding_window_pattern=pattern, tie_word_embeddings=tie)
        c = assert_parity("exaone4", ckpt, prompt(seed, 16, VOCAB)).config
        assert c.nope_layers == tuple(i for i in range(layers) if (i + 1) % pattern == 0)
        assert [c.window(i) for i in range(layers)] == [None if i in c.nope_layers else window for i in range(layers)]


def test_exaone4_pattern_string():
    """sliding_window_pattern "LLG" (local, local, global; documented by Exaone4Config, which cannot expand it
    itself) means what the integer 3 means."""
    spec = plugin("exaone4").SPEC
    base = dict(num_hidden_layers=7, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, sliding_window=8)
    as_int, as_str = (ModelConfig.from_hf(spec, {**base, "sliding_window_pattern": p}) for p in (3, "LLG"))
    assert as_str == as_int and as_int.nope_layers == (2, 5)
    assert ModelConfig.from_hf(spec, {**base, "sliding_window": None}).nope_layers == ()


@pytest.mark.parametrize("legacy", [False, True])
@FEW
@given(heads=S.heads, layers=st.integers(2, 4), pattern=st.sampled_from([2, 3]), factor=st.sampled_from([1.0, 4.0]),
       tie=st.booleans(), seed=S.seed)
def test_gemma3_parity(legacy, heads, layers, pattern, factor, tie, seed):
    full = {"rope_type": "linear", "factor": factor, "rope_theta": 1e6} if factor != 1.0 else {"rope_theta": 1e6}
    rope = {"full_attention": {"rope_type": "default", **full}, "sliding_attention": {"rope_type": "default",
                                                                                      "rope_theta": 1e4}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build("gemma3", tmp, seed, **{**dims(heads, layers), "rope_parameters": rope}, head_dim=16,
                     sliding_window=5, sliding_window_pattern=pattern, tie_word_embeddings=tie)
        raw = json.loads((ckpt / "config.json").read_text())
        assert set(raw["rope_parameters"]) == {"full_attention", "sliding_attention"}
        if legacy:  # as the hub's gemma-3 configs: the two bases and the global scaling at the top level
            raw.pop("rope_parameters")
            raw.update(rope_theta=1e6, rope_local_base_freq=1e4,
                       rope_scaling={"rope_type": "linear", "factor": factor} if factor != 1.0 else None)
            (ckpt / "config.json").write_text(json.dumps(raw))
        c = assert_parity("gemma3", ckpt, prompt(seed, 16, VOCAB)).config
        assert (c.rope.theta, c.rope.factor, c.sliding_rope.theta, c.sliding_rope.type) == (1e6, factor, 1e4, "default")
        assert [c.rope_for(i) is c.sliding_rope for i in range(layers)] == [(i + 1) % pattern != 0 for i in range(layers)]


def test_a_sliding_rope_rotates_what_the_models_rotates():
    """A base of the sliding layers' own keeps the model's partial rotary, also where the rope dict holds it."""
    spec = plugin("gemma3").SPEC
    raw = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
               rope_parameters={"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6, "partial_rotary_factor": 0.5},
               rope_local_base_freq=1e4)
    c = ModelConfig.from_hf(spec, raw)
    assert c.sliding_rope.rotary_dims(16) == c.rope.rotary_dims(16) == 8
    assert (c.sliding_rope.theta, c.sliding_rope.type) == (1e4, "default")
    assert c.rope_for(0) is c.sliding_rope and attrs.evolve(c, nope_layers=(0,)).rope_for(0) is None


def test_a_sliding_rope_that_grows_is_refused():
    spec = plugin("gemma3").SPEC
    raw = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16,
               rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64)
    with pytest.raises(ConfigError, match="neither table depends on the sequence length"):
        ModelConfig.from_hf(spec, raw)


@pytest.mark.parametrize("new_arch, multi_query, parallel, num_ln, kv", [
    (False, True, True, None, None),    # Falcon-7B: one kv head, one norm for both sublayers
    (False, False, True, None, None),   # plain MHA, [heads, (q, k, v), head_dim]
    (False, False, False, None, None),  # the sequential block (input_layernorm, post_attention_layernorm)
    (True, True, True, 2, 2),           # Falcon-40B: kv groups, ln_attn + ln_mlp (multi_query ignored)
    (True, False, True, 1, 4),          # one norm under the new layout
    (True, True, True, None, 1),        # num_ln_in_parallel_attn absent: 2 under the new layout
])
@pytest.mark.parametrize("bias", [False, True])
def test_falcon_parity(new_arch, multi_query, parallel, num_ln, kv, bias):
    seed = 5
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build("falcon", tmp, seed, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     new_decoder_architecture=new_arch, multi_query=multi_query, parallel_attn=parallel,
                     num_ln_in_parallel_attn=num_ln, num_kv_heads=kv, bias=bias, tie_word_embeddings=not bias)
        if num_ln is None:  # as hub configs from before the key existed
            raw = json.loads((ckpt / "config.json").read_text())
            raw.pop("num_ln_in_parallel_attn", None)
            (ckpt / "config.json").write_text(json.dumps(raw))
        c = assert_parity("falcon", ckpt, prompt(seed, 16, VOCAB)).config
        assert c.num_kv_heads == ((kv or 4) if new_arch or not multi_query else 1)
        assert c.block == ("parallel" if new_arch and num_ln != 1 else
                           "sequential" if not parallel else "parallel_shared_norm")


@pytest.mark.parametrize("family", FAMILIES)
def test_an_empty_config_means_the_transformers_defaults(family):
    """Every key left out means in archkit what transformers' config class gives it (the computed ones included:
    they see the class's own values then)."""
    import transformers

    spec = plugin(family).SPEC
    full = getattr(transformers, spec.detection.architectures[0]).config_class().to_dict()
    empty, given_all = ModelConfig.from_hf(spec, {}), ModelConfig.from_hf(spec, full)
    windows = lambda c: [c.window(i) for i in range(c.num_layers)]  # noqa: E731  (layer_types: a pattern or a list)
    assert windows(empty) == windows(given_all)
    fields = lambda c: {**attrs.asdict(c, recurse=False), "layer_types": None}  # noqa: E731
    assert fields(empty) == fields(given_all)


def test_a_compute_that_fails_names_the_keys_and_the_plugin():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf(plugin("exaone4").SPEC, {"num_hidden_layers": 4, "sliding_window_pattern": 0})
    assert "sliding_window_pattern=0" in str(e.value) and "plugin 'exaone4'" in str(e.value), str(e.value)


def test_synthesized_checkpoints_read_back_as_written(tmp_path):
    """core.synth cannot write a computed value back (compute runs one way): the tensors follow the config the
    checkpoint reads back as, so what it writes always loads."""
    from core.synth import make_config, write_checkpoint

    spec = plugin("falcon").SPEC
    c = make_config(spec, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2)
    ckpt = write_checkpoint(spec, c, tmp_path / "falcon")
    model = core.load(ckpt, registry=registry("falcon"), device="cpu", quiet=True)
    assert np.isfinite(model.logits([1, 2, 3])).all()


def test_a_role_switched_off_by_config_is_a_config_error_at_load(tmp_path):
    """A rule whose `when` the config turns off, for a role the forward needs, is the plugin's error, named before
    any tensor is read (registration can only check the family's defaults)."""
    import attrs

    spec = plugin("falcon").SPEC
    rules = tuple(attrs.evolve(r, when="qkv_bias") if r.targets == ("final_norm.weight",) else r for r in spec.weights)
    broken = attrs.evolve(spec, name="falcon_broken", weights=rules)
    mod = type(plugin("falcon"))("archkit_falcon_broken")
    mod.SPEC = broken
    mod.archkit_register_architectures = core.hookimpl(lambda register: register(broken))
    reg = core.Registry.discover(entry_points=False, extra=[mod])
    from core.synth import make_config, write_checkpoint

    ckpt = write_checkpoint(spec, make_config(spec, vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=4), tmp_path / "f")
    with pytest.raises(ConfigError) as e:
        core.load(ckpt, registry=reg, arch="falcon_broken", device="cpu", quiet=True)
    assert "plugin 'falcon_broken'" in str(e.value) and "final_norm.weight" in str(e.value), str(e.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_plugin_module_is_small_and_pure(family):
    """At most 100 lines importing nothing but `core`, no escape hatch (its functions are compute's), unbroken."""
    import ast

    from test_vocabulary import PLUGINS

    source = (PLUGINS / f"archkit_{family}.py").read_text()
    assert len(source.splitlines()) <= 100
    imports = [n for n in ast.parse(source).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "core" for n in imports)
    spec = plugin(family).SPEC
    assert spec.attention_block is None and spec.mlp_block is None and not spec.extra_roles and not spec.ops
    assert family in registry(family) and not registry(family).broken
