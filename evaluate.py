"""Predict with a trained checkpoint: top-3 labels per row, a Kaggle submission, and MAP@3.

    python evaluate.py --checkpoint runs/map --data test.csv --out submission.csv

The texts are embedded with the spec stored in the checkpoint (model, template, instruction, ...),
through the same cache as train.py, so evaluating on training data costs no forward pass.
"""

import argparse
import csv
from pathlib import Path

import torch
from safetensors.torch import load_file

import embed_cache
from data import (add_answer_is_correct, atomic_path, check_ids, cli, labels_of, read_csv, render, require_columns,
                  template_fields)
from lora import add_lora, load_adapters, merge_lora
from mlp_head import load_checkpoint, predict_proba
from qwen_embed import Qwen3Embedder, pick_device_dtype


def map_at_k(truth, predictions, k=3):
    """The competition's MAP@3: 1/rank of the first correct label among the first k predictions,
    else 0, averaged over rows. A label repeated in a row's predictions counts at its first rank."""
    total = 0.0
    for y, preds in zip(truth, predictions, strict=True):
        for rank, p in enumerate(preds[:k], start=1):
            if p == y:
                total += 1 / rank
                break
    return total / len(truth) if truth else 0.0


def top_k(probs, labels, k=3):
    """The k most probable labels per row, best first, all distinct."""
    idx = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return [[labels[j] for j in row] for row in idx.tolist()]


def write_submission(path, ids, predictions, id_col, label_cols):
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([id_col, ":".join(label_cols)])
            w.writerows([i, " ".join(p)] for i, p in zip(ids, predictions))


def lora_vectors(args, meta, texts):
    """A fine-tuned checkpoint: the base model, its adapters merged into the weights once, then
    plain encode. Not cached: the cache holds the base model's vectors."""
    spec, lora = meta["embedding"], meta["lora"]
    print(f"LoRA checkpoint (rank {lora['rank']}): merging the adapters into {spec['model']}; vectors are not cached")
    embedder = Qwen3Embedder.from_pretrained(spec["model"], device=args.device, dtype=spec["dtype"], compile=args.compile)
    add_lora(embedder.model, lora["rank"], lora["alpha"], lora["targets"], lora["layers"])
    file = Path(args.checkpoint) / lora["file"]
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing from the checkpoint")
    load_adapters(embedder.model, load_file(file), file)
    merge_lora(embedder.model)
    return embedder.encode(texts, instruction=spec["instruction"], batch_size=args.batch_size,
                           max_length=spec["max_length"], dim=spec["dim"], pooling=spec["pooling"],
                           max_batch_tokens=args.max_batch_tokens, progress=not args.quiet)


def main(args):
    heads, meta = load_checkpoint(args.checkpoint)
    spec, labels = meta["embedding"], meta["labels"]
    columns, rows = read_csv(args.data)
    require_columns(args.data, columns, [spec["id_col"]], "the checkpoint's id column")
    if spec.get("correct_answers") is not None:  # trained with --map-correct: the answers it learned
        require_columns(args.data, columns, ["QuestionId", "MC_Answer"], "the checkpoint's --map-correct")
        add_answer_is_correct(rows, spec["correct_answers"])
        columns = columns + ["AnswerIsCorrect"]
    require_columns(args.data, columns, template_fields(spec["text_template"]), "the checkpoint's --text-template")
    check_ids(args.data, rows, spec["id_col"])
    texts = render(spec["text_template"], rows)
    if meta.get("lora"):
        vectors = lora_vectors(args, meta, texts)
    else:
        vectors = embed_cache.embed(texts, spec["model"], instruction=spec["instruction"],
                                    max_length=spec["max_length"], pooling=spec["pooling"], dim=spec["dim"],
                                    layers=(spec["layer"],), device=args.device, dtype=spec["dtype"],
                                    **embed_cache.run_options(args), ids=[row[spec["id_col"]] for row in rows])
        if vectors is None:  # a torchrun rank other than 0: its share is embedded and cached
            return None
        vectors = vectors[spec["layer"]]
    device = pick_device_dtype(args.head_device or args.device)[0]
    probs = predict_proba([h.to(device) for h in heads], vectors).cpu()
    predictions = top_k(probs, labels)
    ids = [row[spec["id_col"]] for row in rows]
    result = {"predictions": predictions, "probs": probs}
    if all(c in columns for c in spec["label_cols"]):  # labelled data: score it
        truth = labels_of(rows, spec["label_cols"])
        unseen = len({y for y in truth} - set(labels))
        result["map3"] = map_at_k(truth, predictions)
        result["accuracy"] = sum(p[0] == y for p, y in zip(predictions, truth)) / len(truth)
        print(f"MAP@3: {result['map3']:.4f}  top-1 accuracy: {result['accuracy']:.4f}  ({len(truth)} rows"
              + (f"; {unseen} labels never seen in training count as misses)" if unseen else ")"))
    if args.out:
        write_submission(args.out, ids, predictions, spec["id_col"], spec["label_cols"])
        print(f"wrote {args.out} ({len(ids)} rows)")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a folder written by train.py --out")
    p.add_argument("--data", required=True, help="CSV to predict; scored when it has the label columns")
    p.add_argument("--out", default=None, help="write a submission CSV here (id, three space-separated labels)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...; None: cuda if available")
    p.add_argument("--head-device", default=None, help="where the heads predict; None: the embedding device")
    embed_cache.add_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


if __name__ == "__main__":
    cli(main, parse_args)
