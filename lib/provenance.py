"""Provenance: what every result was built from, so that no stage combines stale inputs.

Used by stages 01-05 and compare.py. A result records fingerprints of the study's stories, of the
subject's file, of the model and of its settings (and of the results it builds on); a stage refuses
an input built from anything else, with one line naming the command that rebuilds it. Results made
with settings other than the defaults carry a tag in their file name (a hash of what differs), so no
run replaces another's. Stage 03's runs are named here (run_name) and found here (find_runs, load_run).
Every result also records the code that made it (code_state): its files' hashes and the git commit.
"""
import ast
import contextlib
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess

import numpy as np

from lib.plumbing import StudyError, load_npz, on_interrupt, save_npz

FOLDERS = {"data": "data", "results": "results", "checkpoints": "checkpoints"}  # the stages' defaults
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digest(obj):
    """A short, stable fingerprint of a JSON-able record (settings, provenance)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_tag(settings, defaults):
    """'' when every setting has its default, else '_' + 6 hex digits of those that differ."""
    changed = {k: v for k, v in settings.items() if v != defaults.get(k)}
    return "_" + digest(changed)[:6] if changed else ""


def as_flags(settings, defaults):
    """The settings that differ from the defaults, as the command-line flags that give them."""
    out = []
    for k, v in sorted(settings.items()):
        if v == defaults.get(k) or v is None or v is False:
            continue
        flag = "--subjects" if k == "chosen_on" else "--" + k.replace("_", "-")  # stage 02's layer for these
        values = v if isinstance(v, (list, tuple)) else [] if v is True else [v]
        out.append(" ".join([flag] + [f"{x:g}" if isinstance(x, float) else str(x) for x in values]))
    return out


def command(script, args, *flags):
    """A command to suggest in an error, with the user's own --data/--results/--checkpoints."""
    io = [f"--{k} {getattr(args, k)}" for k, d in FOLDERS.items()
          if getattr(args, k, d) != d and not (k == "checkpoints" and script.startswith(("01", "02")))]
    return "`" + " ".join(["python", script, *io, *[f for f in flags if f]]) + "`"


# ---- the code a result was made by ----

def module_files(name):
    """The repository's files Python runs to import the dotted module `name`: the __init__.py of
    each package on the way and the module's own file (none for a module from elsewhere)."""
    out, path = [], ROOT
    for part in name.split("."):
        path = os.path.join(path, part)
        if os.path.isfile(path + ".py"):
            return out + [path + ".py"]
        if not os.path.isdir(path):
            return out
        if os.path.isfile(os.path.join(path, "__init__.py")):
            out.append(os.path.join(path, "__init__.py"))
    return out


def imported_names(path, package):
    """The dotted names a file's imports name (import a.b; from a import b: a and a.b), at any depth
    (inside functions too); a relative import (from . import x, from .x import y) resolved against
    the file's `package` (a list of names), as Python resolves it."""
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) + 1 - node.level] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            yield from [".".join(module)] + [".".join(module + [a.name]) for a in node.names]


def code_files(script):
    """The repository's files a stage runs: the script and every module of this repository it
    imports, by any form, followed through their own imports (common.py, lib/...; lib/__init__.py
    too: Python runs it), read from the source."""
    todo, seen = [os.path.relpath(os.path.abspath(script), ROOT)], set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        parts = f[:-3].split(os.sep)
        package = parts[:-1]  # a package's __init__.py imports relative to the package itself
        for name in imported_names(os.path.join(ROOT, f), package):
            todo += [os.path.relpath(m, ROOT) for m in module_files(name)]
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def code_state(script):
    """What a result records of the code that made it: each file's hash (code_files), their
    fingerprint, and, in a git checkout, the commit and which of the files differ from it
    (`edited`). A stage 03 run made by edited code is named apart from the committed code's."""
    files = {f: hashlib.sha1(open(os.path.join(ROOT, f), "rb").read()).hexdigest()[:12] for f in code_files(script)}
    state = dict(fingerprint=digest(files), files=files, commit=None, edited=None)
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode == 0:
            status = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", *files], capture_output=True,
                                    text=True, timeout=30)
            state.update(commit=head.stdout.strip(), edited=sorted(line[3:] for line in status.stdout.splitlines()))
    except (OSError, subprocess.SubprocessError):
        pass  # no git (a downloaded copy): the files' hashes still tell codes apart
    return state


