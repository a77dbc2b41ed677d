"""Tensor parallelism on the CPU (issue 19): the sharding plan (core/tp.py), each rank's slice reads
(core/tp_load.py) and N in-process ranks on the numpy backend (core/tp_numpy.py).

For every in-tree family (and the out-of-tree starcoder2, and four vocabulary plugins for the q/k-norm scopes and
the shared expert), random-init transformers models saved in hub layout: core.load(..., tensor_parallel=N) for N in
{2, 4} must give the unsharded model's logits (prefill, and decode one token at a time through the split KV cache)
within 1e-5 relative in fp32, its greedy tokens, exactly one all-reduce per row-parallel product, and each rank
must read only its own bytes. Mutations (a rank given another's columns, an all-reduce dropped) must break parity.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import attrs
import numpy as np
import pytest

import core
import core.checkpoint
from core.checkpoint import Checkpoint
from core.config import ModelConfig
from core.errors import DeviceError, TensorParallelError
from core.registry import default_registry
from core.tp import REPLICATED, RULES, TensorParallelPlan
from core.tp_load import fused_rows, load_rank
from core.tp_numpy import Comm, TensorParallelNumpy, rank_weights
from core.weights import plan as weights_plan, split_fused

from conftest import needs_torch
from hfmodels import rel_err, save_model
from test_families import cached_logits, prompt

pytestmark = needs_torch

TOL = 1e-5  # fp32 logits, relative to the unsharded model
NEW = 8  # greedy tokens compared

# family → config: small (2 layers, hidden 64, 4 heads), chosen so that N = 4 replicates kv heads where there are
# fewer than 4, and the vocabulary (251) does not divide by 2 or 4 where the family allows it.
FAMILIES = {
    "gpt2": dict(vocab=251),  # tied embeddings, Conv1D (stored transposed) and a fused c_attn
    "llama": dict(kv_heads=2, vocab=251),
    "qwen3": dict(kv_heads=2, head_dim=16),  # qk_norm "head": replicated
    "qwen2": dict(kv_heads=2),  # q/k/v biases split with their rows
    "mistral": dict(kv_heads=1, sliding_window=5),  # one kv head: replicated on every rank
    "gemma2": dict(kv_heads=2, head_dim=16, sliding_window=4, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=24),
    "phi3": dict(kv_heads=2, tie=False),  # fused qkv_proj and gate_up_proj
    "gpt_neox": dict(),  # query_key_value fused per head (interleaved), biases, parallel block
    "phi": dict(vocab=251, qk_layernorm=True),  # lm_head.bias, LayerNorm q/k norm, shared-norm parallel block
    "mixtral": dict(kv_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(kv_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      mlp_only_layers=[0]),  # one dense layer, one sparse
    "starcoder2": dict(kv_heads=2),  # the out-of-tree plugin
}


@pytest.fixture(scope="module")
def ckpts():
    with tempfile.TemporaryDirectory() as tmp:
        @functools.cache
        def get(family: str) -> Path:
            return with_biases(save_model(family, Path(tmp) / family, layers=2, hidden=64, heads=4, norm_noise=0.3,
                                          seed=1, **FAMILIES[family]))
        yield get


def with_biases(path: Path, seed: int = 0) -> Path:
    """The checkpoint with noise added to every bias: transformers initialises them to 0, which would leave a bias
    dropped or added N times unnoticed."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    for f in path.glob("*.safetensors"):
        t = load_file(str(f))
        for name, x in t.items():
            if name.endswith(".bias") and x.dtype.kind == "f":
                t[name] = (x + rng.normal(0, 0.3, x.shape)).astype(x.dtype)
        save_file(t, str(f), metadata={"format": "pt"})
    return path


def expected_all_reduces(c: ModelConfig) -> int:
    """One for the embedding, one per row-parallel product (o, down or the experts, the shared expert's down),
    one or two per split projection norm (q and k: a sum of squares, or a sum then squared deviations)."""
    stats = {"projection": 2 * (2 if c.norm == "layernorm" else 1)}.get(c.qk_norm, 0)
    per = [2 + (1 if c.sparse_layer(i) and c.shared_expert_intermediate_size else 0) + stats
           for i in range(c.num_layers)]
    return 1 + sum(per)


