"""The out-of-tree plugin that ships its own op (issue 14 §2): tests/plugins/archkit_xielu, the Apertus family,
whose MLP activation xIELU core lacks. Its MLP function composes backend ops and be.custom(XIELU, ...), with the
activation's learned parameters as extra roles; XIELU is a numpy reference plus xielu.cu.

- CPU: the plugin is a separate distribution found through its entry point, with its .cu installed beside it;
  the reference equals transformers' XIELUActivation; random Apertus models of transformers' own class give the
  same logits (prefill, and decode through the KV cache) and greedy tokens on the numpy backend; other
  activations are refused; the .cu compiles with nvcc for sm_80 and sm_90 (core.testing.compile_op).
- GPU (marked gpu): the kernel against the reference (core.testing.check_op), and a model on the CUDA backend,
  its decode steps captured as CUDA graphs, against the numpy backend.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import core
from conftest import needs_torch
from core import testing
from core.custom_ops import registered
from test_families import assert_parity, cached_logits, prompt, without_config

REPO = Path(__file__).resolve().parents[1]
INSTALL = "pip install ./tests/plugins/archkit_xielu"


def plugin():
    """The installed plugin module (found through its entry point), or a failure saying how to install it."""
    eps = [ep for ep in md.entry_points(group="archkit") if ep.name == "apertus"]
    if not eps:
        pytest.fail(f"the archkit-xielu test plugin is not installed in this environment: {INSTALL}")
    return eps[0].load()


def save(path: Path, *, seed: int = 0, layers: int = 2, heads=(4, 2), tie: bool = False, bias: bool = False,
         beta_noise: float = 0.0, **cfg) -> Path:
    """A random ApertusForCausalLM saved with save_pretrained: norms and xIELU's alpha_p / alpha_n perturbed per
    layer (they init to the same value in every layer), beta too when beta_noise."""
    import torch
    import transformers

    rope = {"rope_type": "llama3", "rope_theta": 12e6, "factor": 8.0, "original_max_position_embeddings": 16,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    config = transformers.ApertusConfig(**{
        "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": heads[0],
        "num_key_value_heads": heads[1], "intermediate_size": 48, "max_position_embeddings": 128,
        "initializer_range": 0.15, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "tie_word_embeddings": tie, "attention_bias": bias, "rope_parameters": rope, **cfg})
    torch.manual_seed(seed)
    model = transformers.ApertusForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "alpha" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("act_fn.beta"):
                b.add_(torch.randn_like(b) * beta_noise)
    model.save_pretrained(path)
    return path


# --- the distribution -------------------------------------------------------------------------------------------
def test_is_a_separate_distribution_with_its_cu_installed():
    mod = plugin()
    ep = next(ep for ep in md.entry_points(group="archkit") if ep.name == "apertus")
    assert (ep.value, ep.dist.name) == ("archkit_xielu", "archkit-xielu")
    assert 'apertus = "archkit_xielu"' in (REPO / "tests/plugins/archkit_xielu/pyproject.toml").read_text()
    src = Path(mod.XIELU.cuda_source)
    assert src == Path(mod.__file__).with_name("xielu.cu") and src.is_file()
    reg = core.Registry.discover()
    assert reg["apertus"].distribution == "archkit-xielu" and registered(reg)["apertus.xielu"] is mod.XIELU
    assert reg["apertus"].spec.ops == (mod.XIELU,) and reg["apertus"].spec.mlp_block is mod.mlp


def test_plugin_stays_small():
    """A pure plugin: at most 100 lines of Python, plus its .cu."""
    lines = len(Path(plugin().__file__).read_text().splitlines())
    assert lines <= 100, lines


# --- the reference and the family on the numpy backend ----------------------------------------------------------
@needs_torch
@settings(max_examples=20)
@given(x=testing.arrays(testing.shapes(1, 2, 200), scale=4.0), ap=st.floats(-3, 25), an=st.floats(-3, 25),
       beta=st.floats(0.1, 1.0), dtype=st.sampled_from(["float32", "float64"]))
def test_reference_equals_transformers(x, ap, an, beta, dtype):
    """XIELU.reference against transformers' XIELUActivation._xielu_python (softplus past its threshold of 20
    too), in float32 and float64, with values around 0 and around eps."""
    import torch
    from transformers.activations import XIELUActivation

    x = np.concatenate([x.ravel(), [0.0, -1e-6, -2e-6, -5e-7, 1e-7]]).astype(dtype)
    act = XIELUActivation(beta=beta, dtype=getattr(torch, dtype))
    with torch.no_grad():
        act.alpha_p.fill_(ap)
        act.alpha_n.fill_(an)
        want = act._xielu_python(torch.from_numpy(x)).numpy()
    params = [p.detach().numpy() for p in (act.alpha_p, act.alpha_n, act.beta, act.eps)]
    got = plugin().XIELU.reference(x, *params)
    assert got.dtype == x.dtype
    # to a few units in the last place of the terms summed: the negative branch cancels (beta x against
    # alpha_n (expm1(x) - x)), and torch's expm1 need not round as numpy's does
    x64, e = np.abs(x.astype(np.float64)), abs(float(params[3]))
    terms = np.logaddexp(0, ap) * x64 ** 2 + beta * x64 + (beta + np.logaddexp(0, an)) * (2 * x64 + e)
    assert np.all(np.abs(got.astype(np.float64) - want) <= 8 * np.finfo(dtype).eps * terms + 1e-300)


@needs_torch
@settings(max_examples=4)
@given(layers=st.integers(1, 3), heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]), tie=st.booleans(),
       bias=st.booleans(), beta_noise=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**16))
def test_apertus_parity(layers, heads, tie, bias, beta_noise, seed):
    plugin()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save(Path(tmp) / "apertus", seed=seed, layers=layers, heads=heads, tie=tie, bias=bias,
                    beta_noise=beta_noise)
        assert_parity("apertus", ckpt, prompt(seed, 20, 96))  # 20 + 20 positions: past original_max (16)


@needs_torch
def test_the_activation_and_its_parameters_matter(tmp_path):
    """The same weights with another layer's alpha (or llama's SiLU MLP) give other logits: the parity above
    would notice xIELU or its per-layer parameters ignored."""
    from hfmodels import hf_logits, hf_reference, rel_err
    from safetensors.numpy import load_file, save_file

    plugin()
    ckpt = save(tmp_path / "a", seed=1, layers=2)
    ids = list(range(1, 17))
    ref = hf_logits(hf_reference(ckpt), ids)
    assert rel_err(core.load(ckpt, device="cpu", quiet=True).logits(ids), ref) < 1e-4
    t = load_file(ckpt / "model.safetensors")
    t["model.layers.1.mlp.act_fn.alpha_p"] = t["model.layers.0.mlp.act_fn.alpha_p"]
    save_file(t, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert rel_err(core.load(ckpt, device="cpu", quiet=True).logits(ids), ref) > 1e-3


@needs_torch
def test_other_activations_are_refused(tmp_path):
    plugin()
    ckpt = save(tmp_path / "a")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "hidden_act": "silu"}))
    with pytest.raises(core.ConfigError, match=r"hidden_act='silu' is not supported by plugin 'apertus' \(supported: \['xielu'\]\)"):
        core.load(ckpt, device="cpu", quiet=True)


@needs_torch
def test_detected_from_config_and_from_tensor_names(tmp_path):
    plugin()
    ckpt = save(tmp_path / "a")
    assert core.load(ckpt, device="cpu", quiet=True).detected.name == "apertus"
    bare = without_config(ckpt, tmp_path / "bare")
    from core.checkpoint import Checkpoint
    from core.detect import detect

    assert detect(Checkpoint(bare), core.default_registry()).name == "apertus"  # act_fn.* and the norm names


# --- the kernel -------------------------------------------------------------------------------------------------
def test_kernel_compiles_for_sm80_and_sm90():
    """CI (nvcc, no GPU): xielu.cu as the runtime builds it, for every weight type; skipped without nvcc."""
    assert len(testing.compile_op(plugin().XIELU)) == 6


def xielu_args():
    """(x, alpha_p, alpha_n, beta, eps): activations of awkward shapes (and sizes past one grid of 8,192 blocks of
    256), the parameters around their trained values, beta and eps as the checkpoints store them."""
    x = testing.arrays(st.one_of(testing.shapes(1, 3), st.just((2, 1_100_000))), scale=4.0)
    alpha = testing.arrays((1,), scale=1.5)
    return st.tuples(x, alpha, alpha, st.floats(0.3, 0.7).map(np.float32), st.just(np.float32(-1e-6)))


@pytest.mark.gpu
def test_kernel_on_the_gpu():
    """xielu.cu against XIELU.reference (float64) on the same inputs, the parameters stored in each weight type;
    computed in float32 from them, so held to core.testing.EXACT; unwritten outputs would be NaN (poison)."""
    testing.check_op(plugin().XIELU, xielu_args(), weights=(1, 2, 3, 4), tol=testing.EXACT)


@pytest.mark.gpu
@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_on_the_gpu(dtype, tmp_path):
    """A model on the CUDA backend (decode steps captured as CUDA graphs, the custom kernel among them) against
    the numpy backend with the same rounded weights: logits, and greedy tokens picked on the GPU."""
    from hfmodels import rel_err

    testing.require_gpu()
    plugin()
    # bf16: transformers' default init (see test_cuda_parity.HALF_INIT), as the GPU also rounds GEMM operands
    ckpt = save(tmp_path / "a", seed=5, layers=3, **({} if dtype == "float32" else {"initializer_range": 0.02}))
    ids = prompt(5, 24, 96)
    cpu = core.load(ckpt, device="cpu", dtype=dtype, quiet=True)
    gpu = core.load(ckpt, device="cuda", dtype=dtype, quiet=True)
    try:
        tol = {"float32": 1e-4, "bfloat16": 2e-2}[dtype]
        assert rel_err(gpu.logits(ids), cpu.logits(ids)) < tol
        longer = ids + prompt(6, 12, 96)
        with gpu.backend.session():
            assert rel_err(cached_logits(gpu, longer, len(ids)), cpu.logits(longer)) < tol
        if dtype == "float32":  # through decode_ids: CUDA graphs, ids picked on the GPU
            want = cpu.generate(ids, max_new_tokens=24, stop_at_eos=False)
            assert gpu.generate(ids, max_new_tokens=24, stop_at_eos=False) == want
    finally:
        gpu.backend.release(gpu.weights)
