"""Peak RSS of streamed workloads on a memmapped dataset larger than 1 GB (nothing loads it whole).

Writes (once) a uint8 file of N images of 1x256x256 (64 KiB each; N=16,384 is 1.0 GiB) and its
labels, then runs ONE of the workloads below in this process, for `/usr/bin/time -v` to measure:

    derpp     one DER++ update with mask_unused_classes=True (classes read from the labels)
    rd        one Repeated Distillation update (expert, its logits, reservoir writes: all streamed)
    evaluate  `retain evaluate` of the DER++ state on the whole file

Each item is read through a `np.memmap` opened for that read (so pages are unmapped after it, and
the file's pages do not count in this process's RSS beyond the batch in flight). The model
average-pools the 256x256 image to 16x16 before a linear layer, so the run is I/O and loader bound.

    python benchmarks/stream_rss.py prepare --dir /tmp/rss
    /usr/bin/time -v python benchmarks/stream_rss.py derpp --dir /tmp/rss    # "Maximum resident set size"
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import retain

SIDE = 256
ITEM_BYTES = SIDE * SIDE


class MemmapImages(Dataset):
    """Items (1x256x256 uint8 tensor, label) read from a raw file, one short-lived memmap per item."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "images.u8"
        self.targets = torch.from_numpy(np.fromfile(folder / "labels.i64", dtype=np.int64))

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        view = np.memmap(self.path, dtype=np.uint8, mode="r", offset=i * ITEM_BYTES, shape=(1, SIDE, SIDE))
        item = torch.from_numpy(np.array(view))  # a copy; the mapping is closed when `view` goes
        del view
        return item, int(self.targets[i])


def prepare(folder: Path, items: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.random.default_rng(0).integers(0, 10, items).astype(np.int64)
    labels.tofile(folder / "labels.i64")
    rng = np.random.default_rng(1)
    with open(folder / "images.u8", "wb") as f:
        for start in range(0, items, 256):
            n = min(256, items - start)
            block = rng.integers(0, 64, (n, SIDE, SIDE), dtype=np.uint8)
            block[np.arange(n), labels[start : start + n] * 16, :] = 255  # a learnable row per class
            f.write(block.tobytes())
    size = os.path.getsize(folder / "images.u8")
    print(f"wrote {items} items, {size / 2**30:.2f} GiB, to {folder}")


def model() -> retain.ContinualModel:
    return Pooled()


@retain.register_model
class Pooled(retain.ContinualModel):
    """Average-pool to 16x16, then one hidden layer: cheap per item, so the run measures the data path."""

    def __init__(self) -> None:
        super().__init__()
        self.num_features, self.num_outputs = 32, 10
        self.body = nn.Sequential(nn.AvgPool2d(16), nn.Flatten(), nn.Linear(256, 32), nn.ReLU())
        self.add_task_params()

    def get_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float() / 255.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["prepare", "derpp", "rd", "evaluate"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/retain-rss"))
    parser.add_argument("--items", type=int, default=16_384)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.workload == "prepare":
        prepare(args.dir, args.items)
        return
    data = MemmapImages(args.dir)
    common = dict(optimizer=functools.partial(torch.optim.SGD, lr=0.05), batch_size=64, max_epochs=1,
                  accelerator="cpu", num_workers=2)  # fmt: skip
    if args.workload == "derpp":
        updater = retain.DarkExperienceReplayModelUpdater(
            model(), memory_size=500, alpha=0.3, beta=0.5, mask_unused_classes=True,
            output_state_folder=args.dir / "state-derpp", **common,
        )  # fmt: skip
        updater.update(data)
    elif args.workload == "rd":
        updater = retain.RepeatedDistillationModelUpdater(
            model(), memory_size=500, consolidation_epochs=1, seed=0, output_state_folder=args.dir / "state-rd",
            **common,
        )  # fmt: skip
        updater.update(data)
    else:
        config = args.dir / "rss_config.py"
        config.write_text(  # the dataset class of this process (where the model class is registered)
            "import sys\nfrom pathlib import Path\n"
            f"def test_dataset_fn():\n    return sys.modules['__main__'].MemmapImages(Path({str(args.dir)!r}))\n"
        )
        from retain.cli import main as cli

        raise SystemExit(cli(["evaluate", "--config", str(config), "--state", str(args.dir / "state-derpp")]))
    print(f"{args.workload}: done on {len(data)} items ({len(data) * ITEM_BYTES / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