def assert_tp_parity(path: Path, n: int, registry=None, ids=None) -> core.Model:
    """Logits (prefill and decode), greedy tokens and collective counts of the model split over n ranks."""
    ids = ids or prompt(n, 12, 251)
    one = core.load(path, device="cpu", quiet=True, registry=registry)
    tp = core.load(path, device="cpu", quiet=True, registry=registry, tensor_parallel=n)
    assert isinstance(tp.backend, TensorParallelNumpy) and tp.backend.size == n
    err = rel_err(tp.logits(ids), one.logits(ids))
    assert err < TOL, f"{one.spec.name} over {n} ranks: logits relative error {err:.2e}"
    assert tp.backend.comm.counts == {"all_reduce": expected_all_reduces(tp.config), "all_gather": 1}
    longer = ids + prompt(n + 1, NEW, 251)
    dec = rel_err(cached_logits(tp, longer, len(ids)), cached_logits(one, longer, len(ids)))
    assert dec < TOL, f"{one.spec.name} over {n} ranks: decode logits relative error {dec:.2e}"
    assert tp.generate(ids, max_new_tokens=NEW, stop_at_eos=False) == one.generate(ids, max_new_tokens=NEW,
                                                                                      stop_at_eos=False)
    return tp


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_split_matches_unsharded(ckpts, family, n):
    model = assert_tp_parity(ckpts(family), n)
    assert model.spec.name == family
    plan = model.backend.plan
    for r in range(n):  # every rank holds exactly its slices, and caches only its kv heads
        mine = rank_weights(model.weights, r)
        for layer in [mine.globals, *mine.layers]:
            for role, t in layer.items():
                assert t.shape == plan.split(role).rank_shape(r), (role, r)
        k0, k1 = plan.kv_heads(r)
        assert model.backend.new_cache(model.config, 4).parts[r].k[0].shape[0] == k1 - k0


# -- the vocabulary's other q/k-norm scopes and the shared expert (tests/vocab_plugins) -----------------------------

VOCAB_CASES = {
    "olmo2": dict(num_key_value_heads=4),  # qk_norm "projection": statistics all-reduced (kv heads divided)
    "cohere": dict(num_key_value_heads=2, use_qk_norm=True),  # "per_head" [H, Dh] split by head (LayerNorm)
    "stablelm": dict(num_key_value_heads=2, qk_layernorm=True),  # per-head tensors "{head}": only its heads read
    "qwen2_moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, mlp_only_layers=[1]),  # shared expert and its gate
}


@pytest.mark.parametrize("family", list(VOCAB_CASES))
def test_vocabulary_families_split(family):
    import test_vocabulary as tv

    with tempfile.TemporaryDirectory() as tmp:
        extra = dict(VOCAB_CASES[family])
        cfg = dict(tv.dims((4, extra.pop("num_key_value_heads")), 2), **extra)
        ckpt = tv.build(family, tmp, 3, **cfg)
        for n in (2, 4):
            assert_tp_parity(ckpt, n, registry=tv.registry(family), ids=prompt(7, 12, tv.VOCAB))


# -- batched generation, dtypes, devices ---------------------------------------------------------------------------

def test_engine_batches_over_ranks(ckpts):
    """The engine's paged KV cache is split too: many prompts at once give the unsharded model's tokens."""
    path = ckpts("llama")
    prompts = [prompt(s, 5 + 3 * s, 251) for s in range(3)]
    one = core.load(path, device="cpu", quiet=True).generate(prompts, max_new_tokens=6, stop_at_eos=False)
    tp = core.load(path, device="cpu", quiet=True, tensor_parallel=4)
    assert tp.generate(prompts, max_new_tokens=6, stop_at_eos=False) == one


def test_bfloat16_rounding_is_per_element(ckpts):
    path = ckpts("qwen3")
    ids = prompt(0, 10, 251)
    one = core.load(path, device="cpu", dtype="bfloat16", quiet=True).logits(ids)
    tp = core.load(path, device="cpu", dtype="bfloat16", quiet=True, tensor_parallel=2)
    assert rel_err(tp.logits(ids), one) < TOL


