"""Qwen3 as a text embedder, in plain PyTorch: one text in, one vector out. This file runs alone.

    from qwen_embed import Qwen3Embedder
    model = Qwen3Embedder.from_pretrained("Qwen/Qwen3-Embedding-0.6B")   # or a local directory
    vecs = model.encode(["2 + 2 = 4", "a fraction is part of a whole"])  # (2, 1024) float32

    python qwen_embed.py MODEL "a text" "another text"    # the vectors' shape, their cosines

It follows transformers' `models/qwen3/modeling_qwen3.py` and matches it to float32 rounding
(tests/), with the batch packed instead of padded. Read top to bottom, it is the way a text
travels: tokens, the config, the model, pooling, loading a checkpoint, then Qwen3Embedder, which
puts them together. It imports nothing of its project: what real sizes need (weights kept as
shipped or in int8/int4, guarded float16, memory, the out-of-memory runner, compile, the vector
cache) is in at_scale/, which imports this file and plugs in at named places.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import safe_open
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm


# ------------------------------------------------------------------------------------------- tokens

EOS = "<|endoftext|>"  # Qwen3-Embedding was trained to summarise the text into this token's state


def load_tokenizer(folder):
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:
        raise ValueError(f"{folder / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
    tokenizer.no_truncation()  # we truncate ourselves, keeping EOS last
    tokenizer.no_padding()     # and pack instead of padding
    tokenizer.encode_special_tokens = True  # a "<|endoftext|>" written in a text is text (tokenize)
    return tokenizer


def tokenize(tokenizer, texts, instruction=None, max_length=8192, append_eos=True):
    """Token ids per text, at most max_length long, each ending with exactly one EOS.

    The Qwen3-Embedding tokenizer appends EOS in its post-processor and plain Qwen3 LLM
    tokenizers do not; we encode without special tokens and append it ourselves, so both give
    the same ids, and truncation keeps the EOS whose hidden state becomes the embedding. A
    text is data, not control: special tokens written in it (a literal "<|endoftext|>") are
    tokenized as the plain text they are, never as the special token (as transformers does
    with split_special_tokens=True; by default it would parse them, and a text would hold an
    EOS before its end). append_eos=False embeds the text's own tokens alone, as llama.cpp
    does for a plain Qwen3 LLM (its GGUF sets add_eos_token false): "last" pooling then
    takes the last real token.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    if max_length < 1 + append_eos:
        raise ValueError(f"max_length must be >= {1 + append_eos} (one text token"
                         f"{' and EOS' * append_eos}), got {max_length}")
    if instruction is not None:  # exactly the official Qwen3-Embedding query format
        texts = [f"Instruct: {instruction}\nQuery:{t}" for t in texts]
    try:
        encoded = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    except TypeError:  # the only str the tokenizer rejects: a lone surrogate, not valid Unicode
        bad = [i for i, t in enumerate(texts) if not t.encode("utf-8", "ignore").decode() == t]
        raise ValueError(f"texts {bad[:20]} are not valid Unicode (lone surrogates)") from None
    if append_eos:
        return [e.ids[: max_length - 1] + [tokenizer.token_to_id(EOS)] for e in encoded]
    empty = [i for i, e in enumerate(encoded) if not e.ids]
    if empty:
        raise ValueError(f"texts {empty[:20]} are empty: without EOS (--no-eos) an empty text has "
                         f"no token to embed")
    return [e.ids[:max_length] for e in encoded]


# ------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int           # 151669 in Qwen3-Embedding checkpoints, 151936 in the Qwen3 LLMs
    hidden_size: int          # width of the residual stream: 1024 (0.6B), 2560 (4B), 4096 (8B)
    num_hidden_layers: int
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # fewer key/value heads, each shared by a group of query heads
    head_dim: int             # 128 in every size: NOT hidden_size / num_attention_heads (0.6B: 64)
    intermediate_size: int    # MLP width
    rms_norm_eps: float
    rope_theta: float         # RoPE base frequency

    @classmethod
    def from_json(cls, path):
        try:
            cfg = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if cfg.get("model_type") != "qwen3":
            raise ValueError(f"{path}: model_type is {cfg.get('model_type')!r}, only 'qwen3' is "
                             f"supported")
        # Refuse what we do not implement rather than silently computing something else.
        rope = cfg.get("rope_parameters") or {}
        unsupported = {
            "rope_scaling": cfg.get("rope_scaling") not in (None, {}),
            "rope_parameters.rope_type": rope.get("rope_type", "default") != "default",
            "use_sliding_window": bool(cfg.get("use_sliding_window")),
            "layer_types": any(t != "full_attention" for t in cfg.get("layer_types") or []),
            "attention_bias": bool(cfg.get("attention_bias")),
            "hidden_act": cfg.get("hidden_act", "silu") != "silu",
            "num_experts": bool(cfg.get("num_experts")),
        }
        for key, bad in unsupported.items():
            if bad:
                raise ValueError(f"{path}: unsupported config {key}={cfg.get(key.split('.')[0])!r}")
        # Recent transformers writes rope_theta inside rope_parameters; the Hub's files, on top.
        cfg.setdefault("rope_theta", rope.get("rope_theta"))
        missing = [f for f in cls.__dataclass_fields__ if cfg.get(f) is None]
        if missing:
            raise ValueError(f"{path}: missing config keys {missing}")
        return cls(**{f: cfg[f] for f in cls.__dataclass_fields__})


