"""Stage 03's runs as files: names and records, crash-safe checkpoints, --resume, --init-from, results.

Used by stage 03 (opening a run, every epoch, --resume, --init-from, saving its result) and stages
04-05 (a run's best epoch as a model). A checkpoint folder holds the peft adapter (or the fully
fine-tuned weights) and state.pt (readout, optimizer, epoch, history, RNG state, provenance). A
save writes a complete copy aside and swaps it in, so at any instant one complete copy exists and
recover_checkpoint finds it.
"""
import copy
import glob
import json
import os
import shutil

import numpy as np
import torch

from lib import figures
from lib.plumbing import StudyError, load_npz, model_fingerprint, pick_device, save_npz
from lib.provenance import (as_flags, baseline_tag_flag, code_differs, code_state, command, describe_run, digest,
                            find_runs, init_matches, load_run, note_replaced_run, run_name, settings_tag)

ROIS = ("whole", "AC", "LH", "RH")  # the voxels a run's loss sees (Section 3.2)


def save_checkpoint(folder, model, readout, opt, epoch, history, prov):
    """Write <folder>.tmp completely (state.pt last, itself by rename), then swap it in: the old copy
    is renamed aside before the new one takes its place and removed after. At any instant one
    complete copy exists, and recover_checkpoint finds it."""
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "model"))  # peft: adapter_config.json + adapter_model.safetensors
    torch.save(dict(readout=readout.state_dict(), opt=opt.state_dict(), epoch=epoch, history=history,
                    torch_rng=torch.get_rng_state(), provenance=prov), os.path.join(tmp, "state.pt.part"))
    os.replace(os.path.join(tmp, "state.pt.part"), os.path.join(tmp, "state.pt"))  # now tmp is complete
    if os.path.isdir(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(folder):
    """After a crash mid-save: the newest complete copy (folder, then .tmp, then .old) goes in
    place and the leftovers are removed. True if a complete checkpoint is there."""
    for copy_ in (folder, folder + ".tmp", folder + ".old"):
        if os.path.exists(os.path.join(copy_, "state.pt")):
            if copy_ != folder:
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(copy_, folder)
            break
    for leftover in (folder + ".tmp", folder + ".old"):
        shutil.rmtree(leftover, ignore_errors=True)
    return os.path.exists(os.path.join(folder, "state.pt"))


def read_state(folder):
    return torch.load(os.path.join(folder, "state.pt"), weights_only=True)


def checkpoint_recipe(ckpt):
    """The --recipe of the run in checkpoint folder `ckpt` (None before its first epoch's save)."""
    state = os.path.join(ckpt, "last", "state.pt")
    if not os.path.exists(state):
        return None
    return torch.load(state, weights_only=True)["provenance"]["settings"].get("recipe", "repo")


def run_folder(path):
    """The run's checkpoint folder of a path to it or to its best/ or last/."""
    path = os.path.normpath(path)
    return os.path.dirname(path) if os.path.basename(path) in ("best", "last") else path


def load_model_weights(folder, model, full):
    """A checkpoint's WavLM weights (full) or LoRA adapters into the run's own model."""
    from safetensors.torch import load_file
    if full:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.load_state_dict(load_file(os.path.join(folder, "model", "model.safetensors")))
    else:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(os.path.join(folder, "model", "adapter_model.safetensors")))


def load_weights(folder, model, readout, full):
    """Load a checkpoint into the run's own model and readout (the optimizer keeps pointing at them)."""
    load_model_weights(folder, model, full)
    state = read_state(folder)
    readout.load_state_dict(state["readout"])
    return state


# ---- starting from another run, continuing a run ----

def init_source(args, subj, seed):
    """--init-from as a checkpoint folder: a path, or an ROI word naming this subject's run of that
    ROI with the same mode and seed in --checkpoints (the only one; several are an error)."""
    wanted = args.init_from.rstrip("/")
    if wanted not in ROIS:
        return wanted
    mode = "full" if args.full_finetune else "lora"
    runs = [n for n, _, src in find_runs(args.checkpoints, subj, wanted, mode, seed, "") if src is None
            and checkpoint_recipe(os.path.join(args.checkpoints, n)) == args.recipe]
    if len(runs) != 1:
        found = f"{len(runs)} of them: {', '.join(runs)}" if runs else "none"
        raise StudyError(f"--init-from {wanted}: want exactly one checkpoint {run_name(subj, wanted, mode, seed)}"
                         f"[_<tag>] of --recipe {args.recipe} in {args.checkpoints}/, found {found}; pass the "
                         "folder itself")
    return os.path.join(args.checkpoints, runs[0])


