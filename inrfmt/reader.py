"""The validating reader of `.inr` files (FORMAT.md section 12).

`InrFile(path)` memory-maps a file and checks its whole structure (every offset, length, count, table and
small-section checksum) before it hands out any data, as safetensors does; anything it does not accept
raises `InrFormatError` naming the file, the field and the value. A chunk's payload is checked when it is
read, by `read_payload`, the one path every consumer (this reader's `read_chunk`, `verify` and the device
bank) goes through. numpy, zstandard and the standard library only.
"""
from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

from .errors import InrFormatError, InrUsageError
from .prior import Prior
from . import coding
from .grid import CodeGrid, grid_problem
from .spec import (ALIGNMENT, CHECKED_AT_OPEN, CHUNK_DTYPE, CODE_BYTES, CODED_INDEX_COLUMNS, CODED_INDEX_ROW_BYTES,
                   COORDINATES, FLOAT_DTYPES, FORMAT_NAME, FORMAT_VERSIONS, HIDDEN_DTYPES, IN_FEATURES, INDEX_DTYPE,
                   KEY_OFFSET_DTYPE, MAGIC, MAX_CHUNK_RAW_BYTES, MAX_HEADER_BYTES, MAX_KEY_BYTES_PER_IMAGE,
                   OPTIONAL_SECTIONS, OUT_FEATURES,
                   OUTPUT_LAYER, OUTPUT_MAPPING, PREAMBLE_DTYPE, PREAMBLE_SIZE, QUANT_DTYPE, REQUIRED_SECTIONS,
                   VERSION_MAJOR, VERSION_MINOR, WEIGHT_CODING, Architecture, WeightBatch, align,
                   architecture_problem, chunk_payload_layout, param_groups, parse_json, payload_bytes,
                   prune_ratio_of, unflatten_params)

# Set bits of every byte value: a bitmap's kept-weight count without unpacking it.
_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


@dataclass
class ChunkPayload:
    """One chunk's decompressed, validated payload: `raw` (the exact bytes) and `arrays` (numpy views into
    them, by the names of FORMAT.md rule 50, in the file's dtypes), for images [start, stop)."""

    k: int
    start: int
    stop: int
    raw: bytes
    arrays: dict[str, np.ndarray]
    offsets: dict[str, int]  # byte offset of each array within raw

    @property
    def count(self) -> int:
        return self.stop - self.start


