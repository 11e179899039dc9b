"""TensorBank: a whole .inr dataset as one set of contiguous tensors on one device.

The bank keeps hidden-layer weights in the file's storage dtype (int8 with per-image per-layer scales, or
float16/float32), and the first/last layers and biases in the file's float dtype: dequantization and
upcasting happen inside the decoders. Hidden weights are held in one of two layouts:

  dense    [N,H,W,W], pruned weights stored as zeros. The decoders read it directly (fastest).
  compact  the file's own representation: the kept values of all images back to back ([total_nnz]), the
           pruning bitmaps ([N, ceil(H*W*W/8)], numpy packbits order) and each image's first value
           (int64 [N]). A decode expands its batch's weights to dense first (a [B,H,W,W] temporary), so
           the bank costs what the file's payload does however much was pruned.

`layout="auto"` (the default) keeps the bank within 1.1x the file's bytes: dense when that fits, compact
when pruning makes the dense form larger than that (and compact is smaller).

`TensorBank.from_file` fills the preallocated bank chunk by chunk: worker threads read each chunk through
`InrFile.read_payload` (checked and decompressed there); each payload goes to the device through one of two
alternating pinned staging buffers on CUDA, and is unpacked there (bitmaps expanded for dense, stored as they
are for compact), so decompressing the next chunks overlaps the copy of this one and at most a few chunks
are ever in host memory.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import device as devices
from .errors import InrUsageError
from .quantize import quantize_hidden
from .spec import DTYPES, FLOAT_DTYPES, HIDDEN_DTYPES

if TYPE_CHECKING:
    from .reader import ChunkPayload, InrFile
    from .spec import Architecture

# The torch dtype of each storage dtype name of the format.
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}

# Per-image tensors of a bank, in a fixed order (the order of WeightBatch's fields).
_WEIGHT_FIELDS = ("first_w", "first_b", "hidden_w", "hidden_scale", "hidden_b", "last_w", "last_b")
_COMPACT_FIELDS = ("hidden_values", "hidden_masks", "hidden_offsets")
_META_FIELDS = ("labels", "heights", "widths")
_FLOAT_TENSOR_DTYPES = tuple(TORCH_DTYPES[n] for n in FLOAT_DTYPES)
_HIDDEN_TENSOR_DTYPES = tuple(TORCH_DTYPES[n] for n in HIDDEN_DTYPES)
LAYOUTS = ("auto", "dense", "compact")
# layout="auto" keeps the bank within this factor of the file's bytes when the compact layout can.
AUTO_MAX_BANK_OVER_FILE = 1.1


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in TORCH_DTYPES.items() if value == dtype)


class TensorBank:
    """Per-image SIREN weights of N images, as contiguous tensors on one device.

    Fields (docs/internals.md): first_w [N,W,2], first_b [N,W], hidden_b [N,H,W], last_w [N,3,W], last_b [N,3]
    (all float32, or all float16), hidden_scale f32 [N,H], labels int64 [N], heights int32 [N],
    widths int32 [N]; hidden weights either dense (hidden_w int8|f16|f32 [N,H,W,W]) or compact
    (hidden_values [total_nnz], hidden_masks uint8 [N, ceil(H*W*W/8)], hidden_offsets int64 [N]; hidden_w is
    None); arch, layout, float_dtype, w0, first_w0, nbytes (bank bytes), load_seconds.
    """

    def __init__(self, arch: "Architecture", *, first_w: torch.Tensor, first_b: torch.Tensor,
                 hidden_scale: torch.Tensor, hidden_b: torch.Tensor, last_w: torch.Tensor, last_b: torch.Tensor,
                 hidden_w: torch.Tensor | None = None, hidden_values: torch.Tensor | None = None,
                 hidden_masks: torch.Tensor | None = None, hidden_offsets: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, heights: torch.Tensor | None = None,
                 widths: torch.Tensor | None = None, load_seconds: float = 0.0, check_compact: bool = True):
        n, w, h = first_w.shape[0], arch.width, arch.hidden_layers
        device = first_w.device
        compact = hidden_w is None
        if compact and any(t is None for t in (hidden_values, hidden_masks, hidden_offsets)):
            raise InrUsageError("TensorBank: give hidden_w (dense) or hidden_values, hidden_masks and "
                                "hidden_offsets (compact)")
        if not compact and any(t is not None for t in (hidden_values, hidden_masks, hidden_offsets)):
            raise InrUsageError("TensorBank: give hidden_w or the compact hidden_* tensors, not both")
        floats = (first_w.dtype,) if first_w.dtype in _FLOAT_TENSOR_DTYPES else _FLOAT_TENSOR_DTYPES
        expected = {
            "first_w": ((n, w, 2), floats),
            "first_b": ((n, w), floats),
            "hidden_scale": ((n, h), (torch.float32,)),
            "hidden_b": ((n, h, w), floats),
            "last_w": ((n, 3, w), floats),
            "last_b": ((n, 3), floats),
        }
        given = dict(first_w=first_w, first_b=first_b, hidden_scale=hidden_scale, hidden_b=hidden_b,
                     last_w=last_w, last_b=last_b)
        if compact:
            expected["hidden_values"] = ((hidden_values.numel(),), _HIDDEN_TENSOR_DTYPES)
            expected["hidden_masks"] = ((n, (h * w * w + 7) // 8), (torch.uint8,))
            expected["hidden_offsets"] = ((n,), (torch.int64,))
            given.update(hidden_values=hidden_values, hidden_masks=hidden_masks, hidden_offsets=hidden_offsets)
        else:
            expected["hidden_w"] = ((n, h, w, w), _HIDDEN_TENSOR_DTYPES)
            given["hidden_w"] = hidden_w
        for name, (shape, dtypes) in expected.items():
            t = given[name]
            if tuple(t.shape) != shape:
                raise InrUsageError(f"TensorBank: {name} has shape {tuple(t.shape)}, expected {shape} "
                                    f"for {n} images of width {w} with {h} hidden layers")
            if t.dtype not in dtypes:
                raise InrUsageError(f"TensorBank: {name} has dtype {t.dtype}, expected one of {dtypes}")
            if t.device != device:
                raise InrUsageError(f"TensorBank: {name} is on {t.device}, first_w on {device}")
            if not t.is_contiguous():
                raise InrUsageError(f"TensorBank: {name} is not contiguous")
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64, device=device)
        if heights is None:
            heights = torch.zeros((n,), dtype=torch.int32, device=device)
        if widths is None:
            widths = torch.zeros((n,), dtype=torch.int32, device=device)
        for name, t, dtype in (("labels", labels, torch.int64), ("heights", heights, torch.int32),
                               ("widths", widths, torch.int32)):
            if tuple(t.shape) != (n,) or t.dtype != dtype or t.device != device:
                raise InrUsageError(f"TensorBank: {name} must be {dtype} [{n}] on {device}, "
                                    f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        self.arch = arch
        self.first_w, self.first_b = first_w, first_b
        self.hidden_w, self.hidden_scale, self.hidden_b = hidden_w, hidden_scale, hidden_b
        self.hidden_values, self.hidden_masks, self.hidden_offsets = hidden_values, hidden_masks, hidden_offsets
        self.last_w, self.last_b = last_w, last_b
        self.labels, self.heights, self.widths = labels.contiguous(), heights.contiguous(), widths.contiguous()
        self.load_seconds = float(load_seconds)
        if compact and check_compact:
            self._check_compact()

    def _check_compact(self) -> None:
        """The decoders index hidden_values through the masks and offsets without bounds checks: make sure
        every image's offset is the running count of set mask bits and no padding bit is set."""
        n, total = self.num_images, self.hidden_total
        counts = torch.empty((n,), dtype=torch.int64, device=self.device)
        step = max(1, (1 << 24) // max(total, 1))  # bound the unpacked bits to ~16M at a time
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for i in range(0, n, step):
            bits = _unpack_bits(self.hidden_masks[i:i + step])
            counts[i:i + step] = bits[:, :total].sum(dim=1)
            bad |= (bits[:, total:] != 0).any()
        ends = torch.cumsum(counts, 0)
        starts = ends - counts
        if bool(bad) or not torch.equal(starts, self.hidden_offsets) or \
                (n and int(ends[-1]) != self.hidden_values.numel()) or (not n and self.hidden_values.numel()):
            raise InrUsageError("TensorBank: hidden_offsets/hidden_values disagree with the mask bit counts "
                                "(or a padding bit is set)")

    # -- properties -------------------------------------------------------------------------------
    @property
    def w0(self) -> float:
        return float(self.arch.w0)

    @property
    def first_w0(self) -> float:
        return float(self.arch.first_w0)

    @property
    def device(self) -> torch.device:
        return self.first_w.device

    @property
    def num_images(self) -> int:
        return self.first_w.shape[0]

    def __len__(self) -> int:
        return self.num_images

    @property
    def layout(self) -> str:
        """"dense" or "compact" (see the module docstring)."""
        return "compact" if self.hidden_w is None else "dense"

    @property
    def float_dtype(self) -> str:
        """"float32" or "float16": the dtype of the first/last layers and biases."""
        return "float16" if self.first_w.dtype == torch.float16 else "float32"

    @property
    def hidden_total(self) -> int:
        """Hidden weights per image, H*W*W."""
        return self.arch.hidden_total

    @property
    def hidden_dtype(self) -> str:
        return _dtype_name((self.hidden_w if self.hidden_w is not None else self.hidden_values).dtype)

    def _fields(self) -> tuple[str, ...]:
        weights = _WEIGHT_FIELDS if self.hidden_w is not None else \
            tuple(f for f in _WEIGHT_FIELDS if f != "hidden_w") + _COMPACT_FIELDS
        return weights + _META_FIELDS

    @property
    def nbytes(self) -> int:
        """Device bytes held by the bank (all per-image tensors, labels and sizes)."""
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in self._fields())

    def __repr__(self) -> str:
        return (f"TensorBank({self.num_images} images, {self.arch.sine_layers}x{self.arch.width}, "
                f"hidden {self.hidden_dtype} {self.layout}, {self.nbytes} bytes on {self.device})")

    def to(self, device) -> "TensorBank":
        device = torch.device(device)
        moved = {f: getattr(self, f).to(device) for f in self._fields()}
        return TensorBank(self.arch, load_seconds=self.load_seconds, check_compact=False, **moved)

    def to_layout(self, layout: str) -> "TensorBank":
        """This bank with its hidden weights in `layout` ("dense" or "compact"; other tensors shared).
        Dense -> compact treats every zero weight as pruned (it decodes the same)."""
        if layout not in ("dense", "compact"):
            raise InrUsageError(f"bank layout must be 'dense' or 'compact', got {layout!r}")
        if layout == self.layout:
            return self
        common = {f: getattr(self, f) for f in self._fields()
                  if f not in _COMPACT_FIELDS and f != "hidden_w"}
        n = self.num_images
        if layout == "dense":
            dense = torch.empty((n, *self.hidden_shape), dtype=self.hidden_values.dtype, device=self.device)
            step = max(1, (1 << 24) // max(self.hidden_total, 1))
            for i in range(0, n, step):
                dense[i:i + step] = self.hidden_dense(torch.arange(i, min(n, i + step), device=self.device))
            return TensorBank(self.arch, load_seconds=self.load_seconds, hidden_w=dense, **common)
        flat = self.hidden_w.reshape(n, -1)
        keep = flat != 0
        counts = keep.sum(dim=1)
        offsets = torch.cumsum(counts, 0) - counts
        return TensorBank(self.arch, load_seconds=self.load_seconds, hidden_values=flat[keep].contiguous(),
                          hidden_masks=_pack_bits(keep), hidden_offsets=offsets.contiguous(), **common)

    @property
    def hidden_shape(self) -> tuple[int, int, int]:
        h, w = self.arch.hidden_layers, self.arch.width
        return h, w, w

    def hidden_dense(self, indices: torch.Tensor) -> torch.Tensor:
        """[B,H,W,W] hidden weights (storage dtype, not dequantized) of the images at `indices` (a long tensor
        on the bank's device); expanded from the bitmaps for a compact bank (torch ops; the triton backend
        has its own kernel for this)."""
        if self.hidden_w is not None:
            return self.hidden_w[indices]
        b, total = indices.numel(), self.hidden_total
        bits = _unpack_bits(self.hidden_masks[indices])[:, :total]
        values = self.hidden_values
        if values.numel() == 0:
            return torch.zeros((b, *self.hidden_shape), dtype=values.dtype, device=self.device)
        rank = torch.cumsum(bits, dim=1, dtype=torch.int64)
        rank += self.hidden_offsets[indices][:, None] - 1
        taken = values[rank.clamp_(0, values.numel() - 1)]
        dense = torch.where(bits.bool(), taken, torch.zeros((), dtype=values.dtype, device=self.device))
        return dense.view(b, *self.hidden_shape)

    def params(self, indices: torch.Tensor):
        """Dequantized float32 `siren.SirenParams` of the images at `indices` (a long tensor on the bank's device)."""
        from .siren import SirenParams

        hidden = self.hidden_dense(indices).to(torch.float32)
        hidden.mul_(self.hidden_scale[indices][:, :, None, None])
        f32 = torch.float32
        return SirenParams(first_w=self.first_w[indices].to(f32), first_b=self.first_b[indices].to(f32),
                           hidden_w=hidden, hidden_b=self.hidden_b[indices].to(f32),
                           last_w=self.last_w[indices].to(f32), last_b=self.last_b[indices].to(f32))

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params, arch: "Architecture", *, hidden_dtype: str = "int8", labels=None,
                    heights=None, widths=None, device=None) -> "TensorBank":
        """A bank from float `siren.SirenParams` (tests, benchmarks, freshly fitted weights), the hidden
        weights quantized to `hidden_dtype` as the encoder does (`quantize.quantize_hidden`)."""
        if hidden_dtype not in HIDDEN_DTYPES:
            raise InrUsageError(f"hidden_dtype {hidden_dtype!r} is not one of {', '.join(HIDDEN_DTYPES)}")
        device = torch.device(device) if device is not None else params.first_w.device
        f32 = dict(device=device, dtype=torch.float32)
        hidden_w, scale = quantize_hidden(params.hidden_w.to(**f32), hidden_dtype)

        def opt(t, dtype):
            return None if t is None else torch.as_tensor(t, dtype=dtype).to(device).contiguous()

        return cls(arch, first_w=params.first_w.to(**f32).contiguous(), first_b=params.first_b.to(**f32).contiguous(),
                   hidden_w=hidden_w.contiguous(), hidden_scale=scale.contiguous(),
                   hidden_b=params.hidden_b.to(**f32).contiguous(), last_w=params.last_w.to(**f32).contiguous(),
                   last_b=params.last_b.to(**f32).contiguous(), labels=opt(labels, torch.int64),
                   heights=opt(heights, torch.int32), widths=opt(widths, torch.int32))

    @classmethod
    def from_weight_batch(cls, weights, arch: "Architecture", *, labels=None, heights=None, widths=None,
                          device="cpu") -> "TensorBank":
        """A bank from a numpy `spec.WeightBatch` (e.g. `InrFile.read_images(...)`)."""
        device = torch.device(device)
        tensors = {}
        for name in _WEIGHT_FIELDS:
            t = torch.from_numpy(np.ascontiguousarray(getattr(weights, name)))
            if name != "hidden_w":
                t = t.to(torch.float32)
            tensors[name] = t.to(device).contiguous()

        def opt(a, dtype):
            return None if a is None else torch.as_tensor(np.asarray(a)).to(dtype).to(device)

        return cls(arch, labels=opt(labels, torch.int64), heights=opt(heights, torch.int32),
                   widths=opt(widths, torch.int32), **tensors)

    @classmethod
    def from_file(cls, inr_file, device=None, *, layout="auto", progress=None, workers=None) -> "TensorBank":
        """Upload a whole .inr file (an `InrFile` or a path) to `device`, chunk by chunk.

        layout: "auto" (see `auto_layout`), "dense" or "compact". Worker threads (`workers`, default up to 8)
        read and check chunks with `InrFile.read_payload`; on CUDA each payload is copied through one of two
        alternating pinned staging buffers (non_blocking) and unpacked on the device, so the host does no
        per-weight work. `progress`, if given, is called with (images_done, total) after each chunk.
        """
        from .reader import InrFile

        if layout not in LAYOUTS:
            raise InrUsageError(f"bank layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        device = devices.resolve(device)
        owned = not isinstance(inr_file, InrFile)
        f = InrFile(inr_file) if owned else inr_file
        try:
            if layout == "auto":
                layout = auto_layout(f)
            return cls._from_payloads(f, device, progress, workers, compact=layout == "compact")
        finally:
            if owned:
                f.close()

    @classmethod
    def _from_payloads(cls, f: "InrFile", device: torch.device, progress, workers, compact: bool) -> "TensorBank":
        start_time = time.perf_counter()
        arch = f.arch
        n, w, h = f.num_images, arch.width, arch.hidden_layers
        total = arch.hidden_total
        fdt = TORCH_DTYPES[f.float_dtype]
        nnz = np.asarray(f.index["nnz"], dtype=np.int64)
        bank = {
            "first_w": torch.empty((n, w, 2), dtype=fdt, device=device),
            "first_b": torch.empty((n, w), dtype=fdt, device=device),
            "hidden_b": torch.empty((n, h, w), dtype=fdt, device=device),
            "last_w": torch.empty((n, 3, w), dtype=fdt, device=device),
            "last_b": torch.empty((n, 3), dtype=fdt, device=device),
        }
        hidden_dtype = TORCH_DTYPES[f.hidden_dtype]
        value_starts = np.concatenate([[0], np.cumsum(nnz)])  # a maskless file has nnz == H*W*W (checked)
        if compact:
            bank["hidden_values"] = torch.empty((int(value_starts[-1]),), dtype=hidden_dtype, device=device)
            bank["hidden_masks"] = torch.empty((n, (total + 7) // 8), dtype=torch.uint8, device=device)
            bank["hidden_offsets"] = torch.from_numpy(value_starts[:-1].astype(np.int64)).to(device)
            if not f.has_masks:  # nothing pruned: every bit set, padding bits clear
                full = np.packbits(np.ones(total, dtype=bool))
                bank["hidden_masks"].copy_(torch.from_numpy(full).to(device).expand(n, -1))
        else:
            bank["hidden_w"] = torch.empty((n, h, w, w), dtype=hidden_dtype, device=device)
        max_raw = max((int(v) for v in f.chunks["raw_length"]), default=0)
        cuda = device.type == "cuda"
        raw_device = torch.empty((max_raw,), dtype=torch.uint8, device=device)
        if cuda:
            staging = [torch.empty((max_raw,), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            copied = [None, None]
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))  # the bank tensors were made there

        workers = workers or min(8, os.cpu_count() or 1)
        lookahead = workers + 1  # chunks read ahead: bounds host memory to a few chunks
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = {k: pool.submit(f.read_payload, k) for k in range(min(lookahead, f.num_chunks))}
            for k in range(f.num_chunks):
                payload = pending.pop(k).result()
                if k + lookahead < f.num_chunks:
                    pending[k + lookahead] = pool.submit(f.read_payload, k + lookahead)
                length = len(payload.raw)
                value_start = int(value_starts[payload.start])
                if cuda:
                    s = k % 2
                    if copied[s] is not None:
                        copied[s].synchronize()
                    staging[s].numpy()[:length] = np.frombuffer(payload.raw, dtype=np.uint8)
                    with torch.cuda.stream(stream):
                        raw_device[:length].copy_(staging[s][:length], non_blocking=True)
                        copied[s] = torch.cuda.Event()
                        copied[s].record(stream)
                        _unpack_payload(payload, raw_device[:length], bank, value_start, total, compact)
                else:
                    raw_device[:length].copy_(torch.frombuffer(bytearray(payload.raw), dtype=torch.uint8))
                    _unpack_payload(payload, raw_device[:length], bank, value_start, total, compact)
                del payload
                if progress is not None:
                    progress(f.chunk_range(k)[1], n)
        if cuda:
            stream.synchronize()
            torch.cuda.current_stream(device).wait_stream(stream)
            del staging
        del raw_device
        index = f.index
        scales = torch.from_numpy(np.array(f.scales, dtype=np.float32).reshape(n, h)).to(device)
        labels = torch.from_numpy(np.asarray(index["label"], dtype=np.int64)).to(device)
        heights = torch.from_numpy(np.asarray(index["height"], dtype=np.int32)).to(device)
        widths = torch.from_numpy(np.asarray(index["width"], dtype=np.int32)).to(device)
        if cuda:
            torch.cuda.synchronize(device)
        # The reader checked every payload (bitmap counts == nnz, clean padding bits): no second check here.
        return cls(arch, hidden_scale=scales, labels=labels, heights=heights, widths=widths,
                   load_seconds=time.perf_counter() - start_time, check_compact=False, **bank)


def _typed(segment: torch.Tensor, np_dtype: np.dtype, shape) -> torch.Tensor:
    """A uint8 slice reinterpreted as `np_dtype` (little-endian in the file, as on every torch device)."""
    dtype = TORCH_DTYPES[np_dtype.name] if np_dtype.name in TORCH_DTYPES else torch.uint8
    if np_dtype.itemsize > 1 and segment.storage_offset() % np_dtype.itemsize:
        segment = segment.clone()  # misaligned after an odd-length bitmap: realign once
    return segment.view(dtype).view(shape)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [B, nbytes] (numpy packbits order: most significant bit first) -> uint8 0/1 [B, nbytes*8]."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).view(packed.shape[0], -1)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [B, T] -> uint8 [B, ceil(T/8)] in numpy packbits order, padding bits clear."""
    b, t = bits.shape
    padded = torch.zeros((b, (t + 7) // 8 * 8), dtype=torch.uint8, device=bits.device)
    padded[:, :t] = bits
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (padded.view(b, -1, 8) * weights).sum(dim=-1, dtype=torch.uint8).contiguous()


def layout_bytes(f) -> dict[str, int]:
    """Bank bytes of the open InrFile `f` in each layout, computed from its header and index alone."""
    arch = f.arch
    n, w, h = f.num_images, arch.width, arch.hidden_layers
    total = arch.hidden_total
    item = DTYPES[f.hidden_dtype].itemsize
    fitem = DTYPES[f.float_dtype].itemsize
    common = n * (fitem * (2 * w + w + h * w + 3 * w + 3) + 4 * h + 8 + 4 + 4)  # floats, scales, labels, sizes
    nnz = int(np.asarray(f.index["nnz"], dtype=np.int64).sum()) if f.has_masks else n * total
    return {"dense": common + n * total * item,
            "compact": common + nnz * item + n * ((total + 7) // 8) + n * 8}


def auto_layout(f) -> str:
    """The layout `layout="auto"` picks for the open InrFile `f`: dense while the dense bank stays within
    AUTO_MAX_BANK_OVER_FILE x the file's bytes (the decoders read it directly), else compact if smaller."""
    sizes = layout_bytes(f)
    if sizes["dense"] <= AUTO_MAX_BANK_OVER_FILE * f.file_bytes or sizes["compact"] >= sizes["dense"]:
        return "dense"
    return "compact"


def _unpack_payload(payload: "ChunkPayload", raw: torch.Tensor, bank: dict, value_start: int, total: int,
                    compact: bool) -> None:
    """Scatter one chunk's payload (its bytes already on the bank's device as `raw`) into the bank.
    Dense: the bitmaps are expanded into hidden_w. Compact: values go to hidden_values[value_start:] and
    the bitmaps to hidden_masks as they are."""
    arrays = {name: _typed(raw[payload.offsets[name]:payload.offsets[name] + arr.nbytes], arr.dtype, arr.shape)
              for name, arr in payload.arrays.items()}
    start, stop, count = payload.start, payload.stop, payload.count
    for name in ("first_w", "first_b", "hidden_b", "last_w", "last_b"):
        bank[name][start:stop].copy_(arrays[name], non_blocking=True)
    values = arrays["values"]
    if compact:
        bank["hidden_values"][value_start:value_start + values.numel()].copy_(values.reshape(-1))
    if "masks" not in arrays:
        if not compact:
            bank["hidden_w"][start:stop].view(-1).copy_(values)
        return
    packed = arrays["masks"]  # [count, ceil(total/8)], most significant bit first (numpy packbits)
    if compact:
        bank["hidden_masks"][start:stop].copy_(packed)
        return
    dense = bank["hidden_w"][start:stop].view(count, total)
    if values.numel() == 0:
        dense.zero_()
        return
    flat = _unpack_bits(packed)[:, :total].bool().view(-1)
    position = torch.cumsum(flat, 0, dtype=torch.int64 if flat.numel() >= 2 ** 31 else torch.int32)
    position = (position - 1).clamp_(0, values.numel() - 1)
    dense.view(-1).copy_(torch.where(flat, values[position], torch.zeros((), dtype=values.dtype, device=raw.device)))
