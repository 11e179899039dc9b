"""Coordinate-space augmentation (inrfmt.augment): geometry against direct decodes, torchvision's crop
statistics, fills, determinism, and no host sync while drawing."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from inrfmt import augment as A
from inrfmt import siren
from inrfmt.bank import TensorBank
from inrfmt.decode import decode_torch
from inrfmt.decode_args import resized_size
from inrfmt.errors import InrUsageError
from inrfmt.spec import Architecture

ARCH = Architecture(sine_layers=3, width=12)
ATOL = 2e-4  # same network at (nearly) the same float coordinates



def identity_theta(batch: int) -> torch.Tensor:
    return torch.eye(2, 3).expand(batch, 2, 3)

def make_bank(sizes, seed=0):
    params = siren.init_params(ARCH, len(sizes), generator=torch.Generator().manual_seed(seed))
    return TensorBank.from_params(params, ARCH, heights=[h for h, _ in sizes], widths=[w for _, w in sizes])


def plan_for(pipeline, bank, idx, seed=0, native_size=None):
    idx = torch.as_tensor(idx)
    return pipeline(bank.heights[idx], bank.widths[idx], generator=torch.Generator().manual_seed(seed),
                    native_size=native_size)


def run(pipeline, bank, idx, seed=0, native_size=None):
    plan = plan_for(pipeline, bank, idx, seed, native_size)
    return plan, plan.finish(decode_torch(bank, idx, plan.size, plan.theta))


def crop_boxes(plan, heights, widths):
    """(top, left, crop_h, crop_w) in source pixels, read back from theta (axis-aligned maps)."""
    sx, tx, sy, ty = plan.theta[:, 0, 0], plan.theta[:, 0, 2], plan.theta[:, 1, 1], plan.theta[:, 1, 2]
    crop_w, crop_h = sx.abs() * widths, sy.abs() * heights
    left = ((tx + 1) * widths - crop_w) / 2
    top = ((ty + 1) * heights - crop_h) / 2
    return top, left, crop_h, crop_w


def test_random_resized_crop_at_full_scale_equals_plain_resize_decode():
    sizes = [(10, 16), (15, 24), (20, 32)]  # one aspect ratio, three native sizes
    bank = make_bank(sizes)
    rrc = A.RandomResizedCrop((12, 20), scale=(1.0, 1.0), ratio=(1.6, 1.6))
    plan, got = run(rrc, bank, [0, 1, 2])
    assert plan.size == (12, 20)
    torch.testing.assert_close(plan.theta, identity_theta(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, decode_torch(bank, [0, 1, 2], (12, 20)), atol=ATOL, rtol=0)


def test_flip_p1_is_the_flipped_decode_and_p0_the_decode():
    bank = make_bank([(9, 14)] * 4)
    plain = decode_torch(bank, range(4), (9, 14))
    _, flipped = run(A.RandomHorizontalFlip(p=1.0), bank, range(4), native_size=(9, 14))
    torch.testing.assert_close(flipped, torch.flip(plain, dims=[-1]), atol=ATOL, rtol=0)
    _, vflipped = run(A.RandomVerticalFlip(p=1.0), bank, range(4), native_size=(9, 14))
    torch.testing.assert_close(vflipped, torch.flip(plain, dims=[-2]), atol=ATOL, rtol=0)
    plan, same = run(A.RandomHorizontalFlip(p=0.0), bank, range(4), native_size=(9, 14))
    assert torch.equal(plan.theta, identity_theta(4))
    torch.testing.assert_close(same, plain, atol=0, rtol=0)


def test_flip_half_flips_about_half_and_each_image_is_either_way():
    bank = make_bank([(6, 6)] * 400)
    plan = plan_for(A.RandomHorizontalFlip(), bank, range(400), native_size=(6, 6))
    signs = plan.theta[:, 0, 0]
    assert set(signs.tolist()) <= {-1.0, 1.0}
    assert 150 < int((signs < 0).sum()) < 250


def torchvision_rrc_params(height, width, scale, ratio, rng):
    """torchvision.transforms.RandomResizedCrop.get_params, written out (torchvision is not a test dep)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("native,scale,ratio", [((40, 60), (0.08, 1.0), (3 / 4, 4 / 3)),
                                                ((48, 48), (0.3, 0.9), (0.5, 2.0))])
