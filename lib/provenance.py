"""Provenance: what every result was built from, so that no stage combines stale inputs.

Used by stages 01-05 and compare.py. A result records fingerprints of the study's stories, of the
subject's file, of the model and of its settings (and of the results it builds on); a stage refuses
an input built from anything else, with one line naming the command that rebuilds it. Results made
with settings other than the defaults carry a tag in their file name (a hash of what differs), so no
run replaces another's. Stage 03's runs are named here (run_name) and found here (find_runs, load_run).
Every result also records the code that made it (code_state): its files' hashes and the git commit.
"""
import argparse
import ast
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess

from lib.plumbing import StudyError, load_npz

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


def explicit_flags(p, argv):
    """The dests the user set on the command line (not left at their defaults)."""
    saved = [(a, a.default) for a in p._actions]
    for a, _ in saved:
        a.default = argparse.SUPPRESS
    try:
        return set(vars(p.parse_args(argv)))
    finally:
        for a, d in saved:
            a.default = d


def command(script, args, *flags):
    """A command to suggest in an error, with the user's own --data/--results/--checkpoints."""
    io = [f"--{k} {getattr(args, k)}" for k, d in FOLDERS.items()
          if getattr(args, k, d) != d and not (k == "checkpoints" and script.startswith(("01", "02")))]
    return "`" + " ".join(["python", script, *io, *[f for f in flags if f]]) + "`"


# ---- the code a result was made by ----

def code_files(script):
    """The repository's files a stage runs: the script and every module of this repository it
    imports, followed through their own imports (common.py, lib/...), read from the source."""
    todo, seen = [os.path.relpath(os.path.abspath(script), ROOT)], set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, f), encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            todo += [n.replace(".", "/") + ".py" for n in names if os.path.isfile(os.path.join(ROOT, *n.split(".")) + ".py")]
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


def reuse(records, source):
    """--reuse SOURCE: when each path in `records` (a result to make) already holds what its record
    says, or SOURCE holds such a file of the same name, link those in (a copy across file systems)
    and return True: the stage has nothing to do. Links are safe: every write is a new file renamed
    over the old, never an edit in place."""
    found = {}
    for path, record in records.items():
        other = os.path.join(source, os.path.basename(path))
        found[path] = path if same_record(path, record) else other if same_record(other, record) else None
    if not all(found.values()):
        return False
    for path, src in found.items():
        if os.path.abspath(src) != os.path.abspath(path):
            link_tree(os.path.dirname(src), os.path.dirname(path), [os.path.basename(src)])
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


def describe_run(prov):
    """A stage 03 run in words (figures): what it tuned, its seed, its flags, edited code."""
    edited = (prov.get("code") or {}).get("edited")
    start = (prov.get("init_from") or {}).get("name")
    flags = [f for f in prov.get("flags", []) if not f.startswith("--init-from")]
    return (f"{prov['subject']} {prov['roi']} {'LoRA' if prov['mode'] == 'lora' else 'full fine-tuning'}, seed "
            f"{prov['seed']}" + (f", from {start.split('_')[1]}'s {start.split('_')[2]} run" if start else "")
            + (f", {' '.join(flags)}" if flags else ", default flags")
            + (f", code edited ({', '.join(edited)})" if edited else ""))


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
    """Refuse a result built from other stories or another file of `subject` than the study's now."""
    if prov["stories"] != study["stories_fingerprint"]:
        why = "its stories or splits differ"
    elif subject is not None and prov["subject_data"] != study["subject_fingerprints"].get(subject):
        why = f"{subject}'s responses differ"
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


def load_baseline(args, subject, study, tag=None):
    """Stage 02's result for `subject`, checked to be from this study. tag: which one ('' = made
    with the defaults, None = the only one there). Adds its path, tag, provenance and fingerprint."""
    rebuild = command("02_baseline_ridge.py", args, f"--subjects {subject}")
    found = {t: p for t, p in baseline_files(args.results, subject).items() if tag is None or t == tag}
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


def train_command(args, subjects, roi, mode, seed, init_from=None, *flags):
    """The stage 03 command that makes a run of `subjects` (for an error message)."""
    return command("03_finetune_lora.py", args, "--subject " + " ".join(subjects), "" if roi == "whole" else f"--roi {roi}",
                   f"--seed {seed}" if seed else "", "--full-finetune" if mode == "full" else "",
                   f"--init-from {init_from}" if init_from else "", *flags)


def load_run(args, subject, roi, mode, seed, init_from=None, tag=None, study=None):
    """The one stage 03 result matching the request, checked against the study and against the
    stage 02 result it was scored against (same file, unchanged since). Returns the npz as a dict
    with its name, provenance and its baseline (load_baseline's dict)."""
    runs = [(n, t, s) for n, t, s in find_runs(args.results, subject, roi, mode, seed, ".npz")
            if init_matches(s, init_from, subject) and (tag is None or t == tag)]
    train = train_command(args, [subject], roi, mode, seed, init_from)
    if not runs:
        raise MissingRun(f"no stage 03 result {run_name(subject, roi, mode, seed)}{'*' if tag is None else tag}"
                         f"{f' started from {init_from}' if init_from else ''} in {args.results}/: run {train} "
                         "first (with your training flags)")
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
    retrain = command("03_finetune_lora.py", args, f"--subject {subject}", *prov["flags"])
    if study is not None:
        check_built_from(prov, study, subject, path, retrain)
        base = load_baseline(args, subject, study, prov["baseline"]["tag"])
        if base["fingerprint"] != prov["baseline"]["fingerprint"]:
            raise StudyError(f"{path} was scored against another stage 02 result than {base['path']} holds now "
                             f"(stage 02 was rerun since, with other inputs): rerun it with {retrain}")
        run["baseline"] = base
    run.update(name=name, path=path, provenance=prov, fingerprint=digest(prov), tag=runs[0][1])
    return run
