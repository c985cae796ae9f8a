"""Peak RAM per stage against the size of the responses, before and after, from bench/scale.py's JSON.

    .venv/bin/python bench/plot_scale.py --after /tmp/brainwavlm_scale/scale.json \
        --before /tmp/scale_old/scale.json -o figures/scale_memory.png

Solid lines and dots: measured (after); dashed: each stage's line through its two largest measured
sizes, extended to UTS01's full size (extrapolated); crosses: the code before (measured).
"""
import argparse
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--after", required=True)
p.add_argument("--before", nargs="*", default=[])
p.add_argument("-o", "--out", required=True)
p.add_argument("--full-gb", type=float, default=(29768 - 311) * 81126 * 4 / 1e9, help="UTS01's responses")
args = p.parse_args()

after = [r for r in json.load(open(args.after)) if r["rc"] == 0]
before = [r for f in args.before for r in json.load(open(f)) if r["rc"] == 0]
fig, ax = plt.subplots(figsize=(6.5, 4.2))
for i, stage in enumerate(sorted({r["stage"] for r in after})):
    rs = sorted((r for r in after if r["stage"] == stage), key=lambda r: r["resp_gb"])
    x, y = [r["resp_gb"] for r in rs], [r["peak_rss_gb"] for r in rs]
    color = f"C{i}"
    ax.plot(x, y, "o-", color=color, label=f"stage {stage}")
    if len(x) >= 2:
        fit = np.polyfit(x[-2:], y[-2:], 1)  # the two largest sizes: the growth that lasts
        ax.plot([x[-1], args.full_gb], np.polyval(fit, [x[-1], args.full_gb]), "--", color=color)
    old = [r for r in before if r["stage"] == stage]
    if old:
        ax.plot([r["resp_gb"] for r in old], [r["peak_rss_gb"] for r in old], "x", ms=9, mew=2, color=color)
if before:
    ax.plot([], [], "kx", ms=9, mew=2, label="before the fixes (measured)")
ax.plot([], [], "k--", label="extrapolated to UTS01")
ax.axhline(24, color="k", lw=1)
ax.text(0.2, 22.8, "24 GB: this machine", fontsize=8)
ax.set_ylim(0, 26)
ax.axvline(args.full_gb, color="grey", lw=1, ls=":")
ax.text(args.full_gb, 1, " UTS01", fontsize=8, color="grey")
ax.set(xlabel="train + validation responses of one subject (GB)", ylabel="peak RSS (GB)",
       title="bench/scale.py: peak RAM per stage (81,126 voxels, tiny model)")
ax.legend(fontsize=7, ncol=2)
# the same numbers as a markdown table: measured rows, then each stage's line extended to UTS01
print("| stage | stories | responses (GB) | peak RSS (GB) | RSS / responses | wall (s) | disk (GB) |")
print("|---|---|---|---|---|---|---|")
for stage in sorted({r["stage"] for r in after}):
    rs = sorted((r for r in after if r["stage"] == stage), key=lambda r: r["resp_gb"])
    for r in rs:
        print(f"| {stage} | {r['stories']} | {r['resp_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r['rss_per_resp']:.2f} |"
              f" {r['wall_s']:.0f} | {r['disk_gb']:.2f} |")
    if len(rs) >= 2:
        x = [r["resp_gb"] for r in rs]
        e = {k: np.polyval(np.polyfit(x[-2:], [r[k] for r in rs][-2:], 1), args.full_gb)
             for k in ("peak_rss_gb", "wall_s", "disk_gb")}
        print(f"| {stage} | 84 (extrapolated) | {args.full_gb:.2f} | {e['peak_rss_gb']:.1f} |"
              f" {e['peak_rss_gb'] / args.full_gb:.2f} | {e['wall_s']:.0f} | {e['disk_gb']:.1f} |")
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=90, bbox_inches="tight")
print(f"wrote {args.out}")
