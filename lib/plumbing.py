"""Plumbing: the stages' runner, errors, devices, npz and figure files, caches, the stages' flags.

Used by every stage, compare.py, bench/ and the tests. Nothing here is science: a stage's main runs
through `stage` (flags, threads, timing, and one line for every way it ends), a bad input becomes
one StudyError (printed as one `error:` line by `fail`), every file is written to a temp file and
renamed (a crash never leaves half a file), and arrays are read without pickles.
"""
import argparse
import contextlib
import functools
import hashlib
import itertools
import os
import re
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

# peft calls a transformers method deprecated in v5 (get_peft_model, save_pretrained); nothing a user can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class StudyError(Exception):
    """A problem with the user's input. Stages print it as one line and exit non-zero."""


def fail(msg, code=1):
    """Print one clear message and exit non-zero (the stages' runner calls this for a StudyError)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


class Interrupted(StudyError):
    """Ctrl-C inside a stage, with what was kept and how to go on (the runner exits 130)."""


@contextlib.contextmanager
def on_interrupt(message):
    """Ctrl-C inside becomes Interrupted(message): `message` (or message(), when it is a function)
    says what was saved and the command that goes on."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(message() if callable(message) else message) from None


def stage(get_parser):
    """A stage's main(args) made its command, main(argv=None): the flags parsed (args._given: those
    typed), torch's threads set, and one line for every way it ends: `wrote <what main returns> in
    N s`, a StudyError as `error: ...` (exit 1), Ctrl-C as `error: interrupted: ...` (exit 130)."""
    def wrap(body):
        @functools.wraps(body)
        def main(argv=None):
            p = get_parser()
            args = p.parse_args(argv)
            args._given = explicit_flags(p, argv)
            set_threads(getattr(args, "threads", None))
            t0 = time.time()
            try:
                if hasattr(args, "device"):
                    args.device = pick_device(args.device)
                wrote = body(args)
            except Interrupted as e:
                fail(f"interrupted: {e}", 130)
            except KeyboardInterrupt:
                fail("interrupted: nothing was written; rerun the same command", 130)
            except StudyError as e:
                fail(e)
            if wrote:
                print(f"\nwrote {wrote} in {time.time() - t0:.0f} s")
        return main
    return wrap


# ---- devices ----


def pick_device(name=None):
    """`None`/"auto" -> cuda when present, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise StudyError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(str(name))


def set_threads(n=None):
    """Pin torch's CPU threads: left alone, torch can oversubscribe a small machine (50x slower seen)."""
    torch.set_num_threads(n or int(os.environ.get("BRAINWAVLM_THREADS", 0)) or os.cpu_count() or 1)


def autocast(device):
    """bf16 autocast on CUDA, nothing on CPU (float32 there: reproducible to the bit)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def memory_budget(device, share=0.4):
    """Bytes a batch may take: `share` of a GPU's free memory; 1 GB on a CPU."""
    if torch.device(device).type == "cuda":
        return share * torch.cuda.mem_get_info(torch.device(device))[0]
    return 2 ** 30


def to_device(array, device):
    """A host array on `device` without stalling it: a GPU copy from ordinary host memory waits for
    all queued work, one from pinned memory is queued behind it."""
    t = torch.as_tensor(array)
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def show_loss(bar, step, loss_sum, n):
    """The mean loss so far on a progress bar (a terminal's), every 20 steps: reading it waits for
    the GPU, so not at every step."""
    if hasattr(bar, "set_postfix") and step % 20 == 0:
        bar.set_postfix(loss=f"{float(loss_sum) / n:.3f}")


def progress_bar(items, desc):
    """A tqdm bar on a terminal; the plain items when output goes to a file (a bar there writes
    thousands of characters per epoch)."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False)


def from_pretrained(cls, name, **kw):
    """cls.from_pretrained(name): the local folder or cache first (no network wait when the weights
    are here), then the hub; a failure is one StudyError saying how to get the weights."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr: noise around our one-line errors
    try:
        return cls.from_pretrained(name, local_files_only=True, **kw)
    except (OSError, ValueError):
        try:
            return cls.from_pretrained(name, **kw)
        except (OSError, ValueError) as e:
            raise StudyError(f"could not load WavLM {name!r} ({str(e).splitlines()[0]}). Pass a local folder "
                             f"with config.json and the weights, or download it once on a machine with "
                             f"internet: `hf download {name}` (then it loads offline from the cache)")


