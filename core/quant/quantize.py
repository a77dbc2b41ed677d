"""`archkit quantize SRC DST --scheme w4a16|w8a16|fp8 [--calibrate TEXT]`: round-to-nearest (or, with calibration
text, GPTQ: core/quant/gptq.py) quantization of a plain checkpoint, written
as a compressed-tensors checkpoint: the format llm-compressor writes, which transformers (with the compressed-tensors
package; tests/test_quant_formats.py) and vLLM read (vLLM is not tested here).

Which tensors: the matrices of the attention and MLP roles (q, k, v, o, gate, up, down; experts and shared experts
too), found through the family's own weight rules, stored as a Linear's [out, in]. Embeddings, norms, the router,
lm_head, and weights stored transposed (GPT-2's Conv1D, which compressed-tensors cannot target) stay as they are and
are listed in `ignore`. Scales are computed as compressed-tensors' min-max observer does (calculate_qparams):
symmetric s = max|w| / ((q_max - q_min) / 2), asymmetric s = (max(w, 0) - min(w, 0)) / (q_max - q_min) with zero point
round(q_min - min / s); FP8 s = max|w| / 448 per output channel. They are stored in the weight's own dtype and the
integers are rounded (half to even) against that stored scale, so dequantization gives back what was measured.
The output is written one tensor at a time, shard for shard like the source, into DST.tmp and renamed to DST.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint, TensorInfo, read_tensor, to_float32
from ..errors import QuantizationError
from ..log import logger
from .pack import float32_to_e4m3, fp8_scale, pack, round_to

SCHEMES = {  # name → (type, bits, default group size; -1 = one scale per output channel)
    "w4a16": ("int", 4, 128),
    "w8a16": ("int", 8, -1),
    "fp8": ("float", 8, -1),
}
QUANTIZABLE = {"q.weight", "k.weight", "v.weight", "o.weight", "gate.weight", "up.weight", "down.weight"}
QUANTIZABLE |= {f"{p}.{r}" for p in ("experts", "shared") for r in ("gate.weight", "up.weight", "down.weight")}
CT_VERSION = "0.20.1"  # the compressed-tensors release whose format this writes (and the tests load it with)
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def add_arguments(p) -> None:
    """Register `archkit quantize`'s options on its subparser."""
    p.add_argument("src", help="a plain checkpoint directory (or hub id)")
    p.add_argument("dst", help="the directory to write (must not exist)")
    p.add_argument("--scheme", required=True, choices=sorted(SCHEMES),
                   help="w4a16: int4 weights, one scale per group; w8a16: int8, per channel (or per group); "
                        "fp8: float8 e4m3 weights, per channel")
    p.add_argument("--group-size", type=int, help="input columns sharing a scale (w4a16 default 128; -1 = per "
                   "channel, the w8a16 default); a weight whose columns it does not divide stays unquantized")
    p.add_argument("--asym", action="store_true", help="int schemes: a zero point per scale (default symmetric)")
    p.add_argument("--calibrate", metavar="TEXT_FILE", help="GPTQ instead of round-to-nearest, measuring each "
                   "layer's inputs on this UTF-8 text (core/quant/gptq.py)")
    p.add_argument("--calibration-tokens", type=int, default=32768, help="tokens of --calibrate's text to use "
                   "(default 32768)")
    p.add_argument("--no-clip-search", action="store_true", help="with --calibrate: plain GPTQ, min-max ranges, "
                   "columns in stored order (about 10x faster; by default each row keeps the best of seven shrink "
                   "factors of its ranges times two column orders, stored and act-order)")
    p.add_argument("--arch", help="family name (default: detect from the checkpoint)")
    p.add_argument("--revision", help="branch, tag or commit of a hub id (default: main)")


def cmd_quantize(args) -> int:
    """Run `archkit quantize`; prints what was quantized and the bytes before and after."""
    from ..progress import ProgressBar

    text = None
    if args.calibrate is not None:
        try:
            text = Path(args.calibrate).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QuantizationError(f"{args.calibrate}: cannot read the calibration text: {e}") from None
    out = quantize(args.src, args.dst, args.scheme, args.group_size, not args.asym, args.arch, args.revision,
                   progress=ProgressBar(), calibration=text, calibration_tokens=args.calibration_tokens,
                   clip_search=not args.no_clip_search)
    how = f", {out['calibrated']} by GPTQ" if text is not None else ""
    print(f"wrote {out['path']}: {out['quantized']} weights as {out['scheme']} ({out['format']}{how}), "
          f"{len(out['ignore'])} modules left unquantized; {out['bytes_before'] / 1e6:,.1f} MB -> "
          f"{out['bytes_after'] / 1e6:,.1f} MB")
    return 0


