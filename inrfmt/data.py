"""The dataset (`inrfmt.open`) and the on-device training loader (with DistributedDataParallel support).

    ds = inrfmt.open("train.inr")                    # whole file -> one TensorBank on cuda (or cpu)
    img, label = ds[i]                               # float32 [3,H,W] in [0,1], native size
    loader = ds.loader(512, augment=Compose([RandomResizedCrop(224), RandomHorizontalFlip()]))
    for epoch in range(epochs):
        for images, labels in loader: ...            # [B,3,224,224], [B] on the device

The loader is airbench's CifarLoader idea applied to a decoder: all state is on the device, there are no
worker processes, the epoch's permutation is drawn there, and per batch the host only launches work
(index, draw augmentation, decode) - no `.item()`, no `.cpu()`, no host<->device copy.
"""
from __future__ import annotations

import math
import os
import time
from typing import Iterator

import numpy as np
import torch

from . import augment as augment_mod
from . import device as devices
from .bank import TensorBank
from .decode import decode as decode_batch
from .decode_args import parse_size
from .checks import check_int, is_int
from .errors import InrUsageError
from .reader import InrFile

__all__ = ["open", "InrDataset", "InrLoader"]


def open(path, device=None, *, bank_layout="auto") -> "InrDataset":  # noqa: A001 - the public name
    """Validate the .inr file at `path` and upload it to `device` (None: cuda if available, else cpu).

    bank_layout: how the hidden weights are held on the device - "dense" (fastest decode), "compact" (the
    file's kept values and bitmaps; a batch is expanded before decoding) or "auto" (dense unless that costs
    more than 1.1x the file's bytes; see inrfmt.bank)."""
    return InrDataset(path, device=device, bank_layout=bank_layout)


