"""docs/exercises.md: its cheapest exercise (stage 02's delays) runs end to end, as written there,
on the tiny study: the commands come from the exercise's block in the document."""
import json
import os
import re
import shlex

from lib import plumbing
from helpers import ROOT, one, run_stage


def exercise_lines(name):
    text = open(os.path.join(ROOT, "docs", "exercises.md")).read()
    block = re.search(rf"<!-- exercise: {name} -->\s*```(?:sh|bash)?\n(.*?)```", text, re.S)
    assert block, f"docs/exercises.md has no block for the exercise {name!r}"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_the_delays_exercise_runs_as_written(tiny_study, tmp_path, capsys):
    results = str(tmp_path / "results")
    io = ["--data", tiny_study, "--results", results]
    for line in exercise_lines("delays"):
        argv = shlex.split(line)
        assert argv[0] == "python" and argv[1] == "02_baseline_ridge.py", line
        assert run_stage(argv[1], argv[2:] + io) == 0, line
    # the one-delay baseline sits beside the paper's, each with its own recipe recorded
    for subj in ("sim01", "sim02"):
        paper = plumbing.load_npz(f"{results}/02_baseline_{subj}.npz")
        one_delay = plumbing.load_npz(one(f"{results}/02_baseline_{subj}_*.npz"))
        assert list(paper["delays"]) == [1, 2, 3, 4] and list(one_delay["delays"]) == [1]
        assert json.loads(str(one_delay["provenance"]))["settings"]["delays"] == [1]
    out = capsys.readouterr().out
    assert out.count("mean r all") == 2  # each run printed its table to compare
