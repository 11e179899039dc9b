"""inrfmt.rng: the counter-based generator is a pure function of (key, stream, counter), uniform, and the
same whichever rows are drawn together."""
import torch

from inrfmt import rng


def test_hash_matches_its_host_twin_and_stays_in_32_bits():
    words = torch.tensor([0, 1, 2, 0xFFFFFFFF, 123456789, 2 ** 31], dtype=torch.int64)
    hashed = rng.hash32(words)
    assert hashed.tolist() == [rng._hash_int(int(w)) for w in words]
    assert int(hashed.min()) >= 0 and int(hashed.max()) < 2 ** 32


def test_rows_are_independent_of_their_batch_and_streams_differ():
    keys = rng.row_keys(rng.mix(7, 1), torch.arange(10))
    full = rng.uniform(keys, (5, 3), stream=2)
    assert torch.equal(rng.uniform(keys[4:6], (5, 3), stream=2), full[4:6])
    assert not torch.equal(rng.uniform(keys, (5, 3), stream=3), full)
    assert rng.mix(7, 1) != rng.mix(7, 2) != rng.mix(1, 7)
    assert rng.mix(2 ** 40) != rng.mix(2 ** 40 + 2 ** 32)  # both halves of a 64-bit word count


def test_uniform_is_uniform_in_the_unit_interval():
    keys = rng.row_keys(rng.mix(1), torch.arange(64))
    for dtype in (torch.float64, torch.float32):
        u = rng.uniform(keys, (4096,), dtype=dtype)
        assert u.dtype == dtype and float(u.min()) >= 0 and float(u.max()) < 1
        assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
        counts = torch.histc(u.double(), bins=16, min=0, max=1)
        assert float(counts.min()) > 0.9 * u.numel() / 16
