"""The published file index of ds003020 and the selection of the files the stages read.

Used by 00_fetch_ds003020.py (its plan and its openneuro-py include patterns) and its tests.
assets/ds003020_files.tsv lists every path of the published dataset with its size; select() picks
from it what stage 01 reads for the chosen subjects (and stage 05 through stage 01).
"""
import csv
import os

from lib import ds003020
from lib.plumbing import StudyError

INDEX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "ds003020_files.tsv")
PREP = "derivative/preprocessed_data"


def read_index(path=INDEX):
    """{path: bytes} of the published dataset (annexed files carry their size in their key)."""
    with open(path, newline="") as f:
        return {row["path"]: int(row["bytes"]) for row in csv.DictReader(f, delimiter="\t")}


def select(index, subjects, stories=None, pycortex=True, english1000=True, val=None, test="wheretheressmoke"):
    """The files the stages read, by group: {group: {path: bytes}}. Stories: those every subject has
    a response file for (or `stories`, plus the validation and test stories), each with its wav
    and TextGrid."""
    val = val or ds003020.DS_VAL_STORIES
    have = {}
    for s in subjects:
        have[s] = {p[len(f"{PREP}/{s}/"):-4] for p in index if p.startswith(f"{PREP}/{s}/") and p.endswith(".hf5")}
        if not have[s]:
            known = sorted({p.split("/")[2] for p in index if p.startswith(PREP + "/")})
            raise StudyError(f"unknown subject {s}: the dataset has {', '.join(known)}")
    shared = set.intersection(*have.values())
    if stories:
        unknown = sorted(set(stories) - shared)
        if unknown:
            raise StudyError(f"--stories {' '.join(unknown)}: not a story every subject in {' '.join(subjects)} heard")
        shared = set(stories) | ({test, *val} & shared)
    missing = sorted({test, *val} - shared)
    if missing:
        raise StudyError(f"the validation/test stories {' '.join(missing)} are not shared by {' '.join(subjects)}")
    plan = {"responses": {f"{PREP}/{s}/{st}.hf5" for s in subjects for st in shared},
            "stimuli": {f"stimuli/{st}.wav" for st in shared},
            "TextGrids": {f"derivative/TextGrids/{st}.TextGrid" for st in shared},
            "bookkeeping": {"derivative/respdict.json", "derivative/subject_xfms.json"}}
    if pycortex:
        plan["pycortex-db"] = {p for p in index for s in subjects if p.startswith(f"derivative/pycortex-db/{s}/")}
    if english1000:
        plan["english1000"] = {"derivative/english1000sm.hf5"}
    absent = sorted(p for files in plan.values() for p in files if p not in index)
    if absent:
        raise StudyError(f"{len(absent)} needed files are not in the dataset's index ({', '.join(absent[:3])} ...)")
    return {g: {p: index[p] for p in sorted(files)} for g, files in plan.items()}


def patterns(plan, subjects):
    """openneuro-py include patterns: exact paths, and one folder pattern per pycortex database
    (its file names hold brackets, which glob patterns would read as character sets)."""
    out = [p for g, files in plan.items() if g != "pycortex-db" for p in files]
    return out + [f"derivative/pycortex-db/{s}/**" for s in subjects if "pycortex-db" in plan]
