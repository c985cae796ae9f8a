"""00_fetch_ds003020.py: the selection against the published index, the fetch (with a stand-in for
openneuro-py: no network in the tests) interrupted and continued, and English1000's layout."""
import json
import os
import sys
import types

import h5py
import numpy as np
import pytest

from lib import ds003020, fetch, plumbing
from helpers import fails_cleanly, run_stage, stage

FETCH = "00_fetch_ds003020.py"
RESPDICT = os.path.join(os.path.dirname(__file__), "fixtures", "ds003020_respdict.json")


@pytest.fixture(scope="module")
def index():
    return fetch.read_index()


def what_stage_01_reads(index, subjects, val, tmp_path):
    """The files stage 01 (and stage 05, through it) reads for `subjects`, found by stage 01 itself:
    a tree of empty files in the published layout (every path of the index), the real respdict,
    and stage 01's own story choice."""
    root = tmp_path / "ds"
    for p in index:
        if p.startswith(("derivative/", "stimuli/")):
            (root / p).parent.mkdir(parents=True, exist_ok=True)
            (root / p).touch()
    (root / "derivative/respdict.json").write_text(open(RESPDICT).read())
    args = stage("01_prepare_data.py").get_args(["--source", "ds003020", "--ds-root", str(root), "--subjects", *subjects]
                                                 + (["--val-stories", *val] if val else []))
    train, _ = ds003020.find_ds003020(args)
    stories = train + args.val_stories + [args.test_story]
    reads = {f"derivative/preprocessed_data/{s}/{st}.hf5" for s in subjects for st in stories}
    reads |= {f"stimuli/{st}.wav" for st in stories} | {f"derivative/TextGrids/{st}.TextGrid" for st in stories}
    reads |= {"derivative/respdict.json", "derivative/subject_xfms.json", "derivative/english1000sm.hf5"}
    reads |= {p for p in index for s in subjects if p.startswith(f"derivative/pycortex-db/{s}/")}
    return reads


@pytest.mark.parametrize("subjects, val", [(["UTS01", "UTS02", "UTS03"], None),
                                          (["UTS01", "UTS09"], ["waitingtogo", "sloth"])])
def test_the_selection_is_what_stage_01_reads_and_nothing_else(index, subjects, val, tmp_path):
    plan = fetch.select(index, subjects, val=val)
    chosen = {p for files in plan.values() for p in files}
    assert chosen == what_stage_01_reads(index, subjects, val, tmp_path)
    assert not any(p.startswith(("sub-", "derivative/freesurfer", "derivative/fmriprep")) for p in chosen)
    assert sum(sum(f.values()) for f in plan.values()) == sum(index[p] for p in chosen)
    if len(subjects) == 3:  # the paper's three: 84 stories, ~78 GB by the index
        assert len(plan["stimuli"]) == 84 and len(plan["responses"]) == 3 * 84
        assert round(sum(index[p] for p in chosen) / 1e9, 1) == 77.8


def test_the_selection_is_what_a_build_opens(miniature, tmp_path, monkeypatch):
    """The fetch selection against the files stage 01 actually opens while it builds a study (with
    ROIs and flatmaps from pycortex) from a miniature in the published layout: every file it opens
    is selected, and every selected file outside the pycortex databases is opened (pycortex reads
    a part of its database: the selection takes the whole folder of each subject)."""
    import builtins
    import h5py
    root, _ = miniature
    index = {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(root) for f in files}
    subjects = ["UTS01"]  # one subject: pycortex's ROIs and flatmap are the slow part of the build
    plan = fetch.select(index, subjects)
    opened, real_open, real_h5 = set(), builtins.open, h5py.File

    def seen(path):
        path = os.path.abspath(str(path))
        if path.startswith(os.path.abspath(root) + os.sep):
            opened.add(os.path.relpath(path, root))

    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: seen(f) or real_open(f, *a, **k))
    monkeypatch.setattr(h5py, "File", lambda f, *a, **k: seen(f) or real_h5(f, *a, **k))
    code = run_stage("01_prepare_data.py", ["--source", "ds003020", "--ds-root", root, "--data", str(tmp_path / "d"),
                                            "--subjects", *subjects, "--rois-from-pycortex"])
    monkeypatch.undo()
    assert code == 0
    selected = {p for files in plan.values() for p in files}
    opened &= set(index)  # the dataset's own files (pycortex also writes caches into its database)
    assert opened <= selected, sorted(opened - selected)
    assert selected - set(plan["pycortex-db"]) <= opened, sorted(selected - set(plan["pycortex-db"]) - opened)
    assert opened & set(plan["pycortex-db"])  # the pycortex databases are read, from the selected folders
    assert not any(p.startswith(("derivative/preprocessed_data/UTS02/", "derivative/pycortex-db/UTS02/"))
                   for p in selected | opened)  # another subject's files: neither selected nor opened