# ---- files: npz, caches, figures ----


def save_npz(path, items=(), **arrays):
    """Write an npz (uncompressed, as np.savez) to a temp file in the same folder, then rename: a
    crash never leaves half a file. `items`: (name, array) pairs, e.g. a generator, written one at a
    time before the keyword arrays, so a subject's responses need never be in memory all at once.
    Returns a fingerprint of the contents (names, dtypes, shapes, bytes), hashed as they are written."""
    import zipfile
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp_", suffix=".npz")
    os.close(fd)
    h = hashlib.sha1()
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in itertools.chain(items, arrays.items()):
                value = np.asanyarray(value)
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, value, allow_pickle=False)
                h.update(f"{name} {value.dtype.str} {value.shape}".encode())
                h.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return h.hexdigest()[:16]


def load_npz(path, what="file"):
    """np.load without pickles, as a plain dict; a missing file is a StudyError naming it."""
    if not os.path.exists(path):
        raise StudyError(f"{what} not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as e:
        raise StudyError(f"{path} is not a plain npz file ({e}); rebuild it with the stage that writes it")


def array_shape(d, key):
    """Shape of d[key] without reading the array when d is an open npz (its .npy header only)."""
    if not hasattr(d, "zip"):
        return d[key].shape
    with d.zip.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        return (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)[0]


def sha1(array):
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def cached_npz(path, key, compute, name, refresh=False):
    """compute()'s array, saved in `path` as `name` with `key` (a string naming all it was computed
    from) and read back, bit for bit, while the key matches; otherwise (or refresh) recomputed."""
    if os.path.exists(path) and not refresh:
        saved = load_npz(path)
        if str(saved.get("key")) == key:
            return saved[name]
        print(f"    {path} was computed from other weights or audio: recomputing it", flush=True)
    value = compute()
    save_npz(path, key=np.array(key), **{name: value})
    return value


def model_fingerprint(model):
    """sha1 of every weight (adapters included): tells one model's feature cache from another's."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def feature_cache_dir(data, name, seed, context_s, stride_s, take="stride"):
    """This stage's feature cache for one model at one window setting, e.g.
    data/features/tiny_seed0/context16s_stride4s/ (each setting keeps its own; the authors' one
    frame per window: ..._first)."""
    tag = f"tiny_seed{seed}" if name == "tiny" else name.strip("/").replace("/", "--")  # a folder-safe name
    window = f"context{context_s:g}s_stride{stride_s:g}s" + ("" if take == "stride" else f"_{take}")
    return os.path.join(data, "features", tag, window)


def save_text(path, text):
    """Write a text file (a markdown table) to a temp file, then rename: never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_figure(fig, path):
    """Save a matplotlib figure atomically (as save_npz), then close it (stage 03 plots once per run)."""
    import matplotlib.pyplot as plt
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp_" + os.path.basename(path))
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)


# ---- the stages' flags ----