def test_cuda_is_refused_clearly_and_one_rank_is_plain(ckpts):
    path = ckpts("llama")
    with pytest.raises(DeviceError, match="tensor_parallel=2 on device 'cuda' is not built yet"):
        core.load(path, device="cuda", quiet=True, tensor_parallel=2)
    with pytest.raises(TensorParallelError, match="tensor_parallel=0 must be a positive number"):
        core.load(path, device="cpu", quiet=True, tensor_parallel=0)
    assert not isinstance(core.load(path, device="cpu", quiet=True, tensor_parallel=1).backend, TensorParallelNumpy)


@pytest.mark.parametrize("family,dtype", [("gpt2", "float16"), ("phi3", "bfloat16"), ("qwen3_moe", "float16")])
def test_half_checkpoints_in_shards(tmp_path, family, dtype):
    """F16 / BF16 slices handed on as stored bits (or through float32 where transposed or fused), from a checkpoint
    sharded over several files."""
    from core.synth import make_config, write_checkpoint

    spec = default_registry()[family].spec
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16) if family == "qwen3_moe" else {}
    c = make_config(spec, vocab_size=250, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_position_embeddings=64, **moe)
    path = write_checkpoint(spec, c, tmp_path / family, dtype=dtype, std=0.2, shard_bytes=40_000)
    assert len(Checkpoint(path).files) > 1
    ids = prompt(0, 10, 250)
    want = core.load(path, device="cpu", quiet=True).logits(ids)
    for n in (2, 4):
        assert rel_err(core.load(path, device="cpu", quiet=True, tensor_parallel=n).logits(ids), want) < TOL


def test_the_backend_keeps_the_protocol():
    from core.backend_api import Backend
    from test_backend_api import conformance

    assert isinstance(TensorParallelNumpy(2), Backend) and conformance(TensorParallelNumpy) == {}


# -- the parity checks can fail ------------------------------------------------------------------------------------

def test_a_rank_with_the_wrong_columns_breaks_parity(ckpts, monkeypatch):
    path = ckpts("llama")
    ids = prompt(0, 10, 251)
    want = core.load(path, device="cpu", quiet=True).logits(ids)
    real = TensorParallelPlan.split

    def swapped(self, role):  # o's column blocks handed to the ranks in reverse order
        s = real(self, role)
        return attrs.evolve(s, ranges=s.ranges[::-1]) if role == "o.weight" else s

    monkeypatch.setattr(TensorParallelPlan, "split", swapped)
    assert rel_err(core.load(path, device="cpu", quiet=True, tensor_parallel=2).logits(ids), want) > 1e-3


def test_a_missing_all_reduce_breaks_parity(ckpts, monkeypatch):
    path = ckpts("mixtral")
    ids = prompt(0, 10, 251)
    want = core.load(path, device="cpu", quiet=True).logits(ids)
    monkeypatch.setattr(Comm, "all_reduce", lambda self, parts: parts[0].copy())  # rank 0's partial sum only
    assert rel_err(core.load(path, device="cpu", quiet=True, tensor_parallel=2).logits(ids), want) > 1e-3


# -- each rank reads only its slices ---------------------------------------------------------------------------------

def _replicated_bytes(ckpt: Checkpoint, markers) -> int:
    return sum(t.nbytes for name, t in ckpt.tensors.items() if any(m in name for m in markers))


# family → substrings of the tensor names every rank reads whole (worked out from the names, not from the plan)
WHOLE = {"llama": ("norm",), "gpt2": ("ln_", "wpe", "c_proj.bias"), "phi3": ("norm",),
         "gpt_neox": ("layernorm", "final_layer_norm", "dense.bias", "dense_4h_to_h.bias"),
         "mixtral": ("norm", "block_sparse_moe.gate")}


