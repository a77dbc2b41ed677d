"""Parity with Hugging Face transformers on the CPU (numpy backend, fp32), per family.

The oracle is transformers itself: a random-init model is saved with `save_pretrained` (optionally
rewritten to an older hub layout, sharded, or stored in F16/BF16) and both transformers and archkit
load the same files; transformers always loads them in float32. We require logits with
‖a−b‖/‖b‖ < 1e-4 and greedy generation equal token for token for GREEDY_TOKENS tokens.

Also here: detection (config.json and tensor names), loading by plugin name, ambiguity / no-match
errors, token-id and context checks, sampling semantics against transformers' LogitsProcessors, EOS
and stop strings, and incremental detokenization of byte-level BPE.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import core
import hfmodels as hf
from conftest import needs_torch
from core.checkpoint import Checkpoint
from core.detect import detect
from core.registry import Registry, default_registry

pytestmark = needs_torch

FAMILIES = ("gpt2", "llama", "qwen3", "starcoder2")  # starcoder2 comes from tests/plugins/archkit_starcoder2
ROPE_FAMILIES = ("llama", "qwen3", "starcoder2")
TOL = 1e-4
GREEDY_TOKENS = 24
DTYPES = ("float32", "float16", "bfloat16")  # what the checkpoint files hold


# --- the oracle --------------------------------------------------------------------------------------------------

def reference(path: Path):
    """transformers' float32 model of `path`; fails if transformers itself could not load every weight."""
    import torch
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], f"transformers misloaded {path}: {info}"
    return model.eval()


def hf_generate(model, ids, n, **kw) -> list[int]:
    """transformers' generate() (greedy unless told otherwise): the new token ids, EOS allowed to stop it."""
    import torch

    t = torch.as_tensor(np.asarray(ids))[None]
    with torch.no_grad():
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, **kw)
    return out[0, t.shape[1]:].tolist()


def require_family(name: str) -> None:
    if name not in core.architectures():
        pytest.fail(f"family {name!r} is not registered; the out-of-tree plugin must be installed into the test "
                    f"environment: pip install ./tests/plugins/archkit_starcoder2")


def assert_parity(path: Path, prompt: list[int], n: int = GREEDY_TOKENS, **load_kw):
    """Logits and greedy tokens of archkit vs transformers on the same checkpoint directory."""
    ref = reference(path)
    model = core.load(path, device="cpu", quiet=True, **load_kw)
    want = hf.hf_greedy(ref, prompt, n)
    got = model.generate(prompt, max_new_tokens=n, stop_at_eos=False)
    ids = prompt + want  # logits over the prompt and the continuation: more positions than the prompt alone
    ours, theirs = model.logits(ids), hf.hf_logits(ref, ids)
    err = hf.rel_err(ours, theirs)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert err < TOL, f"logits differ: rel err {err:.3g} ({model})"
    if got != want:
        i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        top2 = np.sort(theirs[len(prompt) + i - 1])[-2:]
        pytest.fail(f"greedy diverges at token {i}: ours {got[i]} vs transformers {want[i]} "
                    f"(transformers' top-2 margin there {top2[1] - top2[0]:.3g}); logits rel err {err:.3g}")
    return model, ref


# --- checkpoints ---------------------------------------------------------------------------------------------------

def rope_key_legacy(path: Path, key: str) -> None:
    """Make a legacy rope_scaling use `key` ("type" or "rope_type") for its kind, as different hub eras did."""
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.pop("type", None) or scaling.pop("rope_type")
        scaling[key] = kind
        f.write_text(json.dumps(cfg, indent=2))


def add_gpt2_mask_buffers(path: Path, n_pos: int) -> None:
    """The original GPT-2 upload carries causal-mask buffers (h.N.attn.bias); archkit must ignore them."""
    import torch
    from safetensors.torch import load_file, save_file

    f = sorted(path.glob("*.safetensors"))[-1]
    tensors = load_file(str(f))
    layers = json.loads((path / "config.json").read_text())["n_layer"]
    for i in range(layers):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
    save_file(tensors, str(f), metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].update({f"h.{i}.attn.bias": f.name for i in range(layers)})
        index.write_text(json.dumps(data, indent=2))


