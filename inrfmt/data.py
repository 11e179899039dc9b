"""The dataset (`inrfmt.open`) and the on-device training loader (with DistributedDataParallel support).

    ds = inrfmt.open("train.inr")                    # whole file -> one TensorBank on cuda (or cpu)
    img, label = ds[i]                               # float32 [3,H,W] in [0,1], native size
    loader = ds.loader(512, augment=Compose([RandomResizedCrop(224), RandomHorizontalFlip()]))
    for epoch in range(epochs):
        for images, labels in loader: ...            # [B,3,224,224], [B] on the device

The loader is airbench's CifarLoader idea applied to a decoder: all state is on the device, there are no
worker processes, the epoch's permutation is drawn there, and per batch the host only launches work
(index, draw augmentation, decode) - no `.item()`, no `.cpu()`, no host<->device copy. On CUDA it decodes
several batches per call when they are small, so the host's launch overhead is paid once per block.
"""
from __future__ import annotations

import math
import operator
import os
import time
from typing import Iterator

import numpy as np
import torch

from . import augment as augment_mod
from . import device as devices
from . import rng
from .bank import TensorBank
from .checks import check_int
from .decode import decode as decode_batch
from .decode_args import parse_size
from .errors import InrUsageError
from .reader import InrFile

__all__ = ["open", "InrDataset", "InrLoader"]


def open(path, device=None, *, bank_layout="auto", size=None, transform=None,  # noqa: A001 - the public name
         target_transform=None) -> "InrDataset":
    """Validate the .inr file at `path` and upload it to `device` (None: cuda if available, else cpu).

    bank_layout: how the hidden weights are held on the device - "dense" (fastest decode), "compact" (the
    file's kept values and bitmaps; a batch is expanded before decoding), "coded" (a format 2 file's packed
    codes; a batch is dequantized before decoding) or "auto" (coded for a format 2 file, else dense unless
    that costs more than 1.1x the file's bytes; see inrfmt.bank). size, transform, target_transform: see
    InrDataset."""
    return InrDataset(path, device=device, bank_layout=bank_layout, size=size, transform=transform,
                      target_transform=target_transform)


def common_size(sizes: np.ndarray) -> tuple[int, int] | None:
    """(h, w) when every row of sizes [N, 2] is the same, else None (also for N = 0)."""
    distinct = np.unique(sizes, axis=0) if len(sizes) else sizes
    return (int(distinct[0, 0]), int(distinct[0, 1])) if len(distinct) == 1 else None


