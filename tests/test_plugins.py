"""The plugin registry: a fresh Registry.discover(...) per test, plugins passed in as objects or modules.

A plugin that fails at import, raises in its hook, registers an invalid spec or a duplicate name is
reported by name in `registry.broken`, and every other family keeps working and loading. The allow-list
($ARCHKIT_PLUGINS / allow=) loads only the plugins it names. The fourth family, starcoder2, is a separate
distribution under tests/plugins/archkit_starcoder2, found only through its entry point.
(tests/test_plugin_isolation.py covers the same failures for plugins installed as distributions, and the CLI.)
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import types
from pathlib import Path

import attrs
import numpy as np
import pytest

import core
from conftest import needs_torch
from core.registry import BUILTINS, Registry
from core.spec import API_VERSION, Detection, W

REPO = Path(__file__).resolve().parents[1]
OUR_BUILTINS = {"gpt2", "llama", "qwen3"}  # the families this file leans on; others may be registered too


@pytest.fixture
def discover(monkeypatch):
    """A factory for fresh registries: built-ins plus `extra` plugin objects, no entry points by default."""
    monkeypatch.delenv("ARCHKIT_PLUGINS", raising=False)

    def make(*extra, builtins=BUILTINS, entry_points=False, allow=None):
        return Registry.discover(builtins=builtins, entry_points=entry_points, allow=allow, extra=extra)

    return make


def plugin(name: str, hook) -> types.ModuleType:
    """A plugin module called `name` whose archkit_register_architectures(register) is `hook`."""
    mod = types.ModuleType(name)
    mod.archkit_register_architectures = core.hookimpl(hook)
    return mod


def registering(name: str, *specs) -> types.ModuleType:
    def hook(register):
        for s in specs:
            register(s)
    return plugin(name, hook)


def llama_like(**changes):
    """The built-in llama spec with some fields changed: by default a new name claiming a made-up model_type."""
    from plugins.llama import SPEC

    return attrs.evolve(SPEC, **{"name": "llama-like", "detection": Detection(model_types=("llama-like",)), **changes})


def with_rule(rule):
    from plugins.llama import SPEC

    return llama_like(weights=SPEC.weights + (rule,))


def raising_hook(register):
    raise ValueError("kaput in the hook")


def bad_signature(reg):  # pluggy checks hook argument names when the plugin is registered
    pass


# plugin name → (plugin object, a fragment of the reason registry.broken must give)
BROKEN = {
    "hook-raises": (lambda: plugin("hook-raises", raising_hook),
                    "raised in archkit_register_architectures: ValueError: kaput in the hook"),
    "bad-signature": (lambda: plugin("bad-signature", bad_signature), "failed to load"),
    "bad-pattern": (lambda: registering("bad-pattern", with_rule(W("o.bias", "model.layers.{layer}.{layer}.o.bias"))),
                    "pattern 'model.layers.{layer}.{layer}.o.bias' is malformed"),
    "space-pattern": (lambda: registering("space-pattern", with_rule(W("lm_head", "lm head.weight"))),
                      "pattern 'lm head.weight' is malformed"),
    "mixed-alternatives": (lambda: registering("mixed-alternatives", with_rule(
        W("o.bias", "model.layers.{layer}.o.bias", "model.o.bias"))), "pattern 'model.o.bias' is malformed"),
    "unknown-role": (lambda: registering("unknown-role", with_rule(W("q_proj.weight", "model.layers.{layer}.x.weight"))),
                     "role 'q_proj.weight' is not a canonical role"),
    "global-role-per-layer": (lambda: registering("global-role-per-layer", with_rule(W("embed", "model.layers.{layer}.e"))),
                              "role 'embed' and pattern 'model.layers.{layer}.e' disagree on being per-layer"),
    "wrong-api": (lambda: registering("wrong-api", llama_like(api_version=API_VERSION + 1)),
                  f"api_version {API_VERSION + 1} is not supported (this archkit speaks {API_VERSION})"),
    "unknown-condition": (lambda: registering("unknown-condition", with_rule(
        W("o.bias", "model.layers.{layer}.o.bias", when="use_magic"))), "condition 'use_magic' is not a boolean config field"),
    "unknown-flag": (lambda: registering("unknown-flag", llama_like(norm="batchnorm")), "norm='batchnorm' is not one of"),
    "split-count": (lambda: registering("split-count", with_rule(
        W(("q.weight", "k.weight"), "model.layers.{layer}.qk.weight", split=("q_dim",)))), "needs one split size per target"),
    "bad-split-field": (lambda: registering("bad-split-field", with_rule(
        W(("q.weight", "k.weight"), "model.layers.{layer}.qk.weight", split=("q_dim", "k_size")))),
        "split size 'k_size' is not a config field"),
    "bad-name": (lambda: registering("bad-name", llama_like(name="Llama Like")), "name 'Llama Like' must be lowercase"),
    "not-a-spec": (lambda: registering("not-a-spec", {"name": "dict-family"}), "expected a core.spec.ModelSpec, got dict"),
    "duplicate-name": (lambda: registering("duplicate-name", llama_like(name="gpt2")),
                       "duplicate architecture 'gpt2' (already registered by plugin 'gpt2')"),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A small random llama checkpoint written by transformers."""
    import hfmodels as hf

    return hf.save_model("llama", tmp_path_factory.mktemp("llama"), layers=1, hidden=16, heads=2, vocab=64, max_pos=32)


