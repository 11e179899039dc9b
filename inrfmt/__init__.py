"""inrfmt: image datasets stored as one tiny SIREN per image, decoded on the GPU for training.

The public API is small:

    inrfmt.open(path, device=None, *, bank_layout="auto") -> InrDataset   # the whole file on the device
    inrfmt.convert(src, out, preset=...)           # encode a folder / CIFAR / HDF5 / npy / WebDataset / Parquet source
    inrfmt.merge(out, parts)                       # join the part files of a sharded convert
    inrfmt.learn_prior(src, preset=...)            # meta-learn a prior (the start of every fit) -> Prior
    inrfmt.Prior                                   # a prior file: Prior.load(path), prior.save(path)
    inrfmt.InrDataset, inrfmt.InrLoader
    inrfmt.InrFormatError, inrfmt.InrUsageError, inrfmt.InrInterrupted

Names resolve lazily, so `import inrfmt.format` (numpy only) does not import torch.
"""
from .errors import InrFormatError, InrInterrupted, InrUsageError

__version__ = "0.1.0"

_LAZY = {
    "open": ("data", "open"),
    "InrDataset": ("data", "InrDataset"),
    "InrLoader": ("data", "InrLoader"),
    "convert": ("conversion", "convert"),
    "merge": ("shards", "merge"),
    "learn_prior": ("metalearn", "learn_prior"),
    "Prior": ("prior", "Prior"),
}

__all__ = ["open", "convert", "merge", "learn_prior", "Prior", "InrDataset", "InrLoader", "InrFormatError", "InrUsageError",
           "InrInterrupted", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'inrfmt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
