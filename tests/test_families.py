"""The in-tree families beyond the first three, against transformers as the oracle (issue 7).

For each family: random-init models of its transformers class, saved in hub layout by save_pretrained,
over hypothesis-drawn config variations; archkit (numpy backend, fp32) must give the same logits
(‖a−b‖/‖b‖ < 1e-4) and the same 20 greedy tokens as transformers' generate. Detection is checked from
config.json and from tensor names alone.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import core
from core.checkpoint import Checkpoint
from core.detect import detect
from core.errors import AmbiguousArchitectureError, ConfigError
from core.model import forward

from conftest import needs_torch
from hfmodels import hf_greedy, hf_logits, hf_reference, rel_err, save_model

pytestmark = needs_torch

TOL = 1e-4  # fp32 logits, relative
NEW = 20  # greedy tokens compared


def assert_parity(family: str, ckpt: Path, ids, arch: str | None = None) -> float:
    """Logits (prefill and decode) and greedy tokens of archkit vs transformers on the same files.

    Returns the prefill logits error.
    """
    ref = hf_reference(ckpt)
    model = core.load(ckpt, arch=arch, device="cpu", quiet=True)
    assert model.spec.name == family
    err = rel_err(model.logits(ids), hf_logits(ref, ids))
    assert err < TOL, f"{family}: logits relative error {err:.2e} >= {TOL:g}"
    # The decode path on its own: NEW more tokens fed one at a time through the KV cache, compared with
    # transformers' full forward. (Greedy alone can be blind here: tied models often repeat one token.)
    longer = list(ids) + prompt(len(ids), NEW, model.config.vocab_size)
    dec = rel_err(cached_logits(model, longer, len(ids)), hf_logits(ref, longer))
    assert dec < TOL, f"{family}: decode logits relative error {dec:.2e} >= {TOL:g}"
    assert model.generate(ids, max_new_tokens=NEW, stop_at_eos=False) == hf_greedy(ref, ids, NEW)
    return err


def cached_logits(model, ids, n_prompt: int) -> np.ndarray:
    """Logits [len(ids), V]: ids[:n_prompt] in one prefill, then the rest one token at a time."""
    c, be = model.config, model.backend
    cache = be.new_cache(c, len(ids))
    run = lambda part, start: forward(be, model.weights, c, np.asarray(part), cache, start, model.inv_freq, all_logits=True)
    return np.concatenate([run(ids[:n_prompt], 0)] + [run(ids[p:p + 1], p) for p in range(n_prompt, len(ids))])


def prompt(seed: int, n: int, vocab: int = 256) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def without_config(ckpt: Path, dest: Path) -> Path:
    """A copy of the checkpoint's tensors only (no config.json): detection must go by tensor names."""
    dest.mkdir()
    for f in ckpt.glob("*.safetensors*"):
        shutil.copy(f, dest / f.name)
    return dest


def detect_dir(path: Path):
    # The in-tree families only: an installed out-of-tree plugin with the same tensor names (the Seed-OSS
    # template) would rightly make these checkpoints ambiguous by tensor names.
    return detect(Checkpoint(path), IN_TREE())


@functools.lru_cache(maxsize=1)
def IN_TREE():
    return core.Registry.discover(entry_points=False)


# Hypothesis strategies over the configs, grouped in one place.
class S:
    heads = st.sampled_from([(4, 4), (4, 2), (4, 1), (8, 2)])  # (attention heads, key/value heads)
    layers = st.integers(1, 3)
    hidden = st.sampled_from([32, 64])
    theta = st.sampled_from([10000.0, 1e6])
    seed = st.integers(0, 2**16)


FEW = settings(max_examples=4)  # each example builds, saves and runs two models; keep the file fast


def build(family: str, tmp: str, *, layers, heads, hidden, seed, **kw) -> Path:
    h, kv = heads
    return save_model(family, Path(tmp) / family, layers=layers, heads=h, kv_heads=kv, hidden=hidden, seed=seed,
                      norm_noise=0.3, **kw)


# -- Qwen2 / Qwen2.5 -----------------------------------------------------------------------------------

@FEW
@given(layers=S.layers, heads=S.heads, hidden=S.hidden, tie=st.booleans(), theta=S.theta, seed=S.seed)
def test_qwen2_parity(layers, heads, hidden, tie, theta, seed):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build("qwen2", tmp, layers=layers, heads=heads, hidden=hidden, seed=seed, tie=tie, rope_theta=theta)
        names = Checkpoint(ckpt).tensors
        assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.0.self_attn.o_proj.bias" not in names
        assert_parity("qwen2", ckpt, prompt(seed, 16))


def test_qwen2_detection(tmp_path):
    ckpt = save_model("qwen2", tmp_path / "q", tie=True)
    assert detect_dir(ckpt).name == "qwen2" and detect_dir(ckpt).method == "config.json"
    bare = detect_dir(without_config(ckpt, tmp_path / "bare"))
    assert (bare.name, bare.method) == ("qwen2", "tensor names")
    assert bare.scores["qwen2"] > bare.scores["llama"] > 0  # llama explains the q/k/v biases only by a flag


