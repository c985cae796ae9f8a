"""Compare stage 03 runs fairly: same seeds paired, the spread across seeds known (a student's
edit-run-compare loop).

Given results folders (or run files), runs are grouped by what they are (subject, ROI, LoRA or full,
the run they started from) and by their settings tag (which also changes when the code was edited);
seeds of one setting make a group. For each group: the gain in mean test r over the untuned model at
the same layer (linearized, as stage 03 scores it), in AC and outside it, and the best epochs. Each
group is then judged against the reference, the first folder's group of the same kind, naming what
differs (flags, the stage 02 result, the code's files):
- seeds both sides ran are paired (the same seed gives the same readout start and block order, so a
  paired difference is the edit's effect, not the luck of a seed);
- the difference is called beyond the seed spread only with several seeds on both sides, when it
  exceeds twice the larger standard deviation across seeds; with one seed, no verdict.
A run started from another (--init-from) is also measured against the very run it started from, as
the paper's AC claim asks: its change in AC and outside AC, and how much of that run's gain it keeps.

    python compare.py results                              # the demo's runs, grouped
    python compare.py results experiments/mine/results     # your change against the demo
Writes compare.png (each run's gain, one panel per ROI) beside the first folder, or --out.
"""
import glob
import os
import sys
import textwrap

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
    """Every stage 03 result under `paths`, in order, with its provenance (older results lack one).
    Joint runs (03_joint-...) are stage 04's and bench/joint_summary.py's to compare: left out."""
    runs = []
    for k, path in enumerate(paths):
        files = [path] if path.endswith(".npz") else sorted(
            f for f in glob.glob(os.path.join(path, "03_*.npz")) if not os.path.basename(f).startswith("03_joint-"))
        if not files:
            raise StudyError(f"{path}: no stage 03 results (03_*.npz) there")
        for f in files:
            r = plumbing.load_npz(f, "stage 03 result")
            prov = provenance.read_provenance(r, f, "03_finetune_lora.py")
            untuned = r.get("test_r_untuned", r["test_r_baseline"])  # like for like: the same layer
            runs.append(dict(name=os.path.basename(f)[:-4], folder=k, prov=prov, seed=int(prov["seed"]),
                             tuned=r["test_r_tuned"], delta=r["test_r_tuned"] - untuned,
                             val=r["val_r_by_epoch"], best=int(r["best_epoch"])))
    return runs


def kind(run):
    p = run["prov"]
    source = (p.get("init_from") or {}).get("name", "")
    return (p["subject"], p["roi"], p["mode"], f"from {source.split('_')[2]}" if source else "")


def label(group, ref, paths):
    """A group in words for the figure: what it is, what differs from its reference, its folder."""
    folder = paths[group[0]["folder"]]
    folder = folder if len(folder) < 30 else os.path.join(*os.path.normpath(folder).split(os.sep)[-2:])
    what = "the reference" if ref is group else changes(group, ref)
    return f"{' '.join(x for x in kind(group[0]) if x)}: {what} [{folder}]"


def gains(group, ac, start=None):
    """Per seed: (gain over all voxels, in AC, outside AC); `start`: {name: run} to measure each run
    against the run it started from instead of the untuned model."""
    out = {}
    for g in group:
        d = g["delta"] if start is None else g["tuned"] - start[g["prov"]["init_from"]["name"]]["tuned"]
        split = (np.nanmean(d[ac]), np.nanmean(d[~ac])) if ac is not None else (np.nan, np.nan)
        out[g["seed"]] = (np.nanmean(d), *split)
    return out


def spread(per_seed, i=0):
    values = [v[i] for v in per_seed.values()]
    return (np.mean(values), np.std(values) if len(values) > 1 else np.nan)


