"""Train a 3-layer MLP on frozen Qwen3 vectors: CSV -> texts -> cached vectors -> head -> checkpoint

    python train.py --data train.csv --model Qwen/Qwen3-Embedding-0.6B --group-col QuestionId \
        --out runs/map

The first run embeds every text (the only expensive step) and caches the vectors; later runs that
change only head flags (--epochs, --lr, --hidden, ...) read the cache and run no forward pass. One
run, top to bottom: flags, rows, texts, vectors (one call into the cache), a head on one split or
one per fold (fit.py: train_head, cross_validate), the checkpoint. The research modes (--sweep,
--layer-sweep, --compare-pooling, --lora-rank) are research.py, through the same loop.
`python train.py --help` lists every flag (docs/flags.md says what each takes); main(args) is
importable by tests.
"""

import argparse
import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch

import cli
from cli import log
from at_scale import embed_cache
from at_scale.embed_cache import EmbedSpec, Measured
from at_scale.runtime import memory_budget, pick_device
from data import (CORRECT_SUFFIX, MAP_TEMPLATE, DiskFullError, RowsSpec, check_ids, check_out,
                  kfold, labels_of, map_correct_answers, read_csv, require_columns, row_texts,
                  split, table_csv)
import fit
from fit import interrupted, train_head
from mlp_head import ACTIVATIONS, save_checkpoint, top_k
from qwen_embed import POOLINGS, Qwen3Config

# ---------------------------------------------------------------------------------------- the run

NOT_SAVED = ("no --out: nothing was saved but the vectors, in the cache (--cache-dir); --out DIR "
             "keeps the checkpoint, the tables and the per-epoch history")


def main(args, log=print):
    """Train as the flags say -> the results meta.json keeps; log: where the run's lines go."""
    with cli.logging_to(log):
        spec, options = check_flags(args)
        data = load_rows(args)
        task = split_rows(args, data)
        data = answer_rows(args, data, task)
        results = {"n_labels": len(task.labels), "n_rows": len(task.y)}
        if args.sweep or args.layer_sweep or args.compare_pooling or args.lora_rank:
            import research  # the research modes build on this file, never the reverse
            return research.run(args, spec, options, data, task, results)
        found = load_vectors(args, spec, options, data)
        if found is None:  # a torchrun rank other than 0, whose work ends here
            return None
        x, spec, measured = found
        fitted = (fit_folds if args.folds else fit_one)(args, x, task)
        return finish(args, data, task, fitted, results, spec, measured)


def finish(args, data, task, fitted, results, spec, measured):
    """The results, and the checkpoint with --out: the embedding spec evaluate.py embeds by, how
    rows became texts, and what was measured (the model's content identity, its fidelity)."""
    results.update(fitted.results)
    if args.out:
        rows = RowsSpec(data.template, args.label_cols.split(","), args.id_col,
                        data.correct_answers)
        embedding = {**(dataclasses.asdict(spec) if spec else {}), **dataclasses.asdict(rows),
                     **dataclasses.asdict(measured)}
        save_run(args, data, task.labels, fitted, results, embedding)
    else:
        log(NOT_SAVED)
    return results