def init_checkpoint(path, prov):
    """The best epoch of the stage 03 run at `path` (its folder, or its best/ or last/), checked to
    fit this run: same study, same base model weights, same mode, same LoRA shape. Returns
    (folder, its run name, its provenance fingerprint)."""
    folder = os.path.join(path, "best") if os.path.isdir(os.path.join(path, "best")) else path
    if not os.path.exists(os.path.join(folder, "state.pt")):
        raise StudyError(f"--init-from {path}: no stage 03 checkpoint there ({os.path.join(folder, 'state.pt')} "
                         "not found); pass a folder like checkpoints/03_<subject>_whole_lora_seed0, or an ROI")
    theirs = read_state(folder).get("provenance")
    if theirs is None:
        raise StudyError(f"--init-from {path}: the checkpoint predates provenance records (no record of its "
                         "base model or study); rerun that stage 03 run")
    if theirs["stories"] != prov["stories"]:
        raise StudyError(f"--init-from {path} was tuned on another study (its stories differ from this data's)")
    if theirs["model_fingerprint"] != prov["model_fingerprint"]:
        raise StudyError(f"--init-from {path} was tuned from another base model ({theirs['model']}) than "
                         f"stage 02's ({prov['model']}) or other weights of it")
    if theirs["mode"] != prov["mode"]:
        raise StudyError(f"--init-from {path} is a {theirs['mode']} checkpoint; this run is {prov['mode']}"
                         f" ({'drop' if prov['mode'] == 'full' else 'add'} --full-finetune)")
    shape = ("lora_rank", "lora_alpha", "lora_targets")
    if prov["mode"] == "lora" and [theirs["settings"][k] for k in shape] != [prov["settings"][k] for k in shape]:
        raise StudyError(f"--init-from {path} has another LoRA shape (rank {theirs['settings']['lora_rank']}, alpha "
                         f"{theirs['settings']['lora_alpha']:g}, targets {' '.join(theirs['settings']['lora_targets'])}) "
                         "than this run; pass the same --lora-rank, --lora-alpha and --lora-targets")
    return folder, os.path.basename(run_folder(folder)), digest(theirs)


def subject_name(subjects, joint):
    """The subject part of a run's name: the subject's, or joint-<subjects> for a joint run."""
    return "joint-" + "-".join(subjects) if joint else subjects[0]


def resume_args(args, subjects, seed, run_settings):
    """--resume: the run's own settings from its last checkpoint. The checkpoint is found among this
    subject's runs of the ROI, mode and seed asked for; a flag given now that differs from the saved
    value is an error naming both. No checkpoint to continue is an error, never a fresh start."""
    mode, subj = "full" if args.full_finetune else "lora", subject_name(subjects, args.joint)
    wanted_init = None if args.init_from is None else os.path.basename(run_folder(args.init_from))
    found = []
    for name, _, src in find_runs(args.checkpoints, subj, args.roi, mode, seed, ""):
        if init_matches(src, wanted_init, subj) and recover_checkpoint(os.path.join(args.checkpoints, name, "last")):
            found.append((name, read_state(os.path.join(args.checkpoints, name, "last"))["provenance"]))
    if not found:
        others = sorted(os.path.basename(f) for f in glob.glob(os.path.join(args.checkpoints, f"03_{subj}_*"))
                        if os.path.isdir(f))
        raise StudyError(f"--resume: no checkpoint of {run_name(subj, args.roi, mode, seed)}[_<tag>] in "
                         f"{args.checkpoints}/ to continue{' (there: ' + ', '.join(others) + ')' if others else ''}; "
                         "start the run without --resume")
    mine, explicit = run_settings(args), args._given
    fits = [(n, p) for n, p in found if all(p["settings"].get(k) == mine[k] for k in explicit if k in mine)]
    if not fits:
        name, prov = found[0]
        k = next(k for k in explicit if k in mine and prov["settings"].get(k) != mine[k])
        saved = as_flags({k: prov["settings"].get(k)}, {}) or [f"--{k.replace('_', '-')} {prov['settings'].get(k)}"]
        raise StudyError(f"--resume: {args.checkpoints}/{name} was started with {saved[0]}, you gave "
                         f"{(as_flags({k: mine[k]}, {}) or ['no --' + k.replace('_', '-')])[0]}; drop the flag "
                         "to continue it with its own, or start a new run without --resume")
    if len(fits) > 1:
        raise StudyError("--resume: several runs fit: " + "; ".join(f"{n} ({' '.join(p['flags']) or 'defaults'})"
                         for n, p in fits) + "; give the flags of the one to continue")
    resumed = copy.copy(args)
    for k, v in fits[0][1]["settings"].items():
        setattr(resumed, k, v)
    return resumed


