"""The tensor-parallel sharding plan: which rank holds which slice of every role, derived from the roles alone.

No family is named here. Each canonical role has one rule (RULES below), in Megatron-LM's terms:

- column-parallel (split along the output rows, axis 0): q, k, v and their biases by heads; gate and up (and the
  shared expert's) by intermediate rows. Each rank computes its own heads / its share of the MLP, no communication.
- row-parallel (split along the input columns, axis 1): o and down (and shared.down). Each rank's product is a
  partial sum: one all-reduce per such linear, then the bias (replicated) is added once.
- vocab-parallel (axis 0): embed, lm_head and lm_head.bias. The embedding lookup is masked per rank and all-reduced;
  the logits are all-gathered. The vocabulary need not divide: the ranks' shares of it differ by at most one row.
- expert-parallel (axis 0 of every experts.* role): each rank holds E / N whole experts; the router is replicated,
  so every rank routes every token globally, runs only its own experts and the outputs are all-reduced.
- per-head q/k norms: scope "head" ([Dh], shared) is replicated; "per_head" ([H, Dh]) is split by head with q / k;
  "projection" ([q_dim] / [kv_dim], over the whole projection) is split with q / k, and its mean and variance are
  all-reduced across ranks (a sum of squares, or a sum then a sum of squared deviations for LayerNorm).
- everything else (norms, the router, learned positions, the shared expert's sigmoid gate, the biases of
  row-parallel outputs) is replicated.

Key/value heads: when num_kv_heads >= N they are divided like the query heads (num_kv_heads % N == 0); when
num_kv_heads < N each rank holds the one kv head its query heads read, as vLLM does (N % num_kv_heads == 0, so
N / num_kv_heads ranks hold a copy of each), and every rank caches only that head.

Fused checkpoint tensors (GPT-2's c_attn, Phi-3's qkv_proj, GPT-NeoX's interleaved query_key_value) are split into
roles by the loader first (core/tp_load.py reads only the rows of the fused tensor a rank's slices need), so the
plan speaks only of roles. A shape that does not divide is one TensorParallelError listing every size and N.
"""

from __future__ import annotations

import math

import attrs

from .config import ModelConfig
from .errors import TensorParallelError
from .spec import GLOBAL_ROLES, LAYER_ROLES, ModelSpec
from .weights import Plan, expected_shape

KINDS = ("replicated", "column", "row", "vocab", "expert", "head")
UNITS = {"heads": "query heads", "kv_heads": "kv heads", "intermediate": "intermediate rows",
         "shared": "shared-expert rows", "experts": "experts", "vocab": "vocabulary rows"}

# role → (kind, axis, unit): which axis of the role's canonical shape is cut, and by what quantity (query heads,
# kv heads, intermediate rows, shared-expert rows, experts, vocabulary rows); split() turns units into rows.
RULES = {
    "embed": ("vocab", 0, "vocab"), "lm_head": ("vocab", 0, "vocab"), "lm_head.bias": ("vocab", 0, "vocab"),
    **{f"{r}.{p}": ("column", 0, "heads" if r == "q" else "kv_heads") for r in "qkv" for p in ("weight", "bias")},
    "o.weight": ("row", 1, "heads"),
    **{f"{r}.{p}": ("column", 0, "intermediate") for r in ("gate", "up") for p in ("weight", "bias")},
    "down.weight": ("row", 1, "intermediate"),
    **{f"shared.{r}.{p}": ("column", 0, "shared") for r in ("gate", "up") for p in ("weight", "bias")},
    "shared.down.weight": ("row", 1, "shared"),
    **{f"experts.{r}.{p}": ("expert", 0, "experts") for r in ("gate", "up", "down") for p in ("weight", "bias")},
}
# q_norm / k_norm by qk_norm scope: "head" is replicated (absent here); per_head rows are heads, projection rows dims.
QK_RULES = {
    "per_head": {"q_norm": ("head", 0, "heads"), "k_norm": ("head", 0, "kv_heads")},
    "projection": {"q_norm": ("column", 0, "heads"), "k_norm": ("column", 0, "kv_heads")},
}
REPLICATED = {
    "pos_embed", "final_norm.weight", "final_norm.bias", "o.bias", "down.bias", "shared.down.bias",
    "router.weight", "router.bias", "router.select_bias", "shared_gate.weight", "q_norm.weight", "q_norm.bias", "k_norm.weight",
    "k_norm.bias", *(r for r in LAYER_ROLES if r.endswith(("norm.weight", "norm.bias")))}
assert set(RULES) | REPLICATED == set(GLOBAL_ROLES) | set(LAYER_ROLES), "every canonical role needs a TP rule"