def check_flags(args):
    """The flags checked before any work, never over the network -> (EmbedSpec, RunOptions)."""
    spec = EmbedSpec(args.model, instruction=args.instruction, max_length=args.max_length,
                     pooling=args.pooling, layer=args.layer, dim=args.dim, dtype=args.dtype,
                     weights=args.quantize, eos=not args.no_eos)
    options = cli.run_options(args)
    if args.folds == 1 or args.folds < 0:
        raise ValueError(f"--folds must be 0 (one split by --val-frac) or at least 2, "
                         f"got {args.folds}")
    cli.check_ranges([  # each numeric flag's valid range, before any work (--seed: any integer)
        ("--val-frac", args.val_frac, 0 <= args.val_frac < 1, "in [0, 1)"),
        ("--hidden", args.hidden, min(args.hidden) >= 1, "two positive sizes"),
        ("--dropout", args.dropout, 0 <= args.dropout < 1, "in [0, 1)"),
        ("--epochs", args.epochs, args.epochs >= 1, "positive"),
        ("--lr", args.lr, args.lr > 0, "positive"),
        ("--warmup-frac", args.warmup_frac, 0 <= args.warmup_frac <= 1, "in [0, 1]"),
        ("--weight-decay", args.weight_decay, args.weight_decay >= 0, "0 or more"),
        ("--label-smoothing", args.label_smoothing, 0 <= args.label_smoothing < 1, "in [0, 1)"),
        ("--head-batch-size", args.head_batch_size, args.head_batch_size >= 1, "positive"),
        ("--seed", args.seed, -2**63 <= args.seed < 2**64, "between -2**63 and 2**64 - 1 (torch's "
         "seeds)"),
    ])
    for flag, device in (("--device", args.device), ("--head-device", args.head_device)):
        try:
            pick_device(device)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    check_head_memory(args)
    if args.out:
        check_out(args.out)
    if args.vectors:  # no model runs: what would embed or shape a vector cannot apply
        modes = [flag for flag, on in (("--lora-rank", args.lora_rank), ("--layer-sweep",
                 args.layer_sweep), ("--compare-pooling", args.compare_pooling), ("--map-correct",
                 args.map_correct), ("--save-vectors", args.save_vectors)) if on]
        if modes:
            raise ValueError(f"--vectors gives the vectors: {', '.join(modes)} needs the model to "
                             f"embed the texts; drop it")
        cli.refuse_given(args, EMBEDDING_FLAGS - {"device", "quiet", "cache_dir"}, "--vectors",
                         "has no model to use")
    if args.save_vectors:
        check_out(args.save_vectors, "--save-vectors", kind="file", owned=embed_cache.ours_file)
        if args.map_correct and args.folds:
            raise ValueError("--save-vectors writes one vector per row: --map-correct with --folds "
                             "embeds each row once per fold; drop one")
    import research
    research.check_flags(args)
    return spec, options


def check_head_memory(args):
    """A head too big to train where it trains is one line before any work: its float32 weights,
    their gradients and AdamW's two moments, 16 bytes per parameter (the input width read from a
    local config, else left out)."""
    config = Path(args.model) / "config.json"
    width = args.dim or (Qwen3Config.from_json(config).hidden_size if config.is_file() else 0)
    h1, h2 = args.hidden
    need = 16 * (width * h1 + h1 * h2)
    device = pick_device(args.head_device or args.device)
    try:
        free, where = memory_budget(device)
    except Exception:  # a device that cannot say (yet): the head meets it when it trains
        return
    if need > free:
        raise ValueError(f"--hidden {h1} {h2}: training this head takes about "
                         f"{need / 1e9:.1f} GB (weights, gradients and AdamW's moments in float32) "
                         f"and {where}")


class Data(NamedTuple):
    """The training CSV, as the run uses it."""
    rows: list  # one dict per CSV row
    texts: list  # each row's text to embed
    truth: list  # each row's label
    template: str  # --text-template, with --map-correct's column added if asked
    correct_answers: dict | None  # --map-correct: the answer taken as correct, per question
    columns: list  # the CSV's header


def load_rows(args):
    """The CSV, checked against the flags -> Data."""
    columns, rows = read_csv(args.data)
    require_columns(args.data, columns, [args.id_col], "--id-col")
    require_columns(args.data, columns, args.label_cols.split(","), "--label-cols")
    if args.group_col:
        require_columns(args.data, columns, [args.group_col], "--group-col")
    template, correct = args.text_template, None
    if args.map_correct:  # found from the training rows' labels once the split is made
        require_columns(args.data, columns, ["QuestionId", "MC_Answer", "Category"],
                        "--map-correct")
        correct = {}  # no answer known yet: answer_rows renders the texts again
        if "{AnswerIsCorrect}" not in template:
            template += CORRECT_SUFFIX
    texts = row_texts(args.data, columns, rows, template, correct)
    check_ids(args.data, rows, args.id_col)
    empty = [row[args.id_col] for row, t in zip(rows, texts) if not t.strip()]
    if empty:  # embedded all the same (EOS alone still gives a vector), but worth knowing
        log(f"warning: {len(empty)} rows render to an empty text, e.g. {args.id_col} {empty[:5]}")
    truth = labels_of(rows, args.label_cols.split(","))
    log(f"{args.data}: {len(rows)} rows, {len(set(truth))} labels")
    return Data(rows, texts, truth, template, correct, columns)


class Task(NamedTuple):
    """The labels and the split: what every way of fitting a head shares."""
    labels: list  # the distinct labels, sorted: y indexes them
    y: torch.Tensor  # each row's label index
    truth: list  # each row's label
    tr: torch.Tensor  # training rows (every row with --folds)
    va: torch.Tensor  # validation rows (none with --folds: each fold validates its own)
    groups: list | None  # each row's --group-col value


