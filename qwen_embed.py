"""Qwen3 as a text embedder, in plain PyTorch: one text in, one vector out.

    from qwen_embed import Qwen3Embedder
    model = Qwen3Embedder.from_pretrained("Qwen/Qwen3-Embedding-0.6B")   # or a local directory
    vecs = model.encode(["2 + 2 = 4", "a fraction is part of a whole"])  # (2, 1024) float32

Notable features: RMSNorm on q and k per head, rotate-half RoPE, grouped-query attention,
SwiGLU MLP, safetensors loaded straight onto the meta-built model, last-token pooling. It follows
transformers' `models/qwen3/modeling_qwen3.py` and matches it to float32 rounding (tests/).
The batch is *packed*: the real tokens of all texts are concatenated, with no padding, so the
matmuls (almost all of the FLOPs) never touch a pad token; only attention sees the texts apart.
Read top to bottom: the config, the model, loading, then Qwen3Embedder. Where the model runs
(device, dtype, memory) and what is only for speed (varlen kernel, torch.compile) is runtime.py;
how weights are stored (as shipped, int8) is weights.py.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import safe_open
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

import runtime
import weights
from runtime import plan_batches

EOS = "<|endoftext|>"  # Qwen3-Embedding was trained to summarise the text into this token's state
# How a text's token states become one vector (pool): the one list that the flags, EmbedSpec,
# encode and --compare-pooling read. "last" is what Qwen3-Embedding is trained for.
POOLINGS = ("last", "mean")


# ----------------------------------------------------------------------------- config

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


# ----------------------------------------------------------------------------- model

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
    """Causal attention per text of a packed batch: q (N, n_head, d); k, v (N, n_kv, d) -> (N, n_head,
    d). The model's attention function (Qwen3Model.attend); runtime.py hands it FlashAttention on
    the packed tokens instead where that runs (speed only), weights.py wraps it for float16."""
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


# ----------------------------------------------------------------------------- pooling

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


def pool_keys(states, lengths, batch, keys, dim, normalize):
    """{(pooling, layer): (B, D) float32 CPU vectors} of one batch, from (final normed states,
    layer states or None); NaN or Inf raises NonFiniteError naming the texts (indices in batch)."""
    final, layers = states
    lengths = torch.tensor(lengths)
    vectors = {}
    for pooling, layer in keys:
        v = pool(final if layer is None else layers[layer], lengths, pooling, dim, normalize).cpu()
        bad = (~torch.isfinite(v).all(1)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteError(sorted(batch[i] for i in bad))
        vectors[pooling, layer] = v
    return vectors


class NonFiniteError(FloatingPointError):
    """Vectors with NaN or Inf; .indices says which texts. Never silently returned."""

    def __init__(self, indices):
        more = " ..." if len(indices) > 20 else ""
        super().__init__(f"NaN or Inf in the vectors of texts {indices[:20]}{more}")
        self.indices = indices


# ----------------------------------------------------------------------------- loading

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


def checkpoint_tensors(folder):
    """{our key: (shape, dtype on disk)} from the safetensors headers: what choose_format weighs."""
    out = {}
    for file in weight_files(folder):
        try:
            header = weights.read_header(file)
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        out.update({our_key(k): v for k, v in header.items() if our_key(k)})
    return out


def load_weights(model, folder, device, dtype, fmt="none", prefix=""):
    """Fill a meta-built model from the safetensors, one tensor at a time, each straight into its
    stored form (weights.py: as shipped, int8 or int4) on device: never a second copy of the model.
    prefix: load only the tensors under it (e.g. "layers.3." into one Block)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    stored = {}  # {our key: {"weight": tensor, and its format's scales}}
    for file in weight_files(Path(folder)):
        try:
            offsets = weights.read_header(file, offsets=True)
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
                    stored[ours] = weights.read_stored(f, key, fmt, dtype, device, file,
                                                       offsets[key])
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not fit config.json: missing {few(missing)}, "
                         f"unexpected {few(unexpected)}")
    weights.apply_format(model, stored, dtype)
    state = {key.removesuffix("weight") + name: t
             for key, tensors in stored.items() for name, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)


def few(names):
    """A list for an error message: its first five, and how many in all."""
    return f"{names[:5]}{' ...' if len(names) > 5 else ''} ({len(names)})"