def build(path: Path, family: str, files: dict, cfg: dict) -> Path:
    """Save a random model of `family` with hfmodels, in the layout/shards/dtype that `files` asks for."""
    cfg = dict(cfg)
    seed = cfg.pop("seed", 0)
    hf.save_model(family, path, seed=seed, dtype=files["dtype"], layout=files["layout"],
                  shard_kb=1 if files["sharded"] else None, **cfg)
    sharded = (path / "model.safetensors.index.json").exists()
    assert sharded == files["sharded"], "the checkpoint is not in the layout the test asked for"
    if files["layout"] == "legacy":
        if family == "gpt2":
            add_gpt2_mask_buffers(path, cfg.get("max_pos", 256))
        else:
            rope_key_legacy(path, files.get("rope_key", "rope_type"))
            assert "rope_parameters" not in json.loads((path / "config.json").read_text())
    return path


# --- strategies (one namespace) ------------------------------------------------------------------------------------

class S:
    """Hypothesis strategies for configs, files and prompts."""

    files = st.fixed_dictionaries({
        "layout": st.sampled_from(["hub", "legacy"]),
        "sharded": st.booleans(),
        "dtype": st.sampled_from(DTYPES),
        "rope_key": st.sampled_from(["type", "rope_type"]),
    })

    @staticmethod
    def rope_scaling():
        linear = st.builds(lambda f: {"rope_type": "linear", "factor": f}, st.floats(1.0, 8.0))
        llama3 = st.builds(
            lambda f, lo, span, orig: {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                                       "high_freq_factor": lo + span, "original_max_position_embeddings": orig},
            st.floats(1.0, 32.0), st.floats(0.5, 2.0), st.floats(0.5, 4.0), st.integers(4, 128))
        # dynamic NTK and YaRN: an original context shorter than prompt + generation, so the scaling engages
        dynamic = st.builds(lambda f: {"rope_type": "dynamic", "factor": f}, st.floats(1.0, 8.0))
        yarn = st.builds(lambda f, orig: {"rope_type": "yarn", "factor": f, "original_max_position_embeddings": orig},
                         st.floats(1.0, 16.0), st.integers(4, 32))
        return st.one_of(st.none(), linear, llama3, dynamic, yarn)

    @staticmethod
    @st.composite
    def attention(draw, explicit_head_dim: bool | None):
        """hidden, heads, kv heads (every GQA ratio), head_dim (None = hidden / heads)."""
        heads = draw(st.sampled_from([1, 2, 4, 8]))
        kv = draw(st.sampled_from([d for d in (1, 2, 4, 8) if heads % d == 0]))
        explicit = draw(st.booleans()) if explicit_head_dim is None else explicit_head_dim
        if explicit:
            hidden = draw(st.sampled_from([16, 24, 32, 48, 64]))
            head_dim = draw(st.sampled_from([4, 6, 8, 12, 16, 32]).filter(lambda d: d * heads != hidden))
        else:
            hidden = draw(st.sampled_from([h for h in (16, 32, 48, 64) if h // heads % 2 == 0]))
            head_dim = None
        return dict(hidden=hidden, heads=heads, kv_heads=kv, head_dim=head_dim)

    @staticmethod
    @st.composite
    def config(draw, family: str):
        """hfmodels.hf_config keywords for a random tiny model of `family`."""
        common = dict(layers=draw(st.integers(1, 3)), vocab=draw(st.sampled_from([96, 128, 200, 256])),
                      tie=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                      max_pos=draw(st.sampled_from([48, 64, 256])))
        if family == "gpt2":
            heads = draw(st.sampled_from([1, 2, 4, 8]))
            return dict(common, hidden=draw(st.sampled_from([16, 32, 64])), heads=heads,
                        intermediate=draw(st.one_of(st.none(), st.integers(8, 96))),  # n_inner null vs set
                        activation_function=draw(st.sampled_from(["gelu_new", "gelu", "relu", "gelu_pytorch_tanh"])),
                        layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-3])))
        cfg = dict(common, **draw(S.attention(None if family != "qwen3" else True)),
                   intermediate=draw(st.integers(8, 96)),
                   rope_theta=draw(st.one_of(st.sampled_from([10000.0, 500000.0, 1e6]), st.floats(20.0, 1e5))),
                   rope_scaling=draw(S.rope_scaling()))
        if (cfg["rope_scaling"] or {}).get("rope_type") == "dynamic" and (cfg["head_dim"] or cfg["hidden"] // cfg["heads"]) <= 2:
            cfg["rope_scaling"] = None  # dynamic NTK divides by head_dim - 2 (transformers raises ZeroDivisionError)
        if family == "starcoder2":
            return dict(cfg, use_bias=draw(st.booleans()), norm_epsilon=draw(st.sampled_from([1e-5, 1e-3])),
                        hidden_act=draw(st.sampled_from(["gelu_pytorch_tanh", "gelu", "relu"])),
                        # window 1: transformers' cached generate() disagrees with its own forward; see below
                        sliding_window=draw(st.one_of(st.none(), st.integers(2, 40))))
        cfg.update(rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5, 1e-3])), attention_bias=draw(st.booleans()),
                   hidden_act=draw(st.sampled_from(["silu", "silu", "gelu", "relu"])))
        if family == "llama":
            cfg["mlp_bias"] = draw(st.booleans())
        return cfg

    @staticmethod
    def prompt(vocab: int = 96):
        return st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12)


