"""The convert pipeline: usage errors, bad input, kill -9 + resume, shards + merge, torchrun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inrfmt.workdir as workdir_module
from inrfmt.conversion import convert
from inrfmt.shards import merge, part_path
from inrfmt.workdir import work_dir_for
from inrfmt.errors import InrUsageError
from inrfmt.reader import InrFile
from tests import reference_convert
from tests.badfiles import make_bad_input_folder

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
# Subprocesses run single-threaded and so does this module: CPU results are then bitwise comparable.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_folder(root: Path, n: int, size=(10, 10)) -> Path:
    """n real images (bundled Fashion-MNIST sample, resized) in two class folders."""
    files = sorted(SAMPLE.glob("*/*.png"))[::11][:n]
    for i, f in enumerate(files):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").resize(size[::-1], Image.Resampling.LANCZOS).save(cls / f"{i:03d}.png")
    return root


def cli(*args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "inrfmt", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=120, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"inrfmt {args} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


# ------------------------------------------------------------------------------------------ usage errors


def test_usage_errors(tmp_path):
    src = tiny_folder(tmp_path / "src", 2)
    out = tmp_path / "o.inr"
    cases = [
        (dict(src=src, out=out, preset="nope"), "nope"),
        (dict(src=tmp_path / "missing", out=out), "missing"),
        (dict(src=src, out=tmp_path / "nodir" / "o.inr"), "nodir"),
        (dict(src=src, out=src / "a" / "001.png" / "o.inr"), "001.png"),
        (dict(src=src, out=out, shard="2/2"), "2/2"),
        (dict(src=src, out=out, shard="x/3"), "x/3"),
        (dict(src=src, out=out, shard="0/0"), "0/0"),
        (dict(src=src, out=out, on_error="ignore"), "ignore"),
        (dict(src=src, out=out, quant=4), "4"),
        (dict(src=src, out=out, steps=0), "0"),
        (dict(src=src, out=out, batch_size=-1), "-1"),
        (dict(src=src, out=out, jitter=1.5), "1.5"),
        (dict(src=src, out=out, jitter=-0.25), "-0.25"),
        (dict(src=src, out=out, jitter="half"), "half"),
    ]
    for kwargs, named in cases:
        with pytest.raises(InrUsageError, match=None) as info:
            convert(kwargs.pop("src"), kwargs.pop("out"), progress=False, device="cpu", **kwargs)
        msg = str(info.value)
        assert named in msg and "\n" not in msg, msg
    assert not out.exists()
    convert(src, out, steps=2, progress=False, device="cpu")
    with pytest.raises(InrUsageError, match="exists"):
        convert(src, out, steps=2, progress=False, device="cpu")
    convert(src, out, steps=2, progress=False, device="cpu", overwrite=True)
    # a leftover work dir needs --resume or --overwrite; resume with other settings is refused
    out2 = tmp_path / "p.inr"
    work_dir_for(out2).mkdir()
    (work_dir_for(out2) / "settings.json").write_text(json.dumps({"seed": 99}))
    with pytest.raises(InrUsageError, match="--resume"):
        convert(src, out2, steps=2, progress=False, device="cpu")
    with pytest.raises(InrUsageError, match="settings differ"):
        convert(src, out2, steps=2, progress=False, device="cpu", resume=True)
    convert(src, out2, steps=2, progress=False, device="cpu", overwrite=True)
    assert out2.exists() and not work_dir_for(out2).exists()


def test_cli_usage_error_is_one_line(tmp_path):
    proc = cli("convert", tmp_path / "missing", tmp_path / "o.inr", "--shard", "5/2", check=False)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_resume_needs_the_same_jitter(tmp_path, monkeypatch):
    # The jitter changes the fit, so it is one of the settings a resumed run must match.
    src = tiny_folder(tmp_path / "src", 3)
    out = tmp_path / "o.inr"
    common = dict(steps=3, batch_size=1, progress=False, device="cpu", reproducible=True)
    with monkeypatch.context() as m:  # keep the work directory, as a run killed after its last batch would
        m.setattr(workdir_module.shutil, "rmtree", lambda *a, **k: None)
        convert(src, out, jitter=0.25, **common)
    first = out.read_bytes()
    out.unlink()
    with pytest.raises(InrUsageError, match=r"settings differ.*jitter: 0\.25 -> 1\.0"):
        convert(src, out, jitter=1.0, resume=True, **common)
    summary = convert(src, out, jitter=0.25, resume=True, **common)
    assert summary["batches_reused"] == 3 and summary["batches_encoded"] == 0
    assert out.read_bytes() == first and not work_dir_for(out).exists()
    with InrFile(out) as f:
        assert f.metadata["jitter"] == "0.25"


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_skip_and_fail(tmp_path, capsys):
    made = make_bad_input_folder(tmp_path / "src")
    keys = sorted(f"bad/{p.name}" for p in made.values())
    out = tmp_path / "o.inr"
    summary = convert(tmp_path / "src", out, steps=3, progress=False, device="cpu", batch_size=4)
    err = capsys.readouterr().err
    assert summary["num_images"] == 3 and summary["skipped"] == len(keys)
    with InrFile(out) as f:
        skipped = json.loads(f.metadata["skipped"])
        assert f.num_images == 3 and list(f.index["label"]) == [1, 1, 1]
    assert sorted(s["key"] for s in skipped) == keys
    assert all(s["reason"] for s in skipped)
    for k in keys:
        assert k in err, f"no warning names {k}"

    out2 = tmp_path / "fail.inr"
    with pytest.raises(InrUsageError) as info:
        convert(tmp_path / "src", out2, steps=3, progress=False, device="cpu", on_error="fail")
    assert keys[0] in str(info.value)
    assert not out2.exists() and not work_dir_for(out2).exists()  # the bad class sorts first: nothing finished
    proc = cli("convert", tmp_path / "src", tmp_path / "fail2.inr", "--steps", "3", "--on-error", "fail", "--quiet",
               "--device", "cpu", check=False)
    assert proc.returncode == 2 and keys[0] in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "fail2.inr").exists()


# ------------------------------------------------------------------------------------------ kill -9 + resume


def test_kill_and_resume_is_byte_identical(tmp_path):
    src = tiny_folder(tmp_path / "src", 10)
    args = ["--steps", "100", "--batch-size", "1", "--seed", "5", "--reproducible", "--quiet", "--device", "cpu"]
    out = tmp_path / "resumed.inr"
    work = work_dir_for(out)
    proc = subprocess.Popen([sys.executable, "-m", "inrfmt", "convert", str(src), str(out), *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(work.glob("part-*.inr"))) < 2:
            assert proc.poll() is None, f"convert ended before it could be killed: {proc.stderr.read()[-1000:]}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = sorted(work.glob("part-*.inr"))
    assert 2 <= len(finished) < 10 and not out.exists()
    # One finished part is damaged: it must be redone, the others reused.
    damaged = finished[0]
    damaged.write_bytes(damaged.read_bytes()[:-40])
    stale = tmp_path / ".resumed.inr.x1y2.tmp"  # what a kill during the final merge leaves
    stale.write_bytes(b"partial")
    with pytest.raises(InrUsageError, match="--resume"):
        convert(src, out, steps=100, batch_size=1, seed=5, reproducible=True, progress=False, device="cpu")
    summary = convert(src, out, steps=100, batch_size=1, seed=5, reproducible=True, progress=False, device="cpu",
                      resume=True)
    assert summary["batches_reused"] == len(finished) - 1
    assert summary["batches_encoded"] == 10 - summary["batches_reused"]
    assert not work.exists() and not stale.exists()
    straight = tmp_path / "straight.inr"
    convert(src, straight, steps=100, batch_size=1, seed=5, reproducible=True, progress=False, device="cpu")
    assert out.read_bytes() == straight.read_bytes()


# ------------------------------------------------------------------------------------------ shards


def _index_and_weights(path):
    with InrFile(path) as f:
        wb = f.read_images(np.arange(f.num_images))
        return f.index.copy(), wb, dict(f.metadata)


def test_shards_and_merge_equal_single_run(tmp_path):
    src = tiny_folder(tmp_path / "src", 5)
    common = dict(steps=10, batch_size=2, seed=1, progress=False, device="cpu", reproducible=True)
    single = tmp_path / "single.inr"
    convert(src, single, **common)
    parts = [tmp_path / f"p{k}.inr" for k in range(3)]
    for k, p in enumerate(parts):
        summary = convert(src, p, shard=f"{k}/3", **common)
        assert summary["shard"] == f"{k}/3"
    sizes = [InrFile(p).num_images for p in parts]
    assert sizes == [2, 2, 1]  # 3 batches of 2 over 3 shards: contiguous whole batches, in order
    merged = tmp_path / "merged.inr"
    with pytest.raises(InrUsageError, match="missing shard"):
        merge(merged, [parts[0], parts[2]])
    merge(merged, [parts[2], parts[0], parts[1]])  # given out of order: put in shard order
    a, wa, _ = _index_and_weights(single)
    b, wb, meta = _index_and_weights(merged)
    assert np.array_equal(a, b)
    for x, y in zip(wa.arrays(), wb.arrays()):
        assert (x is None and y is None) or np.array_equal(x, y)
    assert meta["shard"] == "merged 3/3" and json.loads(meta["skipped"]) == []
    # More shards than batches: the first shard is empty, the merge still equals the single run.
    one_batch = dict(common, batch_size=8)
    convert(src, tmp_path / "single8.inr", **one_batch)
    for k in range(2):
        convert(src, tmp_path / f"q{k}.inr", shard=f"{k}/2", **one_batch)
    assert InrFile(tmp_path / "q0.inr").num_images == 0
    merge(tmp_path / "merged8.inr", [tmp_path / "q0.inr", tmp_path / "q1.inr"])
    single8, merged8 = (_index_and_weights(tmp_path / name)[0] for name in ("single8.inr", "merged8.inr"))
    assert np.array_equal(single8, merged8)


def test_torchrun_two_ranks(tmp_path):
    src = tiny_folder(tmp_path / "src", 6)
    out = tmp_path / "tr.inr"
    args = ["convert", str(src), str(out), "--steps", "10", "--batch-size", "2", "--seed", "2", "--quiet",
            "--reproducible", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "inrfmt", *args], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists()
    assert not any(Path(part_path(out, r, 2)).exists() for r in range(2))
    single = tmp_path / "single.inr"
    convert(src, single, steps=10, batch_size=2, seed=2, progress=False, device="cpu", reproducible=True)
    a, wa, _ = _index_and_weights(single)
    b, wb, meta = _index_and_weights(out)
    fields = ["label", "height", "width", "prune_ratio"]
    assert np.array_equal(a[fields], b[fields])
    np.testing.assert_allclose(a["psnr"], b["psnr"], atol=1e-4)
    np.testing.assert_allclose(wa.first_w, wb.first_w, atol=1e-5)
    assert meta["shard"] == "merged 2/2"


# ------------------------------------------------------------------------------------- pinned bytes


@pytest.mark.parametrize("case", sorted(reference_convert.CASES))
def test_convert_bytes_match_the_reference(tmp_path, case):
    # The bytes of tests/data/<case>.inr were written before the encoder and the writer were reorganised;
    # the same inputs, seed and settings must give the same file. Float results depend on the torch build
    # and the CPU, so on another machine the tables and metadata must still match exactly and the weights
    # to float tolerance.
    src = reference_convert.source_folder(tmp_path / "src")
    got = reference_convert.convert_case(case, src, tmp_path / f"{case}.inr")
    want = reference_convert.DATA / f"{case}.inr"
    recorded = json.loads((reference_convert.DATA / "reference_environment.json").read_text())
    if recorded == reference_convert.environment():
        assert got.read_bytes() == want.read_bytes()
        return
    with InrFile(got) as a, InrFile(want) as b:
        assert (a.header["architecture"], a.hidden_dtype, a.float_dtype, a.has_masks, a.num_chunks, a.classes,
                a.metadata) == (b.header["architecture"], b.hidden_dtype, b.float_dtype, b.has_masks,
                                b.num_chunks, b.classes, b.metadata)
        for field in ("label", "height", "width"):
            assert a.index[field].tolist() == b.index[field].tolist()
        np.testing.assert_allclose(a.index["psnr"], b.index["psnr"], atol=0.05)
        wa, wb = a.read_images(np.arange(a.num_images)), b.read_images(np.arange(b.num_images))
        for x, y in zip(wa.arrays()[:2] + wa.arrays()[4:7], wb.arrays()[:2] + wb.arrays()[4:7]):
            np.testing.assert_allclose(x, y, atol=2e-3)


def test_public_names_survive_submodule_imports():
    # `import inrfmt.conversion` binds the submodule on the package; the public function names must not be
    # shadowed by a module of the same name.
    import importlib
    import pkgutil

    import inrfmt

    for info in pkgutil.iter_modules(inrfmt.__path__):
        if info.name != "__main__":
            importlib.import_module(f"inrfmt.{info.name}")
    assert callable(inrfmt.convert) and callable(inrfmt.merge) and callable(inrfmt.open)
    assert inrfmt.convert.__module__ == "inrfmt.conversion"
