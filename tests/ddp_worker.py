"""Run by tests/test_ddp.py under `torchrun --nproc_per_node=2` (CPU, gloo): exercises InrLoader's
distributed mode and writes what each rank saw to OUT_DIR/rank<r>.json for the test to check.

usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py FILE.inr OUT_DIR
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import inrfmt
from inrfmt import augment as A


def labels_of(loader):
    return [labels.tolist() for _, labels in loader]


def main(path: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"rank": rank, "world_size": world, "configs": {}}
    pipeline = A.Compose([A.RandomResizedCrop(6), A.RandomHorizontalFlip(), A.RandomCrop(6, padding=1)])
    with inrfmt.open(path, device="cpu") as ds:
        for drop_last in (False, True):
            loader = ds.loader(2, seed=7, drop_last=drop_last, augment=pipeline)  # distributed=None: auto
            assert (loader.rank, loader.world_size) == (rank, world)
            entry = {"len": len(loader), "num_samples": loader.num_samples, "epochs": []}
            for epoch in range(2):
                entry["epochs"].append({"order": loader.order().tolist(), "batches": labels_of(loader)})
            # restart mid-epoch 1 from a state_dict, in a fresh loader, as after a crash
            loader.set_epoch(1)
            full = [(x.clone(), y.clone()) for x, y in loader]
            loader.set_epoch(1)
            iterator = iter(loader)
            next(iterator)
            state = loader.state_dict()
            restarted = ds.loader(2, seed=0, drop_last=drop_last, augment=pipeline)
            restarted.load_state_dict(state)
            rest = list(restarted)
            entry["resumed_batches"] = [y.tolist() for _, y in rest]
            entry["resumed_images_equal"] = len(rest) == len(full) - 1 and all(
                torch.equal(x, rx) for (x, _), (rx, _) in zip(full[1:], rest))
            report["configs"][str(drop_last)] = entry
    # every rank agrees on the shared work (a collective over gloo)
    total = torch.tensor([sum(len(b) for b in report["configs"]["False"]["epochs"][0]["batches"])])
    dist.all_reduce(total)
    report["delivered_epoch0_all_ranks"] = int(total)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
