"""archkit's architecture vocabulary tried from outside, the checks that need no parity run (test_vocabulary.py
holds the plugins and their parity with transformers): each plugin in tests/vocab_plugins/ is a small pure module;
a broken variant of each family (a missing role, a ConfigKey onto a flag the spec fixes, a fused split that cannot
be checked) is reported broken at registration with the rule it breaks; and the vocabulary's words these families
needed ("{head}" patterns, "flag=value" conditions) are checked on their own.
"""

from __future__ import annotations

import ast
import types
from pathlib import Path

import attrs
import pytest

import core
from core import ConfigKey, W
from core.config import BOOL_FIELDS, CONFIG_FIELDS
from core.errors import WeightsError
from core.spec import validate_spec

from conftest import needs_torch
from hfmodels import rename_tensors
from test_vocabulary import FAMILIES, PLUGINS, edited, plugin, registry, tiny

pytestmark = needs_torch


# -- the plugins as modules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_plugin_module_is_small_and_pure(family):
    import transformers

    path = PLUGINS / f"archkit_{family}.py"
    source = path.read_text()
    assert len(source.splitlines()) <= 100, f"{path.name} has {len(source.splitlines())} lines"
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    spec = plugin(family).SPEC
    assert doc and f"models/{Path(spec.reference).parent.name}/modeling_" in doc
    assert (Path(transformers.__file__).parent.parent / spec.reference).is_file()  # the file it cites exists
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "core" for n in imports)  # nothing but the vocabulary
    assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert {"WEIGHTS", "CONFIG", "SPEC"} <= assigned
    assert [f.name for f in tree.body if isinstance(f, ast.FunctionDef)] == ["archkit_register_architectures"]
    assert spec.attention_block is None and spec.mlp_block is None and not spec.extra_roles  # no escape hatch
    assert family in registry(family) and not registry(family).broken


# -- registration-time checks: a broken variant of each family ----------------------------------------------------

L = "model.layers.{layer}."
# family → (a role it must not lose, a flag its spec fixes, a fused rule whose split cannot be checked, its message)
BROKEN = {
    "olmo2": ("post_mlp_norm.weight", "norm_placement",
              W(("q_norm.weight", "k_norm.weight"), L + "self_attn.qk_norm.weight", split=("q_dim", "kv_dim")),
              "role 'q_norm.weight' has no checkable size"),
    "granite": ("o.weight", "norm",
                W(("gate.weight", "up.weight"), L + "mlp.gate_up_proj.weight", split=("intermediate_size", "hidden_size")),
                "role 'up.weight' has intermediate_size rows, not 'hidden_size'"),
    "cohere": ("attn_norm.weight", "block",
               W(("q.weight", "k.weight", "v.weight"), L + "self_attn.qkv_proj.weight", split=("q_dim", "q_dim", "kv_dim")),
               "role 'k.weight' has kv_dim rows, not 'q_dim'"),
    "stablelm": ("mlp_norm.weight", "norm",
                 W(("attn_norm.weight", "mlp_norm.weight"), L + "norms.weight", split=("hidden_size", "hidden_size")),
                 "role 'attn_norm.weight' has no checkable size"),
    "gptj": ("lm_head", "rope_style",
             W(("q.weight", "k.weight", "v.weight"), "transformer.h.{layer}.attn.qkv_proj.weight",
               split=("hidden_size", "kv_dim", "kv_dim")),
             "role 'q.weight' has q_dim rows, not 'hidden_size'"),
    "qwen2_moe": ("shared.up.weight", "mlp",
                  W(("experts.gate.weight", "experts.up.weight"), L + "mlp.experts.w13",
                    split=("moe_intermediate_size", "moe_intermediate_size"), when="sparse_layer"),
                  "role 'experts.gate.weight' has expert_dim rows, not 'moe_intermediate_size'"),
    "olmoe": ("router.weight", "qk_norm",
              W(("router.weight", "shared_gate.weight"), L + "mlp.gates.weight", split=("num_experts", "num_experts")),
              "role 'shared_gate.weight' has no checkable size"),
    "nemotron": ("up.weight", "norm",
                 W(("up.weight", "down.weight"), L + "mlp.up_down.weight", split=("intermediate_size", "intermediate_size")),
                 "role 'down.weight' has hidden_size rows, not 'intermediate_size'"),
}


def variant(family: str, kind: str) -> tuple[types.ModuleType, str]:
    """A plugin module registering a broken variant of the family's spec, and the reason it must be given."""
    role, flag, rule, split_message = BROKEN[family]
    spec = plugin(family).SPEC
    if kind == "missing-role":
        broken = attrs.evolve(spec, weights=tuple(r for r in spec.weights if role not in r.targets))
        why = f"no weight rule provides [{role!r}], which the forward needs under the family's defaults"
    elif kind == "flag-fixed-and-mapped":
        fixed = getattr(spec, flag)
        broken = attrs.evolve(spec, config=spec.config + (ConfigKey(flag, (f"{flag}_type",), fixed),))
        why = f"config key {flag!r} maps onto a flag the spec fixes ({flag}={fixed!r}); fix it in one place"
    else:
        broken = attrs.evolve(spec, weights=spec.weights + (rule,))
        why = f"fused split of {rule.patterns[0]!r}: {split_message}"
    mod = types.ModuleType(f"broken_{family}_{kind}")

    @core.hookimpl
    def archkit_register_architectures(register):
        register(broken)

    mod.archkit_register_architectures = archkit_register_architectures
    return mod, why