# -------------------------------------------------------------------------------------------- model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x):
        # The reference's order, which matters in bf16: normalise in float32, cast back, then scale.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(positions, head_dim, theta, dtype):
    """cos, sin of shape (N, head_dim) for rotate-half RoPE, in float32 like the reference."""
    even = torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device)  # (head_dim/2,)
    inv_freq = 1.0 / (theta ** (even / head_dim))
    freqs = positions.float()[:, None] * inv_freq  # (N, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)        # (N, head_dim): both halves use the same angle
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x: (N, heads, head_dim); cos, sin: (N, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def sdpa_attention(q, k, v, pack):
    """Causal attention per text of a packed batch: q (N, n_head, d); k, v (N, n_kv, d) ->
    (N, n_head, d). The model's attention function (Qwen3Model.attend); at_scale/runtime.py hands it
    FlashAttention on the packed tokens where that runs (speed only), at_scale/weights.py wraps it
    for float16."""
    # SDPA wants a rectangle, so scatter into a right-padded (B, heads, T, d) grid. Right padding
    # needs no padding mask: under the causal mask a real token attends only to earlier positions,
    # and every pad comes after every real token of its row. So plain is_causal=True is exact, SDPA
    # may take its fastest kernels, and the pad rows are dropped.
    q, k, v = (pack.to_grid(t) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=q.shape[-1] ** -0.5,
                                         enable_gqa=True)  # (B, n_head, T, d)
    return pack.from_grid(out)


class Packing:
    """A batch is packed: the real tokens of all its texts concatenated, no padding, so the matmuls
    (almost all of the work) never touch a pad token; only attention must see the texts apart.
    lengths: (B,) tokens per text, on the host; text b owns tokens cu[b] : cu[b + 1]. Computed on
    the host and copied to the device once, so the device never waits for a length to be read back.
    attend: the attention function (q, k, v, pack) -> out."""

    def __init__(self, lengths, device, attend=sdpa_attention):
        lengths = torch.as_tensor(lengths, dtype=torch.long, device="cpu")
        self.B, self.max_len, self.attend = len(lengths), int(lengths.max()), attend
        cu = F.pad(lengths.cumsum(0), (1, 0))                         # (B+1,) start offsets, then N
        seq = torch.repeat_interleave(torch.arange(self.B), lengths)  # (N,) which text
        positions = torch.arange(int(cu[-1])) - cu[seq]               # (N,) restart at 0 per text
        slot = seq * self.max_len + positions  # (N,) each token's place in a (B, max_len) grid
        cu = cu.to(torch.int32)
        self.positions, self.slot, self.cu = (t.to(device) for t in (positions, slot, cu))

    def attention(self, q, k, v):
        """Causal attention per text: q (N, n_head, d); k, v (N, n_kv, d) -> (N, n_head, d)."""
        return self.attend(q, k, v, self)

    def to_grid(self, t):  # (N, h, d) -> (B, h, T, d), zeros after each text
        grid = t.new_zeros(self.B * self.max_len, *t.shape[1:])  # (B * T, h, d)
        grid[self.slot] = t
        return grid.view(self.B, self.max_len, *t.shape[1:]).transpose(1, 2)

    def from_grid(self, grid):  # (B, h, T, d) -> (N, h, d), the real tokens only
        flat = grid.transpose(1, 2).reshape(self.B * self.max_len, *grid.shape[1::2])  # (B*T, h, d)
        return flat[self.slot]


class Attention(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = (c.num_attention_heads, c.num_key_value_heads,
                                                 c.head_dim)
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # Qwen3's QK-norm: per head, before RoPE
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, pack):  # x: (N, hidden), N = real tokens of the whole batch
        N = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(N, self.n_head, self.head_dim))  # (N, n_head, head_dim)
        k = self.k_norm(self.k_proj(x).view(N, self.n_kv, self.head_dim))    # (N, n_kv, head_dim)
        v = self.v_proj(x).view(N, self.n_kv, self.head_dim)                 # (N, n_kv, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = pack.attention(q, k, v)                                        # (N, n_head, head_dim)
        return self.o_proj(out.reshape(N, -1))                               # (N, hidden)


