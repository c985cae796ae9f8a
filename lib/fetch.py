"""The published file index of ds003020, the selection of the files the stages read, and the client.

Used by 00_fetch_ds003020.py (its plan, its openneuro-py call) and its tests.
assets/ds003020_files.tsv lists every path of snapshot 3.1.0 with its size (the snapshot is written
beside it, in ds003020_snapshot.txt); select() picks from it what stage 01 reads for the chosen
subjects (and stage 05 through stage 01); download() asks openneuro-py for exactly those files of
that snapshot, and turns every error of the client into one line.
"""
import csv
import json
import os
import re

from lib import ds003020
from lib.plumbing import StudyError

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
INDEX = os.path.join(ASSETS, "ds003020_files.tsv")
INDEX_SNAPSHOT = open(os.path.join(ASSETS, "ds003020_snapshot.txt")).read().strip()  # what the index lists
PREP = "derivative/preprocessed_data"
# openneuro-py switched to OpenNeuro's current API in April 2026 ("Support latest OpenNeuro API");
# 2026.4.0 is the first release with it (2026.3.1 still queries the field the server dropped)
CLIENT_FLOOR = "2026.4.0"


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


def on_disk(dest, path):
    """Where an index path (snapshot 3.1.0's derivative/ spelling) lies under `dest`: derivatives/
    in the layout of later snapshots (lib/ds003020.derivatives decides)."""
    if path.startswith("derivative/"):
        return os.path.join(ds003020.derivatives(dest), path[len("derivative/"):])
    return os.path.join(dest, path)


def local_snapshot(dest):
    """The snapshot a target folder holds, from the DatasetDOI of its dataset_description.json (as
    openneuro-py reads it), or None."""
    try:
        doi = json.load(open(os.path.join(dest, "dataset_description.json"))).get("DatasetDOI", "")
    except (OSError, ValueError, AttributeError):
        return None
    found = re.search(r"openneuro\.ds003020\.v(.+)$", str(doi))
    return found.group(1) if found else None


def client():
    """openneuro-py, checked to be a release that speaks OpenNeuro's current API: (module, version)."""
    install = f"`pip install --upgrade 'openneuro-py>={CLIENT_FLOOR}'` (make fetch does)"
    try:
        import openneuro
    except ImportError:
        raise StudyError(f"openneuro-py is not installed: {install}; it is not needed for the simulated study")
    version = str(getattr(openneuro, "__version__", "0"))
    number = [int(x) for x in re.findall(r"\d+", version)[:3]]
    if number < [int(x) for x in CLIENT_FLOOR.split(".")]:
        raise StudyError(f"openneuro-py {version} predates OpenNeuro's current API (April 2026): {install}")
    return openneuro, version


def download(dest, plan, subjects, snapshot):
    """Fetch the plan's files of `snapshot` into dest with openneuro-py (which resumes). A folder
    holding another snapshot, or any error of the client, is one StudyError. For a snapshot other
    than the index's, the derivatives may be spelled derivatives/: asked again so when derivative/
    is not found."""
    have = local_snapshot(dest)
    if have and have != snapshot:
        raise StudyError(f"{dest} holds ds003020 snapshot {have} (its dataset_description.json), you asked for "
                         f"{snapshot}: fetch into another folder with --dest, or continue that copy with --snapshot "
                         f"{have}")
    openneuro, version = client()
    print(f"  fetching snapshot {snapshot} with openneuro-py {version}", flush=True)
    include = patterns(plan, subjects)
    for spelling in ("derivative/", "derivatives/"):
        try:
            openneuro.download(dataset="ds003020", tag=snapshot, target_dir=dest,
                               include=[spelling + p[len("derivative/"):] if p.startswith("derivative/") else p
                                        for p in include])
            return
        except FileExistsError as e:
            raise StudyError(f"{dest} holds another snapshot of ds003020 than {snapshot} (openneuro-py: "
                             f"{first_line(e)}): fetch into another folder with --dest")
        except RuntimeError as e:
            if "Could not find path" in str(e) and snapshot != INDEX_SNAPSHOT and spelling == "derivative/":
                print(f"  snapshot {snapshot} has no derivative/ folder: asking for derivatives/ (its later spelling)")
                continue
            raise StudyError(f"openneuro-py {version} could not fetch ds003020 {snapshot}: {first_line(e)}")
        except Exception as e:  # the network, the server, the disk: one line, and the command that continues
            raise StudyError(f"openneuro-py {version} failed ({type(e).__name__}: {first_line(e)}); check the "
                             "network and the disk, then rerun the same command to continue")


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