def assert_families_work(reg, llama_dir):
    """The built-in families are registered and a checkpoint still loads and runs through `reg`."""
    assert OUR_BUILTINS <= set(reg)
    model = core.load(llama_dir, device="cpu", quiet=True, registry=reg)
    assert model.spec.name == "llama"
    want = core.load(llama_dir, arch="llama", device="cpu", quiet=True, registry=Registry.discover(allow=["llama"]))
    np.testing.assert_array_equal(model.logits([1, 2, 3]), want.logits([1, 2, 3]))


@needs_torch
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_plugin_is_reported_by_name_and_isolated(discover, llama_dir, name):
    make, reason = BROKEN[name]
    good = registering("good-neighbour", llama_like(name="neighbour"))
    reg = discover(make(), good)
    assert [b.name for b in reg.broken] == [name]
    assert reason in reg.broken[0].error
    assert "neighbour" in reg and "llama-like" not in reg
    assert name in repr(reg)
    assert reg["gpt2"].spec.name == "gpt2"  # a duplicate never replaces the first registration
    assert_families_work(reg, llama_dir)


@needs_torch
@pytest.mark.parametrize("how", ["missing module", "raises at import"])
def test_plugin_failing_at_import(discover, llama_dir, tmp_path, monkeypatch, how):
    if how == "raises at import":
        (tmp_path / "archkit_test_boom.py").write_text("raise RuntimeError('boom at import')\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        mod, reason = "archkit_test_boom", "failed to load: RuntimeError: boom at import"
    else:
        mod, reason = "archkit_test_no_such_module", "failed to load: ModuleNotFoundError"
    reg = discover(builtins=BUILTINS + (mod,))
    assert [(b.name, reason in b.error) for b in reg.broken] == [(mod, True)]
    assert_families_work(reg, llama_dir)


@needs_torch
def test_unknown_family_error_names_broken_plugins(discover, llama_dir):
    """When the family a user wants is in a broken plugin, the error says so instead of just "unknown"."""
    reg = discover(registering("wrong-api", llama_like(api_version=API_VERSION + 1)))
    with pytest.raises(core.UnknownArchitectureError, match=r"unknown architecture 'llama-like'.*broken plugins: wrong-api"):
        core.load(llama_dir, arch="llama-like", device="cpu", quiet=True, registry=reg)
    reg = discover(registering("llama-plugin", llama_like(name="llama", api_version=0)), builtins=("plugins.gpt2",))
    with pytest.raises(core.UnknownArchitectureError, match=r"no registered architecture matches.*broken plugins: llama-plugin"):
        core.load(llama_dir, device="cpu", quiet=True, registry=reg)


def test_duplicate_between_outside_plugins_keeps_the_first(discover):
    reg = discover(registering("first", llama_like(name="twin")), registering("second", llama_like(name="twin")))
    assert reg["twin"].plugin == "first"
    assert [b.name for b in reg.broken] == ["second"]
    assert "duplicate architecture 'twin' (already registered by plugin 'first')" in reg.broken[0].error


def test_duplicate_within_one_plugin(discover):
    reg = discover(registering("stutters", llama_like(name="twice"), llama_like(name="twice")))
    # all or nothing: a plugin that broke registers none of its families
    assert "twice" not in reg and [b.name for b in reg.broken] == ["stutters"]
    assert "duplicate architecture 'twice'" in reg.broken[0].error


def test_registry_is_a_small_mapping(discover):
    reg = discover(registering("outside", llama_like(name="outside-family")))
    assert list(reg) == sorted(reg) and len(reg) == len(list(reg))
    assert "outside-family" in reg and "nope" not in reg
    assert [e.spec.name for e in reg.entries()] == list(reg)
    entry = reg["llama"]
    assert (entry.plugin, entry.distribution) == ("llama", "archkit")
    assert reg["outside-family"].plugin == "outside" and not reg.broken
    with pytest.raises(core.UnknownArchitectureError, match=r"unknown architecture 'nope'; registered: .*llama"):
        reg["nope"]
    with pytest.raises(KeyError):  # errors subclass builtins
        reg["nope"]
    assert "Registry" in repr(reg) and "outside-family" in repr(reg)


def test_allow_list_parameter_and_env(discover, monkeypatch):
    extra = registering("outside", llama_like(name="outside-family"))
    assert set(discover(extra, allow=["gpt2", "outside"])) == {"gpt2", "outside-family"}
    monkeypatch.setenv("ARCHKIT_PLUGINS", " qwen3 , gpt2,")
    assert set(Registry.discover(entry_points=True, extra=[extra])) == {"gpt2", "qwen3"}



@pytest.mark.parametrize("value", ["", " ", ",", " , "])
def test_empty_allow_list_means_no_outside_plugin(monkeypatch, value):
    """ARCHKIT_PLUGINS="" fails closed (issue 17): the built-ins load, no outside plugin does (it used to load all)."""
    extra = registering("outside", llama_like(name="outside-family"))
    monkeypatch.setenv("ARCHKIT_PLUGINS", value)
    reg = Registry.discover(entry_points=True, extra=[extra])
    assert OUR_BUILTINS <= set(reg) and not reg.broken
    assert "outside-family" not in reg and "starcoder2" not in reg
    assert set(Registry.discover(allow=[], entry_points=True, extra=[extra])) == set(reg)


@pytest.mark.parametrize("order", [{"trylast": True}, {"tryfirst": True}, {}])
@pytest.mark.parametrize("allow", [None, ["hijack"]])
def test_builtin_family_names_are_reserved_whatever_the_hook_order(discover, order, allow):
    """An outside plugin registering a built-in family's name is the broken one, never the built-in (issue 17):
    with trylast its hook used to run first and take 'llama'; a built-in left out by the allow-list stays reserved."""
    mod = types.ModuleType("hijack")
    mod.archkit_register_architectures = core.hookimpl(**order)(
        lambda register: register(llama_like(name="llama", description="not the real llama")))
    reg = discover(mod, allow=allow)
    (b,) = reg.broken
    assert b.name == "hijack" and "'llama'" in b.error and "reserved" in b.error
    if allow is None:
        assert reg["llama"].plugin == "llama" and reg["llama"].spec.description != "not the real llama"
    else:
        assert "llama" not in reg


def test_duplicate_between_outside_plugins_follows_discovery_not_hook_order(discover):
    """tryfirst/trylast, which a plugin picks for itself, do not decide which of two outside plugins keeps a name."""
    first = registering("first", llama_like(name="twin"))
    second = types.ModuleType("second")
    second.archkit_register_architectures = core.hookimpl(trylast=True)(lambda register: register(llama_like(name="twin")))
    reg = discover(first, second)
    assert reg["twin"].plugin == "first" and [b.name for b in reg.broken] == ["second"]


class Abort(BaseException):
    """Neither an Exception nor KeyboardInterrupt/SystemExit: `except Exception` used to let it through."""


def aborting_hook(register):
    raise Abort("from the hook")


class Unprintable(Exception):
    def __str__(self):
        raise Abort("from __str__")


def unprintable_hook(register):
    raise Unprintable()


@pytest.mark.parametrize("hook, reason", [(aborting_hook, "raised in archkit_register_architectures: Abort: from the hook"),
                                          (unprintable_hook, "Unprintable: <unprintable>")])
def test_base_exception_in_a_hook_is_isolated(discover, hook, reason):
    reg = discover(plugin("aborts", hook))
    assert [b.name for b in reg.broken] == ["aborts"] and reason in reg.broken[0].error
    assert OUR_BUILTINS <= set(reg)


def test_keyboard_interrupt_in_a_hook_is_not_swallowed(discover):
    def interrupted(register):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        discover(plugin("interrupted", interrupted))


def test_huge_plugin_error_is_cut(discover):
    def shouts(register):
        raise ValueError("x" * 10_000_000)

    (b,) = discover(plugin("shouts", shouts)).broken
    assert len(b.error) < 500 and b.error.endswith("...")


def test_allow_list_skips_a_broken_plugin_entirely(discover):
    """A plugin left out by the allow-list is never imported, so its breakage cannot matter."""
    reg = discover(registering("hook-raises", raising_hook), builtins=BUILTINS + ("archkit_test_no_such_module",),
                   allow=["gpt2", "llama"])
    assert set(reg) == {"gpt2", "llama"} and not reg.broken


@needs_torch
def test_allow_list_qwen3_alone_loads(discover, tmp_path):
    """qwen3's module builds on llama's spec; allowing qwen3 alone must still register and load it."""
    import hfmodels as hf

    path = hf.save_model("qwen3", tmp_path, layers=1, hidden=16, heads=2, head_dim=8, vocab=64, max_pos=32)
    reg = discover(allow=["qwen3"])
    assert list(reg) == ["qwen3"] and not reg.broken
    assert core.load(path, device="cpu", quiet=True, registry=reg).spec.name == "qwen3"


# --- the out-of-tree starcoder2 plugin ---------------------------------------------------------------------------

INSTALL = "pip install ./tests/plugins/archkit_starcoder2"


def starcoder2_entry_point():
    eps = [ep for ep in md.entry_points(group="archkit") if ep.name == "starcoder2"]
    if not eps:
        pytest.fail(f"the archkit-starcoder2 test plugin is not installed in this environment: {INSTALL}")
    return eps[0]


def test_starcoder2_is_a_separate_distribution_with_an_entry_point():
    ep = starcoder2_entry_point()
    assert ep.value == "archkit_starcoder2" and ep.group == "archkit"
    assert ep.dist.name == "archkit-starcoder2"
    assert md.distribution("archkit-starcoder2").read_text("entry_points.txt").count("[archkit]") == 1
    pyproject = (REPO / "tests/plugins/archkit_starcoder2/pyproject.toml").read_text()
    assert 'starcoder2 = "archkit_starcoder2"' in pyproject


def test_starcoder2_is_found_only_through_its_entry_point(monkeypatch):
    monkeypatch.delenv("ARCHKIT_PLUGINS", raising=False)
    starcoder2_entry_point()
    assert not any(b.rsplit(".", 1)[-1] == "starcoder2" for b in BUILTINS)
    assert importlib.util.find_spec("plugins.starcoder2") is None and importlib.util.find_spec("core.starcoder2") is None
    module = importlib.util.find_spec("archkit_starcoder2").origin
    assert not Path(module).resolve().is_relative_to(REPO / "core")
    assert not Path(module).resolve().is_relative_to(REPO / "plugins")
    assert "starcoder2" not in Registry.discover(entry_points=False)
    reg = Registry.discover()
    entry = reg["starcoder2"]
    assert (entry.plugin, entry.distribution, entry.version) == ("starcoder2", "archkit-starcoder2", "0.1.0")
    assert "starcoder2" in core.architectures()
    assert not [b for b in reg.broken if b.name == "starcoder2"]


def test_starcoder2_alone_through_allow_list(discover):
    starcoder2_entry_point()
    reg = discover(entry_points=True, allow=["starcoder2"])
    assert list(reg) == ["starcoder2"] and not reg.broken
