"""The study's files (README, "Data layout"): study.npz and each subject's file, as stage 01 wrote them.

Used by every stage 02-05, compare.py, bench/ and common.score_on_test. Readers only: a missing
file or an older layout is one StudyError naming the command that rebuilds it; a subject's
responses (UTS01's are ~10 GB) are read lazily, one story at a time.
"""
import os

import numpy as np

from lib.plumbing import StudyError, array_shape, load_npz


def load_study(data):
    """study.npz as plain Python values: the splits, and the fingerprints stage 01 recorded (of the
    stories and splits, of each subject's file) that every result records (lib/provenance.py)."""
    path = os.path.join(data, "study.npz")
    if not os.path.exists(path):
        raise StudyError(f"{path} not found: build the data first with `python 01_prepare_data.py --data {data}`")
    saved = load_npz(path)
    missing = sorted({"source", "subjects", "train_stories", "val_stories", "test_story", "tr",
                      "stories_fingerprint", "subject_fingerprints"} - set(saved))
    if missing:
        raise StudyError(f"{path} is from an older layout (no {', '.join(missing)}); rebuild it with "
                         f"`python 01_prepare_data.py --data {data}` (with the flags it was built with)")
    subjects = [str(s) for s in saved["subjects"]]
    return dict(source=str(saved["source"]), subjects=subjects, data=data,
                train=[str(s) for s in saved["train_stories"]], val=[str(s) for s in saved["val_stories"]],
                test=str(saved["test_story"]), tr=float(saved["tr"]),
                stories_fingerprint=str(saved["stories_fingerprint"]),
                subject_fingerprints=dict(zip(subjects, (str(f) for f in saved["subject_fingerprints"]))))


def load_subject(data, subject, study):
    """subjects/<subject>.npz, checked for every response the stages need, opened lazily: d[key] reads
    one array (UTS01's responses are ~10 GB; no stage holds them twice)."""
    path = os.path.join(data, "subjects", f"{subject}.npz")
    if subject not in study["subjects"] or not os.path.exists(path):
        raise StudyError(f"unknown subject {subject!r}: {data} has {', '.join(study['subjects'])}")
    try:
        d = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise StudyError(f"{path} is not a plain npz file ({e}); rebuild it with 01_prepare_data.py")
    missing = [k for k in [f"resp_{s}" for s in study["train"] + study["val"]] + ["test_resp"] if k not in d]
    if missing:
        raise StudyError(f"{path} has no responses {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                         "rebuild the data with 01_prepare_data.py")
    return d


def stack_responses(d, stories, voxels=None):
    """The responses of `stories` one under the other (TRs x voxels, float32; voxels: the columns to
    keep), read story by story into one preallocated array: the peak is the stack, not stack + parts."""
    rows = [array_shape(d, f"resp_{s}")[0] for s in stories]
    columns = np.arange(array_shape(d, f"resp_{stories[0]}")[1])[slice(None) if voxels is None else voxels]
    out = np.empty((sum(rows), len(columns)), np.float32)
    for s, row, n in zip(stories, np.cumsum([0] + rows), rows):
        out[row:row + n] = d[f"resp_{s}"] if voxels is None else d[f"resp_{s}"][:, voxels]
    return out
