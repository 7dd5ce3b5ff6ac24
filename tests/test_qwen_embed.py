"""qwen_embed against the reference stack (transformers, sentence-transformers) on random weights."""

import json
import shutil

import pytest
import sentence_transformers  # the reference stack (requirements-dev.txt): a missing one fails, never skips
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from at_scale.embedder import Embedder
from qwen_embed import Qwen3Config
from helpers import TEXTS
from tools.random_checkpoint import make_checkpoint
TOL = 1e-5


@pytest.fixture(scope="module")
def ours(tiny):
    return Embedder.from_pretrained(tiny, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny):
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    model = transformers.AutoModel.from_pretrained(tiny, dtype=torch.float32, attn_implementation="sdpa").eval()
    return tok, model


def reference_run(reference, texts):
    """The official Qwen3-Embedding recipe: left padding with a mask, hidden state at the last position."""
    tok, model = reference
    assert tok.padding_side == "left"
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return batch, out


def test_hidden_states_of_every_layer_match_transformers(ours, reference):
    batch, out = reference_run(reference, TEXTS)
    ids = ours.tokenize(TEXTS)
    lengths = torch.tensor([len(i) for i in ids])
    with torch.no_grad():
        final, layers = ours.model(torch.tensor([t for i in ids for t in i]), lengths, return_layers=True)
    n_layers = ours.model.config.num_hidden_layers
    assert len(out.hidden_states) == n_layers + 1 == len(layers)
    mask = batch["attention_mask"].bool()
    # Same tokens: the reference's real tokens (left-padded) are our packed tokens, in order.
    assert batch["input_ids"][mask].tolist() == [t for i in ids for t in i]
    # transformers' last hidden state is the normed one; the others are the raw residual stream.
    for layer in range(n_layers):
        diff = (out.hidden_states[layer][mask] - layers[layer]).abs().max().item()
        assert diff <= TOL, f"layer {layer}: max abs diff {diff}"
    diff = (out.last_hidden_state[mask] - final).abs().max().item()
    assert diff <= TOL, f"final norm: max abs diff {diff}"


def test_encode_matches_reference_recipe(ours, reference):
    _, out = reference_run(reference, TEXTS)
    expected = F.normalize(out.last_hidden_state[:, -1], dim=-1)
    got = ours.encode(TEXTS, progress=False)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_encode_matches_sentence_transformers(tiny, ours):
    model = sentence_transformers.SentenceTransformer(str(tiny), device="cpu")
    expected = model.encode(TEXTS, convert_to_tensor=True, batch_size=4)
    assert (ours.encode(TEXTS, progress=False) - expected).abs().max().item() <= TOL


def test_mean_pooling_and_layers_match_reference(ours, reference):
    batch, out = reference_run(reference, TEXTS)
    m = batch["attention_mask"][..., None].float()
    expected_mean = F.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)
    assert (ours.encode(TEXTS, pooling="mean", progress=False) - expected_mean).abs().max() <= TOL
    got = ours.encode(TEXTS, layers=[1, -2], normalize=False, progress=False)
    assert set(got) == {1, -2}
    assert (got[1] - out.hidden_states[1][:, -1]).abs().max() <= TOL
    # Index -2 is the same state in both: the input of the last block. Index -1 is not: transformers'
    # hidden_states[-1] is the last layer *after* the final norm; our layer -1 is its raw output,
    # un-normed (the normed one is layer None, the default output).
    assert (got[-2] - out.hidden_states[-2][:, -1]).abs().max() <= TOL


def test_batch_invariance(ours):
    target = TEXTS[2]
    alone = ours.encode([target], progress=False)[0]
    short = ours.encode(["a", "b c", target, "d"], progress=False)[2]
    long = ours.encode([TEXTS[5], target, TEXTS[5] * 3], progress=False)[1]
    tiny_batches = ours.encode(TEXTS, batch_size=1, progress=False)[2]
    token_budget = ours.encode(TEXTS, max_batch_tokens=40, progress=False)[2]
    for other in (short, long, tiny_batches, token_budget):
        assert (alone - other).abs().max().item() <= TOL


