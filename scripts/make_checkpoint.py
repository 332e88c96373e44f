#!/usr/bin/env python3
"""Write a synthetic Grok-1-architecture checkpoint of any size in the release layout:
<out>/ckpt-0/tensor%05d_000 (one pickle per parameter, in release order) + <out>/config.json.

The files are byte-for-byte what CPython's C pickler writes at protocol 4, but the opcode
stream is produced here so that payloads are generated and streamed in chunks (a whole
large tensor is never in memory). Values are seeded, with trained-model-like statistics.
API: release_param_names, param_shapes, make_config, param_value, write_array,
write_quantized, write_param, write_checkpoint, checkpoint_sizes, CountingSink, LazyArray.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pickle
import shutil
import struct
import sys
import time
from statistics import NormalDist
from typing import Callable

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
ROW_BLOCKS = 8  # scale blocks of the row-parallel layers (the reference's 8-way model axis)
DEFAULT_CHUNK_BYTES = 4 << 20

# ---- Pickle protocol 4, as CPython's C pickler (Modules/_pickle.c) writes it. ----------
FRAME_TARGET = 64 * 1024  # FRAME_SIZE_TARGET: frames are cut at the first save() past it,
                          # and a payload this large bypasses the frame entirely
FRAME_MIN = 4             # FRAME_SIZE_MIN: a shorter frame is written without its header

# bf16's dtype state is (3, '<', None, None, None, 2, 2, flags). The spec quotes flags 64
# for the release; numpy 1.26.4 + ml_dtypes 0.4.1 pickle 80. We write what the pinned
# Python stack writes (the size is the same either way: BININT1 in both cases).
BF16_DTYPE_FLAGS = 80

# dtype -> (first reduce argument: a str or a (module, name) global, byte order,
#           elsize, alignment, flags) of numpy's dtype.__reduce__ state.
_DTYPE_STATE = {
    np.dtype(np.float32): ("f4", "<", -1, -1, 0),
    np.dtype(np.int8): ("i1", "|", -1, -1, 0),
    BF16: (("ml_dtypes", "bfloat16"), "<", 2, 2, BF16_DTYPE_FLAGS),
}


@dataclasses.dataclass
class LazyArray:
    """A C-order array known by its shape, dtype and `fill(start, count)`, which returns
    the flat elements [start, start + count) as a 1-D array of that dtype."""
    shape: tuple
    dtype: np.dtype
    fill: Callable[[int, int], np.ndarray]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


def as_lazy(a) -> LazyArray:
    if isinstance(a, LazyArray):
        return a
    flat = np.ascontiguousarray(a).reshape(-1)
    return LazyArray(tuple(a.shape), a.dtype, lambda s, c: flat[s:s + c])


class CountingSink:
    """Counts bytes and stores nothing; the writer skips generating payloads for it."""
    counts_only = True

    def __init__(self):
        self.nbytes = 0

    def write(self, b) -> None:
        self.nbytes += len(b)

    def skip(self, n: int) -> None:
        self.nbytes += n


@dataclasses.dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclasses.dataclass(eq=False)
class _Data:  # an array's raw bytes: a fresh bytes object in CPython, memoized, never reused
    arr: LazyArray


class _Pickler:
    """Emulates the C pickler's framing and memo for the few object kinds we write.

    `save()` starts, as C `save()` does, by committing the open frame once it holds
    >= 64 KiB. Memo keys are values, which equals CPython's identity-based memo for these
    objects (interned strings, dtype singletons, the b'b' constant); fresh tuples and
    payloads are memoized but never reused."""

    def __init__(self, sink, chunk_bytes: int):
        self.sink, self.chunk_bytes = sink, max(1, chunk_bytes)
        self.counting = getattr(sink, "counts_only", False)
        self.frame = bytearray()  # the open frame's content; empty = no frame open
        self.memo: dict = {}
        sink.write(b"\x80\x04")  # PROTO 4 goes out before framing is switched on

    def commit(self) -> None:
        f, self.frame = self.frame, bytearray()
        if len(f) >= FRAME_MIN:
            self.sink.write(b"\x95" + struct.pack("<Q", len(f)) + bytes(f))
        elif f:
            self.sink.write(bytes(f))

    def op(self, b: bytes) -> None:
        self.frame += b

    def memoize(self, key=None) -> None:
        self.frame += b"\x94"  # MEMOIZE; the memo index is the count of earlier MEMOIZEs
        self.memo[key if key is not None else object()] = len(self.memo)

    def boundary(self) -> None:  # what C save() does first
        if len(self.frame) >= FRAME_TARGET:
            self.commit()

    def save(self, x) -> None:
        self.boundary()
        key = ("dtype", x) if isinstance(x, np.dtype) else (
            (type(x), x) if isinstance(x, (str, bytes, _Global)) else None)
        if key is not None and key in self.memo:
            i = self.memo[key]
            self.op(b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i))  # BINGET
            return
        if x is None or isinstance(x, bool):
            self.op({None: b"N", True: b"\x88", False: b"\x89"}[x])
            return
        if isinstance(x, int):
            if 0 <= x < 256:
                self.op(b"K" + bytes([x]))
            elif 0 <= x < 65536:
                self.op(b"M" + struct.pack("<H", x))
            elif -2**31 <= x < 2**31:
                self.op(b"J" + struct.pack("<i", x))
            else:
                data = pickle.encode_long(x)
                self.op(b"\x8a" + bytes([len(data)]) + data)  # LONG1
            return
        if isinstance(x, (str, bytes)):  # only short ones occur
            b = x.encode("utf-8") if isinstance(x, str) else x
            assert len(b) < 256
            self.op((b"\x8c" if isinstance(x, str) else b"C") + bytes([len(b)]) + b)
        elif isinstance(x, _Global):
            self.save(x.module)
            self.save(x.name)
            self.op(b"\x93")  # STACK_GLOBAL
        elif isinstance(x, tuple):
            if not x:
                self.op(b")")  # EMPTY_TUPLE: not memoized
                return
            if len(x) > 3:
                self.op(b"(")
            for item in x:
                self.save(item)
            self.op(b"\x85\x86\x87"[len(x) - 1:len(x)] if len(x) <= 3 else b"t")  # TUPLE1..3
        elif isinstance(x, np.dtype):  # np.dtype(first, False, True), BUILD with the state
            first, order, elsize, align, flags = _DTYPE_STATE[x]
            self.save(_Global("numpy", "dtype"))
            self.save((_Global(*first) if isinstance(first, tuple) else first, False, True))
            self.op(b"R")  # REDUCE
            self.memoize(key)
            self.save((3, order, None, None, None, elsize, align, flags))
            self.op(b"b")  # BUILD
            return
        elif isinstance(x, LazyArray):
            if x.dtype not in _DTYPE_STATE:
                raise ValueError(f"unsupported dtype {x.dtype} (float32, int8, bfloat16 only)")
            # ndarray.__reduce__: _reconstruct(ndarray, (0,), b'b'), then BUILD with
            # (1, shape, dtype, is_fortran=False, raw bytes); (0,) is fresh every time.
            self.save(_Global("numpy.core.multiarray", "_reconstruct"))
            self.save((_Global("numpy", "ndarray"), (0,), b"b"))
            self.op(b"R")
            self.memoize()
            self.save((1, tuple(x.shape), x.dtype, False, _Data(x)))
            self.op(b"b")
            return
        elif isinstance(x, _Data):
            self._payload(x.arr)
        else:
            raise TypeError(f"cannot save {type(x)}")
        self.memoize(key)

    def _payload(self, arr: LazyArray) -> None:
        """SHORT_BINBYTES / BINBYTES / BINBYTES8. From 64 KiB on, the open frame is
        committed and header + data go straight to the sink (streamed in chunks)."""
        n = arr.nbytes
        header = (b"C" + bytes([n]) if n < 256 else b"B" + struct.pack("<I", n) if n < 2**32
                  else b"\x8e" + struct.pack("<Q", n))
        if n < FRAME_TARGET:
            self.op(header + (bytes(n) if self.counting else self._data(arr, 0, arr.size)))
        else:
            self.commit()
            self.sink.write(header)
            if self.counting:
                self.sink.skip(n)
            else:
                step = max(1, self.chunk_bytes // arr.dtype.itemsize)
                for start in range(0, arr.size, step):
                    self.sink.write(self._data(arr, start, min(step, arr.size - start)))

    @staticmethod
    def _data(arr: LazyArray, start: int, count: int) -> bytes:
        d = np.asarray(arr.fill(start, count))
        if d.dtype != arr.dtype or d.size != count:
            raise ValueError(f"fill({start}, {count}) gave {d.dtype} x {d.size}")
        return d.tobytes()

    def save_quantized(self, weight: LazyArray, scales: LazyArray) -> None:
        """A dataclass via copyreg.__newobj__: cls, (), NEWOBJ, then BUILD with __dict__
        (a dict of 2+ items goes out as EMPTY_DICT, MARK, key, value, ..., SETITEMS)."""
        self.boundary()
        self.save(_Global("__main__", "QuantizedWeight8bit"))
        self.save(())
        self.op(b"\x81")  # NEWOBJ
        self.memoize()
        self.boundary()  # save(state dict)
        self.op(b"}")  # EMPTY_DICT
        self.memoize()
        self.op(b"(")
        for k, v in (("weight", weight), ("scales", scales)):
            self.save(k)
            self.save(v)
        self.op(b"u")  # SETITEMS
        self.op(b"b")  # BUILD

    def finish(self) -> None:
        self.op(b".")  # STOP, inside the last frame
        self.commit()


def write_array(sink, arr, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Write `pickle.dumps(arr, protocol=4)` (arr: ndarray or LazyArray) to `sink`."""
    p = _Pickler(sink, chunk_bytes)
    p.save(as_lazy(arr))
    p.finish()


