"""The attention entry point: SDPA semantics, masks, and the xformers → SDPA fallback on CPU."""

import builtins
import math

import pytest
import torch

from foundation import attention as attn


def _reference(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 5, 4, generator=g) for _ in range(3)]


def test_matches_explicit_softmax(qkv):
    torch.testing.assert_close(attn.attention(*qkv), _reference(*qkv))


def test_key_padding_and_causal_combine(qkv):
    q, k, v = qkv
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    expected = _reference(q, k, v, (~pad)[:, None, None, :] & causal)
    torch.testing.assert_close(attn.attention(q, k, v, key_padding_mask=pad, is_causal=True), expected)
    # Padded keys have no influence on any query.
    v2 = v.clone()
    v2[0, :, 3:] = 1e6
    torch.testing.assert_close(
        attn.attention(q, k, v2, key_padding_mask=pad)[0], attn.attention(q, k, v, key_padding_mask=pad)[0]
    )


def test_attention_weights_are_probabilities(qkv):
    weights = attn.attention_weights(qkv[0], qkv[1])
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5))
    torch.testing.assert_close(weights @ qkv[2], attn.attention(*qkv))


def test_xformers_request_falls_back_to_sdpa_on_cpu(qkv, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_xformers(name, *args, **kwargs):
        if name.startswith("xformers"):
            raise ImportError("xformers is not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    monkeypatch.setattr(attn, "_warned", False)
    attn.set_backend("xformers")
    try:
        assert attn.resolved_backend("cpu") == "sdpa"
        assert "using torch SDPA" in caplog.text
        torch.testing.assert_close(attn.attention(*qkv), _reference(*qkv))
    finally:
        attn.set_backend("auto")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.set_backend("flash")


def _refuse(*args, **kwargs):
    raise AssertionError("SDPA called where plain attention was expected")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cpu_uses_plain_attention_with_sdpa_semantics(qkv, dtype, monkeypatch):
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 4:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    bias = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
    scores = qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(4)
    cases = [  # (keyword arguments, the fp32 result they must give)
        ({}, _reference(*qkv)),
        ({"key_padding_mask": pad, "is_causal": True}, _reference(*qkv, (~pad)[:, None, None, :] & causal)),
        ({"attn_mask": bias.to(dtype)}, (scores + bias).softmax(-1) @ qkv[2]),
    ]
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", _refuse)
    for kwargs, expected in cases:
        out = attn.attention(q, k, v, **kwargs)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()  # gradients flow through the plain path
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in (q, k, v))


def test_plain_attention_dropout_and_size_limit(qkv, monkeypatch):
    q, k, v = (t.bfloat16() for t in qkv)
    torch.manual_seed(0)
    dropped = attn.attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped.float(), attn.attention(q, k, v).float())
    # fp32, and score matrices above the limit, stay on SDPA.
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", _refuse)
    with pytest.raises(AssertionError, match="SDPA called"):
        attn.attention(*qkv)
    monkeypatch.setattr(attn, "EXPLICIT_MAX_SCORES", 2 * 3 * 5 * 5 - 1)
    with pytest.raises(AssertionError, match="SDPA called"):
        attn.attention(q, k, v)