# --- parity --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=5 * settings.default.max_examples)  # the heart of the suite: five times the profile's
@given(data=st.data())
def test_parity_random_configs(family, data):
    """Hypothesis over configs and file layouts: logits and >= 20 greedy tokens equal transformers'."""
    require_family(family)
    cfg = data.draw(S.config(family), label="config")
    files = data.draw(S.files, label="files")
    prompt = data.draw(S.prompt(), label="prompt")
    with tempfile.TemporaryDirectory() as d:
        path = build(Path(d), family, files, cfg)
        model, ref = assert_parity(path, prompt)
        assert model.spec.name == family and model.detected.method == "config.json"
        assert model.config.num_layers == cfg["layers"] and model.config.vocab_size == cfg["vocab"]
        if family != "gpt2" and cfg["rope_scaling"]:  # the oracle really used the scaling we meant to test
            assert ref.config.rope_parameters["rope_type"] == cfg["rope_scaling"]["rope_type"]
            assert model.config.rope.type == cfg["rope_scaling"]["rope_type"]


MATRIX = [(f, layout, sharded, dtype) for f in FAMILIES for layout in ("hub", "legacy")
          for sharded in (False, True) for dtype in DTYPES]


@pytest.mark.parametrize("family,layout,sharded,dtype", MATRIX)
def test_parity_every_layout(tmp_path, family, layout, sharded, dtype):
    """Every family in every layout × single/sharded × F32/F16/BF16 at least once, with GQA, untied, and
    (for rope families) llama3 scaling and an explicit head_dim."""
    require_family(family)
    cfg = dict(layers=2, vocab=128, tie=False, max_pos=64, seed=7)
    if family == "gpt2":
        cfg.update(hidden=32, heads=4, intermediate=40)
    else:
        cfg.update(hidden=32, heads=4, kv_heads=2, head_dim=12, intermediate=48, rope_theta=5000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    path = build(tmp_path / "ckpt", family, dict(layout=layout, sharded=sharded, dtype=dtype, rope_key="type"), cfg)
    files = {t.file.name for t in Checkpoint(path).tensors.values()}
    assert (len(files) > 1) == sharded
    stored = {t.dtype for t in Checkpoint(path).tensors.values()} - {"F32"} if dtype != "float32" else {"F32"}
    assert stored == {{"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]}
    assert_parity(path, [3, 1, 4, 1, 5, 9, 2, 6])


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_option_rounds_like_torch(tmp_path, family, dtype):
    """core.load(F32 files, dtype=...) rounds each weight exactly as torch's .to(dtype) does: same logits as
    transformers on the half-precision files that save_pretrained writes from the same model."""
    cfg = small(family, layers=2, hidden=32, vocab=128)
    full = hf.save_model(family, tmp_path / "f32", seed=3, **cfg)
    half = hf.save_model(family, tmp_path / dtype, seed=3, dtype=dtype, **cfg)
    model = core.load(full, dtype=dtype, device="cpu", quiet=True)
    ref = reference(half)
    ids = [5, 4, 3, 2, 1, 0, 7]
    assert hf.rel_err(model.logits(ids), hf.hf_logits(ref, ids)) < 1e-5
    assert model.generate(ids, max_new_tokens=GREEDY_TOKENS) == hf.hf_greedy(ref, ids, GREEDY_TOKENS)
    exact = core.load(full, device="cpu", quiet=True)
    assert hf.rel_err(exact.logits(ids), hf.hf_logits(ref, ids)) > 1e-4  # the rounding is visible at all


def test_starcoder2_sliding_window(tmp_path):
    """A window shorter than the sequence changes the logits, and archkit's windowed attention matches."""
    require_family("starcoder2")
    path = hf.save_model("starcoder2", tmp_path, **small("starcoder2", layers=2, kv_heads=1, sliding_window=4))
    model, _ = assert_parity(path, list(range(10)))
    f = path / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "sliding_window": None}))
    unwindowed = core.load(path, device="cpu", quiet=True)
    assert model.config.sliding_window == 4 and unwindowed.config.sliding_window is None
    ids = list(range(10))
    assert hf.rel_err(unwindowed.logits(ids), model.logits(ids)) > 1e-2


