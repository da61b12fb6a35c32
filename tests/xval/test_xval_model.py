"""Model properties: scaled [NUM] embedding, padding/packing invariance, causality, no leak of
masked values, the loss on hand-computed tensors."""

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.xval.collate import XValCollate
from encoders.xval.encodings import get_encoding
from encoders.xval.loss import combine, draw_mlm_mask, masked_inputs, xval_loss
from encoders.xval.model import XValConfig, XValModel
from encoders.xval.normalizer import FieldMap, Normalizer
from encoders.xval.tokenizer import MASK_ID, NUM_ID
from tests.testkit.configs import tiny_model_config

VOCAB = 40


def make_model(mode="mlm", encoding="xval", **kw):
    torch.manual_seed(0)
    cfg = tiny_model_config("xval", d_model=32, n_heads=4, max_len=64, mode=mode, encoding=encoding, **kw)
    return XValModel(cfg, VOCAB).eval()


@functools.cache
def shared_model(mode="mlm"):
    """One read-only model per mode for the many-example property tests."""
    return make_model(mode)


def random_sample(rng, n_tokens, n_numbers):
    tokens = rng.integers(4, VOCAB, n_tokens).astype(np.int32)
    tokens[rng.choice(n_tokens, n_numbers, replace=False)] = NUM_ID
    return {
        "tokens": tokens,
        "values": rng.normal(size=n_numbers) * 3,
        "fields": np.zeros(n_numbers, dtype=np.int16),
    }


IDENTITY = Normalizer(["_"], [FieldMap("affine", 0.0, 1.0)], clip=5.0)


def collate(encoding="xval", pack=False, max_len=64):
    return XValCollate(IDENTITY, get_encoding(encoding), VOCAB, max_len, pack=pack)


def run(model, batch, **kw):
    return model(batch["ids"], batch["num"], pos=batch["pos"], pad=batch["pad"], seg=batch.get("seg"), **kw)


# ----------------------------------------------------------------------------- embedding


@settings(max_examples=25, deadline=None)
@given(st.floats(-5, 5), st.floats(-5, 5))
def test_num_embedding_is_linear_and_odd_in_the_value(x, y):
    model = shared_model()
    ids = torch.tensor([[5, NUM_ID, 7]])
    pos = model.pos_emb.weight[1]

    def num_part(value):
        return model.embed(ids, torch.tensor([[1.0, value, 1.0]]))[0, 1] - pos

    e = model.tok_emb.weight[NUM_ID]
    torch.testing.assert_close(num_part(x), x * e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(num_part(x + y), num_part(x) + num_part(y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(num_part(-x), -num_part(x), rtol=0, atol=1e-7)


def test_zero_value_gives_exactly_the_positional_vector():
    model = make_model()
    ids = torch.tensor([[5, NUM_ID, 7, NUM_ID]])
    trunk_input = model.embed(ids, torch.tensor([[1.0, 0.0, 1.0, -0.0]]))
    assert torch.equal(trunk_input[0, 1], model.pos_emb.weight[1])
    assert torch.equal(trunk_input[0, 3], model.pos_emb.weight[3])
    assert not torch.equal(trunk_input[0, 0], model.pos_emb.weight[0])


def test_trunk_is_bias_free_and_token_head_is_tied():
    model = make_model()
    for name, module in model.blocks.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.LayerNorm):
            assert module.bias is None, name
    assert model.norm.bias is None
    h = torch.randn(3, 32)
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n or "token_head" in n for n in names)  # logits use tok_emb
    out = model(torch.tensor([[5, 6, 7]]), torch.ones(1, 3), select=torch.ones(1, 3, dtype=torch.bool))
    assert out["logits"].shape == (3, VOCAB)
    assert torch.allclose(F.linear(h, model.tok_emb.weight), h @ model.tok_emb.weight.T)


def test_paper_size():
    cfg = XValConfig()  # defaults are the paper's 6 x 768, 6 heads
    model = XValModel(cfg, 256)
    trunk = cfg.n_layers * (12 * cfg.d_model**2 + 2 * cfg.d_model) + cfg.d_model
    head = cfg.d_model * cfg.d_model + cfg.d_model + cfg.d_model + 1
    assert model.num_params(non_embedding=True) == trunk + head
    assert 43.0e6 < model.num_params(non_embedding=False) < 44.0e6  # ~43.5 M in the paper


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("mode", ["mlm", "causal"])
@pytest.mark.parametrize("encoding", ["xval", "p10"])
def test_padding_and_packing_invariance(mode, encoding):
    model = make_model(mode, encoding)
    rng = np.random.default_rng(1)
    samples = [random_sample(rng, n, k) for n, k in [(9, 2), (20, 5), (4, 1)]]
    alone = [run(model, collate(encoding)([s]))["logits"][0] for s in samples]
    padded = collate(encoding)(samples)
    assert padded["pad"].any()
    out_padded = run(model, padded)["logits"]
    packed = collate(encoding, pack=True)(samples)
    assert packed["ids"].shape[0] < len(samples)  # several samples share a row
    out_packed = run(model, packed)["logits"]
    for i, ref in enumerate(alone):
        n = ref.shape[0]
        torch.testing.assert_close(out_padded[i, :n], ref, rtol=1e-4, atol=1e-5)
        where = packed["sample"] == i
        torch.testing.assert_close(out_packed[where], ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 18), st.integers(0, 2**31 - 1))