@pytest.mark.parametrize("kind", ["missing-role", "flag-fixed-and-mapped", "unchecked-split"])
@pytest.mark.parametrize("family", FAMILIES)
def test_broken_variant_is_reported_at_registration(family, kind):
    mod, why = variant(family, kind)
    reg = core.Registry.discover(entry_points=False, extra=[mod])
    assert family not in reg and "llama" in reg  # the broken plugin contributes nothing; the others still work
    (broken,) = reg.broken
    assert broken.name == mod.__name__
    assert f"invalid spec {family!r}: " in broken.error and why in broken.error, broken.error


# -- the words these families added to the vocabulary ---------------------------------------------------------------

def problems(spec) -> list[str]:
    return validate_spec(spec, CONFIG_FIELDS, BOOL_FIELDS)


@pytest.mark.parametrize("rule, message", [
    (W("o.weight", L + "self_attn.o_proj.{head}.weight"),
     "has {head} but role 'o.weight' is not one of ('q_norm.weight', 'q_norm.bias', 'k_norm.weight', 'k_norm.bias')"),
    (W(("q_norm.weight", "k_norm.weight"), L + "qk.{head}.weight", split=("q_dim", "kv_dim")),
     "a {head} pattern stacks whole roles and cannot be split"),
    (W("q_norm.weight", L + "q.{head}.{expert}.weight"), "is malformed"),
    (W("q_norm.weight", "q.{head}.weight"), "role 'q_norm.weight' and pattern 'q.{head}.weight' disagree on being per-layer"),
    (W("mlp_norm.weight", L + "ln2.weight", when="blocks=sequential"), "'blocks' is not an architecture flag"),
    (W("mlp_norm.weight", L + "ln2.weight", when="!block=serial"), "'serial' is not a value of block"),
])
def test_new_vocabulary_is_validated(rule, message):
    spec = plugin("stablelm").SPEC
    bad = problems(attrs.evolve(spec, weights=spec.weights + (rule,)))
    assert any(message in b for b in bad), bad


def test_per_head_tensors_are_all_required(tmp_path):
    """A head's norm missing, or one head too many, is named; a per-head pattern without per-head norms too."""
    ckpt = tiny("stablelm", tmp_path, qk_layernorm=True)
    rename_tensors(ckpt, lambda n: n.replace("q_layernorm.norms.3.", "q_layernorm.norms.4."))
    with pytest.raises(WeightsError) as e:
        core.load(ckpt, registry=registry("stablelm"), device="cpu", quiet=True)
    assert e.value.missing == ["model.layers.0.self_attn.q_layernorm.norms.3.weight"]
    assert e.value.unexpected == ["model.layers.0.self_attn.q_layernorm.norms.4.weight"]
    rename_tensors(ckpt, lambda n: n.replace("q_layernorm.norms.4.", "q_layernorm.norms.3."))
    spec = plugin("stablelm").SPEC
    head = attrs.evolve(spec, name="stablelm-head", config=tuple(
        k if k.field != "qk_norm" else attrs.evolve(k, transform=lambda on: "head" if on else "none") for k in spec.config))
    reg = core.Registry.discover(entry_points=False, extra=[_registering(head)])
    with pytest.raises(WeightsError, match=r"stored one tensor per head, but role 'q_norm.weight' has no per-head "
                                           r"axis under qk_norm='head'"):
        core.load(ckpt, arch="stablelm-head", registry=reg, device="cpu", quiet=True)


def test_flag_condition_follows_the_config(tmp_path):
    """StableLM's post_attention_layernorm exists only in the sequential block: present in a parallel checkpoint
    it is unexpected, absent from a sequential one it is missing."""
    ckpt = tiny("stablelm", tmp_path, use_parallel_residual=False)
    edited(ckpt, use_parallel_residual=True)
    with pytest.raises(WeightsError) as e:
        core.load(ckpt, registry=registry("stablelm"), device="cpu", quiet=True)
    assert e.value.unexpected == ["model.layers.0.post_attention_layernorm.bias",
                                  "model.layers.0.post_attention_layernorm.weight"] and not e.value.missing
    ckpt = tiny("stablelm", tmp_path / "p", use_parallel_residual=True)
    edited(ckpt, use_parallel_residual=False)
    with pytest.raises(WeightsError) as e:
        core.load(ckpt, registry=registry("stablelm"), device="cpu", quiet=True)
    assert e.value.missing == ["model.layers.0.post_attention_layernorm.weight",
                               "model.layers.0.post_attention_layernorm.bias"]


def _registering(spec) -> types.ModuleType:
    mod = types.ModuleType(f"registering_{spec.name}")

    @core.hookimpl
    def archkit_register_architectures(register):
        register(spec)

    mod.archkit_register_architectures = archkit_register_architectures
    return mod
