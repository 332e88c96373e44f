"""An independent reader of grokit model directories, written from format/SPEC.md (v1).

Standard library + numpy + ml_dtypes only. XXH3-64 is not in the standard library: when
the `xxhash` package is importable every checksum (header, index, tensors, model_id) is
verified; otherwise those checks are skipped and reported as skipped (HAVE_XXHASH, and
`checksums_verified` in the header dict), while every structural check is still made.

API:
  read_manifest(model_dir) -> dict
  read_shard(path, verify=None) -> Shard (unpacks as `header, entries = read_shard(p)`)
  tensor_array(shard, entry, bf16_bits=False, verify=None)
      -> ndarray, or (codes, scales) for q8rb
  read_model(model_dir) -> (manifest, [Shard per rank]) with the manifest/shard cross-checks
  check_padding(shard): every padding byte is zero
  dequantize_q8rb(codes, scales) -> bf16 weights as the forward pass computes them
"""
from __future__ import annotations

import json
import os
import re
import struct

import ml_dtypes
import numpy as np

try:  # optional: never installed by the tests
    import xxhash as _xxhash
    HAVE_XXHASH = True
except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None
    HAVE_XXHASH = False

FORMAT_VERSION = 1
MAGIC = b"GROKITSH"
HEADER_SIZE = 128
MIN_ALIGNMENT = 4096
MAX_DIMS = 8
MAX_NAME = 255
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
STATE_DIR = ".grokit-convert"

F32, BF16, I8, F8E4M3, Q8RB, Q4G, F8COL = 0, 1, 2, 3, 16, 17, 18
DTYPE_NAMES = {F32: "f32", BF16: "bf16", I8: "i8", F8E4M3: "f8e4m3", Q8RB: "q8rb",
               Q4G: "q4g", F8COL: "f8col"}

CONFIG_KEYS = (  # SPEC §7, in canonical order
    "vocab_size", "pad_token", "eos_token", "sequence_len", "embedding_multiplier_scale",
    "output_multiplier_scale", "emb_size", "key_size", "num_q_heads", "num_kv_heads",
    "num_layers", "widening_factor", "attn_output_multiplier", "num_experts",
    "num_selected_experts", "rms_norm_eps", "rope_base", "attn_logit_cap", "ffn_size",
    "attn_output_scale_blocks", "moe_down_scale_blocks")
CONFIG_REALS = {"embedding_multiplier_scale", "output_multiplier_scale", "widening_factor",
                "attn_output_multiplier", "rms_norm_eps", "rope_base", "attn_logit_cap"}

_HEADER = struct.Struct("<8sIIIIQQQQQQQIIQ24sQ")
assert _HEADER.size == HEADER_SIZE
_ENTRY_FIXED = struct.Struct("<IIIiI")
_ENTRY_TAIL = struct.Struct("<qQQQQ")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,255}\Z")


class FormatError(ValueError):
    """A file or directory that does not follow format/SPEC.md."""


def xxh3_64(data) -> int | None:
    """XXH3-64 (seed 0) of `data`, or None when xxhash is unavailable."""
    if _xxhash is None:
        return None
    return _xxhash.xxh3_64_intdigest(bytes(data))


def shard_file_name(rank: int, tp: int) -> str:
    return f"shard-{rank:05d}-of-{tp:05d}.gkt"


def align_up(v: int, a: int) -> int:
    return (v + a - 1) // a * a