class InrDataset(torch.utils.data.Dataset):
    """A whole .inr file on one device.

    Attributes: `file` (the validated InrFile, kept open), `bank` (TensorBank), `arch`, `classes`,
    `labels` (int64 [N] on the device), `sizes` (numpy int64 [N, 2] of (height, width), host),
    `native_size` ((h, w) when every image has that size, else None), `device`.

    Works unchanged with `torch.utils.data.DataLoader(ds, batch_size=..., shuffle=True)` (keep
    num_workers=0: decoding is batched on the device, `__getitems__` makes one decode call per batch).
    `ds.loader(...)` is the faster on-device path.
    """

    def __init__(self, path, device=None, *, bank_layout="auto"):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise InrUsageError(f"{path}: no such file")
        start = time.perf_counter()
        self.device = devices.resolve(device)
        self.path = path
        self.file = InrFile(path)
        try:
            self.bank = TensorBank.from_file(self.file, self.device, layout=bank_layout)
        except BaseException:
            self.file.close()
            raise
        self.open_seconds = time.perf_counter() - start
        index = self.file.index
        self.arch = self.file.arch
        self.classes = list(self.file.classes)
        self.labels = self.bank.labels
        self.sizes = np.stack([np.asarray(index["height"], np.int64), np.asarray(index["width"], np.int64)], axis=1)
        self._host_labels = np.asarray(index["label"], np.int64)  # __getitem__ answers without a device sync
        distinct = np.unique(self.sizes, axis=0) if len(self.sizes) else np.zeros((0, 2), np.int64)
        self.native_size = (int(distinct[0, 0]), int(distinct[0, 1])) if len(distinct) == 1 else None
        self._closed = False

    # -- basics ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.file.num_images if not self._closed else 0

    def __repr__(self) -> str:
        size = "x".join(map(str, self.native_size)) if self.native_size else "mixed sizes"
        return (f"InrDataset({self.path!r}, {len(self)} images, {size}, {len(self.classes)} classes, "
                f"{self.arch.sine_layers}x{self.arch.width} SIREN, on {self.device})")

    def _check_open(self) -> None:
        if self._closed:
            raise InrUsageError(f"{self.path}: dataset is closed")

    def _position(self, i) -> int:
        if isinstance(i, torch.Tensor) and i.numel() == 1:
            i = i.item()
        if not is_int(i):
            raise InrUsageError(f"dataset index must be an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image index {i} is out of range for a dataset of {n} images")
        return int(i) % n

    def __getitem__(self, i):
        """(float32 [3,H,W] in [0,1] at the image's original size, int label)."""
        self._check_open()
        i = self._position(i)
        image = self.decode([i], size=tuple(int(v) for v in self.sizes[i]))[0]
        return image, int(self._host_labels[i])

    def __getitems__(self, indices) -> list:
        """Batched __getitem__ for torch DataLoader: one decode call per distinct native size."""
        self._check_open()
        positions = np.asarray([self._position(i) for i in indices], dtype=np.int64)
        out: list = [None] * len(positions)
        if len(positions) == 0:
            return out
        sizes = self.sizes[positions]
        groups = [np.arange(len(positions))] if self.native_size is not None else \
            [np.flatnonzero((sizes == s).all(axis=1)) for s in np.unique(sizes, axis=0)]
        for members in groups:
            size = tuple(int(v) for v in sizes[members[0]])
            images = self.decode(positions[members], size=size)
            for k, slot in enumerate(members):
                out[slot] = (images[k], int(self._host_labels[positions[slot]]))
        return out

    # -- decoding -------------------------------------------------------------------------------------
    def decode(self, indices, size=None, theta=None, *, backend=None, out=None,
               dtype=torch.float32) -> torch.Tensor:
        """[B,3,h,w] pixels in [0,1] of images `indices`, on the dataset's device, in ONE batched pass.

        size: (h, w) or int (square); None = the images' native size, which they must share.
        theta: [B,2,3] per-image affine maps of the sampling grid (see inrfmt.augment), None = identity.
        """
        self._check_open()
        if size is None:
            size = self.native_size if self.native_size is not None else self._common_size(indices)
        return decode_batch(self.bank, indices, size, theta, backend=backend, out=out, dtype=dtype)

    def _common_size(self, indices) -> tuple[int, int]:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu()  # a host sync; pass size= to avoid it
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        if positions.size == 0:
            raise InrUsageError("decode: no indices and no size")
        n = len(self)
        bad = positions[(positions < 0) | (positions >= n)]
        if bad.size:
            raise InrUsageError(f"image index {int(bad[0])} is out of range for a dataset of {n} images")
        sizes = np.unique(self.sizes[positions], axis=0)
        if len(sizes) > 1:
            listed = ", ".join(f"{h}x{w}" for h, w in sizes[:4])
            raise InrUsageError(f"decode: the requested images have different native sizes ({listed}"
                                f"{', ...' if len(sizes) > 4 else ''}); pass size=(h, w)")
        return int(sizes[0, 0]), int(sizes[0, 1])

    def loader(self, batch_size, shuffle=True, drop_last=False, seed=0, size=None, augment=None,
               dtype=torch.float32, channels_last=False, distributed=None, **kwargs) -> "InrLoader":
        """An on-device batch iterator; see InrLoader."""
        self._check_open()
        return InrLoader(self, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, size=size,
                         augment=augment, dtype=dtype, channels_last=channels_last, distributed=distributed,
                         **kwargs)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Sizes and load time: file_bytes, bank_bytes, per-image bytes, bank_layout, load_seconds (upload of
        the bank), open_seconds (validation + upload), load_gb_per_s (file bytes / load_seconds), device."""
        self._check_open()
        n = max(len(self), 1)
        file_bytes, bank_bytes = int(self.file.file_bytes), int(self.bank.nbytes)
        load = float(self.bank.load_seconds)
        return {
            "num_images": len(self),
            "file_bytes": file_bytes,
            "bank_bytes": bank_bytes,
            "file_bytes_per_image": file_bytes / n,
            "bank_bytes_per_image": bank_bytes / n,
            "bank_layout": self.bank.layout,
            "load_seconds": load,
            "open_seconds": float(self.open_seconds),
            "load_gb_per_s": file_bytes / load / 1e9 if load > 0 else None,
            "device": str(self.device),
        }

    def close(self) -> None:
        """Release the file's memory map and the device tensors (the dataset is unusable afterwards)."""
        if not self._closed:
            self.file.close()
            self._closed = True
            self.bank = None
            self.labels = None

    def __enter__(self) -> "InrDataset":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from small ints (splitmix64 steps), so nearby (seed, epoch, rank, batch) differ a lot."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state & 0x7FFFFFFFFFFFFFFF


