"""The CUDA backend's layout, checked on the CPU (no PyCUDA, no GPU): it is a facade over rooms (core/cuda/*.py,
one mixin each), and these tests keep it that way.

- No import cycle anywhere in core/, counting imports inside functions too (a static graph over the AST), and
  every core/cuda module imports on its own in a fresh interpreter without pulling in PyCUDA.
- Each backend member is defined by one room; each room stays small.
- No module reaches into another's private members: a name with a leading underscore is used only where it is
  defined, except room state the facade's __init__ gives a first value, which exactly one room then uses.
- Every `self.x` in a room, and every `be.x` in the modules that drive a backend, is something the backend has
  (catches a call left behind by a rename, which only a GPU run would otherwise show).
- The switches are read from the environment in options.py alone, and geometry.py's numbers agree with the
  macros in the .cu files and with the builds CI compiles.
"""

from __future__ import annotations

import ast
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from core.errors import DeviceError

REPO = Path(__file__).resolve().parents[1]
CUDA = REPO / "core" / "cuda"
FACADE = CUDA / "backend.py"
MAX_ROOM_LINES = 400
# Modules outside the backend's rooms that drive a backend, and the expressions naming it there.
DRIVERS = {"core/cuda/graph.py": ("be", "self.be"), "core/cuda/batch_graph.py": ("be", "self.be"),
           "core/cuda/gpu_sampling.py": ("be", "self.be"), "core/cuda/row_sampler.py": ("be", "self.be"),
           "tests/test_cuda_row_sampling.py": ("be", "model.backend"), "core/cuda/bench_trace.py": ("model.backend",),
           "core/cuda/session.py": ("self.be",), "core/cuda/bench.py": ("be", "model.backend"),
           "tools/gemv_probe.py": ("be",), "tests/test_cuda_kernels.py": ("be",), "tests/test_cuda_cublas.py": ("be",),
           "tests/test_cuda_sampling.py": ("be", "gs.be"), "tests/test_cuda_parity.py": ("be", "model.backend"),
           "tests/test_cuda_robustness.py": ("be", "model.backend"), "tests/test_cuda_moe.py": ("be", "model.backend"),
           "tests/test_cuda_paged.py": ("be", "model.backend"), "tests/test_cuda_quant.py": ("be", "gpu.backend"),
           "tests/test_cuda_quant_moe.py": ("be", "gpu.backend"),
           "core/cuda/bench_quant.py": ("be", "model.backend")}
