#!/usr/bin/env python3
"""An independent NumPy implementation of Grok-1's official forward pass (xai-org/grok-1,
model.py), for checking grokit against small checkpoints.

It reads a checkpoint in the release encoding (<dir>/ckpt-0/tensor%05d_000, one pickle per
parameter, <dir>/config.json) and reproduces the official mixed precision: every value the
official code holds in bfloat16 (by JAX's promotion rules) goes through the one function
bf16(); the rest is float32, as there. So that another implementation can agree bit for bit,
the float32 details the official code leaves open are pinned: exp, tanh, cos and sin are
evaluated in float64 and rounded to float32; float32 sums (norms, softmax) run sequentially
in index order; the weight matrix products accumulate in float32 in the order of the bf16
dot-product instruction (see matmul_pairs), attention and the router exactly (float64,
rounded once); so no result depends on the other rows or on the padding.

  reference.py CKPT_DIR --tokens T.npy --out LOGITS.npy [--dump-layers DIR]
               [--greedy N --greedy-out G.npy] [--config FILE]

Importable: load_checkpoint(dir, config=None) -> (config, params),
forward(config, params, tokens, dump=None) -> logits, greedy(config, params, tokens, n).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
import sys
import time

import ml_dtypes
import numpy as np

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 1.26
except ImportError:
    from numpy.core.multiarray import _reconstruct

F32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)
QUERY_BLOCK = 256   # attention query rows per step: bounds memory at long T, not the results

GROK1 = dict(  # Grok-1's values (run.py); a config.json overrides any of them
    vocab_size=131072, pad_token=0, eos_token=2, sequence_len=8192, emb_size=6144,
    key_size=128, num_q_heads=48, num_kv_heads=8, num_layers=64, widening_factor=8,
    attn_output_multiplier=0.08838834764831845, embedding_multiplier_scale=78.38367176906169,
    output_multiplier_scale=0.5773502691896257, num_experts=8, num_selected_experts=2,
    rms_norm_eps=1e-5, rope_base=10000, attn_logit_cap=30)


# ---- Rounding and the float32 primitives. ----------------------------------------------
def bf16(x):
    """Round float32 to bfloat16 (nearest, ties to even); float32 holding the bf16 value."""
    return np.asarray(x, F32).astype(BF16).astype(F32)


def _via_f64(fn):  # transcendental: evaluated in float64, rounded once to float32
    return lambda x: fn(np.asarray(x, F32).astype(np.float64)).astype(F32)


exp32, tanh32, cos32, sin32 = map(_via_f64, (np.exp, np.tanh, np.cos, np.sin))


def sum32(x):
    """float32 sum over the last axis, sequential in index order (keepdims)."""
    return np.cumsum(x, axis=-1, dtype=F32)[..., -1:]


def matmul(a, b):
    """A float32 matrix product as an ideal fp32 accumulator gives it: products and sums in
    float64 (products of bf16 values are exact), one rounding to float32. (A float32 BLAS
    product changes its summation order with the matrix shapes: a row's result would then
    depend on the other rows and on the padding.) Used where the sums are short or few:
    attention and the router."""
    return np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64)).astype(F32)


# The weight matrix products accumulate in float32, as the official code's do, in one
# pinned order (that of the bf16 dot-product instruction vdpbf16ps, which grokit's CPU
# kernels use): a row's result then never depends on the other rows, and any
# implementation that follows the order gets the same bits.
def matmul_pairs(x, w):
    """x [M, K] (bf16 values) @ w [K, N] (bf16 values) in float32: for each pair of terms
    (k, k+1), acc = acc + x[k+1] w[k+1], then acc = acc + x[k] w[k] (products exact)."""
    x, w = np.asarray(x, F32), np.asarray(w, F32)
    K = x.shape[1]
    acc = np.zeros((x.shape[0], w.shape[1]), F32)
    for k in range(0, K, 2):
        if k + 1 < K:
            acc += x[:, k + 1:k + 2] * w[k + 1]
        acc += x[:, k:k + 1] * w[k]
    return acc


def matmul_fma(x, w):
    """x [M, K] (float32 values) @ w [K, N] (bf16 values) in float32 with a fused multiply-
    add per term, in k order: acc = fma(x[k], w[k], acc). (The product is exact in float64
    and so is the sum but for a double rounding in a case of about 2^-29.)"""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    acc = np.zeros((x.shape[0], w.shape[1]), F32)
    for k in range(x.shape[1]):
        acc = (acc + x[:, k:k + 1] * w[k]).astype(F32)
    return acc


def split_sum_rows(K):
    """Rows per chain of a weight product over K rows: K / nb, nb the largest power of two
    <= 16 with 2 * nb dividing K."""
    nb = 16
    while nb > 1 and K % (2 * nb):
        nb //= 2
    return K // nb


def tree_sum(parts):
    """Adjacent partial sums added level by level in float32, an odd last one carried up."""
    parts = list(parts)
    while len(parts) > 1:
        nxt = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
        parts = nxt + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def chained(product, x, w):
    """product over independent chains of split_sum_rows(K) rows, combined by tree_sum.
    Every weight product sums this way: threads take whole chains (contiguous rows), and
    where tensor parallelism splits the rows, ranks hold whole chains whose partial sums
    meet in the same tree, so the result is the same at every TP degree."""
    K = x.shape[1]
    sr = split_sum_rows(K)
    return tree_sum(product(x[:, i:i + sr], w[i:i + sr]) for i in range(0, K, sr))


def matmul_lanes(x, w):
    """x [M, K] (bf16 values) @ w[N, K].T (bf16 values) in float32 over 16 lanes: lane i
    takes the pairs (32j + 2i, 32j + 2i + 1) in the pair order of matmul_pairs; then the
    lanes are summed by halving (lane i += lane i + 8, then + 4, + 2, + 1)."""
    x, w = np.asarray(x, F32), np.asarray(w, F32)
    M, K = x.shape
    out = np.empty((M, w.shape[0]), F32)
    for m0 in range(0, M, 64):  # bounded memory: [64, N, 16] lanes at a time
        xm = x[m0:m0 + 64]
        lanes = np.zeros((xm.shape[0], w.shape[0], 16), F32)
        for k in range(0, K, 2):
            i = (k % 32) // 2
            if k + 1 < K:
                lanes[:, :, i] += xm[:, None, k + 1] * w[None, :, k + 1]
            lanes[:, :, i] += xm[:, None, k] * w[None, :, k]
        for step in (8, 4, 2, 1):
            lanes[:, :, :step] += lanes[:, :, step:2 * step]
        out[m0:m0 + 64] = lanes[:, :, 0]
    return out


def softmax(x):
    """jax.nn.softmax in float32: max subtraction, exp, divide by the sum."""
    e = exp32(x - x.max(axis=-1, keepdims=True))
    return e / sum32(e)


def rmsnorm(x, scale, eps):
    """hk.RMSNorm as model.py runs it: float32 inside, the stored scale multiplies
    directly (not 1 + scale), the result cast back to bf16."""
    x = np.asarray(x, F32)
    mean_sq = sum32(x * x) / F32(x.shape[-1])
    inv = F32(1) / np.sqrt(mean_sq + F32(eps))
    return bf16((x * inv) * scale)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] on the last axis (Grok-1 rotates halves, not pairs)."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def rope_tables(T, dh, base):
    """cos and sin of the phases [T, dh] for positions 0..T-1."""
    inv_freq = (1.0 / float(base) ** (np.arange(0, dh, 2) / dh)).astype(F32)  # f64, rounded
    phase = np.arange(T, dtype=F32)[:, None] * inv_freq[None, :]  # float32 multiply
    phase = np.concatenate([phase, phase], axis=-1)  # [phase, phase], as jnp.tile
    return cos32(phase), sin32(phase)


def rope(x, cos, sin):
    """x: [B, T, heads, dh] bf16 values; fp32 arithmetic, the result stored as bf16."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return bf16(x * c + rotate_half(x) * s)


