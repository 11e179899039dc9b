"""A learned prior: the initial values of every parameter of one architecture's network, optionally with a
learning-rate multiplier per parameter, and its small file format (FORMAT.md section 15).

    prior = Prior.load("photos.prior")          # validated; InrFormatError names the file and the field
    prior.arch, prior.theta0["hidden_w"]        # float32 arrays of Architecture.shapes()
    prior.save("copy.prior")                    # atomic
    data = prior.to_bytes()                     # also the exact bytes of an .inr file's `prior` section

numpy and the standard library only, so the reader can validate a file's `prior` section.
"""
from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import InrFormatError, InrUsageError
from .spec import Architecture, architecture_problem, canonical_json, flatten_params, parse_json

PRIOR_MAGIC = b"\x89INP\r\n\x1a\n"
PRIOR_FORMAT = "inr-prior"
PRIOR_VERSION = (1, 0)
PRIOR_HEADER_DTYPE = np.dtype([
    ("magic", "S8"),
    ("major", "<u2"),
    ("minor", "<u2"),
    ("header_length", "<u4"),  # bytes of the JSON header that follows
    ("crc32", "<u4"),          # CRC-32 of the whole file with this field read as zero
    ("reserved", "<u4"),       # zero
])
PRIOR_PREAMBLE = PRIOR_HEADER_DTYPE.itemsize
MAX_PRIOR_HEADER = 1 << 16
THETA0 = "theta0"  # array name prefixes in the file
LR_SCALE = "lr_scale"


