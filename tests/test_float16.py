"""Guarded float16 (weights.guard_float16): each guard proven needed on CPU, on random checkpoints
with massive activations planted the way trained LLMs grow them. Plain float16 gives Inf or NaN on
each planted case (asserted, so the test has power); the guarded path stays within cosine 0.9995 of
float32 with the same weights (as shipped, int8 or int4)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from at_scale import embed_cache
from at_scale import runtime
import train
from helpers import write_csv
from at_scale.embedder import Embedder
from qwen_embed import Qwen3Config, Qwen3Model, load_tokenizer, load_weights, tokenize
from tools.random_checkpoint import make_checkpoint
from at_scale.weights import Float16Linear, power_of_two_at_least

TEXTS = ["Question: what fraction of the shape is not shaded? I think one third",
         "Question: 0.25 + 0.5 and why the decimal point moves",
         "Question: a common misconception! the student adds the numerators"]
FP16_MAX = torch.finfo(torch.float16).max  # 65,504


def test_power_of_two_scales_are_exact_and_bound_the_value():
    t = torch.tensor([0.0, 1e-30, 0.3, 1.0, 1.5, 65504.0, 3e8, 1e30])
    s = power_of_two_at_least(t)
    assert torch.equal(s[0], torch.tensor(1.0))
    assert (s[1:] >= t[1:]).all() and (s[1:] <= 2 * t[1:]).all()
    assert torch.equal(torch.log2(s), torch.log2(s).round())  # powers of two: division is exact


def test_the_scaled_matmul_on_inputs_up_to_1e8():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 256, generator=g) * torch.logspace(0, 8, 9)[:, None]  # rows of 1 .. 1e8
    linear = nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(128, 256, generator=g) * 0.05)
    exact = x.double() @ linear.weight.double().T
    plain = F.linear(x.half(), linear.weight.half()).float()
    assert not torch.isfinite(plain[-3:]).any()  # float16 alone: the rows past 65,504 are Inf
    got = Float16Linear(linear)(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # float16's rounding of x and W (2^-11 each), relative to the largest output of the row
    err = (got.double() - exact).abs().amax(1) / exact.abs().amax(1)
    assert err.max() < 4e-3, err


# ----------------------------------------------------------------------------- planted activations

def planted(folder, case, token_id, layer=0):
    """Plant a massive activation in layer `layer`'s MLP for the texts' shared first token: its
    embedding gets a channel c0 far larger than the rest (in range itself), and MLP neuron j reads that channel
    (gate and up) and writes channel c1 (down), as trained LLMs' massive activations arise.
    residual: silu(gate) * up in range, times a down weight of 5000: the residual stream's channel
      c1 more than 4x float16's largest for that token (checked in float32 by check_planted).
    intermediate: silu(gate) * up more than 4x float16's largest for that token, times a down
      weight of 1e-3: the residual stream stays in range."""
    file = folder / "model.safetensors"
    t = load_file(file)
    hidden = t["embed_tokens.weight"].shape[1]
    c0, c1, j = 3, 5, 7
    # 4 sqrt(hidden): the channel dominates the token's residual stream (whose other channels and
    # the first attention's output have an RMS near 1), so its RMSNorm'd value is near sqrt(hidden)
    t["embed_tokens.weight"][token_id, c0] = 4 * hidden ** 0.5
    p = f"layers.{layer}.mlp."
    # after the RMSNorm the token's channel c0 is about sqrt(hidden) times the norm weight
    normed = hidden ** 0.5 * float(t[f"layers.{layer}.post_attention_layernorm.weight"][c0])
    gate, up, down = {"residual": (2.0, 1.0, 5000.0), "intermediate": (100.0, 100.0, 1e-3)}[case]
    for name, scale in (("gate_proj", gate), ("up_proj", up)):
        t[p + name + ".weight"][j] = 0.0
        t[p + name + ".weight"][j, c0] = scale * 8 / normed  # the token's gate, up: 8 x scale
    t[p + "down_proj.weight"][:, j] = 0.0
    t[p + "down_proj.weight"][c1, j] = down
    save_file(t, str(file))
    return folder


@torch.no_grad()
def plain_float16_states(folder, ids):
    """The forward pass in plain float16, weights and activations: what the guard exists to avoid.
    Returns (final states, every layer's residual stream, the MLP intermediates of layer 0)."""
    config = Qwen3Config.from_json(folder / "config.json")
    with torch.device("meta"):
        model = Qwen3Model(config)
    load_weights(model, folder, torch.device("cpu"), torch.float16)
    inner = []
    mlp = model.layers[0].mlp
    mlp.down_proj.register_forward_pre_hook(lambda m, a: inner.append(a[0].float()))
    flat = torch.tensor([i for row in ids for i in row])
    final, layers = model(flat, torch.tensor([len(row) for row in ids]), return_layers=True)
    return final, layers, inner[0]


@torch.no_grad()
def float32_states(folder, ids, fmt="none"):
    """The same in float32, with the weights in fmt: (final, layers, layer 0's MLP intermediate)."""
    embedder = Embedder.from_pretrained(folder, device="cpu", dtype="float32", quantize=fmt)
    inner = []
    embedder.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: inner.append(a[0]))
    flat = torch.tensor([i for row in ids for i in row])
    final, layers = embedder.model(flat, torch.tensor([len(row) for row in ids]), return_layers=True)
    return final, layers, inner[0]


