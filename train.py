"""Train a 3-layer MLP on frozen Qwen3 vectors: CSV -> texts -> cached embeddings -> head -> checkpoint.

    python train.py --data train.csv --model Qwen/Qwen3-Embedding-0.6B --group-col QuestionId --out runs/map

The first run embeds every text (the only expensive step) and caches the vectors; later runs that
change only head flags (--epochs, --lr, --hidden, ...) read the cache and run no forward pass.
`python train.py --help` lists every flag; the work is in main(args), importable by tests.
"""

import argparse
import csv
import io
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

import embed_cache
from data import MAP_TEMPLATE, check_ids, cli, kfold, labels_of, read_csv, render, require_columns, split, template_fields
from evaluate import map_at_k, top_k
from mlp_head import ACTIVATIONS, MLPHead, predict_proba, save_checkpoint


def get_lr(step, total_steps, warmup_steps, max_lr):
    # 1) linear warmup from max_lr / warmup_steps to max_lr
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    # 2) cosine decay from max_lr down to 0 at the last step
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_head(head, x, y, labels):
    """(loss, accuracy, MAP@3, probabilities) on rows x with label indexes y."""
    head.eval()
    probs = predict_proba([head], x)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), y).item() if len(y) else float("nan")
    preds = top_k(probs, labels)
    truth = [labels[i] for i in y.tolist()]
    acc = sum(p[0] == t for p, t in zip(preds, truth)) / max(1, len(truth))
    return loss, acc, map_at_k(truth, preds), probs


