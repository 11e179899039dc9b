"""Prior files (FORMAT.md section 15) and the `.inr` file's `prior` section (rule 65)."""
import numpy as np
import pytest
import torch

from inrfmt import siren
from inrfmt.errors import InrFormatError, InrUsageError
from inrfmt.prior import PRIOR_PREAMBLE, Prior
from inrfmt.reader import InrFile
from inrfmt.spec import Architecture
from inrfmt.writer import InrWriter, merge_files
from tests.inrfiles import random_weights

ARCH = Architecture(sine_layers=3, width=6, w0=25.0, first_w0=31.0)


def make_prior(arch=ARCH, seed=0, lr_scale=False, name="test") -> Prior:
    p = siren.init_params(arch, 1, generator=torch.Generator().manual_seed(seed))
    theta0 = {k: getattr(p, k)[0].numpy() for k in arch.shapes()}
    scale = {k: np.full(v.shape, 0.5 + seed, np.float32) for k, v in theta0.items()} if lr_scale else None
    return Prior(arch, theta0, scale, name)


@pytest.mark.parametrize("lr_scale", [False, True])
def test_round_trip(tmp_path, lr_scale):
    prior = make_prior(lr_scale=lr_scale)
    again = Prior.from_bytes(prior.to_bytes())
    assert again == prior and again.name == "test" and again.arch == ARCH
    for name, shape in ARCH.shapes().items():
        assert again.theta0[name].shape == shape and again.theta0[name].dtype == np.float32
        np.testing.assert_array_equal(again.theta0[name], prior.theta0[name])
    assert (again.lr_scale is None) == (not lr_scale)
    path = tmp_path / "p.prior"
    prior.save(path)
    assert Prior.load(path) == prior and path.read_bytes() == prior.to_bytes()
    assert not list(tmp_path.glob(".*.tmp"))
    assert make_prior(seed=1) != prior


def test_tied_outputs_start_every_channel_from_their_mean():
    prior = make_prior(lr_scale=True)
    tied = prior.with_tied_outputs("grey-safe")
    assert not prior.outputs_tied and tied.outputs_tied and tied.name == "grey-safe"
    np.testing.assert_allclose(tied.theta0["last_w"][2], prior.theta0["last_w"].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(tied.theta0["last_b"], prior.theta0["last_b"].mean(), rtol=1e-6)
    for name in ("first_w", "first_b", "hidden_w", "hidden_b"):
        np.testing.assert_array_equal(tied.theta0[name], prior.theta0[name])
    assert all(np.array_equal(tied.lr_scale[k], prior.lr_scale[k]) for k in prior.lr_scale)
    assert Prior.from_bytes(tied.to_bytes()).outputs_tied


def test_construction_checks_shapes_and_values():
    good = make_prior()
    with pytest.raises(InrUsageError, match="exactly the arrays"):
        Prior(ARCH, {k: v for k, v in good.theta0.items() if k != "last_b"})
    with pytest.raises(InrUsageError, match=r"hidden_w.*shape"):
        Prior(ARCH, {**good.theta0, "hidden_w": np.zeros((2, 6, 5))})
    with pytest.raises(InrUsageError, match="finite"):
        Prior(ARCH, {**good.theta0, "first_b": np.full(6, np.nan)})
    with pytest.raises(InrUsageError, match="> 0"):
        Prior(ARCH, good.theta0, {k: np.zeros_like(v) for k, v in good.theta0.items()})


def test_every_truncation_and_byte_flip_is_a_format_error():
    data = make_prior(lr_scale=True).to_bytes()
    rng = np.random.default_rng(0)
    for cut in sorted(set(rng.integers(0, len(data), 60).tolist()) | {0, 3, 8, 23, 24, len(data) - 1}):
        with pytest.raises(InrFormatError, match="^p.prior: "):
            Prior.from_bytes(data[:cut], source="p.prior")
    for pos in rng.integers(0, len(data), 200):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(InrFormatError, match="^p.prior: "):
            Prior.from_bytes(bytes(bad), source="p.prior")
    with pytest.raises(InrFormatError, match="trailing|bytes of arrays|crc32"):
        Prior.from_bytes(data + b"\0\0\0\0", source="p.prior")


def test_unknown_major_version_and_bad_magic_name_the_problem():
    import zlib

    data = bytearray(make_prior().to_bytes())
    data[8] = 2  # major 2, with a matching checksum
    data[16:20] = np.uint32(zlib.crc32(bytes(data[:16]) + bytes(4) + bytes(data[20:]))).tobytes()
    with pytest.raises(InrFormatError, match="version 2.0 .*upgrade"):
        Prior.from_bytes(bytes(data), source="x.prior")
    with pytest.raises(InrFormatError, match="magic"):
        Prior.from_bytes(b"\x89INR\r\n\x1a\n" + bytes(data[8:]), source="x.prior")
    with pytest.raises(InrUsageError, match="cannot read prior"):
        Prior.load("/nonexistent/x.prior")


def test_header_edits_are_checked(monkeypatch):
    import json
    import zlib

    def rewrite(edit):
        data = make_prior().to_bytes()
        length = int(np.frombuffer(data[12:16], "<u4")[0])
        header = json.loads(data[PRIOR_PREAMBLE:PRIOR_PREAMBLE + length])
        edit(header)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 4)
        body = raw + data[PRIOR_PREAMBLE + length:]
        pre = bytearray(data[:PRIOR_PREAMBLE])
        pre[12:16] = np.uint32(len(raw)).tobytes()
        pre[16:20] = bytes(4)
        pre[16:20] = np.uint32(zlib.crc32(bytes(pre) + body)).tobytes()
        return bytes(pre) + body

    for edit, field in [(lambda h: h["architecture"].update(width=0), "architecture.width"),
                        (lambda h: h["architecture"].update(w0=float("inf")) or h, "header"),
                        (lambda h: h["architecture"].update(coordinates="other"), "architecture"),
                        (lambda h: h.update(format="inr"), "format"),
                        (lambda h: h.update(arrays=h["arrays"][::-1]), "arrays"),
                        (lambda h: h.update(name=3), "name"),
                        (lambda h: h["architecture"].update(width=7), "bytes of arrays")]:
        with pytest.raises(InrFormatError, match=field):
            Prior.from_bytes(rewrite(edit), source="x.prior")
    assert Prior.from_bytes(rewrite(lambda h: h.update(extra=1))) == make_prior()  # unknown keys are ignored


