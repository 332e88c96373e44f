"""Hand-made hostile pickles. Each entry: name -> (bytes, text the error must contain).

Some are what Python's pickle writes for objects whose __reduce__ runs a command (the
classic attack on pickle loaders); the rest are malformed opcode streams aimed at the
reader's bounds (stack, memo, nesting, frames, lengths)."""
import io
import os
import pickle
import struct

import numpy as np

MARKER_ENV = "GROKIT_ATTACK_MARKER"


class _Runs:
    """pickle.dumps of this calls func(*args) when loaded by Python's pickle."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _valid_array(proto=4):
    return pickle.dumps(np.arange(16, dtype=np.float32).reshape(4, 4), protocol=proto)


def attacks(marker: str) -> dict:
    """marker: a path that a successful attack would create."""
    touch = f"touch {marker}"
    a = {}
    a["os_system"] = (pickle.dumps(_Runs(os.system, (touch,)), protocol=4), "refusing global")
    a["os_system_proto2"] = (pickle.dumps(_Runs(os.system, (touch,)), protocol=2), "refusing global")
    a["builtins_eval"] = (pickle.dumps(_Runs(eval, (f"open({marker!r}, 'w')",)), protocol=4),
                          "refusing global 'builtins.eval'")
    a["builtins_exec_proto0"] = (pickle.dumps(_Runs(exec, (f"open({marker!r}, 'w')",)), protocol=0),
                                 "refusing global '__builtin__.exec'")
    a["subprocess"] = (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00" + b"\x8c\x0asubprocess\x8c\x05Popen\x93"
                       + b"\x8c\x04true\x85R.", "refusing global 'subprocess.Popen'")
    # A million MARKs, a million nested tuples, a deep list chain.
    a["million_marks"] = (b"\x80\x04" + b"(" * 1_000_000 + b".", "MARKs nested deeper")
    a["million_tuples"] = (b"\x80\x04N" + b"\x85" * 1_000_000 + b".", "nested deeper")
    a["million_lists"] = (b"\x80\x04" + b"]" * 1_000_000 + b"a" * 999_999 + b".", "stack deeper")
    # Memo and stack abuse.
    a["memo_flood"] = (b"\x80\x04N" + b"".join(b"r" + struct.pack("<I", i) for i in range(100_000)) + b".",
                       "memo holds more than")
    a["memo_unset"] = (b"\x80\x04h\x07.", "memo key 7 was never stored")
    a["stack_flood"] = (b"\x80\x04" + b"N" * 1_000_000 + b".", "stack deeper")
    a["stack_underflow"] = (b"\x80\x04\x85.", "stack underflow")
    # Lengths beyond the file.
    a["bytes_past_end"] = (b"\x80\x04B" + struct.pack("<I", 1 << 20) + b"x" * 100 + b".", "remain in the file")
    a["declared_4gb_in_1kb"] = (b"\x80\x04\x8e" + struct.pack("<Q", 4 << 30) + b"x" * 1000,
                                "remain in the file")
    a["string_past_end"] = (b"\x80\x04X" + struct.pack("<I", 0xFFFFFFFF) + b"abc", "remain in the file")
    # Frames.
    valid = _valid_array()
    a["frame_lies"] = (b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + valid[11:], "FRAME declares")
    a["frame_truncated"] = (valid[: len(valid) // 2], "truncated")
    a["frame_in_frame"] = (b"\x80\x04\x95" + struct.pack("<Q", 20) + b"\x95" + struct.pack("<Q", 5) + b"N" * 20 + b".",
                           "new FRAME begins before")
    # Valid prefixes followed by garbage; garbage opcodes.
    a["valid_then_garbage"] = (valid + b"GARBAGE", "trailing data after STOP")
    a["valid_prefix_bad_opcode"] = (valid[:11] + b"\xff" + valid[12:], "byte 11: opcode 0xff")
    a["empty"] = (b"", "empty file")
    a["not_a_pickle"] = (b"PK\x03\x04 this is a zip file, not a pickle", "opcode")
    # Well-formed pickles of the wrong thing.
    a["object_array"] = (pickle.dumps(np.array([1, "x"], dtype=object), protocol=4), "unsupported dtype")
    a["float64_array"] = (pickle.dumps(np.zeros(4, dtype=np.float64), protocol=4), "unsupported dtype 'f8'")
    a["big_endian"] = (pickle.dumps(np.zeros(4, dtype=">f4"), protocol=4), "big-endian")
    a["plain_dict"] = (pickle.dumps({"weight": 1}, protocol=4), "not an array")
    return a


def write_corpus(directory: str, marker: str = "/nonexistent/grokit-attack-marker") -> list:
    os.makedirs(directory, exist_ok=True)
    names = []
    for name, (data, _) in attacks(marker).items():
        with open(os.path.join(directory, name + ".pkl"), "wb") as f:
            f.write(data)
        names.append(name)
    return names


if __name__ == "__main__":
    import sys
    print("\n".join(write_corpus(sys.argv[1])))
