"""Are two results folders the same numbers? Every numeric array of every .npz in both, compared.

For a change that must keep the numbers (a redesign, a refactor): run `make demo` before and after,
keep both results/ folders, then

    .venv/bin/python bench/same_numbers.py RESULTS_BEFORE RESULTS_AFTER [--data-before D --data-after D]

prints, per file, the number of numeric arrays and the largest absolute difference, and at the end
the largest over everything; files or arrays present on one side only are listed. Exit status 0
when every numeric array is identical to the bit (NaNs equal where both are NaN), else 1. String
arrays (provenance records, names) are not compared: they carry fingerprints of the code's own
records, which a redesign may reword.
"""
import argparse
import glob
import os
import sys

import numpy as np


def numeric_arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if f[k].dtype.kind in "biuf"}


def compare_folder(before, after, rel_glob="**/*.npz"):
    """(rows: (file, arrays compared, max |difference|, identical?), only on one side)."""
    a = {os.path.relpath(p, before) for p in glob.glob(os.path.join(before, rel_glob), recursive=True)}
    b = {os.path.relpath(p, after) for p in glob.glob(os.path.join(after, rel_glob), recursive=True)}
    rows, one_side = [], sorted((a ^ b))
    for rel in sorted(a & b):
        x, y = numeric_arrays(os.path.join(before, rel)), numeric_arrays(os.path.join(after, rel))
        one_side += [f"{rel}:{k}" for k in sorted(set(x) ^ set(y))]
        worst, same = 0.0, True
        for k in sorted(set(x) & set(y)):
            u, v = x[k], y[k]
            if u.shape != v.shape:
                rows.append((f"{rel}:{k}", 1, float("inf"), False))
                same = False
                continue
            eq = np.array_equal(u, v, equal_nan=u.dtype.kind == "f")
            same &= eq
            if not eq and u.size:
                d = np.abs(u.astype(np.float64) - v.astype(np.float64))
                worst = max(worst, float(np.nanmax(d)) if np.isfinite(d).any() else float("inf"))
        rows.append((rel, len(set(x) & set(y)), worst, same))
    return rows, one_side


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--data-before", help="also compare the data folders (study, subjects, stories, truth)")
    p.add_argument("--data-after")
    args = p.parse_args(argv)
    pairs = [(args.before, args.after, "*.npz")]
    if args.data_before and args.data_after:
        pairs += [(args.data_before, args.data_after, f) for f in ("*.npz", "subjects/*.npz", "stories/*.npz")]
    all_same, worst, n_files, n_arrays, extra = True, 0.0, 0, 0, []
    for before, after, pattern in pairs:
        rows, one_side = compare_folder(before, after, pattern)
        extra += [os.path.join(after, x) for x in one_side]
        for rel, n, d, same in rows:
            print(f"  {'same' if same else 'DIFFERS'}  {os.path.join(os.path.basename(after.rstrip('/')), rel)}: "
                  f"{n} numeric arrays, max |difference| {d:.3g}")
            all_same &= same
            worst, n_files, n_arrays = max(worst, d), n_files + 1, n_arrays + n
    for x in extra:
        print(f"  only on one side: {x}")
    print(f"{n_files} files, {n_arrays} numeric arrays compared: largest |difference| {worst:.3g}; "
          + ("every array identical" if all_same and not extra else "NOT identical"))
    return 0 if all_same and not extra else 1


if __name__ == "__main__":
    sys.exit(main())
