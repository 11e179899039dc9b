"""The work directory of a convert (OUT.work/): finished batches as small part files, the run's settings,
and the checks that decide whether a part can be reused by `--resume`.

A batch is finished when its info file (JSON: batch, image range, settings hash, PSNR sum, ...) and its
part file (a valid .inr) both exist and agree; anything else is redone. Every write is atomic.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import InrFormatError, InrUsageError
from .reader import InrFile

PART_PREFIX = "part-"
SETTINGS_NAME = "settings.json"


def json_text(obj) -> str:
    """Compact JSON with sorted keys: equal objects give equal text (and equal hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json_text(settings).encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_out(out: Path, overwrite: bool, what: str = "OUT") -> None:
    """OUT must be a writable file path: not a directory, not an existing file without `overwrite`."""
    if out.exists() and out.is_dir():
        raise InrUsageError(f"{what} {out} is a directory; give a file name such as {out / 'data.inr'}")
    if out.exists() and not overwrite:
        raise InrUsageError(f"{what} {out} exists (use --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise InrUsageError(f"cannot write {what} {out}: directory {parent} does not exist")
    if not parent.is_dir():
        raise InrUsageError(f"cannot write {what} {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InrUsageError(f"cannot write {what} {out}: directory {parent} is not writable")


def work_dir_for(out) -> Path:
    return Path(f"{os.fspath(out)}.work")


def read_settings(target: Path) -> tuple[dict, Path]:
    """(the settings record, its path) of the interrupted run writing `target`; InrUsageError if there is none."""
    path = work_dir_for(target) / SETTINGS_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InrUsageError(f"nothing to resume for {target}: {path} does not exist (give SRC and OUT to start "
                            f"a new convert)") from None
    except (OSError, ValueError) as e:
        raise InrUsageError(f"cannot resume: {path} is unreadable ({e}); use --overwrite to start over") from None
    if not isinstance(record, dict):
        raise InrUsageError(f"cannot resume: {path} is not a settings record; use --overwrite to start over")
    return record, path


class WorkDir:
    """OUT.work/ of the file `target`, created for a new run or checked for `--resume`."""

    def __init__(self, target: Path):
        self.target = target
        self.path = work_dir_for(target)

    @classmethod
    def open(cls, target: Path, settings: dict, *, overwrite: bool, resume: bool) -> "WorkDir":
        """A fresh work directory holding `settings`, or (resume) the existing one if it was made with the
        same settings. A leftover directory without `resume` is an error unless `overwrite`."""
        work = cls(target)
        path = work.path
        if path.exists():
            if not path.is_dir():
                raise InrUsageError(f"work directory {path} exists and is not a directory: remove it")
            if overwrite and not resume:
                shutil.rmtree(path)
            elif not resume:
                raise InrUsageError(f"work directory {path} exists (an interrupted convert?): use --resume to "
                                    f"continue it or --overwrite to start over")
        if path.exists():
            work._check_resumable(settings)
        else:
            try:
                path.mkdir()
                atomic_write_text(path / SETTINGS_NAME, json.dumps(settings, indent=1, sort_keys=True))
            except OSError as e:
                raise InrUsageError(f"cannot create work directory {path}: {e.strerror or e}") from None
        return work

    def _check_resumable(self, settings: dict) -> None:
        settings_file = self.path / SETTINGS_NAME
        try:
            old = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old is None:
            raise InrUsageError(f"cannot resume: {settings_file} is missing or unreadable "
                                f"(use --overwrite to start over)")
        if old != json.loads(json_text(settings)):
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:4])
            raise InrUsageError(f"cannot resume {self.path}: settings differ from the interrupted run ({shown}); "
                                f"rerun with the same options or use --overwrite to start over")
        # Temp files of writes cut off by a kill: parts in the work dir, the final merge beside OUT.
        target = self.target
        for stale in [*self.path.glob(".*.tmp"), *target.parent.glob(f".{glob.escape(target.name)}.*.tmp")]:
            stale.unlink(missing_ok=True)

    def part_file(self, b: int) -> Path:
        return self.path / f"{PART_PREFIX}{b:07d}.inr"

    @property
    def prior_file(self) -> Path:
        """Where `--prior learn` keeps the prior it learned, so a resume does not learn it again."""
        return self.path / "learned.prior"

    def holds_work(self) -> bool:
        """Whether anything but the settings record is saved here."""
        return any(p.name != SETTINGS_NAME for p in self.path.iterdir())

    def info_file(self, b: int) -> Path:
        return self.path / f"{PART_PREFIX}{b:07d}.json"

    def write_info(self, b: int, info: dict) -> None:
        """Written before the part file: a part without an info file is redone, and so is an info file
        without its part."""
        atomic_write_text(self.info_file(b), json_text(info))

    def valid_part(self, b: int, run_hash: str, start: int, stop: int) -> dict | None:
        """The info dict of a finished, valid part for batch b (images [start, stop)), else None."""
        info_path, path = self.info_file(b), self.part_file(b)
        if not (info_path.is_file() and path.is_file()):
            return None
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            if (info.get("settings_hash") != run_hash or info.get("batch") != b
                    or info.get("start") != start or info.get("stop") != stop):
                return None
            with InrFile(path) as f:
                f.verify()
                if f.num_images != info.get("num_images"):
                    return None
            return info
        except (OSError, ValueError, InrFormatError):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
