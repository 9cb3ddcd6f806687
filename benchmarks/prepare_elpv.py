"""Lay out the ELPV solar cells of one type as an MVTec-style data set for `benchmarks/quality.py`.

    .venv/bin/python benchmarks/prepare_elpv.py --type mono --out benchmarks/runs/data/elpv_mono

A fixed, seeded 75 % of the defect-probability-0 cells of the type go to `train/good`,
the other 25 % to `test/good`, and every probability-1 cell to `test/defect`. The
uncertain cells are left out of train and test, as in `benchmarks/elpv.py`; the 2/3 ones
("likely defective") go to `dev/likely_defect`, a development set to choose settings on
(`benchmarks/dev_study.py`) that `quality.py` never reads, so that no choice rests on the
test split. ELPV has no pixel
masks, so there is no `ground_truth/`. The images are linked, not copied, from the
installed `elpv-dataset` wheel (CC BY-NC-SA 4.0: evaluation only, never shipped), so the
folder must stay outside the repository's tracked files (`benchmarks/runs/` is ignored).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", choices=["mono", "poly"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="chooses the train/test split of the good cells")
    args = p.parse_args()
    try:
        import elpv_dataset
    except ImportError:
        raise SystemExit("ELPV is not installed: pip install elpv-dataset==1.0.0.post1") from None

    root = Path(elpv_dataset.__file__).parent / "data"
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    names = np.array([r[0] for r in rows])
    prob = np.array([float(r[1]) for r in rows])
    types = np.array([r[2] for r in rows])
    good = np.random.default_rng([args.seed, 0 if args.type == "mono" else 1]).permutation(
        np.flatnonzero((types == args.type) & (prob == 0.0))
    )
    bad = np.flatnonzero((types == args.type) & (prob == 1.0))
    n_train = round(0.75 * len(good))
    likely = np.flatnonzero((types == args.type) & np.isclose(prob, 2 / 3))
    split = {"train/good": good[:n_train], "test/good": good[n_train:], "test/defect": bad, "dev/likely_defect": likely}
    for folder, indices in split.items():
        target = args.out / folder
        target.mkdir(parents=True, exist_ok=True)
        for i in indices:
            link = target / Path(names[i]).name
            if not link.exists():
                os.symlink(root / names[i], link)
    print(f"{args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
