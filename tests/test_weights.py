"""Weights as shipped, in int8 or int4 (weights.py), fidelity against as shipped, the memory budget,
the dtype by device, any device, batch planning (runtime.py)."""

import gc
import json
import math
import shutil
import weakref

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import evaluate
from at_scale import lora
from at_scale import runtime
import qwen_embed
import train
from at_scale import weights
from helpers import PINNED, TEXTS, cli_error, count_forward_passes, write_csv
from at_scale.lora import adapters, add_lora
from at_scale.embedder import Embedder
from qwen_embed import Qwen3Config, Qwen3Model
from at_scale.runtime import plan_batches
from tools.random_checkpoint import SHAPES, make_checkpoint
from at_scale.weights import GROUP, StoredLinear, dequantize, quantize_int4, quantize_int8


def cosines(a, b):
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


# ----------------------------------------------------------------------------- int8

def sample_weights():
    """Rows of different scales, an all-zero row, an outlier, an all-positive group."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 320, generator=g) * torch.rand(64, 1, generator=g) * 3
    w[3] = 0          # an all-zero row
    w[5, 7] = 40.0    # an outlier: only its own group's step grows
    w[9, 32:64] = w[9, 32:64].abs() + 1  # a group that holds no negative weight
    return w


def test_int8_round_trip_is_within_half_a_step_per_group():
    w = sample_weights()
    t = quantize_int8(w)
    q, scale = t["weight"], t["scale"]
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (64, 320 // GROUP)
    groups = w.view(64, -1, GROUP)
    # Symmetric, per group: a group's largest |w| maps to 127 (but for float16 rounding of the scale).
    assert torch.allclose(scale.float(), groups.abs().amax(-1) / 127, rtol=1e-3)
    step = scale.float().repeat_interleave(GROUP, 1)
    assert ((w - dequantize(t, torch.float32)).abs() <= step * (0.5 + 1e-5)).all()
    assert not q[3].any() and (dequantize(t, torch.float32)[3] == 0).all()
    outlier_group = (w - dequantize(t, torch.float32))[5, :GROUP].abs().max()
    assert (w - dequantize(t, torch.float32))[5, GROUP:].abs().max() < outlier_group  # the rest of the row unharmed
    bf16 = w.to(torch.bfloat16)  # as shipped: quantizing the shipped bf16 works the same
    t = quantize_int8(bf16)
    assert ((bf16.float() - dequantize(t, torch.float32)).abs() <= t["scale"].float().repeat_interleave(GROUP, 1)
            * (0.5 + 1e-5)).all()


def test_int4_round_trip_is_within_half_a_step_per_group_and_packs_two_per_byte():
    w = sample_weights()
    t = quantize_int4(w)
    packed, codes, steps = t["weight"], t["codes"], t["steps"]
    assert packed.dtype == codes.dtype == torch.uint8 and packed.shape == (64, 160) and codes.shape == (64, 10, 2)
    scale, offset = (codes.float() * steps[:, None]).unbind(-1)  # (64, 10) each
    groups = w.view(64, -1, GROUP)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    # Asymmetric: the grid -offset + scale * (0..15) spans the group, 0 included, and no wider
    # than the codes' rounding up needs.
    assert (-offset <= lo + 1e-5).all() and (15 * scale - offset >= hi - 1e-5).all()  # (float32 rounding)
    assert (offset <= -lo + steps[:, 1:] + 1e-6).all() and (scale <= (hi + offset) / 15 + steps[:, :1] + 1e-6).all()
    step = scale.repeat_interleave(GROUP, 1)
    assert ((w - dequantize(t, torch.float32)).abs() <= step * (0.5 + 1e-5)).all()  # half a step, every weight
    assert (dequantize(t, torch.float32)[3] == 0).all()
    # Packing, worked by hand: the even column in the low nibble, the odd one in the high nibble.
    q = torch.round((groups + offset[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(64, -1)
    assert torch.equal(packed & 15, q[:, 0::2]) and torch.equal(packed >> 4, q[:, 1::2])
    scale64, offset64 = (codes.double() * steps.double()[:, None]).unbind(-1)
    unpacked = dequantize({"weight": packed, "codes": codes, "steps": steps}, torch.float64)
    assert torch.equal(unpacked, (q.double().view(64, -1, GROUP) * scale64[..., None]
                                  - offset64[..., None]).view(64, -1))  # exact, in a wider dtype too


def test_quantizing_refuses_a_width_that_is_not_a_multiple_of_the_group():
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(torch.randn(4, 48))


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A random checkpoint stored in bfloat16, as every Qwen3 release ships."""
    return make_checkpoint(tmp_path_factory.mktemp("bf16"), layers=3, dtype=torch.bfloat16)