def test_order_preserved(ours):
    forward = ours.encode(TEXTS, batch_size=2, progress=False)
    backward = ours.encode(TEXTS[::-1], batch_size=2, progress=False)
    assert torch.allclose(forward, backward.flip(0), atol=TOL)
    # Distinct texts give distinct rows, so a mix-up would show.
    assert (torch.cdist(forward, forward) + torch.eye(len(TEXTS))).min() > 1e-3


def test_eos_exactly_once_with_or_without_post_processor(tmp_path, ours):
    plain = Embedder.from_pretrained(make_checkpoint(tmp_path, layers=3, eos_post_processor=False),
                                          device="cpu", dtype="float32")
    eos = ours.tokenizer.token_to_id("<|endoftext|>")
    assert ours.tokenizer.encode("hi").ids[-1] == eos          # the embedding-style post-processor
    assert plain.tokenizer.encode("hi").ids[-1] != eos         # the LLM-style tokenizer adds nothing
    for ids_a, ids_b, text in zip(ours.tokenize(TEXTS), plain.tokenize(TEXTS), TEXTS):
        assert ids_a == ids_b
        assert ids_a[-1] == eos and eos not in ids_a[:-1], text
    assert torch.allclose(ours.encode(TEXTS, progress=False), plain.encode(TEXTS, progress=False), atol=TOL)


def test_a_literal_eos_in_a_text_is_text(ours, reference):
    """A user's text is data: "<|endoftext|>" written in it is tokenized as its characters (as
    transformers does with split_special_tokens=True), so the only EOS is the one appended."""
    tok, model = reference
    texts = ["two <|endoftext|> three", "<|endoftext|>"]
    eos = ours.tokenizer.token_to_id("<|endoftext|>")
    ids = ours.tokenize(texts)
    assert [i[:-1] for i in ids] == tok(texts, add_special_tokens=False, split_special_tokens=True).input_ids
    assert all(i[-1] == eos and eos not in i[:-1] for i in ids)
    with torch.no_grad():  # the reference model on the same ids, one text at a time: no padding at all
        expected = torch.cat([F.normalize(model(input_ids=torch.tensor([i])).last_hidden_state[:, -1], dim=-1)
                              for i in ids])
    assert (ours.encode(texts, progress=False) - expected).abs().max().item() <= TOL


def test_without_eos_the_last_real_token_is_pooled_as_transformers_does(ours, reference):
    """append_eos=False (train.py --no-eos): the text's own tokens, as llama.cpp embeds a plain
    Qwen3 LLM, against transformers on the same ids (left padding and a mask, last position)."""
    tok, model = reference
    ids = ours.tokenize(TEXTS, append_eos=False)
    assert ids == tok(TEXTS, add_special_tokens=False, split_special_tokens=True).input_ids
    batch = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(model(**batch).last_hidden_state[:, -1], dim=-1)
    assert (ours.encode(TEXTS, append_eos=False, progress=False) - expected).abs().max().item() <= TOL
    assert ours.tokenize([TEXTS[2]], max_length=3, append_eos=False)[0] == ids[2][:3]
    with pytest.raises(ValueError, match=r"texts \[1\] are empty: without EOS"):
        ours.tokenize(["a", ""], append_eos=False)


def test_truncation_keeps_eos_last(ours):
    eos = ours.tokenizer.token_to_id("<|endoftext|>")
    full = ours.tokenize([TEXTS[5]])[0]
    cut = ours.tokenize([TEXTS[5]], max_length=5)[0]
    assert len(full) > 5 and cut == full[:4] + [eos]
    assert ours.tokenize(["a"], max_length=5)[0] == ours.tokenize(["a"])[0]  # short texts untouched


def test_instruction_format(ours):
    expected = ours.tokenizer.encode("Instruct: Classify the answer\nQuery:What is 1/3?", add_special_tokens=False).ids
    assert ours.tokenize(["What is 1/3?"], instruction="Classify the answer")[0][:-1] == expected
    a = ours.encode(["What is 1/3?"], instruction="Classify the answer", progress=False)
    b = ours.encode(["Instruct: Classify the answer\nQuery:What is 1/3?"], progress=False)
    assert torch.equal(a, b)


