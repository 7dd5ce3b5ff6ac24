"""The CUDA path in bfloat16 and guarded float16: fidelity to the float32 reference, batch
invariance, varlen against padded attention, compiled against eager. Skipped without a GPU; run them wherever one is lent."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import fit

from at_scale import runtime
from at_scale.embedder import Embedder
from tools.random_checkpoint import CORPUS, make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Texts of 20-300 tokens, so that batches mix lengths.
MIXED_TEXTS = [" ".join(CORPUS[i % len(CORPUS)] for i in range(k, k + 1 + k % 7)) for k in range(40)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Wider than the CPU tests' model, so that bf16 rounding behaves as in a real one.
    return make_checkpoint(tmp_path_factory.mktemp("gpu"), layers=4, hidden=256, heads=8, kv_heads=4,
                           head_dim=64, intermediate=512)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The float32 transformers recipe (left padding, last token, L2), on the GPU (TF32 off by default)."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ref = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        batch = tok(MIXED_TEXTS, padding=True, return_tensors="pt").to("cuda")
        return F.normalize(ref.cuda().eval()(**batch).last_hidden_state[:, -1], dim=-1).cpu()


def cosines(a, b):
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_defaults_match_the_fp32_reference(model_dir, reference, compile):
    ours = Embedder.from_pretrained(model_dir, compile=compile)  # defaults: cuda, bfloat16
    assert ours.device.type == "cuda" and ours.dtype == torch.bfloat16
    got = ours.encode(MIXED_TEXTS, progress=False)
    assert ours.compiled == compile and ours.fast.varlen == runtime.varlen_usable(ours.device, ours.dtype)  # no fallback
    assert cosines(got, reference).min() >= 0.9995
    alone = torch.cat([ours.encode([t], progress=False) for t in MIXED_TEXTS[:8]])
    assert cosines(alone, got[:8]).min() >= 0.9999  # a text alone vs inside a batch


def test_varlen_and_padded_attention_agree(model_dir):
    if not runtime.varlen_usable(torch.device("cuda"), torch.bfloat16):
        pytest.skip(f"torch {torch.__version__} has no usable torch.nn.attention.varlen")
    ours = Embedder.from_pretrained(model_dir, compile=False)
    varlen = ours.encode(MIXED_TEXTS, progress=False)
    assert ours.fast.varlen  # did not fall back
    ours.fast.varlen = False  # forces the padded SDPA path
    padded = ours.encode(MIXED_TEXTS, progress=False)
    assert cosines(varlen, padded).min() >= 0.9999


def test_compiled_matches_eager_in_fp32(model_dir):
    eager = Embedder.from_pretrained(model_dir, dtype="float32", compile=False).encode(MIXED_TEXTS, progress=False)
    compiled = Embedder.from_pretrained(model_dir, dtype="float32", compile=True)
    got = compiled.encode(MIXED_TEXTS, progress=False)
    assert compiled.compiled and (got - eager).abs().max().item() <= 1e-5


def test_quantized_weights_agree_with_bf16_as_shipped_at_the_8b_width(tmp_path):
    """4 layers of the 8B's exact shape in bf16: int8 weights give the same vectors to cosine 0.999;
    int4 prints its figures (unmeasured on a GPU so far: on the CPU, 4 random layers of the 0.6B's
    shape gave min 0.939) and must stay near, and the fidelity measurement agrees with encoding."""
    folder = make_checkpoint(tmp_path / "m", layers=4, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                             intermediate=12288, dtype=torch.bfloat16)
    shipped = Embedder.from_pretrained(folder, quantize="none").encode(MIXED_TEXTS, progress=False)
    int8 = Embedder.from_pretrained(folder, quantize="int8").encode(MIXED_TEXTS, progress=False)
    assert cosines(shipped, int8).min() >= 0.999
    model = Embedder.from_pretrained(folder, quantize="int4")
    cos = cosines(shipped, model.encode(MIXED_TEXTS, progress=False))
    print(f"int4 vs bf16 as shipped at the 8B width: min {cos.min():.4f}, mean {cos.mean():.4f}")
    assert cos.min() >= 0.85
    assert (model.fidelity(MIXED_TEXTS) - cos).abs().max() <= 2e-3  # bf16: batches differ by rounding


def test_head_trains_on_the_gpu_with_the_same_numbers_for_the_same_seed():
    import train
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 3
    y = torch.arange(5).repeat_interleave(60)
    x = centers[y] + torch.randn(len(y), 32, generator=g)
    args = train.parse_args(["--epochs", "5", "--hidden", "64", "32", "--head-device", "cuda"])
    runs = [fit.train_head(x[::2], y[::2], x[1::2], y[1::2], list("abcde"), args)
            for _ in range(2)]
    (head_a, a), (head_b, b) = runs
    assert next(head_a.parameters()).device.type == "cpu"  # handed back on the CPU, ready to save
    a, b = a.scores, b.scores
    assert a.loss == b.loss and torch.equal(a.probs, b.probs) and a.map3 >= 0.95


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_guarded_float16_matches_the_fp32_reference(model_dir, reference, quantize):
    """What a T4 runs by default, on whatever GPU is lent: float16 tensor cores, float32 between."""
    ours = Embedder.from_pretrained(model_dir, dtype="float16", quantize=quantize, compile=False)
    assert not torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    got = ours.encode(MIXED_TEXTS, progress=False)
    fp32 = Embedder.from_pretrained(model_dir, dtype="float32", quantize=quantize).encode(
        MIXED_TEXTS, progress=False)
    assert cosines(got, fp32).min() >= 0.9995
    if quantize == "none":
        assert cosines(got, reference).min() >= 0.9995