def write_quantized(sink, weight, scales, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Write the pickle of `__main__.QuantizedWeight8bit(weight=..., scales=...)`."""
    p = _Pickler(sink, chunk_bytes)
    p.save_quantized(as_lazy(weight), as_lazy(scales))
    p.finish()


def write_param(sink, value, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """value: an array, or a (weight, scales) pair / object with .weight and .scales."""
    if hasattr(value, "weight"):
        value = (value.weight, value.scales)
    if isinstance(value, tuple):
        return write_quantized(sink, *value, chunk_bytes=chunk_bytes)
    write_array(sink, value, chunk_bytes=chunk_bytes)


# ---- Configuration, names and shapes. --------------------------------------------------
_GROK1 = dict(vocab=131072, emb=6144, layers=64, q_heads=48, kv_heads=8, key_size=128,
              experts=8, selected=2, widening_factor=8.0, seq_len=8192)
PRESETS = {
    # widening 3 -> F = 256: divisible by 8 row blocks and by 16 tensor-parallel ranks.
    "tiny": dict(vocab=512, emb=128, layers=12, q_heads=8, kv_heads=8, key_size=16,
                 experts=8, selected=2, widening_factor=3.0, seq_len=8192),
    "grok-1": _GROK1,
    "bench-slice": dict(_GROK1, layers=1),  # real width, ~8 GB
}

LAYER_PARAMS = [  # paths inside a layer (module path + Haiku parameter name), spec order
    "moe/linear/w", "moe/linear_1/w", "moe/linear_v/w", "multi_head_attention/key/w",
    "multi_head_attention/linear/w", "multi_head_attention/query/w",
    "multi_head_attention/value/w", "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale",
    "rms_norm_3/scale", "router/w",
]
EMBED = "language_model/in_out_embed/embeddings"
FINAL_NORM = "language_model/rms_norm/scale"


def ffn_size(emb_size: int, widening_factor: float) -> int:
    f = int(widening_factor * emb_size) * 2 // 3  # as xai-org/grok-1 model.py
    return f + (8 - f) % 8


def make_config(vocab, emb, layers, q_heads, kv_heads, key_size, experts, selected,
                widening_factor, seq_len) -> dict:
    wf = int(widening_factor) if float(widening_factor).is_integer() else widening_factor
    cfg = dict(vocab_size=vocab, pad_token=0, eos_token=2, sequence_len=seq_len,
               embedding_multiplier_scale=math.sqrt(emb),  # = Grok's 78.38367176906169
               output_multiplier_scale=0.5773502691896257,
               emb_size=emb, key_size=key_size, num_q_heads=q_heads,
               num_kv_heads=kv_heads, num_layers=layers, widening_factor=wf,
               attn_output_multiplier=key_size ** -0.5,  # bit-equal to Grok's literal
               num_experts=experts, num_selected_experts=selected,
               rms_norm_eps=1e-5, rope_base=10000, attn_logit_cap=30)
    validate_config(cfg)
    return cfg


def validate_config(c: dict) -> None:
    for k in ("vocab_size", "emb_size", "key_size", "num_q_heads", "num_kv_heads",
              "num_layers", "num_experts", "num_selected_experts", "sequence_len"):
        if int(c[k]) < 1:
            raise ValueError(f"{k} must be >= 1 (got {c[k]})")
    if c["num_q_heads"] % c["num_kv_heads"]:
        raise ValueError("num_q_heads must be a multiple of num_kv_heads")
    if c["num_selected_experts"] > c["num_experts"]:
        raise ValueError("num_selected_experts must be <= num_experts")
    f = ffn_size(c["emb_size"], c["widening_factor"])
    hd = c["num_q_heads"] * c["key_size"]
    for what, rows in (("ffn size F (rows of moe/linear_1)", f),
                       ("num_q_heads * key_size (rows of multi_head_attention/linear)", hd)):
        if rows < ROW_BLOCKS or rows % ROW_BLOCKS:
            raise ValueError(f"{what} = {rows} is not divisible into {ROW_BLOCKS} "
                             f"row-parallel scale blocks; change the sizes")


def release_param_names(num_layers: int) -> list[str]:
    """Parameter paths in file order = JAX's flatten order: the paths sorted as strings."""
    layer = "transformer/decoder_layer_{}/{}".format
    names = sorted([EMBED, FINAL_NORM] + [layer(i, p) for i in range(num_layers)
                                          for p in LAYER_PARAMS])
    # That is: layers in string order of their number (0, 1, 10, ..., 19, 2, 20, ...),
    # each with its 12 parameters in the spec's order.
    in_string_order = sorted(range(num_layers), key=str)
    assert names == [EMBED, FINAL_NORM] + [layer(i, p) for i in in_string_order
                                           for p in LAYER_PARAMS]
    return names


def param_shapes(config: dict) -> dict:
    """name -> (kind, shapes) in file order; kind 'f32': (shape,), 'q8': (weight, scales)."""
    D, E, dh = config["emb_size"], config["num_experts"], config["key_size"]
    H, KV = config["num_q_heads"], config["num_kv_heads"]
    F, B = ffn_size(D, config["widening_factor"]), ROW_BLOCKS
    inside = {
        "moe/linear/w": ((E, D, F), (E, 1, F)),
        "moe/linear_1/w": ((E, F, D), (E, B, D)),
        "moe/linear_v/w": ((E, D, F), (E, 1, F)),
        "multi_head_attention/key/w": ((D, KV * dh), (1, KV * dh)),
        "multi_head_attention/linear/w": ((H * dh, D), (B, D)),
        "multi_head_attention/query/w": ((D, H * dh), (1, H * dh)),
        "multi_head_attention/value/w": ((D, KV * dh), (1, KV * dh)),
        "router/w": ((D, E),),
    }
    out = {}
    for name in release_param_names(config["num_layers"]):
        if name == EMBED:
            out[name] = ("f32", ((config["vocab_size"], D),))
        elif name.endswith("/scale"):
            out[name] = ("f32", ((D,),))
        else:
            sub = name.split("/", 2)[2]
            out[name] = ("q8" if len(inside[sub]) == 2 else "f32", inside[sub])
    return out


# ---- Seeded values with trained-model-like statistics. ---------------------------------
#
# Element i of a large tensor comes from 32-bit lane i (fp32) or 16-bit lane i (int8) of
# the tensor's raw PCG64 draws, mapped through an inverse-CDF table: `advance()` jumps to
# any element, so values do not depend on the chunk size, and the mapping uses only
# gathers and IEEE + and * (no SIMD transcendental functions whose last bit may vary
# between CPUs), so a seed gives the same bytes on every machine. Small tensors (scales,
# norms, router) are drawn whole from their own stream (float64, then rounded).
#
# Calibration (spec section 3): every matmul input is an RMSNorm output a with
# E[a_i^2] = E[norm_scale^2] = A2 (about 1), so y = a @ W has std sqrt(A2 * K) * std(W).
CODE_LAPLACE_B = 18.0  # std about 25 codes, as absmax int8 quantization gives (absmax at
                       # ~5 sigma); the clipped tails put ~4e-4 of the mass on -128 and 127
CODE_TABLE = np.array([max(-128, min(127, round(-CODE_LAPLACE_B * math.copysign(
    math.log1p(-2 * abs(u - 0.5)), u - 0.5)))) for u in ((np.arange(65536) + 0.5) / 65536)],
    np.int8)
CODE_VAR = float(np.mean(CODE_TABLE.astype(np.float64) ** 2))
# Standard normal: knots at u = k/2^16 (ends clamped to +-4.32), linear in between.
_KNOTS = np.array([NormalDist().inv_cdf(min(max(k, 0.5), 65535.5) / 65536)
                   for k in range(65537)], np.float32)
NORMAL_BASE, NORMAL_SLOPE = _KNOTS[:-1].copy(), (_KNOTS[1:] - _KNOTS[:-1]).astype(np.float32)
COL_SIGMA, BLOCK_SIGMA = 0.3, 0.15   # log-normal spread of scales: per column, per block
NORM_SIGMA = 0.15                    # RMSNorm scales exp(0.15 z): positive, around 1
A2 = math.exp(2 * NORM_SIGMA ** 2)   # E[norm_scale^2]
LOGIT_STD = 3.0       # (a) output logits per position: 0.578 * sqrt(A2 * D) * std(E)
ATTN_LOGIT_STD = 2.5  # (b) q.k * mult: std = mult * sqrt(dh) * A2 * D * std(Wq) * std(Wk)
ROUTER_STD = 1.0      # router logits: sqrt(A2 * D) * std(Wr)


def branch_gain(c: dict) -> float:
    """Scale of the post-norms (rms_norm_1, rms_norm_3), whose outputs join the residual.
    With unit post-norms the 78.5 * E embedding dominates the residual stream: the last
    logits are then nearly E_tok . E_v, whose self term (~ sqrt(D) times the others) makes
    every top-1 the input token and greedy decoding repeat it. A trained model's branches
    carry real weight: here the 2L branches together reach twice the size at which the
    self term only competes with the rest (x0 rms * sqrt(D) / 3, x0 rms ~ 5.2 by the
    LOGIT_STD calibration), so few top-1s are the input token and greedy text varies."""
    x0_rms = LOGIT_STD / (c["output_multiplier_scale"] * math.sqrt(A2))
    x0_rms *= c["embedding_multiplier_scale"] / math.sqrt(c["emb_size"])
    return 2.0 * x0_rms * math.sqrt(c["emb_size"]) / 3.0 / math.sqrt(2 * c["num_layers"])


def _stream(seed: int, index: int, part: int) -> np.random.PCG64:
    return np.random.PCG64(np.random.SeedSequence([seed, index, part]))


def _lanes(seed, index, start, count, dtype) -> np.ndarray:
    """Lanes [start, start + count) of the tensor's raw draws split into `dtype` lanes."""
    per = 8 // np.dtype(dtype).itemsize
    bg = _stream(seed, index, 0)
    bg.advance(start // per)
    first = start % per
    raw = bg.random_raw((first + count + per - 1) // per).astype("<u8", copy=False)
    return raw.view(np.dtype(dtype).newbyteorder("<"))[first:first + count]


def _normal_f32(seed, index, shape, std) -> LazyArray:
    def fill(start, count):
        r = _lanes(seed, index, start, count, np.uint32)
        k = r >> np.uint32(16)
        frac = (r & np.uint32(0xFFFF)).astype(np.float32) * np.float32(2.0 ** -16)
        return (NORMAL_BASE[k] + NORMAL_SLOPE[k] * frac) * np.float32(std)
    return LazyArray(tuple(shape), np.dtype(np.float32), fill)


def _codes_i8(seed, index, shape) -> LazyArray:
    return LazyArray(tuple(shape), np.dtype(np.int8),
                     lambda start, n: CODE_TABLE[_lanes(seed, index, start, n, np.uint16)])


def _small(shape, dtype, make) -> LazyArray:
    """A small tensor generated whole on first use (never, for a counting sink)."""
    whole = functools.lru_cache(maxsize=1)(
        lambda: np.ascontiguousarray(make(), dtype).reshape(-1))
    return LazyArray(tuple(shape), np.dtype(dtype), lambda s, c: whole()[s:s + c])


def _weight_std(sub: str, c: dict) -> float:
    """Target std of the dequantized weight, by layer (see the calibration notes)."""
    D, dh = c["emb_size"], c["key_size"]
    if sub in ("multi_head_attention/query/w", "multi_head_attention/key/w"):
        mult = c["attn_output_multiplier"]
        return math.sqrt(ATTN_LOGIT_STD / (mult * math.sqrt(dh) * A2 * D))
    if sub == "multi_head_attention/linear/w":  # followed by rms_norm_1: scale-free
        return 1.0 / math.sqrt(c["num_q_heads"] * dh)
    if sub == "moe/linear_1/w":  # followed by rms_norm_3: scale-free
        return 1.0 / math.sqrt(ffn_size(D, c["widening_factor"]))
    return 1.0 / math.sqrt(A2 * D)  # value, gate, up: unit-variance outputs (GELU active)


def _scales(seed, index, shape, std, col_factor=None) -> LazyArray:
    def make():
        rng = np.random.Generator(_stream(seed, index, 1))
        lead, n = shape[:-2], shape[-1]
        log_s = (COL_SIGMA * rng.standard_normal(lead + (1, n))
                 + BLOCK_SIGMA * rng.standard_normal(shape))
        base = std / math.sqrt(CODE_VAR * math.exp(2 * (COL_SIGMA**2 + BLOCK_SIGMA**2)))
        s = base * np.exp(log_s)
        return s * col_factor if col_factor is not None else s
    return _small(shape, BF16, make)


def param_value(name, kind, shapes, config, seed, index, attn_logit_boost=0.0):
    """The (lazy) value of one parameter: a LazyArray, or (weight, scales) for 'q8'."""
    D = config["emb_size"]
    if name == EMBED:
        std = LOGIT_STD / (config["output_multiplier_scale"] * math.sqrt(A2 * D))
        return _normal_f32(seed, index, shapes[0], std)
    normal = lambda: np.random.Generator(_stream(seed, index, 1)).standard_normal(shapes[0])  # noqa
    if name.endswith("/scale"):
        gain = branch_gain(config) if name.endswith(("rms_norm_1/scale", "rms_norm_3/scale")) else 1.0
        return _small(shapes[0], np.float32, lambda: gain * np.exp(NORM_SIGMA * normal()))
    if name.endswith("router/w"):
        return _small(shapes[0], np.float32, lambda: ROUTER_STD / math.sqrt(A2 * D) * normal())
    sub = name.split("/", 2)[2]
    factor = None
    if attn_logit_boost and sub.endswith(("/query/w", "/key/w")):
        # Heads whose kv head index is 0 mod 4 (one head in four) get x boost on both q
        # and k columns, so their attention logits grow by boost^2.
        q = "query" in sub
        group = config["num_q_heads"] // config["num_kv_heads"] if q else 1
        kv_of_head = np.arange(config["num_q_heads" if q else "num_kv_heads"]) // group
        factor = np.repeat(np.where(kv_of_head % 4 == 0, attn_logit_boost, 1.0),
                           config["key_size"])
    return (_codes_i8(seed, index, shapes[0]),
            _scales(seed, index, shapes[1], _weight_std(sub, config), factor))


# ---- Whole checkpoints. ----------------------------------------------------------------
class _ProgressSink:
    """A file sink that counts bytes and calls report(bytes) at most every 2 s."""

    def __init__(self, f, report):
        self.f, self.report, self.nbytes, self.last = f, report, 0, time.monotonic()

    def write(self, b) -> None:
        self.f.write(b)
        self.nbytes += len(b)
        if time.monotonic() - self.last > 2.0:
            self.last = time.monotonic()
            self.report(self.nbytes)


class _SparseSink(_ProgressSink):
    """Writes the pickle structure and leaves every payload of 64 KiB or more as a hole
    (zeros): files of the real sizes that take no disk, for testing size checks."""
    counts_only = True

    def skip(self, n: int) -> None:
        self.f.seek(n, os.SEEK_CUR)
        self.nbytes += n


def _params(config, seed, attn_logit_boost):
    for i, (name, (kind, shapes)) in enumerate(param_shapes(config).items()):
        yield i, name, param_value(name, kind, shapes, config, seed, i, attn_logit_boost)


def checkpoint_sizes(config: dict) -> list[tuple[str, str, int]]:
    """(file name, parameter, bytes) of every file, computed without generating data."""
    out = []
    for i, name, value in _params(config, 0, 0.0):
        sink = CountingSink()
        write_param(sink, value)
        out.append((f"tensor{i:05d}_000", name, sink.nbytes))
    return out


def write_checkpoint(out_dir, config, seed=0, attn_logit_boost=0.0, force=False,
                     chunk_bytes=DEFAULT_CHUNK_BYTES, log=None, sparse=False) -> int:
    """Write <out_dir>/ckpt-0/tensor%05d_000 and <out_dir>/config.json; return the bytes
    written. A non-empty out_dir needs force (stale tensor files are then removed).
    log: a text stream for progress lines, or None. sparse: all-zero payloads left as
    holes (real file sizes, no disk used)."""
    validate_config(config)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FileExistsError(f"{out_dir} is not empty (use --force to overwrite)")
    probe, need = os.path.abspath(out_dir), sum(n for _, _, n in checkpoint_sizes(config))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not sparse and shutil.disk_usage(probe).free < need:
        raise ValueError(f"{need:,} bytes needed, {shutil.disk_usage(probe).free:,} free")
    ckpt = os.path.join(out_dir, "ckpt-0")
    os.makedirs(ckpt, exist_ok=True)
    for f in os.listdir(ckpt):  # files of an earlier (larger) checkpoint would mislead readers
        if f.startswith("tensor") and f.endswith(("_000", "_000.tmp")):
            os.remove(os.path.join(ckpt, f))
    t0, done, n_files = time.monotonic(), 0, len(param_shapes(config))

    def say(what, n):
        if log:
            rate = (done + n) / 1e6 / max(time.monotonic() - t0, 1e-9)
            print(f"{what} (total {(done + n) / 1e6:,.1f} MB, {rate:,.0f} MB/s)", file=log,
                  flush=True)

    for i, name, value in _params(config, seed, attn_logit_boost):
        path = os.path.join(ckpt, f"tensor{i:05d}_000")
        with open(path + ".tmp", "wb") as f:
            sink = (_SparseSink if sparse else _ProgressSink)(
                f, lambda n: say(f"  ... {os.path.basename(path)}", n))
            write_param(sink, value, chunk_bytes)
            f.truncate(sink.nbytes)
        os.replace(path + ".tmp", path)
        say(f"[{i + 1}/{n_files}] {os.path.basename(path)} {name} {sink.nbytes:,} B",
            sink.nbytes)
        done += sink.nbytes
    with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))
    return done


# ---- Command line. ---------------------------------------------------------------------
_SIZE_HELP = {  # preset key (flag --key-with-dashes) -> help
    "vocab": "vocabulary size", "emb": "embedding width D", "layers": "decoder layers",
    "q_heads": "query heads", "kv_heads": "key/value heads", "key_size": "head dimension",
    "experts": "MoE experts", "selected": "experts selected per token",
    "widening_factor": "F = int(wf * D) * 2 // 3 rounded up to a multiple of 8",
    "seq_len": "sequence_len in config.json",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Write a seeded synthetic Grok-1-architecture checkpoint (OUT_DIR/ckpt-0/"
                    "tensor%05d_000 + OUT_DIR/config.json) in the release encoding.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out_dir", metavar="OUT_DIR", nargs="?",
                    help="output directory (not needed with --count-only)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="base sizes; grok-1 (~318 GB) is only sensible with --count-only, "
                         "bench-slice is real width with 1 layer (~8 GB)")
    for key, text in _SIZE_HELP.items():
        per = ", ".join(f"{p}: {PRESETS[p][key]:g}" for p in sorted(PRESETS))
        ap.add_argument("--" + key.replace("_", "-"), dest=key, default=None,
                        type=type(PRESETS["tiny"][key]),
                        help=f"{text} (default from --preset: {per})")
    ap.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    ap.add_argument("--attn-logit-boost", type=float, default=0.0,
                    help="0 = off; X multiplies the q and k scales of one head in four "
                         "(heads of kv heads 0 mod 4), so their attention logits have std "
                         f"~{ATTN_LOGIT_STD:g}*X^2 (X=4: ~45%% beyond +-30, the tanh cap)")
    ap.add_argument("--count-only", action="store_true",
                    help="write nothing; print each file's size and the total")
    ap.add_argument("--sparse", action="store_true",
                    help="leave payloads >= 64 KiB as holes (all-zero weights, real file sizes, "
                         "almost no disk): for testing the real model's size checks")
    ap.add_argument("--force", action="store_true",
                    help="write into a non-empty OUT_DIR (stale tensor files are removed)")
    ap.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / 2**20,
                    help="payload generation chunk (MiB); values do not depend on it")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sizes = dict(PRESETS[args.preset])
    sizes.update({k: v for k, v in vars(args).items() if k in sizes and v is not None})
    t0 = time.monotonic()
    try:
        config = make_config(**sizes)
        if args.count_only:
            files = checkpoint_sizes(config)
            for fname, name, n in files:
                print(f"{fname}  {n:>15,}  {name}")
            print(f"total {sum(n for _, _, n in files):,} bytes in {len(files)} files")
            return 0
        if not args.out_dir:
            raise ValueError("OUT_DIR is required (unless --count-only)")
        total = write_checkpoint(args.out_dir, config, seed=args.seed,
                                 attn_logit_boost=args.attn_logit_boost, force=args.force,
                                 chunk_bytes=int(args.chunk_mb * 2**20), log=sys.stderr,
                                 sparse=args.sparse)
    except (FileExistsError, ValueError) as e:
        print(f"make_checkpoint: error: {e}", file=sys.stderr)
        return 2
    dt = max(time.monotonic() - t0, 1e-9)
    print(f"wrote {len(param_shapes(config))} files, {total:,} bytes to {args.out_dir} in "
          f"{dt:.1f} s ({total / 1e6 / dt:,.0f} MB/s), seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