def payload_size(dtype: int, shape, param: int) -> int:
    """Payload bytes of an entry (SPEC §4). Raises FormatError for what cannot be sized."""
    n = 1
    for d in shape:
        n *= int(d)
    if dtype == F32:
        return 4 * n
    if dtype == BF16:
        return 2 * n
    if dtype in (I8, F8E4M3):
        return n
    if dtype == Q8RB:
        if len(shape) < 2 or param < 1 or shape[-2] % param:
            raise FormatError(f"q8rb with param {param} does not fit shape {list(shape)}")
        lead = n // (shape[-2] * shape[-1])
        return align_up(n, 64) + 2 * lead * param * shape[-1]
    if dtype in (Q4G, F8COL):
        # k-chunked matrices (SPEC §4.1): 32-row chunks, 16-byte-padded bf16 scale rows
        if len(shape) < 2 or shape[-2] % 32:
            raise FormatError(f"{DTYPE_NAMES[dtype]} needs a [.., K, N] shape with K a multiple of 32: {list(shape)}")
        K, N = int(shape[-2]), int(shape[-1])
        lead = n // (K * N)
        scale_row = align_up(2 * N, 16)
        if dtype == F8COL:
            if param != 0:
                raise FormatError(f"f8col with param {param} (must be 0)")
            return lead * (K * N + scale_row)
        if param not in (32, 64, 128) or K % param:
            raise FormatError(f"q4g with group {param} does not fit shape {list(shape)}")
        return lead * (K // param) * (param // 2 * N + scale_row)
    raise FormatError(f"unknown dtype code {dtype}")


# ---------------------------------------------------------------------------------------
# Manifest
def _incomplete_or_absent(model_dir: str) -> FormatError:
    names = os.listdir(model_dir)
    if STATE_DIR in names or any(re.fullmatch(r"shard-\d{5}-of-\d{5}\.gkt", n) for n in names):
        return FormatError(f"{model_dir}: no {MANIFEST}: this is an incomplete conversion "
                           f"(interrupted?); refusing to read it")
    return FormatError(f"{model_dir}: no {MANIFEST}: not a grokit model directory")


def _want(obj, key, types, where):
    if key not in obj:
        raise FormatError(f"{where}: missing key '{key}'")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, types):
        raise FormatError(f"{where}: key '{key}' has the wrong type ({type(v).__name__})")
    return v


def _hex(obj, key, where) -> int:
    s = _want(obj, key, str, where)
    if not re.fullmatch(r"[0-9a-f]{16}", s):
        raise FormatError(f"{where}: key '{key}' is not 16 lowercase hex digits: {s!r}")
    return int(s, 16)


def _check_config(c, where):
    if not isinstance(c, dict):
        raise FormatError(f"{where}: config is not an object")
    unknown = sorted(set(c) - set(CONFIG_KEYS))
    missing = [k for k in CONFIG_KEYS if k not in c]
    if unknown or missing:
        raise FormatError(f"{where}: config: unknown keys {unknown}, missing keys {missing}")
    for k in CONFIG_KEYS:
        v = c[k]
        if k in CONFIG_REALS:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
                raise FormatError(f"{where}: config '{k}' must be a positive finite number: {v!r}")
        else:
            if isinstance(v, bool) or not isinstance(v, int):
                raise FormatError(f"{where}: config '{k}' must be an integer: {v!r}")
            if v < 0 or v > 2 ** 31 or (v == 0 and k not in ("pad_token", "eos_token")):
                raise FormatError(f"{where}: config '{k}' is out of range: {v}")
    if c["pad_token"] >= c["vocab_size"] or c["eos_token"] >= c["vocab_size"]:
        raise FormatError(f"{where}: pad_token/eos_token must be below vocab_size")
    if c["num_q_heads"] % c["num_kv_heads"]:
        raise FormatError(f"{where}: num_q_heads is not a multiple of num_kv_heads")
    if c["num_selected_experts"] > c["num_experts"]:
        raise FormatError(f"{where}: num_selected_experts exceeds num_experts")
    if c["key_size"] % 2:
        raise FormatError(f"{where}: key_size must be even")
    if (c["num_q_heads"] * c["key_size"]) % c["attn_output_scale_blocks"]:
        raise FormatError(f"{where}: attention output rows do not split into scale blocks")
    if c["ffn_size"] % c["moe_down_scale_blocks"]:
        raise FormatError(f"{where}: ffn_size does not split into scale blocks")


def model_id_key(config: dict, tp: int, scheme: str) -> bytes:
    """The bytes whose XXH3-64 is the model_id (SPEC §7)."""
    canonical = json.dumps({k: config[k] for k in CONFIG_KEYS}, indent=2)
    return (canonical + f"\ntp={tp}\nscheme={scheme}").encode()