def verdict(mine, ref):
    """Plain words: the paired difference (seeds both sides ran), and whether the difference is
    beyond the spread across seeds (only with several seeds on both sides)."""
    (m, m_sd), (r, r_sd) = spread(mine), spread(ref)
    paired = sorted(set(mine) & set(ref))
    diff = m - r
    words = []
    if paired:
        diffs = [mine[s][0] - ref[s][0] for s in paired]
        if len(paired) == 1:
            s = paired[0]
            words.append(f"paired by seed {s}: gain {mine[s][0]:+.4f} vs {ref[s][0]:+.4f}, difference {diffs[0]:+.4f}")
        else:
            words.append(f"paired by seeds {' '.join(map(str, paired))}: mean difference {np.mean(diffs):+.4f} "
                         f"(each {' '.join(f'{d:+.4f}' for d in diffs)})")
        if set(mine) <= set(ref) and set(ref) <= set(mine):
            diff = float(np.mean(diffs))
    else:
        words.append(f"no seed in common: gain {m:+.4f} vs {r:+.4f}, difference {diff:+.4f}")
    if len(mine) < 2 or len(ref) < 2:
        known = f" (the reference's sd is {r_sd:.4f})" if np.isfinite(r_sd) else ""
        words.append(f"one seed on {'each side' if len(mine) < 2 and len(ref) < 2 else 'one side'}: the seed spread "
                     f"is unknown{known}, so no verdict (run --seeds 0 1 2)")
    else:
        sd = max(m_sd, r_sd)
        words.append(f"{diff:+.4f}: beyond the seed spread (2 x sd {sd:.4f})" if abs(diff) > 2 * sd else
                     f"{diff:+.4f}: within the seed spread (2 x sd {sd:.4f}): not a difference these seeds can show")
    return "; ".join(words)


def against_start(group, ac, by_name):
    """A run started from another, measured against that very run (the paper's AC-tuning claim):
    (words, per-seed gains over it or None when its start runs are not among those compared)."""
    missing = sorted({g["prov"]["init_from"]["name"] for g in group} - set(by_name))
    if missing:
        return f"its start runs are not among those compared ({', '.join(missing)}): pass their folder too", None
    mine = gains(group, ac, by_name)
    (g, g_sd), (a, a_sd), (o, o_sd) = spread(mine), spread(mine, 1), spread(mine, 2)
    seeds = f"{len(group)} seed{'s' if len(group) > 1 else ''}, paired"
    if not np.isfinite(a):
        return f"over the run each started from ({seeds}): {g:+.4f}{pm(g_sd)} (no AC mask found for an AC split)", mine
    own = np.mean([gains([r], ac)[r["seed"]][2] for r in group])
    start = np.mean([gains([by_name[r["prov"]["init_from"]["name"]]], ac)[r["seed"]][2] for r in group])
    kept = f"{100 * own / start:.0f}%" if start else "all (it had none)"
    return (f"over the run each started from ({seeds}): AC {a:+.4f}{pm(a_sd)}, outside AC {o:+.4f}{pm(o_sd)}; outside "
            f"AC it keeps {kept} of that run's gain ({own:+.4f} against {start:+.4f})"), mine


def pm(sd):
    return f" +- {sd:.4f}" if np.isfinite(sd) else ""


def changes(group, ref_group):
    """What differs from the reference, in words: flags, the stage 02 result, the code's files."""
    mine, ref = group[0]["prov"], ref_group[0]["prov"]
    changed = {key: f"{ref['settings'].get(key)} -> {v}" for key, v in mine["settings"].items()
               if ref["settings"].get(key) != v}
    if mine["baseline"]["fingerprint"] != ref["baseline"]["fingerprint"]:
        changed["stage 02 result"] = mine["baseline"]["file"]
    files = provenance.code_differs(mine.get("code"), ref.get("code"))
    if files:
        changed["code"] = f"differs (files {files})"
    return ", ".join(f"{key} {v}" for key, v in changed.items()) or "nothing"