class InrDataset(torch.utils.data.Dataset):
    """A whole .inr file on one device, as a map-style torch Dataset.

    `ds[i]` is (image, label): the image float32 [3,H,W] in [0,1] on the dataset's device, decoded at the
    image's native size, or at `size` ((h, w), or an int for size x size) when given, so that images of
    mixed sizes batch together; then `transform(image)` and `target_transform(label)` when given, as
    torchvision datasets do. `i` is any integer (Python, numpy, a 0-d or one-element integer tensor),
    negative counting from the end; a slice gives the list of (image, label) pairs it selects.

    Attributes: `file` (the validated InrFile, kept open), `bank` (TensorBank), `arch`, `classes`,
    `class_to_idx`, `targets` (list of int labels, torchvision's name), `labels` (int64 [N] on the
    device), `sizes` (numpy int64 [N, 2] of (height, width), host), `native_size` ((h, w) when every
    image has that size, else None), `size`, `transform`, `target_transform`, `device`.

    Works with `torch.utils.data.DataLoader(ds, batch_size=..., shuffle=True)`: `__getitems__` makes one
    decode call per batch (per native size). With worker processes (any start method: fork, spawn,
    forkserver) the dataset is pickled: a copy reopens the file and rebuilds its bank on its first decode,
    on the same device; `copy.deepcopy` does the same. Workers only add work here (decoding is batched on
    the device): keep num_workers=0, or use `ds.loader(...)`, the faster on-device path.
    """

    def __init__(self, path, device=None, *, bank_layout="auto", size=None, transform=None, target_transform=None):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise InrUsageError(f"{path}: no such file")
        for name, fn in (("transform", transform), ("target_transform", target_transform)):
            if fn is not None and not callable(fn):
                raise InrUsageError(f"{name} must be callable, got {type(fn).__name__}")
        start = time.perf_counter()
        self.device = devices.resolve(device)
        self.path = path
        self.bank_layout = bank_layout
        self.size = parse_size(size) if size is not None else None
        self.transform, self.target_transform = transform, target_transform
        self._open_file()
        try:
            self._bank = TensorBank.from_file(self.file, self.device, layout=bank_layout)
        except BaseException:
            self.file.close()
            raise
        self.open_seconds = time.perf_counter() - start

    def _open_file(self) -> None:
        """Open and validate the file; everything but the bank."""
        self.file = InrFile(self.path)
        index = self.file.index
        self.arch = self.file.arch
        self.classes = list(self.file.classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.sizes = np.stack([np.asarray(index["height"], np.int64), np.asarray(index["width"], np.int64)], axis=1)
        self._host_labels = np.asarray(index["label"], np.int64)  # __getitem__ answers without a device sync
        self.native_size = common_size(self.sizes)
        self._closed = False
        self._bank = None
        self._arange = None  # device arange: ds[i] and contiguous batches index it instead of uploading indices
        self._staging: list = []  # pinned host buffers for other index lists (CUDA), each with its copy's event

    # -- pickling: a copy reopens the file; its bank is rebuilt on first use ----------------------------
    def __getstate__(self) -> dict:
        self._check_open()
        return {"path": self.path, "device": str(self.device), "bank_layout": self.bank_layout, "size": self.size,
                "transform": self.transform, "target_transform": self.target_transform,
                "open_seconds": self.open_seconds}

    def __setstate__(self, state: dict) -> None:
        self.path, self.bank_layout, self.size = state["path"], state["bank_layout"], state["size"]
        self.transform, self.target_transform = state["transform"], state["target_transform"]
        self.device = devices.resolve(state["device"])
        self.open_seconds = state["open_seconds"]
        self._open_file()

    @property
    def bank(self) -> TensorBank:
        if self._bank is None:
            self._check_open()
            self._bank = TensorBank.from_file(self.file, self.device, layout=self.bank_layout)
        return self._bank

    @property
    def labels(self) -> torch.Tensor:
        """int64 [N] labels on the device (-1 = unlabelled)."""
        return self.bank.labels

    @property
    def targets(self) -> list[int]:
        """The labels as a list of ints (torchvision's `targets`)."""
        return self._host_labels.tolist()

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
        if isinstance(i, torch.Tensor) and i.numel() == 1 and not i.dtype.is_floating_point and i.dtype != torch.bool:
            i = i.reshape(())
        try:
            if isinstance(i, (bool, np.bool_)) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool):
                raise TypeError
            i = operator.index(i)
        except TypeError:
            raise InrUsageError(f"dataset index must be an integer (or a slice), got {type(i).__name__}") from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image index {i} is out of range for a dataset of {n} images")
        return int(i) % n

    def __getitem__(self, i):
        """(image, label) of image i (see the class doc); a slice gives the list of its (image, label) pairs."""
        self._check_open()
        if isinstance(i, slice):
            return self.__getitems__(range(*i.indices(len(self))))
        i = self._position(i)
        size = self.size or tuple(int(v) for v in self.sizes[i])
        image = self._decode_positions(np.array([i], np.int64), size)[0]
        return self._sample(image, i)

    def __getitems__(self, indices) -> list:
        """Batched __getitem__ for torch DataLoader: one decode call per distinct size."""
        self._check_open()
        positions = np.asarray([self._position(i) for i in indices], dtype=np.int64)
        out: list = [None] * len(positions)
        if len(positions) == 0:
            return out
        sizes = self.sizes[positions]
        if self.size is not None or self.native_size is not None:
            groups = [np.arange(len(positions))]
        else:
            groups = [np.flatnonzero((sizes == s).all(axis=1)) for s in np.unique(sizes, axis=0)]
        for members in groups:
            size = self.size or tuple(int(v) for v in sizes[members[0]])
            images = self._decode_positions(positions[members], size)
            for k, slot in enumerate(members):
                out[slot] = self._sample(images[k], int(positions[slot]))
        return out

    def _sample(self, image: torch.Tensor, i: int):
        label = int(self._host_labels[i])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def _decode_positions(self, positions: np.ndarray, size) -> torch.Tensor:
        return decode_batch(self.bank, self._device_indices(positions), size)

    def _device_indices(self, positions: np.ndarray) -> torch.Tensor:
        """Checked host positions as an int64 tensor on the device without a blocking pageable copy: a
        contiguous run is a view of a cached device arange; on CUDA any other list is written into a pinned
        staging buffer and copied with non_blocking=True (a buffer is reused once its copy has finished)."""
        if self.device.type != "cuda":
            return torch.from_numpy(positions)
        n = len(positions)
        if n and int(positions[-1]) - int(positions[0]) == n - 1 and (np.diff(positions) == 1).all():
            if self._arange is None:
                self._arange = torch.arange(len(self), dtype=torch.int64, device=self.device)
            return self._arange[int(positions[0]):int(positions[0]) + n]
        ring = self._staging
        free = next((k for k, (buf, done) in enumerate(ring) if buf.numel() >= n and done.query()), None)
        if free is None:
            if len(ring) >= _STAGING_BUFFERS:  # all in flight (rare): wait for the oldest
                ring[0][1].synchronize()
                ring.pop(0)
            ring.append((torch.empty(max(n, 1024), dtype=torch.int64, pin_memory=True), torch.cuda.Event()))
            free = len(ring) - 1
        staging, done = ring[free]
        staging[:n].numpy()[:] = positions
        on_device = staging[:n].to(self.device, non_blocking=True)
        done.record()
        return on_device

    # -- decoding -------------------------------------------------------------------------------------
    def decode(self, indices, size=None, theta=None, *, backend=None, out=None,
               dtype=torch.float32) -> torch.Tensor:
        """[B,3,h,w] pixels in [0,1] of images `indices`, on the dataset's device, in ONE batched pass.

        size: (h, w) or int (square); None = the images' native size, which they must share.
        theta: [B,2,3] per-image affine maps of the sampling grid (see inrfmt.augment), None = identity.
        """
        self._check_open()
        if size is None:
            size = self.native_size if self.native_size is not None else self._shared_size(indices)
        return decode_batch(self.bank, indices, size, theta, backend=backend, out=out, dtype=dtype)

    def _shared_size(self, indices) -> tuple[int, int]:
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
        """An on-device batch iterator; see InrLoader (indices= takes a subset)."""
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
            self._bank = None
            self._arange, self._staging = None, []

    def __enter__(self) -> "InrDataset":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


