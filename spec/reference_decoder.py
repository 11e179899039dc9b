"""A reference decoder of `.inr` format 2.0, written from FORMAT.md Part II (rules 80-97) and the parts of
Part I it keeps, independently of the inrfmt package (numpy, zstandard for the `index` frame, and the
standard library only). It is part of the specification: small and slow on purpose (rANS in pure Python).

    python spec/reference_decoder.py FILE.inr         # checks the whole file, prints a summary

    from reference_decoder import decode
    d = decode(open("x.inr", "rb").read())
    d.codes    # int64 [N, P]: every image's codes, parameter groups in order (rule 82)
    d.params   # float32 [N, P]: the dequantized parameters (rule 84), bit-exact
    d.index    # {"label", "height", "width", "psnr", "chunk"}: one array each, N values

It checks every MUST of Part II and of the Part I rules that 2.0 keeps (the structure, every checksum, the
blobs section's too, every table and every chunk's message) before it returns anything; a file that breaks
one raises FormatError("rule N: ...").
"""
from __future__ import annotations

import bisect
import json
import math
import struct
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

MAGIC = b"\x89INR\r\n\x1a\n"
PRIOR_MAGIC = b"\x89INP\r\n\x1a\n"
READER_VERSION = (2, 0)
PRECISION = 24                   # rule 87: frequencies sum to 2^24
TOTAL = 1 << PRECISION
LANES = 4                        # rule 90
REQUIRED = ("blobs", "index", "psnr", "chunks", "quant", "tables", "classes", "metadata")  # rule 81
OPTIONAL = ("keys", "prior")     # rule 81: defined from 2.0 on
ARCH_CONSTANTS = {"in_features": 2, "out_features": 3, "output_layer": "linear",
                  "coordinates": "xy_pixel_centers_minus1_1", "output_mapping": "rgb_clamp01(0.5*o+0.5)"}
INDEX_COLUMNS = (("label", "<i4"), ("height", "<u4"), ("width", "<u4"))  # rule 94; psnr: its own section
CHUNK_ROW = np.dtype([("offset", "<u8"), ("compressed_length", "<u8"), ("raw_length", "<u8"),
                      ("first_image", "<u8"), ("image_count", "<u4"), ("crc32", "<u4")])  # rule 44
QUANT_ROW = np.dtype([("step", "<f4"), ("bits", "u1"), ("wrapped", "u1"), ("reserved", "V2")])  # rule 83


class FormatError(ValueError):
    """The file breaks a rule of FORMAT.md (the message names it)."""


def need(condition, rule, message):
    if not condition:
        raise FormatError(f"rule {rule}: {message}")


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def align(x):
    return (x + 63) // 64 * 64  # rule 5


def parse_json(raw, what):
    """Rule 3: UTF-8 JSON, no NaN/Infinity, no repeated key in any object."""
    def no_constant(name):
        raise ValueError(f"{name} is not allowed")

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("a key is repeated")
        return dict(pairs)
    try:
        return json.loads(bytes(raw).decode("utf-8"), parse_constant=no_constant, object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"rule 3: {what} is not valid JSON ({type(e).__name__})") from None


# -- the network's parameters --------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    name: str
    shape: tuple
    offset: int        # offset_g: the group's first parameter in an image's flat vector
    period_w0: float   # the period factor of a sine-layer bias, else None

    @property
    def size(self):
        return math.prod(self.shape)


def check_architecture(a, where="header.architecture"):
    """Rules 30-38; returns (S, W, w0, first_w0)."""
    need(isinstance(a, dict), 30, f"{where} must be an object")
    for key, value in ARCH_CONSTANTS.items():
        need(key in a and a[key] == value and type(a[key]) is type(value), 34, f"{where}.{key} must be {value!r}")
    s, w, w0, fw0 = (a.get(k) for k in ("sine_layers", "width", "w0", "first_w0"))
    need(is_int(s) and 1 <= s <= 1024, 30, f"sine_layers {s!r}")
    need(is_int(w) and 1 <= w <= 4096, 31, f"width {w!r}")
    for rule, v in ((32, w0), (33, fw0)):
        need(is_number(v) and math.isfinite(v) and v > 0, rule, f"w0/first_w0 {v!r}")
    return s, w, float(w0), float(fw0)