def same_record(path, record):
    """Does the result at `path` record what `record` holds (code compared by its files, not by
    commit)? --reuse skips a stage whose results already do."""
    def comparable(p):
        p = json.loads(json.dumps(p, sort_keys=True, default=str))
        return dict(p, code=(p.get("code") or {}).get("fingerprint"))
    try:
        old = json.loads(str(load_npz(path).get("provenance", "{}")))
    except (StudyError, ValueError):
        return False
    return comparable(old) == comparable(record)


def reuse(records, source, what="the results"):
    """--reuse SOURCE: when each path in `records` (a result to make) already holds what its record
    says, or SOURCE holds such a file of the same name, link those in (a copy across file systems),
    say so and return True: the stage has nothing to do. Links are safe: every write is a new file
    renamed over the old, never an edit in place."""
    found = {}
    for path, record in records.items():
        other = os.path.join(source, os.path.basename(path))
        found[path] = path if same_record(path, record) else other if same_record(other, record) else None
    if not all(found.values()):
        return False
    for path, src in found.items():
        if os.path.abspath(src) != os.path.abspath(path):
            link_tree(os.path.dirname(src), os.path.dirname(path), [os.path.basename(src)])
    print(f"  {what}: made from this study and model with these settings by this code, in "
          f"{os.path.dirname(next(iter(records)))}/ or linked from {source}/: nothing to do (--reuse)")
    return True


def link_tree(src, dest, names=None):
    """Hard-link `names` (default: everything) of folder src into dest, folders recreated."""
    for name in os.listdir(src) if names is None else names:
        a, b = os.path.join(src, name), os.path.join(dest, name)
        if os.path.isdir(a):
            os.makedirs(b, exist_ok=True)
            link_tree(a, b)
            continue
        os.makedirs(dest, exist_ok=True)
        tmp = b + ".link_tmp"
        try:
            os.link(a, tmp)
        except OSError:
            shutil.copy2(a, tmp)
        os.replace(tmp, b)


def describe_run(prov, flags=True):
    """A stage 03 run in words (figures): what it tuned (a joint run: on whom), its seed, its flags,
    edited code (flags=False: up to the seed and start run, a short name for viewer.py's maps)."""
    edited = (prov.get("code") or {}).get("edited")
    start = (prov.get("init_from") or {}).get("name")
    used = [f for f in prov.get("flags", []) if not f.startswith("--init-from")]
    who = "joint on " + "+".join(prov["subjects"]) if "subjects" in prov else prov["subject"]
    recipe = (prov.get("settings") or {}).get("recipe", "repo")
    return (f"{who} {prov['roi']} {'LoRA' if prov['mode'] == 'lora' else 'full fine-tuning'}, seed "
            f"{prov['seed']}" + (f", from {start.split('_')[1]}'s {start.split('_')[2]} run" if start else "")
            + (f", the {recipe} recipe" if recipe != "repo" else "")
            + ("" if not flags else f", {' '.join(used)}" if used else ", default flags")
            + (f", code edited ({', '.join(edited)})" if edited and flags else ""))


def code_differs(mine, ref):
    """The files whose code differs between two results' code records ('' when the same or unknown)."""
    if not mine or not ref or mine["fingerprint"] == ref["fingerprint"]:
        return ""
    a, b = mine["files"], ref["files"]
    return ", ".join(sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f)))


# ---- checking what a result was built from ----

def read_provenance(d, path, rebuild):
    """The provenance record of a result npz (a dict); a result without one predates the records."""
    if "provenance" not in d:
        raise StudyError(f"{path} predates provenance records (what a result was built from): rebuild it with {rebuild}")
    return json.loads(str(d["provenance"]))


