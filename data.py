"""Rows in, texts and labels out: CSV reading, text templates, validation splits, atomic writes,
and the CSV tables a run keeps.

Shared by train.py and evaluate.py. Errors are ValueError/FileNotFoundError with one line that
names the file, row or flag; the command-line scripts print that line and exit non-zero
(cli.cli).
"""

import contextlib
import csv
import errno
import fnmatch
import glob
import io
import json
import os
import random
import shutil
import string
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

# The MAP format: the question, the multiple-choice answer the student picked, their explanation.
MAP_TEMPLATE = ("Question: {QuestionText}\nAnswer: {MC_Answer}\n"
                "Student explanation: {StudentExplanation}")
CORRECT_SUFFIX = "\nIs the answer correct? {AnswerIsCorrect}"  # train.py --map-correct


@dataclass(frozen=True)
class RowsSpec:
    """How a CSV row becomes the text embedded and its label: what a checkpoint records beside its
    EmbedSpec, so that evaluation reads rows as training did."""
    text_template: str
    label_cols: list
    id_col: str
    correct_answers: dict | None = None  # --map-correct: {QuestionId: the answer taken as correct}


def read_csv(path):
    """(columns, rows as dicts). UTF-8 with or without BOM; quoted fields may hold commas and
    newlines; every value stays a string, so the literal `NA` is a label, not a missing value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CSV file")
    # Python's csv refuses fields over 131,072 characters by default: a limit of the module, not of
    # the file (Qwen3 reads 32k tokens, well over 100k characters). A field is held in memory like
    # every other, so memory is the only limit.
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path}: empty file (no header row)")
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:  # a row dict would keep the last one without a word
                raise ValueError(f"{path}: the header names column(s) {repeated} more than once")
            rows = []
            for fields in reader:
                if not fields:  # a blank line
                    continue
                if len(fields) != len(header):
                    raise ValueError(f"{path}: line {reader.line_num}: {len(fields)} fields, "
                                     f"the header has {len(header)}")
                rows.append(dict(zip(header, fields)))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); re-save it as "
                         f"UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return header, rows


def require_columns(path, columns, wanted, flag):
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(f"{path}: {flag} names column(s) {missing} that the CSV lacks; it has "
                         f"{columns}")


def template_fields(template):
    """Column names a template uses. Only plain `{column}` fields: `{x.attr}`, `{x[0]}`, `{x!r}` and
    `{x:spec}` are refused, so a template can never reach into Python objects."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"--text-template: {e}") from None
    fields = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field or field.isdigit() or any(c in field for c in ".[]") or spec or conversion:
            shown = field + ("!" + conversion if conversion else "") + (":" + spec if spec else "")
            raise ValueError(f"--text-template: field {{{shown}}} must be a plain column name "
                             f"like {{QuestionText}}")
        fields.append(field)
    return fields


def render(template, rows):
    return [template.format_map(row) for row in rows]


def row_texts(path, columns, rows, template, correct_answers=None, whose=""):
    """The one way from CSV rows to the texts to embed, for training and evaluation alike: the
    template over each row's columns, after what a row contributes (--map-correct's AnswerIsCorrect
    column, from correct_answers: {QuestionId: the answer taken as correct}). A template may take
    a row's own instruction from a column ("Instruct: {Task}\nQuery:{StudentExplanation}"); the
    run-wide --instruction is applied later, when tokenizing. whose: "the checkpoint's " when the
    template comes from a checkpoint, for the error messages."""
    if correct_answers is not None:
        require_columns(path, columns, ["QuestionId", "MC_Answer"], f"{whose}--map-correct")
        add_answer_is_correct(rows, correct_answers)
        columns = columns + ["AnswerIsCorrect"]
    require_columns(path, columns, template_fields(template), f"{whose}--text-template")
    return render(template, rows)


def check_ids(path, rows, id_col):
    seen, dupes = set(), []
    for row in rows:
        if row[id_col] in seen:
            dupes.append(row[id_col])
        seen.add(row[id_col])
    if dupes:
        raise ValueError(f"{path}: duplicate {id_col} values {sorted(set(dupes))[:10]}")