def test_random_resized_crop_statistics_match_torchvision(native, scale, ratio):
    n = 4000
    height, width = native
    heights = torch.full((n,), height, dtype=torch.int32)
    widths = torch.full((n,), width, dtype=torch.int32)
    plan = A.RandomResizedCrop(16, scale=scale, ratio=ratio)(heights, widths, generator=torch.Generator().manual_seed(3))
    top, left, crop_h, crop_w = crop_boxes(plan, heights.float(), widths.float())
    # integer crops inside the image
    for t in (top, left, crop_h, crop_w):
        torch.testing.assert_close(t, t.round(), atol=1e-3, rtol=0)
    assert (top >= -1e-3).all() and (left >= -1e-3).all()
    assert (top + crop_h <= height + 1e-3).all() and (left + crop_w <= width + 1e-3).all()
    # area and aspect within the bounds, allowing for torchvision's rounding of w and h
    frac_hi = (crop_w + 0.5) * (crop_h + 0.5) / (height * width)
    frac_lo = (crop_w - 0.5) * (crop_h - 0.5) / (height * width)
    assert (frac_hi >= scale[0]).all() and (frac_lo <= scale[1]).all()
    assert ((crop_w + 0.5) / (crop_h - 0.5) >= ratio[0]).all()
    assert ((crop_w - 0.5) / (crop_h + 0.5) <= ratio[1]).all()
    # the same distribution as torchvision's algorithm
    rng = random.Random(0)
    ref = torch.tensor([torchvision_rrc_params(height, width, scale, ratio, rng) for _ in range(n)], dtype=torch.float32)
    ours_frac = (crop_h * crop_w / (height * width))
    ref_frac = ref[:, 2] * ref[:, 3] / (height * width)
    assert abs(ours_frac.mean() - ref_frac.mean()) < 0.03
    assert abs(torch.log(crop_w / crop_h).mean() - torch.log(ref[:, 3] / ref[:, 2]).mean()) < 0.04
    centre_x = (left + crop_w / 2) / width
    ref_centre_x = (ref[:, 1] + ref[:, 3] / 2) / width
    assert abs(centre_x.mean() - ref_centre_x.mean()) < 0.02
    assert abs(centre_x.std() - ref_centre_x.std()) < 0.02


def test_random_resized_crop_falls_back_to_central_crop_like_torchvision():
    bank = make_bank([(4, 64), (64, 4)])
    plan = plan_for(A.RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0)), bank, [0, 1])
    top, left, crop_h, crop_w = crop_boxes(plan, bank.heights.float(), bank.widths.float())
    # 4x64: no square of the whole area fits -> h=4, w=round(4*1)=4 at ((4-4)//2, (64-4)//2)
    assert [top[0].item(), left[0].item(), crop_h[0].item(), crop_w[0].item()] == pytest.approx([0, 30, 4, 4])
    assert [top[1].item(), left[1].item(), crop_h[1].item(), crop_w[1].item()] == pytest.approx([30, 0, 4, 4])


def test_center_crop_equals_the_central_region_of_the_native_decode():
    bank = make_bank([(12, 16), (11, 15)])
    for i, (h, w) in enumerate([(12, 16), (11, 15)]):
        native = decode_torch(bank, [i], (h, w))
        _, got = run(A.CenterCrop((6, 8)), bank, [i], native_size=(h, w))
        top, left = int(round((h - 6) / 2)), int(round((w - 8) / 2))  # torchvision's offsets
        torch.testing.assert_close(got, native[:, :, top:top + 6, left:left + 8], atol=ATOL, rtol=0)