def split_rows(args, data):
    """Data -> Task: label indexes and the split (seeded); --folds is checked here, before any
    forward pass."""
    labels = sorted(set(data.truth))
    index = {label: i for i, label in enumerate(labels)}
    y = torch.tensor([index[t] for t in data.truth])
    groups = [row[args.group_col] for row in data.rows] if args.group_col else None
    if args.folds:  # every row is validated once, in its fold
        kfold(data.truth, args.folds, groups, args.seed)
        tr, va = torch.arange(len(y)), torch.tensor([], dtype=torch.long)
    else:
        tr, va = (torch.tensor(i, dtype=torch.long)
                  for i in split(data.truth, args.val_frac, groups, args.seed))
        if not len(tr):
            raise ValueError(f"--val-frac {args.val_frac}: leaves no row for training")
        if args.val_frac > 0 and not len(va):
            raise ValueError(f"--val-frac {args.val_frac}: leaves no row for validation (every "
                             f"label is seen once?); use --val-frac 0 to train on every row")
        unseen = {data.truth[i] for i in va.tolist()} - {data.truth[i] for i in tr.tolist()}
        if unseen:  # routine in grouped splits of MAP rows: worth knowing, not an error
            rows = sum(data.truth[i] in unseen for i in va.tolist())
            log(f"{len(unseen)} of the {len(labels)} labels ({rows} validation rows) never occur "
                f"in training: the head cannot predict them, they count as misses")
    return Task(labels, y, data.truth, tr, va, groups)


def answer_rows(args, data, task):
    """--map-correct: each question's correct answer found from the training rows alone, so that no
    validation label reaches a validation text. One split: the texts rendered with the training
    rows' answers. --folds K: once per fold with that fold's training rows, the K sets of texts
    one after another (fold k's are rows k*n .. (k+1)*n), and K more for the stratified CV a
    grouped run adds; the checkpoint keeps the answers of every row (evaluation reads new rows)."""
    if not args.map_correct:
        return data
    n = len(data.rows)

    def texts_with(train_rows):
        answers = map_correct_answers([data.rows[i] for i in train_rows])
        return answers, row_texts(args.data, data.columns, data.rows, data.template, answers)

    if not args.folds:
        correct, texts = texts_with(task.tr.tolist())
        return data._replace(texts=texts, correct_answers=correct)
    texts = []
    for groups in [task.groups] + ([None] if task.groups is not None else []):
        fold = kfold(data.truth, args.folds, groups, args.seed)
        for k in range(args.folds):
            texts += texts_with([i for i in range(n) if fold[i] != k])[1]
    correct, _ = texts_with(range(n))
    log(f"--map-correct: answers found from each fold's training rows: {len(set(texts))} distinct "
        f"texts to embed for {n} rows ({len(texts) // n} sets of texts, one per fold)")
    return data._replace(texts=texts, correct_answers=correct)


def load_vectors(args, spec, options, data):
    """The rows' vectors -> (x, the spec as the run decided it or None, Measured), or None on a
    torchrun rank other than 0: from --vectors FILE (any embedder's; what made them recorded), or
    embedded through the cache (the decided dtype and weights, the model's content, the fidelity
    measured when they were computed), then written to --save-vectors FILE if asked."""
    ids = [row[args.id_col] for row in data.rows]
    if args.vectors:
        x, made = embed_cache.read_vectors(args.vectors, ids)
        log(f"vectors: {tuple(x.shape)} from {args.vectors} ({made['embedder']}, "
            f"{made['settings'].get('model', 'model unnamed')})")
        return x, None, Measured(vectors_from=made)
    stored = cache_vectors(args, spec, options, data)
    if stored is None:
        return None
    vectors = stored[args.pooling, args.layer]
    measured = Measured(vectors.model_identity, vectors.cache.info().get("fidelity"))
    x = vectors.load()
    if args.save_vectors:
        embed_cache.write_vectors(args.save_vectors, ids, x,
                                  embed_cache.made_by(vectors.spec, vectors.model_identity))
        log(f"wrote {args.save_vectors} ({len(ids)} vectors)")
    return x, vectors.spec, measured


