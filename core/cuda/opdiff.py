"""Debugging aid: run a forward pass on two backends side by side and report each op's disagreement.

    python -m core.cuda.opdiff CKPT [--dtype float32] [--tokens 300]

Every primitive runs on numpy and, on the same inputs, on the GPU, so errors do not propagate: each row
shows the error one op adds, ‖cuda − numpy‖ / ‖numpy‖ of its output, worst op first. It needs no
knowledge of the model: it wraps the backend interface.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np

from ..backend import Cache, NumpyBackend, Weights


class Pair:
    """A weight (or a KV-cache tensor) held by both backends."""

    def __init__(self, a, b):
        self.a, self.b = a, b


class DiffBackend:
    """Runs every op on numpy and, on the same numpy inputs uploaded, on the GPU; records the difference.

    Activations flowing between ops are the numpy backend's, so each op's error is its own.
    errors[op] holds ‖gpu − numpy‖ / ‖numpy‖ of each call's output.
    """

    name = "diff"

    def __init__(self, gpu, ref: NumpyBackend):
        self.gpu, self.ref, self.dtype = gpu, ref, gpu.dtype
        self.errors = defaultdict(list)

    def _side(self, x, gpu: bool):
        if isinstance(x, Pair):
            return x.a if gpu else x.b
        if isinstance(x, (tuple, list)):  # linears' (w, b) pairs, rope_cache_write's qk_norm
            return type(x)(self._side(e, gpu) for e in x)
        if isinstance(x, Cache):
            return Cache([self._side(t, gpu) for t in x.k], [self._side(t, gpu) for t in x.v], x.length)
        if gpu and isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.ndim >= 2:
            return self.gpu.from_host(x)  # an activation: the GPU op gets numpy's value
        return x

    def new_cache(self, config, length):
        a, b = self.gpu.new_cache(config, length), self.ref.new_cache(config, length)
        return Cache([Pair(x, y) for x, y in zip(a.k, b.k)], [Pair(x, y) for x, y in zip(a.v, b.v)], length)

    def to_host(self, x):
        return self.ref.to_host(x)

    def __getattr__(self, op):
        fa, fb = getattr(self.gpu, op), getattr(self.ref, op)

        def call(*args, **kw):
            ra = fa(*[self._side(x, True) for x in args], **{k: self._side(v, True) for k, v in kw.items()})
            rb = fb(*[self._side(x, False) for x in args], **{k: self._side(v, False) for k, v in kw.items()})
            if rb is None:
                return None
            outs = list(zip(ra, rb)) if isinstance(rb, tuple) else [(ra, rb)]
            for i, (x, y) in enumerate(outs):
                got, want = self.gpu.to_host(x).astype(np.float64), np.asarray(y, np.float64)
                err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
                self.errors[op + (f"[{i}]" if len(outs) > 1 else "")].append(
                    float(err) if np.isfinite(got).all() else float("nan"))
            return rb

        return call


def pair_weights(wa: Weights, wb: Weights) -> Weights:
    return Weights({k: Pair(v, wb.globals[k]) for k, v in wa.globals.items()},
                   [{k: Pair(v, lb[k]) for k, v in la.items()} for la, lb in zip(wa.layers, wb.layers)])


def opdiff(path: str, dtype: str = "float32", tokens: int = 300, seed: int = 7) -> dict:
    """Per-op worst and median relative error of CUDA vs numpy over one forward pass of `tokens` tokens."""
    import core
    from ..model import forward

    g = core.load(path, device="cuda", dtype=dtype, quiet=True)
    c = core.load(path, device="cpu", dtype=dtype, quiet=True)
    be = DiffBackend(g.backend, c.backend)
    ids = np.random.default_rng(seed).integers(0, c.config.vocab_size, tokens)
    cache = be.new_cache(c.config, tokens)
    forward(be, pair_weights(g.weights, c.weights), c.config, ids, cache, 0, c.inv_freq, all_logits=True)
    return {op: (max(e), float(np.median(e)), len(e)) for op, e in be.errors.items()}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m core.cuda.opdiff", description=__doc__.split("\n")[0])
    p.add_argument("path")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=300)
    a = p.parse_args(argv)
    rows = sorted(opdiff(a.path, a.dtype, a.tokens).items(), key=lambda kv: -np.nan_to_num(kv[1][0], nan=np.inf))
    print(f"{'op':<22}{'worst':>11}{'median':>11}{'calls':>7}")
    for op, (worst, med, n) in rows:
        print(f"{op:<22}{worst:>11.3g}{med:>11.3g}{n:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