# -- round to nearest -----------------------------------------------------------------------------------------------

def rtn_int(w: np.ndarray, bits: int, group: int, symmetric: bool, scale_dtype: str):
    """Round-to-nearest integer quantization of w [N, K] (float32), `group` input columns per scale (-1: all).

    Returns (q int8 [N, K] in [-2**(bits-1), 2**(bits-1)), scale bits [N, G] in scale_dtype, zero point int8 [N, G]
    or None); W ≈ (q - z) * s per group, as compressed-tensors dequantizes.
    """
    n, k = w.shape
    g = k if group == -1 else group
    x = w.reshape(n, k // g, g)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    s = np.maximum(-lo, hi) / ((qmax - qmin) / 2) if symmetric else (hi - lo) / (qmax - qmin)
    s_bits = round_to(np.where(s > 0, s, 1.0), scale_dtype)  # an all-zero group: any scale gives q = 0
    s = to_float32(s_bits, scale_dtype)
    z = None if symmetric else np.clip(np.rint(qmin - lo / s), qmin, qmax)
    q = np.rint(x / s[..., None]) + (0 if z is None else z[..., None])
    q = np.clip(q, qmin, qmax).astype(np.int8).reshape(n, k)
    return q, s_bits, None if z is None else z.astype(np.int8)


def rtn_fp8(w: np.ndarray, scale_dtype: str):
    """FP8 (e4m3) quantization of w [N, K] with one scale per output channel: (codes uint8 [N, K], scale [N, 1])."""
    s_bits = fp8_scale(w, scale_dtype)
    return float32_to_e4m3(w / to_float32(s_bits, scale_dtype)), s_bits


# -- planning -------------------------------------------------------------------------------------------------------

def _choose(ckpt: Checkpoint, arch: str | None, group: int):
    """(names of the tensors to quantize, the modules left as they are for `ignore`) through the family's rules."""
    if ckpt.config is None:
        raise QuantizationError(f"{ckpt.path}: config.json not found; quantizing needs the model's sizes")
    p = model_plan(ckpt, arch)
    chosen, skipped = set(), []
    for src in p.sources:
        for info in src.infos:
            ok = (set(src.rule.targets) <= QUANTIZABLE and not src.rule.transpose and len(info.shape) == 2
                  and info.name.endswith(".weight"))
            if ok and group != -1 and info.shape[1] % group:
                skipped.append(info.name)
            elif ok:
                chosen.add(info.name)
    if not chosen:
        raise QuantizationError(f"{ckpt.path}: no weight can be quantized (quantizable: the attention and MLP "
                                f"matrices stored as [out, in] whose columns --group-size {group} divides)")
    if skipped:
        logger.warning("%d weights left unquantized: their input columns are not a multiple of --group-size %d "
                       "(%s, ...)", len(skipped), group, skipped[0])
    embeds = {i.name for s in p.sources if set(s.rule.targets) & {"embed", "pos_embed"} for i in s.infos}
    ignore = {"lm_head"} | {n.removesuffix(".weight") for n, i in ckpt.tensors.items()
                            if n.endswith(".weight") and len(i.shape) == 2 and n not in chosen | embeds}
    return chosen, sorted(ignore)


def _outputs(info: TensorInfo, kind: str, bits: int, group: int, symmetric: bool):
    """The (name, dtype, shape) a quantized weight becomes, in the order they are written."""
    p, (n, k) = info.name.removesuffix(".weight"), info.shape
    cols = 1 if group == -1 else k // group
    if kind == "float":
        return [(f"{p}.weight", "F8_E4M3", [n, k]), (f"{p}.weight_scale", info.dtype, [n, 1])]
    out = [(f"{p}.weight_packed", "I32", [n, math.ceil(k * bits / 32)]), (f"{p}.weight_scale", info.dtype, [n, cols]),
           (f"{p}.weight_shape", "I64", [2])]
    if not symmetric:
        out.append((f"{p}.weight_zero_point", "I32", [math.ceil(n * bits / 32), cols]))
    return out


def _arrays(info: TensorInfo, kind: str, bits: int, group: int, symmetric: bool, solved=None) -> list[np.ndarray]:
    """The data of _outputs(info, ...), computed from the stored weight (or given: GPTQ's (q, s, z))."""
    if kind == "float":
        return list(solved if solved is not None else rtn_fp8(to_float32(read_tensor(info), info.dtype), info.dtype))
    if solved is None:
        w = to_float32(read_tensor(info), info.dtype)
    q, s, z = solved if solved is not None else rtn_int(w, bits, group, symmetric, info.dtype)
    off = 1 << (bits - 1)  # pack_to_int32 stores q + 2**(bits - 1), unsigned
    out = [pack((q.astype(np.int32) + off).astype(np.uint8), bits, axis=1), s, np.asarray(info.shape, np.int64)]
    if z is not None:
        out.append(pack((z.astype(np.int32) + off).astype(np.uint8), bits, axis=0))
    return out


def quantization_config(kind: str, bits: int, group: int, symmetric: bool, ignore: list[str]) -> dict:
    """The config.json quantization_config of what quantize() writes, as compressed-tensors' ModelCompressor
    writes it."""
    fmt = "float-quantized" if kind == "float" else "pack-quantized"
    weights = {"num_bits": bits, "type": kind, "symmetric": symmetric, "dynamic": False,
               "strategy": "channel" if group == -1 else "group", "group_size": None if group == -1 else group}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": fmt}},
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}, "version": CT_VERSION}


