#!/usr/bin/env python3
"""Fixtures for the ggml quant types and the GGUF reader (tests/test_quant.cpp, test_gguf.cpp).

The expected values come from the `gguf` Python package (gguf.quants.dequantize and
gguf.GGUFWriter / GGUFReader), never from bigmoe itself.

Writes into --out (default tests/fixtures/quant):
  <TYPE>.bin   raw blocks of random bytes (fp16 scale fields set to finite values)
  <TYPE>.f32   gguf.quants.dequantize of those bytes, float32 little-endian
  meta.gguf    a GGUF with a key of every value type (arrays of each, nested arrays), a custom
               alignment, and tensors of several types and ranks, written by gguf.GGUFWriter
  meta.json    what meta.gguf must read back as (keys in file order with types and values;
               tensors with type, ne, nbytes, file offset and dequantized values)

    pip install gguf numpy
    python tools/make_quant_fixtures.py --out tests/fixtures/quant
"""
import argparse
import importlib.metadata
import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V
from gguf.quants import dequantize

# Byte offsets of the fp16 scale / offset fields inside one block (gguf/quants.py layouts).
HALF_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
N_BLOCKS = 64
N_PLAIN = 1027  # plain types: odd, so SIMD tails are exercised


def random_halves(rng, n):
    """n fp16 values with |v| in [1e-3, 1], random sign, as uint16 bits."""
    mag = np.exp(rng.uniform(np.log(1e-3), 0.0, n))
    sign = rng.choice([-1.0, 1.0], n)
    return (mag * sign).astype(np.float16).view(np.uint16)


def quant_blocks(rng, qtype, n_blocks):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        h = random_halves(rng, n_blocks)
        # A few edge blocks: zero scale, a subnormal scale, a negative one.
        if n_blocks >= 3:
            h[0] = 0x0000
            h[1] = 0x0001
            h[2] = np.float16(-1.0).view(np.uint16)
        raw[:, off:off + 2] = h.view(np.uint8).reshape(n_blocks, 2)
    return raw


def plain_data(rng, qtype):
    if qtype == Q.F32:
        v = rng.standard_normal(N_PLAIN).astype(np.float32)
        v[:4] = [0.0, -0.0, 1e-40, -3.0e38]  # zero, negative zero, subnormal, large
        return v.view(np.uint8)
    bits = rng.integers(0, 1 << 16, N_PLAIN, dtype=np.uint32).astype(np.uint16)
    # Drop infinities and NaNs (exponent all ones), keep zeros and subnormals.
    exp_mask, exp_shift = (0x7C00, 10) if qtype == Q.F16 else (0x7F80, 7)
    bad = (bits & exp_mask) == exp_mask
    bits[bad] &= np.uint16(~(1 << exp_shift) & 0xFFFF)
    bits[:3] = [0x0000, 0x8000, 0x0001]
    return bits.view(np.uint8)


def expected_floats(data, qtype):
    if qtype == Q.BF16:
        # gguf.quants' BF16 path: bits << 16 reinterpreted as float32.
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return dequantize(data, qtype).astype(np.float32).reshape(-1)


def write_quant_fixtures(out, rng):
    total = 0
    for qtype in [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K,
                  Q.Q6_K]:
        if qtype in (Q.F32, Q.F16, Q.BF16):
            data = plain_data(rng, qtype)
        else:
            data = quant_blocks(rng, qtype, N_BLOCKS)
        vals = expected_floats(data, qtype)
        assert np.all(np.isfinite(vals)), qtype.name
        data.tofile(os.path.join(out, f"{qtype.name}.bin"))
        vals.astype("<f4").tofile(os.path.join(out, f"{qtype.name}.f32"))
        total += data.nbytes + vals.nbytes
    return total


# (key, gguf value type, element type for arrays, value). Nested arrays: element type ARRAY,
# inner element type in the value's own lists.
KVS = [
    ("test.u8", V.UINT8, None, 200),
    ("test.i8", V.INT8, None, -100),
    ("test.u16", V.UINT16, None, 60000),
    ("test.i16", V.INT16, None, -30000),
    ("test.u32", V.UINT32, None, 4000000000),
    ("test.i32", V.INT32, None, -2000000000),
    ("test.f32", V.FLOAT32, None, 3.14159),
    ("test.bool_true", V.BOOL, None, True),
    ("test.bool_false", V.BOOL, None, False),
    ("test.str", V.STRING, None, "h\u00e9llo w\u00f6rld \u2713"),
    ("test.str_empty", V.STRING, None, ""),
    ("test.u64", V.UINT64, None, 2**63 + 5),
    ("test.i64", V.INT64, None, -(2**62) - 3),
    ("test.f64", V.FLOAT64, None, 2.718281828459045),
    ("test.arr_u8", V.ARRAY, V.UINT8, [0, 1, 255]),
    ("test.arr_i8", V.ARRAY, V.INT8, [-128, 0, 127]),
    ("test.arr_u16", V.ARRAY, V.UINT16, [0, 65535]),
    ("test.arr_i16", V.ARRAY, V.INT16, [-32768, 32767, 5]),
    ("test.arr_u32", V.ARRAY, V.UINT32, [4294967295, 7]),
    ("test.arr_i32", V.ARRAY, V.INT32, [-2147483648, 2147483647, 0, 42]),
    ("test.arr_f32", V.ARRAY, V.FLOAT32, [0.5, -1.25, 1e-3]),
    ("test.arr_bool", V.ARRAY, V.BOOL, [True, False, True]),
    ("test.arr_str", V.ARRAY, V.STRING, ["a", "bc", "", "\u00fc\u00df"]),
    ("test.arr_u64", V.ARRAY, V.UINT64, [18446744073709551615, 1]),
    ("test.arr_i64", V.ARRAY, V.INT64, [-9223372036854775808, 9223372036854775807]),
    ("test.arr_f64", V.ARRAY, V.FLOAT64, [1e300, -2.5]),
    ("test.arr_nested_i32", V.ARRAY, V.ARRAY, [[1, 2], [3], [-4, 5, 6]]),
    ("test.arr_nested_str", V.ARRAY, V.ARRAY, [["x"], ["y", "z"]]),
]


