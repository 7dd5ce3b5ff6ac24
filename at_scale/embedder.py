"""The product's embedder: qwen_embed.Qwen3Embedder with what real sizes need, and the checks of
what encode is asked for.

    from at_scale.embedder import Embedder
    model = Embedder.from_pretrained("Qwen/Qwen3-8B", quantize="auto")  # int4 where only it fits
    vecs = model.encode(texts, layers=[None, 12, 24])  # {layer: (len(texts), 4096)}, one pass

Embedder.encode reads as the core's: tokenize, batches, the model, pool; stream and batches hand
the batches to runtime.run_batches (out-of-memory halving, the fast-path fallback) and pool every
(pooling, layer) asked for from one forward pass.
"""

import torch
from tqdm.auto import tqdm

from at_scale import runtime, weights
from qwen_embed import (POOLINGS, Qwen3Config, Qwen3Embedder, Qwen3Model, load_tokenizer, pool,
                        resolve_model_dir)


def silent(*_):  # the log of a caller that wants no lines
    pass


class Embedder(Qwen3Embedder):
    """qwen_embed.Qwen3Embedder with what real sizes need: the weights kept as shipped or in int8 or
    int4 (quantize="auto": the first that fits), guarded float16, the device's default dtype and
    token budget, every layer pooled in one pass, batches halved on out of memory, torch.compile
    and FlashAttention on packed tokens where they pay, NaN never returned, and the fidelity of
    quantized weights."""

    def __init__(self, model, tokenizer, device, dtype, name="", compile=None, weight_format="none",
                 folder=None):
        super().__init__(model, tokenizer, device, dtype, name)
        self.weight_format, self.folder = weight_format, folder
        self.fast = runtime.FastPaths(device, dtype, compile)  # varlen, compile: decided once

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, revision=None, compile=None,
                        quantize="auto", max_memory=None, log=None):
        """compile: True, False (the eager reference path), or None: when a job is big enough to
        repay it (maybe_compile). quantize: "none" (weights as shipped), "int8", "int4", or
        "auto": the first of these that fits the memory budget with room for a batch
        (weights.choose_format, the one decision); max_memory: that budget in GB (None: what the
        device has free). log: where the one line on the chosen format goes."""
        device, dtype = runtime.pick_device_dtype(device, dtype)
        folder = resolve_model_dir(name_or_path, revision)
        config = Qwen3Config.from_json(folder / "config.json")
        tensors = weights.checkpoint_tensors(folder)
        fmt, why = weights.choose_format(quantize, tensors, config, dtype,
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
            weights.load_stored(model, folder, device, compute, fmt)
        if dtype == torch.float16:
            weights.guard_float16(model)
        return cls(model.eval(), load_tokenizer(folder), device, dtype, name or str(folder),
                   compile, fmt, folder)

    compiled = property(lambda self: self.fast.compiled)
    pool = staticmethod(pool)  # the embedder's pooling, for callers that hold an embedder

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
        return (ours * weights.reference_vectors(self, texts, instruction, max_length, pooling,
                                                 layer, None, append_eos)).sum(-1)


# ----------------------------------------------------------------------- what encode is asked for

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