def start(ckpt, result, prov, resume, epochs):
    """A run's checkpoint folder before training. --resume: refuse a checkpoint trained from other
    inputs, and return the result of a run that already finished (else None). Without --resume, an
    earlier checkpoint of the same name (same settings) is replaced."""
    name = os.path.basename(ckpt)
    if resume:
        last = read_state(os.path.join(ckpt, "last"))
        saved = last["provenance"]
        if digest(saved) != digest(prov):
            why = [k for k in ("stories", "subject_data", "baseline", "model_fingerprint", "init_from") if saved.get(k) != prov.get(k)]
            edited = code_differs(prov.get("code"), saved.get("code"))
            why += [f"code ({edited})"] if edited else []
            raise StudyError(f"--resume: {ckpt} was trained from other inputs ({', '.join(why) or 'settings'} differ: "
                             "the study, stage 02, the run it started from or the code changed since); start it again "
                             "without --resume")
        if os.path.exists(result) and str(load_npz(result).get("fingerprint")) == digest(prov) \
                and last["epoch"] + 1 >= epochs:
            print(f"  {name}: already finished, {result} is its result")
            return load_npz(result)
    elif os.path.exists(ckpt):
        print(f"  note: starting {name} again: its earlier checkpoint (same settings) is replaced")
        shutil.rmtree(ckpt)
    return None


def resume(ckpt, model, readout, opt, full):
    """Continue from last/ (after recovering best/ from a crash mid-save): weights, optimizer and
    RNG state back in place. Returns (history, the next epoch)."""
    recover_checkpoint(os.path.join(ckpt, "best"))
    state = load_weights(os.path.join(ckpt, "last"), model, readout, full)
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["torch_rng"])
    print(f"  resuming {os.path.basename(ckpt)} after epoch {state['epoch'] + 1}")
    return state["history"], state["epoch"] + 1


# ---- a run's best epoch as a model (stages 04-05) ----

def load_tuned_wavlm(model, folder, full, device=None):
    """A stage 03 checkpoint on its base model (`model`: stage 02's WavLM, common.load_wavlm): the
    saved peft adapter, or the fully fine-tuned weights when `full`."""
    if full:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        return model
    from peft import PeftModel
    return PeftModel.from_pretrained(model, folder).to(pick_device(device)).eval()


def find_tuned(args, subj, study, roi=None, mode=None, init_from=None):
    """The stage 03 run of `subj` asked for (args' ROI, mode and start run unless given; its seed and
    tag), checked by load_run, with its checkpoint, checked to be that run's, before any work: the
    run's npz dict, with `best`, its best epoch's folder."""
    roi, init_from = roi or args.roi, init_from if roi else args.init_from
    mode = mode or ("full" if args.full_finetune else "lora")
    run = load_run(args, subj, roi, mode, args.seed, init_from, baseline_tag_flag(args.tag), study)
    best = os.path.join(args.checkpoints, run["name"], "best")
    state = os.path.join(best, "state.pt")
    if not os.path.exists(state):
        raise StudyError(f"{run['path']} has no checkpoint ({state} not found): was --checkpoints "
                         f"{args.checkpoints} the folder of that run?")
    if digest(torch.load(state, weights_only=True).get("provenance")) != run["fingerprint"]:
        raise StudyError(f"{best} is not the checkpoint of {run['path']} (another run of the same name was "
                         "trained since): rerun it with " + command("03_finetune_lora.py", args, f"--subject {subj}",
                                                                   *run["provenance"]["flags"]))
    run["best"] = best
    return run


