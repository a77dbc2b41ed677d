"""core.load: checkpoint dir (or hub id) → detect → spec → config → weights → backend → Model. All or nothing."""

from __future__ import annotations

import gc
import itertools
import os
from collections.abc import Callable
from pathlib import Path

from .backend import DTYPES, NumpyBackend, Weights
from .checkpoint import Checkpoint
from .config import ModelConfig
from .config_keys import ids_of
from .detect import detect
from .errors import CheckpointError, ConfigError, DeviceError, UnknownArchitectureError
from .genconfig import GenerationDefaults
from .hub import resolve
from .log import logger, warn_once
from .model import Model
from .registry import Registry, default_registry
from .weights import plan

DEVICES = ("auto", "cpu", "numpy", "cuda")


def cuda_available() -> tuple[bool, str]:
    """(usable, reason): PyCUDA importable and a GPU present."""
    try:
        import pycuda.driver as drv  # noqa: F401
    except Exception as e:  # ImportError, or a broken libcuda
        return False, f"PyCUDA is not importable ({type(e).__name__}: {e})"
    try:
        drv.init()
        if drv.Device.count() == 0:
            return False, "no CUDA device found"
    except Exception as e:
        return False, f"CUDA driver unavailable ({e})"
    return True, "PyCUDA and a GPU are present"


def make_backend(device: str, dtype: str | None, ckpt: Checkpoint | None = None, quiet: bool = False,
                 context: int | None = None, tensor_parallel: int = 1):
    """The backend for `device` ("auto" picks cuda when usable, else numpy, and logs which unless `quiet`).

    context: positions of KV cache to preallocate on the GPU (default: the model's context, capped by free
    memory); the numpy backend sizes its cache per call and ignores it.
    tensor_parallel: ranks to split the model over (core/tp_numpy.py; on the numpy backend only, for now).
    """
    if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
        raise DeviceError(f"context={context!r} must be a positive number of positions")
    if device not in DEVICES:
        raise DeviceError(f"device {device!r} is not one of {list(DEVICES)}")
    if dtype is not None and dtype not in DTYPES:
        raise DeviceError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    if tensor_parallel != 1:
        from .tp_numpy import make_backend as tensor_parallel_backend
        return tensor_parallel_backend(device, dtype, tensor_parallel, quiet)
    if device == "auto":
        ok, why = cuda_available()
        device = "cuda" if ok else "cpu"
        if not quiet:
            logger.info("device auto → %s (%s)", device, why)
    if device in ("cpu", "numpy"):
        return NumpyBackend(dtype or "float32")
    ok, why = cuda_available()
    if not ok:
        raise DeviceError(f"device 'cuda' is not usable: {why}")
    try:
        from .cuda.backend import CudaBackend
    except ImportError as e:
        raise DeviceError(f"device 'cuda' is not usable: {e}") from None
    return CudaBackend(dtype or CudaBackend.default_dtype(ckpt), context=context)


def eos_ids(config: ModelConfig, generation: dict, source: str) -> tuple[int, ...]:
    """EOS ids from generation_config.json and config.json together.

    An id outside the vocabulary is ignored with a warning, as config.json's are (see core.config): transformers
    loads such a checkpoint and never emits that id.
    """
    ids = tuple(dict.fromkeys(ids_of(generation.get("eos_token_id"), "eos_token_id", source) + config.eos_token_ids))
    outside = [t for t in ids if not 0 <= t < config.vocab_size]
    if outside:
        warn_once(f"{source}: eos_token_id {', '.join(map(str, outside))} outside the vocabulary "
                  f"[0, {config.vocab_size}): ignored, as transformers never emits it")
    return tuple(t for t in ids if 0 <= t < config.vocab_size)