def test_bf16_as_shipped_with_fp32_compute_equals_the_fp32_reference(bf16_model):
    ours = Embedder.from_pretrained(bf16_model, device="cpu", dtype="float32", quantize="none")
    q_proj = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, StoredLinear) and q_proj.weight.dtype == torch.bfloat16  # half a float32 copy
    tok = transformers.AutoTokenizer.from_pretrained(bf16_model)
    ref = transformers.AutoModel.from_pretrained(bf16_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        expected = F.normalize(ref(**tok(TEXTS, padding=True, return_tensors="pt")).last_hidden_state[:, -1], dim=-1)
    assert (ours.encode(TEXTS, progress=False) - expected).abs().max().item() <= 1e-5  # bf16 -> fp32 is exact


def heavy_tailed(folder, out):
    """The same checkpoint with Student-t weights (3 degrees of freedom: a few entries 10x the
    typical one), and in every o_proj and down_proj 3 output channels 10x larger: the residual
    stream's outlier features ("massive activations") of real LLMs."""
    out = shutil.copytree(folder, out)
    state = load_file(out / "model.safetensors")
    torch.manual_seed(1)
    for key, w in state.items():
        if w.ndim == 2:
            t = torch.distributions.StudentT(3.0).sample(w.shape) / (3 * w.shape[1]) ** 0.5  # unit-variance outputs
            if key.endswith(("o_proj.weight", "down_proj.weight")):
                t[torch.randperm(w.shape[0])[:3]] *= 10
            state[key] = t.to(w.dtype)
    save_file(state, str(out / "model.safetensors"))
    return out


def outlier_inputs(folder, out):
    """The same checkpoint with 3 input channels of every linear layer 10x larger: the columns that
    read the residual stream's outlier features. One scale per row followed them and coarsened the
    whole row (cosine 0.98945 measured with per-row int8); a scale per group of 32 confines them."""
    out = shutil.copytree(folder, out)
    state = load_file(out / "model.safetensors")
    torch.manual_seed(2)
    for key, w in state.items():
        if w.ndim == 2 and "embed" not in key:
            w = w.float()
            w[:, torch.randperm(w.shape[1])[:3]] *= 10
            state[key] = w.to(torch.bfloat16)
    save_file(state, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("fmt, weights_kind, min_cosine", [
    ("int8", "random", 0.999), ("int8", "heavy-tailed", 0.99), ("int8", "outlier inputs", 0.95),
    ("int4", "random", 0.85)])
def test_quantized_vectors_agree_with_as_shipped(bf16_model, tmp_path, fmt, weights_kind, min_cosine):
    """Min cosine per text against as shipped, measured on this 3-layer, 64-wide model (float32),
    the pessimistic case: an untrained network amplifies every layer's noise, and its rows are
    only 2 or 3 groups wide, so a scale per group confines an outlier little more than a scale per
    row did. int8 per group: 0.99950 random (per row: 0.99939), 0.99557 heavy-tailed (0.99576),
    0.96792 with outlier inputs. int4: 0.90580 on random weights (0.939 at the 0.6B's width over 4
    layers; README, "Quantized weights"). The bounds hold these measurements with a margin, and
    fail if a layer lost its scales."""
    folder = {"random": lambda: bf16_model, "heavy-tailed": lambda: heavy_tailed(bf16_model, tmp_path / "heavy"),
              "outlier inputs": lambda: outlier_inputs(bf16_model, tmp_path / "outliers")}[weights_kind]()
    texts = TEXTS + [t.upper() for t in TEXTS]
    shipped = Embedder.from_pretrained(folder, device="cpu", dtype="float32", quantize="none")
    quantized = Embedder.from_pretrained(folder, device="cpu", dtype="float32", quantize=fmt)
    assert isinstance(quantized.model.layers[0].mlp.down_proj, StoredLinear) and quantized.weight_format == fmt
    cos = cosines(shipped.encode(texts, progress=False), quantized.encode(texts, progress=False))
    print(f"{weights_kind} weights: {fmt} vs as shipped, min cosine {cos.min():.5f}")
    assert cos.min() >= min_cosine


def test_int4_keeps_the_embedding_table_and_v_proj_in_int8(tiny):
    model = Embedder.from_pretrained(tiny, device="cpu", dtype="float32", quantize="int4").model
    buffers = lambda m: {n: t.dtype for n, t in m.named_buffers()}
    assert buffers(model.embed_tokens) == {"weight": torch.int8, "scale": torch.float16}
    assert buffers(model.layers[1].self_attn.v_proj) == {"weight": torch.int8, "scale": torch.float16}
    assert buffers(model.layers[1].self_attn.q_proj) == {"weight": torch.uint8, "codes": torch.uint8,
                                                         "steps": torch.float32}
    tensors = weights.checkpoint_tensors(tiny)
    assert weights.weight_bytes(tensors, "int4", torch.float32) < weights.weight_bytes(tensors, "int8", torch.float32)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_lora_gradients_on_a_quantized_base_equal_those_on_the_dequantized_weights(tiny, fmt):
    """QLoRA: adapters on a frozen int8 or int4 base get the gradients of the same adapters on a
    float32 copy of the dequantized weights (the base's input gradient is recomputed in backward)."""
    quantized = Embedder.from_pretrained(tiny, device="cpu", dtype="float32", quantize=fmt)
    full = Embedder.from_pretrained(tiny, device="cpu", dtype="float32", quantize="none")
    with torch.no_grad():  # the float32 model gets exactly the quantized model's weights
        stored = dict(quantized.model.named_modules())
        for name, module in full.model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(dequantize(dict(stored[name].named_buffers()), torch.float32))
    grads = []
    for model in (quantized, full):
        torch.manual_seed(0)
        add_lora(model.model, rank=4, alpha=8, targets=["q", "v", "down", "gate"])
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in adapters(model.model).items():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        ids = model.tokenize(TEXTS)
        lengths = torch.tensor([len(i) for i in ids])
        h = model.model(torch.tensor([t for i in ids for t in i]), lengths)
        model.pool(h, lengths, "last", None, True).square().sum().backward()
        grads.append({n: p.grad for n, p in adapters(model.model).items()})
    for name, g in grads[1].items():
        assert g.abs().max() > 0
        assert ((grads[0][name] - g).norm() / g.norm()).item() <= 1e-5, name


@pytest.mark.parametrize("fmt", ["int8", "int4", "none"])
def test_a_lora_step_on_a_stored_base_saves_activations_only(bf16_model, fmt):
    """No weight-sized tensor is kept for the backward pass: the stored base converts its weight
    again there (weights.Dequantize). "none" here is bf16 as shipped computed in float32, which
    converts too. Checked on every tensor autograd saves, with saved_tensors_hooks."""
    model = Embedder.from_pretrained(bf16_model, device="cpu", dtype="float32", quantize=fmt)
    add_lora(model.model, rank=2, alpha=4, targets=list(lora.TARGETS))
    weight_sizes = {m.out_features * m.in_features for m in model.model.modules() if isinstance(m, StoredLinear)}
    ids = model.tokenize(TEXTS[:2])
    lengths = torch.tensor([len(i) for i in ids])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = model.model(torch.tensor([t for i in ids for t in i]), lengths)
        loss = model.pool(h, lengths, "last", None, True).square().sum()
    loss.backward()
    assert saved and all(p.grad is not None for p in adapters(model.model).values())
    big = [tuple(t.shape) for t in saved if t.numel() in weight_sizes and t.shape[0] != lengths.sum()]
    assert not big, big  # before weights.Dequantize: every layer's float32 weight was among them


def test_the_streamed_reference_equals_the_model_as_shipped_holding_one_block(bf16_model, monkeypatch):
    shipped = Embedder.from_pretrained(bf16_model, device="cpu", dtype="float32", quantize="none")
    ids = shipped.tokenize(TEXTS)
    lengths = torch.tensor([len(i) for i in ids])
    flat = [t for i in ids for t in i]
    config = shipped.model.config
    loaded = []  # weakrefs to every block (or norm) the reference loads: at most one alive at a time
    original = weights.load_stored

    def counting(model, *args, **kw):
        original(model, *args, **kw)
        if isinstance(model, Qwen3Model):  # a whole model (the quantized one, beside the reference)
            return
        loaded.append(weakref.ref(model))
        gc.collect()
        alive = [m() for m in loaded if m() is not None]
        assert len(alive) <= 1, [type(m).__name__ for m in alive]
    monkeypatch.setattr(weights, "load_stored", counting)
    for layer in (None, 2):
        with torch.no_grad():
            want = shipped.model(torch.tensor(flat), lengths, return_layers=True)
        want = want[0] if layer is None else want[1][layer]
        # One run of texts: the model's own batch, to 1e-6. Several: other batches, so other matmul
        # blockings, to the batch invariance the suite holds everywhere (1e-5).
        for max_tokens, tolerance in ((2048, 1e-6), (40, 1e-5)):
            got = weights.streamed_states(bf16_model, config, ids, torch.device("cpu"), torch.float32, layer,
                                             max_tokens)
            assert (got - want).abs().max().item() <= tolerance
    assert len(loaded) == 2 * (3 + 1) + 2 * 2  # 3 blocks and the norm, then 2 blocks; twice each
    int8 = Embedder.from_pretrained(bf16_model, device="cpu", dtype="float32", quantize="int8")
    cos = int8.fidelity(TEXTS)  # the same measurement as encoding with both models
    assert torch.allclose(cos, cosines(int8.encode(TEXTS, progress=False), shipped.encode(TEXTS, progress=False)),
                          atol=1e-6)
    assert torch.allclose(shipped.fidelity(TEXTS), torch.ones(len(TEXTS)), atol=1e-6)


# ----------------------------------------------------------------------------- choosing a format

def eight_b_tensors():
    """Qwen3-8B's tensors as its safetensors headers list them (bf16, LLM layout without lm_head)."""
    s = SHAPES["8b"]
    h, inter, q, kv = s["hidden"], s["intermediate"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    tensors = {"embed_tokens.weight": ([151936, h], torch.bfloat16), "norm.weight": ([h], torch.bfloat16)}
    for i in range(s["layers"]):
        for name, shape in (("q_proj", [q, h]), ("k_proj", [kv, h]), ("v_proj", [kv, h]), ("o_proj", [h, q]),
                            ("gate_proj", [inter, h]), ("up_proj", [inter, h]), ("down_proj", [h, inter]),
                            ("q_norm", [s["head_dim"]]), ("k_norm", [s["head_dim"]]), ("input_layernorm", [h]),
                            ("post_attention_layernorm", [h])):
            tensors[f"layers.{i}.{name}.weight"] = (shape, torch.bfloat16)
    config = Qwen3Config(151936, h, s["layers"], s["heads"], s["kv_heads"], s["head_dim"], inter, 1e-6, 1e6)
    return tensors, config


def test_auto_keeps_as_shipped_then_int8_then_int4_then_says_nothing_fits():
    tensors, config = eight_b_tensors()
    params = sum(math.prod(shape) for shape, _ in tensors.values())
    assert round(params / 1e9, 2) == 7.57  # Qwen3-8B without its lm_head
    # Bytes worked by hand: int8 1 B + a 2 B scale per 32 weights; int4 half a byte + two 1 B codes
    # per 32 + 8 B per row; int4 keeps the embedding table and v_proj in int8.
    eight = [k for k in tensors if k.endswith(("embed_tokens.weight", "v_proj.weight"))]
    n = {k: math.prod(shape) for k, (shape, _) in tensors.items() if len(shape) == 2}
    vectors = sum(math.prod(shape) for shape, _ in tensors.values() if len(shape) == 1) * 4
    int4 = sum(v * 17 / 16 if k in eight else v * 9 / 16 + tensors[k][0][0] * 8 for k, v in n.items()) + vectors
    assert weights.weight_bytes(tensors, "int4", torch.float32) == int4
    assert round(weights.bits_per_weight(tensors, "int4"), 1) == 4.9 and weights.bits_per_weight(tensors, "int8") == 8.5
    choose = lambda gb, dtype=torch.float32: weights.choose_format("auto", tensors, config, dtype, 2048,
                                                                    (int(gb * 1e9), f"{gb} GB here"))
    fmt, line = choose(24)  # a 24 GB CPU box without native bf16: bf16 kept, not widened to 30 GB of fp32
    assert fmt == "none" and line.startswith("weights: as shipped, bfloat16, 15.1 GB, computing in float32 "
                                             "(24 GB here)")
    fmt, line = choose(14)  # a T4's budget
    assert fmt == "int8" and line == ("weights: int8, 8.0 GB, computing in float32 (as shipped they need "
                                      "15.1 GB; 14 GB here)")
    fmt, line = choose(7)  # an 8 GB card's
    assert fmt == "int4" and line == ("weights: int4 (embed_tokens and v_proj in int8), 4.7 GB, computing in "
                                      "float32 (as shipped they need 15.1 GB; int8 they need 8.0 GB; 7 GB here)")
    # float32 weights computed in bfloat16: what is stored, what is kept, what it computes in
    wide = {k: (shape, torch.float32) for k, (shape, _) in tensors.items()}
    line = weights.choose_format("auto", wide, config, torch.bfloat16, 2048, (int(64e9), "64 GB here"))[1]
    assert line.startswith("weights: stored float32, kept in bfloat16 (converted while loading), 15.1 GB, "
                           "computing in bfloat16 (64 GB here)")
    with pytest.raises(ValueError, match=r"^the model does not fit: its weights need 15.1 GB bfloat16 as shipped, "
                                         r"8.0 GB in int8 or 4.7 GB in int4, plus \d.\d GB for a batch; 4 GB here$"):
        choose(4)
    assert weights.choose_format("none", tensors, config, torch.float32, 2048, (int(24e9), ""))[0] == "none"
    with pytest.raises(ValueError, match=r"\(--quantize int8\)$"):
        weights.choose_format("int8", tensors, config, torch.float32, 2048, (int(7e9), "7 GB here"))


def test_the_weight_format_is_decided_once_per_run_and_recorded(tmp_path, tiny, monkeypatch):
    """train.py: one decision, with --max-memory, that the loader takes as it is; the checkpoint
    records it and its fidelity; evaluate.py reuses it, and finds the vectors in the cache."""
    decisions = []
    original = weights.choose_format
    monkeypatch.setattr(weights, "choose_format", lambda *a: decisions.append(a[0]) or original(*a))
    data = write_csv(tmp_path / "train.csv")
    lines = []
    train.main(train.parse_args(["--data", str(data), "--model", str(tiny), *PINNED, "--quantize", "int4",
                                 "--max-memory", "8", "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
                                 "--hidden", "8", "8", "--quiet", "--fidelity-texts", "5",
                                 "--out", str(tmp_path / "run")]), log=lines.append)
    assert decisions == ["int4"]
    fidelity = [line for line in lines if line.startswith("int4 vs as shipped on 5 of these texts: cosine min")]
    assert len(fidelity) == 1, lines
    meta = evaluate.load_checkpoint(tmp_path / "run")[1]["embedding"]
    assert meta["weights"] == "int4" and meta["fidelity"]["texts"] == 5 and 0 < meta["fidelity"]["min"] <= 1
    spec = json.loads(next((tmp_path / "cache").glob("*/spec.json")).read_text())
    assert spec["weights"] == "int4-g32" and spec["fidelity"] == meta["fidelity"]
    calls = count_forward_passes(monkeypatch)
    evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "run"), "--data", str(data), "--device", "cpu",
                                       "--cache-dir", str(tmp_path / "cache"), "--quiet"]))
    assert not calls and decisions == ["int4", "int4"]  # the checkpoint's format, from the cache