def test_sliding_window_of_one(tmp_path):
    """Each token attends to itself only. transformers 5.24's cached generate() disagrees with its own
    uncached forward at window 1, so the oracle here is greedy over the full forward, token by token."""
    require_family("starcoder2")
    path = hf.save_model("starcoder2", tmp_path, **small("starcoder2", kv_heads=1, sliding_window=1))
    ref = reference(path)
    model = core.load(path, device="cpu", quiet=True)
    ids = [1, 2, 3]
    for _ in range(GREEDY_TOKENS):
        ids.append(int(np.argmax(hf.hf_logits(ref, ids)[-1])))
    assert model.generate([1, 2, 3], max_new_tokens=GREEDY_TOKENS) == ids[3:]
    assert hf.rel_err(model.logits(ids), hf.hf_logits(ref, ids)) < TOL


def test_gpt2_legacy_names_have_no_prefix(tmp_path):
    """The legacy rewrite really produces the original upload's names (else the layout tests prove nothing)."""
    path = build(tmp_path, "gpt2", dict(layout="legacy", sharded=False, dtype="float32"), dict(hidden=16, heads=2, layers=1))
    names = set(Checkpoint(path).tensors)
    assert "wte.weight" in names and "h.0.attn.bias" in names and not any(n.startswith("transformer.") for n in names)


# --- detection and loading by name --------------------------------------------------------------------------------

def small(family: str, **kw) -> dict:
    base = dict(layers=1, hidden=16, heads=2, vocab=64, max_pos=64)
    if family == "qwen3":
        base["head_dim"] = 8
    return {**base, **kw}


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_from_config_json(tmp_path, family):
    require_family(family)
    path = hf.save_model(family, tmp_path, **small(family))
    model = core.load(path, device="cpu", quiet=True)
    assert model.spec.name == family
    assert model.detected.method == "config.json" and model.detected.score == 3  # architectures 2 + model_type 1
    assert all(s < 3 for n, s in model.detected.scores.items() if n != family)


@pytest.mark.parametrize("family,tie,layout", [(f, t, "hub") for f in FAMILIES for t in (False, True)]
                         + [("gpt2", True, "legacy"), ("gpt2", False, "legacy")])
def test_detect_from_tensor_names(tmp_path, family, tie, layout):
    """With config.json deleted, the tensor names alone pick the family among these four; among every
    registered family the answer is this one or an ambiguity naming it (Mistral's names are Llama's)."""
    require_family(family)
    path = hf.save_model(family, tmp_path, tie=tie, layout=layout, **small(family))
    if layout == "legacy":
        add_gpt2_mask_buffers(path, 64)  # ignored tensors must not count against the family
    (path / "config.json").unlink()
    four = Registry.discover(allow=FAMILIES)
    d = detect(Checkpoint(path), four)
    assert d.name == family and d.method == "tensor names"
    assert d.score > max(s for n, s in d.scores.items() if n != family)
    try:
        assert detect(Checkpoint(path), default_registry()).name == family
    except core.AmbiguousArchitectureError as e:
        assert f"{family} and " in str(e) or f" and {family} " in str(e)
    with pytest.raises(core.ConfigError, match=rf"config.json not found.*{family}"):
        core.load(path, device="cpu", quiet=True, registry=four)  # sizes still need config.json; the message says what it found


def test_load_by_plugin_name_skips_detection(tmp_path):
    """A llama checkpoint whose config.json names an architecture nobody registers loads with arch="llama"."""
    path = hf.save_model("llama", tmp_path, **small("llama", kv_heads=1))
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    f.write_text(json.dumps({**cfg, "architectures": ["MyLlamaForCausalLM"], "model_type": "my-llama"}))
    with pytest.raises(core.UnknownArchitectureError) as e:
        core.load(path, device="cpu", quiet=True)
    for name in core.architectures():  # no match lists every candidate with its score
        assert f"{name}=0" in str(e.value)
    assert "MyLlamaForCausalLM" in str(e.value) and isinstance(e.value, KeyError)
    model = core.load(path, arch="llama", device="cpu", quiet=True)
    assert model.detected is None and model.spec.name == "llama"
    f.write_text(json.dumps(cfg))  # transformers needs the real name; the weights are the same files
    ref = reference(path)
    assert hf.rel_err(model.logits([1, 2, 3, 4]), hf.hf_logits(ref, [1, 2, 3, 4])) < TOL


