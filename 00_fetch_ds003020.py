"""Optional step 00: fetch exactly the files of OpenNeuro ds003020 that the five stages read.

ds003020 (LeBel et al. 2023) holds 3,661 files, 278 GB (raw BOLD, FreeSurfer folders, localizers).
The study reads far less: each subject's preprocessed responses (derivative/preprocessed_data/<S>/,
one .hf5 per story), the stories' sound (stimuli/<story>.wav) and word timings
(derivative/TextGrids/), the TR bookkeeping (derivative/respdict.json, subject_xfms.json), the
pycortex database for ROIs and flatmaps (derivative/pycortex-db/<S>/) and the lab's English1000 word
embedding for stage 05 (derivative/english1000sm.hf5). This script selects those files from the
published file index of snapshot 3.1.0 (assets/ds003020_files.tsv, every path with its size),
prints the plan, fetches them with openneuro-py from that snapshot (--snapshot asks for another;
later snapshots spell the folder derivatives/, which every stage also reads), and ends by checking
that stage 01 finds everything it reads. Interrupted, it is rerun with the same command: files
already complete are kept (openneuro-py resumes). The machinery is lib/fetch.py.

    pip install 'openneuro-py>=2026.4.0'               # once (make fetch); make demo needs none
    python 00_fetch_ds003020.py --dest /data/ds003020 --dry-run    # the plan and its size only
    python 00_fetch_ds003020.py --dest /data/ds003020              # UTS01-UTS03, every story
    python 00_fetch_ds003020.py --dest /data/ds003020 --subjects UTS01 --no-pycortex
"""
import os
import shutil
import sys
from types import SimpleNamespace

from lib import ds003020, fetch, plumbing
from lib.plumbing import StudyError


def get_args(argv=None):
    return get_parser().parse_args(argv)


def get_parser():
    p = plumbing.parser(__doc__)
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
    p.add_argument("--snapshot", default=fetch.INDEX_SNAPSHOT, help=f"the dataset's version to fetch (default: "
                   f"{fetch.INDEX_SNAPSHOT}, the one the file index lists)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    return p


def complete(dest, path, size):
    """Is the index's file at `path` in dest (either spelling of the derivatives) at its indexed size?"""
    on_disk = fetch.on_disk(dest, path)
    return os.path.exists(on_disk) and os.path.getsize(on_disk) == size


def gb(n):
    return f"{n / 1e9:.1f} GB"


def main(argv=None):
    args = get_args(argv)
    try:
        plan = fetch.select(fetch.read_index(), args.subjects, args.stories, not args.no_pycortex,
                            not args.no_english1000, args.val_stories, args.test_story)
        total = sum(sum(files.values()) for files in plan.values())
        n_stories = len(plan["stimuli"])
        print(f"ds003020 snapshot {args.snapshot} for {' '.join(args.subjects)}: {n_stories} stories, "
              f"{sum(map(len, plan.values()))} files, {gb(total)} (of the dataset's 278 GB)")
        if args.snapshot != fetch.INDEX_SNAPSHOT:
            print(f"  note: the file index describes snapshot {fetch.INDEX_SNAPSHOT}: the selection and the sizes are "
                  f"{fetch.INDEX_SNAPSHOT}'s; a file that {args.snapshot} moved, renamed or changed shows up in the "
                  "final checks (size, then stage 01's own)")
        for group, files in plan.items():
            print(f"  {group:12s} {len(files):5d} files  {gb(sum(files.values())):>8s}")
        todo = {p: n for files in plan.values() for p, n in files.items() if not complete(args.dest, p, n)}
        print(f"  already in {args.dest}: {gb(total - sum(todo.values()))}; to fetch: {gb(sum(todo.values()))} "
              f"({len(todo)} files). openneuro-py also fetches the dataset's few top-level BIDS files.")
        if args.dry_run:
            return
        os.makedirs(args.dest, exist_ok=True)
        free = shutil.disk_usage(args.dest).free
        if free < sum(todo.values()):
            raise StudyError(f"{args.dest} has {gb(free)} free, the fetch needs {gb(sum(todo.values()))}")
        if todo:
            fetch.download(args.dest, plan, args.subjects, args.snapshot)
        wrong = [p for files in plan.values() for p, n in files.items() if not complete(args.dest, p, n)]
        if wrong:
            raise StudyError(f"{len(wrong)} files are missing or of another size than the index says "
                             f"({', '.join(wrong[:3])} ...); rerun the same command to continue")
        # the last check: stage 01's own, on what is now on disk
        check = SimpleNamespace(ds_root=args.dest, subjects=args.subjects, rois_from_pycortex=False,
                                test_story=args.test_story, val_stories=args.val_stories or ds003020.DS_VAL_STORIES)
        train, _ = ds003020.find_ds003020(check)
        print(f"done: stage 01 finds all it reads ({len(train)} training stories). Next: python 01_prepare_data.py "
              f"--source ds003020 --ds-root {args.dest} --subjects {' '.join(args.subjects)}"
              + ("" if args.no_pycortex else " --rois-from-pycortex")
              + (f" --val-stories {' '.join(args.val_stories)}" if args.val_stories else "")
              + (f" --test-story {args.test_story}" if args.test_story != "wheretheressmoke" else ""))
    except StudyError as e:
        plumbing.fail(e)
    except KeyboardInterrupt:
        plumbing.fail("interrupted: rerun the same command to continue (complete files are kept)", 130)


if __name__ == "__main__":
    sys.exit(main())
