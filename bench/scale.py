"""Scale rehearsal: a study with UTS01's real shape through stages 01-05, peak RAM per stage.

UTS01 in ds003020 is 84 stories (29,768 TRs in respdict.json, 177 to 541 per story) and 81,126
voxels. This builds a simulated study with those TR counts (the first N of them) and that many voxels
for one subject, then runs every stage with the tiny model as its own process and records, per stage:
wall time, peak RSS (the child's ru_maxrss), disk written, and peak RSS divided by the size of the
subject's train + validation response array (goal: <= 2, so that UTS01 fits in 24 GB).

Run it at two or more sizes to see the growth; the full 84 stories (~10 GB of responses) is then
extrapolated with a line through the two largest measured sizes, labelled as such:

    .venv/bin/python bench/scale.py --stories 6 12             # ~25 min on 2 cores
    .venv/bin/python bench/scale.py --stories 6 --repo /tmp/old --stages 02 --data-from /tmp/brainwavlm_scale \
        --out /tmp/scale_old          # another checkout's stage 02 on the same study

Writes <out>/scale.json (one record per size and stage) and prints a table.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESPDICT = os.path.join(HERE, "tests", "fixtures", "ds003020_respdict.json")  # ds003020's own TR counts
TEST, VAL = "wheretheressmoke", ["fromboyhoodtofatherhood", "waitingtogo"]  # the defaults of stage 01

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--stories", type=int, nargs="+", default=[6, 12], help="study sizes (stories, test included)")
p.add_argument("--voxels", type=int, default=81126, help="UTS01's voxel count")
p.add_argument("--stages", nargs="+", default=["01", "02", "03", "04", "05"])
p.add_argument("--repo", default=HERE, help="checkout whose stage scripts to run (default: this one)")
p.add_argument("--out", default="/tmp/brainwavlm_scale")
p.add_argument("--threads", type=int, default=None)
p.add_argument("--data-from", help="a previous --out of this bench: use its <n>stories/data (skip stage 01)")
args = p.parse_args()

counts = json.load(open(RESPDICT))
train = [s for s in counts if s != TEST and s not in VAL]


def run_stage(cmd, log):
    """Run one stage as a child; return (wall s, peak RSS GB of that child alone, exit code)."""
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=args.repo, stdout=f, stderr=subprocess.PIPE,
                              text=True)
    wall = time.time() - t0
    lines = proc.stderr.strip().splitlines()
    with open(log, "a") as f:
        f.write("\n".join(lines[:-1]))
    return wall, int(lines[-1]) * 1024 / 1e9, proc.returncode


def disk(*folders):
    return sum(os.path.getsize(os.path.join(d, f)) for folder in folders for d, _, fs in os.walk(folder) for f in fs)


records = []
for n in args.stories:
    root = os.path.join(args.out, f"{n}stories")
    data, results, ckpt = (os.path.join(root, x) for x in ("data", "results", "checkpoints"))
    if args.data_from:
        data = os.path.join(args.data_from, f"{n}stories", "data")
    os.makedirs(root, exist_ok=True)
    story_trs = [counts[s] for s in train[:n - 3]] + [counts[s] for s in VAL]
    resp_bytes = sum(story_trs) * args.voxels * 4
    py = os.path.join(HERE, ".venv", "bin", "python") if os.path.exists(os.path.join(HERE, ".venv")) else sys.executable
    threads = ["--threads", str(args.threads)] if args.threads else []
    common_args = ["--data", data, "--results", results, *threads]
    stage_cmds = {
        "01": ["01_prepare_data.py", "--data", data, "--cortex", "none", "--n-subjects", "1", "--n-voxels", str(args.voxels),
               "--n-val-stories", "2", "--story-trs", *map(str, story_trs),
               "--test-seconds", str(11.0 + 2.0 * (counts[TEST] - 1) + 1.0)],
        "02": ["02_baseline_ridge.py", *common_args],
        "03": ["03_finetune_lora.py", *common_args, "--checkpoints", ckpt, "--subject", "sim01", "--epochs", "1"],
        "04": ["04_cross_subject.py", *common_args, "--checkpoints", ckpt],
        "05": ["05_linear_probes.py", *common_args, "--checkpoints", ckpt, "--models", "baseline", "whole"],
    }
    print(f"{n} stories: {sum(story_trs)} train + validation TRs x {args.voxels} voxels = "
          f"{resp_bytes / 1e9:.2f} GB of responses", flush=True)
    for stage in args.stages:
        before = disk(data, results, ckpt)
        wall, rss, rc = run_stage([py, *stage_cmds[stage]], os.path.join(root, f"stage{stage}.log"))
        rec = dict(stories=n, trs=sum(story_trs), voxels=args.voxels, resp_gb=resp_bytes / 1e9, stage=stage,
                   wall_s=round(wall, 1), peak_rss_gb=round(rss, 3), rss_per_resp=round(rss * 1e9 / resp_bytes, 2),
                   disk_gb=round((disk(data, results, ckpt) - before) / 1e9, 3), rc=rc, repo=args.repo)
        records.append(rec)
        print(f"  stage {stage}: {wall:7.1f} s, peak RSS {rss:6.2f} GB ({rec['rss_per_resp']:.2f} x responses), "
              f"disk +{rec['disk_gb']:.2f} GB{'' if rc == 0 else f'  FAILED rc={rc}, see {root}/stage{stage}.log'}",
              flush=True)
        with open(os.path.join(args.out, "scale.json"), "w") as f:  # after every stage: a killed run keeps its rows
            json.dump(records, f, indent=1)
        if rc:
            break

# extrapolate to UTS01's full size per stage: a line through the two largest measured sizes, the same
# rule as bench/plot_scale.py (which also merges the JSON of several runs into the README's table)
full_gb = (sum(counts.values()) - counts[TEST]) * args.voxels * 4 / 1e9
print(f"\nUTS01 full size: {full_gb:.2f} GB of train + validation responses")
if len(set(args.stories)) >= 2:
    print("stage  peak RSS (GB)  wall (s)   disk (GB)   <- extrapolated linearly in response size")
    for stage in args.stages:
        rs = [r for r in records if r["stage"] == stage and r["rc"] == 0]
        if len({r["stories"] for r in rs}) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["resp_gb"])[-2:]
        x = [r["resp_gb"] for r in rs]
        fit = {k: np.polyval(np.polyfit(x, [r[k] for r in rs], 1), full_gb)
               for k in ("peak_rss_gb", "wall_s", "disk_gb")}
        print(f"  {stage}   {fit['peak_rss_gb']:10.1f}  {fit['wall_s']:9.0f}  {fit['disk_gb']:9.2f}")