def test_unknown_arch_name(tmp_path):
    path = hf.save_model("gpt2", tmp_path, **small("gpt2"))
    with pytest.raises(core.UnknownArchitectureError, match=r"unknown architecture 'no-such-family'; registered: .*gpt2.*llama"):
        core.load(path, arch="no-such-family", device="cpu", quiet=True)


def twin_plugin(spec, name: str):
    """A plugin object registering `spec` again under the family name `name`."""
    import types

    mod = types.ModuleType(f"twin_{name}")

    @core.hookimpl
    def archkit_register_architectures(register):
        register(attrs.evolve(spec, name=name))

    mod.archkit_register_architectures = archkit_register_architectures
    return mod


def test_ambiguous_config_and_tensor_names(tmp_path):
    """Two families claiming the same checkpoint equally: an error naming both, never a silent first match."""
    reg = Registry.discover(entry_points=False, extra=[twin_plugin(default_registry()["llama"].spec, "llama-twin")])
    assert "llama-twin" in reg and not reg.broken
    path = hf.save_model("llama", tmp_path, **small("llama"))
    with pytest.raises(core.AmbiguousArchitectureError, match=r"llama and llama-twin match equally.*scores: .*pass arch="):
        core.load(path, device="cpu", quiet=True, registry=reg)
    assert core.load(path, arch="llama-twin", device="cpu", quiet=True, registry=reg).spec.name == "llama-twin"
    (path / "config.json").unlink()
    with pytest.raises(core.AmbiguousArchitectureError, match=r"llama and llama-twin.*by tensor names"):
        detect(Checkpoint(path), reg)


def test_no_match_by_tensor_names(tmp_path):
    path = hf.save_model("llama", tmp_path, **small("llama"))
    (path / "config.json").unlink()
    hf.rename_tensors(path, lambda n: n.replace("model.", "decoder."))
    with pytest.raises(core.UnknownArchitectureError, match=r"no registered architecture matches .*by tensor names.*candidates: .*gpt2=0"):
        detect(Checkpoint(path), default_registry())


# --- inputs: token ids and context ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_16(tmp_path_factory):
    """A GPT-2 with a 16-position context, and transformers' model of it."""
    path = hf.save_model("gpt2", tmp_path_factory.mktemp("gpt2_16"), **small("gpt2", max_pos=16, layers=2))
    return core.load(path, device="cpu", quiet=True), reference(path)


@pytest.mark.parametrize("bad", [[1, 64], [-1], [2, 3, 1000]])
def test_token_id_out_of_range(gpt2_16, bad):
    model, _ = gpt2_16
    wrong = [t for t in bad if not 0 <= t < 64][0]
    for call in (model.logits, lambda ids: model.generate(ids, max_new_tokens=2)):
        with pytest.raises(core.GenerationError, match=rf"token id {wrong} is out of range \[0, 64\)"):
            call(bad)


def test_context_boundary(gpt2_16):
    """Exactly max_position_embeddings positions work (and match transformers); one more is an error."""
    model, ref = gpt2_16
    ids = list(range(16))
    assert hf.rel_err(model.logits(ids), hf.hf_logits(ref, ids)) < TOL
    assert model.generate(ids[:10], max_new_tokens=6) == hf.hf_greedy(ref, ids[:10], 6)
    with pytest.raises(core.ContextOverflowError, match=r"a prompt of 17 tokens needs 17 positions but the model's context is 16"):
        model.logits(ids + [0])
    with pytest.raises(core.ContextOverflowError, match=r"max_new_tokens=7 needs 17 positions"):
        model.generate(ids[:10], max_new_tokens=7)
    assert isinstance(core.ContextOverflowError("x"), ValueError)


# --- sampling ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_gqa(tmp_path_factory):
    path = hf.save_model("llama", tmp_path_factory.mktemp("llama"), **small("llama", heads=4, kv_heads=2, layers=2, vocab=128))
    return core.load(path, device="cpu", quiet=True), reference(path)


def hf_warp(logits, seen, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """transformers' own processors, in generate()'s order, on float64 scores [V]."""
    import torch
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    scores = torch.as_tensor(np.asarray(logits, np.float64))[None]
    ids = torch.as_tensor(np.asarray(seen, np.int64))[None]
    procs = [RepetitionPenaltyLogitsProcessor(repetition_penalty)] if repetition_penalty != 1.0 else []
    procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    for p in procs:
        scores = p(ids, scores)
    return scores[0].numpy()


def ours_warp(logits, seen, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0):
    from core.sampling import SamplingParams, apply_repetition_penalty, warp

    params = SamplingParams(temperature, top_k, top_p, repetition_penalty).validate()
    return warp(apply_repetition_penalty(np.asarray(logits, np.float32), np.asarray(seen), repetition_penalty), params)


def softmax(x):
    p = np.exp(x - x.max())
    return p / p.sum()


SAMPLING = st.fixed_dictionaries({
    "temperature": st.floats(0.05, 4.0),
    "top_k": st.one_of(st.none(), st.integers(1, 40)),
    "top_p": st.one_of(st.none(), st.floats(0.05, 1.0)),
    "repetition_penalty": st.one_of(st.just(1.0), st.floats(0.5, 2.0)),
})


@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 64), params=SAMPLING,
       seen=st.lists(st.integers(0, 63), max_size=10))