def test_the_plan_is_printed_before_anything_is_fetched(tmp_path, capsys):
    assert run_stage(FETCH, ["--dest", str(tmp_path / "ds"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ds003020 snapshot 3.1.0 for UTS01 UTS02 UTS03: 84 stories, " in out and "77.8 GB" in out
    assert not os.path.exists(tmp_path / "ds")
    fails_cleanly(FETCH, ["--dest", str(tmp_path / "ds"), "--subjects", "UTS11"], capsys, "unknown subject UTS11")
    fails_cleanly(FETCH, ["--dest", str(tmp_path / "ds"), "--stories", "nosuchstory"], capsys,
                  "--stories nosuchstory: not a story every subject")
    fails_cleanly(FETCH, ["--dest", str(tmp_path / "ds"), "--subjects", "UTS01", "UTS05"], capsys,
                  "the validation/test stories waitingtogo are not shared by UTS01 UTS05")


def stand_in(index, calls, interrupt_first=False, later_layout=False, error=None, version="2026.9.1"):
    """A stand-in openneuro module: writes each included file at its indexed size (sparse, so no disk
    is used). interrupt_first: the first call stops half-way. later_layout: the snapshot spells the
    folder derivatives/ (a derivative/ pattern is not found, as openneuro-py says). error: raised."""
    def download(dataset, target_dir, include, tag=None):
        assert dataset == "ds003020"
        calls.append(dict(include=list(include), tag=tag))
        if error is not None:
            raise error
        if later_layout and any(p.startswith("derivative/") for p in include):
            raise RuntimeError("Could not find path in the dataset:\n- derivative/respdict.json\nDid you mean ...")
        spell = {p: ("derivatives/" + p[len("derivative/"):] if later_layout and p.startswith("derivative/") else p)
                 for p in index}
        exact = [p for p in include if not p.endswith("/**")]
        folders = [p[:-2] for p in include if p.endswith("/**")]
        wanted = [p for p in index if spell[p] in exact or any(spell[p].startswith(f) for f in folders)]
        for k, p in enumerate(wanted):
            if interrupt_first and len(calls) == 1 and k == len(wanted) // 2:
                raise KeyboardInterrupt
            path = os.path.join(target_dir, spell[p])
            if os.path.exists(path) and os.path.getsize(path) == index[p]:
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if p == "derivative/respdict.json":
                open(path, "w").write(open(RESPDICT).read())
            elif p == "derivative/subject_xfms.json":
                text = json.dumps({s: f"{s}_auto" for s in ("UTS01", "UTS02")})
                open(path, "w").write(text.ljust(index[p]))
            else:
                with open(path, "wb") as f:
                    f.truncate(index[p])
    return types.SimpleNamespace(download=download, __version__=version)


ONE_STORY = ["--subjects", "UTS01", "UTS02", "--stories", "sweetaspie"]


def test_an_interrupted_fetch_continues_and_ends_with_stage_01s_check(index, tmp_path, capsys, monkeypatch):
    """Interrupted once half-way, the rerun asks only for the rest and finishes with stage 01 finding
    everything it reads; the snapshot asked for is the index's, 3.1.0, and the client is named."""
    dest = tmp_path / "ds"
    calls = []
    monkeypatch.setitem(sys.modules, "openneuro", stand_in(index, calls, interrupt_first=True))
    argv = ["--dest", str(dest)] + ONE_STORY
    assert run_stage(FETCH, argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted: rerun the same command") and len(err.strip().splitlines()) == 1
    assert run_stage(FETCH, argv) == 0
    out = capsys.readouterr().out
    assert "ds003020 snapshot 3.1.0 for UTS01 UTS02" in out and "fetching snapshot 3.1.0 with openneuro-py 2026.9.1" in out
    assert "to fetch:" in out and "done: stage 01 finds all it reads (1 training stories)" in out
    assert calls[0] == calls[1] and calls[0]["tag"] == "3.1.0" == fetch.INDEX_SNAPSHOT
    assert "already in" in out and "already in " + str(dest) + ": 0.0 GB" not in out  # the rerun kept the first half
    assert run_stage(FETCH, argv) == 0  # a third run has nothing to fetch
    assert len(calls) == 2 and "to fetch: 0.0 GB (0 files)" in capsys.readouterr().out


def test_another_snapshot_is_asked_for_by_name_and_read_in_its_later_layout(index, tmp_path, capsys, monkeypatch):
    """--snapshot 4.0.0 of a dataset that now spells derivatives/: the plan says the index is 3.1.0's,
    the derivative/ patterns are not found, the fetch asks again with derivatives/, and the size
    check and stage 01's own check read the later layout."""
    dest = tmp_path / "ds"
    calls = []
    monkeypatch.setitem(sys.modules, "openneuro", stand_in(index, calls, later_layout=True))
    assert run_stage(FETCH, ["--dest", str(dest), "--snapshot", "4.0.0"] + ONE_STORY) == 0
    out = capsys.readouterr().out
    assert "the file index describes snapshot 3.1.0" in out and "derivatives/ (its later spelling)" in out
    assert [c["tag"] for c in calls] == ["4.0.0", "4.0.0"]
    assert all(p.startswith("derivatives/") for p in calls[1]["include"] if p.startswith("deriv"))
    assert os.path.isdir(dest / "derivatives") and not os.path.exists(dest / "derivative")
    assert "derivatives in derivatives/" in out and "done: stage 01 finds all it reads" in out


def test_a_foreign_snapshot_or_a_client_error_is_one_line(index, tmp_path, capsys, monkeypatch):
    dest = tmp_path / "ds"
    dest.mkdir()
    (dest / "dataset_description.json").write_text(json.dumps({"DatasetDOI": "doi:10.18112/openneuro.ds003020.v4.0.1"}))
    calls = []
    monkeypatch.setitem(sys.modules, "openneuro", stand_in(index, calls))
    err = fails_cleanly(FETCH, ["--dest", str(dest)] + ONE_STORY, capsys, "holds ds003020 snapshot 4.0.1")
    assert "you asked for 3.1.0" in err and "--snapshot 4.0.1" in err and calls == []
    (dest / "dataset_description.json").unlink()
    for error, msg in [(FileExistsError("You requested to download revision 3.1.0, but revision 4.0.1 exists"),
                        "holds another snapshot of ds003020 than 3.1.0"),
                       (RuntimeError("Could not find path in the dataset:\n- derivative/x"),
                        "could not fetch ds003020 3.1.0: Could not find path in the dataset:"),
                       (OSError("[Errno 101] Network is unreachable"), "failed (OSError: [Errno 101] Network is unreachable)")]:
        monkeypatch.setitem(sys.modules, "openneuro", stand_in(index, [], error=error))
        fails_cleanly(FETCH, ["--dest", str(dest)] + ONE_STORY, capsys, msg)
    monkeypatch.setitem(sys.modules, "openneuro", stand_in(index, [], version="2026.3.1"))
    err = fails_cleanly(FETCH, ["--dest", str(dest)] + ONE_STORY, capsys, "openneuro-py 2026.3.1 predates")
    assert "openneuro-py>=2026.4.0" in err


def test_english1000_is_read_as_the_lab_reads_it(tmp_path):
    """data: dimensions x words, vocab: bytes; words are looked up lower-cased, missing ones left out."""
    vocab = [b"dog", b"cat", b"house"]
    data = np.arange(12, dtype=np.float64).reshape(4, 3)
    path = tmp_path / "english1000sm.hf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("vocab", data=np.array(vocab))
    found, vectors = ds003020.english1000(str(path), {"Dog", "house", "zebra"})
    assert list(found) == ["dog", "house"]
    np.testing.assert_array_equal(vectors, data[:, [0, 2]].T)
    with h5py.File(tmp_path / "bad.hf5", "w") as f:
        f.create_dataset("embeddings", data=data)
    with pytest.raises(plumbing.StudyError, match="no 'data' and 'vocab' datasets"):
        ds003020.english1000(str(tmp_path / "bad.hf5"), {"dog"})