def as_f32(x):
    return float(np.float32(x))


def json_value(vtype, sub, value):
    if vtype == V.FLOAT32:
        return as_f32(value)
    if vtype == V.ARRAY and sub == V.FLOAT32:
        return [as_f32(x) for x in value]
    return value


def write_meta(out, rng):
    path = os.path.join(out, "meta.gguf")
    w = gguf.GGUFWriter(path, arch="bigmoe-test")  # adds general.architecture first
    w.add_custom_alignment(64)
    for key, vtype, sub, value in KVS:
        w.add_key_value(key, value, vtype, sub_type=sub)

    tensors = []  # (name, qtype, numpy shape, raw bytes)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    tensors.append(("tok.f32", Q.F32, (3, 5), f32.view(np.uint8).reshape(3, 20)))
    f16 = rng.standard_normal((4, 8)).astype(np.float16)
    tensors.append(("w.f16", Q.F16, (4, 8), f16.view(np.uint8).reshape(4, 16)))
    bf16 = (rng.standard_normal((2, 6)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    tensors.append(("w.bf16", Q.BF16, (2, 6), bf16.view(np.uint8).reshape(2, 12)))
    for name, qtype, shape in [("w.q8_0", Q.Q8_0, (2, 64)), ("w.q4_k", Q.Q4_K, (2, 256)),
                               ("w.q6_k", Q.Q6_K, (1, 512)), ("exps.q4_0", Q.Q4_0, (2, 3, 64)),
                               ("w.q5_k", Q.Q5_K, (1, 256))]:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(shape[:-1]))
        raw = quant_blocks(rng, qtype, rows * shape[-1] // block)
        tensors.append((name, qtype, shape, raw.reshape(*shape[:-1], shape[-1] // block * size)))
    for name, qtype, shape, raw in tensors:
        w.add_tensor(name, raw, raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Read back with the package's own reader for the offsets, and check it agrees.
    r = gguf.GGUFReader(path)
    keys = [f.name for f in r.fields.values() if not f.name.startswith("GGUF.")]
    expect_keys = ["general.architecture", "general.alignment"] + [k for k, *_ in KVS]
    assert keys == expect_keys, keys

    meta = {
        "version": 3,
        "alignment": 64,
        "kv": [{"key": "general.architecture", "type": "STRING", "value": "bigmoe-test"},
               {"key": "general.alignment", "type": "UINT32", "value": 64}],
        "tensors": [],
    }
    for key, vtype, sub, value in KVS:
        e = {"key": key, "type": vtype.name, "value": json_value(vtype, sub, value)}
        if sub is not None:
            e["elem_type"] = sub.name
        if sub == V.ARRAY:
            e["inner_type"] = V.get_type(value[0][0]).name
        meta["kv"].append(e)
    by_name = {t.name: t for t in r.tensors}
    for name, qtype, shape, raw in tensors:
        rt = by_name[name]
        assert rt.tensor_type == qtype and rt.n_bytes == raw.nbytes
        vals = expected_floats(raw.reshape(-1), qtype) if qtype == Q.BF16 else \
            dequantize(raw.reshape(-1, raw.shape[-1]), qtype).reshape(-1)
        meta["tensors"].append({
            "name": name, "type": qtype.name, "type_id": int(qtype),
            "ne": list(reversed(shape)), "nbytes": int(raw.nbytes),
            "file_offset": int(rt.data_offset),
            "values": [float(v) for v in vals],
        })
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return os.path.getsize(path) + os.path.getsize(os.path.join(out, "meta.json"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/quant")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    total = write_quant_fixtures(args.out, rng)
    total += write_meta(args.out, rng)
    print(f"wrote {args.out}: {total} bytes (gguf {importlib.metadata.version('gguf')}, "
          f"numpy {np.__version__})")
    assert total < 1 << 20


if __name__ == "__main__":
    main()