def read_manifest(model_dir: str) -> dict:
    """Reads and checks <model_dir>/manifest.json and the presence and sizes of the files
    it lists. Returns the parsed JSON object."""
    if not os.path.isdir(model_dir):
        raise FormatError(f"{model_dir}: not a directory")
    path = os.path.join(model_dir, MANIFEST)
    if not os.path.exists(path):
        raise _incomplete_or_absent(model_dir)
    with open(path, "rb") as f:
        try:
            m = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise FormatError(f"{path}: not a JSON object")
    if _want(m, "format", str, path) != "grokit-model":
        raise FormatError(f"{path}: format {m['format']!r} is not 'grokit-model'")
    version = _want(m, "format_version", int, path)
    if version < 1 or version > FORMAT_VERSION:
        raise FormatError(f"{path}: format version {version} is not supported (this reader "
                          f"reads version {FORMAT_VERSION})")
    _want(m, "producer", str, path)
    model_id = _hex(m, "model_id", path)
    scheme = _want(m, "scheme", str, path)
    tp = _want(m, "tensor_parallel", int, path)
    if not 1 <= tp <= 4096:
        raise FormatError(f"{path}: tensor_parallel {tp} is out of range")
    alignment = _want(m, "alignment", int, path)
    if alignment < MIN_ALIGNMENT or alignment > 2 ** 30 or alignment & (alignment - 1):
        raise FormatError(f"{path}: alignment {alignment} is not a power of two in [4096, 2^30]")
    _want(m, "tensor_count", int, path)
    config = _want(m, "config", dict, path)
    _check_config(config, path)
    want_id = xxh3_64(model_id_key(config, tp, scheme))
    if want_id is not None and want_id != model_id:
        raise FormatError(f"{path}: model_id {model_id:016x} does not match the config, TP "
                          f"degree and scheme ({want_id:016x})")
    shards = _want(m, "shards", list, path)
    if len(shards) != tp:
        raise FormatError(f"{path}: {len(shards)} shards listed for TP {tp}")
    for i, s in enumerate(shards):
        where = f"{path}: shards[{i}]"
        if not isinstance(s, dict):
            raise FormatError(f"{where} is not an object")
        if _want(s, "rank", int, where) != i:
            raise FormatError(f"{where} has rank {s['rank']}")
        if _want(s, "file", str, where) != shard_file_name(i, tp):
            raise FormatError(f"{where} names {s['file']!r}, expected {shard_file_name(i, tp)!r}")
        _want(s, "size", int, where)
        _want(s, "tensor_count", int, where)
        _hex(s, "index_xxh3", where)
        p = os.path.join(model_dir, s["file"])
        if not os.path.isfile(p):
            raise FormatError(f"{model_dir}: shard {i} ({s['file']}) is missing")
        if os.path.getsize(p) != s["size"]:
            raise FormatError(f"{p}: {os.path.getsize(p)} bytes, the manifest records {s['size']}")
    tok = m.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, dict):
            raise FormatError(f"{path}: tokenizer must be an object or null")
        if _want(tok, "file", str, path) != TOKENIZER:
            raise FormatError(f"{path}: tokenizer file must be {TOKENIZER!r}")
        _want(tok, "size", int, path)
        _hex(tok, "xxh3", path)
        p = os.path.join(model_dir, TOKENIZER)
        if not os.path.isfile(p) or os.path.getsize(p) != tok["size"]:
            raise FormatError(f"{p}: missing or not {tok['size']} bytes")
    return m


# ---------------------------------------------------------------------------------------
# Shards
class Shard:
    """A parsed shard file: `header` (dict), `entries` (list of dicts), `data` (the file as
    a read-only uint8 memmap). Unpacks as (header, entries)."""

    def __init__(self, path, header, entries, data):
        self.path, self.header, self.entries, self.data = path, header, entries, data
        self.by_name = {e["name"]: e for e in entries}

    def __iter__(self):
        return iter((self.header, self.entries))

    def stored(self, entry) -> np.ndarray:
        start = self.header["data_offset"] + entry["offset"]
        return self.data[start:start + entry["stored_size"]]


def _resolve_verify(verify):
    if verify and not HAVE_XXHASH:
        raise FormatError("checksum verification requested but the xxhash module is unavailable")
    return HAVE_XXHASH if verify is None else bool(verify)