def test_warps_match_transformers_processors(seed, vocab, params, seen):
    """Repetition penalty, temperature, top-k, top-p against transformers' LogitsProcessors on random logits."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
    assume(len(np.unique(logits)) == vocab)  # ties make top-k / top-p order-dependent in both implementations
    seen = [s % vocab for s in seen]
    theirs = hf_warp(logits, seen, **params)
    ours = ours_warp(logits, seen, **params)
    if params["top_p"] is not None:  # a cumulative mass within rounding of top_p is decided by summation order
        before_top_p = hf_warp(logits, seen, **{**params, "top_p": None})
        mass = np.cumsum(np.sort(softmax(before_top_p))[::-1])
        assume(np.min(np.abs(mass - params["top_p"])) > 1e-9)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    keep = np.isfinite(theirs)
    np.testing.assert_allclose(ours[keep], theirs[keep], rtol=1e-6, atol=1e-6)


def test_sample_distribution_matches_warped_softmax():
    """`sample` draws from softmax of the warped logits: frequencies over many draws (fixed seed)."""
    from core.sampling import SamplingParams, sample

    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 1.2], np.float32)
    seen = np.array([0, 7])
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3)
    want = softmax(hf_warp(logits, seen, 0.7, 5, 0.9, 1.3))
    rng = np.random.default_rng(1234)
    draws = np.bincount([sample(logits, params, rng, seen) for _ in range(6000)], minlength=8) / 6000
    assert np.all(draws[want == 0] == 0)
    np.testing.assert_allclose(draws, want, atol=0.025)


def test_seed_reproducible(llama_gqa):
    model, _ = llama_gqa
    kw = dict(max_new_tokens=GREEDY_TOKENS, temperature=1.5, top_k=50, top_p=0.95, seed=11)
    a = model.generate([1, 2, 3], **kw)
    assert a == model.generate([1, 2, 3], **kw) == list(model.stream([1, 2, 3], **kw))
    assert len(a) == GREEDY_TOKENS
    assert a != model.generate([1, 2, 3], **{**kw, "seed": 12})  # 24 draws at temperature 1.5 over 128 tokens
    assert model.generate([1, 2, 3], max_new_tokens=8, seed=1) == model.generate([1, 2, 3], max_new_tokens=8, seed=2)


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_greedy_matches_transformers(llama_gqa, penalty):
    """Greedy decoding with a repetition penalty over prompt + generated ids, token for token."""
    model, ref = llama_gqa
    prompt = [5, 6, 7, 5, 9]
    want = hf_generate(ref, prompt, GREEDY_TOKENS, repetition_penalty=penalty, min_new_tokens=GREEDY_TOKENS)
    assert want != hf.hf_greedy(ref, prompt, GREEDY_TOKENS)  # the penalty matters on this prompt
    assert model.generate(prompt, max_new_tokens=GREEDY_TOKENS, repetition_penalty=penalty) == want


@pytest.mark.parametrize("kw", [dict(temperature=0.8, top_k=1), dict(temperature=2.0, top_p=1e-6)])
def test_degenerate_sampling_is_greedy(llama_gqa, kw):
    model, ref = llama_gqa
    assert model.generate([4, 2], max_new_tokens=GREEDY_TOKENS, seed=3, **kw) == hf.hf_greedy(ref, [4, 2], GREEDY_TOKENS)


def test_sampled_tokens_lie_in_transformers_support(llama_gqa):
    """Every sampled token is one transformers' processors keep at that step (seen = prompt + generated)."""
    model, ref = llama_gqa
    prompt, kw = [8, 3, 8], dict(temperature=0.9, top_k=6, top_p=0.8, repetition_penalty=1.4)
    got = model.generate(prompt, max_new_tokens=GREEDY_TOKENS, seed=5, **kw)
    assert len(got) == GREEDY_TOKENS
    logits = hf.hf_logits(ref, prompt + got)
    for i, tok in enumerate(got):
        seen = prompt + got[:i]
        assert np.isfinite(hf_warp(logits[len(seen) - 1], seen, **kw)[tok]), f"token {i} ({tok}) is outside the support"


