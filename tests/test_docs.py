"""The docs point at real code: HOW_IT_WORKS.md's line links and the README's flags."""

import os
import re
import subprocess
import sys

from helpers import ROOT


def test_how_it_works_links_point_at_the_code_they_name():
    doc = (ROOT / "HOW_IT_WORKS.md").read_text()
    links = re.findall(r"\[([^\]]+)\]\(([\w.]+\.py)#L(\d+)(?:-L(\d+))?\)", doc)
    assert len(links) > 15
    for label, file, start, end in links:
        lines = (ROOT / file).read_text().splitlines()
        assert int(start) <= int(end or start) <= len(lines), (label, file)
        name = re.fullmatch(r"(?:[\w.]+\.py: )?([\w.]+)", label)
        assert name, f"link label {label!r} should name the code it points at"
        *outer, last = name[1].split(".")
        line = lines[int(start) - 1]
        assert last in line, (label, file, start)  # so edits keep it in step
        # and in the right place: a name is defined on its line (def, class or assignment); "A.b"
        # sits inside A (the nearest def or class above it), defined there if A is a class
        defined = re.search(rf"(def|class) {last}\b|\b{last} = ", line)
        if outer:
            above = next(x for x in reversed(lines[:int(start) - 1])
                         if re.match(rf"\s*(def|class) {outer[-1]}\b", x) or
                         re.match(r"(def|class) ", x))
            assert re.match(rf"\s*(def|class) {outer[-1]}\b", above), (label, file, start, above)
            assert defined or above.lstrip().startswith("def"), (label, file, start, line)
        else:
            assert defined, (label, file, start, line)


def test_readme_flags_exist():
    readme = (ROOT / "README.md").read_text()
    for script in ("train.py", "evaluate.py", "bench.py"):
        help_text = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                                   text=True, cwd=ROOT).stdout
        shown = set(re.findall(rf"python {script} ([^\n`]*)", readme))
        for line in shown:
            for flag in re.findall(r"(--[\w-]+)", line):
                assert flag in help_text, f"README shows {script} {flag}, which --help does not list"


def test_every_flag_documents_its_default():
    """Each flag's help ends with the default the parser really uses (argparse only formats what it
    is given: a help text that names another default, or a default changed in code, shows here)."""
    import evaluate
    import train
    required = {"evaluate.py": ["--checkpoint", "c", "--data", "d"], "train.py": []}
    for script, module in (("train.py", train), ("evaluate.py", evaluate)):
        out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "200"}).stdout
        defaults = vars(module.parse_args(required[script]))
        blocks = re.split(r"\n  (?=--)", out)[1:]
        assert blocks and all("(default:" in b for b in blocks if not b.startswith("--help")), script
        for block in blocks:
            flag = re.match(r"--([\w-]+)", block)[1]
            if flag in ("help", "checkpoint", "data") and script == "evaluate.py" or flag == "help":
                continue
            text = " ".join(block.split("\n\n")[0].split())  # the flag's block, before a group title
            shown = re.search(r"\(default: (.*?)\)$", text)[1]
            assert shown == " ".join(str(defaults[flag.replace("-", "_")]).split()), (script, flag, shown)
            if shown == "None":  # "None" alone tells a user nothing: the help says what it means
                assert "None:" in text or "None," in text, (script, flag, text)
