"""The quantization grid of format 2: every parameter of every image as an integer code on a per-file,
per-group grid (FORMAT.md part II). numpy only at import (the reader uses it); the torch methods, used by
the encoder and the decoders, import torch when called.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InrUsageError
from .spec import MAX_CODE_BITS, QUANT_DTYPE, Architecture, param_groups


@dataclass(frozen=True)
class CodeGrid:
    """The quantization grid of a format-2 file, one entry per parameter group (spec.param_groups):
    a float32 `step`, a code width `bits` (q in [-2^(b-1), 2^(b-1))) and `wrapped` (a sine layer's bias,
    stored modulo its period: step = float32(2*pi / (w0 * 2^b)), so the 2^b codes cover one period exactly).

    A parameter is stored as q = round((theta - theta0) / step) (clamped, or reduced modulo 2^b when
    wrapped) and decoded as theta0 + step * q in float32, theta0 the file's prior (0 without one).

        grid = CodeGrid.from_widths(arch, bits={"hidden_w": 4, ...}, ranges={"hidden_w": 0.05, ...})
        q = grid.codes(theta, theta0)          # int16 [n, P] (torch)
        theta_hat = grid.values(q, theta0)     # float32 [n, P], what every decoder computes
    """

    arch: Architecture
    steps: np.ndarray    # float32 [G]
    bits: np.ndarray     # uint8 [G]
    wrapped: np.ndarray  # bool [G]

    def __post_init__(self):
        groups = param_groups(self.arch)
        steps = np.asarray(self.steps, np.float32).reshape(-1)
        bits = np.asarray(self.bits).reshape(-1)
        wrapped = np.asarray(self.wrapped, bool).reshape(-1)
        if not (len(steps) == len(bits) == len(wrapped) == len(groups)):
            raise ValueError(f"CodeGrid: {len(groups)} groups, got {len(steps)} steps, {len(bits)} widths and "
                             f"{len(wrapped)} wrap flags")
        for g, step, b, wrap in zip(groups, steps, bits, wrapped):
            problem = grid_problem(g, float(step), int(b), bool(wrap))
            if problem:
                raise ValueError(f"CodeGrid: group {g.name}: {problem}")
        for name, value in (("steps", steps), ("bits", bits.astype(np.uint8)), ("wrapped", wrapped)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    @classmethod
    def from_widths(cls, arch: Architecture, bits: dict, ranges: dict) -> "CodeGrid":
        """The grid with `bits[class]` bits per code; a plain group's codes span +-ranges[class] around the
        prior (step = range / 2^(b-1); for hidden layers the range may be a sequence, one per layer); a sine
        layer's bias is wrapped (its range is the period)."""
        groups = param_groups(arch)
        steps, widths, wrapped = [], [], []
        for g in groups:
            b = int(bits[g.cls])
            if g.period_w0 is not None:
                steps.append(wrapped_step(g.period_w0, b))
                wrapped.append(True)
            else:
                r = ranges[g.cls]
                r = r[g.layer] if g.layer is not None and isinstance(r, (tuple, list)) else r
                steps.append(np.float32(float(r) / 2 ** (b - 1)))
                wrapped.append(False)
            widths.append(b)
        return cls(arch, np.array(steps, np.float32), np.array(widths, np.uint8), np.array(wrapped))

    @classmethod
    def from_table(cls, arch: Architecture, table: np.ndarray) -> "CodeGrid":
        """The grid of a file's `quant` section (QUANT_DTYPE rows, one per group)."""
        return cls(arch, table["step"], table["bits"], table["wrapped"].astype(bool))

    def table(self) -> np.ndarray:
        """The `quant` section's rows."""
        rows = np.zeros(len(self.steps), QUANT_DTYPE)
        rows["step"], rows["bits"], rows["wrapped"] = self.steps, self.bits, self.wrapped
        return rows

    def __eq__(self, other) -> bool:
        return isinstance(other, CodeGrid) and self.arch == other.arch and np.array_equal(self.table(),
                                                                                          other.table())

    def __hash__(self) -> int:
        return hash((self.arch, self.table().tobytes()))

    def check_codes(self, codes, where: str) -> np.ndarray:
        """`codes` as a numpy integer array [n, P] whose every group's codes lie in its range; otherwise an
        InrUsageError naming `where`, the group and its range."""
        codes = np.asarray(codes)
        p = self.arch.params_per_image
        if codes.ndim != 2 or codes.shape[1] != p or codes.dtype.kind not in "iu":
            raise InrUsageError(f"{where}: codes must be integers of shape [n, {p}], got {codes.dtype} "
                                f"{list(codes.shape)}")
        for g, b in zip(param_groups(self.arch), self.bits):
            part, half = codes[:, g.offset:g.stop], 1 << (int(b) - 1)
            if part.size and (int(part.min()) < -half or int(part.max()) >= half):
                raise InrUsageError(f"{where}: a code of group {g.name} is outside its {int(b)}-bit range "
                                    f"[{-half}, {half - 1}]")
        return codes

    def per_param(self, device=None) -> tuple:
        """(step float32 [P], bits int32 [P], wrapped bool [P]) torch tensors on `device`: each group's entry
        repeated over its parameters, in flat parameter order (made once per device)."""
        import torch

        key = str(torch.device(device or "cpu"))
        cache = self.__dict__.setdefault("_per_param", {})
        if key not in cache:
            sizes = torch.tensor([g.size for g in param_groups(self.arch)])
            cache[key] = tuple(torch.from_numpy(np.array(a)).repeat_interleave(sizes).to(device)
                               for a in (self.steps, self.bits.astype(np.int32), self.wrapped))
        return cache[key]

    def codes(self, theta, theta0=None):
        """Flat parameters float [n, P] -> codes int16 [n, P]: round half to even of (theta - theta0) / step,
        reduced modulo 2^b into the code range for wrapped groups, clamped to it for the others."""
        import torch

        step, bits, wrapped = self.per_param(theta.device)
        r = theta.detach().float() - (0.0 if theta0 is None else theta0.float())
        q = torch.round(r / step).to(torch.int64)
        half = torch.ones_like(bits, dtype=torch.int64) << (bits.to(torch.int64) - 1)
        q = torch.where(wrapped, torch.remainder(q + half, 2 * half) - half,
                        torch.maximum(torch.minimum(q, half - 1), -half))
        return q.to(torch.int16)

    def values(self, codes, theta0=None, *, in_place: bool = False):
        """Codes int [n, P] -> float32 [n, P] = theta0 + step * q (a float32 product, then a float32 sum).
        in_place: `codes` is a float32 tensor of codes that may be overwritten with the result (no new
        [n, P] tensor: for a bank's batch of codes)."""
        import torch

        step = self.per_param(codes.device)[0]
        if in_place:
            if codes.dtype != torch.float32:
                raise ValueError(f"values(in_place=True) needs float32 codes, got {codes.dtype}")
            out = codes.mul_(step)
        else:
            out = codes.to(torch.float32) * step
        if theta0 is None:
            return out
        return out.add_(theta0.to(torch.float32)) if in_place else out + theta0.to(torch.float32)

    def values_numpy(self, codes: np.ndarray, theta0: np.ndarray | None = None) -> np.ndarray:
        """`values` in numpy (the same float32 operations, so the same bits)."""
        step = np.repeat(self.steps, [g.size for g in param_groups(self.arch)])
        out = codes.astype(np.float32) * step
        return out if theta0 is None else (out + np.asarray(theta0, np.float32)).astype(np.float32)

    def fake_quantize(self, theta, theta0=None):
        """Quantization-aware training: the decoded values in the forward pass, the identity in the
        backward pass (straight-through), so what is optimized is what gets stored."""
        return theta + (self.values(self.codes(theta, theta0), theta0) - theta).detach()

    def project_(self, theta, theta0=None) -> None:
        """Keep the latent parameters of plain groups within half a step of their code range, in place
        (so that clamped codes keep a gradient that can bring them back)."""
        import torch

        step, bits, wrapped = self.per_param(theta.device)
        half = (torch.ones_like(bits) << (bits - 1)).to(torch.float32)
        base = 0.0 if theta0 is None else theta0
        lo = torch.where(wrapped, torch.full_like(step, -math.inf), (-half - 0.49) * step + base)
        hi = torch.where(wrapped, torch.full_like(step, math.inf), (half - 0.51) * step + base)
        with torch.no_grad():
            theta.copy_(torch.maximum(torch.minimum(theta, hi), lo))


def wrapped_step(w0: float, bits: int) -> np.float32:
    """The step of a wrapped bias with 2^bits codes: float32(2*pi / (w0 * 2^bits))."""
    return np.float32(2.0 * math.pi / (w0 * 2 ** bits))


def grid_problem(group, step: float, bits: int, wrapped: bool) -> str | None:
    """Why (step, bits, wrapped) is not a valid grid entry for `group`, or None (shared with the reader)."""
    if not 1 <= bits <= MAX_CODE_BITS:
        return f"code width {bits} is not in [1, {MAX_CODE_BITS}]"
    if wrapped:
        if group.period_w0 is None:
            return "only the bias of a sine layer may be wrapped"
        if step != wrapped_step(group.period_w0, bits):
            return f"wrapped step {step!r} is not float32(2*pi / ({group.period_w0} * 2^{bits}))"
    elif not (math.isfinite(step) and step > 0):
        return f"step {step!r} must be finite and > 0"
    return None
