"""One broken plugin never takes the others down, and is never skipped silently (issue 5, item 3).

Each plugin below is installed for real (a module + .dist-info on sys.path / PYTHONPATH, found through
the "archkit" entry-point group). For each way of being broken: Registry.discover records it by name with
the reason; every built-in family still loads; `archkit list` prints it; and a load that fails because
no family matches names it. The allow-list ($ARCHKIT_PLUGINS / allow=) loads only the plugins named.
"""

from __future__ import annotations

import json
import sys

import pytest

import core
from core.errors import AmbiguousArchitectureError, UnknownArchitectureError

import fakeplugins as fp
from tinyckpt import write_checkpoint

BUILTIN = {"gpt2", "llama", "qwen3"}  # a few of the built-in families, which must survive any broken plugin

# name → (plugin source, format keywords, a fragment of the reason the registry must give)
BROKEN = {
    "fails-at-import": (fp.IMPORT_FAILS, {}, "failed to load: ModuleNotFoundError"),
    "exits-at-import": (fp.EXITS, {}, "failed to load: SystemExit"),
    "hook-raises": (fp.HOOK_RAISES, {}, "raised in archkit_register_architectures: RuntimeError: the plugin's own bug"),
    "bad-pattern": (fp.INVALID, {"field": "weights", "value": 'SPEC.weights + (W("q.weight", "model.layers.*.q"),)'},
                    "pattern 'model.layers.*.q' is malformed"),
    "unknown-flag": (fp.INVALID, {"field": "norm", "value": '"batchnorm"'}, "norm='batchnorm' is not one of"),
    "wrong-api": (fp.INVALID, {"field": "api_version", "value": "99"}, "api_version 99 is not supported"),
    "empty-model-type": (fp.INVALID, {"field": "detection", "value": 'Detection(model_types=("",))'},
                         "must be a core.spec.Detection of tuples of non-empty str"),
    "claims-all": (fp.CLAIMS_ALL, {}, "a rule that matches anything would claim every checkpoint"),
    "duplicate-name": (fp.CLONE, {"spec_name": "llama"}, "duplicate architecture 'llama' (already registered by plugin 'llama')"),
    "no-hook": (fp.NO_HOOK, {}, "has no archkit_register_architectures hook"),
    "aborts-at-import": (fp.ABORTS_AT_IMPORT, {}, "failed to load: PluginAbort: a BaseException at import"),
    "aborts-in-hook": (fp.ABORTS_IN_HOOK, {}, "raised in archkit_register_architectures: PluginAbort: a BaseException in the hook"),
    "trylast-hijack": (fp.HIJACK, {"spec_name": "llama"}, "duplicate architecture 'llama' (already registered by plugin "
                                                          "'llama'); built-in family names are reserved"),
}


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for fake plugin distributions; their modules are forgotten afterwards."""
    d = tmp_path / "site"
    d.mkdir()
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.delenv("ARCHKIT_PLUGINS", raising=False)
    yield d
    for mod in [m for m in sys.modules if m.startswith("archkit_fake_")]:
        del sys.modules[mod]


def install(site, name):
    source, fmt, _ = BROKEN[name]
    return fp.install(site, name, source, **fmt)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt")


@pytest.fixture(scope="module")
def alien_ckpt(tmp_path_factory):
    p = write_checkpoint(tmp_path_factory.mktemp("alien") / "ckpt")
    cfg = json.loads((p / "config.json").read_text())
    cfg.update(architectures=["AlienForCausalLM"], model_type="alien")
    (p / "config.json").write_text(json.dumps(cfg))
    return p


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_plugin_is_reported_and_isolated(site, name, llama_ckpt, alien_ckpt):
    install(site, name)
    reg = core.Registry.discover()
    broken = {b.name: b.error for b in reg.broken}
    assert name in broken, reg.broken
    assert BROKEN[name][2] in broken[name]
    assert "\n" not in broken[name]
    assert BUILTIN <= set(reg)
    if name not in ("duplicate-name", "trylast-hijack"):
        assert name not in reg  # nothing half-registered under the plugin's name
    # The others keep working: the llama checkpoint is detected and loads as llama.
    model = core.load(llama_ckpt, device="cpu", quiet=True, registry=reg)
    assert model.spec.name == "llama" and reg["llama"].plugin == "llama" and reg["llama"].spec.description != "hijacked"
    # A load that no family matches names the broken plugin and why.
    with pytest.raises(UnknownArchitectureError) as ei:
        core.load(alien_ckpt, device="cpu", quiet=True, registry=reg)
    assert f"{name} (" in str(ei.value) and BROKEN[name][2] in str(ei.value)


@pytest.mark.parametrize("name", ["fails-at-import", "wrong-api", "claims-all", "aborts-at-import", "aborts-in-hook",
                                  "trylast-hijack"])
def test_cli_list_shows_broken_plugin(site, name, llama_ckpt):
    install(site, name)
    r = fp.cli("list", site=site)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    line = next(line for line in r.stdout.splitlines() if line.startswith(f"broken plugin '{name}'"))
    assert BROKEN[name][2] in line
    families = {line.split()[0] for line in r.stdout.splitlines()[1:] if not line.startswith("broken")}
    assert BUILTIN <= families
    r = fp.cli("inspect", llama_ckpt, site=site)
    assert r.returncode == 0, r.stderr
    assert "family       llama" in r.stdout


def test_claims_all_cannot_claim(site, llama_ckpt, alien_ckpt):
    """A detection rule matching everything is refused, so it neither wins nor ties anywhere."""
    install(site, "claims-all")
    reg = core.Registry.discover()
    assert "claims-all" not in reg
    assert core.load(llama_ckpt, device="cpu", quiet=True, registry=reg).spec.name == "llama"
    with pytest.raises(UnknownArchitectureError, match="no registered architecture matches"):
        core.load(alien_ckpt, device="cpu", quiet=True, registry=reg)


def test_clone_of_a_family_makes_detection_ambiguous_and_says_who(site, llama_ckpt):
    """A valid plugin claiming what llama claims is not a silent first match: the error names both, arch= resolves."""
    fp.install(site, "copycat", fp.CLONE)
    reg = core.Registry.discover()
    with pytest.raises(AmbiguousArchitectureError, match="copycat and llama match equally"):
        core.load(llama_ckpt, device="cpu", quiet=True, registry=reg)
    assert core.load(llama_ckpt, arch="llama", device="cpu", quiet=True, registry=reg).spec.name == "llama"
    assert core.load(llama_ckpt, arch="copycat", device="cpu", quiet=True, registry=reg).spec.name == "copycat"


def test_hook_that_registers_then_raises(site):
    """All or nothing: what it registered before raising is dropped too, and the plugin is reported as broken."""
    fp.install(site, "half", fp.REGISTERS_THEN_RAISES)
    reg = core.Registry.discover()
    assert "half" not in reg and "llama" in reg
    assert "second spec failed" in {b.name: b.error for b in reg.broken}["half"]


def _twins(site):
    """Two distributions (archkit-fake-twin, archkit-fake-twin2) that both provide entry point 'twin'."""
    fp.install(site, "twin", fp.CLONE)
    fp.install(site / "other", "twin", fp.CLONE, spec_name="twin2", module="twin2")
    sys.path.insert(0, str(site / "other"))


def test_duplicate_entry_point_name_loads_neither(site):
    """Two distributions with one entry-point name: whichever came first on sys.path used to load (issue 17).
    Neither loads; the clash is reported once, naming both distributions and how to pick one."""
    _twins(site)
    try:
        reg = core.Registry.discover()
    finally:
        sys.path.remove(str(site / "other"))
    (b,) = [b for b in reg.broken if b.name == "twin"]
    assert "provided by 2 distributions" in b.error and "archkit-fake-twin " in b.error and "archkit-fake-twin2 " in b.error
    assert "ARCHKIT_PLUGINS='distribution:twin'" in b.error
    assert "twin" not in reg and "twin2" not in reg and BUILTIN <= set(reg)


@pytest.mark.parametrize("pick, family", [("archkit-fake-twin2:twin", "twin2"), ("Archkit_Fake.Twin:twin", "twin")])
def test_allow_list_picks_a_distribution(site, monkeypatch, pick, family):
    """`distribution:entry-point` in the allow-list (names compared as pip does) loads that one only."""
    _twins(site)
    monkeypatch.setenv("ARCHKIT_PLUGINS", f"llama,{pick}")
    try:
        reg = core.Registry.discover()
    finally:
        sys.path.remove(str(site / "other"))
    assert set(reg) == {"llama", family} and not reg.broken
    assert (reg[family].plugin, reg[family].distribution) == ("twin", f"archkit-fake-{family}")


def test_allow_list_distribution_that_is_not_installed(site):
    fp.install(site, "twin", fp.CLONE)
    reg = core.Registry.discover(allow=["llama", "archkit-other:twin"])
    assert set(reg) == {"llama"}
    (b,) = reg.broken
    assert b.name == "archkit-other:twin" and "no installed plugin" in b.error


def test_allow_list_builtin_by_distribution(site):
    assert set(core.Registry.discover(allow=["archkit:llama", "archkit:gpt2"])) == {"llama", "gpt2"}


def test_entry_point_cannot_take_a_builtin_plugin_name(site, monkeypatch):
    """An entry point named like a built-in is refused even when the allow-list leaves the built-in out."""
    fp.install(site, "llama", fp.CLONE, spec_name="evil-llama")
    for allow in (None, ["llama"]):
        reg = core.Registry.discover(allow=allow)
        (b,) = [b for b in reg.broken if b.name == "llama"]
        assert "taken by the built-in plugin 'plugins.llama'" in b.error and "evil-llama" not in reg


def test_cli_empty_allow_list_loads_no_outside_plugin(site):
    install(site, "fails-at-import")
    r = fp.cli("list", site=site, env={"ARCHKIT_PLUGINS": ""})
    assert r.returncode == 0, r.stderr
    assert "fails-at-import" not in r.stdout and "starcoder2" not in r.stdout and "llama " in r.stdout


# -- allow-list ---------------------------------------------------------------------------------
def test_allow_list_parameter(site):
    install(site, "fails-at-import")
    reg = core.Registry.discover(allow=["gpt2", "llama"])
    assert set(reg) == {"gpt2", "llama"}
    assert reg.broken == []  # the failing plugin was never imported


def test_allow_list_env(site, monkeypatch):
    install(site, "fails-at-import")
    monkeypatch.setenv("ARCHKIT_PLUGINS", "qwen3, fails-at-import")
    reg = core.Registry.discover()
    assert set(reg) == {"qwen3"}
    assert [b.name for b in reg.broken] == ["fails-at-import"]
    assert core.Registry.discover(allow=["llama"]).broken == []  # the parameter wins over the variable


def test_allow_list_names_missing_plugin(site):
    reg = core.Registry.discover(allow=["llama", "nosuchplugin"])
    assert set(reg) == {"llama"}
    (b,) = reg.broken
    assert b.name == "nosuchplugin" and "allow-list" in b.error and "no installed plugin" in b.error


def test_allow_list_cli(site, llama_ckpt):
    install(site, "fails-at-import")
    r = fp.cli("list", site=site, env={"ARCHKIT_PLUGINS": "llama"})
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["llama"]
    r = fp.cli("inspect", llama_ckpt, site=site, env={"ARCHKIT_PLUGINS": "gpt2"})
    fp.assert_one_line_error(r, "no registered architecture matches", "gpt2=0")


def test_distribution_pick_beats_a_plain_name(site, monkeypatch):
    _twins(site)
    monkeypatch.setenv("ARCHKIT_PLUGINS", "llama, twin, archkit-fake-twin2:twin")
    try:
        reg = core.Registry.discover()
    finally:
        sys.path.remove(str(site / "other"))
    assert set(reg) == {"llama", "twin2"} and not reg.broken