def cache_vectors(args, spec, options, data, poolings=None, layers=None):
    """{(pooling, layer): embed_cache.Vectors} for the rows' texts, in one forward pass for all of
    them where any is missing; None on a torchrun rank other than 0."""
    t0 = time.time()
    ids = [row[args.id_col] for row in data.rows] * (len(data.texts) // len(data.rows))
    stored = embed_cache.ensure_cached(data.texts, spec, options, poolings=poolings, layers=layers,
                                       ids=ids, log=log)
    if stored is not None:
        log(f"embeddings: {len(stored)} x ({len(data.texts)}, {next(iter(stored.values())).dim}) "
            f"in {time.time() - t0:.1f}s")
    return stored


# ------------------------------------------------------------------------ heads on cached vectors

def fit_one(args, x, task):
    with interrupted(lambda: "while training the head"):
        head, best = train_head(x[task.tr], task.y[task.tr], x[task.va], task.y[task.va],
                                task.labels, args, tag="")
    fit.say_best(args, best, task)
    return fit.Fitted([head], task.va, best.scores.probs, fit.best_results(best),
                      {"history.csv": best.history})


def fit_folds(args, x, task):
    """K heads (fit.cross_validate); x: (n, D), or with --map-correct one (n, D) block per fold,
    the grouped folds' blocks first (answer_rows)."""
    results, tables, n = {}, {"history.csv": [], "folds.csv": []}, len(task.y)
    grouped, stratified = (x, x) if len(x) == n else (x[:args.folds * n], x[args.folds * n:])
    if task.groups is not None:  # the competition's test asks train's questions: stratified CV too
        ungrouped = task._replace(groups=None)
        _, _, results["stratified"], tables = fit.cross_validate(args, stratified, ungrouped,
                                                                 quiet=True)
    heads, oof, res, mine = fit.cross_validate(args, grouped, task)
    tables = {name: tables[name] + rows for name, rows in mine.items()}
    return fit.Fitted(heads, torch.arange(len(task.y)), oof, {**results, **res}, tables)


# ------------------------------------------------------------------------------- what a run keeps

def save_run(args, data, labels, fitted, results, embedding):
    """The checkpoint folder: heads, meta.json (with the embedding spec evaluate.py needs), the
    flags that made it, the validation predictions, and the LoRA adapters if any."""
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow([args.id_col, "label", "top3"] + [f"p_{label}" for label in labels])
    top3, probs = top_k(fitted.val_probs, labels), fitted.val_probs.tolist()
    for i, p, pr in zip(fitted.val_idx.tolist(), top3, probs):
        w.writerow([data.rows[i][args.id_col], data.truth[i], " ".join(p)]
                   + [f"{v:.5f}" for v in pr])
    if fitted.lora:  # the adapters beside the head; evaluate.py applies them to the base model
        results["lora"] = {"rank": args.lora_rank, "alpha": args.lora_alpha,
                           "targets": args.lora_targets.split(","), "layers": args.lora_layers,
                           "file": "lora.safetensors"}
    flags = {**vars(args), **fitted.config}  # a sweep records its winning configuration
    files = {"args.json": json.dumps(flags, indent=2), "val_predictions.csv": table.getvalue(),
             **{name: table_csv(rows) for name, rows in fitted.tables.items()}}
    try:
        save_checkpoint(args.out, fitted.heads, labels, embedding, results, files=files,
                        tensors={"lora.safetensors": fitted.lora} if fitted.lora else None)
    except DiskFullError as e:
        tensors = [t for h in fitted.heads for t in h.state_dict().values()]
        tensors += list((fitted.lora or {}).values())
        need = sum(t.numel() * t.element_size() for t in tensors) + len(table.getvalue())
        rerun = "" if fitted.lora else (" (the vectors are cached: a rerun goes straight to "
                                        "the head)")
        raise DiskFullError(f"--out {args.out}: {e}; the checkpoint needs about {need / 1e6:.1f} MB"
                            f"{rerun}") from None
    log(f"wrote {args.out}/ (meta.json, {len(fitted.heads)} head file(s)"
        f"{', lora.safetensors' if fitted.lora else ''}, args.json, val_predictions.csv, "
        f"{', '.join(fitted.tables)})")


# ------------------------------------------------------------------------------------------ flags

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="data/example.csv", help="training CSV (header row, UTF-8)")
    d.add_argument("--text-template", default=MAP_TEMPLATE,
                   help="format string over column names: the text to embed")
    d.add_argument("--label-cols", default="Category,Misconception",
                   help="comma-separated; the label joins them with ':'")
    d.add_argument("--id-col", default="row_id", help="unique row id column")
    d.add_argument("--group-col", default=None, help="split by this column (e.g. QuestionId): no "
                   "group in both train and val; None: a split stratified by label")
    d.add_argument("--val-frac", type=float, default=0.2,
                   help="validation share (0: train on everything)")
    d.add_argument("--folds", type=int, default=0, help="K-fold cross-validation with K heads "
                   "saved (0: one split); with --group-col, stratified CV is reported too")
    d.add_argument("--map-correct", action="store_true", help="MAP format only: add the column "
                   "AnswerIsCorrect (yes/no: is MC_Answer the answer most chosen by True_ rows of "
                   "its question?) to the template")
    d.add_argument("--vectors", default=None, help="train on the vectors of this file (any "
                   "embedder's: tools/st_vectors.py, --save-vectors), its ids matched to --id-col; "
                   "None: embed the texts")
    d.add_argument("--save-vectors", default=None, help="also write the vectors this run embeds "
                   "to this file (ids and what made them included), for other tools or --vectors; "
                   "None: only the cache keeps them")
    e = p.add_argument_group("embedding")
    e.add_argument("--model", default="Qwen/Qwen3-Embedding-0.6B",
                   help="Hub repo id or local checkpoint folder")
    e.add_argument("--instruction", default=None, help="Qwen3-Embedding instruction ('Instruct: "
                   "...\\nQuery:' prefix); None: the text alone")
    e.add_argument("--max-length", type=int, default=512, help="tokens per text, EOS included")
    e.add_argument("--no-eos", action="store_true", help="append no EOS token: pool the text's "
                   "own last token, as llama.cpp does for a plain Qwen3 LLM (the method's "
                   "published 0.944 was made so); default: EOS appended, as Qwen3-Embedding was "
                   "trained")
    e.add_argument("--dim", type=int, default=None,
                   help="keep the first DIM features (Matryoshka); None: all")
    e.add_argument("--pooling", choices=POOLINGS, default="last",
                   help="how token states become a vector: last (EOS) token or mean of tokens")
    e.add_argument("--layer", type=int, default=None, help="pool this layer's raw hidden state, 0 "
                   "= embeddings, negative from the end; None: the final normed output")
    e.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="compute dtype; None: bfloat16 on CUDA GPUs of compute capability 8.0+ "
                   "and on CPUs with native bf16 (AVX-512 BF16, AMX), guarded float16 on 7.0-7.5 "
                   "(T4, V100), else float32. float16 is always guarded: matmuls in float16 on "
                   "inputs scaled into range, everything between them in float32")
    cli.add_flags(e)
    EMBEDDING_FLAGS.update(a.dest for a in e._group_actions)
    add_head_flags(p)
    return cli.parse_given(p, argv)