def soft_cap(s, cap):
    """The attention logit cap, cap * tanh(s / cap), in float32 (cap = 30 in Grok-1)."""
    return F32(cap) * tanh32(s / F32(cap))


SQRT_2_OVER_PI = F32(np.sqrt(2 / np.pi))  # as jax.nn.gelu: a float32 constant


def gelu(x):
    """jax.nn.gelu's default (tanh approximation), in float32."""
    inner = SQRT_2_OVER_PI * (x + F32(0.044715) * (x * x * x))
    return x * (F32(0.5) * (F32(1) + tanh32(inner)))


# ---- Reading the checkpoint. ------------------------------------------------------------
@dataclasses.dataclass
class QuantizedWeight8bit:  # what the release pickles name __main__.QuantizedWeight8bit
    weight: np.ndarray
    scales: np.ndarray


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # as numpy 2 writes it
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
    ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
}


class _Unpickler(pickle.Unpickler):
    """A pickle may call anything it names: only the few globals of the release pass."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return _ALLOWED[(module, name)]


EMBED = "language_model/in_out_embed/embeddings"
FINAL_NORM = "language_model/rms_norm/scale"
LAYER_PARAMS = {  # path inside a decoder layer -> our short name (listed in string order)
    "moe/linear/w": "gate", "moe/linear_1/w": "down", "moe/linear_v/w": "up",
    "multi_head_attention/key/w": "wk", "multi_head_attention/linear/w": "wo",
    "multi_head_attention/query/w": "wq", "multi_head_attention/value/w": "wv",
    "rms_norm/scale": "norm_attn_in", "rms_norm_1/scale": "norm_attn_out",
    "rms_norm_2/scale": "norm_moe_in", "rms_norm_3/scale": "norm_moe_out",
    "router/w": "router",
}


def release_order(num_layers):
    """The parameter path of each file, by index. JAX flattens the parameter dict with its
    keys sorted as strings, so layer 10 comes before layer 2."""
    names = [EMBED, FINAL_NORM] + [f"transformer/decoder_layer_{i}/{p}"
                                   for i in range(num_layers) for p in LAYER_PARAMS]
    return sorted(names)


def load_config(config=None):
    """config: a dict, a path to a JSON file, or None (Grok-1's values)."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    cfg = dict(GROK1, **(config or {}))
    if cfg["num_q_heads"] % cfg["num_kv_heads"] or cfg["key_size"] % 2:
        raise ValueError("need num_q_heads % num_kv_heads == 0 and an even key_size")
    if not 1 <= cfg["num_selected_experts"] <= cfg["num_experts"]:
        raise ValueError("need 1 <= num_selected_experts <= num_experts")
    return cfg


def dequantize(q):
    """W = bf16(bf16(code) * bf16 scale). Scales [..., B, N]: rows [b*K/B, (b+1)*K/B) of
    the weight [..., K, N] use block b (B = 1: one scale per output column)."""
    w, s = q.weight.astype(F32), q.scales.astype(F32)
    K, B = w.shape[-2], s.shape[-2]
    if K % B:
        raise ValueError(f"{K} rows do not split into {B} scale blocks")
    return bf16(w * np.repeat(s, K // B, axis=-2))  # exact product, one rounding


def _array(x, dtype):
    return isinstance(x, np.ndarray) and x.dtype == dtype


def _check(name, value, shape, quantized):
    """The parameter as float32 (dequantized if quantized), after checking kind and shape;
    None in shape matches any size."""
    if quantized:
        w, s = getattr(value, "weight", None), getattr(value, "scales", None)
        ok = (isinstance(value, QuantizedWeight8bit) and _array(w, np.int8)
              and _array(s, BF16) and w.ndim == s.ndim >= 2
              and s.shape[:-2] + s.shape[-1:] == w.shape[:-2] + w.shape[-1:])
        got = w.shape if ok else type(value).__name__
    else:
        ok, got = _array(value, F32), getattr(value, "shape", type(value).__name__)
    if not (ok and len(got) == len(shape) and all(a in (None, b) for a, b in zip(shape, got))):
        raise ValueError(f"{name}: expected {'int8 + bf16 scales' if quantized else 'float32'} "
                         f"{tuple('?' if d is None else d for d in shape)}, got {got}")
    return dequantize(value) if quantized else value


def load_checkpoint(path, config=None):
    """path: the directory holding ckpt-0/ and config.json, or ckpt-0 itself. config
    overrides <path>/config.json. Returns (config, params), weights as float32 arrays
    holding bf16 values (norm scales and the router stay float32)."""
    ckpt = os.path.join(path, "ckpt-0")
    ckpt = ckpt if os.path.isdir(ckpt) else path
    if config is None:
        found = [c for c in (os.path.join(path, "config.json"),
                             os.path.join(os.path.dirname(os.path.abspath(ckpt)), "config.json"))
                 if os.path.isfile(c)]
        config = found[0] if found else None
    cfg = load_config(config)
    names = release_order(cfg["num_layers"])
    files = sorted(f for f in os.listdir(ckpt) if re.fullmatch(r"tensor\d{5}_000", f))
    if files != [f"tensor{i:05d}_000" for i in range(len(names))]:
        raise ValueError(f"{ckpt}: expected tensor00000_000 .. tensor{len(names) - 1:05d}_000 "
                         f"({cfg['num_layers']} layers), found {len(files)} tensor files")
    raw = {}
    for fname, name in zip(files, names):
        with open(os.path.join(ckpt, fname), "rb") as f:
            try:
                raw[name] = _Unpickler(f).load()
            except Exception as e:
                raise ValueError(f"{fname} ({name}): {e}") from None

    D, V, E = cfg["emb_size"], cfg["vocab_size"], cfg["num_experts"]
    H, KV, dh = cfg["num_q_heads"], cfg["num_kv_heads"], cfg["key_size"]
    F = getattr(getattr(raw["transformer/decoder_layer_0/moe/linear/w"], "weight", None),
                "shape", (None,))[-1]
    shapes = {  # (shape, quantized); F is inferred from the gate weight, blocks from scales
        "gate": ((E, D, F), True), "down": ((E, F, D), True), "up": ((E, D, F), True),
        "wk": ((D, KV * dh), True), "wo": ((H * dh, D), True), "wq": ((D, H * dh), True),
        "wv": ((D, KV * dh), True), "router": ((D, E), False)}
    params = {"embed": bf16(_check(EMBED, raw[EMBED], (V, D), False)),  # bf16(E), tied
              "final_norm": _check(FINAL_NORM, raw[FINAL_NORM], (D,), False),
              "layers": [dict() for _ in range(cfg["num_layers"])]}
    for name in names[2:]:
        layer, sub = re.fullmatch(r"transformer/decoder_layer_(\d+)/(.*)", name).groups()
        short = LAYER_PARAMS[sub]
        shape, quantized = shapes.get(short, ((D,), False))
        params["layers"][int(layer)][short] = _check(name, raw.pop(name), shape, quantized)
    return cfg, params


# ---- The forward pass (spec section 3). ------------------------------------------------
def attend(cfg, q, k, v, real, stats=None):
    """One batch row. q [T, H, dh], k and v [T, KV, dh] (bf16 values), real [T] = token > 0.
    Returns [T, H * dh], query head h reading kv head h // (H / KV)."""
    T, H, dh = q.shape
    KV = k.shape[1]
    qh = q.transpose(1, 0, 2).reshape(KV, H // KV, T, dh)
    kt = k.transpose(1, 2, 0).astype(np.float64)[:, None]  # [KV, 1, dh, T]
    vh = v.transpose(1, 0, 2).astype(np.float64)[:, None]  # [KV, 1, T, dh]
    mult, neg = F32(cfg["attn_output_multiplier"]), F32(-1e30)
    first_real = int(np.argmax(real)) if real.any() else T
    out = np.empty((T, H * dh), F32)
    for q0 in range(0, T, QUERY_BLOCK):
        q1 = min(q0 + QUERY_BLOCK, T)
        # Keys after q1 are masked for every query here; a row with some unmasked key gives
        # them exp(-1e30 - max) = 0 exactly, so they are skipped. A row with none (before
        # the first real token) softmaxes T values of -1e30: uniform over all T keys.
        nk = T if q0 < first_real else q1
        s = bf16(matmul(qh[:, :, q0:q1], kt[..., :nk])) * mult  # q.k is a bf16 product
        mask = (np.arange(nk)[None, :] <= np.arange(q0, q1)[:, None]) & real[None, :nk]
        if stats is not None and mask.any():
            top = float(np.abs(s).max(axis=(0, 1))[mask].max())
            stats["max_abs_attn_logit"] = max(stats.get("max_abs_attn_logit", 0.0), top)
        w = bf16(softmax(np.where(mask, soft_cap(s, cfg["attn_logit_cap"]), neg)))
        o = bf16(matmul(w, vh[:, :, :nk]))  # [KV, G, nq, dh]
        out[q0:q1] = o.transpose(2, 0, 1, 3).reshape(q1 - q0, H * dh)
    return out


def attention(cfg, p, a, tokens, cos, sin, stats=None):
    B, T, D = a.shape
    H, KV, dh = cfg["num_q_heads"], cfg["num_kv_heads"], cfg["key_size"]
    flat = a.reshape(B * T, D)
    q = rope(bf16(chained(matmul_pairs, flat, p["wq"])).reshape(B, T, H, dh), cos, sin)
    k = rope(bf16(chained(matmul_pairs, flat, p["wk"])).reshape(B, T, KV, dh), cos, sin)
    v = bf16(chained(matmul_pairs, flat, p["wv"])).reshape(B, T, KV, dh)
    o = np.stack([attend(cfg, q[b], k[b], v[b], tokens[b] > 0, stats) for b in range(B)])
    return bf16(chained(matmul_pairs, o.reshape(B * T, H * dh), p["wo"])).reshape(B, T, D)


def route(x, router, k):
    """The router, in float32: softmax(x @ W) over the experts (no padding mask, no cap),
    then the top k by probability, ties to the lower index. Returns (experts, gates) [N, k]."""
    probs = softmax(matmul(x, router))
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    top_probs = np.take_along_axis(probs, chosen, axis=-1)
    gates = top_probs  # gate normalisation: none, the official gates are the raw top-k probs
    return chosen, gates


def moe(cfg, p, m, stats=None):
    """Top-k mixture of experts. As in the official code, an expert runs on every token and
    the chosen outputs are picked, so matrix shapes never depend on the routing. stats: a
    dict whose lists "experts" ([B, T, k]) and "router_logits" ([B, T, E]) receive the
    layer's routing."""
    B, T, D = m.shape
    x = m.reshape(B * T, D)
    k = cfg["num_selected_experts"]
    chosen, gates = route(x, p["router"], k)
    if stats is not None:
        stats.setdefault("experts", []).append(chosen.astype(np.int32).reshape(B, T, k))
        stats.setdefault("router_logits", []).append(matmul(x, p["router"]).reshape(B, T, -1))
    y = np.zeros((k, B * T, D), F32)
    for e in range(cfg["num_experts"]):
        if not (chosen == e).any():
            continue
        g = bf16(chained(matmul_pairs, x, p["gate"][e]))  # bf16 products
        u = bf16(chained(matmul_pairs, x, p["up"][e]))
        h = gelu(g) * u  # float32 from here on: the official one-hot selection is float32
        ye = chained(matmul_fma, h, p["down"][e])  # float32 times the bf16 weight: a float32 result
        for slot in range(k):
            rows = chosen[:, slot] == e
            y[slot, rows] = ye[rows]
    total = bf16(gates[:, :1]) * y[0]  # gates rounded to bf16, products and sum in float32,
    for slot in range(1, k):           # summed in top-k order, one rounding at the end
        total = total + bf16(gates[:, slot:slot + 1]) * y[slot]
    return bf16(total).reshape(B, T, D)


def forward(config, params, tokens, dump=None, stats=None, log=None):
    """tokens: int [B, T], 0 = padding. Returns float32 [B, T, V] logits (bf16 values).
    dump: a list that receives the hidden states (the embedding output, then the output of
    each layer: L + 1 arrays [B, T, D]). stats: a dict that receives max_abs_attn_logit
    (before the cap, over unmasked positions) and each layer's routing (see moe). log: a
    stream for per-layer progress."""
    cfg, tokens = config, np.asarray(tokens)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu" or tokens.size == 0:
        raise ValueError(f"tokens must be a non-empty integer [B, T] array, got "
                         f"{tokens.dtype} {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= cfg["vocab_size"]:
        raise ValueError(f"token ids must lie in [0, {cfg['vocab_size']})")
    B, T = tokens.shape
    eps, E = cfg["rms_norm_eps"], params["embed"]
    emb_mult = bf16(cfg["embedding_multiplier_scale"])  # 78.38 is applied as bf16: 78.5
    out_mult = bf16(cfg["output_multiplier_scale"])     # 0.5774 is applied as bf16: 0.578125
    x = bf16(E[tokens] * emb_mult)
    cos, sin = rope_tables(T, cfg["key_size"], cfg["rope_base"])
    if dump is not None:
        dump.append(x)
    for i, p in enumerate(params["layers"]):
        t0 = time.monotonic()
        a = rmsnorm(x, p["norm_attn_in"], eps)
        x = bf16(x + rmsnorm(attention(cfg, p, a, tokens, cos, sin, stats),
                             p["norm_attn_out"], eps))
        m = rmsnorm(x, p["norm_moe_in"], eps)
        x = bf16(x + rmsnorm(moe(cfg, p, m, stats), p["norm_moe_out"], eps))
        if dump is not None:
            dump.append(x)
        if log:
            print(f"  layer {i + 1}/{len(params['layers'])} ({time.monotonic() - t0:.2f} s)",
                  file=log, flush=True)
    x = rmsnorm(x, params["final_norm"], eps).reshape(B * T, -1)
    return bf16(bf16(matmul_lanes(x, E)) * out_mult).reshape(B, T, -1)


def greedy(config, params, tokens, n, log=None):
    """For each row, from its real tokens (up to the first 0), append n tokens, each the
    argmax (ties: the lower id) of the logits at the row's last position, recomputing the
    whole forward pass per step. An empty row uses position 0. Returns int32 [B, n]."""
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    lengths = np.array([np.argmin(r > 0) if (r == 0).any() else T for r in tokens])
    seq = np.zeros((B, int(lengths.max()) + n), np.int32)
    for b in range(B):
        seq[b, :lengths[b]] = tokens[b, :lengths[b]]
    out = np.zeros((B, n), np.int32)
    for step in range(n):
        logits = forward(config, params, seq[:, :max(int(lengths.max()), 1)])
        for b in range(B):
            out[b, step] = seq[b, lengths[b]] = np.argmax(logits[b, max(lengths[b] - 1, 0)])
            lengths[b] += 1
        if log:
            print(f"greedy step {step + 1}/{n}: {out[:, step].tolist()}", file=log, flush=True)
    return out


# ---- Command line. ---------------------------------------------------------------------
def build_parser():
    ap = argparse.ArgumentParser(
        description="Run the official Grok-1 forward pass (bf16 with its fp32 islands) in "
                    "NumPy on a checkpoint in the release encoding.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("ckpt_dir", metavar="CKPT_DIR",
                    help="directory holding ckpt-0/tensor%%05d_000 and config.json")
    ap.add_argument("--tokens", required=True, metavar="T.npy",
                    help="int32 [B, T] token ids, 0 = padding on the right")
    ap.add_argument("--out", required=True, metavar="LOGITS.npy",
                    help="where to write float32 [B, T, V] logits (bf16 values)")
    ap.add_argument("--dump-layers", metavar="DIR", default=None,
                    help="also write DIR/hidden_000.npy (embedding output) and "
                         "DIR/hidden_{i+1:03d}.npy after layer i, float32 [B, T, D]; and layer "
                         "i's routing: DIR/experts_{i:03d}.npy (chosen experts in choice order, "
                         "int32 [B, T, k]) and DIR/router_{i:03d}.npy (router logits, float32 "
                         "[B, T, E])")
    ap.add_argument("--greedy", type=int, default=0, metavar="N",
                    help="append N greedy tokens to each row (needs --greedy-out)")
    ap.add_argument("--greedy-out", metavar="G.npy", default=None,
                    help="where to write the greedy tokens, int32 [B, N]")
    ap.add_argument("--config", metavar="FILE", default=None,
                    help="config.json to use instead of CKPT_DIR/config.json")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.greedy < 0 or (args.greedy > 0) != (args.greedy_out is not None):
        ap.error("--greedy N (N >= 1) and --greedy-out go together")
    t0, log = time.monotonic(), sys.stderr
    try:
        config, params = load_checkpoint(args.ckpt_dir, args.config)
        tokens = np.load(args.tokens)
        print(f"reference: loaded {config['num_layers']} layers in "
              f"{time.monotonic() - t0:.1f} s; tokens {tokens.shape}", file=log, flush=True)
        hidden, stats = ([] if args.dump_layers else None), {}
        logits = forward(config, params, tokens, dump=hidden, stats=stats, log=log)
        np.save(args.out, logits)
        if hidden is not None:
            os.makedirs(args.dump_layers, exist_ok=True)
            for i, h in enumerate(hidden):
                np.save(os.path.join(args.dump_layers, f"hidden_{i:03d}.npy"), h)
            for i, (e, r) in enumerate(zip(stats["experts"], stats["router_logits"])):
                np.save(os.path.join(args.dump_layers, f"experts_{i:03d}.npy"), e)
                np.save(os.path.join(args.dump_layers, f"router_{i:03d}.npy"), r)
        if args.greedy:
            np.save(args.greedy_out, greedy(config, params, tokens, args.greedy, log=log))
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        print(f"reference.py: error: {e}", file=log)
        return 2
    print(f"reference: logits {logits.shape} -> {args.out}; max |attention logit| before the "
          f"cap {stats.get('max_abs_attn_logit', 0.0):.2f}; {time.monotonic() - t0:.1f} s",
          file=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
