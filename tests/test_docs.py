"""The docs are exactly true where a test can check them: HOW_IT_WORKS.md's symbols, the flags
they show, every relative link, and every command they show (run here, or skipped with its
reason)."""

import ast
import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, parser_actions, write_csv


def definitions(file):
    """The names a Python file defines: top-level functions, classes and assignments, and
    Class.method / Class.attribute for what a class defines."""
    names = set()
    for node in ast.parse((ROOT / file).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.ClassDef)):
                    names.add(f"{node.name}.{member.name}")
                elif isinstance(member, (ast.Assign, ast.AnnAssign)):
                    targets = member.targets if isinstance(member, ast.Assign) else [member.target]
                    names.update(f"{node.name}.{t.id}" for t in targets if isinstance(t, ast.Name))
    return names


def test_how_it_works_names_code_that_is_defined_where_it_says():
    """Code is named by file and symbol, never by line number: each [Symbol](file.py) link resolves
    to a definition of that name in that file (a move or a rename shows here; an edit above it does
    not)."""
    doc = (ROOT / "HOW_IT_WORKS.md").read_text()
    assert not re.search(r"\.py#L\d", doc), "a line-number link"
    links = re.findall(r"\[([^\]]+)\]\(([\w./]+\.py)\)", doc)
    assert len(links) > 15
    for label, file in links:
        name = re.fullmatch(r"(?:[\w./]+\.py(?:: )?)?([\w.]*)", label)
        assert name, f"link label {label!r} should name the code it points at"
        if name[1]:
            assert name[1] in definitions(file), f"{label}: not defined in {file}"


def test_every_flag_the_documentation_shows_exists():
    """Each flag in a `python train.py ...` (evaluate.py, tools/bench.py, ...) command of the
    README, the docs or HOW_IT_WORKS is one that script's --help lists."""
    docs = [ROOT / "README.md", ROOT / "HOW_IT_WORKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(doc.read_text() for doc in docs)
    for script in ("train.py", "evaluate.py", "tools/bench.py", "tools/random_checkpoint.py",
                   "tools/plot.py"):
        help_text = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                                   text=True, cwd=ROOT).stdout
        assert "usage" in help_text, script
        shown = set(re.findall(rf"python {script} ([^\n`]*)", text))
        assert shown or script == "tools/plot.py", script
        for line in shown:
            for flag in re.findall(r"(?<![\w-])(--[\w-]+)", line):
                assert flag in help_text, f"the docs show {script} {flag}, which --help does not list"


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


def test_the_flag_reference_and_help_agree_both_ways():
    """docs/flags.md has a row for each flag of --help, saying what it takes (its choices, or the
    kind of number), and names no flag that --help lacks."""
    import evaluate
    import train
    doc = (ROOT / "docs" / "flags.md").read_text()
    sections = dict(re.findall(r"\n## (\w+\.py)\n(.*?)(?=\n## |\Z)", doc, re.S))
    for script, module, argv in (("train.py", train, []),
                                 ("evaluate.py", evaluate, ["--checkpoint", "c", "--data", "d"])):
        actions = parser_actions(module.parse_args, argv)
        rows = {m[1]: m[2] for m in re.finditer(r"^\| `(--[\w-]+)` \| ([^|]+) \|", sections[script],
                                                  re.M)}
        assert rows.keys() == actions.keys(), (script, rows.keys() ^ actions.keys())
        for flag, action in actions.items():
            takes = rows[flag]
            if action.choices:
                assert all(f"`{c}`" in takes for c in action.choices), (script, flag, takes)
            elif action.type is int:
                assert "integer" in takes, (script, flag, takes)
            elif action.type is float:
                assert "number" in takes, (script, flag, takes)
            elif action.nargs == 0:
                assert "nothing" in takes, (script, flag, takes)
        named = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", sections[script]))
        named -= {f"--no-{f[2:]}" for f, a in actions.items() if a.nargs == 0}
        assert named <= actions.keys(), (script, named - actions.keys())


def test_how_it_works_reads_the_core_top_to_bottom():
    """Part one follows qwen_embed.py's sections in the file's order: the map's rows name the
    file's section dividers in order, each symbol listed is defined under its section, and each
    numbered section of Part one first names code from the same section as the one before or a
    later one."""
    doc = (ROOT / "HOW_IT_WORKS.md").read_text()
    source = (ROOT / "qwen_embed.py").read_text().splitlines()
    dividers = [(i, line.split()[-1]) for i, line in enumerate(source, 1)
                if re.fullmatch(r"# -+ \w+", line)]
    section_of = {}  # a top-level name of qwen_embed.py -> the index of the divider above it
    for node in ast.parse("\n".join(source)).body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for name in names:
            section_of[name] = sum(line < node.lineno for line, _ in dividers) - 1
    rows = re.findall(r"^\| (\w+) \| (.+) \| [\d, ]+ \|$", doc, re.M)
    assert [name for name, _ in rows] == [name for _, name in dividers]
    for k, (name, symbols) in enumerate(rows):
        for symbol in re.findall(r"\[([\w.]+)\]\(qwen_embed\.py\)", symbols):
            assert section_of[symbol.split(".")[0]] == k, f"{symbol} is not under '{name}'"
    part_one = doc.split("# Part one")[1].split("# Part two")[0]
    first = [section_of[m.split(".")[0]] for chunk in part_one.split("\n## ")[1:]
             for m in re.findall(r"\[([\w.]+)\]\(qwen_embed\.py\)", chunk)[:1]]
    assert len(first) == 7 and first == sorted(first), first