@attrs.frozen
class Split:
    """How one role is placed: its kind (KINDS), the axis split (None when replicated), each rank's [start, stop)
    along that axis, and the role's full shape."""

    role: str
    kind: str
    axis: int | None
    ranges: tuple[tuple[int, int], ...]
    shape: tuple[int, ...]
    unit: str = ""  # what is divided: "heads", "kv_heads", "intermediate", "shared", "experts", "vocab"

    def rank_shape(self, rank: int) -> tuple[int, ...]:
        """The shape of rank `rank`'s slice."""
        if self.axis is None:
            return self.shape
        lo, hi = self.ranges[rank]
        return self.shape[:self.axis] + (hi - lo,) + self.shape[self.axis + 1:]


def _even(total: int, n: int) -> list[tuple[int, int]]:
    return [(r * total // n, (r + 1) * total // n) for r in range(n)]


@attrs.frozen
class TensorParallelPlan:
    """Which rank holds what of one model split over `size` ranks (see the module docstring for the rules).

    Build it with TensorParallelPlan.build(spec, config, roles, size); it raises TensorParallelError when a shape
    cannot be divided, naming every size and N at once.
    """

    config: ModelConfig
    size: int
    roles: frozenset
    spec: ModelSpec | None = None

    @classmethod
    def build(cls, spec: ModelSpec | None, config: ModelConfig, roles, size: int) -> "TensorParallelPlan":
        """The plan for the roles a checkpoint provides (e.g. {t for src in plan.sources for t in src.rule.targets})."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise TensorParallelError(f"tensor_parallel={size!r} must be a positive number of ranks")
        p = cls(config, size, frozenset(roles), spec)
        p._check()
        return p

    @classmethod
    def for_weights(cls, spec: ModelSpec, wplan: Plan, size: int) -> "TensorParallelPlan":
        """The plan for a checked core.weights.Plan (the roles its sources feed)."""
        return cls.build(spec, wplan.config, {t for src in wplan.sources for t in src.rule.targets}, size)

    # -- the divided quantities ---------------------------------------------------------------------------------
    def _rule(self, role: str) -> tuple[str, int | None, str]:
        if role.startswith(("q_norm.", "k_norm.")):
            scope = QK_RULES.get(self.config.qk_norm)
            return scope[role[:6]] if scope else ("replicated", None, "")
        return RULES.get(role, ("replicated", None, ""))

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold a copy of each kv head: 1 when the kv heads are divided, N / num_kv_heads when fewer."""
        hkv = self.config.num_kv_heads
        return self.size // hkv if hkv < self.size else 1

    def heads(self, rank: int) -> tuple[int, int]:
        """Rank `rank`'s query heads [start, stop)."""
        return _even(self.config.num_heads, self.size)[rank]

    def kv_heads(self, rank: int) -> tuple[int, int]:
        """Rank `rank`'s key/value heads [start, stop): its share, or the one head its query heads read."""
        hkv = self.config.num_kv_heads
        if hkv >= self.size:
            return _even(hkv, self.size)[rank]
        h = rank // self.kv_replicas
        return (h, h + 1)

    def _ranges(self, unit: str) -> list[tuple[int, int]]:
        """Each rank's [start, stop) of a divided quantity, in its own units (heads, rows, experts)."""
        c, n = self.config, self.size
        if unit == "heads":
            return [self.heads(r) for r in range(n)]
        if unit == "kv_heads":
            return [self.kv_heads(r) for r in range(n)]
        # the vocabulary rarely divides (GPT-2's 50257): its ranks' shares differ by at most one row
        total = {"intermediate": c.intermediate_size, "shared": c.shared_expert_intermediate_size,
                 "experts": c.num_experts, "vocab": c.vocab_size}[unit]
        return _even(total, n)

    def _problems(self) -> list[str]:
        c, n = self.config, self.size
        units = {self._rule(r)[2] for r in self.roles}
        bad = []
        if self.spec is not None and (self.spec.attention_block or self.spec.mlp_block or self.spec.extra_roles):
            bad.append(f"plugin {self.spec.name!r} composes its own layer functions (attention_block / mlp_block / "
                       f"extra_roles), which the plan cannot shard: it splits canonical roles only")
        unknown = sorted(r for r in self.roles if r not in RULES and r not in REPLICATED)
        if unknown:
            bad.append(f"roles {unknown} have no tensor-parallel rule")
        if "heads" in units and c.num_heads % n:
            bad.append(f"num_heads={c.num_heads} is not a multiple of {n}")
        if "kv_heads" in units and c.num_kv_heads % n and n % c.num_kv_heads:
            bad.append(f"num_kv_heads={c.num_kv_heads} is neither a multiple nor a divisor of {n} (kv heads are "
                       f"divided, or replicated when fewer than the ranks)")
        for unit, value, name in (("intermediate", c.intermediate_size, "intermediate_size"),
                                  ("shared", c.shared_expert_intermediate_size, "shared_expert_intermediate_size"),
                                  ("experts", c.num_experts, "num_experts")):
            if unit in units and value % n:
                bad.append(f"{name}={value} is not a multiple of {n}")
        if "vocab" in units and c.vocab_size < n:
            bad.append(f"vocab_size={c.vocab_size} is smaller than {n}: a rank would hold no rows")
        if c.qk_norm == "projection" and "k_norm.weight" in self.roles and c.num_kv_heads < n:
            # each kv head lives on N / num_kv_heads ranks: summing the ranks' statistics would count it that often
            bad.append(f"qk_norm='projection' normalises k over all {c.num_kv_heads} kv heads, which are replicated "
                       f"(not divided) over {n} ranks; use at most {c.num_kv_heads} ranks")
        return bad

    def _check(self) -> None:
        bad = self._problems()
        if bad:
            raise TensorParallelError(f"cannot split this {self.spec.name + ' ' if self.spec else ''}model over "
                                      f"{self.size} ranks: " + "; ".join(bad))

    # -- per role ---------------------------------------------------------------------------------------------------
    def split(self, role: str) -> Split:
        """The placement of `role` (its canonical shape under this plan's config)."""
        kind, axis, unit = self._rule(role)
        shape = expected_shape(role, self.config, self.spec)
        if axis is None:
            return Split(role, "replicated", None, ((0, shape[0] if shape else 1),) * self.size, shape)
        rows = 1 if kind in ("vocab", "expert", "head") or unit in ("intermediate", "shared") else \
            self.config.head_dim  # q / k / v rows and o columns: heads × head_dim
        ranges = tuple((lo * rows, hi * rows) for lo, hi in self._ranges(unit))
        return Split(role, kind, axis, ranges, shape, unit)

    def rank_config(self, rank: int) -> ModelConfig:
        """The sizes rank `rank` computes with: its query / kv heads and MLP share. num_experts stays global (every
        rank routes over all experts) and expert_dim is pinned (experts are whole on their rank)."""
        c = self.config
        h0, h1 = self.heads(rank)
        k0, k1 = self.kv_heads(rank)
        n = self.size
        return attrs.evolve(c, num_heads=h1 - h0, num_kv_heads=k1 - k0, intermediate_size=c.intermediate_size // n,
                            moe_intermediate_size=c.expert_dim if c.num_experts else c.moe_intermediate_size,
                            shared_expert_intermediate_size=c.shared_expert_intermediate_size // n)

    def rank_bytes(self, wplan: Plan) -> list[int]:
        """Bytes each rank reads and holds, in the checkpoint's stored dtypes."""
        out = [0.0] * self.size
        for src in wplan.sources:
            per = src.nbytes / max(src.numel, 1)  # a dtype's width; a quantized weight's packed bytes per element
            for role in src.rule.targets:
                s = self.split(role)
                for r in range(self.size):
                    out[r] += math.prod(s.rank_shape(r)) * per
        return [round(b) for b in out]

    def describe(self, wplan: Plan) -> list[str]:
        """Lines for `archkit inspect --tp N`: per role its kind and every rank's slice, then bytes per rank."""
        layers: dict[str, int] = {}
        for src in wplan.sources:
            for role in src.rule.targets:
                layers[role] = layers.get(role, 0) + 1
        order = [r for r in (*GLOBAL_ROLES, *LAYER_ROLES) if r in layers]
        rows = [("role", "layers", "split", "rank:[slice)")]
        for role in order:
            s = self.split(role)
            what = "replicated" if s.axis is None else \
                f"{s.kind}-parallel by {UNITS[s.unit]}, axis {s.axis} of {s.shape[s.axis]}"
            where = "every rank holds all of it" if s.axis is None else "  ".join(
                f"{r}:[{lo}:{hi})" for r, (lo, hi) in enumerate(s.ranges))
            count = str(layers[role]) if role in LAYER_ROLES else "-"
            rows.append((role, count, what, where))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        c = self.config
        kv = (f"kv heads divided ({c.num_kv_heads // self.size} per rank)" if self.kv_replicas == 1 else
              f"each kv head replicated on {self.kv_replicas} ranks (num_kv_heads={c.num_kv_heads} < {self.size})")
        out = [f"tensor parallel over {self.size} ranks: {c.num_heads // self.size} query heads per rank, {kv}"]
        out += [f"{a:<{w[0]}}  {b:<{w[1]}}  {s:<{w[2]}}  {d}" for a, b, s, d in rows]
        per = self.rank_bytes(wplan)
        total = sum(src.nbytes for src in wplan.sources)
        out.append("bytes/rank   " + "  ".join(f"{r}: {_mb(b)}" for r, b in enumerate(per))
                   + f"  (as stored; unsharded {_mb(total)})")
        return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n} B"