def test_center_crop_larger_than_the_image_pads_with_zero():
    bank = make_bank([(6, 8)])
    native = decode_torch(bank, [0], (6, 8))
    _, got = run(A.CenterCrop((10, 8)), bank, [0], native_size=(6, 8))
    expected = F.pad(native, (0, 0, 2, 2), value=0.0)  # torchvision: (10-6)//2 above, (10-6+1)//2 below
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_resize_shorter_side_keeps_aspect_and_is_a_plain_decode():
    bank = make_bank([(12, 16)])
    plan, got = run(A.Resize(8), bank, [0], native_size=(12, 16))
    assert plan.size == (8, int(8 * 16 / 12)) and plan.theta is None
    torch.testing.assert_close(got, decode_torch(bank, [0], plan.size), atol=0, rtol=0)
    plan, _ = run(A.Resize((5, 7)), bank, [0])
    assert plan.size == (5, 7)
    assert resized_size(12, 16, 8, max_size=9) == (int(9 * 8 / 10), 9)


def test_resize_then_center_crop_per_image_on_mixed_sizes():
    sizes = [(12, 16), (16, 12), (8, 8)]
    bank = make_bank(sizes)
    plan, got = run(A.Compose([A.Resize(8), A.CenterCrop(8)]), bank, [0, 1, 2])
    assert got.shape == (3, 3, 8, 8)
    for i, (h, w) in enumerate(sizes):
        rh, rw = resized_size(h, w, 8)
        resized = decode_torch(bank, [i], (rh, rw))
        top, left = int(round((rh - 8) / 2)), int(round((rw - 8) / 2))
        torch.testing.assert_close(got[i:i + 1], resized[:, :, top:top + 8, left:left + 8], atol=ATOL, rtol=0)


def test_output_size_depending_on_mixed_native_sizes_is_a_usage_error():
    bank = make_bank([(12, 16), (16, 12)])
    with pytest.raises(InrUsageError, match="pass size="):
        plan_for(A.Resize(8), bank, [0, 1])
    with pytest.raises(InrUsageError, match="pass size="):
        plan_for(A.RandomHorizontalFlip(), bank, [0, 1])


@pytest.mark.parametrize("transform,pad", [(A.RandomCrop(10, padding=3, fill=0.25), 3),
                                           (A.RandomTranslate(3, fill=0.25), 3)])
def test_pad_and_crop_equals_the_padded_native_decode(transform, pad):
    n = 64
    bank = make_bank([(10, 10)] * n)
    native = decode_torch(bank, range(n), (10, 10))
    plan, got = run(transform, bank, range(n), seed=1, native_size=(10, 10))
    top, left, _, _ = crop_boxes(plan, bank.heights.float(), bank.widths.float())
    padded = F.pad(native, (pad,) * 4, value=0.25)
    shifts = set()
    for b in range(n):
        t, l = int(round(top[b].item())), int(round(left[b].item()))
        assert -pad <= t <= pad and -pad <= l <= pad
        shifts.add((t, l))
        expected = padded[b, :, t + pad:t + pad + 10, l + pad:l + pad + 10]
        torch.testing.assert_close(got[b], expected, atol=ATOL, rtol=0)
    assert len(shifts) > 20  # 49 possible offsets, drawn uniformly


def test_random_crop_pad_if_needed_and_checks_like_torchvision():
    bank = make_bank([(6, 6)])
    plan, got = run(A.RandomCrop((6, 9), pad_if_needed=True), bank, [0], native_size=(6, 6))
    assert got.shape == (1, 3, 6, 9)
    # 3 columns missing: torchvision pads 3 on both sides and crops at a random offset in [0, 3]
    assert (got == 0).all(dim=(0, 1, 2)).sum() == 3
    with pytest.raises(InrUsageError, match="larger than the padded image"):
        plan_for(A.RandomCrop(8), bank, [0], native_size=(6, 6))
    with pytest.raises(InrUsageError, match="padding_mode='reflect'"):
        A.RandomCrop(6, padding=2, padding_mode="reflect")


