"""Every result on the brain: pycortex's own WebGL viewer (cortex.webgl.make_static), a brain to
turn, inflate, flatten and hover, switching between maps, as this field shares voxelwise results.

Each subject on its own cortex: the simulated study's on pycortex's S1 (its voxels are a sample of
S1's cortical voxels, the rest is blank), ds003020's on the subject's surfaces in the dataset's
pycortex-db (as 01_prepare_data.py --rois-from-pycortex finds them). Its maps, named in words:
- stage 02: test r of the untuned model (inferno, 0 to the 99th percentile, as the flatmaps);
- stage 03: each run's gain, its linearized test r minus the untuned model's at its layer, and for
  a run started from another (--init-from: the AC run) its change over that run (RdBu_r, centred
  on 0, +- the 99th percentile of the change);
- stage 04: the gain from each other subject's tuned model, scored with this subject's recipe.
The viewer opens on the first subject's whole-cortex run: where did tuning help, where did it cost?
The maps come from the result files, each checked as the stages check their inputs (a result of
another study, or one whose inputs were rerun since, is refused in one line; nothing is written).

    make viewer                          # after make demo and make pycortex: results/viewer/
    python -m http.server 8000 --bind 127.0.0.1 --directory results/viewer   # then open the address
    python viewer.py --data experiments/mse/data --results experiments/mse/results --subjects sim01
"""
import os

import numpy as np

from lib import anatomy, browser, inputs, plumbing
from lib.plumbing import stage
from lib.provenance import describe_run


def get_parser():
    p = plumbing.parser(__doc__)
    p.add_argument("--data", default="data", help="the study's folder (default: data/)")
    p.add_argument("--results", default="results", help="the results to show (default: results/)")
    p.add_argument("--subjects", nargs="+", help="whose maps (default: every subject of the study)")
    p.add_argument("--out", help="the viewer's folder (default: <results>/viewer)")
    p.add_argument("--ds-root", help="ds003020's root, if it moved since stage 01 (the subjects' surfaces)")
    p.add_argument("--screenshot", metavar="PNG", help="also a picture of the map it opens on, inflated, "
                   "taken in headless Chromium (needs Debian's chromium and playwright)")
    return p


def a_map(name, values, source, what, diverging):
    """A map: its name, values, the result it comes from and its look (a change is diverging and
    centred on 0, test r runs from 0; both to the 99th percentile, as the flatmaps)."""
    finite = np.abs(values[np.isfinite(values)])
    top = float(np.quantile(finite, 0.99)) if finite.size and finite.max() > 0 else 1.0
    look = dict(cmap="RdBu_r", vmin=-top, vmax=top) if diverging else dict(cmap="inferno", vmin=0, vmax=top)
    return dict(name=name, values=np.asarray(values, np.float32), source=source,
                description=f"{source}: {what}", **look)


def short(prov):
    """A run in a few words: what it tuned, its seed, its start run (a single run without its subject)."""
    words = describe_run(prov, flags=False)
    return words if "subjects" in prov else words.split(" ", 1)[1]


def settings_words(baseline):
    """How a stage 02 result's map tells it from another's of the same subject: its recipe, or tag."""
    recipe = str(baseline.get("recipe", "repo"))
    return f", the {recipe} recipe" if recipe != "repo" else f", settings {baseline['tag']}" if baseline["tag"] else ""


