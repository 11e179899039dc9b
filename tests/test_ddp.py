"""DDP: `torchrun --nproc_per_node=2` on CPU with gloo (tests/ddp_worker.py). Each rank gets a disjoint,
equal share of every epoch (DistributedSampler's padding/drop rules), and a restart from a mid-epoch
state_dict continues with the same batches."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.inrfiles import write_random_inr

N = 11  # odd: exercises both the wrap-around padding and the dropped tail
ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    path = write_random_inr(tmp / "ddp.inr", [(8, 8)] * N, seed=8)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_worker.py"), path, str(tmp)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_every_index_once_per_epoch_with_wrap_padding(reports):
    assert [r["world_size"] for r in reports] == [2, 2]
    cfg = [r["configs"]["False"] for r in reports]
    assert cfg[0]["num_samples"] == cfg[1]["num_samples"] == math.ceil(N / 2)
    assert cfg[0]["len"] == cfg[1]["len"] == math.ceil(math.ceil(N / 2) / 2)
    for epoch in range(2):
        orders = [c["epochs"][epoch]["order"] for c in cfg]
        delivered = [[i for b in c["epochs"][epoch]["batches"] for i in b] for c in cfg]
        assert delivered == orders  # what was yielded is the rank's share, in order
        flat = orders[0] + orders[1]
        assert sorted(set(flat)) == list(range(N))  # every image this epoch
        assert len(flat) == 2 * math.ceil(N / 2)  # padded by wrapping: exactly one repeat
        interleaved = [orders[r][k] for k in range(len(orders[0])) for r in range(2)]
        assert len(set(interleaved[:N])) == N  # the permutation first, then the repeat of its start
        assert interleaved[N:] == interleaved[:len(interleaved) - N]
    assert cfg[0]["epochs"][0]["order"] != cfg[0]["epochs"][1]["order"]
    assert reports[0]["delivered_epoch0_all_ranks"] == 2 * math.ceil(N / 2)


def test_drop_last_drops_the_tail_and_the_partial_batch(reports):
    cfg = [r["configs"]["True"] for r in reports]
    share = math.ceil((N - 2) / 2)
    for epoch in range(2):
        orders = [c["epochs"][epoch]["order"] for c in cfg]
        assert [len(o) for o in orders] == [share, share]
        flat = orders[0] + orders[1]
        assert len(set(flat)) == len(flat) == 2 * share  # disjoint, each image at most once
        for c, order in zip(cfg, orders):
            batches = c["epochs"][epoch]["batches"]
            assert all(len(b) == 2 for b in batches) and len(batches) == share // 2
            assert [i for b in batches for i in b] == order[:len(batches) * 2]


@pytest.mark.parametrize("drop_last", ["False", "True"])
def test_restart_from_state_dict_continues_the_same_order(reports, drop_last):
    for r in reports:
        cfg = r["configs"][drop_last]
        assert cfg["resumed_batches"] == cfg["epochs"][1]["batches"][1:]
        assert cfg["resumed_images_equal"]
