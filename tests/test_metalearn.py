"""Learning a prior (inrfmt.metalearn), fitting from one, and convert's --prior."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import inrfmt
from inrfmt.conversion import convert, schedule_json
from inrfmt.errors import InrUsageError
from inrfmt.fit import fit_images, fit_psnr, prepare_batch, prior_params
from inrfmt.metalearn import MAX_STEP_SCALE, MIN_IMAGES, learn_prior
from inrfmt.presets import PRESETS, Preset, Round
from inrfmt.prior import PRIOR_PREAMBLE, Prior
from inrfmt.reader import InrFile
from inrfmt.siren import SirenParams
from inrfmt.spec import Architecture
from tests.test_convert import cli, tiny_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A small net and a short prior round, so meta-learning runs in seconds.
TINY = Preset(name="tiny", arch=Architecture(sine_layers=2, width=10), rounds=(Round(steps=40, lr=5e-3),),
              prune_rule=None, description="test", prior_rounds=(Round(steps=20, lr=5e-3),), prior_steps=12)


def smooth_images(n: int, size: int = 12, seed: int = 0) -> list[np.ndarray]:
    """A family of related images (slanted colour waves): what a prior can learn from."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.5, 2.0, 3)
        base = np.sin(a * x + b * y + c)
        im = np.stack([base, 0.6 * base + 0.2, np.cos(b * x) * 0.5], -1)
        out.append(np.clip(im * 90 + 128, 0, 255).astype(np.uint8))
    return out


def image_folder(root: Path, n: int, size: int = 4) -> Path:
    """n small images (smooth_images) as PNGs in two class folders."""
    from PIL import Image

    for i, im in enumerate(smooth_images(n, size=size)):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(cls / f"{i:03d}.png")
    return root


def test_meta_learning_speeds_up_fitting():
    prior = learn_prior(smooth_images(48), TINY, meta_batch=8, seed=0, device="cpu", progress=False)
    held_out = smooth_images(12, seed=1)
    short = (Round(steps=15, lr=5e-3),)
    from_random = fit_images(held_out, TINY.arch, short, seed=0).psnr.mean()
    from_prior = fit_images(held_out, TINY.arch, short, seed=0, prior=prior).psnr.mean()
    assert from_prior > from_random + 3.0, (from_prior, from_random)
    # and the prior itself already fits these images better than a random network
    batch = prepare_batch(held_out, "cpu")
    at_start = fit_psnr(prior_params(prior, len(held_out), "cpu"), batch, TINY.arch).mean()
    assert at_start > 10.0


def test_learning_is_deterministic_from_the_seed():
    images = smooth_images(MIN_IMAGES)
    a = learn_prior(images, TINY, steps=3, meta_batch=4, seed=5, device="cpu", progress=False)
    b = learn_prior(images, TINY, steps=3, meta_batch=4, seed=5, device="cpu", progress=False)
    c = learn_prior(images, TINY, steps=3, meta_batch=4, seed=6, device="cpu", progress=False)
    assert a.to_bytes() == b.to_bytes() and a.to_bytes() != c.to_bytes()
    assert a.arch == TINY.arch and a.lr_scale is None and a.name == "tiny"
    # A preset whose priors tie the output channels gets them tied; the other values are the same.
    tied = learn_prior(images, replace(TINY, prior_tied_outputs=True), steps=3, meta_batch=4, seed=5, device="cpu",
                       progress=False)
    assert tied.outputs_tied and not a.outputs_tied and tied.to_bytes() == a.with_tied_outputs().to_bytes()


