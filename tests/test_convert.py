"""The convert pipeline: usage errors, bad input, kill -9 + resume, shards + merge, torchrun."""
import io
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    # The command line's default preset (auto: `small`, format 2 for these 10x10 images) and the API's "auto".
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
        convert(src, out, preset="auto", steps=100, batch_size=1, seed=5, reproducible=True, progress=False,
                device="cpu")
    summary = convert(src, out, preset="auto", steps=100, batch_size=1, seed=5, reproducible=True, progress=False,
                      device="cpu", resume=True)
    assert summary["batches_reused"] == len(finished) - 1
    assert summary["batches_encoded"] == 10 - summary["batches_reused"]
    assert not work.exists() and not stale.exists()
    straight = tmp_path / "straight.inr"
    convert(src, straight, preset="small", steps=100, batch_size=1, seed=5, reproducible=True, progress=False,
            device="cpu")
    assert out.read_bytes() == straight.read_bytes()
    with InrFile(out) as f:
        assert f.coded and f.metadata["preset"] == "small"


# ------------------------------------------------------------------------------------------ shards


def _index_and_weights(path):
    with InrFile(path) as f:
        wb = f.read_images(np.arange(f.num_images))
        return f.index.copy(), wb, dict(f.metadata)


def test_shards_balance_by_image_and_merge_to_the_single_run_bytes(tmp_path):
    # Shard K of N gets floor(M/N) or ceil(M/N) of the M images (not whole batches: with batches of 3,
    # 7 images over 2 shards used to give 3 + 4 only by luck, and 5 images of batch 8 gave 0 + 5), and
    # the merged file is the single run's, byte for byte, whatever N.
    src = tiny_folder(tmp_path / "src", 7, size=(8, 8))
    common = dict(steps=5, batch_size=3, seed=1, progress=False, device="cpu", reproducible=True)
    single = tmp_path / "single.inr"
    convert(src, single, **common)
    for n in (2, 3, 8):
        parts = [tmp_path / f"n{n}-p{k}.inr" for k in range(n)]
        for k, p in enumerate(parts):
            summary = convert(src, p, shard=f"{k}/{n}", **common)
            assert summary["shard"] == f"{k}/{n}" and summary["num_images"] == (k + 1) * 7 // n - k * 7 // n
        merged = tmp_path / f"merged{n}.inr"
        if n == 3:
            with pytest.raises(InrUsageError, match="missing shard"):
                merge(merged, [parts[0], parts[2]])
        merge(merged, list(reversed(parts)))  # given out of order: put in shard order
        assert merged.read_bytes() == single.read_bytes(), f"{n} shards"
    with InrFile(single) as f:
        assert json.loads(f.metadata["skipped"]) == [] and "shard" not in f.metadata
        assert f.keys == sorted(f.keys) and len(f.keys) == 7 and f.keys[0] == "a/001.png"


def test_an_image_is_fitted_the_same_in_any_batch(tmp_path):
    # Mixed sizes, other batch sizes and other companions: each image's weights and PSNR are the same bits.
    src = tiny_folder(tmp_path / "src", 6, size=(9, 7))
    for name in ("b/004.png", "a/001.png"):
        Image.open(src / name).resize((6, 10)).save(src / name)
    files = {}
    for batch_size in (1, 4, 6):
        out = tmp_path / f"b{batch_size}.inr"
        convert(src, out, steps=6, batch_size=batch_size, seed=4, progress=False, device="cpu", reproducible=True,
                pixel_fraction=0.6)
        files[batch_size] = _index_and_weights(out)
    (a, wa, _), (b, wb, _), (c, wc, _) = files.values()
    assert np.array_equal(a, b) and np.array_equal(a, c)
    for x, y, z in zip(wa.arrays(), wb.arrays(), wc.arrays()):
        assert (x is None and y is None and z is None) or (np.array_equal(x, y) and np.array_equal(x, z))


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
    single = tmp_path / "single.inr"  # the command line's default preset is auto (here: small, format 2)
    convert(src, single, preset="auto", steps=10, batch_size=2, seed=2, progress=False, device="cpu",
            reproducible=True)
    assert out.read_bytes() == single.read_bytes()  # two ranks write what one process writes


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


# ------------------------------------------------------------------------------- interrupts and progress