def train_head(x_tr, y_tr, x_va, y_va, labels, args, log=print, tag=""):
    """Hand-written loop: AdamW, warmup + cosine LR, keep the epoch with the best validation MAP@3."""
    torch.manual_seed(args.seed)  # same seed, same init, same batches, same numbers
    head = MLPHead(x_tr.shape[1], len(labels), args.hidden, args.dropout, args.activation, args.input_norm)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / args.head_batch_size)
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_frac * total)
    gen = torch.Generator().manual_seed(args.seed)
    best, step = None, 0
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        head.train()
        order = torch.randperm(len(x_tr), generator=gen)
        train_loss = 0.0
        for start in range(0, len(x_tr), args.head_batch_size):
            idx = order[start:start + args.head_batch_size]
            for group in opt.param_groups:
                group["lr"] = get_lr(step, total, warmup, args.lr)
            loss = F.cross_entropy(head(x_tr[idx]), y_tr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_loss += loss.item() * len(idx)
            step += 1
        train_loss /= len(x_tr)
        if len(x_va):
            val_loss, val_acc, val_map, probs = evaluate_head(head, x_va, y_va, labels)
            log(f"{tag}epoch {epoch:3d}/{args.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                f"val acc {val_acc:.4f}  val MAP@3 {val_map:.4f}  {time.time() - t0:.2f}s")
        else:  # no validation: the last epoch is kept
            val_loss = val_acc = val_map = float("nan")
            probs = torch.empty(0, len(labels))
            log(f"{tag}epoch {epoch:3d}/{args.epochs}  train loss {train_loss:.4f}  {time.time() - t0:.2f}s")
        if best is None or not len(x_va) or val_map > best["map3"]:
            best = {"epoch": epoch, "map3": val_map, "acc": val_acc, "loss": val_loss, "probs": probs,
                    "state": {k: v.clone() for k, v in head.state_dict().items()}}
    head.load_state_dict(best.pop("state"))
    return head.eval(), best


def main(args, log=print):
    if args.max_length < 2:
        raise ValueError(f"--max-length must be at least 2 (one text token and EOS), got {args.max_length}")
    if args.dim is not None and args.dim < 1:
        raise ValueError(f"--dim must be positive, got {args.dim}")
    if not 0 <= args.val_frac < 1:
        raise ValueError(f"--val-frac must be in [0, 1), got {args.val_frac}")
    if args.folds == 1 or args.folds < 0:
        raise ValueError(f"--folds must be 0 (one split by --val-frac) or at least 2, got {args.folds}")
    if args.epochs < 1 or args.head_batch_size < 1 or args.batch_size < 1:
        raise ValueError("--epochs, --head-batch-size and --batch-size must be positive")
    label_cols = args.label_cols.split(",")
    columns, rows = read_csv(args.data)
    require_columns(args.data, columns, [args.id_col], "--id-col")
    require_columns(args.data, columns, label_cols, "--label-cols")
    require_columns(args.data, columns, template_fields(args.text_template), "--text-template")
    if args.group_col:
        require_columns(args.data, columns, [args.group_col], "--group-col")
    check_ids(args.data, rows, args.id_col)
    texts = render(args.text_template, rows)
    empty = [row[args.id_col] for row, t in zip(rows, texts) if not t.strip()]
    if empty:  # embedded all the same (EOS alone still gives a vector), but worth knowing
        log(f"warning: {len(empty)} rows render to an empty text, e.g. {args.id_col} {empty[:5]}")
    truth = labels_of(rows, label_cols)
    labels = sorted(set(truth))
    index = {label: i for i, label in enumerate(labels)}
    y = torch.tensor([index[t] for t in truth])
    log(f"{args.data}: {len(rows)} rows, {len(labels)} labels")

    spec = {"model": args.model, "instruction": args.instruction, "max_length": args.max_length,
            "pooling": args.pooling, "dim": args.dim, "layer": args.layer, "dtype": args.dtype}
    t0 = time.time()
    x = embed_cache.embed(texts, args.model, instruction=args.instruction, max_length=args.max_length,
                          pooling=args.pooling, dim=args.dim, layers=(args.layer,), device=args.device,
                          dtype=args.dtype, batch_size=args.batch_size, cache_dir=args.cache_dir, chunk_size=args.cache_chunk,
                          progress=not args.quiet, log=log, ids=[row[args.id_col] for row in rows])[args.layer]
    log(f"embeddings: {tuple(x.shape)} in {time.time() - t0:.1f}s")

    groups = [row[args.group_col] for row in rows] if args.group_col else None
    results = {"n_labels": len(labels), "n_rows": len(rows)}
    if args.folds:
        fold = torch.tensor(kfold(truth, args.folds, groups, args.seed))
        heads, oof, fold_maps = [], torch.zeros(len(rows), len(labels)), []
        for k in range(args.folds):
            tr, va = (fold != k).nonzero().flatten(), (fold == k).nonzero().flatten()
            head, best = train_head(x[tr], y[tr], x[va], y[va], labels, args, log, tag=f"fold {k}  ")
            log(f"fold {k}: best epoch {best['epoch']}, val MAP@3 {best['map3']:.4f}")
            heads.append(head)
            oof[va] = best["probs"]
            fold_maps.append(best["map3"])
        val_idx, val_probs = torch.arange(len(rows)), oof
        results.update(fold_map3=fold_maps, map3_mean=statistics.mean(fold_maps),
                       map3_std=statistics.stdev(fold_maps), oof_map3=map_at_k(truth, top_k(oof, labels)))
        log(f"{args.folds}-fold MAP@3 {results['map3_mean']:.4f} ± {results['map3_std']:.4f}, "
            f"out-of-fold MAP@3 {results['oof_map3']:.4f} ({'grouped by ' + args.group_col if groups else 'stratified'})")
    else:
        tr, va = split(truth, args.val_frac, groups, args.seed)
        tr, va = torch.tensor(tr, dtype=torch.long), torch.tensor(va, dtype=torch.long)
        head, best = train_head(x[tr], y[tr], x[va], y[va], labels, args, log)
        heads, val_idx, val_probs = [head], va, best["probs"]
        results.update(best_epoch=best["epoch"], val_map3=best["map3"], val_acc=best["acc"], val_loss=best["loss"])
        if len(va):
            log(f"best epoch {best['epoch']}: val MAP@3 {best['map3']:.4f}, val acc {best['acc']:.4f} "
                f"({len(tr)} train / {len(va)} val rows{', grouped by ' + args.group_col if groups else ''})")

    if args.out:
        embedding = {**spec, "text_template": args.text_template, "label_cols": label_cols, "id_col": args.id_col}
        preds = top_k(val_probs, labels)
        table = io.StringIO()
        w = csv.writer(table)
        w.writerow([args.id_col, "label", "top3"] + [f"p_{l}" for l in labels])
        for i, p, pr in zip(val_idx.tolist(), preds, val_probs.tolist()):
            w.writerow([rows[i][args.id_col], truth[i], " ".join(p)] + [f"{v:.5f}" for v in pr])
        save_checkpoint(args.out, heads, labels, embedding, results,
                        files={"args.json": json.dumps(vars(args), indent=2), "val_predictions.csv": table.getvalue()})
        log(f"wrote {args.out}/ (meta.json, {len(heads)} head file(s), args.json, val_predictions.csv)")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="data/example.csv", help="training CSV (header row, UTF-8)")
    d.add_argument("--text-template", default=MAP_TEMPLATE, help="format string over column names: the text to embed")
    d.add_argument("--label-cols", default="Category,Misconception", help="comma-separated; the label joins them with ':'")
    d.add_argument("--id-col", default="row_id", help="unique row id column")
    d.add_argument("--group-col", default=None, help="split by this column (e.g. QuestionId): no group in both train and val")
    d.add_argument("--val-frac", type=float, default=0.2, help="validation share (0: train on everything)")
    d.add_argument("--folds", type=int, default=0, help="K-fold cross-validation with K heads saved (0: one split)")
    e = p.add_argument_group("embedding")
    e.add_argument("--model", default="Qwen/Qwen3-Embedding-0.6B", help="Hub repo id or local checkpoint folder")
    e.add_argument("--instruction", default=None, help="Qwen3-Embedding instruction ('Instruct: ...\\nQuery:' prefix)")
    e.add_argument("--max-length", type=int, default=512, help="tokens per text, EOS included")
    e.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (at most)")
    e.add_argument("--dim", type=int, default=None, help="keep the first DIM features (Matryoshka)")
    e.add_argument("--pooling", choices=["last", "mean"], default="last", help="last (EOS) token or mean of tokens")
    e.add_argument("--layer", type=int, default=None, help="pool this layer's raw hidden state (default: final normed output)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    e.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU (float16 is refused: Qwen3 overflows it)")
    e.add_argument("--cache-dir", default=".cache/embeddings", help="embedding cache shared with evaluate.py")
    e.add_argument("--cache-chunk", type=int, default=1024, help="texts embedded between cache writes (a kill loses at most one chunk)")
    h = p.add_argument_group("head and training")
    h.add_argument("--hidden", type=int, nargs=2, default=[1024, 512], metavar=("H1", "H2"), help="hidden layer sizes")
    h.add_argument("--dropout", type=float, default=0.2)
    h.add_argument("--activation", choices=sorted(ACTIVATIONS), default="gelu")
    h.add_argument("--input-norm", action="store_true", help="LayerNorm on the input vectors")
    h.add_argument("--epochs", type=int, default=30)
    h.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    h.add_argument("--warmup-frac", type=float, default=0.1, help="share of steps spent warming up the LR")
    h.add_argument("--weight-decay", type=float, default=0.01)
    h.add_argument("--label-smoothing", type=float, default=0.0)
    h.add_argument("--head-batch-size", type=int, default=64)
    h.add_argument("--seed", type=int, default=0, help="split, init and batch order")
    h.add_argument("--out", default=None, help="checkpoint folder to write")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


if __name__ == "__main__":
    cli(main, parse_args)