def check_built_from(prov, study, subject, path, rebuild):
    """Refuse a result built from other stories or another file of `subject` (a joint run's:
    each of its subjects') than the study's now."""
    recorded = prov.get("subject_data")
    if "subjects" in prov:
        changed = [s for s in prov["subjects"] if recorded.get(s) != study["subject_fingerprints"].get(s)]
    else:
        changed = [subject] if subject is not None and recorded != study["subject_fingerprints"].get(subject) else []
    if prov["stories"] != study["stories_fingerprint"]:
        why = "its stories or splits differ"
    elif changed:
        why = f"{', '.join(changed)}'s responses differ"
    else:
        return
    raise StudyError(f"{path} was built from another study than {study['data']}/ ({why}: the data were rebuilt "
                     f"since); rebuild it with {rebuild}")


def describe_replacement(data, new):
    """What rebuilding `data` replaces, in words: which results built from the old study stay valid."""
    old_path = os.path.join(data, "study.npz")
    if not os.path.exists(old_path):
        return f"{data}/ exists but holds no study: replacing it"
    try:
        old, now = load_npz(old_path), load_npz(os.path.join(new, "study.npz"))
        if "stories_fingerprint" not in old:
            return f"replacing {data}/ (an older layout without fingerprints: rerun stages 02-05 on the new study)"
        if str(old["stories_fingerprint"]) != str(now["stories_fingerprint"]):
            return (f"replacing {data}/ with another study (its stories or splits differ): stages 02-05 will "
                    "refuse results built from the old one until they are rerun")
        was = dict(zip(old["subjects"], old["subject_fingerprints"]))
        same = [s for s, f in zip(now["subjects"], now["subject_fingerprints"]) if was.get(s) == f]
        changed = [str(s) for s in now["subjects"] if s not in same]
        return (f"replacing {data}/: the same stories; " + (f"subjects {', '.join(changed)} differ (their results will "
                "be refused until rerun)" if changed else "every subject identical, so existing results stay valid"))
    except (StudyError, KeyError) as e:
        return f"replacing {data}/ (its study.npz could not be read: {e})"


def install_study(tmp_out, data):
    """Swap a finished study (built in tmp_out) in for `data` whole, so a failed build never leaves a
    half-written data/; say which results stay valid. The feature caches move across: they are keyed
    by model weights and audio, so stale entries are recomputed when read and the rest are reused."""
    if not os.path.isdir(data):
        os.replace(tmp_out, data)
        return
    print(f"  note: {describe_replacement(data, tmp_out)}")
    if os.path.isdir(os.path.join(data, "features")):
        os.replace(os.path.join(data, "features"), os.path.join(tmp_out, "features"))
        print(f"  kept {data}/features/ (model feature caches, checked against the audio when read)")
    old = data.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(data, old)
    os.replace(tmp_out, data)
    shutil.rmtree(old)


@contextlib.contextmanager
def building(data):
    """Stage 01's study is built aside (the folder yielded) and swapped in for `data` whole when
    complete (install_study): an error or Ctrl-C on the way leaves `data` as it was."""
    tmp_out = data.rstrip("/") + ".tmp_build"
    shutil.rmtree(tmp_out, ignore_errors=True)
    try:
        with on_interrupt(f"{data}/ is as it was; rerun the same command"):
            yield tmp_out
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise
    install_study(tmp_out, data)


def study_record(args, script):
    """What study.npz records of how it was built: stage 01's settings and code."""
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "reuse", "_given")}
    return dict(stage="01", settings=settings, code=code_state(script))


def reuse_study(args, record):
    """--reuse DIR: a study built by this code with these settings is linked, not rebuilt."""
    for folder in (args.data, args.reuse):
        if same_record(os.path.join(folder, "study.npz"), record):
            if folder != args.data:
                link_tree(folder, args.data)
            print(f"stage 01: {folder}/ holds the study these settings and this code build"
                  + (f": linked into {args.data}/" if folder != args.data else ": nothing to do") + " (--reuse)")
            return True
    return False


def write_study(out, source, subjects, train, val, test, tr, args, prints, record):
    """study.npz: the splits and the fingerprints every later result records. stories_fingerprint
    covers the splits and every story file; each subject file has its own, so rebuilding with one
    subject more or less (or other noise) leaves the others' results valid."""
    stories = digest(dict(source=source, train=list(train), val=list(val), test=test,
                          files={k: v for k, v in prints.items() if k not in subjects and k != "truth"}))
    save_npz(os.path.join(out, "study.npz"), source=np.array(source), subjects=np.array(subjects),
             train_stories=np.array(train), val_stories=np.array(val), test_story=np.array(test),
             tr=np.float64(tr), seed=np.int64(args.seed), stories_fingerprint=np.array(stories),
             subject_fingerprints=np.array([prints[s] for s in subjects]),
             provenance=np.array(json.dumps(record, sort_keys=True)))