def test_progress_line_shows_the_inner_psnr(capsys):
    learn_prior(smooth_images(MIN_IMAGES), TINY, steps=2, meta_batch=4, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "prior tiny: step 2/2 (4 images x 20 inner steps), inner PSNR" in err and " dB" in err


def test_learn_prior_bad_input():
    with pytest.raises(InrUsageError, match=f"at least {MIN_IMAGES} images, got 3"):
        learn_prior(smooth_images(3), TINY, progress=False)
    with pytest.raises(InrUsageError, match=r"image 1 must be a uint8 \[h, w, 3\] array"):
        learn_prior([smooth_images(1)[0], np.zeros((4, 4), np.uint8)] * 10, TINY, progress=False)
    with pytest.raises(InrUsageError, match="steps must be an integer >= 1"):
        learn_prior(smooth_images(MIN_IMAGES), TINY, steps=0, progress=False)


def test_lr_scale_multiplies_every_step():
    images = smooth_images(4)
    prior = learn_prior(smooth_images(MIN_IMAGES), TINY, steps=2, meta_batch=4, device="cpu", progress=False)
    frozen = Prior(prior.arch, prior.theta0, {k: np.full(v.shape, 1e-6, np.float32) for k, v in prior.theta0.items()})
    result = fit_images(images, TINY.arch, (Round(steps=10, lr=1e-2),), prior=frozen, hidden_dtype="float32")
    start = fit_psnr(prior_params(prior, 4, "cpu"), prepare_batch(images, "cpu"), TINY.arch).numpy()
    np.testing.assert_allclose(result.fit_psnr, start, atol=1e-3)  # a scale of 1e-6 leaves the prior in place
    moved = fit_images(images, TINY.arch, (Round(steps=10, lr=1e-2),), prior=prior, hidden_dtype="float32")
    assert np.abs(moved.fit_psnr - start).max() > 0.1


def test_learned_step_sizes_grow_where_the_inner_rate_is_too_small():
    # The values stay those of `start` (every parameter frozen): only the step sizes are learned. The inner
    # fit's rate is far too small, so every step size should grow, and fitting with them should gain.
    start = learn_prior(smooth_images(MIN_IMAGES), TINY, steps=4, meta_batch=4, device="cpu", progress=False)
    slow = Round(steps=20, lr=2e-4)
    learned = learn_prior(smooth_images(32), TINY, steps=30, meta_batch=8, device="cpu", progress=False,
                          inner=slow, start=start, freeze=SirenParams._fields, step_sizes=True)
    assert learned.theta0.keys() == start.theta0.keys()
    assert all(np.array_equal(learned.theta0[k], start.theta0[k]) for k in start.theta0)
    scales = np.concatenate([v.ravel() for v in learned.lr_scale.values()])
    assert np.median(scales) > 1.2 and scales.max() <= MAX_STEP_SCALE and scales.min() >= 1 / MAX_STEP_SCALE
    held_out = smooth_images(12, seed=1)
    plain = fit_images(held_out, TINY.arch, (slow,), prior=start, hidden_dtype="float32").fit_psnr.mean()
    scaled = fit_images(held_out, TINY.arch, (slow,), prior=learned, hidden_dtype="float32").fit_psnr.mean()
    assert scaled > plain + 0.2, (scaled, plain)
    again = learn_prior(smooth_images(32), TINY, steps=30, meta_batch=8, device="cpu", progress=False,
                        inner=slow, start=start, freeze=SirenParams._fields, step_sizes=True)
    assert again == learned  # deterministic, step sizes included
    # a learned prior's step sizes are where the next run starts from
    more = learn_prior(smooth_images(32), TINY, steps=1, meta_batch=8, device="cpu", progress=False, inner=slow,
                       start=learned, freeze=SirenParams._fields)
    assert all(np.array_equal(more.lr_scale[k], learned.lr_scale[k]) for k in learned.lr_scale)
    with pytest.raises(InrUsageError, match="start: it is for a 2x10 network"):
        learn_prior(smooth_images(MIN_IMAGES), PRESETS["fast"], steps=1, start=start, progress=False)


def test_every_preset_ships_a_prior_for_its_network():
    for name, preset in PRESETS.items():
        prior = Prior.builtin(name)
        # learned step sizes paid for the 10-layer nets only (measured), so only their priors carry them
        assert prior.arch == preset.arch and (prior.lr_scale is not None) == (preset.arch.sine_layers == 10), name
        assert all(np.isfinite(v).all() for v in prior.theta0.values())
        assert prior.outputs_tied == preset.prior_tied_outputs, name  # as tools/train_priors.py writes them
    assert PRESETS["fast"].prior == "builtin"
    assert all(p.prior == "none" for n, p in PRESETS.items() if n.startswith("rapid-inr-"))
    with pytest.raises(InrUsageError, match="no built-in prior for preset 'nope'"):
        Prior.builtin("nope")


def _psnr_of_decode(path: Path, src: Path) -> np.ndarray:
    """PSNR of an independent decode (inrfmt.open on the CPU, native size) against the source pixels."""
    from PIL import Image

    with InrFile(path) as f:
        keys = f.keys
    with inrfmt.open(path, device="cpu") as ds:
        out = []
        for i, key in enumerate(keys):
            target = np.asarray(Image.open(src / key).convert("RGB"), np.float64) / 255.0
            decoded = ds.decode(torch.tensor([i]))[0].permute(1, 2, 0).double().numpy()
            out.append(-10 * np.log10(np.mean((np.clip(decoded, 0, 1) - target) ** 2)))
    return np.array(out)


def test_convert_from_the_builtin_prior_stores_it_and_its_psnr_is_reproduced(tmp_path):
    src = tiny_folder(tmp_path / "src", 6, size=(10, 10))
    out = tmp_path / "b.inr"
    summary = convert(src, out, steps=20, progress=False, device="cpu", reproducible=True)
    assert summary["prior"] == "builtin" and summary["prior_seconds"] == 0.0
    with InrFile(out) as f:
        assert f.prior == Prior.builtin("fast") and f.metadata["prior"] == "builtin"
        assert f.version == (1, 1)
        psnr = np.asarray(f.index["psnr"], np.float64)
    np.testing.assert_allclose(_psnr_of_decode(out, src), psnr, atol=0.05)
    none = tmp_path / "n.inr"
    convert(src, none, steps=20, progress=False, device="cpu", reproducible=True, prior="none")
    with InrFile(none) as f:
        assert f.prior is None and "prior" not in f.metadata
    # a prior file given by path is the same as the built-in one it holds
    path = tmp_path / "fast.prior"
    Prior.builtin("fast").save(path)
    same = tmp_path / "p.inr"
    convert(src, same, steps=20, progress=False, device="cpu", reproducible=True, prior=path)
    with InrFile(same) as f, InrFile(out) as g:
        np.testing.assert_array_equal(f.index["psnr"], g.index["psnr"])
        assert f.metadata["prior"] == str(path.resolve())


def test_prior_learn_learns_once_and_resume_reuses_it(tmp_path, monkeypatch):
    import inrfmt.metalearn as metalearn

    src = image_folder(tmp_path / "src", 100)
    bad = src / "b" / "zz_bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "l.inr"
    options = dict(steps=6, batch_size=40, progress=False, device="cpu", reproducible=True, prior="learn")
    with pytest.raises(InrUsageError, match="bad image"):  # stops in the last batch, after learning
        convert(src, out, on_error="fail", **options)
    work = out.with_name(out.name + ".work")
    learned = Prior.load(work / "learned.prior")
    assert learned.name.startswith("learned on 100 images")
    bad.write_bytes((src / "b" / "000.png").read_bytes())  # fixed: a readable image under the same name
    calls = []
    real = metalearn.learn_prior
    monkeypatch.setattr(metalearn, "learn_prior", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = convert(src, out, resume=True, **options)
    assert calls == [] and summary["batches_reused"] >= 1 and summary["prior_seconds"] == 0.0
    with InrFile(out) as f:
        assert f.prior == learned and f.num_images == 101 and f.metadata["prior"] == "learn"
    (src / "b" / "002.png").unlink()  # two straight runs learn the same prior and write the same bytes
    first, second = tmp_path / "s1.inr", tmp_path / "s2.inr"
    summary = convert(src, first, **options)
    assert calls == [1] and summary["prior_seconds"] > 0
    convert(src, second, **options)
    assert first.read_bytes() == second.read_bytes()


def test_prior_learn_on_too_few_images_is_one_line(tmp_path):
    src = image_folder(tmp_path / "src", 20)
    proc = cli("convert", src, tmp_path / "x.inr", "--prior", "learn", "--device", "cpu", "--quiet", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--prior learn: SRC has 20 images" in proc.stderr and "needs at least" in proc.stderr
    assert not (tmp_path / "x.inr.work").exists()
    # enough items to pay for learning, too few of them readable: stopped before any fit, nothing left
    src = image_folder(tmp_path / "s2", 100)
    for path in sorted(src.glob("*/*.png"))[10:]:
        path.write_bytes(b"not an image")
    proc = cli("convert", src, tmp_path / "y.inr", "--prior", "learn", "--device", "cpu", "--quiet", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "readable images in the sample" in proc.stderr
    assert not (tmp_path / "y.inr.work").exists() and not (tmp_path / "y.inr").exists()


def test_bad_prior_files_are_one_line(tmp_path):
    src = tiny_folder(tmp_path / "src", 2, size=(4, 4))
    other = tmp_path / "other.prior"
    Prior.builtin("rapid-inr-cifar10").save(other)  # 3x15, fast is 3x16
    proc = cli("convert", src, tmp_path / "x.inr", "--preset", "fast", "--prior", other, "--device", "cpu", "--quiet",
               check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "is for a 3x15 network" in proc.stderr and "fast uses 3x16" in proc.stderr
    data = bytearray(Prior.builtin("fast").to_bytes())
    future = tmp_path / "future.prior"
    future.write_bytes(bytes(data[:8]) + (2).to_bytes(2, "little") + bytes(data[10:]))
    truncated = tmp_path / "cut.prior"
    truncated.write_bytes(bytes(data[:PRIOR_PREAMBLE + 40]))
    for path, message in ((future, "prior format version 2.0"), (truncated, "checksum mismatch")):
        proc = cli("convert", src, tmp_path / "x.inr", "--prior", path, "--device", "cpu", "--quiet", check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    proc = cli("convert", src, tmp_path / "x.inr", "--prior", tmp_path / "missing.prior", "--quiet", check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    assert not list(tmp_path.glob("x.inr*"))


def test_prior_command_writes_a_prior_that_convert_uses(tmp_path):
    src = image_folder(tmp_path / "src", 20, size=6)
    out = tmp_path / "mine.prior"
    proc = cli("prior", src, out, "--preset", "fast", "--steps", "2", "--images", "16", "--device", "cpu",
               "--step-sizes")
    assert "wrote" in proc.stderr and "prior fast: step 2/2" in proc.stderr
    prior = Prior.load(out)
    assert prior.arch == PRESETS["fast"].arch and "src" in prior.name and prior.lr_scale is not None
    proc = cli("prior", src, out, "--steps", "1", check=False)
    assert proc.returncode == 2 and "exists" in proc.stderr
    proc = cli("prior", src, tmp_path / "y.prior", "--images", "3", check=False)
    assert proc.returncode == 2 and "at least 16 images, got 3" in proc.stderr
    cli("convert", src, tmp_path / "m.inr", "--prior", out, "--steps", "5", "--device", "cpu", "--quiet")
    with InrFile(tmp_path / "m.inr") as f:
        assert f.prior == prior
    proc = cli("info", tmp_path / "m.inr")
    assert "fitted from" in proc.stdout and "src" in proc.stdout and "with learned step sizes" in proc.stdout
    assert json.loads(cli("info", tmp_path / "m.inr", "--json").stdout)["prior"]["lr_scale"] is True


def test_merge_refuses_parts_fitted_from_different_priors(tmp_path):
    src = tiny_folder(tmp_path / "src", 4, size=(4, 4))
    convert(src, tmp_path / "p0.inr", steps=3, shard="0/2", progress=False, device="cpu")
    convert(src, tmp_path / "p1.inr", steps=3, shard="1/2", progress=False, device="cpu", prior="none")
    proc = cli("merge", tmp_path / "all.inr", tmp_path / "p0.inr", tmp_path / "p1.inr", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "share one prior" in proc.stderr
    assert "prior: builtin vs none" in proc.stderr


def test_steps_scale_the_prior_schedule():
    preset = PRESETS["rapid-inr-cifar10"]
    assert preset.schedule(prior=True) == preset.prior_rounds
    scaled = preset.schedule(275, prior=True)
    assert [r.steps for r in scaled] == [275, 100]
    assert [(r.lr, r.beta2, r.continues) for r in scaled] == [(r.lr, r.beta2, r.continues) for r in preset.prior_rounds]
    assert preset.schedule() == preset.rounds
    # beta2 is recorded where it is not torch's default, so the paper schedules' records are unchanged.
    assert [r.get("beta2") for r in schedule_json(preset.prior_rounds)] == [0.9, 0.9]
    assert all("beta2" not in r for r in schedule_json(preset.rounds))