def main(argv=None):
    args = get_args(argv)
    try:
        runs = load_runs(args.paths)
        groups = {}
        for r in runs:
            study = (r["prov"]["stories"], r["prov"].get("subject_data"))  # the stories and the subject's data
            groups.setdefault((kind(r), r["prov"]["tag"], r["folder"], study), []).append(r)
        ac = {key: find_ac(args.paths, key[0][0], len(g[0]["delta"]), key[3][1]) for key, g in groups.items()}
        per = {key: gains(group, ac[key]) for key, group in groups.items()}  # per seed: all, AC, outside AC
        by_name = {r["name"]: r for r in runs}
        refs = {}
        for key, group in groups.items():
            refs.setdefault(key[0], (key, group))
        print(f"{'runs (subject roi mode [from])':36s} {'tag':7s} {'seeds':>5s} {'gain':>8s} {'sd':>7s} "
              f"{'AC':>8s} {'non-AC':>8s}  best epoch / epochs")
        for key, group in groups.items():
            (g, sd), (a, _), (o, _) = spread(per[key]), spread(per[key], 1), spread(per[key], 2)
            print(f"{' '.join(x for x in key[0] if x):36s} {key[1] or 'default':7s} {len(group):5d} {g:+8.4f} {sd:7.4f} "
                  f"{a:+8.4f} {o:+8.4f}  " + " ".join(f"{r['best']}/{len(r['val'])}" for r in group)
                  + f"   [{args.paths[key[2]]}]")
        last = [r["name"] for r in runs if r["best"] == len(r["val"])]
        if last:
            print(f"\nthe best epoch was the last in {len(last)} of {len(runs)} runs: those may have stopped while "
                  "still improving (more --epochs would tell)")
        print()
        panels = {}
        for key, group in groups.items():
            (ref_key, ref), k = refs[key[0]], key[0]
            name = f"{' '.join(x for x in k if x)} [{key[1] or 'default'}]"
            if ref is not group and key[3] != ref_key[3]:
                print(f"{name} against [{ref[0]['prov']['tag'] or 'default'}]: ANOTHER STUDY (its stories or "
                      f"{k[0]}'s responses differ): not comparable, no verdict")
            elif ref is not group:
                print(f"{name} against [{ref[0]['prov']['tag'] or 'default'}]: changes {changes(group, ref)}; "
                      f"gain {verdict(per[key], per[ref_key])}")
            from_start = None
            if k[3]:
                words, from_start = against_start(group, ac[key], by_name)
                print(f"{name} {words}")
            elif ref is group:
                print(f"{name}: the reference for its kind")
            panels.setdefault(k[1], []).append((label(group, ref, args.paths), from_start or per[key],
                                                from_start is not None))
        out = args.out or os.path.join(args.paths[0] if os.path.isdir(args.paths[0]) else os.path.dirname(args.paths[0]),
                                       "compare.png")
        plot(panels, out)
        print(f"\nwrote {out}")
    except StudyError as e:
        plumbing.fail(e)


def find_ac(paths, subject, n_voxels, subject_data):
    """The subject's AC mask from the data folder of the runs' own study: a folder beside the
    results (or ./data) whose study.npz gives the subject the runs' fingerprint (else None)."""
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path)))
        for study in sorted(glob.glob(os.path.join(glob.escape(folder), "*", "study.npz"))) + ["data/study.npz"]:
            f = os.path.join(os.path.dirname(study), "subjects", f"{subject}.npz")
            if not (os.path.exists(study) and os.path.exists(f)):
                continue
            with np.load(study, allow_pickle=False) as st:
                if "subject_fingerprints" not in st or dict(zip(st["subjects"], st["subject_fingerprints"])).get(
                        subject) != subject_data:  # another study's folder
                    continue
            with np.load(f, allow_pickle=False) as d:
                if "roi_AC" in d and len(d["roi_AC"]) == n_voxels:
                    return d["roi_AC"]
    return None


def plot(panels, path):
    """One panel per ROI the runs were tuned on (their gains differ by an order of magnitude), each
    on its own voxels (AC runs: the AC voxels; else all): each group's seeds as points, its mean and
    +- sd as a bar; runs started from another are plotted against that run, as their verdict is."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    widths = [max(2, len(rows)) for rows in panels.values()]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.7 * sum(widths) + 1.5, 5), squeeze=False,
                             gridspec_kw=dict(width_ratios=widths), constrained_layout=True)
    for ax, (roi, rows) in zip(axes[0], panels.items()):
        col = 1 if roi == "AC" and all(np.isfinite(v[1]) for _, per, _ in rows for v in per.values()) else 0
        for i, (name, per, from_start) in enumerate(rows):
            values = [v[col] for v in per.values()]
            ax.plot([i] * len(values), values, "o", color=f"C{i}", alpha=0.7, ms=5)
            ax.errorbar(i + 0.15, np.mean(values), yerr=np.std(values) if len(values) > 1 else None, fmt="_",
                        color="k", ms=14, capsize=3)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xticks(range(len(rows)), ["\n".join(textwrap.wrap(name + (" (against its start run)" if f else ""), 24,
                                                                break_long_words=False, break_on_hyphens=False))
                                         for name, _, f in rows], fontsize=6.5)
        ax.set(xlim=(-0.6, len(rows) - 0.4), title=f"tuned on {roi}",
               ylabel=f"gain in mean test r {'in AC' if col else 'over all voxels'} (seeds; mean +- sd)")
    fig.suptitle("stage 03 runs: linearized test r over the untuned model at the same layer", fontsize=10)
    plumbing.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
