"""Kernel launches with programmatic dependent launch (PDL), through the driver API over ctypes.

PyCUDA launches through cuLaunchKernel, which has no launch attributes. On Hopper a kernel launched by
cuLaunchKernelEx with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may start while the kernel
before it on the stream is still running; it waits for that kernel's results with griddepcontrol.wait
(pdl_wait() in common.cuh), so its launch latency and the first weight loads of a GEMV overlap the tail of
the previous kernel. Captured into a CUDA graph, the dependency becomes a programmatic edge. The backend
uses this only while capturing a decode step, and only for kernels written for it (launch.PDL_KERNELS).
"""

from __future__ import annotations

import ctypes

from ..errors import DeviceError
from .modules import get_cubin

ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID (cuda.h)


class _Attr(ctypes.Structure):  # CUlaunchAttribute: id, 4 bytes of padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_int * 16)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attr)), ("numAttrs", ctypes.c_uint)]


_ARG = {"P": ctypes.c_uint64, "i": ctypes.c_int32, "I": ctypes.c_uint32, "q": ctypes.c_int64, "Q": ctypes.c_uint64,
        "f": ctypes.c_float, "d": ctypes.c_double}
_lib = None
_functions: dict = {}


def _cuda():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
        lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
        lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                         ctypes.c_void_p]
        for f in (lib.cuModuleLoadData, lib.cuModuleGetFunction, lib.cuLaunchKernelEx):
            f.restype = ctypes.c_int
        _lib = lib
    return _lib


def function(file: str, kernel: str, defines: dict) -> int:
    """CUfunction of `kernel` in the module compiled from `file` with `defines` (the same cubin PyCUDA
    loaded), loaded once per process into the current (primary) context."""
    key = (file, kernel, tuple(sorted(defines.items())))
    fn = _functions.get(key)
    if fn is None:
        lib, mod, f = _cuda(), ctypes.c_void_p(), ctypes.c_void_p()
        rc = lib.cuModuleLoadData(ctypes.byref(mod), get_cubin(file, defines))
        if rc == 0:
            rc = lib.cuModuleGetFunction(ctypes.byref(f), mod, kernel.encode())
        if rc != 0:
            raise DeviceError(f"cannot load kernel {kernel!r} from {file} through the driver API (CUresult {rc})")
        fn = _functions[key] = f.value
    return fn


def launch(fn: int, fmt: str, grid, block, stream_handle: int, args, shared: int = 0) -> int:
    """cuLaunchKernelEx of fn with programmatic stream serialization; args as PyCUDA's prepared format
    characters in fmt. Returns the CUresult (0 on success)."""
    vals = [_ARG[c](a) for c, a in zip(fmt, args)]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
    attr = _Attr(ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, 0)
    attr.value[0] = 1
    cfg = _Config(*grid, *block, shared, ctypes.c_void_p(stream_handle), ctypes.pointer(attr), 1)
    return _cuda().cuLaunchKernelEx(ctypes.byref(cfg), ctypes.c_void_p(fn), params, None)
