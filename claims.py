"""The paper's claims, checked on a results folder: what the paper reports, what these runs
measured, and whether it holds here (make demo ends with it; results/claims.md).

    python claims.py                                      # results/ of make demo, data/
    python claims.py experiments/mine/results --data experiments/mine/data --subject sim01

Every verdict is computed from the result files (stage 03's runs of the subject, stage 04's
matrix, stage 05's probes), by the rule printed beside it; a claim whose runs are not there is
"not run here", with the command that runs them. Gains are like for like: a tuned model's
linearized test r minus the untuned model's at the same layer, mean over voxels.
"""
import glob
import json
import os
import sys

import numpy as np

from lib import plumbing
from lib.plumbing import StudyError, tag_type
from lib.provenance import RUN_FILE

HOLDS, FAILS, NOT_RUN = "holds", "does not hold", "not run here"


def get_parser():
    p = plumbing.parser(__doc__)
    p.add_argument("results", nargs="?", default="results", help="a results folder (default: results/)")
    p.add_argument("--data", default="data", help="its study's data folder (the AC mask)")
    p.add_argument("--subject", help="whose runs (default: the subject with whole-cortex runs of most seeds)")
    p.add_argument("--out", help="the table's markdown file (default: <results>/claims.md)")
    p.add_argument("--recipe", choices=["repo", "authors"], default="repo", help="whose results: "
                   "those made with stages 02-05's --recipe (default: this repository's)")
    p.add_argument("--tag", type=tag_type, help="which stage 03 settings when the folder holds runs of "
                   "several: their tag (6 hex digits in the name) or 'default' (default: the tag with "
                   "the most whole-cortex seeds of the subject)")
    return p


def recipe_of(result):
    """The --recipe a result was made with: stage 03's in its settings, the others' in `recipe`."""
    if "settings" in result:
        return json.loads(str(result["settings"])).get("recipe", "repo")
    return str(result.get("recipe", "repo"))


def load(results, pattern, recipe="repo"):
    """The results matching `pattern` made with `recipe` (runs of both live side by side)."""
    found = [plumbing.load_npz(f) for f in sorted(glob.glob(os.path.join(results, pattern)))]
    return [r for r in found if recipe_of(r) == recipe]


def own_tag(path):
    """The settings tag in a stage 03 run's own name ('' for the defaults'; a run started from
    another carries that one's name after its own), None for a file that is no run's."""
    m = RUN_FILE.fullmatch(os.path.basename(path))
    return m and (m.group(5) or "")


def pick_tag(files, tag, what, fix="say which with --tag"):
    """The settings of the runs a claim compares: `tag` if given ('default': ''), else the tag most
    of `files` carry; seeds of other settings are never counted as seeds of these."""
    counts = {}
    for f in files:
        counts[own_tag(f)] = counts.get(own_tag(f), 0) + 1
    if tag is not None or not counts:
        return "" if tag == "default" else tag
    top = [t for t, n in counts.items() if n == max(counts.values())]
    if len(top) > 1:
        raise StudyError(f"{what} are of {len(top)} settings with {max(counts.values())} seed(s) each (tags "
                         f"{', '.join(sorted(t or 'default' for t in top))}): {fix}")
    return top[0]


def gain(run, mask=None):
    d = run["test_r_tuned"] - run["test_r_untuned"]
    return float(d.mean() if mask is None else d[mask].mean())


def pm(values):
    return f"{np.mean(values):+.4f} +- {np.std(values):.4f}" if len(values) > 1 else f"{values[0]:+.4f}"


def claim_1(whole, full, base_r):
    """Whole-cortex LoRA raises mean performance (the paper: about +12.5%) more stably across seeds
    than full fine-tuning. Holds: every seed's gain positive; stable: the seeds' sd of LoRA's gains
    below full fine-tuning's (at least two seeds of each)."""
    if not whole:
        return [("1. whole-cortex tuning raises mean test r", "about +12.5%", "no whole-cortex LoRA run",
                 NOT_RUN, "make 03")]
    g = [gain(r) for r in whole]
    rows = [("1. whole-cortex tuning raises mean test r", "about +12.5%",
             f"{pm(g)} ({np.mean(g) / base_r:+.0%} of the untuned {base_r:.3f}), {len(g)} seed(s)",
             HOLDS if min(g) > 0 else FAILS, "every seed's gain > 0")]
    if len(whole) < 2 or len(full) < 2:
        rows.append(("1. ... more stably with LoRA than full fine-tuning", "smaller spread across seeds",
                     f"{len(whole)} LoRA and {len(full)} full fine-tuning seed(s)", NOT_RUN, "make stability"))
    else:
        gf = [gain(r) for r in full]
        rows.append(("1. ... more stably with LoRA than full fine-tuning", "smaller spread across seeds",
                     f"sd across seeds: LoRA {np.std(g):.4f}, full {np.std(gf):.4f} (full's mean gain "
                     f"{np.mean(gf):+.4f})", HOLDS if np.std(g) < np.std(gf) else FAILS, "LoRA's sd < full's"))
    return rows