EMBEDDING_FLAGS = set()  # the embedding group's flags, filled from the parser: --vectors skips them
HEAD_FLAGS = set()  # the head and training group's: a --sweep study is named by their values


def add_head_flags(p):
    h = p.add_argument_group("head and training")
    h.add_argument("--hidden", type=int, nargs=2, default=[1024, 512], metavar=("H1", "H2"),
                   help="hidden layer sizes")
    h.add_argument("--dropout", type=float, default=0.2,
                   help="on the input and after each hidden layer")
    h.add_argument("--activation", choices=sorted(ACTIVATIONS), default="gelu",
                   help="between the layers")
    h.add_argument("--input-norm", action="store_true", help="LayerNorm on the input vectors")
    h.add_argument("--epochs", type=int, default=30,
                   help="passes over the training rows; the best one is kept")
    h.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    h.add_argument("--warmup-frac", type=float, default=0.1,
                   help="share of steps spent warming up the LR")
    h.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW's decoupled weight decay")
    h.add_argument("--label-smoothing", type=float, default=0.0,
                   help="of the cross-entropy targets")
    h.add_argument("--head-batch-size", type=int, default=64, help="rows per optimizer step")
    h.add_argument("--seed", type=int, default=0, help="split, init and batch order")
    h.add_argument("--head-device", default=None,
                   help="where the head trains: cpu, cuda, ...; None: the embedding device")
    h.add_argument("--out", default=None,
                   help="checkpoint folder to write; None: nothing is written")
    HEAD_FLAGS.update(a.dest for a in h._group_actions)
    import research  # the research modes' flags are theirs
    research.add_flags(p)


if __name__ == "__main__":
    cli.cli(main, parse_args)
