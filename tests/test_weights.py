"""Weights as shipped or in int8 (weights.py), the memory budget, the dtype by device, any device,
batch planning (runtime.py, qwen_embed.plan_batches)."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import evaluate
import qwen_embed
import runtime
import train
import weights
from helpers import PINNED, TEXTS, cli_error, count_forward_passes, write_csv
from lora import adapters, add_lora
from qwen_embed import Qwen3Config, Qwen3Embedder, Qwen3Model, plan_batches
from random_checkpoint import SHAPES, make_checkpoint
from weights import StoredLinear, dequantize, quantize_int8


def cosines(a, b):
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


# ----------------------------------------------------------------------------- int8

def test_int8_round_trip_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.rand(64, 1, generator=g) * 3  # rows of different scales
    w[3] = 0          # an all-zero row
    w[5, 7] = 40.0    # an outlier: only its own row's step grows
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and int(q.abs().max()) == 127
    assert torch.allclose(scale, w.abs().amax(1) / 127)  # symmetric, per output channel
    half_step = scale[:, None] * (0.5 + 1e-5)  # (1e-5: float32 rounding of w / scale)
    assert ((w - dequantize(q, scale)).abs() <= half_step).all()
    assert not q[3].any() and (dequantize(q, scale)[3] == 0).all()
    bf16 = w.to(torch.bfloat16)  # as shipped: quantizing the shipped bf16 works the same
    q, scale = quantize_int8(bf16)
    assert ((bf16.float() - dequantize(q, scale)).abs() <= scale[:, None] * (0.5 + 1e-5)).all()


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A random checkpoint stored in bfloat16, as every Qwen3 release ships."""
    return make_checkpoint(tmp_path_factory.mktemp("bf16"), layers=3, dtype=torch.bfloat16)


def test_bf16_as_shipped_with_fp32_compute_equals_the_fp32_reference(bf16_model):
    ours = Qwen3Embedder.from_pretrained(bf16_model, device="cpu", dtype="float32", quantize="none")
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


@pytest.mark.parametrize("weights_kind, min_cosine", [("random", 0.999), ("heavy-tailed", 0.99)])
def test_int8_vectors_agree_with_as_shipped(bf16_model, tmp_path, weights_kind, min_cosine):
    """Measured on this 3-layer, 64-wide model: 0.99939 on random weights, 0.99576 on heavy-tailed
    ones (coarser steps: a row's scale follows its largest entry), so heavy tails get 0.99 here;
    the README lists more weight distributions."""
    folder = bf16_model if weights_kind == "random" else heavy_tailed(bf16_model, tmp_path / "heavy")
    texts = TEXTS + [t.upper() for t in TEXTS]
    shipped = Qwen3Embedder.from_pretrained(folder, device="cpu", dtype="float32", quantize="none")
    int8 = Qwen3Embedder.from_pretrained(folder, device="cpu", dtype="float32", quantize="int8")
    assert isinstance(int8.model.layers[0].mlp.down_proj, StoredLinear) and int8.weight_format == "int8"
    cos = cosines(shipped.encode(texts, progress=False), int8.encode(texts, progress=False))
    print(f"{weights_kind} weights: int8 vs as shipped, min cosine {cos.min():.5f}")
    assert cos.min() >= min_cosine


def test_lora_gradients_on_int8_equal_those_on_the_dequantized_weights(tiny):
    """QLoRA: adapters on a frozen int8 base get the gradients of the same adapters on a float32
    copy of the dequantized weights."""
    int8 = Qwen3Embedder.from_pretrained(tiny, device="cpu", dtype="float32", quantize="int8")
    full = Qwen3Embedder.from_pretrained(tiny, device="cpu", dtype="float32", quantize="none")
    with torch.no_grad():  # the float32 model gets exactly the int8 model's weights
        stored = dict(int8.model.named_modules())
        for name, module in full.model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(dequantize(stored[name].weight, stored[name].scale))
    grads = []
    for model in (int8, full):
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


def test_auto_keeps_as_shipped_then_int8_then_says_nothing_fits():
    tensors, config = eight_b_tensors()
    params = sum(math.prod(shape) for shape, _ in tensors.values())
    assert round(params / 1e9, 2) == 7.57  # Qwen3-8B without its lm_head
    choose = lambda gb, dtype=torch.float32: weights.choose_format("auto", tensors, config, dtype, 2048,
                                                                    (int(gb * 1e9), f"{gb} GB here"))
    fmt, line = choose(24)  # a 24 GB CPU box without native bf16: bf16 kept, not widened to 30 GB of fp32
    assert fmt == "none" and line.startswith("weights: as shipped, bfloat16, 15.1 GB (24 GB here)")
    fmt, line = choose(14)  # a T4's budget
    assert fmt == "int8" and line.startswith("weights: int8, 7.6 GB (as shipped they need 15.1 GB; 14 GB here)")
    with pytest.raises(ValueError, match=r"^the model does not fit: its weights need 15.1 GB bfloat16 as shipped or "
                                         r"7.6 GB in int8, plus \d.\d GB for a batch; 4 GB here$"):
        choose(4)
    assert weights.choose_format("none", tensors, config, torch.float32, 2048, (int(24e9), ""))[0] == "none"


def test_max_memory_too_small_stops_before_any_weight_is_read(tmp_path, tiny, monkeypatch):
    def no_read(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(qwen_embed, "safe_open", no_read)
    with pytest.raises(ValueError, match="the model does not fit.*--max-memory 0.001"):
        Qwen3Embedder.from_pretrained(tiny, device="cpu", max_memory=0.001)
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


# ----------------------------------------------------------------------------- dtype and device

def test_compute_dtype_by_device(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for capability, dtype in (((7, 5), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert runtime.default_dtype(cuda) == dtype, capability  # a T4 (7.5) has no bf16 tensor cores
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


@pytest.mark.parametrize("fmt", ["none", "int8"])
def test_every_tensor_of_a_forward_is_on_the_model_device(tiny, fmt):
    """A forward pass and pooling on the meta device: any tensor built on the host and used with
    the model's (ids, positions, offsets, pooling indices) would mix devices, as it would on mps."""
    config = Qwen3Config.from_json(tiny / "config.json")
    with torch.device("meta"):
        model = Qwen3Model(config)
        if fmt == "int8":
            state = {}
            for name, module in model.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    state[f"{name}.weight"] = torch.empty(module.weight.shape, dtype=torch.int8)
                    state[f"{name}.scale"] = torch.empty(module.weight.shape[0])
            weights.apply_format(model, state, torch.float32)
    lengths = torch.tensor([5, 1, 3])
    with DeviceMixing() as mode:
        final, layers = model(torch.zeros(9, dtype=torch.long, device="meta"), lengths, return_layers=True)
        for pooling in ("last", "mean"):
            v = Qwen3Embedder.pool(layers[1], lengths, pooling, None, True)
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