def claim_2(whole, from_whole, ac):
    """Whole-cortex tuning costs AC; AC tuning of the whole-cortex model wins AC back while keeping
    most of the gain elsewhere. Holds: the mean AC change under whole-cortex tuning is negative; AC
    over the run it started from positive and at least half of that run's gain outside AC kept."""
    rows = []
    if whole:
        a = [gain(r, ac) for r in whole]
        rows.append(("2. whole-cortex tuning costs AC", "AC r falls", f"AC change {pm(a)}",
                     HOLDS if np.mean(a) < 0 else FAILS, "mean AC change < 0"))
    if not from_whole:
        return rows + [("2. AC tuning of it wins AC back, keeps the rest", "AC up, most gains kept",
                        "no AC run started from the whole-cortex run", NOT_RUN, "make 03")]
    over = [float((r["test_r_tuned"] - r["test_r_start"])[ac].mean()) for r in from_whole]
    kept = [gain(r, ~ac) / float((r["test_r_start"] - r["test_r_untuned"])[~ac].mean()) for r in from_whole]
    rows.append(("2. AC tuning of it wins AC back, keeps the rest", "AC up, most gains kept",
                 f"AC over the whole-cortex run {pm(over)}; its gain outside AC kept: "
                 + ", ".join(f"{k:.0%}" for k in kept),
                 HOLDS if min(over) > 0 and min(kept) >= 0.5 else FAILS, "AC change > 0 and >= 50% kept"))
    return rows


def claim_3(cross):
    """A model tuned on one subject helps the others. Holds: every off-diagonal gain positive (a
    single-subject model on another subject, paired by name: stage 04's joint rows and a subset's
    own-subject cells are not transfers)."""
    if cross is None:
        return [("3. a model tuned on one subject helps others", "gains on other subjects",
                 "no stage 04 result", NOT_RUN, "make 04")]
    evaluated = [str(b) for b in cross["evaluated_on"]]
    cells = [(a, b, float(cross["mean_delta_r"][i, j])) for i, a in enumerate(str(a) for a in cross["tuned_on"])
             if not a.startswith("joint-") for j, b in enumerate(evaluated)]
    off, own = [g for a, b, g in cells if a != b], [g for a, b, g in cells if a == b]
    if not off:
        return [("3. a model tuned on one subject helps others", "gains on other subjects",
                 "stage 04's result holds no model scored on another subject", NOT_RUN, "make 04")]
    return [("3. a model tuned on one subject helps others", "gains on other subjects",
             f"off-diagonal mean {np.mean(off):+.4f} (min {min(off):+.4f}), diagonal "
             + " / ".join(f"{x:+.4f}" for x in own), HOLDS if min(off) > 0 else FAILS,
             "every off-diagonal gain > 0")]


def claim_4(probes):
    """Linear probes find more semantic information after whole-cortex tuning. Holds: at the tuned
    layer, the whole-cortex model's semantic probe beats the baseline's on most held-out folds and
    on average (paired by fold)."""
    if probes is None or "whole" not in list(probes["models"]):
        return [("4. more semantic information after tuning", "semantic probe up", "no stage 05 result",
                 NOT_RUN, "make 05")]
    models, names = list(probes["models"]), list(probes["probes"])
    layer = int(probes.get("tuned_layer", probes["scores"].shape[1] - 1))
    k = names.index("semantic")
    d = probes["scores_by_fold"][models.index("whole"), layer, k] - probes["scores_by_fold"][models.index("baseline"), layer, k]
    d = d[np.isfinite(d)]
    return [("4. more semantic information after tuning", "semantic probe up",
             f"whole - baseline at layer {layer}: {d.mean():+.3f} +- {d.std():.3f}, higher on "
             f"{(d > 0).sum()} of {len(d)} folds", HOLDS if d.mean() > 0 and (d > 0).sum() > len(d) / 2 else FAILS,
             "mean > 0 and higher on most folds")]