class InrLoader:
    """Batches `(images [B,3,h,w], labels [B])` decoded on the dataset's device.

    Order: a pure function of (seed, epoch, rank, world_size) on a given device type: the epoch's
    permutation is `torch.randperm(N)` from a device generator seeded with `seed + epoch` (arange when
    shuffle=False), then split across ranks. Augmentation draws come from a device generator re-seeded per
    batch from (seed, epoch, rank, batch), so a resumed run sees the same crops too.

    Epochs: a completed pass advances `epoch` by one; `set_epoch(e)` jumps to the start of epoch e (the
    DistributedSampler habit of calling it every epoch works as well). A new `iter(loader)` continues
    from the current position (start of an epoch, or where `load_state_dict` put it); an iteration
    abandoned halfway leaves the position there. Do not iterate one loader from two places at once.

    Distributed (DistributedSampler's rules): with world size R, every rank takes
    `num_samples = ceil(N / R)` indices (drop_last=False: the permutation is padded by wrapping around to
    its start, so a few images appear twice in an epoch) or `ceil((N - R) / R)` when drop_last=True and N
    is not divisible by R (the permutation's tail is dropped, so each image appears at most once); rank r
    takes positions r, r + R, r + 2R, ... Then batches are cut from the rank's share; drop_last=True also
    drops the last incomplete batch. `distributed=None` uses torch.distributed's rank and world size when
    a process group is initialised; `rank=`/`world_size=` set them explicitly.

    Output: images in `dtype` (float32, float16, bfloat16), channels_last memory format if asked, after the
    augmentation's fills and Normalize. `size` (int or (h, w)) resizes the output (applied after
    `augment`); without either, every image must have the same native size. A fresh tensor is returned
    per batch unless `reuse_buffer=True`, which decodes every batch into one preallocated buffer - faster
    and allocation-free, but the previous batch's images are overwritten by the next one.
    """

    def __init__(self, dataset: InrDataset, batch_size, shuffle=True, drop_last=False, seed=0, size=None,
                 augment=None, dtype=torch.float32, channels_last=False, distributed=None, *,
                 rank=None, world_size=None, backend=None, reuse_buffer=False):
        batch_size = check_int("loader: batch_size", batch_size, 1)
        seed = check_int("loader: seed", seed)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InrUsageError(f"loader: dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        self.dataset = dataset
        self.device = dataset.device
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.backend = backend
        self.reuse_buffer = bool(reuse_buffer)
        self.rank, self.world_size = _resolve_distributed(distributed, rank, world_size)
        self.num_images = len(dataset)

        if isinstance(augment, (list, tuple)):
            augment = augment_mod.Compose(augment)
        if augment is not None and not isinstance(augment, augment_mod.Transform):
            raise InrUsageError(f"loader: augment must be an inrfmt.augment transform (or a list of them), "
                                f"got {type(augment).__name__}")
        self.size = parse_size(size) if size is not None else None
        if self.size is not None:  # a final Resize, before any post op (Normalize) of the pipeline
            augment = augment_mod.with_output_size(augment, self.size)
        if augment is None and dataset.native_size is None and len(dataset) > 0:
            raise InrUsageError(f"{dataset.path}: images have different native sizes; pass size=(h, w) "
                                f"(or an augment pipeline that ends at a fixed size)")
        self.augment = augment
        if augment is not None:  # fail now, not at the first batch, when the output size is undecidable
            probe = torch.ones(1, device=self.device)
            augment(probe, probe, generator=torch.Generator(device=self.device), native_size=dataset.native_size)

        # DistributedSampler's arithmetic.
        n, r = self.num_images, self.world_size
        if self.drop_last and n % r != 0:
            self.num_samples = math.ceil((n - r) / r)
        else:
            self.num_samples = math.ceil(n / r)
        self.total_size = self.num_samples * r

        self.epoch = 0
        self._batch = 0  # next batch of the current epoch
        self._order: torch.Tensor | None = None
        self._order_epoch = -1
        self._perm_gen = torch.Generator(device=self.device)
        self._aug_gen = torch.Generator(device=self.device)
        self._buffer: torch.Tensor | None = None

    # -- order ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` at its first batch (the order depends on it)."""
        self.epoch = check_int("loader: epoch", epoch, 0)
        self._batch = 0

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's image indices for `epoch` (default: the current one), int64 on the device."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._order_epoch == epoch and self._order is not None:
            return self._order
        n = self.num_images
        if self.shuffle:
            self._perm_gen.manual_seed(self.seed + epoch)
            perm = torch.randperm(n, generator=self._perm_gen, device=self.device)
        else:
            perm = torch.arange(n, device=self.device)
        if self.total_size > n:  # wrap around (possibly more than once when N < world size)
            perm = perm.repeat(math.ceil(self.total_size / max(n, 1)))
        shard = perm[self.rank:self.total_size:self.world_size].contiguous()
        self._order, self._order_epoch = shard, epoch
        return shard

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.dataset._check_open()
        if self._batch >= len(self):  # a state saved after the last batch of an epoch
            self.epoch, self._batch = self.epoch + 1, 0
        return self._batches(self.epoch, self._batch)

    def _batches(self, epoch: int, start: int):
        order = self.order(epoch)
        labels = self.dataset.labels
        bank = self.dataset.bank
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            count = min(self.batch_size, self.num_samples - b * self.batch_size)
            images = self._decode(bank, idx, count, epoch, b)
            self._batch = b + 1
            yield images, labels[idx]
        if self.epoch == epoch and self._batch >= len(self):
            self.epoch, self._batch = epoch + 1, 0

    def _decode(self, bank, idx: torch.Tensor, count: int, epoch: int, b: int) -> torch.Tensor:
        if self.augment is not None:
            self._aug_gen.manual_seed(_mix_seed(self.seed, epoch, self.rank, b))
            plan = self.augment(bank.heights[idx], bank.widths[idx], generator=self._aug_gen,
                                native_size=self.dataset.native_size)
            size, theta, finish = plan.size, plan.theta, plan.finish
        else:
            size, theta, finish = self.dataset.native_size, None, None
        out = self._output(count, size)
        images = decode_batch(bank, idx, size, theta, backend=self.backend, out=out, dtype=self.dtype)
        return finish(images) if finish is not None else images

    def _output(self, count: int, size) -> torch.Tensor | None:
        h, w = size
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if not self.reuse_buffer:
            if not self.channels_last:
                return None  # the decoder allocates
            return torch.empty((count, 3, h, w), dtype=self.dtype, device=self.device, memory_format=fmt)
        buf = self._buffer
        if buf is None or buf.shape[2:] != (h, w):
            buf = torch.empty((self.batch_size, 3, h, w), dtype=self.dtype, device=self.device, memory_format=fmt)
            self._buffer = buf
        return buf[:count]

    # -- checkpointing --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the loader is: the next batch of `epoch` (plain ints; safe to torch.save/json)."""
        return {"epoch": self.epoch, "batch": self._batch, "seed": self.seed, "batch_size": self.batch_size,
                "num_images": self.num_images, "rank": self.rank, "world_size": self.world_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`'s position; the next iteration yields the batches that had not been yielded."""
        if not isinstance(state, dict):
            raise InrUsageError(f"loader: state must be a dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in ("epoch", "batch", "seed") if k not in state]
        if missing:
            raise InrUsageError(f"loader: state is missing {', '.join(missing)}")
        for key in ("batch_size", "num_images", "world_size", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise InrUsageError(f"loader: state was saved with {key}={state[key]!r} but this loader has "
                                    f"{key}={getattr(self, key)!r}; the order would not match")
        epoch, batch, seed = state["epoch"], state["batch"], state["seed"]
        self.seed = check_int("loader: state seed", seed)
        self.epoch = check_int("loader: state epoch", epoch, 0)
        self._batch = check_int("loader: state batch", batch, 0)
        self._order_epoch = -1  # the seed may have changed

    def __repr__(self) -> str:
        return (f"InrLoader({len(self)} batches of {self.batch_size}, epoch {self.epoch}, rank "
                f"{self.rank}/{self.world_size}, device {self.device})")


def _resolve_distributed(distributed, rank, world_size) -> tuple[int, int]:
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise InrUsageError("loader: pass both rank= and world_size=")
        if not (isinstance(world_size, (int, np.integer)) and world_size >= 1
                and isinstance(rank, (int, np.integer)) and 0 <= rank < world_size):
            raise InrUsageError(f"loader: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        return int(rank), int(world_size)
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised
    if not distributed:
        return 0, 1
    if not initialised:
        raise InrUsageError("loader: distributed=True but torch.distributed is not initialised "
                            "(call torch.distributed.init_process_group first)")
    return dist.get_rank(), dist.get_world_size()