def test_max_memory_too_small_stops_before_any_weight_is_read(tmp_path, tiny, monkeypatch):
    def no_read(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(qwen_embed, "safe_open", no_read)  # the one reader of weights
    with pytest.raises(ValueError, match="the model does not fit.*--max-memory 0.001"):
        Embedder.from_pretrained(tiny, device="cpu", max_memory=0.001)
    data = write_csv(tmp_path / "train.csv")
    message = cli_error(train, ["--data", str(data), "--model", str(tiny), *PINNED, "--max-memory", "0.001",
                                "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(tmp_path / "out")])
    assert "the model does not fit" in message and not (tmp_path / "out").exists()


def test_memory_budget_follows_the_device_and_the_ranks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (6_000_000_000, 16_000_000_000))
    assert runtime.memory_budget(torch.device("cuda")) == (6_000_000_000, "cuda has 6.0 GB free")
    monkeypatch.setattr(runtime, "host_available", lambda: 24_000_000_000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.memory_budget(torch.device("cpu")) == (
        6_000_000_000, "this machine has 6.0 GB of RAM available, shared by 4 processes")
    assert runtime.memory_budget(torch.device("cpu"), 14) == (14_000_000_000, "--max-memory 14")
    assert runtime.memory_budget(torch.device("cuda")) == (6_000_000_000, "cuda has 6.0 GB free")  # a GPU per rank
    monkeypatch.setattr(torch.xpu, "mem_get_info", lambda device: (3_000_000_000, 8_000_000_000))
    assert runtime.memory_budget(torch.device("xpu")) == (3_000_000_000, "xpu has 3.0 GB free")  # not the host's RAM


# ----------------------------------------------------------------------------- dtype and device

def test_compute_dtype_by_device(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # P100 (6.0): float32; V100 (7.0) and T4 (7.5): float16 tensor cores, no bf16: guarded float16
    for capability, dtype in (((6, 0), torch.float32), ((6, 1), torch.float32), ((7, 0), torch.float16),
                              ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert runtime.default_dtype(cuda) == dtype, capability
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda n=native: n)
        assert runtime.default_dtype(cpu) == dtype
    assert runtime.default_dtype(torch.device("mps")) == torch.float32


class DeviceMixing(TorchDispatchMode):
    """Records every op that mixes a meta tensor with a tensor elsewhere (a copy to the device aside)."""

    def __init__(self):
        super().__init__()
        self.mixed = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor) and t.dim() > 0]
        devices = {t.device.type for t in tensors}
        if "meta" in devices and len(devices) > 1 and "copy" not in func.__name__:
            self.mixed.append((func.__name__, devices))
        return out


@pytest.mark.parametrize("fmt", ["none", "int8", "int4"])
def test_every_tensor_of_a_forward_is_on_the_model_device(tiny, fmt):
    """A forward pass and pooling on the meta device: any tensor built on the host and used with
    the model's (ids, positions, offsets, pooling indices) would mix devices, as it would on mps."""
    config = Qwen3Config.from_json(tiny / "config.json")
    with torch.device("meta"):
        model = Qwen3Model(config)
        if fmt != "none":
            stored = {}
            for name, module in model.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    w = torch.randn(module.weight.shape, device="cpu")  # quantized for real, then on meta
                    quantize = quantize_int4 if fmt == "int4" and isinstance(module, torch.nn.Linear) else quantize_int8
                    stored[f"{name}.weight"] = {k: t.to("meta") for k, t in quantize(w).items()}
            weights.apply_format(model, stored, torch.float32)
    lengths = torch.tensor([5, 1, 3])
    with DeviceMixing() as mode:
        final, layers = model(torch.zeros(9, dtype=torch.long, device="meta"), lengths, return_layers=True)
        for pooling in ("last", "mean"):
            v = Embedder.pool(layers[1], lengths, pooling, None, True)
    assert final.device.type == v.device.type == "meta" and v.shape == (3, config.hidden_size)
    assert not mode.mixed, mode.mixed


def test_evaluate_computes_in_the_training_dtype(tmp_path, tiny, monkeypatch, capsys):
    data = write_csv(tmp_path / "train.csv")
    base = ["--data", str(data), "--model", str(tiny), "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--epochs", "1", "--hidden", "8", "8", "--quiet"]
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    train.main(train.parse_args(base + ["--out", str(tmp_path / "run")]), log=lambda *_: None)
    meta = evaluate.load_checkpoint(tmp_path / "run")[1]["embedding"]
    assert meta["dtype"] == "float32" and meta["weights"] == "none"  # resolved, never null
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # now a machine whose default is bf16
    calls = count_forward_passes(monkeypatch)
    evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "run"), "--data", str(data), "--device", "cpu",
                                       "--cache-dir", str(tmp_path / "cache"), "--quiet"]))
    assert not calls  # the float32 vectors of training, from the cache: not bf16 ones computed afresh
    assert "computing in float32 as in training, though cpu's default here is bfloat16" in capsys.readouterr().out