class MLP(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, pack):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pack)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Qwen3Model(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attend = sdpa_attention  # the attention function: an add-on may hand in another

    def forward(self, input_ids, lengths, return_layers=False, attend=None):
        """input_ids: (N,) the texts' tokens concatenated; lengths: (B,) tokens per text, on host.

        Returns the final normed hidden states (N, hidden). With return_layers, also the list of
        num_hidden_layers + 1 residual-stream states (embeddings, then after each layer), un-normed.
        attend: this call's attention function (None: self.attend).
        """
        x = self.embed_tokens(input_ids)  # (N, hidden)
        pack = Packing(lengths, x.device, attend or self.attend)
        # RoPE angles are computed here, not kept as buffers: a buffer built on the meta device
        # would stay empty after loading. Positions restart at 0 for every text.
        cos, sin = rope(pack.positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        layers = [x]
        for block in self.layers:
            x = block(x, cos, sin, pack)
            if return_layers:
                layers.append(x)
        x = self.norm(x)
        return (x, layers) if return_layers else x


# ------------------------------------------------------------------------------------------ pooling

# How a text's token states become one vector: the one list that the flags, the cache's spec,
# encode and --compare-pooling read. "last" is what Qwen3-Embedding is trained for.
POOLINGS = ("last", "mean")


def pool(h, lengths, pooling, dim=None, normalize=True):
    """Hidden states to one vector per text. h: (N, hidden) packed; lengths: (B,) on the host ->
    (B, dim or hidden) float32. "last": the last real token (EOS, unless append_eos=False), found
    from the lengths: never search for the pad id, which in Qwen3 is the EOS id. "mean": every
    token."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "last":
        v = h[(lengths.cumsum(0) - 1).to(h.device)].float()                         # (B, hidden)
    else:
        seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)       # (N,) which text
        seq = seq.to(h.device)
        v = torch.zeros(len(lengths), h.shape[1], device=h.device).index_add_(0, seq, h.float())
        v = v / lengths.to(h.device)[:, None]                                        # (B, hidden)
    v = v[:, :dim] if dim else v  # Matryoshka: the first dim features
    return F.normalize(v, dim=-1) if normalize else v


# ------------------------------------------------------------------------------------------ loading

def resolve_model_dir(name_or_path, revision=None):
    """A local directory as is; otherwise a Hugging Face repo id, downloaded into the standard
    cache. Only config, tokenizer and safetensors files are fetched (never pickled weights or
    code); HF_HUB_OFFLINE=1 makes this read the cache alone."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        if folder.exists() or str(name_or_path).startswith((".", "/", "~")):
            raise FileNotFoundError(f"{name_or_path}: not a model directory")
        from huggingface_hub import snapshot_download  # only here: a local folder needs no Hub
        try:
            folder = Path(snapshot_download(str(name_or_path), revision=revision,
                                            allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        except Exception as e:  # offline with an empty cache, unknown repo, no network, ...
            why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            raise FileNotFoundError(f"{name_or_path}: not a local directory and not fetched from "
                                    f"the Hugging Face Hub ({why})") from None
    for needed in ("config.json", "tokenizer.json"):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder / needed}: missing from the model directory")
    return folder


def weight_files(folder):
    """The safetensors files of a checkpoint folder: model.safetensors, or a sharded index's
    files."""
    index = folder / "model.safetensors.index.json"
    names = ["model.safetensors"]
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    for name in names:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name}: weights file missing")
    return [folder / name for name in names]


def our_key(key):
    """Qwen3 LLM checkpoints prefix the decoder with "model." and add an lm_head that an embedder
    never uses (None: skipped, never read); Qwen3-Embedding checkpoints have neither."""
    return None if key.startswith("lm_head.") else key.removeprefix("model.")


def read_checkpoint(model, folder, read, prefix=""):
    """{our key: read(open file, key in the file, file)} for every tensor of the meta-built model,
    one at a time, checked against it: a misshapen, missing or unexpected tensor is a one-line
    error naming it. prefix: only the tensors under it (e.g. "layers.3." into one Block)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    stored = {}
    for file in weight_files(Path(folder)):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    ours = our_key(key)
                    if ours is None or not ours.startswith(prefix):
                        continue
                    ours = ours.removeprefix(prefix)
                    shape = tuple(f.get_slice(key).get_shape())
                    if ours in expected and shape != tuple(expected[ours]):
                        raise ValueError(f"{file}: {key} has shape {shape}, config.json implies "
                                         f"{tuple(expected[ours])}")
                    stored[ours] = read(f, key, file)
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not fit config.json: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    return stored


def load_weights(model, folder, device, dtype):
    """Fill a meta-built model (no memory, no random init) with the checkpoint's tensors, each
    converted to dtype on device as it is read: never a second copy of the model. Simple, at a
    cost: bf16 weights computed in float32 take twice their size (at_scale/weights.py keeps them
    as shipped, or in int8/int4, and converts a layer at a time)."""
    state = read_checkpoint(model, folder, lambda f, key, _: f.get_tensor(key).to(device, dtype))
    model.load_state_dict(state, strict=True, assign=True)


# ----------------------------------------------------------------------------------------- embedder

def pick_device_dtype(device=None, dtype=None):
    """(device, dtype): CUDA if there is a GPU, else the CPU; bf16 on a GPU that has it, else
    float32. float16 is refused: Qwen3's activations overflow it (at_scale/weights.py guards it)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype is None:
        bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        dtype = torch.bfloat16 if bf16 else torch.float32
    if dtype not in (torch.bfloat16, torch.float32):
        why = ("float16 overflows on Qwen3's activations (NaN vectors)" if dtype == torch.float16
               else f"unknown dtype {dtype!r}")
        raise ValueError(f"{why}: use bfloat16 or float32 here, or at_scale's guarded float16")
    return device, dtype


class Qwen3Embedder:
    """Texts in, vectors out: tokenize, cut into batches by tokens (shortest first), run the model,
    pool. at_scale.embedder.Embedder is this class with what real sizes need added."""

    def __init__(self, model, tokenizer, device, dtype, name=""):
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.name, self.eos_id = name, tokenizer.token_to_id(EOS)
        if self.eos_id is None:
            raise ValueError(f"{name}: tokenizer.json has no {EOS} token")

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, revision=None):
        """A local checkpoint folder or a Hub repo id; device and dtype as pick_device_dtype."""
        device, dtype = pick_device_dtype(device, dtype)
        folder = resolve_model_dir(name_or_path, revision)
        config = Qwen3Config.from_json(folder / "config.json")
        with torch.device("meta"):  # shapes only: no memory, no random init
            model = Qwen3Model(config)
        load_weights(model, folder, device, dtype)
        return cls(model.eval(), load_tokenizer(folder), device, dtype, str(name_or_path))

    dim = property(lambda self: self.model.config.hidden_size)

    def tokenize(self, texts, instruction=None, max_length=8192, append_eos=True):
        return tokenize(self.tokenizer, texts, instruction, max_length, append_eos)

    @torch.inference_mode()
    def encode(self, texts, instruction=None, max_length=8192, dim=None, normalize=True,
               pooling="last", append_eos=True, max_batch_tokens=2048, progress=True):
        """Embed texts: a float32 (len(texts), D) CPU tensor, row i for texts[i]. pooling: one of
        POOLINGS; dim: keep the first dim features (Matryoshka), before the L2 normalisation."""
        ids = self.tokenize(texts, instruction, max_length, append_eos)
        batches, tokens = [[]], 0  # shortest first, cut at max_batch_tokens: little padding
        for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
            if batches[-1] and tokens + len(ids[i]) > max_batch_tokens:
                batches, tokens = batches + [[]], 0
            batches[-1].append(i)
            tokens += len(ids[i])
        out = torch.empty(len(texts), dim or self.dim)
        with tqdm(total=len(texts), desc="embedding", unit="text", disable=not progress) as bar:
            for batch in batches:
                lengths = torch.tensor([len(ids[i]) for i in batch])
                flat = torch.tensor([t for i in batch for t in ids[i]]).to(self.device)
                out[batch] = pool(self.model(flat, lengths), lengths, pooling, dim, normalize).cpu()
                bar.update(len(batch))
        return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit('usage: python qwen_embed.py MODEL "text" ["text" ...]')
    try:
        embedder = Qwen3Embedder.from_pretrained(sys.argv[1])
        vectors = embedder.encode(sys.argv[2:], progress=False)
    except (ValueError, FileNotFoundError, TypeError) as e:
        sys.exit(f"error: {e}")
    print(f"vectors: {tuple(vectors.shape)} float32, L2-normed, computed in "
          f"{str(embedder.dtype).removeprefix('torch.')} on {embedder.device}")
    print("cosine similarities:")
    for i, row in enumerate((vectors @ vectors.T).tolist()):
        print(f"  {i}: " + "  ".join(f"{c:6.3f}" for c in row))