@pytest.mark.parametrize("family", list(WHOLE))
def test_each_rank_reads_only_its_bytes(ckpts, family, monkeypatch):
    """Every read goes through read_tensor_slice; the ranks together read the checkpoint once plus N - 1 more copies
    of what is replicated (llama: kv heads divided at N = 2; phi3 / gpt_neox / gpt2: fused tensors cut by rows)."""
    assert_reads(ckpts(family), family, 2, WHOLE[family], monkeypatch)


def assert_reads(path: Path, family: str, n: int, whole, monkeypatch) -> None:
    """Each rank's reads add up to its plan bytes; all ranks' to the checkpoint plus (n - 1) x the `whole` tensors."""
    ckpt = Checkpoint(path)
    spec = default_registry()[family].spec
    config = ModelConfig.from_hf(spec, ckpt.config)
    wplan = weights_plan(spec, config, ckpt)
    tp = TensorParallelPlan.for_weights(spec, wplan, n)
    monkeypatch.setattr(core.checkpoint, "read_tensor", lambda info: pytest.fail(f"{info.name} read whole"))
    got = []
    real = core.checkpoint.read_tensor_slice
    monkeypatch.setattr(core.checkpoint, "read_tensor_slice", lambda *a: got.append(real(*a).nbytes) or real(*a))
    per_rank = []
    for r in range(n):
        got.clear()
        list(load_rank(wplan, tp, r, lambda bits, stored, role: bits))
        per_rank.append(sum(got))
    assert per_rank == tp.rank_bytes(wplan)
    assert sum(per_rank) == ckpt.nbytes + (n - 1) * _replicated_bytes(ckpt, whole)
    assert max(per_rank) < 0.6 * ckpt.nbytes


def test_experts_stacked_in_one_fused_tensor(ckpts, tmp_path, monkeypatch):
    """Qwen3-MoE with every layer's experts in gate_up_proj [E, 2I, D] and down_proj [E, D, I] (transformers 5):
    a rank reads only its experts' rows of them, and the split model matches the unsharded one."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    path = Path(shutil.copytree(ckpts("qwen3_moe"), tmp_path / "stacked"))
    t = load_file(str(path / "model.safetensors"))
    e = "model.layers.1.mlp.experts."  # layer 0 is dense (mlp_only_layers)
    gate = torch.stack([t.pop(f"{e}{i}.gate_proj.weight") for i in range(4)])
    up = torch.stack([t.pop(f"{e}{i}.up_proj.weight") for i in range(4)])
    t[e + "gate_up_proj"] = torch.cat([gate, up], dim=1)
    t[e + "down_proj"] = torch.stack([t.pop(f"{e}{i}.down_proj.weight") for i in range(4)])
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    for n in (2, 4):
        assert_tp_parity(path, n)
    assert_reads(path, "qwen3_moe", 2, ("norm", "mlp.gate.weight"), monkeypatch)  # kv heads divided at 2


def test_quantized_weights_are_refused(ckpts):
    """A quantized weight (core/quant: a TensorInfo subclass standing for packed tensors) is no one span of elements."""
    from core.checkpoint import TensorInfo

    class Packed(TensorInfo):
        pass

    ckpt = Checkpoint(ckpts("llama"))
    spec = default_registry()["llama"].spec
    wplan = weights_plan(spec, ModelConfig.from_hf(spec, ckpt.config), ckpt)
    i = next(k for k, src in enumerate(wplan.sources) if src.rule.targets == ("o.weight",))
    info = wplan.sources[i].info
    wplan.sources[i] = attrs.evolve(wplan.sources[i], infos=(Packed(*attrs.astuple(info, recurse=False)),))
    with pytest.raises(TensorParallelError, match=rf"{info.name} is quantized: .* not sharded yet"):
        list(load_rank(wplan, TensorParallelPlan.for_weights(spec, wplan, 2), 0, lambda b, s, r: b))


def test_a_rank_slice_equals_the_whole_tensor_cut(ckpts):
    """load_rank's slices are the unsharded loader's tensors cut at the plan's ranges (GPT-NeoX: fused, interleaved)."""
    path = ckpts("gpt_neox")
    ckpt = Checkpoint(path)
    spec = default_registry()["gpt_neox"].spec
    wplan = weights_plan(spec, ModelConfig.from_hf(spec, ckpt.config), ckpt)
    whole = {(role, layer): t for role, layer, t in wplan.load(lambda b, s, r: core.checkpoint.to_float32(b, s))}
    tp = TensorParallelPlan.for_weights(spec, wplan, 4)
    for r in range(4):
        for role, layer, t in load_rank(wplan, tp, r, lambda b, s, _: core.checkpoint.to_float32(b, s)):
            s = tp.split(role)
            want = whole[role, layer] if s.axis is None else np.take(whole[role, layer], range(*s.ranges[r]), s.axis)
            np.testing.assert_array_equal(t, want)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("n", [2, 4])