def _parse_header(b: bytes, size: int, path: str, verify: bool) -> dict:
    if size < HEADER_SIZE:
        raise FormatError(f"{path}: {size} bytes, shorter than the 128-byte header")
    (magic, version, header_size, rank, rank_count, model_id, tensor_count, index_offset,
     index_size, data_offset, data_size, file_size, alignment, flags, index_xxh3, reserved,
     header_xxh3) = _HEADER.unpack(b[:HEADER_SIZE])
    if magic != MAGIC:
        raise FormatError(f"{path}: byte 0: bad magic {magic!r}: not a grokit shard file")
    if version < 1 or version > FORMAT_VERSION:
        raise FormatError(f"{path}: byte 8: format version {version} is not supported (this "
                          f"reader reads version {FORMAT_VERSION})")
    if header_size != HEADER_SIZE:
        raise FormatError(f"{path}: byte 12: header size {header_size}, expected 128")
    if verify and xxh3_64(b[:120]) != header_xxh3:
        raise FormatError(f"{path}: byte 120: header checksum mismatch")
    if not 1 <= rank_count <= 4096 or rank >= rank_count:
        raise FormatError(f"{path}: byte 16: rank {rank} of {rank_count} is invalid")
    if alignment < MIN_ALIGNMENT or alignment > 2 ** 30 or alignment & (alignment - 1):
        raise FormatError(f"{path}: byte 80: alignment {alignment} is invalid")
    if flags != 0:
        raise FormatError(f"{path}: byte 84: unknown flags {flags:#x}")
    if file_size != size:
        raise FormatError(f"{path}: byte 72: header records {file_size} bytes, the file has {size}")
    if index_offset != HEADER_SIZE:
        raise FormatError(f"{path}: byte 40: index offset {index_offset}, expected 128")
    if index_offset + index_size > size:
        raise FormatError(f"{path}: byte 48: index of {index_size} bytes runs past the end")
    if data_offset % alignment or data_offset < index_offset + index_size:
        raise FormatError(f"{path}: byte 56: data offset {data_offset} is unaligned or overlaps the index")
    if data_offset + data_size != size:
        raise FormatError(f"{path}: byte 64: data section does not end at the end of the file")
    return dict(version=version, header_size=header_size, rank=rank, rank_count=rank_count,
                model_id=model_id, tensor_count=tensor_count, index_offset=index_offset,
                index_size=index_size, data_offset=data_offset, data_size=data_size,
                file_size=file_size, alignment=alignment, flags=flags, index_xxh3=index_xxh3,
                reserved=reserved, header_xxh3=header_xxh3, checksums_verified=verify)