DOCS = [ROOT / "README.md", ROOT / "HOW_IT_WORKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading):
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves_to_a_file_and_its_heading():
    checked = 0
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"\w+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.name}: a link to {target}, which does not exist"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                assert anchor in {slug(h) for h in headings}, f"{doc.name}: no heading #{anchor}"
            checked += 1
    assert checked > 20


def commands(text):
    """The commands a document shows: lines of ```bash blocks and of indented blocks that start
    with a program, continuation lines joined, comments dropped."""
    blocks = [m[1] for m in re.finditer(r"^```(?:bash|sh|)\n(.*?)^```", text, re.S | re.M)]
    blocks += [re.sub(r"^    ", "", m[0], flags=re.M)
               for m in re.finditer(r"(?:^    \S.*\n)+", text, re.M)]
    found = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if re.match(r"(!|%|python |torchrun |pip |jupyter )", line):
                found.append(line)
    return list(dict.fromkeys(found))  # an indented block inside a fence is found twice


# Commands the docs show that no test runs here, each with its reason.
NOT_RUN = {
    r"^python -m venv|^pip install": "installs packages: .ci/run does exactly this in CI",
    r"^python -m pytest": "the test suite itself",
    r"jupyter lab": "opens a front end; tests/test_notebook.py executes the notebook",
    r"^torchrun --n": "8 processes or 2 nodes: tests/test_distributed.py runs torchrun with 2 "
                      "processes on the CPU",
    r"^!|^%": "a Kaggle notebook's paths and GPUs",
    r"--device cuda": "a GPU",
}
# What a command runs on here: a tiny checkpoint for every model, small CSVs, fewer sweep trials.
SHRINK = [(r"Qwen/Qwen3-[\w.-]+|sentence-transformers/[\w.-]+|google/embeddinggemma-[\w.-]+",
           "{tiny}"), (r"(?<![\w/])train\.csv", "{data}/train.csv"),
          (r"(?<![\w/])test\.csv", "{data}/test.csv"), (r"--sweep \d+", "--sweep 3"),
          (r" --shape [\w.]+ --layers \d+ --dtype bfloat16", ""),
          (r" --tokenizer QWEN/tokenizer\.json", ""), (r"(?<![\w/])MAP\.csv", "{data}/train.csv")]


def copy_project(folder):
    """The project as a fresh clone has it, its programs, tools and example data, in folder."""
    for part in ("at_scale", "tools", "data"):
        shutil.copytree(ROOT / part, folder / part)
    for file in ROOT.glob("*.py"):
        shutil.copy(file, folder)
    return folder


def run_here(command, cwd, monkeypatch):
    """A `python script.py args` command, run in this process (no interpreter start-up per
    command) from cwd, as its command line would: -> (exit status, what it printed to stderr)."""
    words = shlex.split(command)
    assert words[0] == "python" and words[1].endswith(".py"), command
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", words[1:])
    monkeypatch.setattr(sys, "path", list(sys.path))  # a tool puts its project first: undone after
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # plot.py's own default, undone after (a notebook
    # kernel started later by the suite inherits the environment and would draw nothing inline)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(cwd / words[1]), run_name="__main__")
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1 if e.code else 0), err.getvalue() + str(
            e.code or "")
    return 0, err.getvalue()


@pytest.mark.slow
def test_every_command_the_docs_show_runs_here_or_says_why_not(tmp_path, tiny, monkeypatch):
    """Each command of the README, the guide, HOW_IT_WORKS and the measurements runs, in the order
    shown, in a copy of the project, on a tiny checkpoint and small CSVs (SHRINK), or matches a
    NOT_RUN entry that says why it cannot run here."""
    copy = copy_project(tmp_path / "project")
    (tmp_path / "csv").mkdir()
    write_csv(tmp_path / "csv" / "train.csv", n=48)
    write_csv(tmp_path / "csv" / "test.csv", n=12, seed=1)
    ran, skipped = [], []
    for doc in DOCS:
        for command in commands(doc.read_text()):
            reason = next((why for pattern, why in NOT_RUN.items() if re.search(pattern, command)),
                          None)
            if reason:
                skipped.append((command, reason))
                continue
            for pattern, value in SHRINK:
                command = re.sub(pattern, value.format(tiny=tiny, data=tmp_path / "csv"), command)
            code, err = run_here(command + " --quiet" * ("train.py" in command), copy,
                                 monkeypatch)
            assert code == 0, f"{doc.name}: {command}\n{err[-2000:]}"
            ran.append(command)
    print(f"{len(ran)} commands run, {len(skipped)} not run here:")
    for command, reason in skipped:
        print(f"  {command[:60]}: {reason}")
    assert len(ran) >= 20 and all(reason for _, reason in skipped)


def test_the_readme_first_run_works_offline(tmp_path):
    """The README's offline first run, pasted into a fresh copy of the project: a random checkpoint,
    then a checkpoint trained on the example data; no network."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"A first run, offline.*?```bash\n(.*?)```", readme, re.S)[1]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("python tools/random_checkpoint.py")
    copy = copy_project(tmp_path / "project")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for line in lines:
        done = subprocess.run(line, shell=True, cwd=copy, capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
    assert (copy / "runs" / "first" / "meta.json").is_file() and "wrote runs/first/" in done.stdout