# Arguments of torch.utils.data.DataLoader that have no meaning for the on-device loader, and why.
_NO_WORKERS = "the loader decodes on the dataset's device itself, with no worker processes"
_DATALOADER_ONLY = {
    "num_workers": _NO_WORKERS,
    "persistent_workers": _NO_WORKERS,
    "prefetch_factor": _NO_WORKERS,
    "worker_init_fn": _NO_WORKERS,
    "multiprocessing_context": _NO_WORKERS,
    "timeout": _NO_WORKERS,
    "pin_memory": "batches are made on the dataset's device; nothing is copied from host memory",
    "pin_memory_device": "batches are made on the dataset's device; nothing is copied from host memory",
    "collate_fn": "batches already come as (images [B,3,H,W], labels [B]) tensors",
    "sampler": "the order comes from shuffle, seed and the distributed rank; pass indices= for a subset",
    "batch_sampler": "the order comes from shuffle, seed and the distributed rank; pass indices= for a subset",
    "generator": "the order and the augmentation draws come from seed=",
}
# Pinned index buffers a CUDA dataset keeps for __getitems__ (each reused once its copy has finished).
_STAGING_BUFFERS = 4
# On CUDA the loader decodes enough batches per call to fill about this many output pixels (see InrLoader).
AMORTISE_PIXELS = 1 << 22