@dataclass(frozen=True, eq=False)
class Prior:
    """Initial values `theta0` (name -> float32 array of `arch.shapes()[name]`) for every parameter of
    `arch`, and optionally `lr_scale` (same names and shapes, finite and > 0): each parameter's learning
    rate is multiplied by it when fitting from this prior. `name` is free text (e.g. the preset)."""

    arch: Architecture
    theta0: dict
    lr_scale: dict | None = None
    name: str = ""

    def __post_init__(self):
        shapes = self.arch.shapes()
        for what in (THETA0, LR_SCALE):
            arrays = getattr(self, what)
            if arrays is None:
                continue
            if not isinstance(arrays, dict) or set(arrays) != set(shapes):
                got = ", ".join(sorted(arrays)) if isinstance(arrays, dict) else type(arrays).__name__
                raise InrUsageError(f"Prior.{what} must have exactly the arrays {', '.join(shapes)}, got {got}")
            checked = {}
            for name, shape in shapes.items():  # in parameter order, read-only float32 copies
                array = np.array(arrays[name], dtype=np.float32)
                if array.shape != shape:
                    raise InrUsageError(f"Prior.{what}[{name!r}] must have shape {shape}, got {array.shape}")
                if not np.isfinite(array).all() or (what == LR_SCALE and not (array > 0).all()):
                    raise InrUsageError(f"Prior.{what}[{name!r}] must be finite"
                                        + (" and > 0" if what == LR_SCALE else ""))
                array.setflags(write=False)
                checked[name] = array
            object.__setattr__(self, what, checked)
        if not isinstance(self.name, str):
            raise InrUsageError(f"Prior.name must be a string, got {self.name!r}")

    def __eq__(self, other) -> bool:
        return isinstance(other, Prior) and self.to_bytes() == other.to_bytes()

    __hash__ = None

    def check_arch(self, arch: Architecture, subject: str, user: str) -> None:
        """InrUsageError unless this prior is for `arch`: "<subject>: it is for a SxW network (w0 ..), <user>
        uses ..." (e.g. subject "prior builtin", user "preset fast")."""
        if self.arch != arch:
            a = self.arch
            raise InrUsageError(f"{subject}: it is for a {a.sine_layers}x{a.width} network (w0 {a.w0:g}), {user} "
                                f"uses {arch.sine_layers}x{arch.width} (w0 {arch.w0:g})")

    @property
    def outputs_tied(self) -> bool:
        """True when the three output channels start from the same values (equal rows of last_w, equal
        entries of last_b): a grey image's tied channels then get equal codes and decode exactly grey."""
        w, b = self.theta0["last_w"], self.theta0["last_b"]
        return bool((w == w[:1]).all() and (b == b[:1]).all())

    def with_tied_outputs(self, name: str | None = None) -> "Prior":
        """This prior with each output channel's starting values replaced by their mean over the channels
        (see outputs_tied); every other value, and lr_scale, unchanged."""
        theta0 = dict(self.theta0)
        theta0["last_w"] = np.repeat(self.theta0["last_w"].mean(axis=0, keepdims=True, dtype=np.float32), 3, axis=0)
        theta0["last_b"] = np.repeat(self.theta0["last_b"].mean(keepdims=True, dtype=np.float32), 3, axis=0)
        return Prior(self.arch, theta0, self.lr_scale, self.name if name is None else name)

    # -- the file ---------------------------------------------------------------------------------
    def flat_theta0(self) -> np.ndarray:
        """theta0 as one float32 vector [P] in format 2's parameter-group order (spec.param_groups): the
        origin of a coded file's codes."""
        return flatten_params({name: value[None] for name, value in self.theta0.items()}, self.arch)[0]

    def to_bytes(self) -> bytes:
        """The prior file: preamble, canonical JSON header, float32 arrays (theta0, then lr_scale)."""
        arrays = [(f"{THETA0}.{n}", a) for n, a in self.theta0.items()]  # parameter order (__post_init__)
        if self.lr_scale is not None:
            arrays += [(f"{LR_SCALE}.{n}", a) for n, a in self.lr_scale.items()]
        header = canonical_json({"format": PRIOR_FORMAT, "architecture": self.arch.to_json(), "name": self.name,
                                 "arrays": [name for name, _ in arrays]})
        header += b" " * (-len(header) % 4)  # float32 arrays start 4-byte aligned
        body = header + b"".join(np.ascontiguousarray(a, "<f4").tobytes() for _, a in arrays)
        pre = np.zeros((), PRIOR_HEADER_DTYPE)
        pre["magic"], pre["major"], pre["minor"] = PRIOR_MAGIC, *PRIOR_VERSION
        pre["header_length"] = len(header)
        pre["crc32"] = zlib.crc32(body, zlib.crc32(pre.tobytes()))  # the crc32 field is still zero here
        return pre.tobytes() + body

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "prior") -> "Prior":
        """Parse and validate prior-file bytes; InrFormatError("{source}: {field}: {problem}") otherwise."""

        def fail(field, problem):
            raise InrFormatError(f"{source}: {field}: {problem}")

        data = bytes(data)
        if data[:len(PRIOR_MAGIC)] != PRIOR_MAGIC[:len(data)]:
            fail("magic", f"not an inrfmt prior (bad magic bytes {data[:8]!r})")
        if len(data) < PRIOR_PREAMBLE:
            fail("file", f"truncated: {len(data)} bytes is shorter than the {PRIOR_PREAMBLE}-byte preamble")
        pre = np.frombuffer(data[:PRIOR_PREAMBLE], PRIOR_HEADER_DTYPE)[0]
        major, minor = int(pre["major"]), int(pre["minor"])
        if major != PRIOR_VERSION[0]:
            fail("version", f"prior format version {major}.{minor} is not {PRIOR_VERSION[0]}.x, the version this "
                            f"reader implements; upgrade inrfmt to read it")
        body = data[PRIOR_PREAMBLE:]
        crc = zlib.crc32(body, zlib.crc32(data[:16] + bytes(4) + data[20:PRIOR_PREAMBLE]))
        if crc != int(pre["crc32"]):
            fail("crc32", f"checksum mismatch (stored {int(pre['crc32']):#010x}, computed {crc:#010x}): the prior "
                          f"is damaged or truncated")
        if int(pre["reserved"]) != 0:
            fail("reserved", "must be 0")
        header_length = int(pre["header_length"])
        if header_length > min(MAX_PRIOR_HEADER, len(body)) or header_length % 4:
            fail("header_length", f"{header_length} is not a multiple of 4 within the {len(body)} bytes after the "
                                  f"preamble (cap {MAX_PRIOR_HEADER})")
        try:
            header = parse_json(body[:header_length])
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            fail("header", f"not valid UTF-8 JSON ({type(e).__name__})")
        if not isinstance(header, dict) or header.get("format") != PRIOR_FORMAT:
            fail("header.format", f"must be {PRIOR_FORMAT!r}")
        arch_json, names, name = header.get("architecture"), header.get("arrays"), header.get("name")
        if not isinstance(arch_json, dict):
            fail("header.architecture", "missing or not an object")
        values = {}
        for key in ("sine_layers", "width", "w0", "first_w0"):
            problem = architecture_problem(key, arch_json.get(key))
            if problem:
                fail(f"header.architecture.{key}", problem)
            values[key] = arch_json[key]
        arch = Architecture(**values)
        if arch_json != arch.to_json():
            fail("header.architecture", "fields other than sine_layers, width, w0 and first_w0 must be those of "
                                        "an .inr architecture")
        shapes = arch.shapes()
        theta_names = [f"{THETA0}.{n}" for n in shapes]
        if names not in (theta_names, theta_names + [f"{LR_SCALE}.{n}" for n in shapes]):
            fail("header.arrays", f"must be {theta_names} optionally followed by the same {LR_SCALE}.* names, got "
                                  f"{names!r:.300}")
        if not isinstance(name, str):
            fail("header.name", "must be a string")
        sizes = [int(np.prod(shapes[n.split(".")[1]])) for n in names]
        if len(body) != header_length + 4 * sum(sizes):
            fail("file", f"{len(body) - header_length} bytes of arrays, the header's arrays need {4 * sum(sizes)}")
        arrays, pos = {}, header_length
        for array_name, size in zip(names, sizes):
            kind, param = array_name.split(".")
            arrays.setdefault(kind, {})[param] = np.frombuffer(body, "<f4", count=size, offset=pos).reshape(
                shapes[param])
            pos += 4 * size
        try:
            return cls(arch, arrays[THETA0], arrays.get(LR_SCALE), name)
        except InrUsageError as e:
            fail("arrays", str(e))

    def save(self, path) -> None:
        """Write the prior file at `path` atomically (temp file, fsync, rename)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def builtin(cls, preset: str) -> "Prior":
        """The prior shipped with inrfmt for the preset named `preset` (inrfmt/priors/<preset>.prior)."""
        from importlib import resources

        resource = resources.files(__package__).joinpath("priors", f"{preset}.prior")
        if not resource.is_file():
            raise InrUsageError(f"there is no built-in prior for preset {preset!r}; use --prior none, learn or a "
                                f"prior file")
        return cls.from_bytes(resource.read_bytes(), source=f"built-in prior {preset}")

    @classmethod
    def load(cls, path) -> "Prior":
        """Read and validate a prior file."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 30)
        except OSError as e:
            raise InrUsageError(f"cannot read prior {path}: {e.strerror or e}") from None
        return cls.from_bytes(data, source=path)