def test_a_norm_over_a_split_projection_is_the_whole_norm(kind, n):
    """qk_norm "projection" over features split across ranks: the all-reduced statistics give the whole row's norm
    (LayerNorm has no in-tree family with that scope, so it is held to core.ops here)."""
    from core import ops
    from core.tp_numpy import Ranked

    rng = np.random.default_rng(n)
    x, w, b = rng.normal(1, 2, (5, 64)).astype(np.float32), rng.normal(1, 0.3, 64).astype(np.float32), \
        rng.normal(0, 0.3, 64).astype(np.float32)
    be = TensorParallelNumpy(n)
    cut = lambda a: tuple(np.split(a, n, axis=-1))  # noqa: E731
    got = be.norm(Ranked(cut(x)), Ranked(cut(w), "column"), Ranked(cut(b), "column") if kind == "layernorm" else None,
                  1e-5, kind, 0.5 if kind == "rmsnorm" else 0.0)
    want = ops.layer_norm(x, w, b, 1e-5) if kind == "layernorm" else ops.rms_norm(x, w, 1e-5, 0.5)
    assert rel_err(np.concatenate(got.parts, axis=-1), want) < 1e-6
    assert be.comm.counts["all_reduce"] == (2 if kind == "layernorm" else 1)


def test_fused_rows_is_split_fused():
    x = np.arange(24 * 3).reshape(24, 3)
    for sizes, groups in (([8, 8, 8], 1), ([8, 8, 8], 4), ([12, 6, 6], 2), ([16, 8], 1)):
        for rows, part in zip(fused_rows(sizes, groups), split_fused(x, sizes, groups)):
            np.testing.assert_array_equal(x[rows], part)


# -- the plan: rules per role, and what it refuses ----------------------------------------------------------------

def config_of(family: str, **raw) -> ModelConfig:
    return ModelConfig.from_hf(default_registry()[family].spec, raw)


LLAMA = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=128, max_position_embeddings=64, rms_norm_eps=1e-6)
ATTN_MLP = {"embed", "q.weight", "k.weight", "v.weight", "o.weight", "gate.weight", "up.weight", "down.weight"}


def build(config, n, roles=ATTN_MLP, family="llama"):
    return TensorParallelPlan.build(default_registry()[family].spec, config, roles, n)


def test_every_canonical_role_has_a_rule():
    assert not set(RULES) & REPLICATED
    p = build(config_of("llama", **LLAMA), 2)
    assert p.split("q.weight").ranges == ((0, 32), (32, 64)) and p.split("o.weight").axis == 1
    assert p.split("attn_norm.weight").axis is None and p.split("embed").kind == "vocab"


@pytest.mark.parametrize("raw,n,message", [
    (dict(num_attention_heads=8, num_key_value_heads=8, hidden_size=48), 3,
     r"num_heads=8 is not a multiple of 3"),
    (dict(intermediate_size=130), 4, r"intermediate_size=130 is not a multiple of 4"),
    (dict(num_attention_heads=12, num_key_value_heads=4, hidden_size=96), 6,
     r"num_kv_heads=4 is neither a multiple nor a divisor of 6"),
    (dict(vocab_size=3), 4, r"vocab_size=3 is smaller than 4"),
])
def test_indivisible_shapes_are_one_error_naming_size_and_n(raw, n, message):
    with pytest.raises(TensorParallelError, match=rf"cannot split this llama model over {n} ranks: .*{message}"):
        build(config_of("llama", **{**LLAMA, **raw}), n)