def baseline_records(args, study, subjects, fingerprint, script, mine, defaults):
    """What stage 02's result of each subject will record, and where it goes: ({subject: (path,
    record)}, the settings tag of their names), said in one line."""
    tag, flags = settings_tag(mine, defaults), as_flags(mine, defaults)
    print(f"stage 02: baseline ridge, model {args.model}, {len(subjects)} subject(s), device {args.device}"
          + (f"; settings {' '.join(flags)} -> files tagged {tag[1:]}" if tag else ""))
    return {subj: (os.path.join(args.results, f"02_baseline_{subj}{tag}.npz"),
                   dict(stage="02", subject=subj, stories=study["stories_fingerprint"], settings=mine,
                        subject_data=study["subject_fingerprints"][subj], model=args.model, tag=tag[1:],
                        model_fingerprint=fingerprint, flags=flags, code=code_state(script)))
            for subj in subjects}, tag


def save_result(path, prov, arrays, note=False):
    """A result with its provenance record (note: say so when it replaces a stage 02 result made
    from other inputs, note_replacement)."""
    if note:
        note_replacement(path, prov)
    save_npz(path, **arrays, provenance=np.array(json.dumps(prov, sort_keys=True)))


def save_cross_subject(args, study, runs, out, script, **arrays):
    """Stage 04's result, named after the choice of runs (04_cross_subject[_<choice>].npz: the
    defaults' choice keeps the plain name) and recording the runs and baselines it read. Returns
    its path."""
    first = next(iter(runs.values()))
    tuned_on = [a for a in runs if not a.startswith("joint-")]  # the joint runs there are come too
    evaluated_on = list(first["baselines"])
    parts = [args.roi if args.roi != "whole" else "", "full" if args.full_finetune else "",
             f"seed{args.seed}" if args.seed else "", first["tag"], f"from_{args.init_from}" if args.init_from else ""]
    if tuned_on != study["subjects"] or evaluated_on != study["subjects"]:
        parts.append(f"{'-'.join(tuned_on)}-on-{'-'.join(evaluated_on)}")
    path = os.path.join(args.results, "_".join(["04_cross_subject"] + [p for p in parts if p]) + ".npz")
    baselines = {b: base["fingerprint"] for b, base in first["baselines"].items()}
    prov = dict(stage="04", stories=study["stories_fingerprint"], baselines=baselines,
                runs={a: r["fingerprint"] for a, r in runs.items()}, code=code_state(script))
    save_result(path, prov, dict(out, **arrays, roi=np.array(args.roi), seed=np.int64(args.seed),
                                 recipe=np.array(args.recipe),
                                 mode=np.array("full" if args.full_finetune else "lora"),
                                 runs=np.array([r["name"] for r in runs.values()]),
                                 **{f"baseline_{b}": np.array(f) for b, f in baselines.items()}))
    return path


def save_probes(args, study, subj, runs, base, script, **arrays):
    """Stage 05's result, named after the choice (05_probes[_<choice>].npz: the defaults' choice
    keeps the plain name), recording the runs, the baseline and the targets it read. Returns its path."""
    models = list(arrays["models"])
    parts = [subj if subj != study["subjects"][0] else "",
             "-".join(models) if models != ["baseline", "whole", "AC"] else "", f"seed{args.seed}" if args.seed else "",
             next(iter(runs.values()))["tag"] if runs else "", f"from_{args.init_from}" if args.init_from else "",
             f"folds{args.n_folds}" if args.n_folds != 5 else ""]
    path = os.path.join(args.results, "_".join(["05_probes"] + [p for p in parts if p]) + ".npz")
    prov = dict(stage="05", stories=study["stories_fingerprint"], subject=subj, baseline=base["fingerprint"],
                runs={k: r["fingerprint"] for k, r in runs.items()}, word_vectors=args.word_vectors,
                n_folds=args.n_folds, code=code_state(script))
    tuned = {} if "whole" not in runs else dict(tuned_layer=np.int64(int(runs["whole"]["layer"])))
    save_result(path, prov, dict(arrays, subject=np.array(subj), **tuned, recipe=np.array(args.recipe),
                                 runs=np.array([runs[m]["name"] if m in runs else "" for m in models])))
    return path