def check_planted(folder, case, fmt):
    """Plain float16 fails on the planted case; guarded float16 matches float32 on the same
    weights. Returns (min cosine, the planted activation's size in float32)."""
    tokenizer = load_tokenizer(folder)
    ids = tokenize(tokenizer, TEXTS)
    _, layers32, inner32 = float32_states(folder, ids, fmt)
    residual = max(layer.abs().max().item() for layer in layers32)
    if case == "residual":  # the residual stream past float16, the MLP intermediates in range
        assert residual > 4 * FP16_MAX and inner32.abs().max() < FP16_MAX / 4
    else:  # an MLP intermediate past float16, the residual stream in range
        assert inner32.abs().max() > 4 * FP16_MAX and residual < FP16_MAX / 4
    if fmt == "none":  # plain float16 gives Inf or NaN: the guard is needed (power)
        final16, _, _ = plain_float16_states(folder, ids)
        assert not torch.isfinite(final16).all()
    reference = Embedder.from_pretrained(folder, device="cpu", dtype="float32", quantize=fmt)
    guarded = Embedder.from_pretrained(folder, device="cpu", dtype="float16", quantize=fmt)
    a, b = (m.encode(TEXTS, progress=False) for m in (reference, guarded))
    assert torch.isfinite(b).all()
    cosine = (a * b).sum(-1).min().item()
    assert cosine >= 0.9995, (case, fmt, cosine)
    return cosine, max(residual, inner32.abs().max().item())


@pytest.fixture(scope="module")
def first_token(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("tok"))
    ids = tokenize(load_tokenizer(folder), TEXTS)
    assert len({row[0] for row in ids}) == 1  # every text starts with the same token
    return ids[0][0]


@pytest.mark.parametrize("case", ["residual", "intermediate"])
@pytest.mark.parametrize("fmt", ["none", "int8", "int4"])
def test_planted_massive_activations_tiny(tmp_path, first_token, case, fmt):
    folder = planted(make_checkpoint(tmp_path / "m", layers=3, hidden=128, heads=4, kv_heads=2,
                                     head_dim=32, intermediate=256), case, first_token)
    check_planted(folder, case, fmt)


@pytest.mark.parametrize("case", ["residual", "intermediate"])
@pytest.mark.slow
def test_planted_massive_activations_at_the_8b_width(tmp_path_factory, first_token, case):
    """Hidden 4096, 32 heads of 128, 8 key/value heads, MLP 12288 (the 8B's), 2 layers, bf16 as
    shipped; then int8 and int4."""
    folder = planted(make_checkpoint(tmp_path_factory.mktemp(f"w8b-{case}"), layers=2, hidden=4096,
                                     heads=32, kv_heads=8, head_dim=128, intermediate=12288,
                                     dtype=torch.bfloat16), case, first_token)
    for fmt in ("none", "int8", "int4"):
        check_planted(folder, case, fmt)


# ----------------------------------------------------------------------------- choosing float16

def test_float16_through_train_says_what_it_is_and_keys_its_own_cache(tmp_path, tiny):
    data = write_csv(tmp_path / "train.csv", n=12)
    argv = ["--data", str(data), "--model", str(tiny), "--device", "cpu", "--cache-dir",
            str(tmp_path / "cache"), "--epochs", "1", "--hidden", "8", "8", "--quiet"]
    said = []
    train.main(train.parse_args(argv + ["--dtype", "float32"]), log=said.append)
    said.clear()
    train.main(train.parse_args(argv + ["--dtype", "float16"]), log=said.append)
    assert runtime.FLOAT16_LINE in said and any("computing 12" in line for line in said)
    assert len([d for d in (tmp_path / "cache").iterdir() if d.is_dir()]) == 2  # float32's apart


def test_a_t4_default_run_computes_afresh_in_float16_and_says_so_once(tmp_path, tiny, monkeypatch):
    """A T4 (7.5) defaulted to float32 before: its float32 cache stays valid for --dtype float32,
    and the default run now says it computes in float16 (simulated: the 'cuda' device is the CPU)."""
    texts = ["one", "two", "three"]
    kw = dict(cache_dir=tmp_path, progress=False, device="cpu")
    embed_cache.embed(texts, str(tiny), dtype="float32", log=lambda _: None, **kw)
    monkeypatch.setattr(runtime, "default_dtype", lambda device: torch.float16)
    said = []
    embed_cache.embed(texts, str(tiny), log=said.append, **kw)
    assert sum("float16 is this GPU's default now" in line for line in said) == 1
    said.clear()
    embed_cache.embed(texts, str(tiny), dtype="float32", log=said.append, **kw)
    assert "no forward pass" in said[0]