def test_llm_prefix_sharded_and_rope_layouts_load_the_same(tmp_path, ours):
    base = ours.encode(TEXTS, progress=False)
    for kwargs in ({"prefix": "model."}, {"shards": 3}, {"rope_in_parameters": False}):
        folder = make_checkpoint(tmp_path / str(len(kwargs)) / next(iter(kwargs)), layers=3, **kwargs)
        other = Embedder.from_pretrained(folder, device="cpu", dtype="float32").encode(TEXTS, progress=False)
        assert torch.equal(base, other), kwargs


def test_matryoshka_dims(ours):
    raw = ours.encode(TEXTS, normalize=False, progress=False)
    for dim in (1, 16, 64):
        got = ours.encode(TEXTS, dim=dim, progress=False)
        assert got.shape == (len(TEXTS), dim)
        assert torch.allclose(got, F.normalize(raw[:, :dim], dim=-1), atol=1e-6)
    for bad in (0, -1, 65):
        with pytest.raises(ValueError, match="dim"):
            ours.encode(TEXTS, dim=bad, progress=False)


def test_hub_resolution_reads_the_standard_cache_offline(tmp_path, tiny, monkeypatch, ours):
    # The Hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny-qwen3"
    shutil.copytree(tiny, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = Embedder.from_pretrained("someorg/tiny-qwen3", device="cpu", dtype="float32")
    assert torch.equal(model.encode(TEXTS, progress=False), ours.encode(TEXTS, progress=False))
    with pytest.raises(FileNotFoundError, match="someorg/absent.*Hugging Face Hub"):
        Embedder.from_pretrained("someorg/absent")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        Embedder.from_pretrained(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- errors

def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "qwen2"}, "model_type is 'qwen2'"),
    ({"model_type": "qwen3_moe", "num_experts": 8}, "model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_type"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"head_dim": None}, "missing config keys \\['head_dim'\\]"),
])
def test_unsupported_configs_are_refused(tmp_path, tiny, changes, message):
    folder = shutil.copytree(tiny, tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        Embedder.from_pretrained(folder)


def test_missing_unexpected_and_misshapen_weights_are_named(tmp_path, tiny):
    folder = shutil.copytree(tiny, tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    del weights["layers.1.self_attn.k_norm.weight"]
    weights["layers.9.mlp.extra.weight"] = torch.zeros(2)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['layers.1.self_attn.k_norm.weight'\].*layers.9.mlp.extra"):
        Embedder.from_pretrained(folder)
    weights = load_file(tiny / "model.safetensors")
    weights["norm.weight"] = torch.ones(3)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"norm.weight has shape \(3,\)"):
        Embedder.from_pretrained(folder)


def test_corrupt_or_missing_files(tmp_path, tiny):
    folder = shutil.copytree(tiny, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        Embedder.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: weights file missing"):
        Embedder.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        Embedder.from_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing"):
        Embedder.from_pretrained(folder)


def test_bad_arguments(tiny, ours):
    with pytest.raises(ValueError, match="unknown dtype"):
        Embedder.from_pretrained(tiny, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        Embedder.from_pretrained(tiny, device="gpu0")
    with pytest.raises(ValueError, match="max_length"):
        ours.encode(["x"], max_length=1)
    with pytest.raises(TypeError, match="list of strings"):
        ours.encode("just one string")
    with pytest.raises(ValueError, match="pooling"):
        ours.encode(["x"], pooling="cls")


def test_config_reads_head_dim_not_derived(tiny):
    c = Qwen3Config.from_json(tiny / "config.json")
    assert c.head_dim == 32 != c.hidden_size // c.num_attention_heads


@pytest.mark.parametrize("api", [{"window_size", "enable_gqa"}, {"window_size"}, {"is_causal"}])
def test_varlen_attention_glue(ours, monkeypatch, api):
    """The CUDA-only varlen kernel cannot run here; a stand-in with its documented semantics (per
    text from cu_seq; causal by window (-1, 0) or is_causal; k/v heads shared only with enable_gqa)
    checks that we call each generation of the API (torch 2.10, 2.11-2.12, 2.13) correctly."""
    from at_scale import runtime
    calls = []

    def fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert set(kw) == api and kw.get("window_size", (-1, 0)) == (-1, 0) and kw.get("is_causal", True)
        assert k.shape[1] == (q.shape[1] if "enable_gqa" not in api else ours.model.config.num_key_value_heads)
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        assert int(cu_q[-1]) == len(q) and max_q == int(cu_q.diff().max())
        calls.append(len(cu_q) - 1)
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # (heads, T, d)
            out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=True).transpose(0, 1)
        return out

    padded = ours.encode(TEXTS, batch_size=4, progress=False)
    monkeypatch.setattr(runtime, "varlen_attn", fake_varlen_attn)
    monkeypatch.setattr(runtime, "VARLEN_ARGS", api)
    monkeypatch.setattr(ours.fast, "varlen", True)  # what FastPaths decides where runtime.varlen_usable
    packed = ours.encode(TEXTS, batch_size=4, progress=False)
    assert calls and max(calls) == 4
    assert (packed - padded).abs().max().item() <= TOL


def test_a_failing_fast_path_falls_back_to_the_reference_path(ours, monkeypatch):
    from at_scale import runtime
    expected = ours.encode(TEXTS, progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore detail")

    monkeypatch.setattr(runtime, "varlen_attn", broken)
    monkeypatch.setattr(ours.fast, "varlen", True)
    with pytest.warns(UserWarning, match="varlen attention failed .RuntimeError: FlashAttention only supports"):
        got = ours.encode(TEXTS, batch_size=2, progress=False)
    assert not ours.fast.varlen  # warned once, padded SDPA from then on
    assert (got - expected).abs().max().item() <= TOL


def test_compiled_blocks_equal_eager_and_compile_once(tiny, ours, monkeypatch):
    """compile=True: the blocks share their graphs, and batches of any shape reuse them: at most
    two (dynamic sizes are assumed != 1, so a batch of one text gets its own), more is an error
    here; the same vectors as the eager path; a compile that fails falls back to eager, warning."""
    import torch._dynamo
    from at_scale import runtime
    torch._dynamo.reset()
    compiled = Embedder.from_pretrained(tiny, device="cpu", dtype="float32", compile=True)
    # dynamo's own patch, which restores its config as it was (monkeypatch's restore leaves an
    # alias such as recompile_limit broken for the compiles of later tests after a reset)
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for kw in ({"batch_size": 2}, {"max_batch_tokens": 40}, {}):
            assert (compiled.encode(TEXTS, progress=False, **kw) - ours.encode(TEXTS, progress=False)).abs().max() <= TOL
            assert compiled.compiled  # a failed compile (or a recompile past the limit) would have fallen back

    auto = Embedder.from_pretrained(tiny, device="cpu", dtype="float32")  # compile=None: measured
    auto.encode(TEXTS, progress=False)
    monkeypatch.setattr(runtime, "COMPILE_MIN_TOKENS", 10)
    auto.fast.maybe_compile(auto.model, 20, log=pytest.fail)
    assert not auto.compiled  # on the CPU never by default, however big the job
    auto.fast.device_type = "cuda"  # on CUDA, by the job's size: COMPILE_MIN_TOKENS read now
    logs = []
    auto.fast.maybe_compile(auto.model, 20, log=logs.append)
    assert auto.compiled and "compiling" in logs[0]

    def broken_compile(model):
        for block in model.layers:
            block.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("inductor: no C++ compiler found"))

    monkeypatch.setattr(runtime, "compile_blocks", broken_compile)
    failing = Embedder.from_pretrained(tiny, device="cpu", dtype="float32", compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed .RuntimeError: inductor: no C"):
        got = failing.encode(TEXTS, progress=False)
    assert not failing.compiled and (got - ours.encode(TEXTS, progress=False)).abs().max() <= TOL
