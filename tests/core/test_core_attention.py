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


# ----------------------------------------------------------------------------- the shared block


def _per_head_self_attention(module, x, mask=None):
    """Self-attention written out head by head from the fused projection's documented layout:
    [q | k | v] along the output, each split into consecutive head_dim-wide heads."""
    width, heads = x.shape[-1], module.heads
    q, k, v = module.qkv(x).split(width, dim=-1)
    dh = width // heads
    outs = [
        _reference(*(t[..., i * dh : (i + 1) * dh].unsqueeze(1) for t in (q, k, v)), mask).squeeze(1)
        for i in range(heads)
    ]
    return module.proj(torch.cat(outs, dim=-1))


def test_self_attention_matches_per_head_attention_with_masks():
    torch.manual_seed(0)
    module = attn.SelfAttention(8, 2).eval()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(module(x), _per_head_self_attention(module, x))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    expected = _per_head_self_attention(module, x, (~pad)[:, None, None, :] & causal)
    torch.testing.assert_close(module(x, key_padding_mask=pad, is_causal=True), expected)
    with pytest.raises(ValueError, match="not divisible"):
        attn.SelfAttention(8, 3)


def test_split_heads_gives_views_of_the_projection():
    projected = torch.randn(2, 5, 3 * 8)
    q, k, v = attn.split_heads(projected, 3, 2)
    assert q.shape == (2, 2, 5, 4)
    assert all(t.untyped_storage().data_ptr() == projected.untyped_storage().data_ptr() for t in (q, k, v))
    torch.testing.assert_close(attn.merge_heads(k), projected[..., 8:16])


def test_transformer_block_parameters_and_residual_branches():
    torch.manual_seed(0)
    plain = attn.TransformerBlock(8, 2, 2.0, bias=False)
    assert sorted(plain.state_dict()) == [
        "attn.proj.weight",
        "attn.qkv.weight",
        "mlp.0.weight",
        "mlp.2.weight",
        "norm1.weight",
        "norm2.weight",
    ]
    scaled = attn.TransformerBlock(8, 2, eps=1e-6, layer_scale=1e-5, dropout=0.5).eval()
    assert {"ls1", "ls2", "attn.qkv.bias", "norm1.bias"} <= set(scaled.state_dict())
    assert torch.equal(scaled.ls1, torch.full((8,), 1e-5)) and scaled.norm1.eps == 1e-6
    x = torch.randn(2, 5, 8)
    h = x + scaled.ls1 * _per_head_self_attention(scaled.attn, scaled.norm1(x))
    torch.testing.assert_close(scaled(x), h + scaled.ls2 * scaled.mlp(scaled.norm2(h)))
    scaled.train()
    assert not torch.equal(scaled(x), scaled(x))  # dropout on the residual branches in training