def test_every_problem_is_named_at_once():
    with pytest.raises(TensorParallelError) as e:
        build(config_of("llama", **{**LLAMA, "num_attention_heads": 6, "num_key_value_heads": 6, "hidden_size": 96,
                                    "intermediate_size": 130}), 4)
    assert "num_heads=6" in str(e.value) and "intermediate_size=130" in str(e.value)


def test_experts_must_divide():
    c = config_of("mixtral", **LLAMA, num_local_experts=6, num_experts_per_tok=2)
    with pytest.raises(TensorParallelError, match=r"num_experts=6 is not a multiple of 4"):
        build(c, 4, ATTN_MLP - {"gate.weight", "up.weight", "down.weight"} | {"experts.up.weight"}, "mixtral")
    p = build(c, 2, {"experts.up.weight", "router.weight"}, "mixtral")
    assert p.split("experts.up.weight").ranges == ((0, 3), (3, 6)) and p.split("router.weight").axis is None


def test_projection_norm_with_replicated_kv_heads_is_refused():
    import test_vocabulary as tv

    spec = tv.plugin("olmo2").SPEC
    c = ModelConfig.from_hf(spec, {**LLAMA, "num_key_value_heads": 2})
    roles = ATTN_MLP | {"q_norm.weight", "k_norm.weight"}
    with pytest.raises(TensorParallelError, match=r"'projection' .* 2 kv heads, which are replicated .* 4 ranks"):
        TensorParallelPlan.build(spec, c, roles, 4)
    assert TensorParallelPlan.build(spec, c, roles, 2).split("k_norm.weight").ranges == ((0, 16), (16, 32))


def test_a_plugins_own_layer_function_is_refused():
    spec = attrs.evolve(default_registry()["llama"].spec, attention_block=lambda s, L, i, h: h)
    with pytest.raises(TensorParallelError, match="composes its own layer functions"):
        TensorParallelPlan.build(spec, config_of("llama", **LLAMA), ATTN_MLP, 2)


def test_kv_heads_replicated_as_vllm_does():
    p = build(config_of("llama", **{**LLAMA, "num_attention_heads": 8, "num_key_value_heads": 2}), 8)
    assert [p.kv_heads(r) for r in range(8)] == [(0, 1)] * 4 + [(1, 2)] * 4 and p.kv_replicas == 4
    # rank r's query heads all read the kv head it holds (GQA group = 4 query heads)
    assert all(p.heads(r)[0] // 4 == p.kv_heads(r)[0] for r in range(8))
    assert p.rank_config(5).num_heads == 1 and p.rank_config(5).num_kv_heads == 1


def test_indivisible_heads_fail_before_any_byte_is_read(ckpts, monkeypatch):
    path = ckpts("llama")
    monkeypatch.setattr(core.checkpoint, "read_tensor_slice", lambda *a: pytest.fail("read before the plan"))
    with pytest.raises(TensorParallelError, match="num_heads=4 is not a multiple of 3"):
        core.load(path, device="cpu", quiet=True, tensor_parallel=3)


# -- archkit inspect --tp ------------------------------------------------------------------------------------------

def test_inspect_prints_the_plan(ckpts, capsys):
    from core.cli import main

    path = ckpts("phi3")
    assert main(["inspect", str(path), "--tp", "4"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel over 4 ranks: 1 query heads per rank, each kv head replicated on 2 ranks" in out
    assert "q.weight" in out and "column-parallel by query heads, axis 0 of 64" in out
    assert "k.weight           2       column-parallel by kv heads" in out and "0:[0:16)  1:[0:16)  2:[16:32)" in out
    assert "down.weight        2       row-parallel by intermediate rows, axis 1 of 128" in out
    assert "bytes/rank   0:" in out
    assert main(["inspect", str(path), "--tp", "3"]) == 1
    assert "archkit: error: cannot split this phi3 model over 3 ranks: num_heads=4 is not a multiple of 3" in \
        capsys.readouterr().err
