"""The shipped demo models (core/data/demo/<arch>/, trained by tools/train_demo.py) against transformers.

For each: archkit's perplexity on held-out text (stdlib modules the training never saw) equals
transformers' within 1%, the model is clearly trained (far below the uniform perplexity of 4096), and
greedy generation gives the same tokens, EOS included.
"""

import inspect
import math

import numpy as np
import pytest

import core
from conftest import needs_torch
from core.demo import DATA, demo_checkpoint

ARCHS = ("gpt2", "llama", "qwen3")
HELD_OUT = ("textwrap", "fractions", "statistics")  # = tools/train_demo.py HELD_OUT
PROMPTS = ("Return the number of", "def read_file(path):\n", "class Stack:\n    \"\"\"")


def held_out_windows(tokenizer, n: int = 256, whole: bool = False) -> list[list[int]]:
    """`n` tokens from the start and from the middle of each held-out module's source, as this Python ships it;
    whole: every full window of `n` tokens of them instead (~30,000 tokens)."""
    import importlib

    out = []
    for m in HELD_OUT:
        ids = tokenizer.encode(inspect.getsource(importlib.import_module(m)))
        out += ([ids[i:i + n] for i in range(0, len(ids) - n + 1, n)] if whole
                else [ids[:n], ids[len(ids) // 2:len(ids) // 2 + n]])
    return out


def nll(logits: np.ndarray, ids) -> np.ndarray:
    """Next-token negative log-likelihoods [len(ids) - 1], computed in float64."""
    x = logits[:-1].astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    """(archkit model, transformers model) of one shipped demo checkpoint."""
    import hfmodels

    path = demo_checkpoint(request.param)
    return core.load(path, arch=request.param, device="cpu", quiet=True), hfmodels.hf_reference(path)


@pytest.mark.parametrize("arch", ARCHS)
def test_demo_is_shipped_not_synthesized(arch):
    path = demo_checkpoint(arch)
    assert path == DATA / "demo" / arch
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / f).is_file(), f
    model = core.load(path, device="cpu", quiet=True)  # detected from config.json, not given by name
    assert model.spec.name == arch and model.eos_token_ids == (0,)


@needs_torch
def test_perplexity_matches_transformers(pair):
    import hfmodels

    ours, theirs = pair
    total = []
    for ids in held_out_windows(ours.tokenizer):
        a, b = nll(ours.logits(ids), ids), nll(hfmodels.hf_logits(theirs, ids), ids)
        assert abs(math.exp(a.mean() - b.mean()) - 1) < 0.01, (math.exp(a.mean()), math.exp(b.mean()))
        total.append(a)
    ppl = math.exp(np.concatenate(total).mean())
    # An untrained model scores about the vocabulary size (4096); the shipped ones score well under 100.
    assert ppl < 400, f"perplexity {ppl:.1f} on held-out text: the demo model looks untrained"


@needs_torch
def test_greedy_matches_transformers(pair):
    import torch

    ours, theirs = pair
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        t = torch.tensor([ids])
        with torch.no_grad():
            out = theirs.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=40, do_sample=False,
                                  eos_token_id=0, pad_token_id=0)
        assert ours.generate(ids, max_new_tokens=40) == out[0, len(ids):].tolist(), prompt