# ----------------------------------------------------------------------------- batches

def test_plan_batches_sorts_and_respects_the_budget_and_the_text_cap():
    lengths = [5, 3, 9, 2, 30, 4]
    # Worked by hand: shortest first, 2 + 3 + 4 = 9 <= 10, + 5 would be 14; 5 + 9 = 14 > 10; 30 alone.
    assert plan_batches(lengths, 10) == [[3, 1, 5], [0], [2], [4]]
    assert plan_batches(lengths, 10, max_texts=2) == [[3, 1], [5, 0], [2], [4]]
    assert plan_batches(lengths, 1000) == [[3, 1, 5, 0, 2, 4]]
    assert plan_batches(lengths, 1) == [[3], [1], [5], [0], [2], [4]]  # every text longer than the budget: alone
    assert plan_batches([], 10) == []


def test_default_token_budget_follows_the_free_memory_and_the_model(tiny, monkeypatch):
    c = Qwen3Config.from_json(tiny / "config.json")  # hidden 64, MLP 96, 4 query and 2 kv heads of 32
    per_token = 2 * (8 * 64 + 3 * 96 + 4 * (4 + 2 * 2) * 32)  # bf16 activations of one layer, worked by hand
    cuda = torch.device("cuda")
    for free, expected in ((3 * per_token * 5000, 5000), (3 * per_token * 9000, 9000), (10, 1024), (10**15, 65536)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (f, 2 * f))
        assert runtime.default_batch_tokens(c, cuda, torch.bfloat16) == expected, free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * (per_token + 2 * 4 * 64) * 7000, 0))
    assert runtime.default_batch_tokens(c, cuda, torch.bfloat16, keep_layers=True) == 7000  # 4 kept states of 64
    assert runtime.default_batch_tokens(c, torch.device("cpu"), torch.float32) == 2048