def map_correct_answers(rows):
    """MAP format: {QuestionId: its correct answer}, the MC_Answer most often chosen by rows whose
    Category starts with True_ (ties: the first seen). Training data only: it needs the labels."""
    counts = defaultdict(Counter)
    for row in rows:
        if row["Category"].startswith("True_"):
            counts[row["QuestionId"]][row["MC_Answer"]] += 1
    return {q: c.most_common(1)[0][0] for q, c in counts.items()}


def add_answer_is_correct(rows, correct):
    """AnswerIsCorrect per row: "yes" if its MC_Answer is its question's answer in correct, else
    "no", a question that correct does not hold included (the docs say so; evaluation counts
    them)."""
    for row in rows:
        is_correct = correct.get(row["QuestionId"]) == row["MC_Answer"]
        row["AnswerIsCorrect"] = "yes" if is_correct else "no"


def labels_of(rows, label_cols):
    return [":".join(row[c] for c in label_cols) for row in rows]


# ----------------------------------------------------------------------------- validation splits

def buckets(values, rng):
    """({value: [indices holding it]}, the values in a seeded random order): what both splits deal
    out, whole groups or each label's rows (each label's rows are shuffled where they are dealt)."""
    members = defaultdict(list)
    for i, v in enumerate(values):
        members[v].append(i)
    keys = sorted(members)
    if rng is not None:
        rng.shuffle(keys)
    return members, keys


def split(labels, val_frac, groups=None, seed=0):
    """(train indices, val indices). Grouped when groups are given (no group on both sides), else
    stratified by label (each label keeps its share; a label seen once stays in training)."""
    rng = random.Random(seed)
    val = []
    if groups is not None:
        members, keys = buckets(groups, rng)
        for g in keys:
            if len(val) >= val_frac * len(labels):
                break
            val += members[g]
        if len(val) == len(labels):
            raise ValueError(f"--val-frac {val_frac}: too few groups ({len(keys)}) to keep any for "
                             f"training")
    else:
        members, _ = buckets(labels, None)
        for y in sorted(members):
            idx = members[y]
            rng.shuffle(idx)
            val += idx[: int(round(val_frac * len(idx))) if len(idx) > 1 else 0]
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def kfold(labels, k, groups=None, seed=0):
    """A fold number per row. Grouped: whole groups, largest first, each into the emptiest fold.
    Stratified: each label's rows dealt round-robin over the folds."""
    rng = random.Random(seed)
    fold = [0] * len(labels)
    if groups is not None:
        members, keys = buckets(groups, rng)
        if len(members) < k:
            raise ValueError(f"--folds {k}: only {len(members)} groups in --group-col")
        sizes = [0] * k
        for g in sorted(keys, key=lambda g: -len(members[g])):
            f = sizes.index(min(sizes))
            for i in members[g]:
                fold[i] = f
            sizes[f] += len(members[g])
    else:
        members, _ = buckets(labels, None)
        offset = 0
        for y in sorted(members):
            idx = members[y]
            rng.shuffle(idx)
            for j, i in enumerate(idx):
                fold[i] = (offset + j) % k
            offset += len(idx)  # so that rare labels do not all land in fold 0
    return fold


# ----------------------------------------------------------------------------- atomic writes

class DiskFullError(OSError):
    """A write found no space left: one line naming the folder and what it has free."""


def is_disk_full(error):
    """ENOSPC or EDQUOT, as an OSError or as the I/O error safetensors reports in its own
    exception."""
    full = (errno.ENOSPC, errno.EDQUOT)
    return (isinstance(error, DiskFullError) or (isinstance(error, OSError) and error.errno in full)
            or any(f"os error {n})" in str(error) for n in full))


# A run's folder lists what it wrote in MANIFEST, so that a later run replaces it whole and never
# deletes a file someone else put there. Folders of before the manifest are recognised by the names
# the runs of then wrote.
MANIFEST = "manifest.json"
NAMES_BEFORE_MANIFEST = ("meta.json", "args.json", "val_predictions.csv", "history.csv",
                         "folds.csv", "sweep.csv", "layer_sweep.csv", "results.json",
                         "lora.safetensors", "head.safetensors", "head-*.safetensors")


