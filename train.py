"""Train a 3-layer MLP on frozen Qwen3 vectors: CSV -> texts -> cached embeddings -> head -> checkpoint.

    python train.py --data train.csv --model Qwen/Qwen3-Embedding-0.6B --group-col QuestionId --out runs/map

The first run embeds every text (the only expensive step) and caches the vectors; later runs that
change only head flags (--epochs, --lr, --hidden, ...) read the cache and run no forward pass.
With --lora-rank R the embedder itself is fine-tuned instead: LoRA adapters (lora.py) and the head
train together in train_lora, on vectors computed afresh at every step.
`python train.py --help` lists every flag; the work is in main(args), importable by tests.
"""

import argparse
import contextlib
import csv
import io
import json
import math
import random
import statistics
import time

import torch
import torch.nn.functional as F

import embed_cache
from data import (CORRECT_SUFFIX, MAP_TEMPLATE, add_answer_is_correct, check_ids, cli, kfold, labels_of,
                  map_correct_answers, read_csv, render, require_columns, split, template_fields)
from evaluate import map_at_k, top_k
from mlp_head import ACTIVATIONS, MLPHead, predict_proba, save_checkpoint
from lora import add_lora, check_lora
from qwen_embed import Qwen3Config, Qwen3Embedder, pick_device_dtype, resolve_model_dir, to_device


def get_lr(step, total_steps, warmup_steps, max_lr):
    # 1) linear warmup from max_lr / warmup_steps to max_lr
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    # 2) cosine decay from max_lr down to 0 at the last step
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_head(head, x, y, labels):
    """(loss, accuracy, MAP@3, probabilities on the CPU) on rows x with label indexes y."""
    head.eval()
    probs = predict_proba([head], x).cpu()
    y = y.cpu()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), y).item() if len(y) else float("nan")
    preds = top_k(probs, labels)
    truth = [labels[i] for i in y.tolist()]
    acc = sum(p[0] == t for p, t in zip(preds, truth)) / max(1, len(truth))
    return loss, acc, map_at_k(truth, preds), probs