def test_fill_after_a_crop_fills_outside_the_crop_not_outside_the_image():
    # Crop the central 4x4 of an 8x8 image, then translate by up to 2: the uncovered strip must be fill,
    # even though the source image exists there (torchvision pads the *cropped* image).
    bank = make_bank([(8, 8)] * 32)
    plan, got = run(A.Compose([A.CenterCrop(4), A.RandomTranslate(2, fill=(1.0, 0.0, 0.5))]), bank, range(32),
                    seed=2, native_size=(8, 8))
    native = decode_torch(bank, range(32), (8, 8))[:, :, 2:6, 2:6]
    padded = torch.cat([F.pad(native[:, c:c + 1], (2,) * 4, value=v) for c, v in enumerate((1.0, 0.0, 0.5))], 1)
    top, left, _, _ = crop_boxes(plan, bank.heights.float()[:32], bank.widths.float()[:32])
    for b in range(32):
        t, l = int(round(top[b].item())) - 2, int(round(left[b].item())) - 2  # offsets within the 4x4 crop
        torch.testing.assert_close(got[b], padded[b, :, t + 2:t + 6, l + 2:l + 6], atol=ATOL, rtol=0)


def test_normalize_runs_after_decode_and_must_come_last():
    bank = make_bank([(5, 5)] * 2)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    plan, got = run(A.Normalize(mean, std), bank, [0, 1], native_size=(5, 5))
    assert plan.theta is None
    plain = decode_torch(bank, [0, 1], (5, 5))
    expected = (plain - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(InrUsageError, match="before Normalize"):
        plan_for(A.Compose([A.Normalize(mean, std), A.RandomHorizontalFlip()]), bank, [0, 1], native_size=(5, 5))
    with pytest.raises(InrUsageError, match="std"):
        A.Normalize(mean, (1.0, 0.0, 1.0))


def test_draws_are_a_pure_function_of_the_generator_seed():
    bank = make_bank([(20, 30)] * 16)
    pipeline = A.Compose([A.RandomResizedCrop(12), A.RandomHorizontalFlip(), A.RandomCrop(12, padding=2)])
    a = plan_for(pipeline, bank, range(16), seed=5).theta
    b = plan_for(pipeline, bank, range(16), seed=5).theta
    c = plan_for(pipeline, bank, range(16), seed=6).theta
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments_are_usage_errors():
    for make in (lambda: A.RandomResizedCrop(0), lambda: A.RandomResizedCrop(8, scale=(0.9, 0.1)),
                 lambda: A.RandomResizedCrop(8, ratio=(2.0, 1.0)), lambda: A.RandomHorizontalFlip(1.5),
                 lambda: A.RandomCrop(8, padding=-1), lambda: A.RandomTranslate(-2), lambda: A.Resize("big"),
                 lambda: A.Compose([42])):
        with pytest.raises(InrUsageError):
            make()


def test_drawing_a_plan_never_reads_device_values_on_the_host(monkeypatch):
    bank = make_bank([(20, 30), (30, 20)] * 4)
    idx = torch.arange(8)
    heights, widths = bank.heights[idx], bank.widths[idx]
    pipeline = A.Compose([A.Resize(24), A.RandomResizedCrop(16), A.RandomHorizontalFlip(),
                          A.RandomCrop(16, padding=2), A.CenterCrop(14), A.Normalize(0.5, 0.2)])

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor while drawing augmentation")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    plan = pipeline(heights, widths, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert plan.size == (14, 14) and plan.theta.shape == (8, 2, 3)


# ------------------------------------------------------------------------------------------- pixel ops
def _view(batch, seed=0, keys=None):
    return A._View(torch.full((batch,), 8.0), torch.full((batch,), 8.0), (8, 8),
                   torch.Generator().manual_seed(seed), keys)


def _hue_reference(image: torch.Tensor, shift: float) -> torch.Tensor:
    """adjust_hue of one [3,H,W] image pixel by pixel with the standard library's colorsys."""
    import colorsys

    out = torch.empty_like(image)
    for y in range(image.shape[1]):
        for x in range(image.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*image[:, y, x].tolist())
            out[:, y, x] = torch.tensor(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v))
    return out


def _one_op_reference(image, op, f):
    grey = 0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    if op == 0:
        return (image * f).clamp(0, 1)
    if op == 1:
        return (f * image + (1 - f) * grey.mean()).clamp(0, 1)
    if op == 2:
        return (f * image + (1 - f) * grey).clamp(0, 1)
    return _hue_reference(image, f)