def _parse_index(idx: bytes, h: dict, path: str) -> list:
    n, pos, out = len(idx), 0, []

    def fail(at, what):
        return FormatError(f"{path}: byte {h['index_offset'] + at}: index entry {len(out)}: {what}")

    for _ in range(h["tensor_count"]):
        at = pos
        if n - pos < 4:
            raise fail(pos, "truncated")
        (name_len,) = struct.unpack_from("<I", idx, pos)
        pos += 4
        if not 1 <= name_len <= MAX_NAME:
            raise fail(at, f"name length {name_len} is out of range")
        if n - pos < name_len + _ENTRY_FIXED.size:
            raise fail(pos, "truncated")
        name = idx[pos:pos + name_len].decode("ascii", errors="replace")
        if not _NAME_RE.match(name):
            raise fail(pos, f"tensor name {name!r} has invalid characters")
        pos += name_len
        dtype, param, ndim, split_axis, compression = _ENTRY_FIXED.unpack_from(idx, pos)
        pos += _ENTRY_FIXED.size
        if dtype not in DTYPE_NAMES:
            raise fail(at, f"'{name}': unknown dtype code {dtype}")
        if not 1 <= ndim <= MAX_DIMS:
            raise fail(at, f"'{name}': {ndim} dimensions")
        if n - pos < 16 * ndim + _ENTRY_TAIL.size:
            raise fail(pos, "truncated")
        shape = list(struct.unpack_from(f"<{ndim}q", idx, pos))
        global_shape = list(struct.unpack_from(f"<{ndim}q", idx, pos + 8 * ndim))
        pos += 16 * ndim
        split_start, offset, stored_size, size, xxh3 = _ENTRY_TAIL.unpack_from(idx, pos)
        pos += _ENTRY_TAIL.size
        if any(d <= 0 for d in shape) or any(not 1 <= g <= 2 ** 40 for g in global_shape):
            raise fail(at, f"'{name}': a dimension is out of range")
        if not -1 <= split_axis < ndim:
            raise fail(at, f"'{name}': split axis {split_axis} is invalid")
        for d in range(ndim):
            if d != split_axis and shape[d] != global_shape[d]:
                raise fail(at, f"'{name}': local shape {shape} does not match {global_shape}")
            if d == split_axis and not 0 <= split_start <= global_shape[d] - shape[d]:
                raise fail(at, f"'{name}': slice [{split_start}, +{shape[d]}) is outside {global_shape}")
        if split_axis == -1 and split_start != 0:
            raise fail(at, f"'{name}': unsplit tensor with split start {split_start}")
        try:
            want = payload_size(dtype, shape, param)
        except FormatError as e:
            raise fail(at, f"'{name}': {e}") from None
        if size != want:
            raise fail(at, f"'{name}': size {size} != {want} for {DTYPE_NAMES[dtype]} {shape}")
        if compression > 1:
            raise fail(at, f"'{name}': unknown compression {compression}")
        if compression == 0 and stored_size != size:
            raise fail(at, f"'{name}': raw tensor with stored size {stored_size} != size {size}")
        if offset % h["alignment"]:
            raise fail(at, f"'{name}': offset {offset} is not aligned to {h['alignment']}")
        if offset + stored_size > h["data_size"]:
            raise fail(at, f"'{name}': bytes run past the data section")
        out.append(dict(name=name, dtype=dtype, dtype_name=DTYPE_NAMES[dtype], param=param,
                        shape=shape, global_shape=global_shape, split_axis=split_axis,
                        compression=compression, split_start=split_start, offset=offset,
                        stored_size=stored_size, size=size, xxh3=xxh3))
    if pos != n:
        raise FormatError(f"{path}: index has {n - pos} bytes after its last entry")
    ordered = sorted(out, key=lambda e: e["offset"])
    for a, b in zip(ordered, ordered[1:]):
        if b["offset"] < a["offset"] + a["stored_size"]:
            raise FormatError(f"{path}: tensors '{a['name']}' and '{b['name']}' overlap")
    seen = set()
    for e in out:
        if e["name"] in seen:
            raise FormatError(f"{path}: tensor '{e['name']}' appears twice in the index")
        seen.add(e["name"])
    return out


def read_shard(path: str, verify=None) -> Shard:
    """Parses and checks a shard file. verify: None = check the header and index checksums
    when xxhash is available; True = require it; False = skip them. The header dict says
    which (`checksums_verified`)."""
    verify = _resolve_verify(verify)
    size = os.path.getsize(path)
    if size < HEADER_SIZE:
        raise FormatError(f"{path}: {size} bytes, shorter than the 128-byte header")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    h = _parse_header(data[:HEADER_SIZE].tobytes(), size, path, verify)
    if h["tensor_count"] > h["index_size"] // 81:
        raise FormatError(f"{path}: header claims {h['tensor_count']} tensors, the index has "
                          f"room for at most {h['index_size'] // 81}")
    idx = data[h["index_offset"]:h["index_offset"] + h["index_size"]].tobytes()
    if verify and xxh3_64(idx) != h["index_xxh3"]:
        raise FormatError(f"{path}: tensor index checksum mismatch")
    return Shard(path, h, _parse_index(idx, h, path), data)


def verify_tensor(shard: Shard, entry: dict) -> None:
    """Checks a tensor's stored bytes against its index checksum (needs xxhash)."""
    got = xxh3_64(shard.stored(entry))
    if got is None:
        raise FormatError("xxhash is unavailable: cannot verify tensor checksums")
    if got != entry["xxh3"]:
        raise FormatError(f"{shard.path}: tensor '{entry['name']}': checksum mismatch")


def _payload(shard: Shard, entry: dict) -> np.ndarray:
    raw = shard.stored(entry)
    if entry["compression"] == 0:
        return raw
    try:
        import zstandard  # optional, not a dependency
    except ImportError:
        raise FormatError(f"{shard.path}: tensor '{entry['name']}' is zstd-compressed and the "
                          f"zstandard module is unavailable") from None
    out = zstandard.ZstdDecompressor().decompress(raw.tobytes(), max_output_size=entry["size"])
    if len(out) != entry["size"]:
        raise FormatError(f"{shard.path}: '{entry['name']}' decompressed to {len(out)} bytes")
    return np.frombuffer(out, np.uint8)