def load(path: str | os.PathLike, arch: str | None = None, dtype: str | None = None, device: str = "auto",
         registry: Registry | None = None, quiet: bool = False,
         progress: Callable[[int, int, int, int], None] | None = None, context: int | None = None,
         revision: str | None = None, tensor_parallel: int = 1) -> Model:
    """Load a Hugging Face-style checkpoint directory, or a hub id ("Qwen/Qwen3-0.6B") through huggingface_hub.

    path: a directory (always wins when it exists), else a hub id looked up in the Hugging Face cache and, unless
    HF_HUB_OFFLINE is set, downloaded (see core.hub); revision: the hub id's branch, tag or commit.

    arch: a registered family name, or None to detect it from config.json / tensor names.
    dtype: "float32", "float16" or "bfloat16" (default: float32 on the CPU; the checkpoint's half type on CUDA).
    device: "auto", "cpu" (numpy) or "cuda"; "auto" logs its choice to the "archkit" logger (INFO) unless `quiet`.
    context: KV-cache positions to preallocate on the GPU (default: max_position_embeddings capped by free memory).
    progress: called as progress(done_bytes, total_bytes, file_number, num_files) before the first tensor
    and after each tensor is read (file_number is the 1-based safetensors file it came from).
    tensor_parallel: split the model over this many ranks (core/tp.py's plan; each rank reads only its slices).
    For now on the CPU only: N in-process ranks on the numpy backend (core/tp_numpy.py), same logits as unsplit.

    >>> model = core.load("ckpt/")  # doctest: +SKIP
    >>> model.generate_text("Once upon a time", max_new_tokens=20)  # doctest: +SKIP
    """
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"path={path!r:.80} must be a checkpoint directory or a hub id (str or os.PathLike)")
    if arch is not None and not isinstance(arch, str):
        raise UnknownArchitectureError(f"arch={arch!r:.80} must be a family name (str) or None to detect it")
    reg = registry if registry is not None else default_registry()
    path = resolve(path, revision)
    ckpt = Checkpoint(path)
    detected = None
    if arch is None:
        detected = detect(ckpt, reg)
        arch = detected.name
    entry = reg[arch]
    if ckpt.config is None:
        raise ConfigError(f"{ckpt.path}: config.json not found; it is needed for the model's sizes "
                          f"(the tensor names look like {arch!r})")
    config = ModelConfig.from_hf(entry.spec, ckpt.config, source=str(ckpt.path / "config.json"))
    gen_source = str(ckpt.path / "generation_config.json")
    eos = eos_ids(config, ckpt.generation_config, gen_source)
    defaults = GenerationDefaults.from_hf(ckpt.generation_config, gen_source)
    p = plan(entry.spec, config, ckpt)  # every name and shape checked before any data is read
    tokenizer = ckpt.tokenizer  # read (and checked) with the checkpoint
    backend = make_backend(device, dtype, ckpt, quiet, context, tensor_parallel)
    weights = Weights(layers=[{} for _ in range(config.num_layers)])
    try:
        kept, take = _kept_quantized(backend, p, config)
        backend.begin_loading(config, sum(src.info.numel for src in p.sources if id(src) not in kept) + p.fill_numel,
                              sum(kept.values()))
        report = _progress_reporter(p, ckpt, progress)
        sharded = getattr(backend, "load_weights", None)  # a tensor-parallel backend reads each rank's slices itself
        loaded = sharded(entry.spec, p) if sharded is not None else p.load(backend.convert, take)
        for role, layer, t in itertools.chain(loaded, p.fill(backend.convert)):  # fill: weightless norms' ones
            (weights.globals if layer is None else weights.layers[layer])[role] = t
            report(role, layer)
        backend.finish_loading(weights)
    except BaseException:
        backend.release(weights)
        t = None  # noqa: F841  the traceback keeps this frame alive: it must not keep the last tensor too
        gc.collect()
        raise
    device = "cpu" if backend.name == "numpy" else backend.name
    return Model(entry.spec, config, backend, weights, tokenizer, eos, Path(path), detected, device,
                 generation_defaults=defaults)


def _kept_quantized(backend, p, config):
    """({id(source): device bytes} of the quantized weights the backend keeps as stored, Plan.load's `quantized`
    hook handing them to it), through its optional quantized_nbytes / convert_quantized (core/backend_api.py), each
    given Source.stored (a QuantizedTensor, or an expert role's QuantizedStack); the other weights are dequantized
    on the host and converted."""
    size, take = getattr(backend, "quantized_nbytes", None), getattr(backend, "convert_quantized", None)
    if size is None or take is None:
        return {}, None
    kept = {id(src): size(src.stored, src.rule.targets[0], config) for src in p.sources if src.quantized}
    kept = {k: n for k, n in kept.items() if n is not None}
    return kept, (lambda src: take(src.stored, src.rule.targets[0]) if id(src) in kept else None)


def _progress_reporter(p, ckpt: Checkpoint, progress):
    """A (role, layer) hook for the load loop that calls `progress` once per checkpoint tensor read."""
    if progress is None:
        return lambda role, layer: None
    last = {(src.rule.targets[-1], src.layer): src for src in p.sources}  # a fused tensor is done at its last role
    files = {f: i for i, f in enumerate(ckpt.files, 1)}
    total, done = sum(src.info.nbytes for src in p.sources), 0
    progress(0, total, 1, len(files))

    def report(role, layer):
        nonlocal done
        src = last.get((role, layer))
        if src is not None:
            done += src.info.nbytes
            progress(done, total, files[src.info.file], len(files))
    return report
