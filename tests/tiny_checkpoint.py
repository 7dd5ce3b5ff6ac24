"""Write a tiny random Qwen3 checkpoint laid out like the Hub's Qwen3-Embedding repos.

    python tests/tiny_checkpoint.py DIR [--layers 2 --hidden 64 ...]

Real weights cannot be downloaded in CI, so tests (and quick manual runs of train.py) use these:
config.json, model.safetensors (every weight random, norms included), a small byte-level BPE
tokenizer.json trained on a fixed corpus, and the files that let transformers and
sentence-transformers load the same folder (tokenizer_config.json, modules.json, 1_Pooling/).
Needs only torch, safetensors and tokenizers, so the reference stack loads it with its own code.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "What fraction of the shape is not shaded? Give your answer in its simplest form.",
    "One third is equal to three ninths because 6 over 9 is 2 thirds.",
    "I think the answer is 1/3 because you divide 9 by 3 and get 3.",
    "Calculate 0.25 + 0.5 and explain why the decimal point moves.",
    "The student adds the numerators and the denominators: a common misconception!",
    "Ünïcödé, 日本語, emoji 🙂, tabs\tand\nnewlines, \"quotes\", commas, and 12345 digits.",
]


def build_tokenizer(vocab_size=400, eos_post_processor=True):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    if eos_post_processor:  # as the Qwen3-Embedding tokenizer: EOS appended to every text
        eos = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>",
            special_tokens=[("<|endoftext|>", eos)])
    return tok


def make_checkpoint(folder, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, intermediate=96,
                    seed=0, prefix="", shards=1, eos_post_processor=True, rope_in_parameters=True,
                    tokenizer=None, vocab_size=None, dtype=torch.float32):
    """Defaults keep head_dim != hidden / heads and kv_heads < heads, the cases that catch bugs.
    tokenizer: a tokenizer.json to use instead of the tiny trained one (benchmarks: Qwen's real one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(tokenizer)) if tokenizer else build_tokenizer(eos_post_processor=eos_post_processor)
    tok.save(str(folder / "tokenizer.json"))
    vocab = vocab_size or tok.get_vocab_size()
    config = {
        "architectures": ["Qwen3Model"], "model_type": "qwen3", "vocab_size": vocab,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "intermediate_size": intermediate,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 4096,
        "attention_bias": False, "use_sliding_window": False, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "eos_token_id": tok.token_to_id("<|endoftext|>"),
    }
    # The Hub's files put rope_theta on top; recent transformers writes it inside rope_parameters.
    if rope_in_parameters:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    else:
        config["rope_theta"] = 1000000.0
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    g = torch.Generator().manual_seed(seed)
    shapes = {"embed_tokens.weight": (vocab, hidden), "norm.weight": (hidden,)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norm weights around 1, but not 1, so a skipped or misplaced norm shows
            weights[prefix + name] = (1 + 0.3 * torch.randn(shape, generator=g)).to(dtype)
        else:
            weights[prefix + name] = (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(dtype)
    if prefix:  # an LLM checkpoint also has an lm_head, which the embedder ignores
        weights["lm_head.weight"] = torch.randn(vocab, hidden, generator=g).to(dtype)
    names = sorted(weights)
    if shards == 1:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[s::shards]}
            save_file(part, str(folder / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    # What transformers' AutoTokenizer and sentence-transformers read, as in the Qwen3-Embedding repos.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "padding_side": "left", "model_max_length": 4096}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False,
        "pooling_mode_cls_token": False, "include_prompt": True}))
    (folder / "2_Normalize").mkdir(exist_ok=True)
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_checkpoint(a.folder, layers=a.layers, hidden=a.hidden, seed=a.seed))