def tensor_array(shard, entry, bf16_bits: bool = False, verify=None):
    """The entry's local tensor. f32/i8/f8e4m3/bf16 -> one array (bf16 as ml_dtypes.bfloat16,
    or its uint16 bits with bf16_bits); q8rb -> (int8 codes [.., K, N], bf16 scales [.., B, N]).
    Uncompressed results are read-only views of the mapped file."""
    if not isinstance(shard, Shard):
        shard = read_shard(shard)
    if isinstance(entry, str):
        entry = shard.by_name[entry]
    if _resolve_verify(verify):
        verify_tensor(shard, entry)
    p, shape, dt = _payload(shard, entry), tuple(entry["shape"]), entry["dtype"]
    bf16 = np.dtype("<u2") if bf16_bits else np.dtype(ml_dtypes.bfloat16)
    if dt == F32:
        return p.view("<f4").reshape(shape)
    if dt == BF16:
        return p.view(bf16).reshape(shape)
    if dt == I8:
        return p.view(np.int8).reshape(shape)
    if dt == F8E4M3:
        return p.view(ml_dtypes.float8_e4m3fn).reshape(shape)
    if dt == Q8RB:
        n = int(np.prod(shape))
        codes = p[:n].view(np.int8).reshape(shape)
        scales = p[align_up(n, 64):].view(bf16).reshape(shape[:-2] + (entry["param"], shape[-1]))
        return codes, scales
    raise FormatError(f"{shard.path}: '{entry['name']}': dtype {dt} cannot be read")


def dequantize_q8rb(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """bf16(bf16(code) * scale), rows [b*K/B, (b+1)*K/B) using scale row b (SPEC §4)."""
    k, b = codes.shape[-2], scales.shape[-2]
    s = np.repeat(scales.view(ml_dtypes.bfloat16).astype(np.float32), k // b, axis=-2)
    return (codes.astype(np.float32) * s).astype(ml_dtypes.bfloat16)


def check_padding(shard: Shard) -> None:
    """Every byte that is not header, index or tensor payload is zero (SPEC §2)."""
    h, d = shard.header, shard.data
    if any(h["reserved"]):
        raise FormatError(f"{shard.path}: header reserved bytes are not zero")
    gaps = [(h["index_offset"] + h["index_size"], h["data_offset"])]
    pos = 0
    for e in sorted(shard.entries, key=lambda e: e["offset"]):
        gaps.append((h["data_offset"] + pos, h["data_offset"] + e["offset"]))
        pos = e["offset"] + e["stored_size"]
        if e["dtype"] == Q8RB and e["compression"] == 0:
            n = int(np.prod(e["shape"]))
            start = h["data_offset"] + e["offset"]
            gaps.append((start + n, start + align_up(n, 64)))
    if h["data_offset"] + pos != h["file_size"]:
        raise FormatError(f"{shard.path}: the file does not end at the last tensor's end")
    for a, b in gaps:
        if b > a and np.any(d[a:b]):
            raise FormatError(f"{shard.path}: bytes [{a}, {b}) are padding but not zero")


def read_model(model_dir: str, verify=None):
    """read_manifest, then every shard with the cross-checks of SPEC §7."""
    m = read_manifest(model_dir)
    model_id = int(m["model_id"], 16)
    shards = []
    for s in m["shards"]:
        sh = read_shard(os.path.join(model_dir, s["file"]), verify)
        h = sh.header
        checks = [("rank", h["rank"], s["rank"]), ("rank_count", h["rank_count"], m["tensor_parallel"]),
                  ("model_id", h["model_id"], model_id), ("file_size", h["file_size"], s["size"]),
                  ("index_xxh3", h["index_xxh3"], int(s["index_xxh3"], 16)),
                  ("tensor_count", h["tensor_count"], s["tensor_count"]),
                  ("alignment", h["alignment"], m["alignment"])]
        for what, got, want in checks:
            if got != want:
                raise FormatError(f"{sh.path}: header {what} {got} differs from the manifest's {want}")
        shards.append(sh)
    return m, shards
