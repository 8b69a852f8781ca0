"""Synthetic MHIST-layout folders, for tests and for timing the full pipeline
without the real images: `python -m task2_mhist.synthetic --out DIR`.

Every image is `size x size` RGB noise whose class is learnable (SSA tiles are
redder, HP tiles bluer). The folder carries `SYNTHETIC.json`, so every run and
report made from it says so. With `--annotations` (e.g. the real CSV in
`../shared/data/mhist/`) the folder has the real names, labels, votes and
partitions: 3,152 images, 2,175 train / 977 test.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

MARKER = "SYNTHETIC.json"  # beside annotations.csv: this folder is not real MHIST
COLUMNS = ("Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA (Out of 7)", "Partition")


def tile(rng, ssa, size):
    """`(size, size, 3)` uint8 noise, channel 0 (SSA) or 2 (HP) raised by 80."""
    pixels = rng.integers(60, 160, size=(size, size, 3)).astype(np.int16)
    pixels[..., 0 if ssa else 2] += 80
    return np.clip(pixels, 0, 255).astype(np.uint8)


def toy_rows(n_train, n_test, seed=0):
    """Annotation rows `(name, label, votes, partition)`: every third image SSA,
    votes consistent with the majority label."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_test):
        ssa = i % 3 == 0
        votes = int(rng.integers(4, 8) if ssa else rng.integers(0, 4))
        rows.append((f"MHIST_{i:03d}.png", "SSA" if ssa else "HP", votes, "train" if i < n_train else "test"))
    return rows


def csv_rows(path):
    """Rows `(name, label, votes, partition)` of an existing annotations.csv."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return [tuple(row[c] for c in COLUMNS) for row in csv.DictReader(handle)]


def write_folder(root, rows, size=224, seed=0, log=None):
    """Writes `root/annotations.csv` and one PNG per row; returns `root`."""
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index, (name, label, _votes, _partition) in enumerate(rows, 1):
        Image.fromarray(tile(rng, label == "SSA", size)).save(root / name)
        if log and index % 500 == 0:
            log(f"{index}/{len(rows)} images")
    with open(root / "annotations.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    marker = {"generator": "task2_mhist.synthetic", "images": len(rows), "size": size, "seed": seed,
              "note": "noise images whose class is colour-coded; not MHIST tissue"}
    (root / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return root


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m task2_mhist.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--annotations", help="copy names/labels/votes/partitions from this annotations.csv")
    p.add_argument("--train", type=int, default=24, help="train images when no --annotations")
    p.add_argument("--test", type=int, default=12, help="test images when no --annotations")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = csv_rows(args.annotations) if args.annotations else toy_rows(args.train, args.test, args.seed)
    write_folder(args.out, rows, args.size, args.seed, log=print)
    print(f"wrote {len(rows)} images of {args.size}x{args.size} and annotations.csv to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
