"""This repository's recipe beside the authors', from one results folder of bench/recipes.sh.

    .venv/bin/python bench/recipes_table.py RESULTS --data DATA

Prints, for each recipe, the claims' numbers (claims.py's rows, from that recipe's results only)
and each run's best epoch; then each of the authors' choices alone: sim01 seed 0's gain (linearized
test r minus the untuned model's at the same layer, mean over voxels; in AC) and its difference
from this repository's seed 0 (same seed: the same readout start), beside the spread of this
repository's three seeds; and the CPU time of each command (RESULTS/times.tsv).
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import claims  # noqa: E402
from lib import plumbing  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("results")
p.add_argument("--data", required=True, help="the study's data folder")
args = p.parse_args()
R = args.results
ac = plumbing.load_npz(os.path.join(args.data, "subjects", "sim01.npz"))["roi_AC"]


def run_of(path):
    r = plumbing.load_npz(path)
    d = r["test_r_tuned"] - r["test_r_untuned"]
    return dict(name=os.path.basename(path)[:-4], gain=float(d.mean()), ac=float(d[ac].mean()),
                best=int(r["best_epoch"]), ran=len(r["val_r_by_epoch"]), layer=int(r["layer"]),
                settings=json.loads(str(r["settings"])))


for recipe in ("repo", "authors"):
    subject, rows, note = claims.check(R, args.data, "sim01", recipe)
    print(f"\n== recipe {recipe}")
    for claim, _, measured, verdict, _ in rows:
        print(f"  {claim:50s} {verdict:14s} {measured}")
    base = claims.load(R, "02_baseline_sim01*.npz", recipe)
    print(f"  baseline sim01 mean test r {base[0]['test_r'].mean():.4f}, layer {int(base[0]['best_layer'])}")
    for path in sorted(glob.glob(os.path.join(R, "03_*.npz"))):
        if claims.recipe_of(plumbing.load_npz(path)) == recipe:
            r = run_of(path)
            print(f"  {r['name']:60s} best epoch {r['best']:2d} of {r['ran']:2d}, gain {r['gain']:+.4f}, AC {r['ac']:+.4f}")
    print(f"  {note}")

files = [f for f in sorted(glob.glob(os.path.join(R, "03_sim01_whole_lora_seed*.npz")))
         if "_from_" not in os.path.basename(f) and claims.recipe_of(plumbing.load_npz(f)) == "repo"]
tag = claims.pick_tag(files, None, "sim01's runs of this repository's recipe")  # the recipe's: most seeds
runs = [dict(run_of(f), tag=claims.own_tag(f)) for f in files]
ref = next(r for r in runs if r["tag"] == tag and r["name"].startswith("03_sim01_whole_lora_seed0_"))
seeds = [r["gain"] for r in runs if r["tag"] == tag]
print(f"\n== each of the authors' choices alone (sim01, seed 0; this repository's seed 0 gains {ref['gain']:+.4f}, "
      f"AC {ref['ac']:+.4f}; the sd of its {len(seeds)} seeds' gains {np.std(seeds):.4f})")


def alone(r, flags):
    print(f"  {flags:64s} gain {r['gain']:+.4f} ({r['gain'] - ref['gain']:+.4f}), AC {r['ac']:+.4f} "
          f"({r['ac'] - ref['ac']:+.4f}), best epoch {r['best']} of {r['ran']}, layer {r['layer']}")


for r in runs:
    # a setting newer than the reference run, at its off value (0), is not a change
    changed = {k: v for k, v in r["settings"].items() if ref["settings"].get(k, None if v else v) != v}
    if r["tag"] != tag and r["name"].startswith("03_sim01_whole_lora_seed0_"):
        alone(r, "stage 03 " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items()))
for folder in sorted(glob.glob(os.path.join(R, "alone02_*"))):
    base = plumbing.load_npz(glob.glob(os.path.join(folder, "02_baseline_sim01*.npz"))[0])
    flags = json.loads(str(base["provenance"]))["flags"]
    for path in glob.glob(os.path.join(folder, "03_sim01_whole_lora_seed0_*.npz")):
        alone(run_of(path), f"stage 02 {' '.join(flags)[:56]} (untuned r {base['test_r'].mean():.4f})")
print("\n== CPU seconds per command (wall seconds), RESULTS/times.tsv")
if os.path.exists(os.path.join(R, "times.tsv")):
    for line in open(os.path.join(R, "times.tsv")):
        name, wall, cpu = line.rstrip("\n").split("\t")
        print(f"  {name:40s} {float(cpu):8.0f} ({float(wall):.0f})")