def subject_maps(subj, baselines, runs, cross, note):
    """A subject's maps, stage by stage: test r (stage 02), each run's gain and a started run's change
    over its start (stage 03), the gain from each other subject's model (stage 04)."""
    several = len(baselines) > 1  # then each says which it is
    maps = [a_map(f"{subj}: test r of the untuned model, layer {int(b['best_layer'])}"
                  + (settings_words(b) if several else ""), b["test_r"],
                  os.path.basename(b["path"]), f"stage 02 ({' '.join(b['provenance']['flags']) or 'defaults'}), "
                  f"test r on the test story{note}", False) for b in baselines]
    for name, run in sorted(runs.items(), key=lambda item: paper_first(item[1]["provenance"])):
        p = run["provenance"]
        if subj not in p.get("subjects", [p["subject"]]):
            continue
        key = "" if "subjects" not in p else f"_{subj}"  # a joint run's arrays carry the subject
        tuned = run[f"test_r_tuned{key}"]
        maps.append(a_map(f"{subj}: gain of {short(p)}", tuned - run[f"test_r_untuned{key}"], f"{name}.npz",
                          f"stage 03, {describe_run(p)}; linearized test r minus the untuned model's at layer "
                          f"{int(run['layer'])}{note}", True))
        if "test_r_start" in run:
            maps.append(a_map(f"{subj}: change over its start run, {short(p)}", tuned - run["test_r_start"],
                              f"{name}.npz", f"stage 03, {describe_run(p)}; its test r minus that of the run it "
                              f"started from{note}", True))
    for c in cross:
        for a, name in zip(c["tuned_on"], c["runs"]):
            if a != subj and not a.startswith("joint-") and f"delta_r_{a}_on_{subj}" in c:
                p = runs[name]["provenance"]
                what = (f"stage 04, {describe_run(p)}, scored with {subj}'s ridge recipe, minus the untuned "
                        f"model at layer {int(runs[name]['layer'])}{note}")
                maps.append(a_map(f"{subj}: gain from {a}'s model ({short(p)})", c[f"delta_r_{a}_on_{subj}"],
                                  os.path.basename(c["path"]), what, True))
    return [dict(m, subject=subj) for m in maps]


def paper_first(prov):
    """Stage 03's runs in the paper's order: whole cortex first, LoRA, single runs, then by seed."""
    return (prov["roi"] != "whole", bool(prov.get("init_from")), prov["mode"] != "lora", "subjects" in prov,
            prov["seed"])


def in_order(maps):
    """The map the viewer opens on first: the first subject's first stage 03 map (its whole-cortex
    LoRA run of the lowest seed: where did tuning help, where did it cost?), else the first map; a
    name that two maps share gets its result's file name."""
    opening = [m for m in maps if m["subject"] == maps[0]["subject"] and m["source"].startswith("03_")][:1]
    maps = opening + [m for m in maps if not any(m is o for o in opening)]
    names = [m["name"] for m in maps]
    return [dict(m, name=f"{m['name']} [{m['source']}]") if names.count(m["name"]) > 1 else m for m in maps]


@stage(get_parser)
def main(args):
    study, places, baselines, runs, cross = inputs.viewer(args)  # every result checked
    out = args.out or os.path.join(args.results, "viewer")
    print(f"viewer: {len(places)} subject(s) of {study['data']}/ with the results in {args.results}/ "
          f"({sum(map(len, baselines.values()))} stage 02, {len(runs)} stage 03, {len(cross)} stage 04)")
    maps = []
    for subj, place in places.items():
        note = (f"; {len(place['columns']):,} of {place['subject']}'s {place['thick'].sum():,} cortical voxels, "
                "the rest blank" if len(place["columns"]) < place["thick"].sum() else "")
        maps += subject_maps(subj, baselines[subj], runs, cross, note)
    blank = [m["name"] for m in maps if not np.any(np.nan_to_num(m["values"]))]  # e.g. a run that never moved
    maps = in_order([m for m in maps if m["name"] not in blank])
    for name in blank:
        print(f"  left out, 0 or NaN at every voxel (nothing to show): {name}")
    for m in maps:
        print(f"  {m['name']}  ({m['cmap']} {m['vmin']:+.3g} .. {m['vmax']:+.3g})")
    views = {m["name"]: anatomy.volume(m["values"], places[m["subject"]], cmap=m["cmap"], vmin=m["vmin"],
                                       vmax=m["vmax"], description=m["description"]) for m in maps}
    anatomy.write_viewer(out, views, next(iter(places.values()))["db"], f"BrainWavLM: {args.results}/")
    if args.screenshot:
        errors = [m for m in browser.screenshot(out, args.screenshot) if m.startswith(("error", "pageerror"))]
        print(f"  {maps[0]['name']}, inflated, in headless Chromium -> {args.screenshot}"
              + "".join(f"\n  the page said: {e}" for e in errors))
    print(f"\nto open it: python -m http.server 8000 --bind 127.0.0.1 --directory {out}")
    return f"{out}/ ({len(maps)} maps)"


if __name__ == "__main__":
    main()
