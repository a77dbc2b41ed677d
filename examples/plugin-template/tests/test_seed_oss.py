"""Parity of the seed_oss plugin with transformers' SeedOssForCausalLM: same logits, same greedy tokens.

Every test builds a small random model with transformers, saves it with save_pretrained (the exact hub
layout), and loads the same directory with archkit. Run: pip install -e '.[test]' && pytest tests/
"""

import numpy as np
import pytest

import core

torch = pytest.importorskip("torch", reason="torch + transformers (the parity oracle) are not installed")
transformers = pytest.importorskip("transformers", reason="torch + transformers (the parity oracle) are not installed")

BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, intermediate_size=96, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
VARIANTS = {
    "defaults": {},  # q/k/v bias on, o bias off, untied
    "all-biases-tied": dict(attention_out_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "no-bias-mha": dict(attention_bias=False, num_key_value_heads=4, head_dim=16),
    "rope-theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


@pytest.fixture(autouse=True)
def registered():
    if "seed_oss" not in core.architectures():
        pytest.fail("family 'seed_oss' is not registered: install this plugin first (pip install -e examples/plugin-template)")


def save_random(path, dtype=torch.float32, **overrides):
    """A random SeedOssForCausalLM saved to `path`. Every parameter is drawn at random — biases too,
    which transformers initialises to zero (so a bias archkit forgot to add would go unnoticed)."""
    cfg = transformers.SeedOssConfig(**{**BASE, **overrides})
    torch.manual_seed(0)
    model = transformers.SeedOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    return path


def reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_entry_point_provides_the_family():
    entry = core.default_registry()["seed_oss"]
    assert entry.distribution == "archkit-seed-oss" and entry.spec.name == "seed_oss"


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(tmp_path, variant):
    path = save_random(tmp_path, **VARIANTS[variant])
    model = core.load(path, device="cpu", quiet=True)  # family detected from config.json
    assert model.spec.name == "seed_oss"
    ids = np.random.default_rng(1).integers(0, BASE["vocab_size"], 40)
    with torch.no_grad():
        want = reference(path)(torch.as_tensor(ids)[None]).logits[0].numpy()
    got = model.logits(ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_match_transformers(tmp_path, dtype):
    path = save_random(tmp_path, dtype=dtype)
    prompt = [5, 17, 42, 99]
    t = torch.tensor([prompt])
    with torch.no_grad():
        want = reference(path).generate(t, attention_mask=torch.ones_like(t), max_new_tokens=24, do_sample=False,
                                        pad_token_id=0)[0, len(prompt):].tolist()
    assert core.load(path, device="cpu", quiet=True).generate(prompt, max_new_tokens=24) == want


def test_null_kv_heads_means_one_per_query_head(tmp_path):
    """SeedOssConfig reads num_key_value_heads: null as num_attention_heads (absent means 8): an MHA model whose
    config.json says null loads as MHA and matches transformers."""
    import json

    path = save_random(tmp_path, num_key_value_heads=4, head_dim=16)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_key_value_heads"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    model = core.load(path, device="cpu", quiet=True)
    assert model.config.num_kv_heads == 4
    ids = np.random.default_rng(2).integers(0, BASE["vocab_size"], 24)
    with torch.no_grad():
        want = reference(path)(torch.as_tensor(ids)[None]).logits[0].numpy()
    assert np.linalg.norm(model.logits(ids) - want) / np.linalg.norm(want) < 1e-4


def test_a_missing_bias_is_reported_by_name(tmp_path):
    """config.json says attention_out_bias, the tensors lack it: a WeightsError that names the tensors."""
    import json

    path = save_random(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "attention_out_bias": True}))
    with pytest.raises(core.WeightsError, match=r"2 missing: model\.layers\.0\.self_attn\.o_proj\.bias"):
        core.load(path, device="cpu", quiet=True)
