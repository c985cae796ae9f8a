"""Compare stage 03 runs, knowing the spread across seeds (a student's edit-run-compare loop).

Given results folders (or run files), runs are grouped by what they are (subject, ROI, LoRA or full,
the run they started from) and by their settings tag; seeds of one setting make a group. For each
group: the gain in mean test r over the baseline (linearized, as stage 03 scores it), the change in
AC and outside AC, the best epoch, and what its settings change against the reference (the first
folder's group of the same kind). A difference is called beyond the seed spread only when it
exceeds twice the larger standard deviation across seeds, and never with one seed on both sides.

    python compare.py results                              # the demo's runs, grouped
    python compare.py results experiments/mine/results     # your change against the demo
Writes compare.png (validation r per epoch of every run compared) beside the first folder, or --out.
"""
import glob
import os
import sys

import numpy as np

from lib import plumbing, provenance
from lib.plumbing import StudyError


def get_args(argv=None):
    return get_parser().parse_args(argv)


def get_parser():
    p = plumbing.parser(__doc__)
    p.add_argument("paths", nargs="+", help="results folders or 03_*.npz files; the first is the reference")
    p.add_argument("--out", help="figure path (default: compare.png in the first folder)")
    return p


def load_runs(paths):
    """Every stage 03 result under `paths`, in order, with its provenance (older results lack one)."""
    runs = []
    for k, path in enumerate(paths):
        files = [path] if path.endswith(".npz") else sorted(glob.glob(os.path.join(path, "03_*.npz")))
        if not files:
            raise StudyError(f"{path}: no stage 03 results (03_*.npz) there")
        for f in files:
            r = plumbing.load_npz(f, "stage 03 result")
            prov = provenance.read_provenance(r, f, "03_finetune_lora.py")
            delta = r["test_r_tuned"] - r.get("test_r_untuned", r["test_r_baseline"])  # like for like, same layer
            runs.append(dict(name=os.path.basename(f)[:-4], folder=k, prov=prov, delta=delta,
                             val=r["val_r_by_epoch"], best=int(r["best_epoch"]),
                             base=float(np.mean(r["test_r_baseline"]))))
    return runs


def kind(run):
    p = run["prov"]
    source = (p.get("init_from") or {}).get("name", "")
    return (p["subject"], p["roi"], p["mode"], f"from {source.split('_')[2]}" if source else "")


def summarise(group, ac_masks):
    gains = np.array([g["delta"].mean() for g in group])
    ac = ac_masks.get(group[0]["prov"]["subject"])
    if ac is not None and len(ac) != len(group[0]["delta"]):  # another study's data folder: no AC split
        ac = None
    split = [(g["delta"][ac].mean(), g["delta"][~ac].mean()) for g in group] if ac is not None else []
    return dict(n=len(group), gain=gains.mean(), sd=gains.std() if len(gains) > 1 else np.nan,
                ac=np.mean([a for a, _ in split]) if split else np.nan,
                non_ac=np.mean([b for _, b in split]) if split else np.nan,
                best=[g["best"] for g in group], epochs=[len(g["val"]) for g in group], base=group[0]["base"])


def verdict(mine, ref):
    """Plain words: is the difference between two groups beyond the spread across seeds?"""
    diff = mine["gain"] - ref["gain"]
    spreads = [s for s in (mine["sd"], ref["sd"]) if np.isfinite(s)]
    if not spreads:
        return f"{diff:+.4f}: one seed on each side, the seed spread is unknown (run --seeds 0 1 2)"
    spread = max(spreads)
    if abs(diff) > 2 * spread:
        return f"{diff:+.4f}: beyond the seed spread (2 x sd {spread:.4f})"
    return f"{diff:+.4f}: within the seed spread (2 x sd {spread:.4f}): not a difference these seeds can show"


def main(argv=None):
    args = get_args(argv)
    try:
        runs = load_runs(args.paths)
        ac_masks, groups = {}, {}
        for r in runs:
            groups.setdefault((kind(r), r["prov"]["tag"], r["folder"], r["prov"]["stories"]), []).append(r)
        for (k, tag, folder, stories), group in groups.items():
            if k[0] not in ac_masks:
                ac_masks[k[0]] = find_ac(args.paths, k[0])
        rows, refs = [], {}
        for (k, tag, folder, stories), group in groups.items():
            s = summarise(group, ac_masks)
            refs.setdefault(k, (s, group[0]["prov"], stories))
            rows.append((k, tag, folder, s, group))
        print(f"{'runs (subject roi mode [from])':36s} {'tag':7s} {'seeds':>5s} {'gain':>8s} {'sd':>7s} "
              f"{'AC':>8s} {'non-AC':>8s}  best epoch / epochs")
        for k, tag, folder, s, group in rows:
            print(f"{' '.join(x for x in k if x):36s} {tag or 'default':7s} {s['n']:5d} {s['gain']:+8.4f} "
                  f"{s['sd']:7.4f} {s['ac']:+8.4f} {s['non_ac']:+8.4f}  "
                  + " ".join(f"{b}/{e}" for b, e in zip(s["best"], s["epochs"])) + f"   [{args.paths[folder]}]")
        last = [(b == e) for _, _, _, s, _ in rows for b, e in zip(s["best"], s["epochs"])]
        if any(last):
            print(f"\nthe best epoch was the last in {sum(last)} of {len(last)} runs: those may have stopped while "
                  "still improving (more --epochs would tell)")
        print()
        for k, tag, folder, s, group in rows:
            ref, ref_prov, ref_stories = refs[k]
            if s is ref:
                continue
            changed = {key: v for key, v in group[0]["prov"]["settings"].items() if ref_prov["settings"].get(key) != v}
            if group[0]["prov"]["baseline"]["fingerprint"] != ref_prov["baseline"]["fingerprint"]:
                changed["stage 02 result"] = group[0]["prov"]["baseline"]["file"]
            other = "" if group[0]["prov"]["stories"] == ref_stories else " (ANOTHER STUDY: not comparable)"
            what = ", ".join(f"{key} {ref_prov['settings'].get(key)} -> {v}" for key, v in changed.items()) or "nothing"
            print(f"{' '.join(x for x in k if x)} [{tag or 'default'}] against [{ref_prov['tag'] or 'default'}]: "
                  f"changes {what}{other}; gain {verdict(s, ref)}")
        out = args.out or os.path.join(args.paths[0] if os.path.isdir(args.paths[0]) else os.path.dirname(args.paths[0]),
                                       "compare.png")
        plot(rows, out)
        print(f"\nwrote {out}")
    except StudyError as e:
        plumbing.fail(e)


def find_ac(paths, subject):
    """The subject's AC mask from the data folder its results sit beside (results/ -> data/)."""
    for path in paths:
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        for data in (os.path.join(os.path.dirname(os.path.abspath(folder)), "data"), "data"):
            f = os.path.join(data, "subjects", f"{subject}.npz")
            if os.path.exists(f):
                with np.load(f, allow_pickle=False) as d:
                    if "roi_AC" in d:
                        return d["roi_AC"]
    return None


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (k, tag, folder, s, group) in enumerate(rows):
        for j, g in enumerate(group):
            ax.plot(np.arange(1, len(g["val"]) + 1), g["val"], "o-", color=f"C{i}", alpha=0.7, ms=3,
                    label=f"{' '.join(x for x in k if x)} [{tag or 'default'}]" if j == 0 else None)
    ax.set(xlabel="epoch", ylabel="validation r (ROI voxels, end to end)", title="Validation r per epoch")
    ax.legend(fontsize=7)
    plumbing.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