def train_head(x_tr, y_tr, x_va, y_va, labels, args, log=print, tag=""):
    """Hand-written loop: AdamW, warmup + cosine LR, keep the epoch with the best validation MAP@3.
    Runs on args.head_device (None: the embedding device); the head comes back on the CPU."""
    device = head_device(args)
    x_tr, y_tr, x_va, y_va = (t.to(device) for t in (x_tr, y_tr, x_va, y_va))
    torch.manual_seed(args.seed)  # same seed, same init, same batches, same numbers (on the same device)
    head = MLPHead(x_tr.shape[1], len(labels), args.hidden, args.dropout, args.activation, args.input_norm).to(device)
    # fused: one kernel for the whole update, 1.7x faster steps on CPU for a 2048x1024 head
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    steps_per_epoch = math.ceil(len(x_tr) / args.head_batch_size)
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_frac * total)
    gen = torch.Generator().manual_seed(args.seed)
    best, step = None, 0
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        head.train()
        order = torch.randperm(len(x_tr), generator=gen).to(device)
        train_loss = torch.zeros((), device=device)  # summed on the device: no wait for the GPU each step
        for start in range(0, len(x_tr), args.head_batch_size):
            idx = order[start:start + args.head_batch_size]
            for group in opt.param_groups:
                group["lr"] = get_lr(step, total, warmup, args.lr)
            loss = F.cross_entropy(head(x_tr[idx]), y_tr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_loss += loss.detach() * len(idx)
            step += 1
        train_loss = train_loss.item() / len(x_tr)
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
    return head.cpu().eval(), best


def head_device(args):
    return pick_device_dtype(args.head_device or args.device)[0]


def train_lora(args, texts, y, tr, va, labels, log=print):
    """--lora-rank R: adapters on the frozen Qwen3 (lora.py) and the head, trained together on the
    pooled EOS state in the same loop as train_head: each step runs the model on a batch of texts,
    with gradients, instead of reading cached vectors. Returns (head, best epoch, adapter tensors)."""
    device, dtype = pick_device_dtype(args.device, args.dtype)  # the base stays in dtype, the adapters fp32
    embedder = Qwen3Embedder.from_pretrained(args.model, device=device, dtype=dtype, compile=False)
    model = embedder.model
    model.grad_checkpoint = args.grad_checkpoint
    torch.manual_seed(args.seed)  # same seed: same adapters, head, batches, dropout
    lora = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets.split(","), args.lora_layers)
    head = MLPHead(args.dim or embedder.dim, len(labels), args.hidden, args.dropout, args.activation,
                   args.input_norm).to(device)
    groups = [{"params": list(head.parameters()), "lr": args.lr, "peak": args.lr, "weight_decay": args.weight_decay},
              {"params": list(lora.values()), "lr": args.lora_lr, "peak": args.lora_lr, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, fused=True)
    n_params = sum(p.numel() for p in lora.values())
    log(f"LoRA: rank {args.lora_rank}, alpha {args.lora_alpha}, {args.lora_targets} in the top "
        f"{args.lora_layers or len(model.layers)} of {len(model.layers)} blocks: {n_params:,} trainable parameters "
        f"(the model has {sum(p.numel() for p in model.parameters()) - n_params:,}); vectors are not cached")
    ids = embedder.tokenize(texts, args.instruction, args.max_length)

    def vectors(rows):  # (len(rows), D) pooled and L2-normed, as the frozen path's cached vectors
        lengths = torch.tensor([len(ids[i]) for i in rows])
        flat, = to_device([torch.tensor([t for i in rows for t in ids[i]])], device)
        return embedder.pool(model(flat, lengths), lengths, args.pooling, args.dim, normalize=True)

    steps_per_epoch = math.ceil(len(tr) / args.head_batch_size)
    total, gen = args.epochs * steps_per_epoch, torch.Generator().manual_seed(args.seed)
    warmup, best, step = int(args.warmup_frac * total), None, 0
    y, val_texts = y.to(device), [texts[i] for i in va.tolist()]
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        head.train()
        train_loss = torch.zeros((), device=device)
        order = tr[torch.randperm(len(tr), generator=gen)]
        for start in range(0, len(tr), args.head_batch_size):
            rows = order[start:start + args.head_batch_size]
            for group in opt.param_groups:
                group["lr"] = get_lr(step, total, warmup, group["peak"])
            loss = F.cross_entropy(head(vectors(rows.tolist())), y[rows.to(device)], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_loss += loss.detach() * len(rows)
            step += 1
        x_va = embedder.encode(val_texts, instruction=args.instruction, max_length=args.max_length, dim=args.dim,
                               pooling=args.pooling, progress=False) if len(va) else torch.empty(0, head.hparams["in_dim"])
        val_loss, val_acc, val_map, probs = evaluate_head(head, x_va, y[va.to(device)], labels)
        log(f"epoch {epoch:3d}/{args.epochs}  train loss {train_loss.item() / len(tr):.4f}  val loss {val_loss:.4f}  "
            f"val acc {val_acc:.4f}  val MAP@3 {val_map:.4f}  {time.time() - t0:.2f}s")
        if best is None or not len(va) or val_map > best["map3"]:
            best = {"epoch": epoch, "map3": val_map, "acc": val_acc, "loss": val_loss, "probs": probs,
                    "state": {k: v.clone() for k, v in head.state_dict().items()},
                    "lora": {k: v.detach().clone() for k, v in lora.items()}}
    head.load_state_dict(best.pop("state"))
    return head.cpu().eval(), best, {k: v.cpu() for k, v in best.pop("lora").items()}


@contextlib.contextmanager
def interrupted(progress):
    """Ctrl-C in the head phase: say how far it got (progress() -> text). Nothing is written then:
    checkpoints are written whole at the end, never as if an unfinished sweep or CV had finished."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{progress()}; no checkpoint was written (the vectors are cached: "
                                f"a rerun goes straight to the head)") from None


def check_flags(args):
    if args.max_length < 2:
        raise ValueError(f"--max-length must be at least 2 (one text token and EOS), got {args.max_length}")
    if args.dim is not None and args.dim < 1:
        raise ValueError(f"--dim must be positive, got {args.dim}")
    if not 0 <= args.val_frac < 1:
        raise ValueError(f"--val-frac must be in [0, 1), got {args.val_frac}")
    if args.folds == 1 or args.folds < 0:
        raise ValueError(f"--folds must be 0 (one split by --val-frac) or at least 2, got {args.folds}")
    if args.epochs < 1 or args.head_batch_size < 1 or args.sweep < 0:
        raise ValueError("--epochs and --head-batch-size must be positive, --sweep not negative")
    if (args.sweep or args.layer_sweep or args.compare_pooling) and args.folds:
        raise ValueError("--sweep, --layer-sweep and --compare-pooling use one split: drop --folds")
    if args.lora_rank:
        n_layers = Qwen3Config.from_json(resolve_model_dir(args.model) / "config.json").num_hidden_layers
        check_lora(n_layers, args.lora_rank, args.lora_targets.split(","), args.lora_layers)
        if args.sweep or args.folds or args.layer_sweep or args.compare_pooling or args.layer is not None:
            raise ValueError("--lora-rank trains on one split and the final layer: drop --sweep, --folds, "
                             "--layer-sweep, --compare-pooling and --layer")


def load_rows(args, log):
    """The CSV, checked against the flags -> rows, texts to embed, label strings."""
    columns, rows = read_csv(args.data)
    require_columns(args.data, columns, [args.id_col], "--id-col")
    require_columns(args.data, columns, args.label_cols.split(","), "--label-cols")
    if args.group_col:
        require_columns(args.data, columns, [args.group_col], "--group-col")
    if args.map_correct:
        require_columns(args.data, columns, ["QuestionId", "MC_Answer", "Category"], "--map-correct")
        args.correct_answers = map_correct_answers(rows)
        add_answer_is_correct(rows, args.correct_answers)
        columns = columns + ["AnswerIsCorrect"]
        if "{AnswerIsCorrect}" not in args.text_template:
            args.text_template += CORRECT_SUFFIX
    require_columns(args.data, columns, template_fields(args.text_template), "--text-template")
    check_ids(args.data, rows, args.id_col)
    texts = render(args.text_template, rows)
    empty = [row[args.id_col] for row, t in zip(rows, texts) if not t.strip()]
    if empty:  # embedded all the same (EOS alone still gives a vector), but worth knowing
        log(f"warning: {len(empty)} rows render to an empty text, e.g. {args.id_col} {empty[:5]}")
    truth = labels_of(rows, args.label_cols.split(","))
    log(f"{args.data}: {len(rows)} rows, {len(set(truth))} labels")
    return rows, texts, truth


def embed_rows(args, texts, rows, log, pooling=None, layers=None):
    """{layer: (rows, D) vectors} through the cache; layers default to (args.layer,)."""
    t0 = time.time()
    out = embed_cache.embed(texts, args.model, instruction=args.instruction, max_length=args.max_length,
                            pooling=pooling or args.pooling, dim=args.dim, layers=layers or (args.layer,),
                            device=args.device, dtype=args.dtype, **embed_cache.run_options(args),
                            log=log, ids=[row[args.id_col] for row in rows])
    if out is not None:  # None: a torchrun rank other than 0, whose work ends here
        log(f"embeddings: {len(out)} x {tuple(next(iter(out.values())).shape)} in {time.time() - t0:.1f}s")
    return out


def cross_validate(x, y, truth, labels, args, groups, log, quiet=False):
    """K heads, each validated on its held-out fold -> (heads, out-of-fold probabilities, results)."""
    fold = torch.tensor(kfold(truth, args.folds, groups, args.seed))
    heads, oof, maps = [], torch.zeros(len(y), len(labels)), []
    with interrupted(lambda: f"in fold {len(maps) + 1} of {args.folds}" + (f" (val MAP@3 of the folds done: "
                     f"{', '.join(f'{m:.4f}' for m in maps)})" if maps else "")):
        for k in range(args.folds):
            tr, va = (fold != k).nonzero().flatten(), (fold == k).nonzero().flatten()
            head, best = train_head(x[tr], y[tr], x[va], y[va], labels, args, (lambda *_: None) if quiet else log,
                                    tag=f"fold {k}  ")
            heads.append(head)
            oof[va] = best["probs"]
            maps.append(best["map3"])
    kind = f"grouped by {args.group_col}" if groups else "stratified"
    res = {"fold_map3": maps, "map3_mean": statistics.mean(maps), "map3_std": statistics.stdev(maps),
           "oof_map3": map_at_k(truth, top_k(oof, labels)), "cv": kind}
    log(f"{args.folds}-fold MAP@3 {res['map3_mean']:.4f} ± {res['map3_std']:.4f}, "
        f"out-of-fold MAP@3 {res['oof_map3']:.4f} ({kind})")
    return heads, oof, res


def sample_head_config(rng):
    """One random head configuration for --sweep."""
    return {"hidden": rng.choice([[256, 128], [512, 256], [1024, 512], [2048, 1024]]),
            "dropout": rng.choice([0.0, 0.1, 0.2, 0.3, 0.5]), "lr": 10 ** rng.uniform(-4, -2.5),
            "weight_decay": rng.choice([0.0, 1e-4, 1e-2, 0.1]), "label_smoothing": rng.choice([0.0, 0.05, 0.1]),
            "epochs": rng.choice([10, 20, 30, 50])}


def print_table(log, header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    for line in [header] + rows:
        log("  ".join(str(v).rjust(w) for v, w in zip(line, widths)))


def quiet(*_):  # sweeps print tables, not epochs
    pass


def layer_sweep(args, rows, texts, labels, y, tr, va, log, results):
    """One forward pass per pooling pools every layer; each (pooling, layer) gets its own head."""
    n_layers = Qwen3Config.from_json(resolve_model_dir(args.model) / "config.json").num_hidden_layers
    layers = [None] + list(range(n_layers + 1)) if args.layer_sweep else [args.layer]
    poolings = ["last", "mean"] if args.compare_pooling else [args.pooling]
    vectors = {p: embed_rows(args, texts, rows, log, pooling=p, layers=layers) for p in poolings}
    if any(v is None for v in vectors.values()):  # a torchrun rank other than 0
        return None
    table = []
    with interrupted(lambda: f"after {len(table)} of {len(poolings) * len(layers)} layer-sweep heads"):
        for pooling, layer in ((p, layer) for p in poolings for layer in layers):
            t0 = time.time()
            x = vectors[pooling][layer]
            _, best = train_head(x[tr], y[tr], x[va], y[va], labels, args, quiet)
            table.append([pooling, "final (normed)" if layer is None else str(layer), f"{best['map3']:.4f}",
                          f"{best['acc']:.4f}", best["epoch"], f"{time.time() - t0:.1f}s"])
    print_table(log, ["pooling", "layer", "val MAP@3", "val acc", "best epoch", "time"], table)
    return {**results, "table": table}


def head_sweep(args, x, y, labels, tr, va, log, results):
    """--sweep N random head configurations on the same vectors and split; the best one is kept."""
    rng = random.Random(args.seed)
    trials = []

    def progress():  # for Ctrl-C
        best = max(trials, key=lambda t: (t[0], -t[1]), default=None)
        return f"after {len(trials)} of {args.sweep} sweep trials" + (
            f" (best so far: trial {best[1]}, val MAP@3 {best[0]:.4f}, {json.dumps(best[2])})" if best else "")

    with interrupted(progress):
        for trial in range(args.sweep):
            config = sample_head_config(rng)
            t0 = time.time()
            head, best = train_head(x[tr], y[tr], x[va], y[va], labels,
                                    argparse.Namespace(**{**vars(args), **config}), quiet)
            trials.append((best["map3"], trial, config, head, best, time.time() - t0))
            log(f"trial {trial:3d}: val MAP@3 {best['map3']:.4f}  {json.dumps(config)}  {time.time() - t0:.1f}s")
    trials.sort(key=lambda t: (-t[0], t[1]))
    print_table(log, ["rank", "trial", "val MAP@3", "hidden", "dropout", "lr", "wd", "smooth", "epochs", "time"],
                [[r + 1, t, f"{m:.4f}", "x".join(map(str, c["hidden"])), c["dropout"], f"{c['lr']:.2e}",
                  c["weight_decay"], c["label_smoothing"], c["epochs"], f"{s:.1f}s"]
                 for r, (m, t, c, _, _, s) in enumerate(trials)])
    _, best_trial, config, head, best, _ = trials[0]
    vars(args).update(config)  # the checkpoint's args.json records the winning configuration
    results.update(best_trial=best_trial, val_map3=best["map3"], sweep=[[t[1], t[0], t[2]] for t in trials])
    return [head], va, best["probs"]


def main(args, log=print):
    check_flags(args)
    rows, texts, truth = load_rows(args, log)
    labels = sorted(set(truth))
    index = {label: i for i, label in enumerate(labels)}
    y = torch.tensor([index[t] for t in truth])
    groups = [row[args.group_col] for row in rows] if args.group_col else None
    tr, va = (torch.tensor(i, dtype=torch.long) for i in split(truth, args.val_frac, groups, args.seed))
    results = {"n_labels": len(labels), "n_rows": len(rows)}

    if args.layer_sweep or args.compare_pooling:
        return layer_sweep(args, rows, texts, labels, y, tr, va, log, results)
    lora = None
    if args.lora_rank:  # fine-tuning: no cached vectors, they change as the adapters learn
        with interrupted(lambda: "while fine-tuning"):
            head, best, lora = train_lora(args, texts, y, tr, va, labels, log)
        results["lora_trainable_params"] = sum(t.numel() for t in lora.values())
    else:
        x = embed_rows(args, texts, rows, log)
        if x is None:
            return None
        x = x[args.layer]
        if args.sweep:
            heads, val_idx, val_probs = head_sweep(args, x, y, labels, tr, va, log, results)
        elif args.folds:
            if groups is not None:  # the competition's test asks train's questions: stratified CV mimics it
                results["stratified"] = cross_validate(x, y, truth, labels, args, None, log, quiet=True)[2]
            heads, val_probs, res = cross_validate(x, y, truth, labels, args, groups, log)
            val_idx = torch.arange(len(rows))
            results.update(res)
        else:
            with interrupted(lambda: "while training the head"):
                head, best = train_head(x[tr], y[tr], x[va], y[va], labels, args, log)
    if not (args.sweep or args.folds):
        heads, val_idx, val_probs = [head], va, best["probs"]
        results.update(best_epoch=best["epoch"], val_map3=best["map3"], val_acc=best["acc"], val_loss=best["loss"])
        if len(va):
            log(f"best epoch {best['epoch']}: val MAP@3 {best['map3']:.4f}, val acc {best['acc']:.4f} "
                f"({len(tr)} train / {len(va)} val rows{', grouped by ' + args.group_col if groups else ''})")

    if args.out:
        embedding = {"model": args.model, "instruction": args.instruction, "max_length": args.max_length,
                     "pooling": args.pooling, "dim": args.dim, "layer": args.layer, "dtype": args.dtype,
                     "text_template": args.text_template, "label_cols": args.label_cols.split(","),
                     "id_col": args.id_col, "correct_answers": getattr(args, "correct_answers", None)}
        preds = top_k(val_probs, labels)
        table = io.StringIO()
        w = csv.writer(table)
        w.writerow([args.id_col, "label", "top3"] + [f"p_{label}" for label in labels])
        for i, p, pr in zip(val_idx.tolist(), preds, val_probs.tolist()):
            w.writerow([rows[i][args.id_col], truth[i], " ".join(p)] + [f"{v:.5f}" for v in pr])
        if lora:  # the adapters beside the head; evaluate.py merges them into the base model's weights
            results["lora"] = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets.split(","),
                               "layers": args.lora_layers, "file": "lora.safetensors"}
        save_checkpoint(args.out, heads, labels, embedding, results,
                        files={"args.json": json.dumps(vars(args), indent=2), "val_predictions.csv": table.getvalue()},
                        tensors={"lora.safetensors": lora} if lora else None)
        log(f"wrote {args.out}/ (meta.json, {len(heads)} head file(s){', lora.safetensors' if lora else ''}, "
            f"args.json, val_predictions.csv)")
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
    d.add_argument("--folds", type=int, default=0, help="K-fold cross-validation with K heads saved (0: one split); "
                   "with --group-col, stratified CV is reported too")
    d.add_argument("--map-correct", action="store_true", help="MAP format only: add the column AnswerIsCorrect "
                   "(yes/no: is MC_Answer the answer most chosen by True_ rows of its question?) to the template")
    e = p.add_argument_group("embedding")
    e.add_argument("--model", default="Qwen/Qwen3-Embedding-0.6B", help="Hub repo id or local checkpoint folder")
    e.add_argument("--instruction", default=None, help="Qwen3-Embedding instruction ('Instruct: ...\\nQuery:' prefix)")
    e.add_argument("--max-length", type=int, default=512, help="tokens per text, EOS included")
    e.add_argument("--dim", type=int, default=None, help="keep the first DIM features (Matryoshka)")
    e.add_argument("--pooling", choices=["last", "mean"], default="last", help="last (EOS) token or mean of tokens")
    e.add_argument("--layer", type=int, default=None, help="pool this layer's raw hidden state, 0 = embeddings, "
                   "negative from the end; None: the final normed output")
    e.add_argument("--layer-sweep", action="store_true", help="one forward pass, a head per layer, a table of val MAP@3")
    e.add_argument("--compare-pooling", action="store_true", help="the same for last and mean pooling")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...; None: cuda if available")
    e.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="None: bfloat16 on CUDA and on CPUs with native bf16 (AVX-512 BF16, AMX), else float32 "
                   "(float16 is refused: Qwen3 overflows it)")
    embed_cache.add_flags(e)
    h = p.add_argument_group("head and training")
    h.add_argument("--hidden", type=int, nargs=2, default=[1024, 512], metavar=("H1", "H2"), help="hidden layer sizes")
    h.add_argument("--dropout", type=float, default=0.2, help="on the input and after each hidden layer")
    h.add_argument("--activation", choices=sorted(ACTIVATIONS), default="gelu", help="between the layers")
    h.add_argument("--input-norm", action="store_true", help="LayerNorm on the input vectors")
    h.add_argument("--epochs", type=int, default=30, help="passes over the training rows; the best one is kept")
    h.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    h.add_argument("--warmup-frac", type=float, default=0.1, help="share of steps spent warming up the LR")
    h.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    h.add_argument("--label-smoothing", type=float, default=0.0, help="of the cross-entropy targets")
    h.add_argument("--head-batch-size", type=int, default=64, help="rows per optimizer step")
    h.add_argument("--seed", type=int, default=0, help="split, init and batch order")
    h.add_argument("--head-device", default=None, help="where the head trains: cpu, cuda, ...; None: the embedding device")
    h.add_argument("--sweep", type=int, default=0, help="try N random head configurations, rank them, save the best")
    h.add_argument("--out", default=None, help="checkpoint folder to write; None: nothing is written")
    t = p.add_argument_group("fine-tuning the embedder with LoRA (lora.py)")
    t.add_argument("--lora-rank", type=int, default=0, help="rank of the adapters; 0: frozen vectors (cached)")
    t.add_argument("--lora-alpha", type=float, default=16, help="the adapters' output is scaled by alpha / rank")
    t.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", help="comma-separated linear layers to adapt")
    t.add_argument("--lora-layers", type=int, default=None, help="adapt the top N blocks; None: all")
    t.add_argument("--lora-lr", type=float, default=2e-4, help="peak learning rate of the adapters")
    t.add_argument("--grad-checkpoint", action="store_true", help="recompute each block's activations in the "
                   "backward pass: less memory, about a third more time")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


if __name__ == "__main__":
    cli(main, parse_args)