# --- EOS, stop strings, streaming text -----------------------------------------------------------------------------

def first_new_token(tokens, start=3):
    """(index, token): the first token at or after `start` that does not occur before it."""
    return next((i, t) for i, t in enumerate(tokens) if i >= start and t not in tokens[:i])


@pytest.mark.parametrize("where", ["generation_config.json", "config.json"])
def test_eos_stops_like_transformers(tmp_path, where):
    path = hf.save_model("llama", tmp_path, **small("llama", vocab=128, layers=2))
    ref = reference(path)
    prompt = [1, 2, 3]
    free = hf.hf_greedy(ref, prompt, GREEDY_TOKENS)
    i, eos = first_new_token(free)
    f = path / where
    cfg = json.loads(f.read_text()) if f.exists() else {}
    never = max(set(range(128)) - set(free))  # a second EOS id that greedy never produces
    eos_ids = [never, eos] if where == "config.json" else eos
    f.write_text(json.dumps({**cfg, "eos_token_id": eos_ids}))
    model = core.load(path, device="cpu", quiet=True)
    assert eos in model.eos_token_ids
    got = model.generate(prompt, max_new_tokens=GREEDY_TOKENS)
    assert got == hf_generate(ref, prompt, GREEDY_TOKENS, eos_token_id=eos_ids) == free[:i + 1]
    assert model.generate(prompt, max_new_tokens=GREEDY_TOKENS, stop_at_eos=False) == free


def test_stop_string_inside_a_long_token(tmp_path):
    """A stop string far from the end of one long token's text still stops generation at that token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = hf.save_model("llama", tmp_path, **small("llama", vocab=64, layers=2))
    free = hf.hf_greedy(reference(path), [1, 2], GREEDY_TOKENS)
    i, long_id = first_new_token(free, start=4)
    vocab = {f"t{n}": n for n in range(64)}
    vocab["STOP" + "y" * 100] = vocab.pop(f"t{long_id}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    model = core.load(path, device="cpu", quiet=True)
    assert model.generate([1, 2], max_new_tokens=GREEDY_TOKENS, stop=["STOP"]) == free[:i + 1]


BPE_VOCAB = 320
CORPUS_CHARS = "hello world héllo wörld naïve café 日本語のテキスト 中文 😀🎉👍🏽 🇫🇷 Ωμέγα e\u0301 ∑∫ über".split()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A directory with a byte-level BPE tokenizer.json trained on text full of multi-byte characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(CORPUS_CHARS, 12)) for _ in range(400)]
    tok.train_from_iterator(corpus, trainer)
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == BPE_VOCAB
    pieces = [tok.decode([i]) for i in range(BPE_VOCAB)]
    assert any("\ufffd" in p for p in pieces)  # tokens holding part of a character: the case under test
    assert any(len(p.encode()) == 4 and "\ufffd" not in p for p in pieces)  # and merges that complete an emoji
    return d


def sentencepiece_style(d: Path) -> Path:
    """A Llama-2-style tokenizer.json: "▁" for spaces, BPE with byte fallback (<0xNN> pieces for characters
    outside the vocabulary), and a decoder that strips the leading space: windows must keep spaces right."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40,
                                  show_progress=False)
    tok.train_from_iterator(["hello world the cat sat on the mat", "a  b   c", "héllo wörld 😀 日本"] * 50, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    (d / "tokenizer.json").write_text(json.dumps(data))
    return d


@pytest.fixture(scope="module", params=["byte-level BPE", "sentencepiece-style"])
def any_tokenizer(request, bpe_dir, tmp_path_factory):
    """(kind, core.tokenizer.Tokenizer) for each kind of tokenizer.json under test."""
    d = bpe_dir if request.param == "byte-level BPE" else sentencepiece_style(tmp_path_factory.mktemp("sp"))
    return request.param, core.tokenizer.Tokenizer.from_dir(d, required=True)


TEXT = st.lists(st.sampled_from(list("ab é日😀👍🏽🇫\u0301Ω∑\n\x00") + ["🎉", "ö", "  ", "hello", " the"]),
                max_size=25).map("".join)


@given(text=TEXT)
def test_incremental_detokenization_of_real_text(any_tokenizer, text):
    """Streaming the ids of real text: every delta is whole UTF-8 (no U+FFFD) and they add up to the text."""
    _, tok = any_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    dec = tok.stream()
    deltas = [dec.push(i) for i in ids]
    tail = dec.flush()
    for d in deltas + [tail]:
        assert "\ufffd" not in d
        d.encode("utf-8")  # no lone surrogates
    assert "".join(deltas) + tail == tok.decode(ids) == text


@given(data=st.data())
def test_incremental_detokenization_of_any_ids(any_tokenizer, data):
    """Any id sequence: once the full decode is valid text, the stream adds up to exactly it, and every
    emitted prefix is a prefix of it. (Invalid bytes are different for byte fallback: tokenizers turns
    a whole run of <0xNN> pieces into U+FFFDs once any byte in it is invalid, so a later token rewrites
    text already emitted; for byte-level BPE the prefix property holds even then.)"""
    kind, tok = any_tokenizer
    exact = kind == "byte-level BPE"
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30), label="ids")
    full = tok.decode(ids)
    dec, out = tok.stream(), ""
    for i in ids:
        out += dec.push(i)
        if exact or "\ufffd" not in full:
            assert full.startswith(out)
    out += dec.flush()
    if exact or "\ufffd" not in full:
        assert out == full