def test_qwen2_rejects_sliding_window(tmp_path):
    ckpt = save_model("qwen2", tmp_path / "q")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True, "sliding_window": 8}))
    with pytest.raises(ConfigError, match="use_sliding_window=True is not supported by plugin 'qwen2'"):
        core.load(ckpt, device="cpu", quiet=True)


# -- SmolLM2 / Llama-3.2 style: the llama plugin, no new code --------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@FEW
@given(layers=S.layers, heads=S.heads, seed=S.seed, layout=st.sampled_from(["hub", "legacy"]))
def test_smollm2_style_llama_parity(layers, heads, seed, layout):
    # SmolLM2 / Llama-3.2 as shipped: tied embeddings (no lm_head tensor), GQA, llama3 rope scaling, theta 5e5.
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build("llama", tmp, layers=layers, heads=heads, hidden=64, seed=seed, tie=True, rope_theta=500000.0,
                     rope_scaling=LLAMA3, layout=layout)
        assert "lm_head.weight" not in Checkpoint(ckpt).tensors
        assert core.load(ckpt, device="cpu", quiet=True).config.rope.type == "llama3"
        assert_parity("llama", ckpt, prompt(seed, 100))  # past original_max_position_embeddings


# -- Mistral: sliding-window attention -------------------------------------------------------------------

@FEW
@given(layers=S.layers, heads=S.heads, window=st.integers(2, 9), n=st.integers(10, 30), seed=S.seed)
def test_mistral_parity(layers, heads, window, n, seed):
    # Prompt and generation both run past the window, so prefill masks and decode steps both slide.
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build("mistral", tmp, layers=layers, heads=heads, hidden=64, seed=seed, sliding_window=window)
        assert core.load(ckpt, device="cpu", quiet=True).config.window(0) == window
        assert_parity("mistral", ckpt, prompt(seed, n))


def test_mistral_window_matters(tmp_path):
    # The same weights without the window give other logits: the parity test would notice a window ignored.
    ckpt = save_model("mistral", tmp_path / "m", sliding_window=4, norm_noise=0.3)
    ids = prompt(1, 24)
    ref = hf_logits(hf_reference(ckpt), ids)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "sliding_window": None}))  # v0.2-style null: no window
    model = core.load(ckpt, device="cpu", quiet=True)
    assert model.config.window(0) is None
    assert rel_err(model.logits(ids), ref) > 100 * TOL
    assert rel_err(model.logits(ids[:4]), ref[:4]) < TOL  # within the window nothing changes


def test_mistral_detection_is_ambiguous_by_tensor_names(tmp_path):
    ckpt = save_model("mistral", tmp_path / "m", sliding_window=8)
    assert detect_dir(ckpt).name == "mistral"
    # Mistral's tensor names are Llama's: without config.json the two tie, and that is an error naming both.
    for src in (ckpt, save_model("llama", tmp_path / "l")):
        with pytest.raises(AmbiguousArchitectureError, match=r"llama and mistral match equally .*by tensor names"):
            detect_dir(without_config(src, tmp_path / f"bare-{src.name}"))


def test_mistral_sliding_window_null_vs_missing(tmp_path):
    # null is an explicit "no window"; a missing key means MistralConfig's default, as transformers reads it.
    import transformers

    ckpt = save_model("mistral", tmp_path / "m", sliding_window=8)
    cfg = json.loads((ckpt / "config.json").read_text())
    for value in (None, "missing"):
        edited = {k: v for k, v in cfg.items() if k != "sliding_window" or value != "missing"}
        if value is None:
            edited["sliding_window"] = None
        (ckpt / "config.json").write_text(json.dumps(edited))
        expected = transformers.AutoConfig.from_pretrained(ckpt).sliding_window
        assert core.load(ckpt, device="cpu", quiet=True).config.window(0) == expected
        assert expected == (None if value is None else 4096)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "4096"])
def test_mistral_rejects_bad_sliding_window(tmp_path, bad):
    ckpt = save_model("mistral", tmp_path / "m", sliding_window=8)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "sliding_window": bad}))
    with pytest.raises(ConfigError, match="sliding_window=.* must be a positive integer or null"):
        core.load(ckpt, device="cpu", quiet=True)


# -- Phi-3: fused qkv_proj and gate_up_proj ---------------------------------------------------------------

@FEW
@given(layers=S.layers, heads=S.heads, hidden=S.hidden, tie=st.booleans(), window=st.sampled_from([None, 5]),
       layout=st.sampled_from(["hub", "legacy"]), seed=S.seed)
def test_phi3_parity(layers, heads, hidden, tie, window, layout, seed):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build("phi3", tmp, layers=layers, heads=heads, hidden=hidden, seed=seed, tie=tie, sliding_window=window,
                     layout=layout)
        names = Checkpoint(ckpt).tensors
        assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
        assert_parity("phi3", ckpt, prompt(seed, 14))