def test_causal_outputs_do_not_depend_on_the_future(t, seed):
    model = shared_model("causal")
    rng = np.random.default_rng(seed)
    batch = collate()([random_sample(rng, 20, 5)])
    other = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    other["ids"][0, t:] = torch.from_numpy(rng.integers(4, VOCAB, 20 - t))
    other["num"][0, t:] = torch.from_numpy(rng.normal(size=20 - t).astype(np.float32))
    a, b = run(model, batch), run(model, other)
    torch.testing.assert_close(a["logits"][0, :t], b["logits"][0, :t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["number"][0, :t], b["number"][0, :t], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["logits"][0, t:], b["logits"][0, t:])


@settings(max_examples=15, deadline=None)
@given(st.floats(-5, 5), st.integers(0, 2**31 - 1))
def test_masked_value_does_not_leak(value, seed):
    model = shared_model("mlm")
    rng = np.random.default_rng(seed)
    batch = collate()([random_sample(rng, 16, 4)])
    mask = batch["slot"] & (torch.arange(16) == int(torch.nonzero(batch["slot"][0])[0]))
    ids, num = masked_inputs(batch, mask)
    changed = {**batch, "num": batch["num"].clone()}
    changed["num"][mask] = value  # a different true value at the masked number
    ids2, num2 = masked_inputs(changed, mask)
    assert torch.equal(ids, ids2) and torch.equal(num, num2)
    assert ids[mask].eq(MASK_ID).all() and num[mask].eq(1.0).all()
    a = model(ids, num, select=mask)
    b = model(ids2, num2, select=mask)
    assert torch.equal(a["number"], b["number"]) and torch.equal(a["logits"], b["logits"])


def test_mlm_masks_whole_baseline_numbers():
    rng = np.random.default_rng(0)
    batch = collate("p10")([random_sample(rng, 30, 6) for _ in range(4)])
    torch.manual_seed(3)
    mask = draw_mlm_mask(batch, 0.5)
    rows = torch.arange(batch["ids"].shape[0])[:, None] * batch["ids"].shape[1]
    groups = (rows + batch["unit"])[batch["slot"]]  # one id per number in the batch
    masked = mask[batch["slot"]]
    for g in groups.unique():
        assert masked[groups == g].all() or not masked[groups == g].any()
    assert not mask[batch["pad"]].any()


# ----------------------------------------------------------------------------- loss


def test_loss_on_hand_computed_tensors():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    targets = torch.tensor([0, NUM_ID, 1])
    number = torch.tensor([9.0, 1.5, -7.0])
    values = torch.tensor([0.0, 0.5, 100.0])
    loss, metrics = combine(logits, targets, number, values, number_loss_weight=0.5)
    ce = [
        -math.log(math.exp(2) / (math.exp(2) + 3)),
        -math.log(math.e / (math.e + 3)),
        -math.log(1 / (math.exp(3) + 3)),
    ]
    # only the [NUM] target counts for the MSE: (1.5 - 0.5)^2 = 1
    assert loss.item() == pytest.approx(sum(ce) / 3 + 0.5 * 1.0, rel=1e-6)
    assert metrics["mse"] == pytest.approx(1.0)
    assert metrics["predicted_numbers"] == 1
    loss_text_only, m = combine(logits, torch.tensor([0, 1, 2]), number, values, 0.5)
    assert m["mse"] == 0.0 and loss_text_only.item() == pytest.approx(m["ce"])


@pytest.mark.parametrize("mode", ["mlm", "causal"])
def test_training_loss_backpropagates_to_every_parameter(mode):
    model = make_model(mode).train()
    rng = np.random.default_rng(0)
    batch = collate(pack=True)([random_sample(rng, 12, 4) for _ in range(6)])
    torch.manual_seed(0)
    loss, metrics = xval_loss(model, batch, mode, 0.5, 1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and metrics["predicted_numbers"] > 0
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every parameter used


# ----------------------------------------------------------------------------- generation


class ScriptedModel(torch.nn.Module):
    """A causal 'model' whose next token follows a script, to test decoding exactly."""

    def __init__(self, script, number, vocab, encoding="xval"):
        super().__init__()
        self.cfg = tiny_model_config(
            "xval", d_model=8, n_layers=1, n_heads=1, max_len=64, mode="causal", encoding=encoding
        )
        self.encoding = get_encoding(encoding)
        self.text_vocab_size = vocab
        self.script, self.number = list(script), number
        self.inputs = []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, num, **kw):
        self.inputs.append((ids.clone(), num.clone()))
        step = len(self.inputs) - 1
        logits = torch.zeros(1, ids.shape[1], self.text_vocab_size + self.encoding.vocab_size)
        logits[0, -1, self.script[step]] = 1.0
        return {"logits": logits, "number": torch.full((1, ids.shape[1]), self.number)}


def test_generation_decodes_text_and_numbers():
    from encoders.xval.inference import generate
    from encoders.xval.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.train(['{"p":[NUM],"q":[NUM]}'] * 5, vocab_size=300)
    norm = Normalizer(
        ["_", "p", "q"], [FieldMap("affine", 0, 1), FieldMap("affine", 10, 2), FieldMap("affine", 0, 1)]
    )
    comma_q = tokenizer.encode(',"q":')
    script = [NUM_ID, *comma_q, NUM_ID, *tokenizer.encode("}")]
    v = tokenizer.vocab_size
    model = ScriptedModel(script, number=0.5, vocab=v)
    out = generate(model, tokenizer, norm, '{"p":', max_new_tokens=len(script), stop="}")
    # p is de-normalised with p's map (10 + 2 * 0.5), q with q's (0.5)
    assert out.text == '{"p":11,"q":0.5}'
    np.testing.assert_allclose(out.values, [11.0, 0.5])
    ids, num = model.inputs[-1]
    assert ids[0, -len(script) + 1 :].tolist() == script[:-1]
    assert num[0][ids[0] == NUM_ID].tolist() == [0.5, 0.5]  # a generated value feeds back as multiplier
    # baselines: number tokens are decoded, malformed ones become "?"
    p10 = get_encoding("p10")
    local, _ = p10.encode(np.array([0.5]))
    script = [*(v + local[0]), v + 3, *tokenizer.encode("}")]
    model = ScriptedModel(script, number=0.0, vocab=v, encoding="p10")
    out = generate(model, tokenizer, norm, '{"p":', max_new_tokens=len(script))
    assert out.text == '{"p":11?}' and out.values[0] == 11.0 and np.isnan(out.values[1])


def test_embed_gives_one_vector_per_sample_packed_or_not():
    from encoders.xval.family import embed

    model = make_model()
    rng = np.random.default_rng(2)
    samples = [random_sample(rng, n, 2) for n in (5, 17, 9)]
    plain = embed(model, collate()(samples))["text"]
    packed = embed(model, collate(pack=True)(samples))["text"]
    assert plain.shape == (3, 32)
    torch.testing.assert_close(plain, packed, rtol=1e-4, atol=1e-5)
    alone = embed(model, collate()([samples[1]]))["text"][0]
    torch.testing.assert_close(plain[1], alone, rtol=1e-4, atol=1e-5)


def test_long_samples_are_cut_between_numbers_and_counted():
    rng = np.random.default_rng(4)
    sample = random_sample(rng, 40, 20)
    batch = collate("p10", max_len=23)([sample])
    assert batch["n_truncated"] == 1 and batch["ids"].shape[1] <= 23
    starts = int(batch["start"].sum())
    assert int(batch["slot"].sum()) == 5 * starts  # only whole numbers survive the cut
    assert collate("xval", max_len=64)([sample])["n_truncated"] == 0