def load_tuned(args, run, model, device):
    """A run found by find_tuned as a model (its best epoch) on its base `model`, in eval mode."""
    return load_tuned_wavlm(model, os.path.join(run["best"], "model"), args.full_finetune, device).eval()


# ---- a stage 03 run: its record and name, epochs, result ----

def run_tag(args, baseline, settings, defaults, script):
    """'' for the defaults' settings against stage 02's defaults' result with committed code, else
    '_' + 6 hex digits."""
    mine = dict(settings, baseline=baseline["tag"])
    mine.pop("full_finetune")
    code = code_state(script)
    if code["edited"]:  # code that differs from the git commit: a name of its own, never the reference's
        mine["code"] = code["fingerprint"]
    return settings_tag(mine, dict(defaults, baseline=""))


def run_record(args, subjects, seed, study, baselines, settings, defaults, script):
    """What a run is built from: the study, its subjects' files, its settings and the stage 02
    result of each subject it is scored against (with_model adds the base model, open_run the run
    it started from). Returns (args with --init-from resolved to a checkpoint folder, the record)."""
    subj, first = subject_name(subjects, args.joint), baselines[subjects[0]]
    if args.init_from:
        args = copy.copy(args)
        args.init_from = init_source(args, subj, seed)
    records = {s: dict(file=os.path.basename(b["path"]), tag=b["tag"], fingerprint=b["fingerprint"])
               for s, b in baselines.items()}
    prov = dict(stage="03", subject=subj, roi=args.roi, seed=seed, stories=study["stories_fingerprint"],
                settings=settings, tag=run_tag(args, first, settings, defaults, script)[1:],
                flags=as_flags(settings, defaults), code=code_state(script), baseline=records[subjects[0]])
    if args.joint:  # each subject's file and stage 02 result
        prov.update(subjects=list(subjects), baselines=records,
                    subject_data={s: study["subject_fingerprints"][s] for s in subjects})
    else:
        prov["subject_data"] = study["subject_fingerprints"][subj]
    return args, prov


def with_model(prov, args, baseline, model):
    """A run's record with its base model: stage 02's, by name, seed and weights."""
    return dict(prov, model=str(baseline["model"]), model_seed=int(baseline["model_seed"]),
                mode="full" if args.full_finetune else "lora", model_fingerprint=model_fingerprint(model))


def open_run(args, prov, init):
    """The run's name and checkpoint folder ({name, ckpt, prov}) and, with --resume, its checks:
    (run, the finished run's result or None)."""
    prov["init_from"] = dict(name=init[1], fingerprint=init[2]) if init else None
    tag = "_" + prov["tag"] if prov["tag"] else ""
    name = run_name(prov["subject"], args.roi, prov["mode"], prov["seed"], tag, init[1] if init else None)
    prov["flags"] += [f"--init-from {args.init_from}"] if init else []
    ckpt = os.path.join(args.checkpoints, name)
    finished = start(ckpt, os.path.join(args.results, f"{name}.npz"), prov, args.resume, args.epochs)
    return dict(name=name, ckpt=ckpt, prov=prov), finished


def start_history(args, run, model, readout, opt):
    """(history, first epoch): empty and 0, or with --resume the run's last checkpoint's."""
    if args.resume:
        return resume(run["ckpt"], model, readout, opt, args.full_finetune)
    return dict(val_r=[], loss=[]), 0


def best_epoch(history):
    """The best epoch so far, counted from 1 (the first best on ties); 0 when the model it started
    from is a candidate (history's val_r_start: --best-epoch linearized) and none beat it."""
    scores = [history["val_r_start"]] if "val_r_start" in history else []
    scores += history["val_r"]
    return int(np.argmax(scores)) + (0 if "val_r_start" in history else 1) if scores else 0


def start_candidate(run, history, val_r, model, readout, opt):
    """The model a run starts from as a candidate for its best epoch, with its validation r: saved
    as best/ and last/ (epoch -1: --resume goes on with epoch 1)."""
    history["val_r_start"] = val_r
    print(f"  {run['name']} before training: val r {val_r:.4f}", flush=True)
    for folder in ("best", "last"):
        save_checkpoint(os.path.join(run["ckpt"], folder), model, readout, opt, -1, history,
                        run["prov"])