def note_replacement(path, prov):
    """Rerunning the same settings replaces its own result; say so when it was built from other
    inputs (another study or other model weights): stage 03 runs scored against it become stale."""
    if not os.path.exists(path):
        return
    try:
        old = json.loads(str(load_npz(path).get("provenance", "{}")))
    except StudyError:
        old = {}
    if digest(old) != digest(prov):
        edited = code_differs(prov.get("code"), old.get("code"))
        why = ("another study" if old.get("stories") != prov["stories"] or old.get("subject_data") != prov["subject_data"]
               else "other model weights" if old.get("model_fingerprint") != prov["model_fingerprint"]
               else f"other code ({edited})" if edited else "other inputs")
        print(f"  note: replacing {path}, built from {why}: stage 03 runs scored against it will be refused until rerun")


def note_replaced_run(result, fingerprint):
    """Rerunning a stage 03 run replaces its result; say so when the old one had other inputs."""
    if os.path.exists(result) and str(load_npz(result).get("fingerprint")) != fingerprint:
        print(f"  note: replacing {result}, made from other inputs or code (the study, stage 02 or the code changed since)")


# ---- finding stage 02 and stage 03 results ----

def baseline_files(results, subject):
    """{tag: path} of the stage 02 results of `subject` ('' is the defaults' file)."""
    out = {}
    for path in glob.glob(os.path.join(glob.escape(results), f"02_baseline_{subject}*.npz")):
        rest = os.path.basename(path)[len(f"02_baseline_{subject}"):-4]
        if re.fullmatch(r"(_[0-9a-f]{6})?", rest):
            out[rest[1:]] = path
    return out


def baseline_recipe(path):
    """The --recipe a stage 02 result was made with ('repo' for results older than the flag)."""
    with np.load(path, allow_pickle=False) as f:
        return str(f["recipe"]) if "recipe" in f.files else "repo"


def load_baseline(args, subject, study, tag=None, recipe=None):
    """Stage 02's result for `subject`, checked to be from this study. tag: which one ('' = made
    with the defaults, None = the only one there). recipe: only results of that --recipe count, and
    a result of another is refused in one line (stage 03 compares with its own recipe's). Adds its
    path, tag, provenance and fingerprint."""
    rebuild = command("02_baseline_ridge.py", args, f"--subjects {subject}")
    found = {t: p for t, p in baseline_files(args.results, subject).items() if tag is None or t == tag}
    if recipe is not None:
        other = {t: p for t, p in found.items() if baseline_recipe(p) != recipe}
        found = {t: p for t, p in found.items() if t not in other}
        if other and not found:
            made = ", ".join(sorted({baseline_recipe(p) for p in other.values()}))
            flag = f"--recipe {recipe}" if recipe != "repo" else ""
            raise StudyError(f"{', '.join(sorted(other.values()))}: made by stage 02 --recipe {made}, and a "
                             f"--recipe {recipe} run compares with its own recipe's: run "
                             + command("02_baseline_ridge.py", args, flag) + " first")
    if not found:
        which = f" with tag {tag or 'default'}" if tag is not None else ""
        raise StudyError(f"no stage 02 result for {subject}{which} in {args.results}/ "
                         f"({os.path.join(args.results, f'02_baseline_{subject}.npz')} not found): run {rebuild} first")
    if len(found) > 1:
        listed = []
        for t, p in sorted(found.items()):
            flags = json.loads(str(load_npz(p).get("provenance", "{}"))).get("flags", ["?"])
            listed.append(f"{t or 'default'} ({' '.join(flags) or 'the defaults'})")
        raise StudyError(f"{args.results}/ holds {len(found)} stage 02 results for {subject}: {'; '.join(listed)}; "
                         "choose one with --baseline-tag TAG")
    (t, path), = found.items()
    b = load_npz(path, "stage 02 result")
    prov = read_provenance(b, path, rebuild)
    rebuild = command("02_baseline_ridge.py", args, f"--subjects {subject}", *prov["flags"])
    check_built_from(prov, study, subject, path, rebuild)
    b.update(path=path, tag=t, provenance=prov, fingerprint=digest(prov), rebuild=rebuild)
    return b


