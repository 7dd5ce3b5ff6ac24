"""Qwen3 as a text embedder, in plain PyTorch: one text in, one vector out.

    from qwen_embed import Qwen3Embedder
    model = Qwen3Embedder.from_pretrained("Qwen/Qwen3-Embedding-0.6B")   # or a local directory
    vecs = model.encode(["2 + 2 = 4", "a fraction is part of a whole"])  # (2, 1024) float32

Notable features: RMSNorm on q and k per head, rotate-half RoPE, grouped-query attention,
SwiGLU MLP, safetensors loaded straight onto the meta-built model, last-token pooling. It follows
transformers' `models/qwen3/modeling_qwen3.py` and matches it to float32 rounding (tests/).
The batch is *packed*: the real tokens of all texts are concatenated, with no padding, so the
matmuls (almost all of the FLOPs) never touch a pad token; only attention sees the texts apart.
What is there only for speed sits in its own section ("speed only": torch.compile of the blocks)
or is marked where it happens (varlen attention, host-side batch metadata, pinned copies).
"""

import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import safe_open
from tokenizers import Tokenizer
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

EOS = "<|endoftext|>"  # Qwen3-Embedding was trained to summarise the text into this token's state

try:  # attention straight on packed tokens (FlashAttention, CUDA, bf16), in torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
    VARLEN_ARGS = set(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen_attn, VARLEN_ARGS = None, set()


def varlen_usable(device, dtype):
    return varlen_attn is not None and device.type == "cuda" and dtype == torch.bfloat16


def causal_varlen_attn(q, k, v, cu, max_len):
    """Causal attention within each text of a packed batch; cu: (B+1,) int32 start offsets.
    The API changed across torch releases: 2.10 takes is_causal, later ones a window, (-1, 0) =
    everything before and nothing after; enable_gqa came later still, so before it k and v are
    repeated for each query head of their group. The default scale is ours, head_dim ** -0.5."""
    kw = {"window_size": (-1, 0)} if "window_size" in VARLEN_ARGS else {"is_causal": True}
    if "enable_gqa" in VARLEN_ARGS:
        kw["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int           # 151669 for every Qwen3 size
    hidden_size: int          # width of the residual stream: 1024 (0.6B), 2560 (4B), 4096 (8B)
    num_hidden_layers: int
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # fewer key/value heads, each shared by a group of query heads
    head_dim: int             # 128 in every size: NOT hidden_size / num_attention_heads (64 for 0.6B)
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
            raise ValueError(f"{path}: model_type is {cfg.get('model_type')!r}, only 'qwen3' is supported")
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
        # Recent transformers writes rope_theta inside rope_parameters; the Hub's files have it on top.
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
    """cos, sin of shape (N, head_dim) for rotate-half RoPE, computed in float32 like the reference."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq  # (N, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)        # (N, head_dim): both halves use the same angle
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x: (N, heads, head_dim); cos, sin: (N, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # Qwen3's QK-norm: per head, before RoPE
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, batch):  # x: (N, hidden), N = real tokens of the whole batch
        N = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(N, self.n_head, self.head_dim))  # (N, n_head, head_dim)
        k = self.k_norm(self.k_proj(x).view(N, self.n_kv, self.head_dim))    # (N, n_kv, head_dim)
        v = self.v_proj(x).view(N, self.n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(batch.attention(q, k, v).reshape(N, -1))


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

    def forward(self, x, cos, sin, batch):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class PackedBatch:
    """Where each text sits among the N concatenated tokens, and causal attention within each text.

    lengths: (B,) tokens per text, on the host. Text b owns tokens cu[b] : cu[b + 1]. Everything
    here is computed on the host and copied once, so the GPU never waits for the CPU to read a
    length back (and torch.compile sees plain ints, no graph break).
    """

    varlen_failed = False  # set by Qwen3Embedder.forward if the kernel fails on this GPU

    def __init__(self, lengths, device, dtype):
        lengths = torch.as_tensor(lengths, dtype=torch.long, device="cpu")
        self.B, self.max_len, self.N = len(lengths), int(lengths.max()), int(lengths.sum())
        cu = F.pad(lengths.cumsum(0), (1, 0))                                # (B+1,) start offsets, then N
        seq = torch.repeat_interleave(torch.arange(self.B), lengths)         # (N,) which text
        positions = torch.arange(self.N) - cu[seq]                           # (N,) restart at 0 per text
        slot = seq * self.max_len + positions  # each token's place in a right-padded (B, max_len) grid
        self.positions, self.slot, self.cu32 = to_device([positions, slot, cu.to(torch.int32)], device)
        self.varlen = not self.varlen_failed and varlen_usable(device, dtype)

    def attention(self, q, k, v):  # q: (N, n_head, d), k/v: (N, n_kv, d) -> (N, n_head, d)
        if self.varlen:
            return causal_varlen_attn(q, k, v, self.cu32, self.max_len)
        # SDPA wants a rectangle, so scatter into a right-padded (B, max_len) grid. Right padding
        # needs no padding mask: under the causal mask a real token attends only to earlier
        # positions, and every pad comes after every real token of its row. So plain is_causal=True
        # is exact, SDPA may take its fastest kernels, and pad rows (never NaN) are simply dropped.
        B, T = self.B, self.max_len

        def grid(t):  # (N, h, d) -> (B, h, T, d)
            g = t.new_zeros(B * T, *t.shape[1:])
            g[self.slot] = t
            return g.view(B, T, *t.shape[1:]).transpose(1, 2)

        out = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), is_causal=True,
                                             scale=q.shape[-1] ** -0.5, enable_gqa=True)
        return out.transpose(1, 2).reshape(B * T, *q.shape[1:])[self.slot]


def to_device(tensors, device):
    """Host tensors to the device; through pinned memory on CUDA, so the copy overlaps GPU work."""
    if device.type != "cuda":
        return tensors
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


class Qwen3Model(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.grad_checkpoint = False  # fine-tuning (train.py --grad-checkpoint): memory for compute

    def forward(self, input_ids, lengths, return_layers=False):
        """input_ids: (N,) the texts' tokens concatenated; lengths: (B,) tokens per text, on the host.

        Returns the final normed hidden states (N, hidden). With return_layers, also the list of
        num_hidden_layers + 1 residual-stream states (embeddings, then after each layer), un-normed.
        """
        x = self.embed_tokens(input_ids)  # (N, hidden)
        batch = PackedBatch(lengths, x.device, x.dtype)
        # RoPE angles are computed here, not kept as buffers: a buffer built on the meta device
        # would stay empty after loading. Positions restart at 0 for every text.
        cos, sin = rope(batch.positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        layers = [x]
        for block in self.layers:
            if self.grad_checkpoint and torch.is_grad_enabled():  # keep only x; recompute the rest in backward
                x = checkpoint(block, x, cos, sin, batch, use_reentrant=False)
            else:
                x = block(x, cos, sin, batch)
            if return_layers:
                layers.append(x)
        x = self.norm(x)
        return (x, layers) if return_layers else x


# ----------------------------------------------------------------------------- speed only

COMPILE_MIN_TOKENS = 100_000  # compile=None compiles jobs this large (Qwen3Embedder.maybe_compile)


def compile_blocks(model):
    """torch.compile each block, nothing else: it fuses RMSNorm, RoPE, SwiGLU and the residual adds
    into a few kernels (run eagerly on a GPU, these passes over memory take longer than the 0.6B's
    matmuls). The code compiled is the code above; compile=False runs it eagerly, as the reference.
    All blocks share one graph and the token count is a dynamic size, so it compiles once per run,
    not once per layer or per batch shape, and inductor caches the result on disk for later runs."""
    for block in model.layers:
        block.forward = torch.compile(block.forward, dynamic=True)


# ----------------------------------------------------------------------------- loading

def resolve_model_dir(name_or_path, revision=None):
    """A local directory as is; otherwise a Hugging Face repo id, downloaded into the standard cache.

    Only config, tokenizer and safetensors files are fetched (never pickled weights or code);
    HF_HUB_OFFLINE=1 makes this read the cache alone.
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        if folder.exists() or str(name_or_path).startswith((".", "/", "~")):
            raise FileNotFoundError(f"{name_or_path}: not a model directory")
        from huggingface_hub import snapshot_download
        try:
            folder = Path(snapshot_download(str(name_or_path), revision=revision,
                                            allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        except Exception as e:  # offline with an empty cache, unknown repo, no network, bad revision...
            raise FileNotFoundError(f"{name_or_path}: not a local directory and not fetched from the "
                                    f"Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for needed in ("config.json", "tokenizer.json"):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder / needed}: missing from the model directory")
    return folder


def load_weights(model, folder, device, dtype):
    """Fill a meta-device model from model.safetensors or a sharded index, straight in dtype/device."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for name in files:
        file = folder / name
        if not file.exists():
            raise FileNotFoundError(f"{file}: weights file missing")
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    # Qwen3 LLM checkpoints prefix the decoder with "model." and add an lm_head
                    # that an embedder never uses; Qwen3-Embedding checkpoints have neither.
                    ours = key.removeprefix("model.")
                    if key.startswith("lm_head."):
                        continue
                    t = f.get_tensor(key)
                    if ours in expected and t.shape != expected[ours]:
                        raise ValueError(f"{file}: {key} has shape {tuple(t.shape)}, "
                                         f"config.json implies {tuple(expected[ours])}")
                    state[ours] = t.to(device=device, dtype=dtype)  # one tensor at a time: no 2nd copy
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not fit config.json: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    model.load_state_dict(state, strict=True, assign=True)


def cpu_has_native_bf16():
    """AVX-512 BF16 or AMX: bf16 matmuls run about 2x fp32's FLOP rate (and halve the memory).
    Without them bf16 is emulated, several times slower than fp32."""
    return any(getattr(torch.cpu, f"_is_{name}_supported", lambda: False)() for name in ("avx512_bf16", "amx_tile"))


def pick_device_dtype(device=None, dtype=None):
    """Default: CUDA + bfloat16 when a GPU is present; else CPU, in bfloat16 where the CPU has native
    bf16 matmuls and float32 where it does not (see cpu_has_native_bf16)."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"unknown device {device!r} (try 'cpu', 'cuda' or 'cuda:1')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but no CUDA GPU is available")
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
             "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    dtype = names.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float16:
        raise ValueError("float16 is not supported: Qwen3's activations overflow it; use bfloat16")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"unknown dtype {dtype!r} (use 'bfloat16' or 'float32')")
    return device, dtype


def default_batch_tokens(config, device, dtype, keep_layers=False):
    """Tokens per forward pass when the caller does not say. CPU: 2048, the fastest measured on a
    2-core machine (larger batches fall out of cache: 16384 was 25-35% slower). CUDA: as many as
    fit in a third of the free memory, counting one layer's live activations per token (q, k, v,
    the attention output and the padded grid, the MLP's three intermediate-wide tensors and a
    few residual-wide ones; with keep_layers, every layer's output too), at most 65536: a GPU
    needs tens of thousands of tokens per matmul to be busy, and texts are sorted by length, so
    a big batch costs no extra padding."""
    if device.type != "cuda":
        return 2048
    c = config
    per_token = dtype.itemsize * (8 * c.hidden_size + 3 * c.intermediate_size
                                  + 4 * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
                                  + keep_layers * (c.num_hidden_layers + 1) * c.hidden_size)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1024, min(65536, free // 3 // per_token)))


# ----------------------------------------------------------------------------- embedder

class NonFiniteError(FloatingPointError):
    """Vectors with NaN or Inf; .indices says which texts. Never silently returned."""

    def __init__(self, indices):
        super().__init__(f"NaN or Inf in the vectors of texts {indices[:20]}{' ...' if len(indices) > 20 else ''}")
        self.indices = indices


class TextTooLongError(MemoryError):
    """One text that does not fit in GPU memory even alone; .index and .tokens say which."""

    def __init__(self, index, tokens):
        super().__init__(f"text {index} ({tokens} tokens) does not fit in GPU memory even alone; "
                         f"lower max_length")
        self.index, self.tokens = index, tokens


class Qwen3Embedder:
    def __init__(self, model, tokenizer, device, dtype, name="", compile=None):
        self.model, self.tokenizer, self.device, self.dtype, self.name = model, tokenizer, device, dtype, name
        self.compile, self.compiled = compile, False
        self.oom_budget = None  # tokens per batch, once a batch has run out of GPU memory
        self.eos_id = tokenizer.token_to_id(EOS)
        if self.eos_id is None:
            raise ValueError(f"{name}: tokenizer.json has no {EOS} token")

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, revision=None, compile=None):
        """compile: True, False (the eager reference path), or None: when a job is big enough to
        repay it (maybe_compile)."""
        device, dtype = pick_device_dtype(device, dtype)
        folder = resolve_model_dir(name_or_path, revision)
        config = Qwen3Config.from_json(folder / "config.json")
        with torch.device("meta"):  # shapes only: no memory, no random init
            model = Qwen3Model(config)
        load_weights(model, folder, device, dtype)
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"{folder / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        tokenizer.no_truncation()  # we truncate ourselves, keeping EOS last
        tokenizer.no_padding()     # and pack instead of padding
        return cls(model.eval(), tokenizer, device, dtype, str(name_or_path), compile)

    def maybe_compile(self, n_tokens, log=print):
        """compile=None compiles for jobs of COMPILE_MIN_TOKENS tokens or more: there the one-time
        cost (measured on CPU: 7-15 s, 2 s once cached on disk) is small against the work."""
        if self.compiled or self.compile is False or (self.compile is None and n_tokens < COMPILE_MIN_TOKENS):
            return
        log("compiling the model's blocks with torch.compile: once per run, longer the first time, "
            "cached on disk after (compile=False or --no-compile runs eagerly)")
        compile_blocks(self.model)
        self.compiled = True

    def forward(self, flat, lengths, return_layers):
        """The model on one packed batch. If a fast path fails (torch.compile without a working
        compiler, the varlen kernel on an unsupported GPU), warn once and run the eager, padded
        reference path from then on: slower, never wrong."""
        try:
            out = self.model(flat, lengths, return_layers=return_layers)
            return out if return_layers else (out, None)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            fast = [name for name, on in (("torch.compile", self.compiled), ("varlen attention",
                    varlen_usable(self.device, self.dtype) and not PackedBatch.varlen_failed)) if on]
            if not fast:
                raise
            warnings.warn(f"{' and '.join(fast)} failed ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
                          f"running the eager reference path instead")
            for block in self.model.layers if self.compiled else []:
                del block.forward  # the class's eager forward again
            self.compile, self.compiled, PackedBatch.varlen_failed = False, False, True
            return self.forward(flat, lengths, return_layers)

    @property
    def dim(self):
        return self.model.config.hidden_size

    def tokenize(self, texts, instruction=None, max_length=8192):
        """Token ids per text, each ending with exactly one EOS, at most max_length long.

        The Qwen3-Embedding tokenizer appends EOS in its post-processor and plain Qwen3 LLM
        tokenizers do not; we encode without special tokens and append it ourselves, so both give
        the same ids, and truncation keeps the EOS whose hidden state becomes the embedding.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one text token and EOS), got {max_length}")
        if instruction is not None:  # exactly the official Qwen3-Embedding query format
            texts = [f"Instruct: {instruction}\nQuery:{t}" for t in texts]
        try:
            encoded = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:  # the only str the tokenizer rejects: a lone surrogate, not valid Unicode text
            bad = [i for i, t in enumerate(texts) if not t.encode("utf-8", "ignore").decode() == t]
            raise ValueError(f"texts {bad[:20]} are not valid Unicode (lone surrogates)") from None
        return [e.ids[: max_length - 1] + [self.eos_id] for e in encoded]

    def encode(self, texts, instruction=None, batch_size=None, max_length=8192, dim=None,
               normalize=True, progress=True, pooling="last", max_batch_tokens=None, layers=None):
        """Embed texts: a float32 (len(texts), D) CPU tensor, row i for texts[i].

        pooling: "last" (the EOS token's state, what Qwen3-Embedding is trained for) or "mean".
        dim: keep the first dim features (Matryoshka), before the L2 normalisation.
        layers: a list of hidden states to pool in one pass -> a dict {layer: tensor}. Each is None
        for the final normed output, or a layer index (0 = the embeddings, num_hidden_layers = the
        last layer's raw output, negative from the end), un-normed.
        batch_size, max_batch_tokens: at most this many texts and tokens per forward pass. None:
        no limit on texts, and tokens by default_batch_tokens (the device, its free memory, the model).
        """
        self.check(pooling, dim, batch_size, max_batch_tokens)
        keys = self.layer_keys(layers)
        out = {key: torch.empty(len(texts), dim or self.dim) for key in keys}
        with tqdm(total=len(texts), desc="embedding", unit="text", disable=not progress) as bar:
            for batch, vectors in self.stream(texts, instruction, batch_size, max_length, dim, normalize, pooling,
                                              max_batch_tokens, layers, log=tqdm.write if progress else None):
                for key in keys:
                    out[key][batch] = vectors[key]
                bar.update(len(batch))
        return out[None] if layers is None else {l: out[k] for l, k in zip(layers, keys)}

    def check(self, pooling, dim, batch_size, max_batch_tokens):
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        if dim is not None and not 1 <= dim <= self.dim:
            raise ValueError(f"dim must be between 1 and the hidden size {self.dim}, got {dim}")
        if (batch_size is not None and batch_size < 1) or (max_batch_tokens is not None and max_batch_tokens < 1):
            raise ValueError("batch_size and max_batch_tokens must be positive")

    def layer_keys(self, layers):
        """Layer indexes as stored: None (the final normed output) or 0..num_hidden_layers."""
        n = self.model.config.num_hidden_layers
        if layers is not None and any(l is not None and not -n - 1 <= l <= n for l in layers):
            raise ValueError(f"layers must be in [-{n + 1}, {n}], got {layers}")
        return [None] if layers is None else [None if l is None else l % (n + 1) for l in layers]

    @torch.inference_mode()
    def stream(self, texts, instruction=None, batch_size=None, max_length=8192, dim=None, normalize=True,
               pooling="last", max_batch_tokens=None, layers=None, log=None):
        """encode, one batch at a time, shortest texts first: yields (indices into texts,
        {layer key: (len(indices), D) float32 CPU tensor}), so that a caller can save as it goes.

        Texts are sorted by length and cut into batches of <= batch_size texts and <= max_batch_tokens
        tokens: sorting keeps padding in attention small, packing removes it from everything else.
        A batch that runs out of GPU memory is retried in halves, and the smaller token budget is
        kept from then on (said once through log); a text that does not fit alone raises
        TextTooLongError."""
        self.check(pooling, dim, batch_size, max_batch_tokens)
        keys = self.layer_keys(layers)
        need_layers = any(k is not None for k in keys)
        log = log or (lambda *_: None)
        ids = self.tokenize(texts, instruction, max_length)
        self.maybe_compile(sum(map(len, ids)), log)
        budget = max_batch_tokens or default_batch_tokens(self.model.config, self.device, self.dtype, need_layers)
        budget = min(budget, self.oom_budget or budget)  # an out-of-memory budget lasts for the whole run
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        start, failed_at = 0, None
        while start < len(order):
            end, tokens = start, 0
            while end < len(order) and end - start < (batch_size or len(order)) and \
                    (end == start or tokens + len(ids[order[end]]) <= budget):
                tokens += len(ids[order[end]])
                end += 1
            batch = order[start:end]
            lengths = torch.tensor([len(ids[i]) for i in batch])  # stays on the host
            flat, = to_device([torch.tensor([t for i in batch for t in ids[i]])], self.device)
            try:
                hidden, states = self.forward(flat, lengths, return_layers=need_layers)
            except torch.OutOfMemoryError:
                hidden = None  # handled below: out of this clause, the failed batch's tensors are freed
            if hidden is None:
                if len(batch) == 1:
                    raise TextTooLongError(batch[0], tokens)
                budget, failed_at = tokens // 2, failed_at or tokens
                del flat
                torch.cuda.empty_cache()
                continue
            if failed_at:  # halved until it fitted: say so once, and keep that budget
                log(f"out of GPU memory with {failed_at} tokens in a batch: carrying on with at most {budget}")
                self.oom_budget, failed_at = budget, None
            vectors = {}
            for key in keys:
                v = self.pool(hidden if key is None else states[key], lengths, pooling, dim, normalize).cpu()
                bad = (~torch.isfinite(v).all(1)).nonzero().flatten().tolist()
                if bad:
                    raise NonFiniteError(sorted(batch[i] for i in bad))
                vectors[key] = v
            yield batch, vectors
            start = end

    @staticmethod
    def pool(h, lengths, pooling, dim, normalize):  # h: (N, hidden), lengths: (B,) on the host -> (B, dim) float32
        if pooling == "last":
            # The last real token, found from the lengths. Never search for the pad id: in Qwen3
            # it is the same id as EOS.
            ends, = to_device([lengths.cumsum(0) - 1], h.device)
            v = h[ends].float()
        else:
            seq, n = to_device([torch.repeat_interleave(torch.arange(len(lengths)), lengths), lengths], h.device)
            v = torch.zeros(len(lengths), h.shape[1], device=h.device).index_add_(0, seq, h.float())
            v = v / n[:, None]
        v = v[:, :dim] if dim else v
        return F.normalize(v, dim=-1) if normalize else v