# -- writing --------------------------------------------------------------------------------------------------------

def _write_file(path: Path, jobs, done=lambda: None) -> int:
    """Write one safetensors file from jobs [(entries [(name, dtype, shape)], produce() -> arrays)], streaming one job's
    arrays at a time (done() after each); returns the bytes written."""
    from ..safetensors_io import DTYPES

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entries, _ in jobs:
        for name, dtype, shape in entries:
            size = math.prod(shape) * DTYPES[dtype][1]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for entries, produce in jobs:
            arrays = produce()
            for (name, dtype, shape), a in zip(entries, arrays, strict=True):
                data = np.ascontiguousarray(a).tobytes()
                assert len(data) == header[name]["data_offsets"][1] - header[name]["data_offsets"][0], name
                f.write(data)
            del arrays
            done()
    return 8 + len(raw) + offset


def quantize(src, dst, scheme: str, group_size: int | None = None, symmetric: bool = True, arch: str | None = None,
             revision: str | None = None, progress=None, calibration: str | None = None,
             calibration_tokens: int = 32768, clip_search: bool = True) -> dict:
    """Quantize checkpoint `src` into a new compressed-tensors checkpoint `dst` (see the module docstring).

    progress: called as progress(done_bytes, total_bytes, file_number, num_files), as core.load's is.
    calibration: text to run the model on for GPTQ (core/quant/gptq.py; every scheme), its first
    `calibration_tokens` tokens; None quantizes round-to-nearest. clip_search: GPTQ tries seven shrink factors of
    each row's ranges in two column orders (stored, act-order) and keeps the best (core/quant/gptq.py); False runs
    plain GPTQ.

    Returns a summary: path, scheme, format, quantized (count), ignore, bytes_before, bytes_after.
    """
    from ..hub import resolve

    if scheme not in SCHEMES:
        raise QuantizationError(f"scheme {scheme!r} is not one of {sorted(SCHEMES)}")
    kind, bits, default_group = SCHEMES[scheme]
    group = default_group if group_size is None else group_size
    if kind == "float" and group != -1:
        raise QuantizationError(f"--group-size {group} is not usable with fp8, which has one scale per output channel")
    if group != -1 and group < 1:
        raise QuantizationError(f"--group-size {group} must be a positive number of columns, or -1 for one scale per "
                                f"output channel")
    if kind == "float" and not symmetric:
        raise QuantizationError("fp8 has no zero point: --asym applies to the int schemes")
    if calibration is not None and (not isinstance(calibration_tokens, int) or calibration_tokens < 2):
        raise QuantizationError(f"--calibration-tokens {calibration_tokens!r} must be an integer >= 2")
    dst = Path(dst)
    if dst.exists():
        raise QuantizationError(f"{dst}: already exists; archkit quantize writes a new directory")
    ckpt = Checkpoint(resolve(src, revision))
    if ckpt.quantization is not None:
        raise QuantizationError(f"{ckpt.path}: the checkpoint is already quantized ({ckpt.quantization.method}); "
                                f"quantize a plain one")
    chosen, ignore = _choose(ckpt, arch, group)
    solved = _calibrate(ckpt, arch, chosen, calibration, calibration_tokens, kind, bits, group, symmetric,
                        clip_search) if calibration is not None else {}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        after, weight_map = _write_all(ckpt, tmp, chosen, kind, bits, group, symmetric, progress, solved)
        _write_side_files(ckpt, tmp, weight_map, after, quantization_config(kind, bits, group, symmetric, ignore))
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(dst), "scheme": scheme, "format": "float-quantized" if kind == "float" else "pack-quantized",
            "quantized": len(chosen), "ignore": ignore, "bytes_before": ckpt.nbytes, "bytes_after": after,
            "calibrated": len(solved)}