def end_epoch(run, epoch, history, mean_loss, val_r, model, readout, opt):
    """An epoch's loss and validation r into the history, printed; best/ saved when it is the best
    so far (before last/: a crash between the two repeats the epoch, to the same numbers)."""
    history["val_r"].append(val_r)
    history["loss"].append(mean_loss)
    best = best_epoch(history) - 1
    print(f"  {run['name']} epoch {epoch + 1}: loss {mean_loss:.4f}, val r {val_r:.4f}"
          f"{'  (best)' if best == epoch else ''}", flush=True)
    if best == epoch:
        save_checkpoint(os.path.join(run["ckpt"], "best"), model, readout, opt, epoch, history, run["prov"])
    save_checkpoint(os.path.join(run["ckpt"], "last"), model, readout, opt, epoch, history, run["prov"])


def save_run(args, run, out, common_out, files, init):
    """A finished run's result (results/<run>.npz, with its settings and provenance) and figure; the
    figure of an --init-from run shows its change over the run it started from too. out: {subject:
    its arrays}; a single subject's run keeps the plain names (test_r_tuned, ...), a joint run's
    carry their subject (test_r_tuned_sim01, ...) beside `subjects`."""
    prov = run["prov"]
    if len(out) == 1 and "subjects" not in prov:
        (subj, arrays), = out.items()
        flat = dict(arrays, subject=np.array(subj))
    else:
        flat = {f"{k}_{s}": v for s, arrays in out.items() for k, v in arrays.items()}
        flat.update(subjects=np.array(list(out)), subject=np.array(prov["subject"]))
    flat = dict(flat, **common_out, settings=np.array(json.dumps(prov["settings"], sort_keys=True)),
                provenance=np.array(json.dumps(prov, sort_keys=True)), fingerprint=np.array(digest(prov)))
    result = os.path.join(args.results, f"{run['name']}.npz")
    note_replaced_run(result, flat["fingerprint"])
    start_path = os.path.join(args.results, f"{init[1]}.npz") if init else None
    start_run = None
    if start_path and os.path.exists(start_path):  # the run it started from: figure, claims.py
        s = load_npz(start_path)
        start_run = dict(name=describe_run(json.loads(str(s["provenance"]))), tuned=s["test_r_tuned"])
        flat["test_r_start"] = s["test_r_tuned"]
    for view, subject_data in zip(run_rows(run["name"], flat, files), files.values()):
        suffix = "" if len(files) == 1 else "_" + str(view[1]["subject"])
        figures.tuned_run(view[1], subject_data, os.path.join(args.results, f"{run['name']}{suffix}.png"), start_run)
    save_npz(result, **flat)  # last: a run with its result file is finished (--resume skips it)
    return flat


def run_rows(name, saved, files):
    """A run's result as rows to print, one per subject: (label, that subject's arrays, its file)."""
    if "subjects" not in saved:
        return [(name, saved, next(iter(files.values())))]
    per = ("test_r_baseline", "test_r_tuned", "test_r_untuned", "alphas_tuned", "test_r_direct", "roi_mask")
    rows = []
    for s in saved["subjects"]:
        view = {k: v for k, v in saved.items() if k not in per and not k.startswith(per)}
        view.update({k: saved[f"{k}_{s}"] for k in per}, subject=np.array(str(s)))
        rows.append((f"{name} on {s}", view, files[str(s)]))
    return rows


def resume_hint(args, run_args, subjects, seed, run_settings, defaults):
    """The command that continues an interrupted run (Ctrl-C in stage 03)."""
    a = run_args
    return "continue with " + command(
        "03_finetune_lora.py", a, f"--subject {' '.join(subjects)}", "--joint" if a.joint else "",
        f"--seed {seed}", "" if a.roi == "whole" else f"--roi {a.roi}",
        "--full-finetune" if a.full_finetune else "", f"--init-from {args.init_from}" if args.init_from else "",
        f"--baseline-tag {args.baseline_tag}" if args.baseline_tag else "",
        *as_flags(run_settings(a), dict(defaults, full_finetune=a.full_finetune)), "--resume")