def leftovers(path):
    """The temporary folders atomic_path made beside path (.NAME.xxxxxxxx), oldest first."""
    path = Path(path)
    found = path.parent.glob(f".{glob.escape(path.name)}.????????") if path.parent.is_dir() else []
    return sorted((d for d in found if d.is_dir()), key=lambda d: d.stat().st_mtime)


def restore(path, log=print):
    """Finish what a run killed while replacing path left: if path is gone and a leftover holds
    the previous version (old), it is put back; every leftover is then removed (they are ours)."""
    path = Path(path)
    for leftover in leftovers(path):
        if not path.exists() and (leftover / "old").exists():
            os.replace(leftover / "old", path)
            log(f"{path}: a run was stopped while replacing it; the previous version is back")
        shutil.rmtree(leftover, ignore_errors=True)


def ours(folder):
    """The files of folder a run of this code wrote: its manifest's list, or the names runs wrote
    before manifests; None if it holds anything else."""
    names = {f.name for f in folder.iterdir()}
    try:
        listed = set(json.loads((folder / MANIFEST).read_text())) | {MANIFEST}
    except (OSError, ValueError, TypeError):
        listed = {n for n in names if any(fnmatch.fnmatch(n, p) for p in NAMES_BEFORE_MANIFEST)}
    return names if names <= listed and all((folder / n).is_file() for n in names) else None


def check_out(path, flag="--out", kind="folder", owned=None):
    """Before any work: an output path that a run may write, or a one-line refusal. A folder may
    replace a missing path, an empty folder, or a folder that holds exactly a run's files (ours);
    a file may replace a missing path or a file that owned(path) says a run wrote. A run killed
    while replacing path is finished first (restore)."""
    path = Path(path)
    restore(path)
    if not path.exists():
        return
    if kind == "folder":
        if not path.is_dir():
            raise ValueError(f"{flag} {path}: is a file, not a folder; name a new folder")
        if ours(path) is None:
            others = sorted(f.name for f in path.iterdir())
            raise ValueError(f"{flag} {path}: the folder holds files no run wrote "
                             f"({', '.join(others[:4])}{', ...' if len(others) > 4 else ''}); "
                             f"name a new or empty folder")
    elif path.is_dir() or not (owned and owned(path)):
        what = "a folder" if path.is_dir() else "a file this program did not write"
        raise ValueError(f"{flag} {path}: is {what}; name a new file")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path` so that a reader never
    sees a half-written file or folder. A folder gets a MANIFEST of the files written into it, and
    replaces the old one in two renames (old aside, new in place): a kill between them leaves the
    old one aside, which the next check_out or restore puts back. On failure or Ctrl-C the
    temporary path is removed; a full disk becomes DiskFullError (one line: the folder and its
    free space)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / "tmp"
    try:
        yield tmp
        if tmp.is_dir():
            names = sorted(f.name for f in tmp.iterdir())
            (tmp / MANIFEST).write_text(json.dumps(names, indent=1))
        if tmp.is_dir() and path.is_dir():  # a folder cannot be renamed over a folder: swap
            os.replace(path, tmp.parent / "old")
        os.replace(tmp, path)
    except Exception as e:
        if not is_disk_full(e):
            raise
        shutil.rmtree(tmp.parent, ignore_errors=True)  # first, so that the free space counts it
        free = shutil.disk_usage(path.parent).free
        raise DiskFullError(f"{path.parent}: no space left on the disk while writing {path.name} "
                            f"({free / 1e6:.1f} MB free there); nothing half-written was "
                            f"kept") from None
    finally:
        if not path.exists() and (tmp.parent / "old").exists():  # failed between the renames
            os.replace(tmp.parent / "old", path)
        shutil.rmtree(tmp.parent, ignore_errors=True)


def table_csv(rows):
    """Rows of dicts -> CSV text, the columns in order of first appearance, numbers at full
    precision."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    w = csv.DictWriter(out, columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


def write_tables(folder, tables, files=None):
    """A folder of CSV tables (and other text files), written whole under a temporary name (the
    caller checked it with check_out before its work)."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        texts = {**{name: table_csv(rows) for name, rows in tables.items()}, **(files or {})}
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