def baseline_tag_flag(value):
    """--baseline-tag's value: 'default' names the file made with stage 02's defaults."""
    return None if value is None else "" if value == "default" else value


RUN_TAIL = re.compile(r"(?:_([0-9a-f]{6}))?(?:_from_(.+))?")


def run_name(subject, roi, mode, seed, tag="", init_from=None):
    """Stage 03's name of a run (results file, checkpoint folder): tag '' for the defaults' settings,
    else '_xxxxxx'; a run started from another (--init-from) carries that run's name after _from_."""
    return f"03_{subject}_{roi}_{mode}_seed{seed}{tag}" + (f"_from_{init_from.removeprefix('03_')}" if init_from else "")


def find_runs(folder, subject, roi, mode, seed, ext):
    """Stage 03 runs of (subject, roi, mode, seed) in `folder` (ext '.npz': results; '': checkpoint
    folders): a list of (name, tag, the name of the run it started from or None)."""
    prefix = run_name(subject, roi, mode, seed)
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), prefix + "*" + ext))):
        name = os.path.basename(path)[:len(os.path.basename(path)) - len(ext)]
        m = RUN_TAIL.fullmatch(name[len(prefix):])
        if m and (ext or not name.endswith((".tmp", ".old"))):
            out.append((name, m.group(1) or "", m.group(2)))
    return out


def init_matches(source, wanted, subject):
    """Does a run's --init-from source (a run name without 03_) match what the user asked for: a
    run name, or an ROI word ('whole': the subject's own whole-cortex run)?"""
    if wanted is None:
        return source is None
    if source is None:
        return False
    return source == wanted.removeprefix("03_") or source.startswith(f"{subject}_{wanted}_")


class MissingRun(StudyError):
    """No stage 03 result of the run asked for (load_run): stage 04 names every missing one at once."""


def joint_runs(folder, roi, mode, seed):
    """The joint stage 03 results in `folder` of (roi, mode, seed): [(name, its subjects, tag)]."""
    out = []
    pattern = os.path.join(glob.escape(folder), f"03_joint-*_{roi}_{mode}_seed{seed}*.npz")
    for path in sorted(glob.glob(pattern)):
        m = re.fullmatch(rf"03_joint-(.+)_{roi}_{mode}_seed{seed}(?:_([0-9a-f]{{6}}))?",
                         os.path.basename(path)[:-4])
        if m:
            out.append((os.path.basename(path)[:-4], m[1].split("-"), m[2] or ""))
    return out


def train_command(args, subjects, roi, mode, seed, init_from=None, *flags):
    """The stage 03 command that makes a run of `subjects` (for an error message)."""
    return command("03_finetune_lora.py", args, "--subject " + " ".join(subjects), "" if roi == "whole" else f"--roi {roi}",
                   f"--seed {seed}" if seed else "", "--full-finetune" if mode == "full" else "",
                   f"--init-from {init_from}" if init_from else "", *flags)


def run_recipe(path):
    """The --recipe a stage 03 result was trained with ('repo' for results older than the flag)."""
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["settings"])).get("recipe", "repo") if "settings" in f.files else "repo"


