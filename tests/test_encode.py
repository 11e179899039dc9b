"""The batched SIREN fit: it learns, images do not interact, masks hold, mixed sizes and orientation are
right, and the PSNR a file records is what an independent decode of the file gives."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inrfmt import siren
from inrfmt.conversion import convert
from inrfmt.fit import (DrawKeys, continuous_targets, fit_images, fit_psnr, grey_images, jitter_offsets,
                        per_image_loss, prepare_batch, psnr_against, train_round)
from inrfmt.siren import train_forward
from inrfmt.reader import InrFile
from inrfmt.spec import Architecture
from inrfmt.presets import CIFAR10_RULE, Round, get_preset
from inrfmt.quantize import dynamic_ratio, mask_ratio, prune_masks

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
ARCH = Architecture(sine_layers=3, width=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sample_images(n, size=None):
    """Real images from the bundled sample (Fashion-MNIST PNGs), optionally resized."""
    files = sorted(SAMPLE.glob("*/*.png"))[::7][:n]
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        if size is not None:
            im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        out.append(np.asarray(im))
    return out


def photo_crop(h, w):
    """A real colour photograph (bundled), resized to h x w."""
    f = sorted((ROOT / "data" / "photos").glob("*/*.jpg"))[0]
    return np.asarray(Image.open(f).convert("RGB").resize((w, h), Image.Resampling.LANCZOS))


def init(n, seed=0):
    p = siren.init_params(ARCH, n, generator=torch.Generator().manual_seed(seed))
    return siren.SirenParams(*(t.requires_grad_(True) for t in p))


def test_train_forward_matches_siren_forward_and_its_gradients():
    coords = torch.rand(3, 50, 2) * 2 - 1
    target = torch.rand(3, 50, 3)
    grads = []
    for fn in (siren.forward, train_forward):
        p = init(3, seed=9)
        out = fn(p, coords, ARCH)
        (out - target).pow(2).sum().backward()
        grads.append((out.detach(), [t.grad for t in p]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()))


def test_batched_fit_improves_psnr():
    images = sample_images(6, (16, 16))
    batch = prepare_batch(images, "cpu")
    params = init(6)
    before = fit_psnr(params, batch, ARCH)
    train_round(params, batch, ARCH, steps=60, lr=5e-3)
    after = fit_psnr(params, batch, ARCH)
    assert torch.all(after > before + 5), (before, after)
    assert float(after.mean()) > 22


def test_round_beta2_is_adams_second_moment_decay():
    # train_round is Adam with betas (0.9, beta2) on the summed per-image MSE with a cosine rate: replayed by
    # hand, it gives the same weights; beta2 changes them after the first step.
    images = sample_images(2, (10, 10))
    batch = prepare_batch(images, "cpu")
    group = batch.groups[0]
    steps, lr = 3, 5e-3
    results = {}
    for beta2 in (0.9, 0.999):
        fitted = init(2, seed=3)
        train_round(fitted, batch, ARCH, steps=steps, lr=lr, beta2=beta2)
        by_hand = init(2, seed=3)
        opt = torch.optim.Adam(list(by_hand), lr=lr, betas=(0.9, beta2))
        for k in range(steps):
            opt.param_groups[0]["lr"] = 0.5 * lr * (1 + math.cos(math.pi * k / steps))
            opt.zero_grad()
            per_image_loss(by_hand, group.coords, group.targets, ARCH).sum().backward()
            opt.step()
        for a, b in zip(fitted, by_hand):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
        results[beta2] = fitted
    assert not torch.allclose(results[0.9].hidden_w, results[0.999].hidden_w, rtol=0, atol=1e-6)


def test_images_in_a_batch_are_independent():
    # Same bits alone or in a batch of three (two of another size), with jitter and pixel subsampling.
    images = sample_images(3, (12, 12))
    images[2] = photo_crop(10, 14)
    params = init(3, seed=4)
    alone = siren.SirenParams(*(t.detach()[1:2].clone().requires_grad_(True) for t in params))
    options = dict(steps=25, lr=5e-3, jitter=0.5, pixel_fraction=0.5)
    train_round(params, prepare_batch(images, "cpu"), ARCH, keys=DrawKeys.of(7, [10, 11, 12], 3, "cpu"), **options)
    train_round(alone, prepare_batch(images[1:2], "cpu"), ARCH, keys=DrawKeys.of(7, [11], 1, "cpu"), **options)
    for a, b in zip(params, alone):
        assert torch.equal(a.detach()[1:2], b.detach())


def test_mask_holds_through_fine_tune_and_ratio_follows_rule():
    images = sample_images(5, (14, 14))
    batch = prepare_batch(images, "cpu")
    params = init(5, seed=1)
    train_round(params, batch, ARCH, steps=40, lr=5e-3)
    psnr = fit_psnr(params, batch, ARCH)
    ratios = dynamic_ratio(psnr, CIFAR10_RULE)
    keep = prune_masks(params.hidden_w, ratios)
    total = ARCH.hidden_layers * ARCH.width ** 2
    expected = torch.tensor([round(float(r) * total) / total for r in ratios], dtype=torch.float64)
    torch.testing.assert_close(mask_ratio(keep).double(), expected, rtol=0, atol=1e-7)
    train_round(params, batch, ARCH, steps=20, lr=1e-3, keep=keep)
    assert torch.all(params.hidden_w.detach()[~keep] == 0)
    # the kept weights did train
    assert float(fit_psnr(params, batch, ARCH).mean()) > float(psnr.mean()) - 1.0


def test_fit_images_writes_consistent_result_and_is_deterministic():
    images = sample_images(4, (12, 12))
    rounds = (Round(30, 5e-3), Round(10, 1e-3, "fixed", 0.2), Round(10, 1e-3, "dynamic"))
    rule = CIFAR10_RULE
    r1 = fit_images(images, ARCH, rounds, prune_rule=rule, hidden_dtype="int8", seed=3, image_ids=[7, 8, 9, 10])
    r2 = fit_images(images, ARCH, rounds, prune_rule=rule, hidden_dtype="int8", seed=3, image_ids=[7, 8, 9, 10])
    r3 = fit_images(images, ARCH, rounds, prune_rule=rule, hidden_dtype="int8", seed=3, image_ids=[8, 9, 10, 11])
    assert np.array_equal(r1.weights.hidden_w, r2.weights.hidden_w) and np.array_equal(r1.psnr, r2.psnr)
    assert not np.array_equal(r1.weights.first_w, r3.weights.first_w)
    wb = r1.weights
    assert wb.hidden_w.dtype == np.int8 and wb.mask is not None
    assert np.all(wb.hidden_w[~wb.mask] == 0)
    fixed = round(0.2 * wb.mask[0].size) / wb.mask[0].size
    assert np.all(r1.prune_ratio >= fixed - 1e-7)  # the fixed 20% round, then the rule (>= 0 for CIFAR)
    np.testing.assert_allclose(r1.prune_ratio, 1 - wb.mask.reshape(4, -1).mean(1), atol=1e-7)
    assert r1.img_steps == 4 * 50


def test_non_square_and_mixed_sizes_keep_orientation():
    # Left half red / right half blue, plus a dark top band, on a 10x24 (wide) and a 24x10 (tall) image,
    # fitted together with a square photo in ONE batch (the padded mixed-size path).
    def pattern(h, w):
        im = np.zeros((h, w, 3), np.uint8)
        im[:, : w // 2, 0] = 230
        im[:, w // 2:, 2] = 230
        im[: h // 4] //= 4
        return im

    images = [pattern(10, 24), pattern(24, 10), photo_crop(12, 12)]
    batch = prepare_batch(images, "cpu")
    assert [(g.height, g.width, g.members.tolist()) for g in batch.groups] == [(10, 24, [0]), (24, 10, [1]),
                                                                               (12, 12, [2])]
    params = init(3, seed=2)
    train_round(params, batch, ARCH, steps=150, lr=5e-3)
    for i, im in enumerate(images[:2]):
        h, w = im.shape[:2]
        sub = siren.SirenParams(*(t.detach()[i:i + 1] for t in params))
        out = siren.to_pixels(siren.forward(sub, siren.pixel_grid(h, w), ARCH))[0].reshape(h, w, 3).numpy()
        assert out[h // 2:, : w // 2 - 1, 0].mean() > 0.7 and out[h // 2:, : w // 2 - 1, 2].mean() < 0.2
        assert out[h // 2:, w // 2 + 1:, 2].mean() > 0.7 and out[h // 2:, w // 2 + 1:, 0].mean() < 0.2
        assert out[: h // 4 - 1].max() < 0.5  # the dark band is on top, not the bottom
    psnr = fit_psnr(params, batch, ARCH)
    direct = psnr_against(siren.SirenParams(*(t.detach() for t in params)), images, ARCH)
    torch.testing.assert_close(psnr, direct, rtol=0, atol=1e-3)  # each image's MSE over its own pixels


def test_pixel_subsampling_fits():
    images = sample_images(4, (16, 16))
    batch = prepare_batch(images, "cpu")
    params = init(4, seed=5)
    before = fit_psnr(params, batch, ARCH)
    train_round(params, batch, ARCH, steps=80, lr=5e-3, pixel_fraction=0.25, keys=DrawKeys.of(0, None, 4, "cpu"))
    assert torch.all(fit_psnr(params, batch, ARCH) > before + 5)


def test_cpu_fit_keeps_freed_memory_on_glibc():
    import platform

    from inrfmt import device as devices

    images = sample_images(2, (8, 8))
    train_round(init(2, seed=1), prepare_batch(images, "cpu"), ARCH, steps=1, lr=1e-3)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert devices._HEAP_KEPT and devices.keep_freed_memory()  # set by the CPU fit, once per process
    else:
        assert devices.keep_freed_memory() is False


def _independent_psnr(path, originals):
    """Decode every image of the file with siren.forward on the dequantized weights at its original size."""
    with InrFile(path) as f:
        wb = f.read_images(np.arange(f.num_images))
        index = f.index.copy()
        arch = f.arch
    params = siren.SirenParams(*(torch.from_numpy(np.asarray(a, np.float32)) for a in (
        wb.first_w, wb.first_b, wb.dequantized_hidden(), wb.hidden_b, wb.last_w, wb.last_b)))
    out = []
    for i, im in enumerate(originals):
        h, w = int(index["height"][i]), int(index["width"][i])
        assert (h, w) == im.shape[:2]
        sub = siren.SirenParams(*(t[i:i + 1] for t in params))
        pred = siren.to_pixels(siren.forward(sub, siren.pixel_grid(h, w), arch))[0].reshape(h, w, 3)
        out.append(float(siren.psnr(pred, torch.tensor(im).float() / 255, dim=(0, 1, 2))))
    return np.array(out), index


@pytest.mark.parametrize("quant,prune,max_side,jitter,float_dtype", [
    (8, True, None, None, "float32"), (16, False, 12, 0.0, "float32"), (32, True, None, 1.0, "float32"),
    (8, True, None, None, "float16")])
def test_convert_psnr_reproduced_by_independent_decode(tmp_path, quant, prune, max_side, jitter, float_dtype):
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    originals = [photo_crop(20, 14), sample_images(1, (16, 16))[0], sample_images(2, (16, 16))[1]]
    for i, im in enumerate(originals):
        Image.fromarray(im).save(src / f"img{i}.png")
    out = tmp_path / "o.inr"
    summary = convert(tmp_path / "src", out, preset="fast", steps=40, quant=quant, prune=prune,
                      max_side=max_side, jitter=jitter, progress=False, reproducible=True,
                      float_dtype=float_dtype)
    assert summary["num_images"] == 3 and summary["skipped"] == 0
    psnr, index = _independent_psnr(out, originals)
    np.testing.assert_allclose(index["psnr"], psnr, atol=0.05)
    assert psnr.mean() > (18 if max_side is None else 10)  # upsampled from a 12-pixel fit: blurrier
    with InrFile(out) as f:
        assert f.hidden_dtype == {8: "int8", 16: "float16", 32: "float32"}[quant]
        assert f.float_dtype == float_dtype
        assert f.has_masks == prune
        meta = f.metadata
        assert meta["quant"] == str(quant) and meta["max_side"] == ("none" if max_side is None else str(max_side))
        # the index PSNR stays a pixel-centre measure whatever the jitter; the jitter used is recorded
        assert float(meta["jitter"]) == (get_preset("fast").jitter if jitter is None else jitter)
        assert json.loads(meta["skipped"]) == []
        assert "encode_seconds" not in meta  # reproducible
    assert list(index["height"]) == [20, 16, 16] and list(index["width"]) == [14, 16, 16]
    if not prune:
        assert np.all(index["prune_ratio"] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_convert_matches_cpu_decode_and_is_deterministic(tmp_path):
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    originals = [photo_crop(24, 16), sample_images(1, (20, 20))[0]]
    for i, im in enumerate(originals):
        Image.fromarray(im).save(src / f"img{i}.png")
    outs = [tmp_path / "a.inr", tmp_path / "b.inr"]
    for out in outs:  # TF32 + pixel subsampling + fused Adam: the GPU path
        convert(tmp_path / "src", out, preset="fast", steps=60, device="cuda", pixel_fraction=0.5, tf32=True,
                progress=False, reproducible=True)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    psnr, index = _independent_psnr(outs[0], originals)
    np.testing.assert_allclose(index["psnr"], psnr, atol=0.05)
    assert psnr.mean() > 15


# ------------------------------------------------------------------------------------ continuous fitting


def test_continuous_targets_are_bilinear_with_border():
    for im in (photo_crop(6, 9), sample_images(1, (4, 5))[0], photo_crop(7, 3)):
        h, w = im.shape[:2]
        group = prepare_batch([im], "cpu").groups[0]
        # At pixel centres the target is exactly the pixel; half-way between two centres, their mean.
        centres = continuous_targets(group, siren.pixel_grid(h, w)[None])
        torch.testing.assert_close(centres[0], group.targets[0], rtol=0, atol=1e-5)
        between = torch.tensor([[[-1 + 2.0 / w, -1 + 1.0 / h]]])  # between pixels (0, 0) and (0, 1)
        mid = continuous_targets(group, between)[0, 0]
        torch.testing.assert_close(mid, group.targets[0, :2].mean(0), rtol=0, atol=1e-5)
        corner = continuous_targets(group, torch.tensor([[[-1.0, -1.0], [1.0, 1.0]]]))[0]  # border: edge pixel
        torch.testing.assert_close(corner, group.targets[0, [0, h * w - 1]], rtol=0, atol=1e-5)


def test_jitter_offsets_stay_in_their_cell_and_move_the_given_fraction():
    keys = DrawKeys.of(5, [3, 4], 2, "cpu").step(0)
    for fraction in (0.3, 1.0):
        a = jitter_offsets(keys, 2560, fraction)
        assert torch.equal(a, jitter_offsets(keys, 2560, fraction))  # a pure function of the keys
        assert not torch.equal(a[0], a[1]) and torch.equal(a[1:], jitter_offsets(keys[1:], 2560, fraction))
        assert torch.all((a >= -0.5) & (a < 0.5))
        moved = (a != 0).any(dim=2).float().mean()
        assert abs(float(moved) - fraction) < 0.05, (fraction, moved)
        if fraction == 1.0:  # uniform over the cell: reaches near its edges, centred on the pixel centre
            assert float(a.abs().max()) > 0.45 and abs(float(a.mean())) < 0.05


def test_grey_images_are_fitted_with_tied_channels_and_decode_grey():
    grey = sample_images(2, (12, 12))  # Fashion-MNIST: R = G = B
    colour = photo_crop(12, 12)
    assert grey_images(grey + [colour]).tolist() == [True, True, False]
    result = fit_images(grey + [colour], ARCH, (Round(30, 5e-3),), jitter=0.5, image_ids=[0, 1, 2])
    wb = result.weights
    for i in range(2):
        assert np.array_equal(wb.last_w[i, 0], wb.last_w[i, 1]) and np.array_equal(wb.last_w[i, 0], wb.last_w[i, 2])
        assert wb.last_b[i, 0] == wb.last_b[i, 1] == wb.last_b[i, 2]
    assert not np.array_equal(wb.last_w[2, 0], wb.last_w[2, 1])
    params = siren.SirenParams(*(torch.from_numpy(np.asarray(a, np.float32)) for a in (
        wb.first_w, wb.first_b, wb.dequantized_hidden(), wb.hidden_b, wb.last_w, wb.last_b)))
    decoded = siren.to_pixels(siren.forward(params, siren.pixel_grid(48, 48), ARCH))  # 4x: between centres too
    assert torch.equal(decoded[:2, :, 0], decoded[:2, :, 1]) and torch.equal(decoded[:2, :, 1], decoded[:2, :, 2])


def test_jittered_fit_is_deterministic_per_seed():
    images = sample_images(3, (10, 10))
    rounds = (Round(20, 5e-3), Round(10, 1e-3, "dynamic"))
    runs = [fit_images(images, ARCH, rounds, prune_rule=CIFAR10_RULE, seed=2, image_ids=[b, b + 1, b + 2],
                       jitter=j, pixel_fraction=f) for b, j, f in [(0, 0.5, 1.0), (0, 0.5, 1.0), (5, 0.5, 1.0),
                                                                   (0, 0.0, 1.0), (0, 1.0, 0.5), (0, 1.0, 0.5)]]
    same = lambda r1, r2: all(np.array_equal(x, y) for x, y in zip(r1.weights.arrays(), r2.weights.arrays())
                              if x is not None)
    assert same(runs[0], runs[1]) and np.array_equal(runs[0].psnr, runs[1].psnr)
    assert same(runs[4], runs[5])
    assert not same(runs[0], runs[2])  # other images' ids: other init and other jitter
    assert not same(runs[0], runs[3])  # jitter changes the fit


def _upscaled_quality(params, images, scale):
    """Per image: (total variation of the `scale`x decode / that of a bicubic upscale, PSNR vs bicubic)."""
    def tv(x):
        return float((x[:, 1:] - x[:, :-1]).abs().mean() + (x[1:] - x[:-1]).abs().mean())

    out = []
    with torch.no_grad():
        for i, im in enumerate(images):
            h, w = im.shape[0] * scale, im.shape[1] * scale
            sub = siren.SirenParams(*(t.detach()[i:i + 1] for t in params))
            decoded = siren.to_pixels(siren.forward(sub, siren.pixel_grid(h, w), ARCH))[0].reshape(h, w, 3)
            bicubic = torch.from_numpy(np.asarray(Image.fromarray(im).resize((w, h), Image.Resampling.BICUBIC),
                                                  np.float32) / 255.0)
            out.append((tv(decoded) / tv(bicubic), float(siren.psnr(decoded, bicubic, dim=(0, 1, 2)))))
    return np.array(out)


def test_jitter_removes_oscillation_between_pixel_centres():
    # Fitted at pixel centres only, the SIREN matches them (> 45 dB here) but rings in between: its 4x
    # decode has 1.9-4x the total variation of a bicubic upscale and is 14-23 dB from it (measured). With
    # jitter the 4x decode is about as smooth as bicubic (ratio 0.9-1.2) and 30+ dB from it.
    images = sample_images(3, (20, 20))
    quality = {}
    for jitter in (0.0, 1.0):
        params = init(3, seed=0)
        train_round(params, prepare_batch(images, "cpu"), ARCH, steps=300, lr=5e-3, jitter=jitter,
                    keys=DrawKeys.of(1, None, 3, "cpu"))
        quality[jitter] = _upscaled_quality(params, images, 4)
    plain, jittered = quality[0.0], quality[1.0]
    assert np.all(plain[:, 0] > 1.6), plain
    assert np.all(jittered[:, 0] < 1.3), jittered
    assert np.all(jittered[:, 1] > plain[:, 1] + 5), (plain, jittered)


def test_jitter_with_mixed_sizes_and_pixel_subsampling_fits():
    images = [photo_crop(10, 14), sample_images(1, (12, 8))[0]]
    batch = prepare_batch(images, "cpu")
    params = init(2, seed=6)
    before = fit_psnr(params, batch, ARCH)
    train_round(params, batch, ARCH, steps=120, lr=5e-3, jitter=0.5, pixel_fraction=0.5)
    assert torch.all(fit_psnr(params, batch, ARCH) > before + 5)
    with pytest.raises(ValueError, match="jitter"):
        train_round(params, batch, ARCH, steps=1, lr=1e-3, jitter=1.5)


def test_bench_upsample_tool_reports_each_jitter(capsys):
    spec = importlib.util.spec_from_file_location("bench_upsample", ROOT / "tools" / "bench_upsample.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--limit", "3", "--steps", "8", "--jitter", "0,1", "--scales", "2", "--no-prune"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["jitter"] for r in rows] == [0.0, 1.0] and all(r["images"] == 3 for r in rows)
    for r in rows:
        assert abs(r["psnr_native"] - r["psnr_index_mean"]) < 0.05  # its decode is the file's own PSNR
        assert 5 < r["psnr_bicubic_2x"] < 60 and r["tv_ratio_2x"] > 0 and r["prune_ratio_mean"] == 0
