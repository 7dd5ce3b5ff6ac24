"""Predict with a trained checkpoint: top-3 labels per row, a Kaggle submission, and MAP@3.

    python evaluate.py --checkpoint runs/map --data test.csv --out submission.csv

The texts are embedded with the spec stored in the checkpoint (model, template, instruction, compute
dtype, weight format, ...), through the same cache as train.py, so evaluating on training data costs
no forward pass, and only the rows scored are read from the cache.
"""

import argparse
import csv
from dataclasses import fields, replace
from pathlib import Path

import cli
from at_scale import embed_cache
from at_scale.embed_cache import EmbedSpec, Measured
from at_scale.fingerprint import model_identity
from at_scale.lora import lora_vectors
from at_scale.runtime import default_dtype, dtype_name, pick_device
from data import (DiskFullError, RowsSpec, atomic_path, check_ids, check_out, labels_of, read_csv,
                  require_columns, row_texts)
from mlp_head import load_checkpoint, map_at_k, predict_proba, top_k
from qwen_embed import Qwen3Config, resolve_model_dir


def write_submission(path, ids, predictions, id_col, label_cols):
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([id_col, ":".join(label_cols)])
            w.writerows([i, " ".join(p)] for i, p in zip(ids, predictions))


def embedding_dtype(args, spec):
    """The checkpoint's compute dtype, so that the vectors (and the cache entries) are the ones the
    head was trained on; one line where this run computes in another one."""
    device = pick_device(args.device)
    trained, dtype = spec.get("dtype"), args.dtype or spec.get("dtype")
    here = dtype_name(default_dtype(device))
    if dtype is None:  # a checkpoint from before dtypes were recorded
        dtype = here
        print(f"the checkpoint does not record its dtype: computing in {dtype}, this device's "
              f"default")
    elif trained and dtype != trained:
        print(f"computing in {dtype} (--dtype), the head was trained on {trained} vectors: they "
              f"differ by rounding")
    elif here != dtype:
        print(f"computing in {dtype} as in training, though {device.type}'s default here is {here} "
              f"(--dtype {here} is faster, its vectors differ by rounding)")
    return dtype


def load_texts(args, spec):
    """The CSV's rows, checked against the checkpoint's spec, and their texts."""
    columns, rows = read_csv(args.data)
    require_columns(args.data, columns, [spec["id_col"]], "the checkpoint's id column")
    # trained with --map-correct: the answers it saw, not ones found again from these rows
    answers = spec.get("correct_answers")
    texts = row_texts(args.data, columns, rows, spec["text_template"], answers,
                      whose="the checkpoint's ")
    check_ids(args.data, rows, spec["id_col"])
    if answers is not None:
        unknown = [row for row in rows if row["QuestionId"] not in answers]
        if unknown:
            print(f"{len(unknown)} rows ({len({r['QuestionId'] for r in unknown})} questions) have "
                  f"no known correct answer (their question was not in training): rendered as "
                  f"AnswerIsCorrect: no")
    return columns, rows, texts


def read_embedding(meta, folder):
    """The checkpoint's EmbedSpec, or None for a head trained on a vectors file: a key that no
    version of the code wrote is refused (EmbedSpec.from_meta), the others being the fields of
    what train.py records beside the spec."""
    beside = [f.name for kind in (RowsSpec, Measured) for f in fields(kind)]
    spec = EmbedSpec.from_meta({"model": "", **meta["embedding"]}, folder / "meta.json", beside)
    return None if meta["embedding"].get("vectors_from") else spec


def file_vectors(args, saved, spec, heads, ids):
    """--vectors FILE: the rows' vectors from the file, refused in one line, before any work, if
    another embedder (or other settings) made them than the ones the head was trained on, or
    their size is not the head's input."""
    x, made = embed_cache.read_vectors(args.vectors, ids)
    trained = saved.get("vectors_from") or embed_cache.made_by(spec, saved.get("model_identity"))
    differ = embed_cache.embedder_differences(made, trained)
    if differ:
        raise ValueError(f"--vectors {args.vectors}: not the vectors the head was trained on "
                         f"(this file vs training: {'; '.join(differ[:4])}"
                         f"{'; ...' if len(differ) > 4 else ''})")
    if x.shape[1] != heads[0].hparams["in_dim"]:
        raise ValueError(f"--vectors {args.vectors}: {x.shape[1]}-d vectors, the head takes "
                         f"{heads[0].hparams['in_dim']}")
    return x


def check_model(args, spec, saved, heads, options):
    """Before any work: the model embeds with the content training used (a moved or copied folder
    passes, other weights are refused, naming both), and its vectors fit the head's input. A
    checkpoint from before the content was recorded is evaluated with one note."""
    folder = resolve_model_dir(args.model or spec.model)
    trained = saved.get("model_identity")
    if trained is None:
        print(f"note: the checkpoint does not record its model's content (saved before it was): "
              f"embedding with {folder} as it is now, unchecked")
    else:
        now = model_identity(folder, options.cache_dir, print)
        if now != trained:
            raise ValueError(f"{args.model or spec.model}: its content ({now[:12]}) differs from "
                             f"the model the head was trained with ({trained[:12]}); point "
                             f"--model at that model, or train again")
    config = Qwen3Config.from_json(folder / "config.json")
    dim, want = spec.dim or config.hidden_size, heads[0].hparams["in_dim"]
    if dim != want:
        raise ValueError(f"{args.model or spec.model}: gives {dim}-d vectors, the head takes "
                         f"{want}")