def _calibrate(ckpt: Checkpoint, arch: str | None, chosen: set, text: str, tokens: int, kind: str, bits: int,
               group: int, symmetric: bool, clip_search: bool = True) -> dict:
    """{tensor name: (q, scale bits, zero point)} (fp8: (codes, scale bits)) by GPTQ for every chosen weight a linear
    saw on the calibration text (core/quant/gptq.py); the others (experts behind the moe op) stay round-to-nearest."""
    from ..load import load
    from .gptq import CLIP, ORDERS, calibration_windows, gptq_fp8, gptq_int, hessians

    if not isinstance(text, str):
        raise QuantizationError(f"the calibration text must be a str, got {type(text).__name__}")
    model = load(ckpt.path, arch=arch, device="cpu", dtype="float32", quiet=True)
    if model.tokenizer is None:
        raise QuantizationError(f"{ckpt.path}: no tokenizer to turn the calibration text into tokens")
    names = {}
    for src in model_plan(ckpt, arch).sources:
        if len(src.infos) == 1 and src.infos[0].name in chosen:
            where = model.weights.globals if src.layer is None else model.weights.layers[src.layer]
            for role in src.rule.targets:
                if role in where:
                    names[id(where[role])] = src.infos[0].name
    stats = hessians(model, names, calibration_windows(model.tokenizer, text, tokens))
    out = {}
    for name, (xtx, _) in stats.items():
        info = ckpt.tensors[name]
        w = to_float32(read_tensor(info), info.dtype)
        out[name] = gptq_fp8(w, xtx, info.dtype) if kind == "float" else gptq_int(
            w, xtx, bits, group, symmetric, info.dtype, clip=CLIP if clip_search else (1.0,),
            orders=ORDERS if clip_search else (False,))
    logger.info("GPTQ: %d of %d weights calibrated on %d tokens", len(out), len(chosen),
                min(tokens, len(model.tokenizer.encode(text))))
    return out


def model_plan(ckpt: Checkpoint, arch: str | None):
    """The loading plan of `ckpt` (its family's weight rules matched against its tensors)."""
    from ..config import ModelConfig
    from ..detect import detect
    from ..registry import default_registry
    from ..weights import plan

    reg = default_registry()
    spec = reg[arch or detect(ckpt, reg).name].spec
    return plan(spec, ModelConfig.from_hf(spec, ckpt.config, str(ckpt.path / "config.json")), ckpt)


def _write_all(ckpt: Checkpoint, out: Path, chosen: set, kind: str, bits: int, group: int, symmetric: bool,
               progress=None, solved=None):
    """Every safetensors file of `ckpt`, quantized where chosen, under the same file names; (bytes, weight map)."""
    weight_map, total, read = {}, 0, 0
    report = progress or (lambda *a: None)
    report(0, ckpt.nbytes, 1, len(ckpt.files))
    for number, f in enumerate(ckpt.files, 1):
        infos = sorted((i for i in ckpt.tensors.values() if i.file == f), key=lambda i: i.offset)
        jobs = []
        for info in infos:
            if info.name in chosen:
                entries = _outputs(info, kind, bits, group, symmetric)
                jobs.append((entries, lambda info=info: _arrays(info, kind, bits, group, symmetric,
                                                                (solved or {}).get(info.name))))
            else:
                entries = [(info.name, info.dtype, list(info.shape))]
                jobs.append((entries, lambda info=info: [read_tensor(info)]))
            weight_map.update({name: f.name for name, _, _ in entries})
        sizes = iter([i.nbytes for i in infos])

        def done(number=number, sizes=sizes):
            nonlocal read
            read += next(sizes)
            report(read, ckpt.nbytes, number, len(ckpt.files))
        total += _write_file(out / f.name, jobs, done)
    return total, weight_map


def _write_side_files(ckpt: Checkpoint, out: Path, weight_map: dict, nbytes: int, qc: dict) -> None:
    """config.json with the quantization_config, the index when the source is sharded, and every other file as is."""
    for f in sorted(ckpt.path.iterdir()):
        if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json") \
                and not f.name.endswith(WEIGHT_FILES):
            shutil.copyfile(f, out / f.name)
    (out / "config.json").write_text(json.dumps({**ckpt.config, "quantization_config": qc}, indent=2) + "\n")
    if (ckpt.path / "model.safetensors.index.json").exists():
        index = {"metadata": {"total_size": nbytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