class InrFile:
    """A validated, memory-mapped .inr file. Opening checks the whole structure (see FORMAT.md, "What a
    reader validates"); chunk payloads are checked (CRC-32, exact size, bitmaps) when read.

    Format 2 files (`coded`) hold every parameter as an entropy-coded integer on the file's `grid`:
    `read_codes(k)` gives a chunk's codes, `theta0()` the prior's flat values; `read_chunk`/`read_images`
    return dequantized float32 weights for both majors.

    Attributes: path, version (major, minor), major, coded, arch, hidden_dtype, float_dtype (None for coded
    files), has_masks, grid (CodeGrid, coded files; else None), tables (coding.CodeTable per group, coded
    files), num_images, num_chunks, index (read-only INDEX_DTYPE rows; for coded files built from the
    file's columns: nothing pruned), scales (float32 [N, H]; None for coded files), chunks (CHUNK_DTYPE rows),
    classes, metadata, keys (each image's source key, or None when the file has no `keys` section),
    prior (the `prior.Prior` the images were fitted from, or None),
    optional_sections (names of the validated optional sections present), file_bytes, sections, header.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._mm = None
        self._fh = None
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise InrFormatError(f"{self.path}: cannot open: {e.strerror or e}") from None
        try:
            self._open()
        except InrFormatError:
            self.close()
            raise
        except (struct.error, KeyError, IndexError, TypeError, ValueError, OverflowError, UnicodeDecodeError,
                RecursionError, zstandard.ZstdError, MemoryError, OSError) as e:
            self.close()
            raise InrFormatError(f"{self.path}: malformed file ({type(e).__name__}: {e})") from None

    def _fail(self, field: str, problem: str):
        raise InrFormatError(f"{self.path}: {field}: {problem}")

    def _reject(self, bad: np.ndarray, describe) -> None:
        """Fail on the first True of `bad` (any shape): describe(*position) -> (field, problem)."""
        if bad.any():
            position = tuple(int(v) for v in np.argwhere(bad)[0])
            self._fail(*describe(*position))

    # -- validation, all before any data is handed out ----------------------------------------------
    def _open(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        self.file_bytes = size
        if size < PREAMBLE_SIZE:
            if size >= len(MAGIC) and self._fh.read(len(MAGIC)) != MAGIC:
                self._fail("magic", "not an .inr file (bad magic bytes)")
            self._fail("file", f"truncated: {size} bytes is shorter than the {PREAMBLE_SIZE}-byte preamble")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        mm = self._mm
        pre = np.frombuffer(bytes(mm[:PREAMBLE_SIZE]), PREAMBLE_DTYPE, count=1)[0]
        if bytes(mm[:8]) != MAGIC:
            self._fail("magic", f"not an .inr file (bad magic bytes {bytes(mm[:8])!r})")
        major, minor = int(pre["major"]), int(pre["minor"])
        if major > VERSION_MAJOR:
            self._fail("version", f"file is format version {major}.{minor}, newer than this reader's "
                                  f"{VERSION_MAJOR}.{VERSION_MINOR}; upgrade inrfmt to read it")
        if major not in FORMAT_VERSIONS:
            self._fail("version", f"unsupported format version {major}.{minor}")
        self.version = (major, minor)
        self.major, self.coded = major, major == 2
        if minor <= FORMAT_VERSIONS[major] and any(bytes(mm[32:64])):
            self._fail("preamble.reserved", "reserved bytes 32..63 are not zero")
        h_off, h_len = int(pre["header_offset"]), int(pre["header_length"])
        self.header_offset, self.header_length = h_off, h_len
        if h_len > MAX_HEADER_BYTES:
            self._fail("header_length", f"{h_len} bytes exceeds the cap of {MAX_HEADER_BYTES}")
        if h_len < 2:
            self._fail("header_length", f"{h_len} is too small for a JSON object")
        if h_off % ALIGNMENT or h_off < PREAMBLE_SIZE:
            self._fail("header_offset", f"{h_off} is not a multiple of {ALIGNMENT} at or after the preamble")
        if h_off + h_len > size:
            self._fail("file", f"truncated: header at {h_off}+{h_len} ends past the end of the file "
                               f"({size} bytes)")
        if h_off + h_len != size:
            self._fail("file", f"{size - h_off - h_len} unaccounted bytes after the header")
        raw_header = bytes(mm[h_off:h_off + h_len])
        crc = zlib.crc32(raw_header)
        if crc != int(pre["header_crc32"]):
            self._fail("header_crc32", f"checksum mismatch (stored {int(pre['header_crc32']):#010x}, "
                                       f"computed {crc:#010x})")
        header = self._parse_json(raw_header, "header")
        if not isinstance(header, dict):
            self._fail("header", f"must be a JSON object, got {type(header).__name__}")
        self.header = header
        self._parse_header(header)
        self._check_layout(h_off)
        self._load_tables()

    def _parse_json(self, raw: bytes, field: str):
        try:
            return parse_json(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            self._fail(field, f"not valid UTF-8 JSON ({type(e).__name__}: {str(e)[:200]})")

    def _get(self, obj: dict, key: str, kind, where: str):
        if key not in obj:
            self._fail(f"{where}{key}", "missing")
        value = obj[key]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "num": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "list": isinstance(value, list),
            "dict": isinstance(value, dict),
        }[kind]
        if not ok:
            self._fail(f"{where}{key}", f"must be {kind}, got {value!r:.80}")
        return value

    def _parse_header(self, header: dict) -> None:
        g = self._get
        fmt = g(header, "format", "str", "header.")
        if fmt != FORMAT_NAME:
            self._fail("header.format", f"must be {FORMAT_NAME!r}, got {fmt!r:.80}")
        a = g(header, "architecture", "dict", "header.")
        where = "header.architecture."
        values = {name: g(a, name, kind, where) for name, kind in
                  (("sine_layers", "int"), ("width", "int"), ("w0", "num"), ("first_w0", "num"))}
        for name, value in values.items():
            problem = architecture_problem(name, value)
            if problem:
                self._fail(where + name, problem)
        for key, want in (("in_features", IN_FEATURES), ("out_features", OUT_FEATURES),
                          ("output_layer", OUTPUT_LAYER), ("coordinates", COORDINATES),
                          ("output_mapping", OUTPUT_MAPPING)):
            got = g(a, key, "int" if isinstance(want, int) else "str", where)
            if got != want:
                self._fail(where + key, f"unsupported value {got!r:.80} (version 1 requires {want!r})")
        self.arch = Architecture(**values)
        if self.coded:
            coding_name = g(header, "weight_coding", "str", "header.")
            if coding_name != WEIGHT_CODING:
                self._fail("header.weight_coding", f"unknown coding {coding_name!r:.80} (format 2.0 has "
                                                   f"{WEIGHT_CODING!r})")
            self.hidden_dtype = self.float_dtype = None
            self.has_masks = False
        else:
            self.hidden_dtype = g(header, "hidden_dtype", "str", "header.")
            if self.hidden_dtype not in HIDDEN_DTYPES:
                self._fail("header.hidden_dtype", f"unknown dtype {self.hidden_dtype!r:.80} (one of "
                                                  f"{HIDDEN_DTYPES})")
            self.float_dtype = g(header, "float_dtype", "str", "header.")
            if self.float_dtype not in FLOAT_DTYPES:
                self._fail("header.float_dtype", f"unknown dtype {self.float_dtype!r:.80} (one of {FLOAT_DTYPES})")
            self.has_masks = g(header, "has_masks", "bool", "header.")
        self.num_images = g(header, "num_images", "int", "header.")
        if not 0 <= self.num_images < 2 ** 32:
            self._fail("header.num_images", f"{self.num_images} is outside [0, 2^32)")
        self.num_chunks = g(header, "num_chunks", "int", "header.")
        if not 0 <= self.num_chunks <= self.num_images:
            self._fail("header.num_chunks", f"{self.num_chunks} is outside [0, num_images={self.num_images}]")
        sections = g(header, "sections", "list", "header.")
        self.sections: dict[str, dict] = {}
        for i, sec in enumerate(sections):
            where = f"header.sections[{i}]."
            if not isinstance(sec, dict):
                self._fail(f"header.sections[{i}]", f"must be an object, got {sec!r:.80}")
            name = g(sec, "name", "str", where)
            off, length, crc = g(sec, "offset", "int", where), g(sec, "length", "int", where), \
                g(sec, "crc32", "int", where)
            if name in self.sections:
                self._fail(where + "name", f"duplicate section {name!r:.80}")
            if off < 0 or length < 0 or not 0 <= crc < 2 ** 32:
                self._fail(f"section {name!r:.80}", f"negative offset/length or crc32 out of range "
                                                    f"(offset {off}, length {length}, crc32 {crc})")
            self.sections[name] = {"name": name, "offset": off, "length": length, "crc32": crc}
        for name in REQUIRED_SECTIONS[self.major]:
            if name not in self.sections:
                self._fail(f"section {name!r}", "missing")

    def _check_layout(self, header_offset: int) -> None:
        """Sections lie inside the file, 64-byte aligned, in ascending order with nothing between them but
        zero padding to the next boundary; the header follows the last one the same way."""
        size, mm = self.file_bytes, self._mm
        regions = sorted(self.sections.values(), key=lambda s: (s["offset"], s["length"]))
        pos = PREAMBLE_SIZE
        for sec in regions + [{"name": "header", "offset": header_offset, "length": 0}]:
            name, off, length = sec["name"], sec["offset"], sec["length"]
            if off % ALIGNMENT:
                self._fail(f"section {name!r:.80}", f"offset {off} is not a multiple of {ALIGNMENT}")
            if off + length > size:
                self._fail(f"section {name!r:.80}", f"truncated or out of bounds: {off}+{length} ends past "
                                                    f"the end of the file ({size} bytes)")
            if off < pos:
                self._fail(f"section {name!r:.80}", f"offset {off} overlaps the previous region (ends at {pos})")
            if off != align(pos):
                self._fail(f"section {name!r:.80}", f"{off - pos} unaccounted bytes before offset {off}")
            if any(bytes(mm[pos:off])):
                self._fail(f"section {name!r:.80}", f"padding before offset {off} is not zero")
            pos = off + length

    def _section_bytes(self, name: str) -> bytes:
        # A copy: numpy views into the mmap would keep it from closing.
        s = self.sections[name]
        return self._mm[s["offset"]:s["offset"] + s["length"]]

    def _checked_section_bytes(self, name: str) -> bytes:
        """A section's bytes after its CRC-32 check."""
        data = self._section_bytes(name)
        crc = zlib.crc32(data)
        if crc != self.sections[name]["crc32"]:
            self._fail(f"section {name!r}", f"checksum mismatch (stored {self.sections[name]['crc32']:#010x}, "
                                            f"computed {crc:#010x})")
        return data

    def _load_tables(self) -> None:
        a, n = self.arch, self.num_images
        for name in CHECKED_AT_OPEN[self.major]:
            self._checked_section_bytes(name)
        # Sizes against num_images / architecture.
        expect = {"chunks": self.num_chunks * CHUNK_DTYPE.itemsize}
        if self.coded:
            expect.update({"quant": len(param_groups(a)) * QUANT_DTYPE.itemsize, "psnr": n * 4})
        else:
            expect.update({"index": n * INDEX_DTYPE.itemsize, "scales": n * a.hidden_layers * 4})
        for name, want in expect.items():
            got = self.sections[name]["length"]
            if got != want:
                self._fail(f"section {name!r}", f"length {got} does not match num_images={n}, num_chunks="
                                                f"{self.num_chunks}, architecture (expected {want})")
        self.chunks = np.frombuffer(self._section_bytes("chunks"), CHUNK_DTYPE).copy()
        self.chunks.setflags(write=False)
        self.grid, self.tables, self._decoder = None, None, None
        if self.coded:
            self._load_coding()
            self.scales = None
        else:
            self.index = np.frombuffer(self._section_bytes("index"), INDEX_DTYPE).copy()
            self.scales = np.frombuffer(self._section_bytes("scales"), "<f4").copy().reshape(n, a.hidden_layers)
            self.scales.setflags(write=False)
        self.index.setflags(write=False)
        self.classes = self._json_section("classes", list)
        if not all(isinstance(c, str) for c in self.classes):
            self._fail("section 'classes'", "must be a JSON array of strings")
        self.metadata = self._json_section("metadata", dict)
        if not all(isinstance(v, str) for v in self.metadata.values()):
            self._fail("section 'metadata'", "must be a JSON object of string values")
        if not self.coded:
            self._check_scales()
        self._check_chunks()
        self._check_index()
        self._load_optional_sections()

    def _load_coding(self) -> None:
        """Format 2's grid (`quant`), probability tables (`tables`) and columnar `index`."""
        rows = np.frombuffer(self._section_bytes("quant"), QUANT_DTYPE)
        for i, group in enumerate(param_groups(self.arch)):
            row = rows[i]
            if any(bytes(row["reserved"])) or int(row["wrapped"]) > 1:
                self._fail(f"quant[{i}]", "reserved bytes are not zero or wrapped is not 0/1")
            problem = grid_problem(group, float(row["step"]), int(row["bits"]), bool(row["wrapped"]))
            if problem:
                self._fail(f"quant[{i}] ({group.name})", problem)
        self.grid = CodeGrid.from_table(self.arch, rows)
        try:
            self.tables = coding.parse_tables_section(self._section_bytes("tables"), self.grid.bits)
        except coding.CodingError as e:
            self._fail("section 'tables'", str(e))
        self._decoder = coding.Decoder.build(self.tables, self.grid)
        n = self.num_images
        raw = _decompress_exact(self._section_bytes("index"), n * CODED_INDEX_ROW_BYTES,
                                lambda msg: self._fail("section 'index'", msg))
        index = np.zeros(n, INDEX_DTYPE)
        pos = 0
        for name, dt in CODED_INDEX_COLUMNS:
            index[name] = np.frombuffer(raw, dt, count=n, offset=pos)
            pos += n * dt.itemsize
        # What format 1 stores per image follows from the chunk table: nothing is pruned.
        total = self.arch.hidden_total
        counts = self.chunks["image_count"].astype(np.int64)
        if n and int(counts.sum()) == n:  # else the chunk table check refuses the file
            index["chunk"] = np.repeat(np.arange(len(counts)), counts)
            first = np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
            index["value_start"] = (np.arange(n) - first) * total
        index["psnr"] = np.frombuffer(self._section_bytes("psnr"), "<f4", count=n)
        index["nnz"] = total
        self.index = index

    # -- optional sections (FORMAT.md section 9.1): one path, a parser per name --------------------------
    def _load_optional_sections(self) -> None:
        """Validate every optional section this reader knows and the file's minor version defines."""
        self.optional_sections = [name for name, minor in OPTIONAL_SECTIONS[self.major].items()
                                  if name in self.sections and self.version[1] >= minor]
        self._key_offsets = self._key_text = None
        self._keys = None
        self.prior = None
        for name in self.optional_sections:
            getattr(self, f"_parse_{name}_section")(self._checked_section_bytes(name))

    def _parse_prior_section(self, data: bytes) -> None:
        prior = Prior.from_bytes(data, source=f"{self.path}: section 'prior'")
        if prior.arch != self.arch:
            self._fail("section 'prior'", f"is for a {prior.arch.sine_layers}x{prior.arch.width} network "
                                          f"(w0 {prior.arch.w0:g}, first_w0 {prior.arch.first_w0:g}), the file's "
                                          f"is {self.arch.sine_layers}x{self.arch.width} (w0 {self.arch.w0:g}, "
                                          f"first_w0 {self.arch.first_w0:g})")
        self.prior = prior

    def _parse_keys_section(self, data: bytes) -> None:
        n, where = self.num_images, "section 'keys'"
        if self.coded:  # one zstd frame; what it may declare is bounded by N, which `psnr` backs with bytes
            try:
                declared = zstandard.frame_content_size(data)
            except zstandard.ZstdError as e:
                self._fail(where, f"not a zstd frame ({e})")
            cap = (n + 1) * KEY_OFFSET_DTYPE.itemsize + n * MAX_KEY_BYTES_PER_IMAGE
            if not 0 <= declared <= cap:
                self._fail(where, f"must be one zstd frame declaring its size, at most {cap} bytes for {n} "
                                  f"images (declares {declared})")
            data = _decompress_exact(data, declared, lambda msg: self._fail(where, msg))
        table = (n + 1) * KEY_OFFSET_DTYPE.itemsize
        if len(data) < table:
            self._fail(where, f"length {len(data)} is shorter than its offset table ({n + 1} offsets, {table} bytes)")
        offsets = np.frombuffer(data, KEY_OFFSET_DTYPE, count=n + 1)
        text = data[table:]
        if int(offsets[0]) != 0:
            self._fail(where, f"offsets[0] is {int(offsets[0])}, must be 0")
        self._reject(offsets[1:] < offsets[:-1], lambda i: (
            f"{where} offsets[{i + 1}]", f"{int(offsets[i + 1])} is less than offsets[{i}] = {int(offsets[i])}"))
        if int(offsets[-1]) != len(text):
            self._fail(where, f"offsets[{n}] is {int(offsets[-1])} but {len(text)} bytes of text follow the table")
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as e:
            self._fail(where, f"text is not valid UTF-8 at byte {e.start}")
        inner = offsets[(offsets > 0) & (offsets < len(text))].astype(np.int64)
        continuation = (np.frombuffer(text, np.uint8)[inner] & 0xC0) == 0x80
        self._reject(continuation, lambda i: (
            where, f"offset {int(inner[i])} splits a UTF-8 character (every key must be valid UTF-8)"))
        self._key_offsets, self._key_text = offsets.astype(np.int64), text

    @property
    def keys(self) -> list[str] | None:
        """Each image's source key (relative path, archive member or array index), None without a `keys`
        section (files written before format 1.1)."""
        if self._key_offsets is None:
            return None
        if self._keys is None:
            o, text = self._key_offsets, self._key_text
            self._keys = [text[o[i]:o[i + 1]].decode("utf-8") for i in range(self.num_images)]
        return self._keys

    def _json_section(self, name: str, kind):
        value = self._parse_json(self._section_bytes(name), f"section {name!r}")
        if not isinstance(value, kind):
            self._fail(f"section {name!r}", f"must be a JSON {kind.__name__}, got {type(value).__name__}")
        return value

    def _check_scales(self) -> None:
        s = self.scales
        if self.hidden_dtype == "int8":
            bad, what = ~(np.isfinite(s) & (s >= 0)), "must be finite and >= 0"
        else:
            bad, what = s != 1.0, f"must be 1.0 for hidden_dtype {self.hidden_dtype}"
        self._reject(bad, lambda i, l: (f"scales[{i}, {l}]", f"{what}, got {float(s[i, l])!r}"))

    def _check_chunks(self) -> None:
        c, n = self.chunks, self.num_images
        blobs_len = self.sections["blobs"]["length"]
        count = c["image_count"].astype(np.int64)
        self._chunk_bounds = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
        if not len(c):
            if n:
                self._fail("chunks", f"no chunks but num_images is {n}")
            if blobs_len:
                self._fail("section 'blobs'", f"{blobs_len} bytes but there are no chunks")
            return
        self._reject(count < 1, lambda k: (f"chunks[{k}].image_count", f"{int(count[k])} (must be >= 1)"))
        first = c["first_image"]
        expected_first = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.uint64)
        self._reject(first != expected_first, lambda k: (
            f"chunks[{k}].first_image", f"{int(first[k])} (chunks must cover images contiguously from 0; "
                                        f"expected {int(expected_first[k])})"))
        if int(count.sum()) != n:
            self._fail("chunks", f"cover {int(count.sum())} images but num_images is {n}")
        clen = c["compressed_length"]
        self._reject(clen > blobs_len, lambda k: (
            f"chunks[{k}].compressed_length", f"{int(clen[k])} exceeds the blobs section ({blobs_len} bytes)"))
        expected_off = np.concatenate([[0], np.cumsum(clen.astype(np.int64))[:-1]]).astype(np.uint64)
        self._reject(c["offset"] != expected_off, lambda k: (
            f"chunks[{k}].offset", f"{int(c['offset'][k])} (chunks must be stored back to back; "
                                   f"expected {int(expected_off[k])})"))
        if int(clen.astype(np.int64).sum()) != blobs_len:
            self._fail("chunks", f"frames total {int(clen.astype(np.int64).sum())} bytes but the blobs "
                                 f"section has {blobs_len}")
        raw = c["raw_length"]
        self._reject(raw > MAX_CHUNK_RAW_BYTES, lambda k: (
            f"chunks[{k}].raw_length", f"{int(raw[k])} exceeds {MAX_CHUNK_RAW_BYTES}"))
        if self.coded:
            self._reject((clen % 4 != 0) | (clen < 16), lambda k: (
                f"chunks[{k}].compressed_length", f"{int(clen[k])} is not 4 lane counts and whole 4-byte words"))
            want = count * self.arch.params_per_image * CODE_BYTES
            self._reject(raw != want.astype(np.uint64), lambda k: (
                f"chunks[{k}].raw_length", f"{int(raw[k])} but its {int(count[k])} images have "
                                           f"{int(want[k])} bytes of codes"))

    def _check_index(self) -> None:
        idx, a = self.index, self.arch
        total = a.hidden_total
        if not len(idx):
            return
        label = idx["label"]
        hi = len(self.classes) - 1 if self.classes else 2 ** 31 - 1
        self._reject((label < -1) | (label > hi), lambda i: (
            f"index[{i}].label", f"{int(label[i])} is outside [-1, {hi}]"
                                 + (f" ({len(self.classes)} classes)" if self.classes else "")))
        for f in ("height", "width"):
            self._reject(idx[f] < 1, lambda i: (f"index[{i}].{f}", f"{int(idx[f][i])} (must be >= 1)"))
        self._reject(~np.isfinite(idx["psnr"]), lambda i: (
            f"index[{i}].psnr", f"{float(idx['psnr'][i])} is not finite"))
        owner = np.repeat(np.arange(len(self.chunks), dtype=np.int64), np.diff(self._chunk_bounds))
        self._reject(idx["chunk"] != owner, lambda i: (
            f"index[{i}].chunk", f"{int(idx['chunk'][i])} but the chunk table puts image {i} in chunk "
                                 f"{int(owner[i])}"))
        nnz = idx["nnz"].astype(np.int64)
        if self.has_masks:
            self._reject(nnz > total, lambda i: (
                f"index[{i}].nnz", f"{int(nnz[i])} exceeds the {total} hidden weights per image"))
        else:
            self._reject(nnz != total, lambda i: (
                f"index[{i}].nnz", f"{int(nnz[i])} but a file without masks stores all {total} hidden weights"))
        ratio = prune_ratio_of(nnz, total)
        self._reject(idx["prune_ratio"] != ratio, lambda i: (
            f"index[{i}].prune_ratio", f"{float(idx['prune_ratio'][i])!r} disagrees with nnz={int(nnz[i])} of "
                                       f"{total} (expected {float(ratio[i])!r})"))
        # value_start is the running sum of nnz within each chunk.
        csum = np.concatenate([[0], np.cumsum(nnz)])
        start = csum[:-1] - csum[self._chunk_bounds[:-1]][owner]
        self._reject(idx["value_start"] != start, lambda i: (
            f"index[{i}].value_start", f"{int(idx['value_start'][i])} (expected {int(start[i])}, the sum of nnz "
                                       f"of the earlier images of its chunk)"))
        for k in range(len(self.chunks) if not self.coded else 0):
            lo, hi_ = self._chunk_bounds[k], self._chunk_bounds[k + 1]
            want = payload_bytes(self.chunk_layout(k, int(csum[hi_] - csum[lo])))
            if int(self.chunks["raw_length"][k]) != want:
                self._fail(f"chunks[{k}].raw_length", f"{int(self.chunks['raw_length'][k])} but its "
                                                      f"{hi_ - lo} images need {want} bytes")

    def chunk_layout(self, k: int, total_nnz: int):
        """(name, numpy dtype, shape) of each array in chunk k's decompressed payload, in file order."""
        n = int(self.chunks["image_count"][k])
        return chunk_payload_layout(self.arch, n, self.float_dtype, self.hidden_dtype, self.has_masks, total_nnz)

    # -- public API -------------------------------------------------------------------------------
    @property
    def section_sizes(self) -> dict[str, int]:
        """Bytes per section, plus 'preamble', 'header' and 'padding' (all sum to file_bytes)."""
        sizes = {name: s["length"] for name, s in self.sections.items()}
        sizes["preamble"] = PREAMBLE_SIZE
        sizes["header"] = self.header_length
        sizes["padding"] = self.file_bytes - sum(sizes.values())
        return sizes

    def chunk_range(self, k: int) -> tuple[int, int]:
        if not 0 <= k < self.num_chunks:
            raise IndexError(f"chunk {k} out of range [0, {self.num_chunks})")
        return int(self._chunk_bounds[k]), int(self._chunk_bounds[k + 1])

    def read_chunk_frame(self, k: int) -> tuple[bytes, int]:
        """The compressed frame of chunk k, CRC-checked, and its exact decompressed size."""
        self._check_open()
        self.chunk_range(k)
        row = self.chunks[k]
        off = self.sections["blobs"]["offset"] + int(row["offset"])
        frame = bytes(self._mm[off:off + int(row["compressed_length"])])
        crc = zlib.crc32(frame)
        if crc != int(row["crc32"]):
            self._fail(f"chunks[{k}].crc32", f"checksum mismatch (stored {int(row['crc32']):#010x}, "
                                             f"computed {crc:#010x})")
        return frame, int(row["raw_length"])

    def read_payload(self, k: int) -> ChunkPayload:
        """Chunk k decompressed and checked: CRC-32, the zstd frame rules, the exact size, and with masks
        that every bitmap keeps `nnz` weights and has clear padding bits. Safe to call from several threads."""
        try:
            return self._read_payload(k)
        except (InrFormatError, InrUsageError, IndexError):
            raise
        except (ValueError, zstandard.ZstdError, TypeError, OverflowError, MemoryError) as e:
            raise InrFormatError(f"{self.path}: chunks[{k}]: cannot decode ({type(e).__name__}: {e})") from None

    def _read_payload(self, k: int) -> ChunkPayload:
        if self.coded:
            raise InrUsageError(f"{self.path}: a format 2 chunk is an rANS message, not a payload: use read_codes")
        frame, raw_length = self.read_chunk_frame(k)
        raw = _decompress_exact(frame, raw_length, lambda msg: self._fail(f"chunks[{k}]", msg))
        start, stop = self.chunk_range(k)
        nnz = self.index["nnz"][start:stop].astype(np.int64)
        layout = self.chunk_layout(k, int(nnz.sum()))
        if payload_bytes(layout) != len(raw):
            self._fail(f"chunks[{k}]", f"payload of {len(raw)} bytes does not match its layout "
                                       f"({payload_bytes(layout)} bytes for its images' nnz)")
        arrays, offsets, pos = {}, {}, 0
        for name, dt, shape in layout:
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(raw, dt, count=count, offset=pos).reshape(shape)
            offsets[name] = pos
            pos += count * dt.itemsize
        if self.has_masks:
            packed, total = arrays["masks"], self.arch.hidden_total
            if total % 8 and packed.shape[1] and (packed[:, -1] & ((1 << (8 - total % 8)) - 1)).any():
                self._fail(f"chunks[{k}].masks", "padding bits after the last mask bit are not zero")
            kept = _POPCOUNT[packed].sum(axis=1, dtype=np.int64)
            self._reject(kept != nnz, lambda i: (f"index[{start + i}].nnz",
                                                 f"{int(nnz[i])} but its mask keeps {int(kept[i])} weights"))
        return ChunkPayload(k, start, stop, raw, arrays, offsets)

    def theta0(self) -> np.ndarray:
        """The prior's values as one float32 vector [P] in parameter-group order (zeros without a prior)."""
        if self.prior is None:
            return np.zeros(self.arch.params_per_image, np.float32)
        return self.prior.flat_theta0()

    def read_codes(self, k: int) -> np.ndarray:
        """Chunk k of a coded file: its images' codes, int16 [n, P] (CRC-32 and the whole rANS message
        checked; InrFormatError otherwise). Releases the GIL while decoding: call it from several threads."""
        if not self.coded:
            raise InrUsageError(f"{self.path}: read_codes needs a format 2 file (this one is "
                                f"{self.version[0]}.{self.version[1]})")
        words, _ = self.read_chunk_frame(k)
        start, stop = self.chunk_range(k)
        out = np.empty((stop - start, self.arch.params_per_image), coding.CODE_DTYPE)
        try:
            coding.decode_chunk(words, self._decoder, out)
        except coding.CodingError as e:
            self._fail(f"chunks[{k}]", str(e))
        return out

    def read_chunk(self, k: int) -> WeightBatch:
        """Decode chunk k into a WeightBatch (float32 floats, hidden_w in hidden_dtype, dense; coded files:
        every parameter dequantized to float32, hidden_scale 1)."""
        if self.coded:
            values = self.grid.values_numpy(self.read_codes(k), self.theta0())
            params = unflatten_params(values, self.arch)
            n = len(values)
            return WeightBatch(hidden_scale=np.ones((n, self.arch.hidden_layers), np.float32), mask=None,
                               **{name: np.ascontiguousarray(v) for name, v in params.items()})
        payload = self.read_payload(k)
        arrays, n = payload.arrays, payload.count
        h, w, total = self.arch.hidden_layers, self.arch.width, self.arch.hidden_total
        hidden_np = np.dtype(self.hidden_dtype)  # native order for the caller
        if self.has_masks:
            mask = np.unpackbits(arrays["masks"], axis=1, count=total).astype(bool) if total \
                else np.zeros((n, 0), bool)
            dense = np.zeros((n, total), hidden_np)
            dense[mask] = arrays["values"]
            mask = mask.reshape(n, h, w, w)
        else:
            dense = arrays["values"].reshape(n, total).astype(hidden_np)
            mask = None
        f32 = np.float32
        return WeightBatch(
            first_w=arrays["first_w"].astype(f32), first_b=arrays["first_b"].astype(f32),
            hidden_w=dense.reshape(n, h, w, w),
            hidden_scale=np.array(self.scales[payload.start:payload.stop], f32),
            hidden_b=arrays["hidden_b"].astype(f32), last_w=arrays["last_w"].astype(f32),
            last_b=arrays["last_b"].astype(f32), mask=mask)

    def read_images(self, indices) -> WeightBatch:
        """Weights of the given images, in the given order (each needed chunk is decoded once)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            bad = idx[(idx < 0) | (idx >= self.num_images)][0]
            raise IndexError(f"image {int(bad)} out of range [0, {self.num_images})")
        if not len(idx):
            return self._empty_batch()
        chunk_of = np.searchsorted(self._chunk_bounds, idx, side="right") - 1
        parts, positions = [], []
        for k in np.unique(chunk_of):
            sel = np.nonzero(chunk_of == k)[0]
            batch = self.read_chunk(int(k))
            parts.append(batch.take(idx[sel] - self._chunk_bounds[k]))
            positions.append(sel)
        merged = WeightBatch.concat(parts)
        order = np.empty(len(idx), np.int64)
        order[np.concatenate(positions)] = np.arange(len(idx))
        return merged.take(order)

    def _empty_batch(self) -> WeightBatch:
        shapes = self.arch.shapes()
        f = np.float32
        empty = {name: np.zeros((0, *shape), np.dtype(self.hidden_dtype or f) if name == "hidden_w" else f)
                 for name, shape in shapes.items()}
        return WeightBatch(hidden_scale=np.zeros((0, self.arch.hidden_layers), f),
                           mask=np.zeros((0, *shapes["hidden_w"]), bool) if self.has_masks else None, **empty)

    def verify(self) -> None:
        """Check every checksum (the whole blobs section too) and decode every chunk."""
        self.verify_checksums()
        for k in range(self.num_chunks):
            self.read_codes(k) if self.coded else self.read_payload(k)

    def verify_checksums(self) -> None:
        """Check the CRC-32 of the `blobs` section (the other sections are checked at open): every byte of
        the file is then covered by a checksum, at the cost of one pass over it without decompressing."""
        self._check_open()
        blobs = self.sections["blobs"]
        crc, pos, end = 0, blobs["offset"], blobs["offset"] + blobs["length"]
        while pos < end:
            step = min(end - pos, 1 << 24)
            crc = zlib.crc32(self._mm[pos:pos + step], crc)
            pos += step
        if crc != blobs["crc32"]:
            self._fail("section 'blobs'", f"checksum mismatch (stored {blobs['crc32']:#010x}, computed {crc:#010x})")

    def _check_open(self) -> None:
        if self._mm is None:
            raise InrUsageError(f"{self.path}: file is closed")

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        weights = "coded" if self.coded else f"hidden={self.hidden_dtype}"
        return (f"InrFile({self.path!r}, version={self.version[0]}.{self.version[1]}, images={self.num_images}, "
                f"arch={self.arch.sine_layers}x{self.arch.width}, {weights})")


def _decompress_exact(frame: bytes, raw_length: int, fail) -> bytes:
    """One zstd frame -> exactly raw_length bytes. The frame header must declare that size; the output is
    bounded by it (never by a size a frame claims on its own), and no bytes may follow the frame."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        fail(f"not a zstd frame ({e})")
    if declared != raw_length:
        fail(f"zstd frame declares {declared} bytes, the chunk table {raw_length}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=raw_length, allow_extra_data=False)
    except zstandard.ZstdError as e:
        fail(f"zstd decompression failed ({e})")
    if len(raw) != raw_length:
        fail(f"decompressed to {len(raw)} bytes, expected {raw_length}")
    return raw
