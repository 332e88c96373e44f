"""Deliberate bugs for scripts/reference.py: each is a plausible misreading of the official
forward pass. A parity check that cannot tell the mutated reference from the real one (or
from grokit) is too weak. Usage: exec the text apply(source, name) returns as a module."""

MUTATIONS = {
    # No bf16 rounding anywhere: every value stays float32.
    "fp32_everywhere": [
        ("return np.asarray(x, F32).astype(BF16).astype(F32)", "return np.asarray(x, F32)"),
    ],
    # RoPE on interleaved pairs (x0, x1), (x2, x3), ... with the phase of pair j repeated
    # in place ([p0, p0, p1, p1, ...]) instead of halves and [phase, phase].
    "interleaved_rope": [
        ("    x1, x2 = np.split(x, 2, axis=-1)\n"
         "    return np.concatenate([-x2, x1], axis=-1)",
         "    x1, x2 = x[..., 0::2], x[..., 1::2]\n"
         "    return np.stack([-x2, x1], axis=-1).reshape(x.shape)"),
        ("phase = np.concatenate([phase, phase], axis=-1)",
         "phase = np.repeat(phase, 2, axis=-1)"),
    ],
    # Files mapped to layers in numeric order (0, 1, 2, ...) instead of string order.
    "numeric_layer_order": [
        ("    return sorted(names)", "    return names"),
    ],
    # No 30 * tanh(s / 30) cap on the attention logits.
    "no_logit_cap": [
        ("return F32(cap) * tanh32(s / F32(cap))", "return s"),
    ],
    # The embedding multiplier applied as the exact float (78.38) instead of its bf16 (78.5).
    "unrounded_embedding_multiplier": [
        ('emb_mult = bf16(cfg["embedding_multiplier_scale"])',
         'emb_mult = F32(cfg["embedding_multiplier_scale"])'),
    ],
    # The top-k gates renormalized to sum to 1 (the official code does not).
    "renormalized_gates": [
        ("gates = top_probs  #", "gates = top_probs / top_probs.sum(-1, keepdims=True)  #"),
    ],
    # SiLU (x * sigmoid(x)) instead of the tanh-approximated GELU.
    "silu_instead_of_gelu": [
        ("    inner = SQRT_2_OVER_PI * (x + F32(0.044715) * (x * x * x))\n"
         "    return x * (F32(0.5) * (F32(1) + tanh32(inner)))",
         "    return x / (F32(1) + exp32(-x))"),
    ],
}


def apply(source_text: str, name: str) -> str:
    """source_text with mutation `name` applied; every old text must occur exactly once."""
    for old, new in MUTATIONS[name]:
        n = source_text.count(old)
        assert n == 1, f"mutation {name}: {old!r} occurs {n} times (expected once)"
        source_text = source_text.replace(old, new)
    return source_text
