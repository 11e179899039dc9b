"""The library's exception types. Kept import-free so every module (the numpy-only reader and writer included) can use them."""


class InrFormatError(ValueError):
    """A file is not a valid .inr file (or is a newer major version). The message names file, field and value."""


class InrUsageError(ValueError):
    """A user mistake: a bad argument, a missing source, an output that exists. The CLI exits 2 on it."""


class InrInterrupted(KeyboardInterrupt):
    """A convert stopped by Ctrl-C (or SIGTERM under the CLI). The message says how many batches are saved in
    the work directory and the command that resumes the run."""
