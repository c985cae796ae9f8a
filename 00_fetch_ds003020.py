"""Optional step 00: fetch exactly the files of OpenNeuro ds003020 that the five stages read.

ds003020 (LeBel et al. 2023) holds 3,661 files, 278 GB (raw BOLD, FreeSurfer folders, localizers).
The study reads far less: each subject's preprocessed responses (derivative/preprocessed_data/<S>/,
one .hf5 per story), the stories' sound (stimuli/<story>.wav) and word timings
(derivative/TextGrids/), the TR bookkeeping (derivative/respdict.json, subject_xfms.json), the
pycortex database for ROIs and flatmaps (derivative/pycortex-db/<S>/) and the lab's English1000 word
embedding for stage 05 (derivative/english1000sm.hf5). This script selects those files from the
published file index (assets/ds003020_files.tsv, every path with its size), prints the plan, fetches
them with openneuro-py, and ends by checking that stage 01 finds everything it reads. Interrupted,
it is rerun with the same command: files already complete are kept (openneuro-py resumes).

    pip install openneuro-py                                   # once; not part of make demo
    python 00_fetch_ds003020.py --dest /data/ds003020 --dry-run   # the plan and its size only
    python 00_fetch_ds003020.py --dest /data/ds003020             # UTS01-UTS03, every story they share
    python 00_fetch_ds003020.py --dest /data/ds003020 --subjects UTS01 --no-pycortex
"""
import csv
import os
import shutil
import sys
from types import SimpleNamespace

import common
from common import StudyError

INDEX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "ds003020_files.tsv")
PREP = "derivative/preprocessed_data"


def get_args(argv=None):
    return get_parser().parse_args(argv)


def get_parser():
    p = common.parser(__doc__)
    p.add_argument("--dest", required=True, help="folder to fetch into (the --ds-root of stage 01)")
    p.add_argument("--subjects", nargs="+", default=["UTS01", "UTS02", "UTS03"], help="default: the paper's three")
    p.add_argument("--stories", nargs="+", help="training stories to fetch (default: every story the subjects "
                   "share); the validation and test stories are always fetched")
    p.add_argument("--val-stories", nargs="+", help="as stage 01's (default: its fromboyhoodtofatherhood "
                   "waitingtogo; UTS04-UTS09 lack waitingtogo)")
    p.add_argument("--test-story", default="wheretheressmoke", help="as stage 01's")
    p.add_argument("--no-pycortex", action="store_true", help="skip derivative/pycortex-db (ROIs, flatmaps)")
    p.add_argument("--no-english1000", action="store_true", help="skip derivative/english1000sm.hf5 (stage 05's "
                   "semantic probe then needs --word-vectors)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    return p


def read_index(path=INDEX):
    """{path: bytes} of the published dataset (annexed files carry their size in their key)."""
    with open(path, newline="") as f:
        return {row["path"]: int(row["bytes"]) for row in csv.DictReader(f, delimiter="\t")}


def select(index, subjects, stories=None, pycortex=True, english1000=True, val=None, test="wheretheressmoke"):
    """The files the stages read, by group: {group: {path: bytes}}. Stories: those every subject has
    a response file for (or `stories`, plus the validation and test stories), each with its wav
    and TextGrid."""
    stage01 = common.load_stage("01_prepare_data.py")
    val = val or stage01.DS_VAL_STORIES
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


def gb(n):
    return f"{n / 1e9:.1f} GB"


def main(argv=None):
    args = get_args(argv)
    try:
        plan = select(read_index(), args.subjects, args.stories, not args.no_pycortex, not args.no_english1000,
                      args.val_stories, args.test_story)
        total = sum(sum(files.values()) for files in plan.values())
        n_stories = len(plan["stimuli"])
        print(f"ds003020 for {' '.join(args.subjects)}: {n_stories} stories, {sum(map(len, plan.values()))} files, "
              f"{gb(total)} (of the dataset's 278 GB)")
        for group, files in plan.items():
            print(f"  {group:12s} {len(files):5d} files  {gb(sum(files.values())):>8s}")
        todo = {p: n for files in plan.values() for p, n in files.items()
                if not (os.path.exists(os.path.join(args.dest, p)) and os.path.getsize(os.path.join(args.dest, p)) == n)}
        print(f"  already in {args.dest}: {gb(total - sum(todo.values()))}; to fetch: {gb(sum(todo.values()))} "
              f"({len(todo)} files). openneuro-py also fetches the dataset's few top-level BIDS files.")
        if args.dry_run:
            return
        os.makedirs(args.dest, exist_ok=True)
        free = shutil.disk_usage(args.dest).free
        if free < sum(todo.values()):
            raise StudyError(f"{args.dest} has {gb(free)} free, the fetch needs {gb(sum(todo.values()))}")
        if todo:
            try:
                import openneuro
            except ImportError:
                raise StudyError("openneuro-py is not installed: `pip install openneuro-py` (it is not needed for "
                                 "the simulated study)")
            openneuro.download(dataset="ds003020", target_dir=args.dest, include=patterns(plan, args.subjects))
        wrong = [p for files in plan.values() for p, n in files.items()
                 if not os.path.exists(os.path.join(args.dest, p)) or os.path.getsize(os.path.join(args.dest, p)) != n]
        if wrong:
            raise StudyError(f"{len(wrong)} files are missing or of another size than the index says "
                             f"({', '.join(wrong[:3])} ...); rerun the same command to continue")
        # the last check: stage 01's own, on what is now on disk
        stage01 = common.load_stage("01_prepare_data.py")
        defaults = stage01.get_args(["--source", "ds003020"])
        check = SimpleNamespace(**{**vars(defaults), "ds_root": args.dest, "subjects": args.subjects,
                                   "rois_from_pycortex": False, "test_story": args.test_story,
                                   "val_stories": args.val_stories or defaults.val_stories})
        train, _ = stage01.find_ds003020(check)
        print(f"done: stage 01 finds all it reads ({len(train)} training stories). Next: python 01_prepare_data.py "
              f"--source ds003020 --ds-root {args.dest} --subjects {' '.join(args.subjects)}"
              + ("" if args.no_pycortex else " --rois-from-pycortex")
              + (f" --val-stories {' '.join(args.val_stories)}" if args.val_stories else "")
              + (f" --test-story {args.test_story}" if args.test_story != "wheretheressmoke" else ""))
    except StudyError as e:
        common.fail(e)
    except KeyboardInterrupt:
        common.fail("interrupted: rerun the same command to continue (complete files are kept)", 130)


if __name__ == "__main__":
    sys.exit(main())