def parser(doc):
    """The stages' argparse: a bad flag value is one `error:` line and exit 1, like every other
    input error (argparse's own prints the usage too and exits 2)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(message):  # our types' words (ranged, one_of, ...) come out as "--flag value ..."
        m = re.fullmatch(r"argument ([^:/ ]+)[^:]*: (.*)", message, re.S)
        ours = m and not m[2].startswith(("invalid ", "expected ", "not allowed", "ignored ", "one of"))
        fail(f"{m[1]} {m[2]}" if ours else f"{message} (see --help)")
    p.error = error
    return p


def ranged(kind, lo=None, hi=None, why="", above=False):
    """An argparse type: a `kind` (int or float) in lo..hi (`above`: strictly above lo), else one
    line, `--flag value is out of range: it must be ...` (`why` replaces the bounds' words)."""
    def check(text):
        value = kind(text)
        if (lo is not None and (value <= lo if above else value < lo)) or (hi is not None and value > hi):
            bounds = (f"> {lo:g}" if above else f"{lo:g}..{hi:g}" if hi is not None and lo is not None
                      else f">= {lo:g}" if lo is not None else f"<= {hi:g}")
            raise argparse.ArgumentTypeError(f"{value:g} is out of range: {why or 'it must be ' + bounds}")
        return value
    check.__name__ = kind.__name__  # argparse names the type in its own errors ("invalid int value")
    return check


def one_of(names, what):
    """An argparse type: one of `names` (say, the ROIs), else `--flag 'X': unknown <what>; choose ...`."""
    def check(text):
        if text not in names:
            raise argparse.ArgumentTypeError(f"{text!r}: unknown {what}; choose one of {', '.join(names)}")
        return text
    check.__name__ = what
    return check


def tag_type(text):
    """An argparse type: a results tag, 'default' or the 6 hex digits in a result's name."""
    if text != "default" and not re.fullmatch(r"[0-9a-f]{6}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a tag is 'default' or 6 hex digits, as in "
                                         "02_baseline_<subject>_<tag>.npz")
    return text


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


def add_recipe(p, recipes, help):
    """--recipe NAME: the defaults of the flags recipes[NAME] names ({dest: value}), all at once;
    a flag typed on the command line still wins. 'repo' keeps this repository's defaults."""
    p.add_argument("--recipe", choices=["repo", *recipes], default="repo", help=help)
    parse, own = p.parse_args, {}  # each flag's own default, kept from the first parse on

    def parse_args(args=None, namespace=None):
        for a in p._actions:  # explicit_flags' parse (every default SUPPRESS) is left as it is
            if a.default is not argparse.SUPPRESS:
                own.setdefault(a.dest, a.default)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--recipe", default="repo")
        chosen = recipes.get(pre.parse_known_args(args)[0].recipe, {})
        for a in p._actions:  # a later parse of another recipe starts from the flags' own defaults
            if a.dest in own and a.default is not argparse.SUPPRESS:
                a.default = chosen.get(a.dest, own[a.dest])
        return parse(args, namespace)
    p.parse_args = parse_args


def sample_seconds(positive):
    """An argparse type: seconds, a whole number of samples at 16 kHz (> 0 when `positive`); whether
    they must also be whole 20 ms frames depends on the windows (check_window)."""
    def check(text):
        value = float(text)
        if value < 0 or (positive and value <= 0) or abs(value * 16000 - round(value * 16000)) > 1e-6:
            raise argparse.ArgumentTypeError(f"{value:g} must be a {'positive' if positive else 'non-negative'} "
                                             "multiple of a 16 kHz sample (and of WavLM's 20 ms frame for "
                                             "--window-feature stride, e.g. 0.1, 2, 4)")
        return value
    check.__name__ = "float"
    return check


def add_common_args(p):
    """The flags every stage 02-05 shares."""
    p.add_argument("--data", default="data", help="folder written by 01_prepare_data.py (default: data/)")
    p.add_argument("--results", default="results", help="output folder (default: results/)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def whole_frames(value, positive):
    """Is `value` seconds a whole number of WavLM's 20 ms frames (and > 0 when `positive`)?"""
    hop_s = 0.02  # WavLM's frame: 320 samples at 16 kHz
    return value >= (hop_s if positive else 0.0) and abs(value / hop_s - round(value / hop_s)) <= 1e-6


def check_window(context_s, stride_s, flags=("--context-s", "--stride-s")):
    """Window context and stride must be whole numbers of WavLM's 20 ms frames (stride > 0)."""
    for flag, value, positive in ((flags[1], stride_s, True), (flags[0], context_s, False)):
        if not whole_frames(value, positive):
            raise StudyError(f"{flag} {value:g} must be a {'positive' if positive else 'non-negative'} multiple of "
                             f"WavLM's 20 ms frame (e.g. 0.1, 2, 4)")


def subject_list(requested, study):
    """The subjects asked for (default: every subject of the study), each checked to be in it."""
    unknown = [s for s in requested or [] if s not in study["subjects"]]
    if unknown:
        raise StudyError(f"unknown subject(s) {', '.join(unknown)}: this study has {', '.join(study['subjects'])}")
    return requested or study["subjects"]
