"""The backend contract (core/backend_api.py, CPU only): the Backend protocol lists every operation the model and
the loader call, and NumpyBackend and CudaBackend each provide all of them with compatible parameters.

CudaBackend is checked without a GPU: core.cuda.backend imports PyCUDA only when a backend is made, which the
first test confirms in a fresh interpreter, so the class itself (its rooms and their signatures) can be read.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

from core.backend import NumpyBackend
from core.backend_api import Backend

REPO = Path(__file__).resolve().parents[1]
# Files that call backend operations, and the names the backend goes by in them.
CALLERS = {"core/forward.py": ("be",), "core/model.py": ("be", "self.backend"), "core/load.py": ("backend",),
           "core/engine.py": ("be", "m.backend", "model.backend")}
# looked up with getattr(backend, ...): decode_ids by the model, paged_kv_tokens and sample_rows by the engine
OPTIONAL = {"decode_ids", "paged_kv_tokens", "sample_rows"}


def protocol_methods() -> dict:
    return {n: f for n, f in vars(Backend).items() if inspect.isfunction(f) and f.__qualname__ == f"Backend.{n}"}


def mismatches(proto, impl) -> list[str]:
    """How impl's parameters fail to accept a call written against proto's (names, order, defaults)."""
    want = list(inspect.signature(proto).parameters.values())[1:]  # without self
    have = list(inspect.signature(impl).parameters.values())
    if have and have[0].name == "self":
        have = have[1:]
    positional = [p for p in have if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    star = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}  # custom(op, *args, **scalars)
    out = [f"has no {star[p.kind]}{p.name}" for p in want if p.kind in star and p.kind not in {h.kind for h in have}]
    want = [p for p in want if p.kind not in star]
    for i, p in enumerate(want):
        if i >= len(positional):
            out.append(f"has no parameter {p.name!r}")
        elif positional[i].name != p.name:
            out.append(f"parameter {i + 1} is {positional[i].name!r} where the protocol has {p.name!r}")
        elif p.default is not p.empty and positional[i].default is p.empty:
            out.append(f"{p.name!r} has no default")
    out += [f"extra parameter {p.name!r} has no default" for p in positional[len(want):] if p.default is p.empty]
    out += [f"keyword {p.name!r} has no default" for p in have if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    return out


def conformance(cls) -> dict[str, list[str]]:
    problems = {}
    for name, proto in protocol_methods().items():
        impl = inspect.getattr_static(cls, name, None)
        if isinstance(impl, staticmethod):
            impl = impl.__func__
        if not inspect.isfunction(impl):
            problems[name] = [f"is {'missing' if impl is None else type(impl).__name__}, not a method"]
        elif bad := mismatches(proto, impl):
            problems[name] = bad
    return problems


def test_importing_the_cuda_backend_needs_no_pycuda():
    code = "import sys, core.cuda.backend; assert 'pycuda' not in sys.modules, sorted(sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_protocol_method_has_a_one_line_docstring():
    methods = protocol_methods()
    assert len(methods) >= 25, sorted(methods)
    for name, f in methods.items():
        assert f.__doc__ and "\n" not in f.__doc__.strip(), f"Backend.{name} needs a one-line docstring"
    assert set(Backend.__annotations__) >= {"name", "dtype"}


def test_the_protocol_lists_every_operation_the_model_and_the_loader_call():
    called = {}
    for path, names in CALLERS.items():
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if ast.unparse(node.func.value) in names or ast.unparse(node.func.value).endswith(".be"):
                    called.setdefault(node.func.attr, path)
    missing = {op: path for op, path in called.items() if op not in protocol_methods() and op not in OPTIONAL}
    assert not missing, (f"operations called on a backend that core/backend_api.py does not list (add one entry each, "
                         f"with a method in NumpyBackend and CudaBackend): {missing}")


def test_numpy_backend_satisfies_the_protocol():
    be = NumpyBackend()
    assert isinstance(be, Backend)
    assert conformance(NumpyBackend) == {}
    assert isinstance(be.name, str) and be.dtype == "float32"


def test_cuda_backend_defines_every_protocol_method():
    from core.cuda.backend import CudaBackend

    assert conformance(CudaBackend) == {}
    assert CudaBackend.name == "cuda"
    init = ast.parse(textwrap.dedent(inspect.getsource(CudaBackend.__init__)))
    assert "dtype" in {n.attr for n in ast.walk(init) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}


def test_mismatches_are_reported_by_name():
    """The checker itself: a renamed, missing or extra parameter is caught."""
    class Bad:
        def add(self, a, c):
            """a + c."""

        def linear(self, x, w):
            """no bias."""

        def act(self, x, kind, extra):
            """one too many."""

    p = protocol_methods()
    assert mismatches(p["add"], Bad.add) == ["parameter 2 is 'c' where the protocol has 'b'"]
    assert mismatches(p["linear"], Bad.linear) == ["has no parameter 'b'"]
    assert mismatches(p["act"], Bad.act) == ["extra parameter 'extra' has no default"]
    assert mismatches(p["custom"], Bad.add) == ["has no *args", "has no **scalars", "parameter 1 is 'a' where the "
                                                "protocol has 'op'", "extra parameter 'c' has no default"]
