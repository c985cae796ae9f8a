"""Every command a reader copies runs as printed: the usage lines of each script's docstring and the
code blocks of README.md and docs/. A block holds commands, comments and the continuation lines of
a command (a trailing backslash, an open quote); any other line is the tail of a wrapped command.
Each `python <script>.py ...` line is parsed by that script's own parser, and each `make <target>`
names a target of the Makefile."""
import ast
import glob
import os
import re
import shlex

import pytest

from helpers import ROOT, stage

SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# what a command line of this repository starts with (a VAR=value prefix aside)
HEADS = {"python", "python3", ".venv/bin/python", "make", "pip", ".", "source", "cd", "ls", "rm", "cp",
         "mkdir", "export"}


def blocks_of_docstring(text):
    """The indented blocks of a docstring that follow a blank line: [(first line number, lines)]."""
    return indented_blocks(text.splitlines())


def indented_blocks(lines):
    out, current, blank_before = [], None, True
    for i, line in enumerate(lines):
        if line.startswith("    ") and line.strip() and (current is not None or blank_before):
            if current is None:
                current = (i + 1, [])
                out.append(current)
            current[1].append(line.strip())
        else:
            current = None
        blank_before = not line.strip()
    return out


def blocks_of_markdown(text):
    """Fenced code blocks and blocks indented by 4 spaces after a blank line (outside fences)."""
    lines, out, fence, plain = text.splitlines(), [], None, []
    for i, line in enumerate(lines):
        if line.startswith("```"):
            if fence is None:
                fence = (i + 2, [], line[3:].strip())
            else:
                if fence[2] in ("sh", "bash", ""):
                    out.append(fence[:2])
                fence = None
            plain.append("")
        elif fence is not None:
            fence[1].append(line.strip())
            plain.append("")
        else:
            plain.append(line)
    return out + indented_blocks(plain)


def commands(block):
    """The commands of a block ([(line, argv)]) and its stray lines: a line that is neither a
    comment, nor a command, nor the continuation of the one before."""
    first, lines = block
    found, stray, pending = [], [], None
    for n, line in enumerate(lines, first):
        if pending is None:
            if not line or line.startswith("#"):
                continue
            head = shlex.split(line, comments=True, posix=True)[0] if balanced(line) else line.split()[0]
            if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", head):  # VAR=value command
                head = line.split()[1]
            if head not in HEADS:
                stray.append((n, line))
                continue
            pending = (n, line)
        else:
            pending = (pending[0], pending[1] + "\n" + line)
        text = pending[1]
        if text.endswith("\\") or not balanced(text):
            continue
        found.append((pending[0], shlex.split(text.replace("\\\n", " "), comments=True)))
        pending = None
    if pending is not None:
        stray.append(pending)
    return found, stray


def balanced(text):
    try:
        shlex.split(text, comments=True)
        return True
    except ValueError:  # an open quote: the command goes on
        return False


def sources():
    """(where, blocks) for every script's docstring and every page."""
    for script in SCRIPTS:
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, script)).read()), clean=False) or ""
        yield script, blocks_of_docstring(doc)
    for page in DOCS:
        yield page, blocks_of_markdown(open(os.path.join(ROOT, page)).read())


def make_targets():
    text = open(os.path.join(ROOT, "Makefile")).read()
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", text, re.M)) | set(
        t for line in re.findall(r"^\.PHONY:(.*)$", text, re.M) for t in line.split())


def check_command(argv):
    """None if argv runs as printed as far as its script's parser or the Makefile can tell, else why."""
    if argv[0] == "make":
        targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
        missing = [t for t in targets if t not in make_targets()]
        return f"no Makefile target {missing}" if missing else None
    if not argv[0].endswith("python") and argv[0] != "python3":
        return None
    script = argv[1] if len(argv) > 1 else ""
    if script in ("-c", "-m") or not script.endswith(".py") or "/" in script:
        return None
    if script not in SCRIPTS:
        return f"{script} is not a script of this repository"
    module = stage(script)
    if not hasattr(module, "get_parser"):
        return None
    try:
        module.get_parser().parse_args(argv[2:])
    except SystemExit as e:
        return f"its parser refuses it (exit {e.code})"
    return None


def every_command():
    for where, blocks in sources():
        for block in blocks:
            found, _ = commands(block)
            for line, argv in found:
                yield where, line, argv


def test_no_command_is_wrapped():
    stray = [f"{where}:{line}: {text!r}" for where, blocks in sources() for block in blocks
             for line, text in commands(block)[1]]
    assert not stray, "lines that are neither a command, a comment nor a continuation:\n" + "\n".join(stray)


def test_every_command_parses(capsys):
    checked, bad = 0, []
    for where, line, argv in every_command():
        why = check_command(argv)
        checked += why is None and argv[0] != "make" and len(argv) > 1 and argv[1] in SCRIPTS
        if why:
            bad.append(f"{where}:{line}: {' '.join(argv)}: {why}")
    capsys.readouterr()
    assert not bad, "\n".join(bad)
    # every stage shows its commands: at least one parsed per stage script, 00 to 05
    shown = {argv[1] for _, _, argv in every_command() if len(argv) > 1}
    assert {s for s in SCRIPTS if re.match(r"0\d_", s)} <= shown
    assert checked >= 20


def test_the_checks_see_a_wrapped_command_and_a_bad_flag():
    """The checks themselves: a comment wrapped onto a line of its own, a flag wrapped away from its
    value, and a flag no parser knows are each caught."""
    wrapped = (1, ["python 03_finetune_lora.py --subject sim01 --full-finetune   # the unstable",
                   "comparison"])
    assert commands(wrapped)[1] == [(2, "comparison")]
    split_flag = (1, ["python 03_finetune_lora.py --subject sim01 --roi", "AC"])
    found, stray = commands(split_flag)
    assert stray == [(2, "AC")] and check_command(found[0][1]) is not None
    assert check_command(shlex.split("python 03_finetune_lora.py --no-such-flag")) is not None
    assert check_command(shlex.split("python 03_finetune_lora.py --subject sim01 --seeds 0 1 2")) is None
    assert check_command(["make", "no-such-target"]) is not None
    continued = (1, ["python 01_prepare_data.py --source ds003020 \\", "    --ds-root X"])
    assert commands(continued) == ([(1, ["python", "01_prepare_data.py", "--source", "ds003020",
                                         "--ds-root", "X"])], [])


@pytest.mark.parametrize("script", [s for s in SCRIPTS if re.match(r"0\d_", s)])
def test_docstring_lines_fit(script):
    """Usage lines within the stages' 100 characters, so that nobody wraps them again."""
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, script)).read()), clean=False) or ""
    long = [line for _, lines in blocks_of_docstring(doc) for line in lines if len(line) + 4 > 100]
    assert not long, long