def _stop_after_parts(args, out, parts, sig):
    """Run `inrfmt convert ARGS`, send `sig` once `parts` batches are saved; (returncode, stderr)."""
    work = work_dir_for(out)
    # As from a terminal: a shell that starts jobs in the background (`cmd &`, nohup) makes them ignore
    # SIGINT, and the child would inherit that.
    proc = subprocess.Popen([sys.executable, "-m", "inrfmt", "convert", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(list(work.glob("part-*.inr"))) < parts:
            assert proc.poll() is None, f"convert ended before it could be stopped: {proc.stderr.read()[-1000:]}"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def test_ctrl_c_and_sigterm_say_what_is_saved_and_resume_takes_the_saved_settings(tmp_path):
    src = tiny_folder(tmp_path / "src", 12, size=(16, 16))
    out = tmp_path / "run.inr"
    options = ["--preset", "fast", "--steps", "100", "--batch-size", "1", "--seed", "3", "--reproducible", "--quiet",
               "--device", "cpu"]
    saved = 0
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        args = [src, out, *options] if sig == signal.SIGTERM else ["--resume", out, "--quiet"]
        rc, err = _stop_after_parts(args, out, saved + 1, sig)  # one more batch than the last time
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == code and len(lines) == 1, (rc, err)
        now = int(lines[0].split("interrupted: ")[1].split(" of ")[0])
        assert saved < now < 12 and f"of 12 batches are saved in {work_dir_for(out)}" in lines[0]
        assert lines[0].endswith(f"resume with: inrfmt convert --resume {out}") and "Traceback" not in err
        saved = now
    # An option that contradicts the saved settings is named; SRC and the rest may be left out.
    proc = cli("convert", "--resume", out, "--steps", "61", check=False)
    assert proc.returncode == 2 and "--steps 61 conflicts" in proc.stderr and "steps = 100" in proc.stderr
    proc = cli("convert", tmp_path / "elsewhere", out, "--resume", check=False)
    assert proc.returncode == 2 and "is not the source of the interrupted run" in proc.stderr
    cli("convert", "--resume", out, "--seed", "3", "--device", "cpu", "--quiet")  # agreeing options are fine
    straight = tmp_path / "straight.inr"
    convert(src, straight, steps=100, batch_size=1, seed=3, reproducible=True, progress=False, device="cpu")
    assert out.read_bytes() == straight.read_bytes()
    proc = cli("convert", "--resume", tmp_path / "nothing.inr", check=False)
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr


class _Stream(io.StringIO):
    def __init__(self, terminal):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_counts_images_and_the_steps_of_the_current_batch(tmp_path, monkeypatch, terminal):
    import inrfmt.progress as progress_module

    src = tiny_folder(tmp_path / "src", 5, size=(6, 6))
    stream = _Stream(terminal)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(progress_module, "LOG_SECONDS", 0.0)
    monkeypatch.setattr(progress_module, "REDRAW_SECONDS", 0.0)
    convert(src, tmp_path / "p.inr", steps=4, batch_size=3, progress=True, device="cpu", prune=False)
    text = stream.getvalue()
    lines = [line for line in text.replace("\r\x1b[K", "\n").splitlines() if line.strip()]
    assert "convert fast: 0/5 images, batch 1/2 (3 images): step 0/4" in lines  # before the first step ends
    assert any(line.startswith("convert fast: 0/5 images, batch 1/2 (3 images): step 1/4, ") for line in lines)
    assert any(line.startswith("convert fast: 3/5 images, batch 2/2 (2 images): step 4/4") for line in lines)
    assert any("ETA" in line and "PSNR" in line and "steps/s" in line for line in lines)
    if terminal:  # one line redrawn in place
        assert "\r" in text and text.endswith("\n")
    else:  # plain lines for a log: no carriage returns
        assert "\r" not in text and "\x1b" not in text


def test_convert_a_webdataset_shard_skips_and_names_a_bad_sample(tmp_path):
    import tarfile

    images = sorted(SAMPLE.glob("*/*.png"))[:3]
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tf:
        for i, path in enumerate(images):
            data = path.read_bytes() if i != 1 else b"\x89PNG\r\n\x1a\n not really"
            for name, payload in ((f"{i:06d}.png", data), (f"{i:06d}.cls", str(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    out = tmp_path / "wds.inr"
    summary = convert(str(tmp_path / "train-{000000..000000}.tar"), out, steps=2, progress=False, device="cpu")
    assert summary["num_images"] == 2 and summary["skipped"] == 1
    with InrFile(out) as f:
        assert f.keys == ["train-000000.tar/000000.png", "train-000000.tar/000002.png"]
        assert f.index["label"].tolist() == [0, 2] and f.classes == ["0", "1", "2"]
        assert [s["key"] for s in json.loads(f.metadata["skipped"])] == ["train-000000.tar/000001.png"]


# ------------------------------------------------------------------------------- coded presets (format 2)


def _decoded_psnr(path: Path, src: Path) -> np.ndarray:
    """PSNR of the weights the reader decodes from the file, against the source pixels (no fit code)."""
    from inrfmt import siren

    with InrFile(path) as f:
        wb, keys = f.read_images(np.arange(f.num_images)), f.keys
    out = []
    for i, key in enumerate(keys):
        target = np.asarray(Image.open(src / key).convert("RGB"), np.float64) / 255.0
        h, w = target.shape[:2]
        params = siren.SirenParams(*(torch.from_numpy(np.ascontiguousarray(a[i:i + 1])) for a in
                                     (wb.first_w, wb.first_b, wb.dequantized_hidden(), wb.hidden_b, wb.last_w,
                                      wb.last_b)))
        with InrFile(path) as f:
            arch = f.arch
        pred = siren.to_pixels(siren.forward(params, siren.pixel_grid(h, w), arch))[0].double().numpy()
        out.append(-10 * np.log10(np.mean((pred - target.reshape(-1, 3)) ** 2)))
    return np.array(out)


def test_a_coded_preset_writes_format_2_with_the_stored_models_psnr(tmp_path):
    from inrfmt.presets import PRESETS
    from inrfmt.prior import Prior

    src = tiny_folder(tmp_path / "src", 5, size=(12, 10))
    out = tmp_path / "c.inr"
    summary = convert(src, out, preset="small", steps=30, batch_size=2, bits="hidden_w=5", seed=1, progress=False,
                      device="cpu", reproducible=True)
    assert summary["preset"] == "small" and summary["num_images"] == 5 and "preset_reason" not in summary
    with InrFile(out) as f:
        assert f.version == (2, 0) and f.coded and f.num_chunks == 1
        assert f.grid == PRESETS["small"].grid(5) and f.prior == Prior.builtin("small")
        assert json.loads(f.metadata["code_bits"])["hidden_w"] == 5 and "quant" not in f.metadata
        assert f.metadata["prune"] == "no" and "prune_rule" not in f.metadata
        schedule = json.loads(f.metadata["schedule"])
        assert [(r["steps"], r.get("qat", False), r.get("continues", False)) for r in schedule] == \
            [(30, False, False), (20, True, True)]
        psnr = np.asarray(f.index["psnr"], np.float64)
        assert (f.index["height"] == 12).all() and (f.index["width"] == 10).all()
    np.testing.assert_allclose(_decoded_psnr(out, src), psnr, atol=0.02)
    assert psnr.mean() > 20


def test_coded_resume_shards_and_merge_give_the_single_runs_bytes(tmp_path, monkeypatch):
    src = tiny_folder(tmp_path / "src", 7, size=(8, 8))
    common = dict(preset="small", steps=6, batch_size=3, seed=1, progress=False, device="cpu", reproducible=True)
    single = tmp_path / "single.inr"
    convert(src, single, **common)
    for n in (2, 3):
        parts = [tmp_path / f"n{n}-p{k}.inr" for k in range(n)]
        for k, p in enumerate(parts):
            convert(src, p, shard=f"{k}/{n}", **common)
        merge(tmp_path / f"m{n}.inr", list(reversed(parts)))
        assert (tmp_path / f"m{n}.inr").read_bytes() == single.read_bytes(), f"{n} shards"
    # resume: the saved parts are reused; other code widths are other settings
    out = tmp_path / "r.inr"
    with monkeypatch.context() as m:
        m.setattr(workdir_module.shutil, "rmtree", lambda *a, **k: None)
        convert(src, out, **common)
    out.unlink()
    with pytest.raises(InrUsageError, match=r"settings differ.*code_bits"):
        convert(src, out, resume=True, bits=5, **common)
    summary = convert(src, out, resume=True, **common)
    assert summary["batches_reused"] == 3 and out.read_bytes() == single.read_bytes()
    with pytest.raises(InrUsageError, match="different settings"):
        other = tmp_path / "other.inr"
        convert(src, other, shard="1/2", bits=6, **common)
        merge(tmp_path / "mixed.inr", [tmp_path / "n2-p0.inr", other])


def test_an_empty_coded_shard_is_a_part_file_and_merges(tmp_path):
    src = tiny_folder(tmp_path / "src", 3, size=(8, 8))
    common = dict(preset="small", steps=4, seed=1, progress=False, device="cpu", reproducible=True)
    single = tmp_path / "single.inr"
    convert(src, single, **common)
    parts = [tmp_path / f"p{k}.inr" for k in range(4)]  # 4 shards of 3 images: shard 0 is empty
    for k, p in enumerate(parts):
        convert(src, p, shard=f"{k}/4", **common)
    with InrFile(parts[0]) as f:
        assert f.num_images == 0 and f.coded
    merge(tmp_path / "m.inr", parts)
    assert (tmp_path / "m.inr").read_bytes() == single.read_bytes()


def test_preset_auto_picks_by_the_longest_side_and_resume_keeps_it(tmp_path, capsys):
    import inrfmt.cli as cli_module
    from inrfmt.conversion import auto_preset, saved_options
    from inrfmt.sources import open_source

    small_src = tiny_folder(tmp_path / "s", 3, size=(64, 20))
    big_src = tiny_folder(tmp_path / "b", 3, size=(30, 65))
    assert auto_preset(open_source(small_src)) == ("small", "the longest side in a sample of 3 of 3 images is "
                                                            "64 px (<= 64)")
    assert auto_preset(open_source(big_src))[0] == "large"
    assert auto_preset(open_source(big_src), max_side=64) == (
        "small", "the longest side after --max-side 64 in a sample of 3 of 3 images is 64 px (<= 64)")
    out = tmp_path / "big.inr"
    summary = convert(big_src, out, preset="auto", steps=2, batch_size=3, progress=True, device="cpu",
                      reproducible=True)
    assert summary["preset"] == "large" and "65 px (> 64)" in summary["preset_reason"]
    assert "inrfmt: --preset auto: large, the longest side in a sample of 3 of 3 images is 65 px (> 64)" in \
        capsys.readouterr().err
    with InrFile(out) as f:
        assert f.coded and f.arch.width == 32 and f.metadata["preset"] == "large"
    # the record keeps the preset auto picked: --resume gives it back, and --preset auto agrees with it
    with pytest.MonkeyPatch.context() as m:
        m.setattr(workdir_module.shutil, "rmtree", lambda *a, **k: None)
        convert(small_src, tmp_path / "r.inr", preset="auto", steps=2, progress=False, device="cpu")
    assert saved_options(tmp_path / "r.inr")["preset"] == "small"
    proc = cli("convert", "--resume", tmp_path / "r.inr", "--preset", "large", check=False)
    assert proc.returncode == 2 and "--preset large conflicts" in proc.stderr and "preset = 'small'" in proc.stderr
    proc = cli("convert", "--resume", tmp_path / "r.inr", "--bits", "5", check=False)
    assert proc.returncode == 2 and "--bits 5 conflicts" in proc.stderr
    (tmp_path / "r.inr").unlink()
    cli("convert", "--resume", tmp_path / "r.inr", "--preset", "auto", "--bits", "4", "--quiet")
    assert (tmp_path / "r.inr").exists() and not work_dir_for(tmp_path / "r.inr").exists()
    assert cli_module  # the resume checks live in the command line module


def test_coding_options_of_the_other_format_are_refused(tmp_path):
    src = tiny_folder(tmp_path / "src", 2)
    out = tmp_path / "o.inr"
    for kwargs, named in ((dict(preset="fast", bits=5), "preset fast writes format 1"),
                          (dict(preset="small", quant=16), "quant 16 applies to format-1 presets"),
                          (dict(preset="small", float_dtype="float16"), "float_dtype float16"),
                          (dict(preset="auto", quant=8), "picked by --preset auto"),
                          (dict(preset="small", bits="hidden_w=x"), "bad bits"),
                          (dict(preset="small", bits=0), "bad bits 0")):
        with pytest.raises(InrUsageError) as info:
            convert(src, out, progress=False, device="cpu", **kwargs)
        assert named in str(info.value) and "\n" not in str(info.value), str(info.value)
    empty = tmp_path / "empty" / "a"
    empty.mkdir(parents=True)
    (empty / "x.png").write_bytes(b"not an image")
    with pytest.raises(InrUsageError, match="--preset auto: none of the 1 item"):
        convert(empty.parent, out, preset="auto", progress=False, device="cpu")
    assert not out.exists() and not work_dir_for(out).exists()