def submission_header(meta):
    saved = meta["embedding"]
    return [saved["id_col"], ":".join(saved["label_cols"])]


def owned_submission(header):
    """Whether a file is a submission this program wrote (its header), so that it may be
    replaced."""
    def owned(path):
        try:
            with open(path, newline="", encoding="utf-8") as f:
                return next(csv.reader(f), None) == header
        except (OSError, UnicodeDecodeError, csv.Error):
            return False
    return owned


def main(args):
    options = cli.run_options(args)  # the flags checked before anything is read
    heads, meta = load_checkpoint(args.checkpoint)
    if args.out:
        check_out(args.out, kind="file", owned=owned_submission(submission_header(meta)))
    saved, labels = meta["embedding"], meta["labels"]
    spec = read_embedding(meta, Path(args.checkpoint))
    columns, rows, texts = load_texts(args, saved)
    ids = [row[saved["id_col"]] for row in rows]
    if spec is None and not args.vectors:
        made = saved["vectors_from"]
        raise ValueError(f"{args.checkpoint}: its head was trained on vectors from a file "
                         f"({made['embedder']}, {made['settings'].get('model', 'model unnamed')}):"
                         f" there is no model to embed with; give --vectors FILE")
    if args.vectors:
        cli.refuse_given(args, EMBEDDING_FLAGS - {"device", "quiet", "cache_dir"}, "--vectors",
                         "has no model to use")
        vectors = file_vectors(args, saved, spec, heads, ids)
    else:
        check_model(args, spec, saved, heads, options)
        # the vectors the head was trained on: the checkpoint's spec, its weights unless --quantize
        spec = replace(spec, model=args.model or spec.model, dtype=embedding_dtype(args, saved),
                       weights=args.quantize or spec.weights)
        if meta.get("lora"):
            vectors = lora_vectors(args.checkpoint, meta["lora"], spec, texts, options)
        else:
            stored = embed_cache.ensure_cached(texts, spec, options, ids=ids)
            if stored is None:  # a torchrun rank other than 0: its share is embedded and cached
                return None
            vectors = stored[spec.pooling, spec.layer].load()
    device = pick_device(args.head_device or args.device)
    probs = predict_proba([h.to(device) for h in heads], vectors).cpu()
    predictions = top_k(probs, labels)
    result = {"predictions": predictions, "probs": probs}
    if all(c in columns for c in saved["label_cols"]):  # labelled data: score it
        truth = labels_of(rows, saved["label_cols"])
        unseen = len({y for y in truth} - set(labels))
        result["map3"] = map_at_k(truth, predictions)
        result["accuracy"] = sum(p[0] == y for p, y in zip(predictions, truth)) / len(truth)
        print(f"MAP@3: {result['map3']:.4f}  top-1 accuracy: {result['accuracy']:.4f}  "
              f"({len(truth)} rows"
              + (f"; {unseen} labels never seen in training count as misses)" if unseen else ")"))
    if args.out:
        try:
            write_submission(args.out, ids, predictions, saved["id_col"], saved["label_cols"])
        except DiskFullError as e:
            need = sum(len(str(i)) + sum(map(len, p)) + 4 for i, p in zip(ids, predictions))
            raise DiskFullError(f"--out {args.out}: {e}; the submission needs about "
                                f"{need / 1e6:.1f} MB (the vectors are cached: a rerun only "
                                f"predicts)") from None
        print(f"wrote {args.out} ({len(ids)} rows)")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a folder written by train.py --out")
    p.add_argument("--data", required=True,
                   help="CSV to predict; scored when it has the label columns")
    p.add_argument("--out", default=None, help="write a submission CSV here (id, three "
                   "space-separated labels); None: none is written")
    p.add_argument("--head-device", default=None,
                   help="where the heads predict; None: the embedding device")
    p.add_argument("--vectors", default=None, help="score these vectors (a file of "
                   "tools/st_vectors.py or train.py --save-vectors), their embedder and settings "
                   "the ones the head was trained on; None: embed the texts")
    e = p.add_argument_group("embedding (not with --vectors)")
    e.add_argument("--model", default=None, help="a folder or Hub id to embed with, its content "
                   "the one the head was trained with (a moved or copied model); None: the one "
                   "the checkpoint names")
    e.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="compute dtype (float16: guarded, as in train.py); None: the checkpoint's, "
                   "so that the vectors are the ones its head was trained on")
    cli.add_flags(e, quantize_default=None)
    EMBEDDING_FLAGS.update(a.dest for a in e._group_actions)
    return cli.parse_given(p, argv)


EMBEDDING_FLAGS = set()  # the embedding group's flags, filled from the parser: --vectors skips them


if __name__ == "__main__":
    cli.cli(main, parse_args)
