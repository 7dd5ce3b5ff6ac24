"""Predict with a trained checkpoint: top-3 labels per row, a Kaggle submission, and MAP@3.

    python evaluate.py --checkpoint runs/map --data test.csv --out submission.csv

The texts are embedded with the spec stored in the checkpoint (model, template, instruction, compute
dtype, weight format, ...), through the same cache as train.py, so evaluating on training data costs
no forward pass, and only the rows scored are read from the cache.
"""

import argparse
import csv
from dataclasses import replace

import cli
from at_scale import embed_cache
from at_scale.embed_cache import EmbedSpec
from at_scale.lora import lora_vectors
from at_scale.runtime import default_dtype, dtype_name, pick_device
from data import (DiskFullError, atomic_path, check_ids, labels_of, read_csv, require_columns,
                  row_texts)
from mlp_head import load_checkpoint, map_at_k, predict_proba, top_k


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
    texts = row_texts(args.data, columns, rows, spec["text_template"],
                      spec.get("correct_answers"), whose="the checkpoint's ")
    check_ids(args.data, rows, spec["id_col"])
    return columns, rows, texts


def main(args):
    options = cli.run_options(args)  # the flags checked before anything is read
    heads, meta = load_checkpoint(args.checkpoint)
    saved, labels = meta["embedding"], meta["labels"]
    columns, rows, texts = load_texts(args, saved)
    # the vectors the head was trained on: the checkpoint's spec, its weights unless --quantize
    spec = EmbedSpec.from_meta(saved)
    spec = replace(spec, dtype=embedding_dtype(args, saved), weights=args.quantize or spec.weights)
    if meta.get("lora"):
        vectors = lora_vectors(args.checkpoint, meta["lora"], spec, texts, options)
    else:
        stored = embed_cache.ensure_cached(texts, spec, options,
                                           ids=[row[saved["id_col"]] for row in rows])
        if stored is None:  # a torchrun rank other than 0: its share is embedded and cached
            return None
        vectors = stored[spec.pooling, spec.layer].load()
    device = pick_device(args.head_device or args.device)
    probs = predict_proba([h.to(device) for h in heads], vectors).cpu()
    predictions = top_k(probs, labels)
    ids = [row[saved["id_col"]] for row in rows]
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
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="compute dtype (float16: guarded, as in train.py); None: the checkpoint's, "
                   "so that the vectors are the ones "
                   "its head was trained on")
    p.add_argument("--head-device", default=None,
                   help="where the heads predict; None: the embedding device")
    cli.add_flags(p, quantize_default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    cli.cli(main, parse_args)
