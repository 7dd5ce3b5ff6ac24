"""Write a random Qwen3 checkpoint laid out like the Hub's repos, tiny or at a real model's shape.

    python tools/random_checkpoint.py DIR                                   # tiny: 2 layers, hidden 64
    python tools/random_checkpoint.py DIR --shape 8b --dtype bfloat16 --shards 4 --prefix model. \
        --tokenizer QWEN/tokenizer.json                              # Qwen3-8B's exact shape, 16.4 GB

Real weights cannot be downloaded in CI, so tests, benchmarks and memory measurements use these:
config.json, safetensors (every weight random, norms included; each tensor seeded by its name, so
sharding and prefixes change nothing; written a shard at a time, so an 8B fits in RAM), a small
byte-level BPE tokenizer.json trained on a fixed corpus (or a given one), and the files that let
transformers and sentence-transformers load the same folder. Needs only torch, safetensors and
tokenizers, so the reference stack loads it with its own code.
"""

import argparse
import fnmatch
import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SHAPES = {  # the real Qwen3 shapes (vocabulary: 151669 in the embedding models, 151936 in the LLMs)
    "0.6b": dict(layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, intermediate=3072),
    "4b": dict(layers=36, hidden=2560, heads=32, kv_heads=8, head_dim=128, intermediate=9728),
    "8b": dict(layers=36, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=12288),
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, intermediate=96),
}

CORPUS = [
    "What fraction of the shape is not shaded? Give your answer in its simplest form.",
    "One third is equal to three ninths because 6 over 9 is 2 thirds.",
    "I think the answer is 1/3 because you divide 9 by 3 and get 3.",
    "Calculate 0.25 + 0.5 and explain why the decimal point moves.",
    "The student adds the numerators and the denominators: a common misconception!",
    "Ünïcödé, 日本語, emoji 🙂, tabs\tand\nnewlines, \"quotes\", commas, and 12345 digits.",
]


# What make_checkpoint writes into its folder: the CLI replaces a folder holding only these.
WRITES = ("config.json", "tokenizer.json", "model.safetensors", "model-*-of-*.safetensors",
          "model.safetensors.index.json", "tokenizer_config.json", "modules.json", "1_Pooling",
          "2_Normalize")


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

    shapes = tensor_shapes(vocab, hidden, layers, heads, kv_heads, head_dim, intermediate, prefix)
    names = sorted(shapes)
    weight_map = {}
    for s in range(shards):
        file = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: random_tensor(n.removeprefix(prefix), shapes[n], seed, dtype) for n in names[s::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        del part  # one shard in memory at a time
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    write_reference_files(folder, hidden)
    return folder


def tensor_shapes(vocab, hidden, layers, heads, kv_heads, head_dim, intermediate, prefix=""):
    """{name: shape} of a Qwen3 checkpoint, as the Hub's files name them."""
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
    shapes = {prefix + name: shape for name, shape in shapes.items()}
    if prefix:  # an LLM checkpoint also has an lm_head, which the embedder never reads
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_reference_files(folder, hidden):
    """What transformers' AutoTokenizer and sentence-transformers read, as in the Qwen3-Embedding repos."""
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


def random_tensor(name, shape, seed, dtype):
    """Norm weights around 1, but not 1, so a skipped or misplaced norm shows; matrices with unit
    variance outputs. Seeded by the name, so a tensor is the same in any shard or layout."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) == 1:
        return (1 + 0.3 * torch.randn(shape, generator=g)).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    for start in range(0, shape[0], 8192):  # in blocks of rows: no float32 copy of a whole 8B table
        block = torch.randn((min(8192, shape[0] - start), shape[1]), generator=g) / shape[-1] ** 0.5
        out[start:start + len(block)] = block
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="a real Qwen3 shape, or tiny")
    for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="override the shape's value")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json to copy (default: a tiny trained one)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--prefix", default="", help="'model.' for the LLM layout (with an lm_head)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    folder = Path(a.folder)
    others = sorted(p.name for p in folder.iterdir() if not any(
        fnmatch.fnmatch(p.name, name) for name in WRITES)) if folder.is_dir() else []
    if others or folder.is_file():  # a folder of someone's files, or a file: not ours to overwrite
        raise SystemExit(f"error: {folder}: holds {others[:4] or 'a file'} that this tool did not "
                         f"write; name a new folder")
    shape = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in SHAPES[a.shape].items()}
    print(make_checkpoint(a.folder, **shape, seed=a.seed, prefix=a.prefix, shards=a.shards, tokenizer=a.tokenizer,
                          vocab_size=a.vocab_size, dtype=getattr(torch, a.dtype)))