class InrLoader:
    """Batches `(images [B,3,h,w], labels [B])` decoded on the dataset's device.

    Subset: `indices` (a sequence or tensor of image indices; repeats allowed) makes the loader iterate
    those images only, e.g. the train or the validation part of one file, still on the device.

    Order: a pure function of (seed, epoch, rank, world_size) on a given device type: the epoch's
    permutation is `torch.randperm(N)` from a device generator seeded with `seed + epoch` (arange when
    shuffle=False) over the N images (of the subset), then split across ranks. Augmentation draws are a
    pure function of (seed, epoch, rank, the image's position in the rank's order) through the counter-based
    generator of inrfmt.rng, so a resumed run sees the same crops and colour changes too, however the
    batches are grouped into decode calls.

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
    augmentation's pixel ops (fills, ColorJitter, Normalize, RandomErasing, callables). `size` (int or
    (h, w)) resizes the output (applied after `augment`'s geometric ops); without either, every image must
    have the same native size. `augment` is an inrfmt.augment transform, a list of them, or any callable on
    the decoded [B,3,H,W] batch.

    Decode calls: `batches_per_decode` batches (K) are decoded together, in one call with one augmentation
    plan, then handed out one by one; draws, order and batches are the same for every K. None picks K on
    CUDA so that a call fills about AMORTISE_PIXELS output pixels (K = 8 at batch 512 and 32x32; 1 for
    large images), since each call costs the host ~0.1-0.3 ms of launches; 1 on the CPU. Each batch is a
    fresh tensor (a view of its block's fresh output; keeping a batch keeps its block alive) unless
    `reuse_buffer=True`: then every block is decoded into one preallocated buffer, and a batch's images
    are overwritten when the next block is decoded, that is at the next batch after its block's last one
    (with K = 1: by the next batch), so use each batch before asking for the next.
    """

    def __init__(self, dataset: InrDataset, batch_size, shuffle=True, drop_last=False, seed=0, size=None,
                 augment=None, dtype=torch.float32, channels_last=False, distributed=None, *,
                 rank=None, world_size=None, backend=None, reuse_buffer=False, indices=None,
                 batches_per_decode=None, **dataloader_arguments):
        for name, value in dataloader_arguments.items():
            if name in _DATALOADER_ONLY:
                raise InrUsageError(f"loader: {name}={value!r} does not apply: {_DATALOADER_ONLY[name]} "
                                    f"(torch.utils.data.DataLoader(ds, ...) takes it)")
            raise InrUsageError(f"loader: unexpected argument {name!r}")
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
        self.indices, native_size = self._subset(indices)
        self.num_images = len(dataset) if self.indices is None else int(self.indices.numel())
        self.native_size = native_size

        if isinstance(augment, (list, tuple)):
            augment = augment_mod.Compose(augment)
        elif augment is not None and not isinstance(augment, augment_mod.Transform):
            if not callable(augment):
                raise InrUsageError(f"loader: augment must be an inrfmt.augment transform, a list of them or a "
                                    f"callable on the decoded [B,3,H,W] batch, got {type(augment).__name__}")
            augment = augment_mod.Lambda(augment)
        self.size = parse_size(size) if size is not None else None
        if self.size is not None:  # a final Resize, before any pixel op of the pipeline
            augment = augment_mod.with_output_size(augment, self.size)
        if augment is None and native_size is None and self.num_images > 0:
            raise InrUsageError(f"{dataset.path}: images have different native sizes; pass size=(h, w) "
                                f"(or an augment pipeline that ends at a fixed size)")
        self.augment = augment
        self.output_size = native_size
        if augment is not None:  # fail now, not at the first batch, when the output size is undecidable
            probe = torch.ones(1, device=self.device)
            self.output_size = augment(probe, probe, generator=torch.Generator(device=self.device),
                                       native_size=native_size).size

        # DistributedSampler's arithmetic.
        n, r = self.num_images, self.world_size
        if self.drop_last and n % r != 0:
            self.num_samples = math.ceil((n - r) / r)
        else:
            self.num_samples = math.ceil(n / r)
        self.total_size = self.num_samples * r
        if batches_per_decode is None:
            pixels = self.batch_size * (self.output_size[0] * self.output_size[1] if self.output_size else 1)
            batches_per_decode = max(1, AMORTISE_PIXELS // pixels) if self.device.type == "cuda" else 1
            batches_per_decode = max(1, min(batches_per_decode, len(self)))
        self.batches_per_decode = check_int("loader: batches_per_decode", batches_per_decode, 1)

        self.epoch = 0
        self._batch = 0  # next batch of the current epoch
        self._order: torch.Tensor | None = None
        self._order_epoch = -1
        self._perm_gen = torch.Generator(device=self.device)
        self._buffer: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None  # device arange of a block's positions (keys of the draws)

    def _subset(self, indices) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
        """(the subset as int64 on the device, or None; the native size its images share, or None)."""
        ds = self.dataset
        if indices is None:
            return None, ds.native_size
        if isinstance(indices, torch.Tensor):
            if indices.dtype.is_floating_point or indices.dtype == torch.bool:
                raise InrUsageError(f"loader: indices must be integers, got a {indices.dtype} tensor")
            host = indices.detach().cpu().numpy().astype(np.int64).reshape(-1)  # once, at construction
        else:
            try:
                host = np.asarray(list(indices), dtype=np.int64).reshape(-1)
            except (TypeError, ValueError):
                raise InrUsageError("loader: indices must be a sequence of image indices") from None
        n = len(ds)
        bad = host[(host < 0) | (host >= n)]
        if bad.size:
            raise InrUsageError(f"loader: index {int(bad[0])} is out of range for a dataset of {n} images")
        return torch.as_tensor(host, device=self.device), common_size(ds.sizes[host])

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
        if self.indices is not None:
            shard = self.indices[shard]
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
        bank = self.dataset.bank
        b, size = start, self.batch_size
        while b < len(self):
            stop = min(b + self.batches_per_decode, len(self))
            first, last = b * size, min(stop * size, self.num_samples)  # positions in this rank's order
            idx = order[first:last]
            images, plan = self._decode(bank, idx, last - first, epoch, first)
            labels = bank.labels[idx]
            for k in range(b, stop):
                rows = slice((k - b) * size, min((k - b + 1) * size, last - first))
                batch = images[rows]
                if plan is not None and not plan.per_image:  # a callable: it sees each batch on its own
                    batch = plan.finish(batch, rows)
                self._batch = k + 1
                yield batch, labels[rows]
            b = stop
        if self.epoch == epoch and self._batch >= len(self):
            self.epoch, self._batch = epoch + 1, 0

    def _decode(self, bank, idx: torch.Tensor, count: int, epoch: int, first: int):
        """Decode one block of images (positions first.. of the rank's order): (images, the plan or None)."""
        if self.augment is None:
            out = self._output(count, self.output_size)
            return decode_batch(bank, idx, self.output_size, None, backend=self.backend, out=out,
                                dtype=self.dtype), None
        plan = self.augment(bank.heights[idx], bank.widths[idx], native_size=self.native_size,
                            keys=self._draw_keys(epoch, first, count))
        out = self._output(count, plan.size)
        images = decode_batch(bank, idx, plan.size, plan.theta, backend=self.backend, out=out, dtype=self.dtype)
        if plan.per_image:
            images = plan.finish(images)
        return images, plan

    def _draw_keys(self, epoch: int, first: int, count: int) -> torch.Tensor:
        """int64 [count] keys of the augmentation draws: one per position first.. of the rank's order."""
        need = self.batches_per_decode * self.batch_size
        if self._positions is None or self._positions.numel() < need:
            self._positions = torch.arange(need, dtype=torch.int64, device=self.device)
        positions = self._positions[:count] + first
        return rng.row_keys(rng.mix(self.seed, epoch, self.rank, self.world_size), positions)

    def _output(self, count: int, size) -> torch.Tensor | None:
        h, w = size
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if not self.reuse_buffer:
            if not self.channels_last:
                return None  # the decoder allocates
            return torch.empty((count, 3, h, w), dtype=self.dtype, device=self.device, memory_format=fmt)
        buf = self._buffer
        if buf is None or buf.shape[2:] != (h, w):
            buf = torch.empty((self.batches_per_decode * self.batch_size, 3, h, w), dtype=self.dtype,
                              device=self.device, memory_format=fmt)
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