def test_phi3_detection(tmp_path):
    ckpt = save_model("phi3", tmp_path / "p")
    assert detect_dir(ckpt).name == "phi3"
    bare = detect_dir(without_config(ckpt, tmp_path / "bare"))
    assert (bare.name, bare.method) == ("phi3", "tensor names")
    assert all(s == 0 for n, s in bare.scores.items() if n != "phi3")  # nobody else has qkv_proj


@FEW
@given(partial=st.sampled_from([1.0, 0.75, 0.5]), longrope=st.booleans(), seed=S.seed)
def test_phi3_longrope_and_partial_rotary(partial, longrope, seed):
    """Phi-3 128k's LongRoPE (short factors up to original_max_position_embeddings, long factors past it, and the
    attention factor) and Phi-4-mini's partial rotary, through prefill, decode and greedy generation that cross
    the short/long boundary (original_max_position_embeddings 8, 12 prompt tokens, 20 generated)."""
    head_dim = 16
    rot = int(head_dim * partial) // 2
    rng = np.random.default_rng(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}
    if longrope:
        rope.update(rope_type="longrope", short_factor=(1 + rng.random(rot)).tolist(),
                    long_factor=(1 + 4 * rng.random(rot)).tolist(), original_max_position_embeddings=8)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build("phi3", tmp, layers=2, heads=(4, 2), hidden=64, seed=seed, max_pos=64, rope_parameters=rope)
        if longrope:  # Phi3Config keeps original_max_position_embeddings at the top level too
            cfg = json.loads((ckpt / "config.json").read_text())
            assert cfg["rope_parameters"]["rope_type"] == "longrope"
        assert_parity("phi3", ckpt, prompt(seed, 12))


# -- Gemma 2: scaled embeddings, (1 + w) norms, sandwich norms, soft-capping, local/global layers -----------

LAYER_KINDS = ("sliding_attention", "full_attention")


@st.composite
def gemma2_configs(draw):
    layers = draw(st.integers(1, 4))
    return dict(
        layers=layers, heads=draw(S.heads), hidden=draw(S.hidden), head_dim=draw(st.sampled_from([8, 16, 32])),
        tie=draw(st.booleans()), rope_theta=draw(S.theta), sliding_window=draw(st.integers(2, 8)),
        # None: Gemma2Config's own alternation (sliding, full, ...); else an arbitrary per-layer list
        layer_types=draw(st.none() | st.lists(st.sampled_from(LAYER_KINDS), min_size=layers, max_size=layers)),
        attn_logit_softcapping=draw(st.sampled_from([None, 50.0, 2.0])),
        final_logit_softcapping=draw(st.sampled_from([None, 30.0, 3.0])),
        query_pre_attn_scalar=draw(st.sampled_from([256, 24, 8])))


@FEW
@given(cfg=gemma2_configs(), n=st.integers(10, 24), seed=S.seed)
def test_gemma2_parity(cfg, n, seed):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build("gemma2", tmp, seed=seed, **cfg)
        c = core.load(ckpt, device="cpu", quiet=True).config
        hf = json.loads((ckpt / "config.json").read_text())
        assert list(c.layer_types) == hf["layer_types"]
        assert (c.attn_softcap, c.logit_softcap) == (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"])
        assert_parity("gemma2", ckpt, prompt(seed, n))


def test_gemma2_without_layer_types_alternates(tmp_path):
    # Hub config.json files of the released Gemma 2 models predate layer_types: even layers slide, odd are global.
    ckpt = save_model("gemma2", tmp_path / "g", layers=3, head_dim=16, sliding_window=3, norm_noise=0.3)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "layer_types"}))
    c = core.load(ckpt, device="cpu", quiet=True).config
    assert [c.window(i) for i in range(3)] == [3, None, 3]
    assert_parity("gemma2", ckpt, prompt(2, 16))


def test_gemma2_detection(tmp_path):
    ckpt = save_model("gemma2", tmp_path / "g", head_dim=16)
    assert detect_dir(ckpt).name == "gemma2"
    bare = detect_dir(without_config(ckpt, tmp_path / "bare"))
    assert (bare.name, bare.method) == ("gemma2", "tensor names")
    assert bare.score > max(s for n, s in bare.scores.items() if n != "gemma2")


@pytest.mark.parametrize("edit,message", [
    ({"layer_types": ["full_attention"]}, "layer_types has 1 entries for num_hidden_layers=2"),
    ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types=.* is not supported"),
    ({"attn_logit_softcapping": -1.0}, "attn_logit_softcapping=-1.0 must be a positive number or null"),
    ({"final_logit_softcapping": 0}, "final_logit_softcapping=0 must be a positive number or null"),
    ({"query_pre_attn_scalar": "256"}, "attn_scalar='256' must be a positive number or null"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True is not supported by plugin 'gemma2'"),
])
def test_gemma2_rejects_bad_config(tmp_path, edit, message):
    ckpt = save_model("gemma2", tmp_path / "g", head_dim=16)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ConfigError, match=message):
        core.load(ckpt, device="cpu", quiet=True)