@torch.inference_mode()
def streamed_states(folder, config, ids, device, dtype, layer=None, max_tokens=2048):
    """The hidden states of tokenized texts with the weights as shipped, read from the checkpoint
    one block at a time (a block in memory, then dropped): the reference a quantized model is
    measured against, wherever the quantized model itself fits. ids: token ids per text; layer: as
    in Qwen3Model (None: the final normed output, else the residual stream after that many
    blocks). Returns (N, hidden), the texts' tokens concatenated. Every text passes a block before
    the next block is read, in runs of consecutive texts of at most max_tokens tokens."""
    embed = next(((file, key) for file in weight_files(Path(folder)) for key in
                  weights.read_header(file) if our_key(key) == "embed_tokens.weight"), None)
    if embed is None:
        raise ValueError(f"{folder}: no embed_tokens.weight in the checkpoint")
    file, key = embed
    shape, source = weights.read_header(file)[key]
    offset = weights.read_header(file, offsets=True)[key]
    runs, states = [], []  # (pack, cos, sin) of each run of texts; its hidden states (n, hidden)
    for chunk in plan_batches([len(i) for i in ids], max_tokens, ordered=True):
        flat = [t for i in chunk for t in ids[i]]
        states.append(weights.read_lookup(file, offset, shape, source, flat).to(device, dtype))
        pack = Packing([len(ids[i]) for i in chunk], device)
        runs.append((pack, *rope(pack.positions, config.head_dim, config.rope_theta, dtype)))
    for i in range(config.num_hidden_layers if layer is None else layer):
        with torch.device("meta"):
            block = Block(config)
        load_weights(block, folder, device, dtype, "none", prefix=f"layers.{i}.")
        states = [block(x, cos, sin, pack) for x, (pack, cos, sin) in zip(states, runs)]
        del block
    x = torch.cat(states)
    if layer is not None:
        return x
    with torch.device("meta"):
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    load_weights(norm, folder, device, dtype, "none", prefix="norm.")
    return norm(x)


