"""Specs that are wrong fail at registration, not at the first token; config.json values a spec cannot honour
fail at load, all of them in one error (issue 14 §3). No oracle needed: each case is a spec or config that is
wrong by construction, and the test names the rule it breaks."""

from __future__ import annotations

import types

import attrs
import pytest

import core
from core.config import ModelConfig
from core.errors import ConfigError
from plugins.gpt_neox import SPEC as NEOX
from plugins.llama import SPEC as LLAMA
from plugins.mixtral import SPEC as MIXTRAL


def broken(spec) -> str:
    """The registry's one-line reason for a plugin registering `spec`, or '' when it registers."""
    mod = types.ModuleType("probe")
    mod.archkit_register_architectures = core.hookimpl(lambda register: register(spec))
    reg = core.Registry.discover(builtins=(), entry_points=False, extra=[mod])
    return reg.broken[0].error if reg.broken else ""


def test_in_tree_specs_register():
    assert not core.default_registry().broken


def test_a_role_the_forward_needs_is_missing():
    spec = attrs.evolve(MIXTRAL, weights=tuple(r for r in MIXTRAL.weights if r.targets != ("router.weight",)))
    assert "no weight rule provides ['router.weight']" in broken(spec)
    spec = attrs.evolve(LLAMA, weights=tuple(r for r in LLAMA.weights if r.targets != ("mlp_norm.weight",)))
    assert "['mlp_norm.weight']" in broken(spec)
    # the shared-norm parallel block reads one norm: the same spec is then valid
    assert broken(attrs.evolve(spec, block="parallel_shared_norm")) == ""


def test_a_config_key_onto_a_fixed_flag():
    spec = attrs.evolve(NEOX, block="sequential")  # NEOX maps block from use_parallel_residual
    assert "config key 'block' maps onto a flag the spec fixes (block='sequential')" in broken(spec)


def test_a_fused_split_that_cannot_be_checked():
    rule = core.W(("q.weight", "k.weight"), "model.layers.{layer}.self_attn.qk.weight", split=("kv_dim", "kv_dim"))
    spec = attrs.evolve(LLAMA, weights=LLAMA.weights + (rule,))
    assert "role 'q.weight' has q_dim rows, not 'kv_dim'" in broken(spec)


def test_bad_flag_and_condition_values():
    assert "block='diagonal' is not one of" in broken(attrs.evolve(LLAMA, block="diagonal"))
    rule = core.W("q.bias", "model.layers.{layer}.self_attn.q_proj.bias", when="has_bias")
    assert "condition 'has_bias' is not a boolean config field" in broken(attrs.evolve(LLAMA, weights=LLAMA.weights + (rule,)))


def test_rejects_sees_absent_defaults_and_reports_every_key():
    spec = attrs.evolve(LLAMA, rejects=(("use_sliding_window", (False,)), ("clip_qkv", (None,), None),
                                        ("scale_attn_weights", (True,), False)))
    raw = {"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 32, "use_sliding_window": True}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf(spec, raw)
    msg = str(e.value)
    assert "use_sliding_window=True is not supported" in msg  # stated
    assert "scale_attn_weights=False (absent, which means that) is not supported" in msg  # absent: its default
    assert "clip_qkv" not in msg  # absent, default accepted


def test_a_transform_that_fails_is_a_config_error_naming_the_key():
    raw = {"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 32, "use_parallel_residual": {"nested": 1}}
    spec = attrs.evolve(NEOX, config=tuple(
        attrs.evolve(k, transform=lambda v: {True: "parallel", False: "sequential"}[v]) if k.field == "block" else k
        for k in NEOX.config))
    with pytest.raises(ConfigError, match=r"use_parallel_residual=\{'nested': 1\} cannot be read by plugin 'gpt_neox'"):
        ModelConfig.from_hf(spec, raw)


def test_an_absent_key_means_the_family_default():
    """GPTNeoXConfig defaults use_parallel_residual to true: absent must not silently mean sequential."""
    raw = {"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 32}
    assert ModelConfig.from_hf(NEOX, raw).block == "parallel"
    assert ModelConfig.from_hf(NEOX, {**raw, "use_parallel_residual": False}).block == "sequential"
