"""One model, several brains, over seeds: stage 04's results (with joint runs and --data-efficiency)
of each seed, summarised as mean +- sd across seeds (what `make joint` ends with; README, "Beyond
the paper").

    .venv/bin/python bench/joint_summary.py results [--seeds 0 1 2] [--out results/joint_summary.md]

For each subject: its own single-subject model, the joint model of every subject (which saw it),
the single-subject models of the others and the joint model of the others (which never saw it),
as mean delta r over the untuned model at the same layer; then the data-efficiency curves: the
stories each kind of features needs to reach the untuned model with every story.
"""
import argparse
import glob
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import plumbing  # noqa: E402


def result_of(folder, seed):
    """Stage 04's result of a seed that holds joint rows (the default choice of runs, any tag)."""
    tag = r"(_[0-9a-f]{6})?"
    pattern = re.compile(rf"04_cross_subject{'_seed' + str(seed) if seed else ''}{tag}\.npz")
    found = [p for p in glob.glob(os.path.join(folder, "04_cross_subject*.npz")) if pattern.fullmatch(os.path.basename(p))]
    found = [p for p in found if any(str(a).startswith("joint-") for a in plumbing.load_npz(p)["tuned_on"])]
    if len(found) != 1:
        raise SystemExit(f"error: want one stage 04 result with joint rows for seed {seed} in {folder}, found "
                         f"{len(found)}: run `make joint` (or 04_cross_subject.py --seed {seed} --data-efficiency)")
    return plumbing.load_npz(found[0])


def pm(values):
    v = np.asarray(values, float)
    return f"{np.mean(v):+.4f} +- {np.std(v):.4f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", help="also write the table here (markdown; default: <results>/joint_summary.md)")
    args = p.parse_args()
    runs = {s: result_of(args.results, s) for s in args.seeds}
    first = runs[args.seeds[0]]
    subjects = [str(b) for b in first["evaluated_on"]]
    everyone = "joint-" + "-".join(subjects)
    lines = [f"seeds {' '.join(map(str, args.seeds))}: mean delta r over the untuned model at the same layer "
             "(mean +- sd across seeds)", "",
             "| subject | own model | joint model of all (saw it) | single models of others (mean) | "
             "joint model of the others (never saw it) |", "|---|---|---|---|---|"]
    for j, b in enumerate(subjects):
        cells = {k: [] for k in ("own", "all", "single", "joint")}
        for r in runs.values():
            rows = [str(a) for a in r["tuned_on"]]
            own, single, joint = r[f"unseen_{b}"]
            cells["own"].append(own)
            cells["single"].append(single)
            cells["joint"].append(joint)
            if everyone in rows:
                cells["all"].append(r["mean_delta_r"][rows.index(everyone), j])
        lines.append(f"| {b} | {pm(cells['own'])} | {pm(cells['all']) if cells['all'] else 'not run'} | "
                     f"{pm(cells['single'])} | {pm(cells['joint'])} |")
    if "efficiency_stories" in first:
        sizes = [int(n) for n in first["efficiency_stories"]]
        lines += ["", f"Stories the ridge needs to reach the untuned model with all {sizes[-1]} (linear between "
                  f"{'/'.join(map(str, sizes))}; mean over seeds, 'never' counted as more than all):", "",
                  "| subject | untuned | single models of others | joint model of the others |", "|---|---|---|---|"]
        for b in subjects:
            kinds = {"untuned": [], "single": [], "joint": []}
            for r in runs.values():
                for k in [k for k in r if k.startswith(f"stories_to_match_{b}_")]:
                    label = k[len(f"stories_to_match_{b}_"):]
                    kind = "untuned" if label == "untuned" else "joint" if label.startswith("joint-") else "single"
                    kinds[kind].append(float(r[k]))

            def cell(v):
                v = np.where(np.isfinite(v), v, np.inf)
                return f"{np.mean(v):.1f}" if np.isfinite(v).all() else f">{sizes[-1]} in {np.isinf(v).sum()} of {len(v)}"
            lines.append(f"| {b} | " + " | ".join(cell(np.array(kinds[k])) for k in ("untuned", "single", "joint")) + " |")
        curves = {}
        for r in runs.values():
            for k in [k for k in r if k.startswith("efficiency_") and k != "efficiency_stories"]:
                b, label = k[len("efficiency_"):].split("_", 1)
                kind = "untuned" if label == "untuned" else "joint" if label.startswith("joint-") else "single"
                curves.setdefault(kind, []).append(r[k])
        lines += ["", "Mean test r by stories fit (" + "/".join(map(str, sizes)) + "), over subjects and seeds:"]
        lines += [f"  {k:8s} " + " ".join(f"{v:.4f}" for v in np.mean(c, axis=0)) for k, c in curves.items()]
    text = "\n".join(lines)
    print(text)
    out = args.out or os.path.join(args.results, "joint_summary.md")
    plumbing.save_text(out, text + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