def load_run(args, subject, roi, mode, seed, init_from=None, tag=None, study=None):
    """The one stage 03 result matching the request (of args.recipe's runs, where the stage has the
    flag), checked against the study and against the stage 02 result it was scored against (same
    file, unchanged since). Returns the npz as a dict with its name, provenance and its baseline
    (load_baseline's dict)."""
    recipe = getattr(args, "recipe", None)
    runs = [(n, t, s) for n, t, s in find_runs(args.results, subject, roi, mode, seed, ".npz")
            if init_matches(s, init_from, subject) and (tag is None or t == tag)
            and (recipe is None or run_recipe(os.path.join(args.results, n + ".npz")) == recipe)]
    train = train_command(args, [subject], roi, mode, seed, init_from,
                          f"--recipe {recipe}" if recipe not in (None, "repo") else "")
    if not runs:
        raise MissingRun(f"no stage 03 result {run_name(subject, roi, mode, seed)}{'*' if tag is None else tag}"
                         f"{f' started from {init_from}' if init_from else ''}"
                         f"{f' of --recipe {recipe}' if recipe not in (None, 'repo') else ''} in {args.results}/: "
                         f"run {train} first (with your training flags)")
    if len(runs) > 1:
        listed = []
        for n, t, _ in runs:
            prov = json.loads(str(load_npz(os.path.join(args.results, n + ".npz")).get("provenance", "{}")))
            listed.append(f"{t or 'default'} ({' '.join(prov.get('flags', ['?'])) or 'the defaults'})")
        raise StudyError(f"{args.results}/ holds {len(runs)} stage 03 runs of {subject} {roi} {mode} seed {seed}: "
                         f"{'; '.join(listed)}; choose one with --tag TAG")
    name = runs[0][0]
    path = os.path.join(args.results, name + ".npz")
    run = load_npz(path, "stage 03 result")
    prov = read_provenance(run, path, train)
    subjects = prov.get("subjects", [subject])  # a joint run's, or the one
    retrain = command("03_finetune_lora.py", args, f"--subject {' '.join(subjects)}",
                      "--joint" if "subjects" in prov else "", *prov["flags"])
    if study is not None:
        check_built_from(prov, study, subject, path, retrain)
        for s in reversed(subjects):
            base = load_baseline(args, s, study, prov["baseline"]["tag"])
            if base["fingerprint"] != prov.get("baselines", {s: prov["baseline"]})[s]["fingerprint"]:
                raise StudyError(f"{path} was scored against another stage 02 result than {base['path']} holds "
                                 f"now (stage 02 was rerun since, with other inputs): rerun it with {retrain}")
        run["baseline"] = base  # the first subject's
    run.update(name=name, path=path, provenance=prov, fingerprint=digest(prov), tag=runs[0][1])
    return run


RUN_FILE = re.compile(r"03_((?:joint-)?[^_]+)_([^_]+)_(lora|full)_seed(\d+)(?:_([0-9a-f]{6}))?(?:_from_(.+))?\.npz")


def load_runs(args, study):
    """Every stage 03 result in args.results, single and joint runs, each checked by load_run:
    {name: run}."""
    out = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(args.results), "03_*.npz"))):
        m = RUN_FILE.fullmatch(os.path.basename(path))
        if m:
            who, roi, mode, seed, tag, start = m.groups()
            run = load_run(args, who, roi, mode, int(seed), start and "03_" + start, tag or "", study)
            out[run["name"]] = run
    return out


def load_cross_subject(args, path, study, runs):
    """A stage 04 result, checked as stage 04 checks its inputs: from this study, and every stage 03
    run (`runs`: load_runs') and stage 02 result it read is the one in args.results now."""
    d = load_npz(path, "stage 04 result")
    rebuild = command("04_cross_subject.py", args, "" if str(d["roi"]) == "whole" else f"--roi {d['roi']}",
                      "--full-finetune" if str(d["mode"]) == "full" else "",
                      f"--seed {int(d['seed'])}" if int(d["seed"]) else "")
    prov = read_provenance(d, path, rebuild)
    check_built_from(prov, study, None, path, rebuild)
    for label, name in zip(d["tuned_on"], d["runs"]):
        run = runs.get(str(name))
        if run is None or run["fingerprint"] != prov["runs"][str(label)]:
            raise StudyError(f"{path} scored {name}, which {'is not in' if run is None else 'was rerun since in'} "
                             f"{args.results}/: rerun stage 04 with {rebuild}")
    tag = runs[str(d["runs"][0])]["provenance"]["baseline"]["tag"]
    for b, fingerprint in prov["baselines"].items():
        if load_baseline(args, b, study, tag)["fingerprint"] != fingerprint:
            raise StudyError(f"{path} was scored against another stage 02 result of {b} than {args.results}/ "
                             f"holds now (stage 02 was rerun since): rerun stage 04 with {rebuild}")
    d.update(path=path, provenance=prov)
    return d