# Private names of other libraries that a scanned module may read: ctypes' byref object.
FOREIGN_PRIVATE = {"_obj"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def rooms():
    """(module path, mixin class) of every room CudaBackend is made of."""
    from core.cuda.backend import CudaBackend

    return [(Path(sys.modules[c.__module__].__file__), c) for c in CudaBackend.__mro__[1:] if c is not object]


# --- imports ----------------------------------------------------------------------------------------------------
def import_graph() -> dict[str, set[str]]:
    """module -> the core modules it imports anywhere in its file (top level or inside a function)."""
    mods = {module_name(p): p for p in (REPO / "core").rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:  # `from pkg import submodule` imports the submodule, not pkg's __init__ again
                    sub = f"{target}.{a.name}"
                    out.add(sub if sub in mods else target)
        graph[name] = {m for m in out if m in mods and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_core():
    graph = import_graph()
    assert "core.cuda.bench" in graph["core.bench"]  # an import inside a function counts
    assert cycles(graph) == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_module_imports_alone_without_pycuda():
    names = sorted(module_name(p) for p in CUDA.glob("*.py")) + ["core.bench", "core.bench_shapes", "core.backend_api"]
    code = "import importlib, sys; importlib.import_module(sys.argv[1]); assert 'pycuda' not in sys.modules"
    procs = {n: subprocess.Popen([sys.executable, "-c", code, n], cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in names}
    failed = {n: p.communicate()[1][-600:] for n, p in procs.items() if p.wait() != 0}
    assert not failed, failed


# --- rooms ------------------------------------------------------------------------------------------------------
def test_each_member_is_defined_by_one_room():
    seen = {}
    for path, cls in rooms():
        for name in vars(cls):
            if not name.startswith("__"):
                assert name not in seen, f"{name} is defined in both {seen[name]} and {path.name}"
                seen[name] = path.name
    assert len(seen) > 60


def test_rooms_are_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in [FACADE] + [p for p, _ in rooms()]}
    assert max(sizes.values()) < MAX_ROOM_LINES, sizes


def private_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(private attribute names a module binds: methods, class attributes, `x._y = ...`; those it reads)."""
    bound, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    bound.add(item.name)
                elif isinstance(item, ast.Assign):
                    bound |= {t.id for t in item.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            (bound if isinstance(node.ctx, ast.Store) else used).add(node.attr)
    return bound, used


def facade_state() -> set[str]:
    """Private attributes CudaBackend.__init__ gives a first value."""
    init = next(n for n in ast.walk(parse(FACADE)) if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {n.attr for n in ast.walk(init) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
            and n.attr.startswith("_")}


def test_no_module_reaches_into_another_modules_private_members():
    scanned = [p for p in CUDA.glob("*.py") if p != FACADE]
    scanned += [REPO / f for f in DRIVERS if not f.startswith("core/cuda")]
    scanned += [REPO / "core" / "bench.py", REPO / "core" / "bench_shapes.py", REPO / "core" / "load.py"]
    state, users, pokes = facade_state(), {}, []
    for path in scanned:
        bound, used = private_names(parse(path))
        for name in (used | bound) & state:
            users.setdefault(name, set()).add(path.name)
        pokes += [f"{path.relative_to(REPO)}: {name}" for name in sorted(used - bound - state - FOREIGN_PRIVATE)]
    assert not pokes, f"private members used outside the module that defines them: {pokes}"
    shared = {name: sorted(u) for name, u in users.items() if len(u) != 1}
    assert not shared, f"room state the facade sets up must belong to exactly one room: {shared}"
    assert set(users) == state, f"state set up by the facade that no room uses: {state - set(users)}"


def backend_members() -> set[str]:
    """Everything a CudaBackend has: class members of every room, and each attribute a room or the facade
    assigns on self."""
    from core.cuda.backend import CudaBackend

    names = set(dir(CudaBackend))
    for path in [FACADE] + [p for p, _ in rooms()]:
        names |= {n.attr for n in ast.walk(parse(path)) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                  and isinstance(n.value, ast.Name) and n.value.id == "self"}
    return names


def reads(path: Path, receivers) -> list[tuple[int, str]]:
    """(line, name) of every attribute read on one of the `receivers` expressions in the file."""
    return [(n.lineno, n.attr) for n in ast.walk(parse(path)) if isinstance(n, ast.Attribute)
            and isinstance(n.ctx, ast.Load) and ast.unparse(n.value) in receivers]


def test_every_member_a_room_or_a_driver_uses_exists():
    have = backend_members()
    missing = [f"{p.relative_to(REPO)}:{line}: self.{name}" for p in [FACADE] + [p for p, _ in rooms()]
               for line, name in reads(p, ("self",)) if name not in have]
    missing += [f"{f}:{line}: .{name}" for f, receivers in DRIVERS.items() for line, name in reads(REPO / f, receivers)
                if name not in have]
    assert not missing, missing


# --- options and geometry ---------------------------------------------------------------------------------------
def env_reads(tree: ast.AST) -> list[str]:
    """Variables a module reads from the environment: os.environ[...], os.environ.get(...), os.getenv(...)."""
    out = []
    for n in ast.walk(tree):
        key = None
        if isinstance(n, ast.Subscript) and ast.unparse(n.value).endswith("environ"):
            key = n.slice
        elif isinstance(n, ast.Call) and n.args and ast.unparse(n.func).endswith(("environ.get", "getenv")):
            key = n.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            out.append(key.value)
    return out


def test_the_switches_are_read_from_the_environment_in_options_alone():
    files = list((REPO / "core").rglob("*.py")) + list((REPO / "tools").glob("*.py"))
    elsewhere = {str(p.relative_to(REPO)): v for p in files
                 if (v := [k for k in env_reads(parse(p)) if k.startswith("ARCHKIT_CUDA_")])}
    assert elsewhere == {}
    from_env = next(n for n in ast.walk(parse(CUDA / "options.py"))
                    if isinstance(n, ast.FunctionDef) and n.name == "from_env")
    names = [n.value for n in ast.walk(from_env) if isinstance(n, ast.Constant) and str(n.value).startswith("ARCHKIT_")]
    switches = ("POISON", "SYNC", "GRAPHS", "FUSED", "PDL", "FOLD", "FOLD_LN", "GEMM", "ATTN", "QTC", "SKINNY")
    assert sorted(names) == sorted(f"ARCHKIT_CUDA_{k}" for k in switches)
    assert env_reads(ast.parse("os.environ.get('A'); os.environ['B']; os.getenv('C')")) == ["A", "B", "C"]


def test_options_from_the_environment():
    from core.cuda.options import Options

    assert Options.from_env({}) == Options()
    assert Options() == Options(poison=False, sync_each=False, graphs=True, fused=True, pdl=True, fold=True,
                                fold_ln=False, gemm="auto", attn="tc", qtc=False, skinny=False)
    env = {"ARCHKIT_CUDA_POISON": "1", "ARCHKIT_CUDA_SYNC": "1", "ARCHKIT_CUDA_GRAPHS": "0", "ARCHKIT_CUDA_FUSED": "0",
           "ARCHKIT_CUDA_PDL": "0", "ARCHKIT_CUDA_FOLD": "0", "ARCHKIT_CUDA_FOLD_LN": "1", "ARCHKIT_CUDA_GEMM": "own",
           "ARCHKIT_CUDA_ATTN": "simt", "ARCHKIT_CUDA_QTC": "1", "ARCHKIT_CUDA_SKINNY": "1"}
    assert Options.from_env(env) == Options(True, True, False, False, False, False, True, "own", "simt", True, True)
    # as before: POISON / SYNC / FOLD_LN / QTC / SKINNY are on only at "1", the others off only at "0"
    assert Options.from_env({k: "yes" for k in env if k[13:] not in ("GEMM", "ATTN")}) == Options()
    with pytest.raises(DeviceError, match=r"ARCHKIT_CUDA_GEMM='tf32': choose 'auto', 'own' or 'cublas'"):
        Options.from_env({"ARCHKIT_CUDA_GEMM": "tf32"})
    with pytest.raises(DeviceError, match=r"ARCHKIT_CUDA_ATTN='flash': choose 'tc' or 'simt'"):
        Options.from_env({"ARCHKIT_CUDA_ATTN": "flash"})


def cu_defines(name: str) -> dict[str, int]:
    """The integer #define defaults of a .cu / .cuh file."""
    text = (CUDA / name).read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define (\w+) \(?(\d+)\)?\b", text, re.M)}


def test_geometry_matches_the_kernels_macros():
    from core.cuda import geometry as g
    from core.cuda.elementwise import ACT_CODES, GEMV_ACT_MAX
    from core.spec import ACTIVATIONS

    gemv, attn, tc = cu_defines("gemv.cu"), cu_defines("attention.cu"), cu_defines("attention_tc.cu")
    assert (g.GEMV_MAX_T, g.GEMV_ROWS, g.GEMV_THREADS) == (gemv["GEMV_MAX_T"], gemv["GEMV_ROWS"], gemv["GEMV_THREADS"])
    assert g.NORM_VPT == cu_defines("norm.cu")["NORM_VPT"]
    sk = cu_defines("skinny.cu")
    assert g.SK_SUB == sk["SK_SUB"] and 8 * 8 == g.SKINNY_MAX_M  # SK_NT <= 8 tiles of 8 rows (its static_assert)
    assert (g.PREFILL_NQ, g.PREFILL_BK) == (attn["NWARP"] * attn["QPW"], attn["BK"])
    assert (g.TC_FQ, g.TC_FK, g.TC_NW) == (tc["FQ"], tc["FK"], tc["NW"])
    acts = cu_defines("common.cuh")
    assert {k: acts[f"ACT_{v}"] for k, v in (("gelu_new", "GELU_TANH"), ("gelu_pytorch_tanh", "GELU_TANH"),
                                            ("gelu_fast", "GELU_TANH"), ("gelu", "GELU_ERF"), ("silu", "SILU"),
                                            ("swish", "SILU"), ("relu", "RELU"), ("quick_gelu", "QUICK_GELU"),
                                            ("relu2", "RELU2"))} == ACT_CODES
    assert set(ACT_CODES) == set(ACTIVATIONS)  # every activation a config may name has a kernel
    # the GEMV epilogues know the codes up to ACT_GEMV_MAX (activate()); linear.py runs the others unfused
    assert GEMV_ACT_MAX == acts["ACT_GEMV_MAX"] == acts["ACT_RELU"]


def test_every_gemv_build_the_geometry_asks_for_is_compiled_by_ci():
    """gemv_geometry's defines (with the GEMV_MAX_T the rooms pass) are among modules.variants("gemv.cu"),
    except GEMV_EARLY_LAUNCH, which only changes where a block triggers the next launch."""
    from core.cuda import geometry as g
    from core.cuda.modules import DTYPE_CODES, variants

    built = {tuple(sorted(v.items())) for v in variants("gemv.cu")}
    widths = list(range(1, 6000, 61)) + [1024, 3072, 4096]
    for (dtype, code), K, M, qkv, gated in itertools.product(DTYPE_CODES.items(), widths, range(1, g.GEMV_MAX_T + 1),
                                                             (False, True), (False, True)):
        _, geo = g.gemv_geometry(K, M, dtype, qkv, gated)
        geo.pop("GEMV_EARLY_LAUNCH", None)
        defines = dict(geo, WDTYPE=code, GEMV_MAX_T=1 if M == 1 else g.GEMV_MAX_T)
        assert tuple(sorted(defines.items())) in built, (dtype, K, M, qkv, gated, defines)
    assert {("NORM_VPT", g.NORM_VPT), ("WDTYPE", 1)} == set(variants("norm.cu")[1].items())


@given(M=st.integers(5, 64), K=st.integers(1, 20000).map(lambda k: 8 * k), Ns=st.lists(st.integers(1, 200000), min_size=1,
       max_size=3), sms=st.sampled_from([1, 46, 108, 132, 144]))
def test_skinny_geometry_is_a_build_ci_compiles_and_covers_k(M, K, Ns, sms):
    """Every skinny.cu launch the backend makes: a compiled variant (modules.variants), slices of whole chunks
    covering K exactly, two chunks of x in the shared memory it asks for."""
    from core.cuda import geometry as g, modules

    nt, warps, kslice, slices, smem = g.skinny_geometry(M, K, Ns, sms)
    assert {"WDTYPE": 1, "SK_NT": nt, "SK_WARPS": warps, "SK_SUB": g.SK_SUB} in modules.variants("skinny.cu")
    assert 8 * nt >= M and (nt == 1 or 8 * nt // 2 < M)
    assert kslice % (32 * g.SK_SUB) == 0
    assert (slices - 1) * kslice < K <= slices * kslice
    assert smem == 2 * 8 * nt * (32 * g.SK_SUB + 4) * 4 <= 99 * 1024  # (skinny.cu SK_XS; opted into past 48 KB)
    tiles = sum(-(-n // (16 * warps)) for n in Ns)
    assert slices == 1 or tiles <= g.SK_COUNTERS
