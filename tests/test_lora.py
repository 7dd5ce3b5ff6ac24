"""LoRA (lora.py, train.py --lora-rank): exact at B = 0, gradients equal to peft's on transformers'
Qwen3, merged equal to unmerged, train/save/load/evaluate round trip, one-line errors."""

import csv
import re

import peft  # the reference for LoRA (requirements-dev.txt): a missing one fails, never skips
import pytest
import torch
import torch.nn.functional as F
import transformers

import evaluate
import train
from at_scale.lora import TARGETS, adapters, add_lora, checkpoint_blocks, merge_lora
from at_scale.embedder import Embedder
from helpers import PINNED, TEXTS, cli_error, write_csv


def fresh(tiny):
    return Embedder.from_pretrained(tiny, device="cpu", dtype="float32", compile=False)


def randomize_b(model, seed=1):
    """B starts at zero; a random B makes the adapters change the output (and get gradients in A)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapters(model).items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_b_zero_gives_the_base_model_exactly(tiny):
    base = fresh(tiny).encode(TEXTS, progress=False)
    tuned = fresh(tiny)
    params = add_lora(tuned.model, rank=4, alpha=8, targets=list(TARGETS))
    assert len(params) == 2 * 7 * 3 and all(p.requires_grad for p in params.values())
    assert not any(p.requires_grad for n, p in tuned.model.named_parameters() if ".lora_" not in n)
    assert torch.equal(tuned.encode(TEXTS, progress=False), base)


def test_gradients_equal_peft_on_transformers(tiny):
    """The same loss on the pooled EOS states of mixed-length texts, the same A and B: the adapters'
    gradients equal peft's LoRA on transformers' Qwen3Model (left padding + mask), in float32."""
    ours = fresh(tiny)
    add_lora(ours.model, rank=4, alpha=8, targets=list(TARGETS), layers=2)  # the top 2 of 3 blocks
    randomize_b(ours.model)
    ref = transformers.AutoModel.from_pretrained(tiny, dtype=torch.float32, attn_implementation="sdpa")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,  # a regex over module names: blocks 1 and 2
                             target_modules=r"layers\.[12]\." + f"({'|'.join(map(re.escape, TARGETS.values()))})")
    ref = peft.get_peft_model(ref, config)
    mine = adapters(ours.model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:  # base_model.model.layers.1.self_attn.q_proj.lora_A.default.weight
                key = name.split("base_model.model.")[1].replace(".default.weight", "")
                p.copy_(mine[key])
    assert sum("lora_" in n for n, _ in ref.named_parameters()) == len(mine) == 2 * 7 * 2
    w = torch.randn(ours.dim, generator=torch.Generator().manual_seed(2))

    ids = ours.tokenize(TEXTS)
    lengths = torch.tensor([len(i) for i in ids])
    h = ours.model(torch.tensor([t for i in ids for t in i]), lengths)
    (ours.pool(h, lengths, "last", None, True) @ w).square().sum().backward()
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    out = ref(**batch).last_hidden_state[:, -1]
    (F.normalize(out, dim=-1) @ w).square().sum().backward()

    for name, p in ref.named_parameters():
        if "lora_" in name:
            key = name.split("base_model.model.")[1].replace(".default.weight", "")
            ours_grad, ref_grad = mine[key].grad, p.grad
            assert ref_grad.abs().max() > 0, key
            rel = ((ours_grad - ref_grad).norm() / ref_grad.norm()).item()
            assert rel <= 1e-4, (key, rel)


def test_merged_equals_unmerged(tiny):
    tuned = fresh(tiny)
    add_lora(tuned.model, rank=4, alpha=8, targets=["q", "v", "down"])
    randomize_b(tuned.model)
    unmerged = tuned.encode(TEXTS, progress=False)
    assert (unmerged - fresh(tiny).encode(TEXTS, progress=False)).abs().max() > 1e-3  # the adapters matter
    merge_lora(tuned.model)
    assert not adapters(tuned.model)
    assert (tuned.encode(TEXTS, progress=False) - unmerged).abs().max().item() <= 1e-5


def test_train_save_load_evaluate_round_trip(tmp_path, tiny):
    data = write_csv(tmp_path / "train.csv", n=60)
    argv = ["--data", str(data), "--model", str(tiny), *PINNED, "--cache-dir", str(tmp_path / "cache"), "--epochs",
            "3", "--hidden", "16", "8", "--quiet", "--lora-rank", "4", "--lora-layers", "2", "--lora-targets", "q,v,up",
            "--out", str(tmp_path / "run")]
    logs = []
    res = train.main(train.parse_args(argv), log=logs.append)
    assert res["lora_trainable_params"] == 2 * 4 * ((64 + 4 * 32) + (64 + 2 * 32) + (64 + 96))
    assert any("vectors are not cached" in line for line in logs)
    assert f"best epoch {res['best_epoch']}: val MAP@3 {res['val_map3']:.4f}, val acc {res['val_acc']:.4f}" in logs[-2]
    assert not list((tmp_path / "cache").glob("*/chunk-*"))  # no vector cached
    again = train.main(train.parse_args(argv[:-2]), log=lambda *_: None)
    assert again["val_map3"] == res["val_map3"] and again["val_loss"] == res["val_loss"]  # same seed, same run
    out = evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "run"), "--data", str(data), "--quiet",
                                             "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]))
    # The merged checkpoint predicts the validation rows as the training run's best epoch did.
    with open(tmp_path / "run" / "val_predictions.csv", newline="") as f:
        saved = list(csv.DictReader(f))
    labels = [k[2:] for k in saved[0] if k.startswith("p_")]
    for row in saved:
        probs = out["probs"][int(row["row_id"])]
        assert torch.allclose(probs, torch.tensor([float(row[f"p_{label}"]) for label in labels]), atol=1e-4)
    assert not list((tmp_path / "cache").glob("*/chunk-*"))  # no vector cached
    (tmp_path / "run" / "lora.safetensors").unlink()  # a checkpoint missing its adapters: one line
    assert "lora.safetensors: missing from the checkpoint" in cli_error(
        evaluate, ["--checkpoint", str(tmp_path / "run"), "--data", str(data), "--device", "cpu"])


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "-1"], "--lora-rank must be 0 .no LoRA. or positive, got -1"),
    (["--lora-rank", "4", "--lora-targets", "q,attn"], r"--lora-targets: unknown \['attn'\]"),
    (["--lora-rank", "4", "--lora-layers", "4"], "--lora-layers must be between 1 and the model's 3 layers, got 4"),
    (["--lora-rank", "4", "--folds", "3"], "--lora-rank trains on one split"),
])
def test_bad_lora_flags(tmp_path, tiny, flags, message):
    data = write_csv(tmp_path / "train.csv")
    argv = ["--data", str(data), "--model", str(tiny), "--quiet", "--out", str(tmp_path / "out")] + flags
    assert re.search(message, cli_error(train, argv))
    assert not (tmp_path / "out").exists()


def test_grad_checkpoint_gives_the_same_gradients(tiny):
    grads = []
    for checkpointing in (False, True):
        ours = fresh(tiny)
        torch.manual_seed(0)
        add_lora(ours.model, rank=4, alpha=8, targets=["q", "o", "down"])
        randomize_b(ours.model)
        if checkpointing:
            checkpoint_blocks(ours.model)
        ids = ours.tokenize(TEXTS)
        lengths = torch.tensor([len(i) for i in ids])
        hidden = ours.model(torch.tensor([t for i in ids for t in i]), lengths)
        ours.pool(hidden, lengths, "last", None, True).sum().backward()
        grads.append({n: p.grad for n, p in adapters(ours.model).items()})
    for name, g in grads[0].items():
        assert g.abs().max() > 0 and torch.allclose(g, grads[1][name], atol=1e-6), name