def param_groups(s, w, w0, first_w0):
    """Rule 82: first_w, first_b, hidden_w.l, hidden_b.l (l = 0..H-1), last_w, last_b."""
    spec = [("first_w", (w, 2), None), ("first_b", (w,), first_w0)]
    for layer in range(s - 1):
        spec += [(f"hidden_w.{layer}", (w, w), None), (f"hidden_b.{layer}", (w,), w0)]
    spec += [("last_w", (3, w), None), ("last_b", (3,), None)]
    groups, offset = [], 0
    for name, shape, period in spec:
        groups.append(Group(name, shape, offset, period))
        offset += math.prod(shape)
    return groups


# -- rules 85-87: tables -----------------------------------------------------------------------------
def read_leb128(data, pos):
    """Rule 85: unsigned LEB128, at most 5 bytes, minimal, < 2^32. Returns (value, next position)."""
    value = 0
    for i in range(5):
        need(pos < len(data), 85, "a LEB128 number is cut off by the end of the section")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            need(i == 0 or byte != 0, 85, "a LEB128 number is not minimal")
            need(value < 2 ** 32, 85, f"LEB128 number {value} is not < 2^32")
            return value, pos
    raise FormatError("rule 85: a LEB128 number is longer than 5 bytes")


def frequencies(counts):
    """Rule 87, integers only."""
    k = len(counts)
    total = sum(counts)
    if total == 0:
        counts, total = [1] * k, k
    f = [1 + c * (TOTAL - k) // total for c in counts]
    f[counts.index(max(counts))] += TOTAL - sum(f)
    return f


@dataclass
class Table:
    first: int
    counts: list
    freq: list
    cdf: list   # K + 1 entries


def parse_tables(data, bits):
    tables, pos = [], 0
    for g, b in enumerate(bits):
        first, pos = read_leb128(data, pos)
        k_minus_2, pos = read_leb128(data, pos)
        k = k_minus_2 + 2
        need(k <= 65536 and first + k <= 2 ** b, 86,  # checked before reading (allocating) any count
             f"table {g}: symbols {first}..{first + k - 1} are not all codes of its {b}-bit width")
        counts = []
        for _ in range(k):
            c, pos = read_leb128(data, pos)
            counts.append(c)
        f = frequencies(counts)
        cdf = [0]
        for x in f:
            cdf.append(cdf[-1] + x)
        tables.append(Table(first, counts, f, cdf))
    need(pos == len(data), 85, f"{len(data) - pos} bytes after the last table")
    return tables


# -- rules 89-92: one chunk's message ----------------------------------------------------------------------
def decode_message(message, n, groups, bits, tables):
    """The codes int64 [n, P] of a chunk of n images."""
    need(len(message) % 4 == 0 and len(message) >= 4 * LANES, 88, f"a message of {len(message)} bytes")
    words = [int(x) for x in np.frombuffer(message, "<u4")]
    counts = words[:LANES]
    need(sum(counts) == len(words) - LANES, 89, f"lane word counts {counts} do not add up to {len(words) - LANES}")
    lanes, start = [], LANES
    for m in counts:
        stack = words[start:start + m]   # read from the end
        start += m
        x = 0
        if stack:
            need(stack[-1] != 0, 89, "a lane's last word is 0")
            x = stack.pop()
            if stack:
                x = (x << 32) | stack.pop()
        lanes.append([x, stack])
    p = groups[-1].offset + groups[-1].size
    codes = np.zeros((n, p), np.int64)
    i = 0
    for g, b, t in zip(groups, bits, tables):   # rule 90: group by group, image by image, C order
        base = t.first - 2 ** (b - 1)
        for image in range(n):
            for e in range(g.size):
                lane = lanes[i % LANES]
                x, stack = lane
                quantile = x & (TOTAL - 1)                       # rule 91
                s = bisect.bisect_right(t.cdf, quantile) - 1     # cdf[s] <= quantile < cdf[s + 1]
                x = (x >> PRECISION) * t.freq[s] + (quantile - t.cdf[s])
                if x < 2 ** 32 and stack:
                    x = (x << 32) | stack.pop()
                lane[0] = x
                codes[image, g.offset + e] = s + base
                i += 1
    for x, stack in lanes:                                   # rule 92
        need(not stack, 92, f"{len(stack)} words are left in a lane")
        need(x == 0, 92, f"a lane ends in state {x:#x}, not 0")
    return codes


def dequantize(codes, steps, groups, theta0):
    """Rule 84: float32(theta0 + float32(step * float32(q))), each operation rounded to nearest even."""
    step = np.repeat(np.asarray(steps, np.float32), [g.size for g in groups])
    return theta0 + step * codes.astype(np.float32)  # float32 arrays: numpy rounds each operation to float32


# -- section 15: the prior ---------------------------------------------------------------------------------
def parse_prior(data, arch_key, groups):
    """A prior file's theta0 as one float32 vector [P] in group order (rules 65, 70-76)."""
    need(data[:8] == PRIOR_MAGIC and len(data) >= 24, 70, "the prior section is not a prior file")
    major, minor, header_length, crc, reserved = struct.unpack("<HHIII", data[8:24])
    need(major == 1, 71, f"prior format version {major}.{minor}")
    need(zlib.crc32(data[:16] + bytes(4) + data[20:]) == crc, 73, "the prior's CRC-32 does not match")
    need(reserved == 0, 73, "the prior's reserved field is not 0")
    need(header_length % 4 == 0 and header_length <= 65536 and 24 + header_length <= len(data), 72,
         f"prior header_length {header_length}")
    header = parse_json(data[24:24 + header_length], "the prior's header")
    need(isinstance(header, dict) and header.get("format") == "inr-prior", 74, "prior format must be 'inr-prior'")
    a = header.get("architecture")
    need(isinstance(a, dict) and set(a) == set(ARCH_CONSTANTS) | {"sine_layers", "width", "w0", "first_w0"}, 74,
         "the prior's architecture must have exactly the keys of section 4.1")
    need(check_architecture(a, "prior architecture") == arch_key, 65, "the prior is for another architecture")
    need(isinstance(header.get("name"), str), 74, "the prior's name must be a string")
    classes = ["first_w", "first_b", "hidden_w", "hidden_b", "last_w", "last_b"]
    theta = [f"theta0.{c}" for c in classes]
    names = header.get("arrays")
    need(names in (theta, theta + [f"lr_scale.{c}" for c in classes]), 74, f"prior arrays {names!r:.200}")
    s, w = arch_key[0], arch_key[1]
    h = s - 1
    shapes = {"first_w": (w, 2), "first_b": (w,), "hidden_w": (h, w, w), "hidden_b": (h, w), "last_w": (3, w),
              "last_b": (3,)}
    sizes = [math.prod(shapes[name.split(".")[1]]) for name in names]
    need(len(data) == 24 + header_length + 4 * sum(sizes), 75, "the prior's length does not match its arrays")
    values = np.frombuffer(data, "<f4", offset=24 + header_length)
    need(bool(np.isfinite(values).all()), 75, "a prior value is not finite")
    need(bool((values[sum(sizes[:6]):] > 0).all()), 75, "an lr_scale value is not > 0")
    arrays, pos = {}, 0
    for name, size in zip(names[:6], sizes):
        arrays[name.split(".")[1]] = values[pos:pos + size].reshape(shapes[name.split(".")[1]])
        pos += size
    parts = []
    for g in groups:                                       # flat, in group order (rule 82)
        cls, _, layer = g.name.partition(".")
        parts.append((arrays[cls][int(layer)] if layer else arrays[cls]).reshape(-1))
    return np.concatenate(parts).astype(np.float32)


# -- the file -----------------------------------------------------------------------------------------------
@dataclass
class Decoded:
    version: tuple
    header: dict
    architecture: tuple     # (sine_layers, width, w0, first_w0)
    groups: list
    quant: list             # per group {"step", "bits", "wrapped"}
    tables: list            # per group Table
    index: dict             # label, height, width, psnr, chunk: arrays of N
    chunks: list            # per chunk (first_image, image_count, offset, compressed_length, crc32)
    classes: list
    metadata: dict
    keys: list | None
    theta0: np.ndarray      # float32 [P] (zeros without a prior)
    codes: np.ndarray       # int64 [N, P]
    params: np.ndarray      # float32 [N, P]


def decode(data: bytes) -> Decoded:
    """Check every rule of a 2.0 file and decode all of it; FormatError otherwise."""
    data = bytes(data)
    size = len(data)
    # Preamble (section 3) and header (section 4, rule 80).
    need(size >= 64 and data[:8] == MAGIC, 10, "not an .inr file")
    major, minor, header_crc, header_offset, header_length = struct.unpack("<HHIQQ", data[8:32])
    need(major == READER_VERSION[0], 56, f"file is format version {major}.{minor}, this reader's is 2.0")
    need(minor > READER_VERSION[1] or not any(data[32:64]), 16, "reserved preamble bytes are not zero")
    need(2 <= header_length <= 1 << 20, 15, f"header_length {header_length}")
    need(header_offset % 64 == 0 and header_offset >= 64, 14, f"header_offset {header_offset}")
    need(header_offset + header_length == size, 17, "the header must end exactly at the end of the file")
    raw_header = data[header_offset:]
    need(zlib.crc32(raw_header) == header_crc, 13, "header CRC-32 mismatch")
    header = parse_json(raw_header, "the header")
    need(isinstance(header, dict) and header.get("format") == "inr", 18, "format must be 'inr'")
    arch_key = check_architecture(header.get("architecture"))
    need(header.get("weight_coding") == "rans32-p24-x4", 80, "weight_coding must be 'rans32-p24-x4'")
    n, k = header.get("num_images"), header.get("num_chunks")
    need(is_int(n) and 0 <= n < 2 ** 32, 22, f"num_images {n!r}")
    need(is_int(k) and 0 <= k <= n and (k == 0) == (n == 0), 23, f"num_chunks {k!r}")

    # Section table (rule 24): every region tiles the file, zero padding between.
    table = header.get("sections")
    need(isinstance(table, list), 24, "sections must be an array")
    sections = {}
    for s in table:
        need(isinstance(s, dict) and isinstance(s.get("name"), str) and is_int(s.get("offset"))
             and is_int(s.get("length")) and is_int(s.get("crc32")), 24, f"bad section entry {s!r:.100}")
        need(s["name"] not in sections and s["offset"] % 64 == 0 and s["length"] >= 0
             and 0 <= s["crc32"] < 2 ** 32, 24, f"section {s['name']!r:.50}")
        sections[s["name"]] = s
    need(all(name in sections for name in REQUIRED), 81, f"required sections {REQUIRED}")
    end = 64
    for s in sorted(sections.values(), key=lambda s: (s["offset"], s["length"])) + [
            {"name": "header", "offset": header_offset, "length": header_length}]:
        need(s["offset"] == align(end) and s["offset"] + s["length"] <= size, 24,
             f"section {s['name']!r:.50} does not start at align({end}) inside the file")
        need(not any(data[end:s["offset"]]), 24, "padding is not zero")
        end = s["offset"] + s["length"]

    def section(name):
        s = sections[name]
        body = data[s["offset"]:s["offset"] + s["length"]]
        need(zlib.crc32(body) == s["crc32"], 81, f"section {name!r} CRC-32 mismatch")
        return body

    body = {name: section(name) for name in REQUIRED + tuple(o for o in OPTIONAL if o in sections)}
    groups = param_groups(*arch_key)
    p = groups[-1].offset + groups[-1].size

    # Sections chunks and quant: sizes (rule 95), the quant rows (rule 83), the tables (rules 85-87).
    need(len(body["chunks"]) == 40 * k, 44, "the chunks section must be K x 40 bytes")
    need(len(body["quant"]) == 8 * len(groups), 83, "the quant section must be G x 8 bytes")
    quant = []
    for g, row in zip(groups, np.frombuffer(body["quant"], QUANT_ROW)):
        step, b, wrapped = row["step"], int(row["bits"]), int(row["wrapped"])
        need(not any(bytes(row["reserved"])) and wrapped in (0, 1) and 1 <= b <= 16, 83, f"quant row of {g.name}")
        if wrapped:
            need(g.period_w0 is not None, 83, f"{g.name} is not a sine-layer bias and cannot be wrapped")
            need(step == np.float32(2 * math.pi / (g.period_w0 * 2 ** b)), 83, f"wrapped step of {g.name}")
        need(bool(np.isfinite(step)) and step > 0, 83, f"step of {g.name}")
        quant.append({"step": float(step), "bits": b, "wrapped": wrapped})
    bits = [q["bits"] for q in quant]
    tables = parse_tables(body["tables"], bits)

    # classes, metadata (rules 47-48), the index frame (rule 94 with section 5's rules).
    classes, metadata = parse_json(body["classes"], "classes"), parse_json(body["metadata"], "metadata")
    need(isinstance(classes, list) and all(isinstance(c, str) for c in classes), 47, "classes")
    need(isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()), 48, "metadata")
    need(len(body["psnr"]) == 4 * n, 94, "the psnr section is not N x 4 bytes")  # before decompressing
    frame = body["index"]
    try:
        declared = zstandard.frame_content_size(frame)
        need(declared == 12 * n, 94, f"the index frame declares {declared} bytes, not N x 12")
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=12 * n, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise FormatError(f"rule 94: the index is not one zstd frame ({e})") from None
    need(len(raw) == 12 * n, 94, "the index frame's size")
    index, pos = {}, 0
    for name, dtype in INDEX_COLUMNS:
        index[name] = np.frombuffer(raw, dtype, count=n, offset=pos)
        pos += 4 * n
    index["psnr"] = np.frombuffer(body["psnr"], "<f4", count=n)
    top = len(classes) - 1 if classes else 2 ** 31 - 1
    need(bool(((index["label"] >= -1) & (index["label"] <= top)).all()), 42, "a label is out of range")
    need(bool(((index["height"] >= 1) & (index["width"] >= 1)).all()), 42, "a size is 0")
    need(bool(np.isfinite(index["psnr"]).all()), 42, "a PSNR is not finite")

    # The chunk table (rules 44, 88).
    rows = np.frombuffer(body["chunks"], CHUNK_ROW).tolist()
    chunks, first, offset = [], 0, 0
    for row in rows:
        off, clen, raw_len, first_image, count, crc = row
        need(count >= 1 and first_image == first and off == offset, 44, "chunks must cover the images in order")
        need(clen % 4 == 0 and clen >= 16, 88, f"a message of {clen} bytes")
        need(raw_len == count * p * 2 and raw_len <= 2 ** 30, 88, f"raw_length {raw_len}")
        chunks.append((first_image, count, off, clen, crc))
        first, offset = first + count, offset + clen
    need(first == n, 44, "the chunks do not cover num_images images")
    need(offset == len(body["blobs"]), 45, "the messages do not fill the blobs section")
    index["chunk"] = np.repeat(np.arange(k, dtype=np.int64), [c[1] for c in chunks])

    # Optional sections: keys (rules 62-64) and prior (rule 65, section 15).
    keys = None
    if "keys" in body:
        try:  # rule 81: one zstd frame declaring at most (N + 1) * 8 + N * 4096 bytes
            declared = zstandard.frame_content_size(body["keys"])
            need(0 <= declared <= 8 * (n + 1) + 4096 * n, 81, "the keys frame's declared size")
            kb = zstandard.ZstdDecompressor().decompress(body["keys"], max_output_size=declared,
                                                         allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise FormatError(f"rule 81: the keys section is not one zstd frame ({e})") from None
        need(len(kb) == declared, 81, "the keys frame's size")
        need(len(kb) >= 8 * (n + 1), 64, "the keys section is shorter than its offsets")
        offsets = np.frombuffer(kb, "<u8", count=n + 1).tolist()
        text = kb[8 * (n + 1):]
        need(offsets[0] == 0 and offsets[-1] == len(text) and all(a <= b for a, b in zip(offsets, offsets[1:])),
             62, "key offsets")
        try:
            keys = [text[a:b].decode("utf-8") for a, b in zip(offsets, offsets[1:])]
        except UnicodeDecodeError:
            raise FormatError("rule 63: a key is not valid UTF-8") from None
    theta0 = parse_prior(body["prior"], arch_key, groups) if "prior" in body \
        else np.zeros(p, np.float32)

    # Every chunk: its CRC-32 and its message (rules 88-92); the blobs section's CRC-32 (full verification).
    blobs = body["blobs"]
    codes = np.zeros((n, p), np.int64)
    for first_image, count, start, clen, crc in chunks:
        message = blobs[start:start + clen]
        need(zlib.crc32(message) == crc, 88, f"the CRC-32 of chunk at image {first_image}")
        codes[first_image:first_image + count] = decode_message(message, count, groups, bits, tables)
    params = dequantize(codes, [q["step"] for q in quant], groups, theta0)
    return Decoded((major, minor), header, arch_key, groups, quant, tables, index, chunks, classes, metadata, keys,
                   theta0, codes, params)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python spec/reference_decoder.py FILE.inr", file=sys.stderr)
        return 2
    with open(argv[0], "rb") as fh:
        data = fh.read()
    try:
        d = decode(data)
    except FormatError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    s, w, w0, fw0 = d.architecture
    print(f"{argv[0]}: format {d.version[0]}.{d.version[1]}, {len(d.codes)} images, {len(d.chunks)} chunks, "
          f"{s}x{w} (w0 {w0:g}, first_w0 {fw0:g}), {'a prior' if d.theta0.any() else 'no prior'}")
    for g, q, t in zip(d.groups, d.quant, d.tables):
        print(f"  {g.name:12s} {q['bits']:2d} bits{' wrapped' if q['wrapped'] else '        '} step {q['step']:.6g}"
              f"  symbols {t.first}..{t.first + len(t.counts) - 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