def load_tokenizer(folder):
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:
        raise ValueError(f"{folder / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
    tokenizer.no_truncation()  # we truncate ourselves, keeping EOS last
    tokenizer.no_padding()     # and pack instead of padding
    tokenizer.encode_special_tokens = True  # a "<|endoftext|>" written in a text is text (tokenize)
    return tokenizer


# ----------------------------------------------------------------------------- tokens and arguments

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


def layer_keys(config, layers, dim=None):
    """Layer indexes as stored: None (the final normed output) or 0..num_hidden_layers (-1 and
    num_hidden_layers are one state), after the one check of layers and dim that encode, the
    cache and the flags share (its messages name the flags)."""
    n, hidden = config.num_hidden_layers, config.hidden_size
    bad = [layer for layer in layers if layer is not None and not -n - 1 <= layer <= n]
    if bad:
        raise ValueError(f"--layer must be between {-n - 1} and {n} for this {n}-layer model, "
                         f"got {bad[0]}")
    if dim is not None and not 1 <= dim <= hidden:
        raise ValueError(f"--dim must be between 1 and the model's hidden size {hidden}, got {dim}")
    return [None if layer is None else layer % (n + 1) for layer in layers]


def check_encode(keys, batch_size, max_batch_tokens):
    """One-line errors for the encode arguments that layer_keys does not check."""
    unknown = sorted({pooling for pooling, _ in keys} - set(POOLINGS))
    if unknown:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {unknown}")
    if any(limit is not None and limit < 1 for limit in (batch_size, max_batch_tokens)):
        raise ValueError("batch_size and max_batch_tokens must be positive")


# ----------------------------------------------------------------------------- embedder

def silent(*_):  # the log of a caller that wants no lines
    pass


class Qwen3Embedder:
    def __init__(self, model, tokenizer, device, dtype, name="", compile=None, weight_format="none",
                 folder=None):
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.name, self.weight_format, self.folder = name, weight_format, folder
        self.fast = runtime.FastPaths(device, dtype, compile)  # varlen, compile: decided once
        self.eos_id = tokenizer.token_to_id(EOS)
        if self.eos_id is None:
            raise ValueError(f"{name}: tokenizer.json has no {EOS} token")

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, revision=None, compile=None,
                        quantize="auto", max_memory=None, log=None):
        """compile: True, False (the eager reference path), or None: when a job is big enough to
        repay it (maybe_compile). quantize: "none" (weights as shipped), "int8", "int4", or
        "auto": the first of these that fits the memory budget with room for a batch
        (weights.choose_format, the one decision); max_memory: that budget in GB (None: what the
        device has free). log: where the one line on the chosen format goes."""
        device, dtype = runtime.pick_device_dtype(device, dtype)
        folder = runtime.resolve_model_dir(name_or_path, revision)
        config = Qwen3Config.from_json(folder / "config.json")
        fmt, why = weights.choose_format(quantize, checkpoint_tensors(folder), config, dtype,
                                         runtime.room_batch_tokens(config, device, dtype),
                                         runtime.memory_budget(device, max_memory))
        (log or silent)(why)
        if dtype == torch.float16:
            (log or silent)(runtime.FLOAT16_LINE)
        return cls.load(folder, config, device, dtype, fmt, compile, str(name_or_path))

    @classmethod
    def load(cls, folder, config, device, dtype, fmt, compile=None, name=None):
        """The embedder of a local checkpoint folder, with its weight format already decided (by
        from_pretrained, or once for a whole run by its caller): nothing is decided here."""
        with torch.device("meta"):  # shapes only: no memory, no random init
            model = Qwen3Model(config)
        # float16 is guarded: the model runs in float32, its matmuls on scaled float16 (weights.py)
        compute = torch.float32 if dtype == torch.float16 else dtype
        with runtime.compact_heap():
            load_weights(model, folder, device, compute, fmt)
        if dtype == torch.float16:
            weights.guard_float16(model)
        return cls(model.eval(), load_tokenizer(folder), device, dtype, name or str(folder),
                   compile, fmt, folder)

    dim = property(lambda self: self.model.config.hidden_size)
    compiled = property(lambda self: self.fast.compiled)
    pool = staticmethod(pool)  # the embedder's pooling, for callers that hold an embedder

    def tokenize(self, texts, instruction=None, max_length=8192, append_eos=True):
        return tokenize(self.tokenizer, texts, instruction, max_length, append_eos)

    def encode(self, texts, instruction=None, batch_size=None, max_length=8192, dim=None,
               normalize=True, progress=True, pooling="last", max_batch_tokens=None, layers=None,
               append_eos=True):
        """Embed texts: a float32 (len(texts), D) CPU tensor, row i for texts[i].

        pooling: "last" (the EOS token's state, what Qwen3-Embedding is trained for) or "mean".
        dim: keep the first dim features (Matryoshka), before the L2 normalisation.
        layers: a list of hidden states to pool in one pass -> a dict {layer: tensor}. Each is None
        for the final normed output, or a layer index (0 = the embeddings, num_hidden_layers = the
        last layer's raw output, negative from the end), un-normed.
        batch_size, max_batch_tokens: at most this many texts and tokens per forward pass. None:
        no limit on texts, and tokens by runtime.default_batch_tokens (the device and the model).
        """
        ids = self.tokenize(texts, instruction, max_length, append_eos)
        stored = layer_keys(self.model.config, [None] if layers is None else layers, dim)
        keys = [(pooling, layer) for layer in stored]
        out = {key: torch.empty(len(texts), dim or self.dim) for key in keys}
        with tqdm(total=len(texts), desc="embedding", unit="text", disable=not progress) as bar:
            for batch, vectors in self.stream(ids, keys, dim, normalize, batch_size,
                                              max_batch_tokens, tqdm.write if progress else None):
                for key in keys:
                    out[key][batch] = vectors[key]
                bar.update(len(batch))
        return out[keys[0]] if layers is None else {i: out[k] for i, k in zip(layers, keys)}

    def stream(self, ids, keys, dim=None, normalize=True, batch_size=None, max_batch_tokens=None,
               log=None):
        """Embed tokenized texts batch by batch, ONE forward pass for every (pooling, layer) key: an
        iterator of (indices into ids, {key: (len(indices), D) float32 CPU tensor}), so that a
        caller can save as it goes. Arguments checked here, before the first batch;
        runtime.run_batches runs the batches (out-of-memory halving, fast-path fallback)."""
        check_encode(keys, batch_size, max_batch_tokens)
        layer_keys(self.model.config, [layer for _, layer in keys], dim)
        return self.batches(ids, keys, dim, normalize, batch_size, max_batch_tokens, log or silent)

    @torch.inference_mode()
    def batches(self, ids, keys, dim, normalize, batch_size, max_batch_tokens, log):
        need_layers = any(layer is not None for _, layer in keys)
        self.fast.maybe_compile(self.model, sum(len(i) for i in ids), log)  # here, said once
        budget = max_batch_tokens or runtime.default_batch_tokens(self.model.config, self.device,
                                                                  self.dtype, need_layers)
        for batch, states in runtime.run_batches(self.model, ids, budget, batch_size, need_layers,
                                                 self.device, self.fast, log):
            lengths = [len(ids[i]) for i in batch]
            yield batch, pool_keys(states, lengths, batch, keys, dim, normalize)

    def fidelity(self, texts, instruction=None, max_length=8192, pooling="last", layer=None,
                 append_eos=True):
        """Per-text cosine between this model's vectors and those of the weights as shipped
        (reference_vectors): what quantization costs on these texts; ones as shipped."""
        ours = self.encode(texts, instruction, max_length=max_length, pooling=pooling,
                           progress=False, layers=[layer], append_eos=append_eos)[layer]
        return (ours * reference_vectors(self, texts, instruction, max_length, pooling, layer, None,
                                         append_eos)).sum(-1)


def reference_vectors(embedder, texts, instruction=None, max_length=8192, pooling="last",
                      layer=None, dim=None, append_eos=True):
    """What embedder.encode would return with the weights as shipped (L2-normed), computed with them
    streamed from the checkpoint one block at a time (streamed_states), in the embedder's compute
    dtype: the yardstick of a quantized model, at the memory of one block more."""
    ids = embedder.tokenize(texts, instruction, max_length, append_eos)
    config = embedder.model.config
    key = layer_keys(config, [layer])[0]
    dtype = torch.float32 if embedder.dtype == torch.float16 else embedder.dtype  # never plain fp16
    h = streamed_states(embedder.folder, config, ids, embedder.device, dtype, key,
                        runtime.default_batch_tokens(config, embedder.device, dtype))
    return pool(h, torch.tensor([len(i) for i in ids]), pooling, dim, True).cpu()