def write(path, prior=None, n=3, seed=0, arch=ARCH):
    wb = random_weights(arch, n, seed)
    with InrWriter(path, arch, prior=prior) as w:
        w.add(wb, labels=np.full(n, -1), heights=np.full(n, 5), widths=np.full(n, 7), psnr=np.full(n, 30.0),
              prune_ratio=np.zeros(n))
    return path


def test_inr_file_carries_its_prior_in_version_1_1(tmp_path):
    prior = make_prior(lr_scale=True)
    with InrFile(write(tmp_path / "a.inr", prior)) as f:
        assert f.version == (1, 1) and f.prior == prior and "prior" in f.optional_sections
        f.verify()
    with InrFile(write(tmp_path / "b.inr")) as f:
        assert f.version == (1, 0) and f.prior is None
    with pytest.raises(InrUsageError, match="prior must be a Prior"):
        InrWriter(tmp_path / "c.inr", ARCH, prior=make_prior(Architecture(3, 5)))


def test_a_damaged_or_foreign_prior_section_is_refused(tmp_path):
    import zlib

    path = write(tmp_path / "a.inr", make_prior())
    data = bytearray(path.read_bytes())
    with InrFile(path) as f:
        sec = dict(f.sections["prior"])
        header_at = f.header_offset
    data[sec["offset"] + 40] ^= 0xFF  # inside the prior, with the section's own CRC-32 fixed up
    import json

    header = json.loads(bytes(data[header_at:]))
    for s in header["sections"]:
        if s["name"] == "prior":
            s["crc32"] = zlib.crc32(bytes(data[sec["offset"]:sec["offset"] + sec["length"]]))
    from tests.test_format_fuzz import _with_header  # rewrites the header and its CRC

    bad = tmp_path / "bad.inr"
    bad.write_bytes(_with_header(bytes(data), header))
    with pytest.raises(InrFormatError, match=r"section 'prior': crc32"):
        InrFile(bad)
    foreign = tmp_path / "foreign.inr"  # a valid prior for another network, spliced in
    other = make_prior(Architecture(sine_layers=3, width=6)).to_bytes()
    assert len(other) == sec["length"]
    data = bytearray(path.read_bytes())
    data[sec["offset"]:sec["offset"] + sec["length"]] = other
    header = json.loads(bytes(data[header_at:]))
    for s in header["sections"]:
        if s["name"] == "prior":
            s["crc32"] = zlib.crc32(other)
    foreign.write_bytes(_with_header(bytes(data), header))
    with pytest.raises(InrFormatError, match="section 'prior': is for a 3x6 network .w0 30"):
        InrFile(foreign)


def test_merge_refuses_parts_with_different_priors_and_carries_a_shared_one(tmp_path):
    a = write(tmp_path / "a.inr", make_prior(name="one"))
    b = write(tmp_path / "b.inr", make_prior(name="one"), seed=1)
    c = write(tmp_path / "c.inr", make_prior(seed=2, name="two"))
    d = write(tmp_path / "d.inr")
    merge_files([a, b], tmp_path / "ab.inr")
    with InrFile(tmp_path / "ab.inr") as f:
        assert f.num_images == 6 and f.prior == make_prior(name="one")
    with pytest.raises(InrUsageError, match="different priors .'two' and 'one'."):
        merge_files([a, c], tmp_path / "ac.inr")
    with pytest.raises(InrUsageError, match="a.inr was fitted from a prior and .*d.inr without one"):
        merge_files([d, a], tmp_path / "da.inr")