def test_color_jitter_applies_torchvisions_adjustments_in_each_images_own_order():
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(5, 3, 4, 5, generator=gen)
    jitter = A.ColorJitter(brightness=0.6, contrast=0.6, saturation=0.6, hue=0.3)
    order, factors = jitter.draw(_view(5, seed=2))
    assert sorted(order[0].tolist()) == [0, 1, 2, 3] and len({tuple(o) for o in order.tolist()}) > 1
    assert ((factors[:, :3] >= 0.4) & (factors[:, :3] <= 1.6)).all() and (factors[:, 3].abs() <= 0.3).all()
    got = jitter.apply(images.clone(), order, factors)
    for b in range(5):
        want = images[b]
        for op in order[b].tolist():
            want = _one_op_reference(want, op, float(factors[b, op]))
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=0)


def test_color_jitter_arguments_follow_torchvision():
    assert A.ColorJitter().brightness is None and A.ColorJitter(hue=0).hue is None
    assert A.ColorJitter(brightness=1.5).brightness == (0.0, 2.5) and A.ColorJitter(hue=0.2).hue == (-0.2, 0.2)
    assert A.ColorJitter(contrast=(0.5, 0.9)).contrast == (0.5, 0.9)
    for bad in (dict(brightness=-1), dict(hue=0.7), dict(saturation=(2, 1)), dict(contrast="x")):
        with pytest.raises(InrUsageError, match="ColorJitter"):
            A.ColorJitter(**bad)


def test_random_erasing_rectangles_follow_torchvisions_get_params():
    erasing = A.RandomErasing(p=0.6, scale=(0.05, 0.2), ratio=(0.5, 2.0))
    rect = erasing.draw(_view(2000, seed=1), (20, 30))
    top, left, h, w = rect.unbind(1)
    erased = h > 0
    assert abs(float(erased.float().mean()) - 0.6) < 0.05  # p
    assert torch.all(top[erased] + h[erased] <= 20) and torch.all(left[erased] + w[erased] <= 30)
    area = (h * w)[erased] / 600.0
    assert area.min() > 0.03 and area.max() < 0.25  # the scale range, up to the rounding of h and w
    aspect = (h / w)[erased]
    assert aspect.min() > 0.4 and aspect.max() < 2.5
    images = torch.rand(3, 3, 20, 30)
    rect = torch.tensor([[2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0], [10.0, 20.0, 6.0, 10.0]])
    out = A.RandomErasing(value=(0.1, 0.2, 0.3)).apply(images.clone(), rect)
    inside = torch.zeros(3, 20, 30, dtype=torch.bool)
    inside[0, 2:6, 3:8] = True
    inside[2, 10:16, 20:30] = True
    for c, v in enumerate((0.1, 0.2, 0.3)):
        assert torch.all(out[:, c][inside] == v)
    assert torch.equal(out[:, :, :, :][~inside.unsqueeze(1).expand(-1, 3, -1, -1)],
                       images[~inside.unsqueeze(1).expand(-1, 3, -1, -1)])
    with pytest.raises(InrUsageError, match="RandomErasing"):
        A.RandomErasing(value="noise")


def test_keyed_draws_depend_only_on_each_images_key():
    # With keys (what the loader passes), an image's draws do not depend on the rest of its batch.
    keys = torch.arange(6, dtype=torch.int64) * 977 + 5
    pipeline = A.Compose([A.RandomResizedCrop(6), A.RandomHorizontalFlip(), A.ColorJitter(0.5, 0.5, 0.5, 0.1),
                          A.RandomErasing(p=1.0)])
    sizes = torch.full((6,), 10)
    whole = pipeline(sizes, sizes, native_size=(10, 10), keys=keys)
    part = pipeline(sizes[2:5], sizes[2:5], native_size=(10, 10), keys=keys[2:5])
    torch.testing.assert_close(part.theta, whole.theta[2:5], atol=0, rtol=0)
    images = torch.rand(6, 3, 6, 6)
    torch.testing.assert_close(part.finish(images[2:5].clone()), whole.finish(images.clone())[2:5], atol=0, rtol=0)
    torch.testing.assert_close(whole.finish(images[2:5].clone(), slice(2, 5)), part.finish(images[2:5].clone()),
                               atol=0, rtol=0)