@pytest.fixture(scope="module")
def bpe_model(bpe_dir, tmp_path_factory):
    """A llama whose vocabulary is the BPE tokenizer's, with tokenizer.json beside the weights."""
    import shutil

    path = tmp_path_factory.mktemp("bpe_llama")
    hf.save_model("llama", path, **small("llama", vocab=BPE_VOCAB, layers=2, max_pos=128, hidden=32))
    shutil.copy(bpe_dir / "tokenizer.json", path / "tokenizer.json")
    return core.load(path, device="cpu", quiet=True), reference(path)


def test_generate_text_streams_full_decode(bpe_model):
    model, ref = bpe_model
    tok = model.tokenizer
    prompt = "héllo 😀 wörld"
    want = hf.hf_greedy(ref, tok.encode(prompt), GREEDY_TOKENS)
    pieces = list(model.stream_text(prompt, max_new_tokens=GREEDY_TOKENS))
    assert "".join(pieces) == tok.decode(want)
    assert all(p for p in pieces)


def test_stop_strings(bpe_model):
    """Generation stops at the token that completes a stop string; text output cuts the stop string off."""
    model, ref = bpe_model
    tok = model.tokenizer
    checked = 0
    for prompt in ("héllo", "😀 ab", "日本", "wörld café", "x", "Ωμ"):
        ids = tok.encode(prompt)
        free = hf.hf_greedy(ref, ids, GREEDY_TOKENS)
        for j in range(2, GREEDY_TOKENS):
            stop = tok.decode([free[j]]).strip()
            if not (stop.isascii() and stop.isprintable() and stop):
                continue
            i = next(i for i in range(GREEDY_TOKENS) if stop in tok.decode(free[:i + 1]))
            full = tok.decode(free[:i + 1])
            if i < 1 or full.endswith("\ufffd"):  # a stop string beside a half-decoded character: ambiguous
                continue
            assert model.generate(ids, max_new_tokens=GREEDY_TOKENS, stop=["\x00never", stop]) == free[:i + 1]
            assert model.generate_text(prompt, max_new_tokens=GREEDY_TOKENS, stop=[stop]) == full[:full.find(stop)]
            checked += 1
            break
    assert checked >= 2, "too few usable stop strings in the greedy outputs"


@pytest.mark.parametrize("scaling", [
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0, "beta_slow": 2.0,
     "attention_factor": 1.3},
])
def test_length_dependent_rope_in_generation(tmp_path, scaling):
    """Dynamic NTK (its table grows past the original context, step by step in transformers' generate) and YaRN
    (its cos/sin attention factor), through prefill, decode and greedy tokens past the original context."""
    # dynamic engages past max_position_embeddings (archkit allows factor times it); YaRN past its original context
    max_pos = 16 if scaling["rope_type"] == "dynamic" else 64
    path = hf.save_model("llama", tmp_path, layers=2, hidden=32, heads=4, kv_heads=2, vocab=128, max_pos=max_pos,
                         rope_scaling=scaling, seed=5)
    model, ref = assert_parity(path, list(range(3, 15)), n=GREEDY_TOKENS)  # 12 + 24 positions
    assert model.config.rope.type == scaling["rope_type"] == ref.config.rope_parameters["rope_type"]
    if scaling["rope_type"] == "dynamic":
        assert model.config.context_limit == 64
        r = model.config.rope
        assert r.table(8, 36).inv_freq[-1] != r.table(8, 16).inv_freq[-1]  # the grown base was really used