def still_improving(runs):
    """Runs whose best epoch was their last one at the epochs they were allowed: measured mid-climb."""
    capped = [r for r in runs if int(r["best_epoch"]) == len(r["val_r_by_epoch"])
              == json.loads(str(r["settings"]))["epochs"]]
    if not capped:
        return f"No run was still improving at its epoch cap ({len(runs)} runs)."
    cap = sorted({len(r["val_r_by_epoch"]) for r in capped})
    return (f"{len(capped)} of {len(runs)} runs had their best epoch at the cap ({'/'.join(map(str, cap))} epochs): "
            "they were still improving, so their gains are measured mid-climb (bench/claims.sh trains until "
            "validation stops, up to 20 epochs: bench/RESULTS.md).")


def check(results, data, subject=None, recipe="repo", tag=None):
    """Every claim's rows (claim, the paper, measured here, verdict, rule or command) and the
    line on runs still improving, from the results of `recipe` and, where runs of several settings
    are there, those of one (pick_tag)."""
    read = {}  # each result file read once, however many patterns match it

    def result(f):
        return read[f] if f in read else read.setdefault(f, plumbing.load_npz(f))

    def runs(pattern):
        return [f for f in sorted(glob.glob(os.path.join(results, pattern))) if own_tag(f) is not None
                and recipe_of(result(f)) == recipe]
    whole_all = [f for f in runs("03_*_whole_lora_seed*.npz")
                 if "_from_" not in os.path.basename(f) and "joint-" not in os.path.basename(f)]
    if not whole_all and subject is None:
        raise StudyError(f"{results}: no stage 03 whole-cortex run (03_<subject>_whole_lora_seed*.npz): run make 03")
    subject = subject or max({os.path.basename(f).split("_")[1] for f in whole_all},
                             key=lambda s: sum(f"03_{s}_" in f for f in whole_all))
    ac = plumbing.load_npz(os.path.join(data, "subjects", f"{subject}.npz"), "the subject's file")["roi_AC"]
    mine = [f for f in whole_all if os.path.basename(f).startswith(f"03_{subject}_")]
    tag = pick_tag(mine, tag, f"{results}: {subject}'s whole-cortex LoRA runs")
    full_files = runs(f"03_{subject}_whole_full_seed*.npz")
    full_tag = pick_tag(full_files, None, f"{results}: {subject}'s full fine-tuning runs",
                        "move one settings' runs to a folder of their own")

    def of(files, t=tag):
        return [result(f) for f in files if t is None or own_tag(f) == t]

    def built_from_these(result):  # a stage 04/05 result of these runs only
        return all(own_tag(n + ".npz") == tag for n in map(str, result.get("runs", ())) if n)
    whole = [r for r in of(mine) if not str(r["init_from"])]
    full = of(full_files, full_tag)
    from_whole = [r for r in of(runs(f"03_{subject}_AC_lora_seed*_from_*whole*.npz")) if "test_r_start" in r]
    base = load(results, f"02_baseline_{subject}*.npz", recipe)
    cross = next((d for d in load(results, "04_cross_subject*.npz", recipe) if built_from_these(d)), None)
    probes = next((d for d in load(results, "05_probes*.npz", recipe) if built_from_these(d)), None)
    rows = (claim_1(whole, full, float(base[0]["test_r"].mean()) if base else np.nan)
            + claim_2(whole, from_whole, ac) + claim_3(cross) + claim_4(probes))
    note = still_improving(of(runs("03_*.npz")))
    if len({own_tag(f) for f in mine}) > 1:
        note += (f" Runs of the settings tagged {tag or 'default'}; the folder holds {subject}'s runs of other "
                 "settings too (--tag picks them).")
    return subject, rows, note


def table(subject, rows, note, recipe="repo"):
    which = "" if recipe == "repo" else f" of --recipe {recipe}"
    out = [f"Claims checked on {subject}'s runs{which} (claims.py):", "",
           "| claim | the paper | measured here | verdict | rule / to run it |", "|---|---|---|---|---|"]
    out += [f"| {c} | {p} | {m} | **{v}** | {r} |" for c, p, m, v, r in rows]
    return "\n".join(out + ["", note])


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        subject, rows, note = check(args.results, args.data, args.subject, args.recipe, args.tag)
    except StudyError as e:
        plumbing.fail(e)
    text = table(subject, rows, note, args.recipe)
    print(text)
    name = "claims.md" if args.recipe == "repo" else f"claims_{args.recipe}.md"
    out = args.out or os.path.join(args.results, name)
    plumbing.save_text(out, text + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
