"""Custom operations: a plugin's own op, shipped as a numpy reference plus a CUDA kernel (issue 14 §2).

A family whose layer functions (ModelSpec.attention_block / mlp_block) need an operation core lacks declares a
CustomOp and lists it in ModelSpec.ops; its layer function calls it as `step.be.custom(OP, *tensors, **scalars)`.

    XIELU = CustomOp(name="xielu", reference=xielu_numpy, cuda_source=Path(__file__).with_name("xielu.cu"),
                     launch=xielu_launch)

- reference(*arrays, **scalars) -> array: the oracle, in numpy. It computes in its inputs' precision: the numpy
  backend passes float32 arrays (and takes the result as float32), core.testing.check_op float64 ones.
- cuda_source: absolute path of the plugin's .cu file, or None (then the op runs on the numpy backend only).
  Core compiles it like its own kernels (core/cuda/modules.py): the same nvcc flags, -DWDTYPE=<the weight
  type>, common.cuh and the .cu's own folder on the include path, the same module cache. Kernels declare
  themselves extern "C"; they read activations as float, weights as `wt` (common.cuh: to_f / from_f).
- launch(kernels, *device tensors, **scalars) -> device tensor: the CUDA side, written against the launcher that
  core hands it (core/cuda/custom.py, Kernels):
      kernels.function(name, fmt)          the kernel `name` of cuda_source, prepared with PyCUDA format `fmt`
      kernels.empty(shape, dtype)          a fresh activation buffer (float32 unless said; NaN under poisoning)
      kernels.launch(fn, grid, block, *args, shared=0)   on the backend's stream, as op "custom(<name>)":
                                           captured into decode CUDA graphs, errors name the op
      kernels.grid1(n, block=256)          a 1-D grid for a grid-stride loop over n elements
      kernels.dtype                        the weight type ("float32", "float16", "bfloat16")
  Inside a decode graph the launch arguments are baked in: scalars must be the same at every step (values that
  change per step belong in device memory, as tensors).

Names: an op's name is short ("xielu"); the registry knows it as "<family>.<name>" ("apertus.xielu", see
registered()), so two plugins may each ship an op of the same name. The runtime never looks an op up by name:
a layer function holds its CustomOp record and passes it to be.custom, and the kernel caches are keyed by the
source file's path. Within one family names must be unique (core.spec.validate_spec).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import attrs

NAME = re.compile(r"[a-z][a-z0-9_]*")


@attrs.frozen
class CustomOp:
    """A plugin's own operation: its numpy reference, its CUDA source and launcher (see the module docstring)."""

    name: str
    reference: Any  # callable(*arrays, **scalars) -> array
    cuda_source: Any = None  # absolute path (str or os.PathLike) of a .cu file, or None
    launch: Any = None  # callable(kernels, *tensors, **scalars) -> tensor, or None without cuda_source
    description: str = ""

    @property
    def source_path(self) -> Path | None:
        """cuda_source as a Path (None without one)."""
        return None if self.cuda_source is None else Path(self.cuda_source)


def validate_op(op: Any) -> list[str]:
    """Every way `op` breaks the CustomOp contract, as messages (empty when it is valid)."""
    if type(op) is not CustomOp:
        return [f"op {op!r} is not a core.custom_ops.CustomOp"]
    who = f"op {op.name!r}"
    if type(op.name) is not str or not NAME.fullmatch(op.name):
        return [f"op name {op.name!r} must be lowercase letters, digits or '_', starting with a letter (the registry "
                f"calls it '<family>.<name>')"]
    bad = []
    if not callable(op.reference):
        bad.append(f"{who}: reference {op.reference!r} is not callable (a numpy function of the op's arrays)")
    src = op.cuda_source
    if src is None:
        if op.launch is not None:
            bad.append(f"{who}: launch is given but cuda_source is None (nothing to compile)")
    elif not isinstance(src, (str, os.PathLike)):
        bad.append(f"{who}: cuda_source {src!r} must be a path (str or os.PathLike) or None")
    else:
        path = Path(src)
        if path.suffix != ".cu":
            bad.append(f"{who}: cuda_source {str(path)!r} must be a .cu file")
        elif not path.is_absolute():
            bad.append(f"{who}: cuda_source {str(path)!r} must be an absolute path "
                       f"(e.g. Path(__file__).with_name({path.name!r}))")
        elif not path.is_file():
            bad.append(f"{who}: cuda_source {str(path)!r} does not exist (is the .cu file installed with the plugin, "
                       f"as package data?)")
        if not callable(op.launch):
            bad.append(f"{who}: launch {op.launch!r} is not callable (fn(kernels, *tensors, **scalars) -> tensor)")
    return bad


def validate_ops(ops: Any) -> list[str]:
    """Problems of a spec's `ops` field: a tuple of valid CustomOp records with unique names."""
    if type(ops) is not tuple:
        return [f"ops must be a tuple of core.custom_ops.CustomOp, got {type(ops).__name__}"]
    bad, seen = [], set()
    for op in ops:
        bad += validate_op(op)
        name = getattr(op, "name", None)
        if isinstance(name, str) and name in seen:
            bad.append(f"op name {name!r} is used twice (a family's op names must be unique)")
        seen.add(name)
    return bad


def registered(registry) -> dict[str, CustomOp]:
    """Every op of every family in `registry`, by its qualified name "<family>.<op>"."""
    return {f"{e.spec.name}.{op.name}": op for e in registry.entries() for op in e.spec.ops}
