"""benchmarks/astroclip.py compares against a reference-style re-expression of the paper code's
training step: it must compute the same function as our towers (else the speed-up is meaningless)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from encoders.astroclip.model import AstroCLIP, AstroCLIPConfig
from tests.testkit.configs import ASTROCLIP_SMALL, tiny_model_config


def _benchmark():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "astroclip.py"
    spec = importlib.util.spec_from_file_location("astroclip_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny(stage: str) -> AstroCLIPConfig:
    deeper = {"spectrum": {"depth": 2, "dropout": 0.1}, "image": {"depth": 2, "encode_visible_only": False}}
    return tiny_model_config("astroclip", ASTROCLIP_SMALL, deeper, stage=stage)


@pytest.mark.parametrize("stage", ["spectrum_masked", "image_masked"])
def test_reference_style_step_computes_the_same_loss_and_gradients(stage):
    bench = _benchmark()
    cfg = _tiny(stage)
    torch.manual_seed(0)
    model = AstroCLIP(cfg).eval()  # dropout off: the only intended difference is random
    _, fixed = bench.batch_makers(cfg, 3, seed=0)
    batch = fixed()
    results = []
    for loss_fn in (bench.ours_loss, bench.reference_loss):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
    (ours, ours_grads), (ref, ref_grads) = results
    assert ours == pytest.approx(ref, rel=1e-5)
    assert set(ours_grads) == set(ref_grads) and len(ours_grads) > 10
    for name, grad in ours_grads.items():
        torch.testing.assert_close(ref_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert bench.check_equivalence(model, batch) < 1e-5


def test_reference_slicing_and_masks_match_the_towers():
    bench = _benchmark()
    cfg = _tiny("spectrum_masked")
    tower = AstroCLIP(cfg).spectrum
    x = torch.randn(2, cfg.spectrum.length)
    torch.testing.assert_close(
        bench.reference_slices(x, tower.patch, tower.stride), tower.slices(x), rtol=0, atol=0
    )
    s = cfg.spectrum
    masks = bench.reference_segment_masks(
        5, s.tokens, s.mask_segments, s.mask_length, torch.Generator().manual_seed(1)
    )
    seg = s.tokens // s.mask_segments
    for row in masks:
        for k in range(s.mask_segments):
            part = row[k * seg : (k + 1) * seg].int()
            assert int(part.sum()) == s.mask_length
            assert int((part[1:] - part[:-1]).clamp_min(0).sum()) + int(part[0]) == 1  # one contiguous run
        assert not row[s.mask_segments * seg :].any()


def test_reference_attention_drops_probabilities_in_training_like_the_reference():
    bench = _benchmark()
    cfg = _tiny("spectrum_masked")
    torch.manual_seed(0)
    attn = AstroCLIP(cfg).spectrum.encoder.blocks[0].attn
    x = torch.randn(2, 20, 32)
    torch.manual_seed(1)
    a = bench.reference_specformer_attention(attn, x, training=True)
    b = bench.reference_specformer_attention(attn, x, training=True)
    assert not torch.allclose(a, b)  # dropout 0.1 on the attention probabilities and the residual
    torch.testing.assert_close(
        bench.reference_specformer_attention(attn, x, training=False), attn.eval()(x), rtol=1e-5, atol=1e-6
    )


def test_mae_row_starts_from_the_reference_weights():
    """The default image step (MAE) is timed on a model whose encoder equals the shared one."""
    bench = _benchmark()
    cfg = _tiny("image_masked")
    cfg.image.encode_visible_only = True
    args = SimpleNamespace(seed=0, compile=False)
    impls, shared = bench.implementations(cfg, args)
    assert set(impls) == {bench.REFERENCE, bench.SAME_FUNCTION, bench.OURS}
    assert impls[bench.SAME_FUNCTION][0].model is shared is impls[bench.REFERENCE][0].model
    mae = impls[bench.OURS][0].model
    assert mae.cfg.image.encode_visible_only and not shared.cfg.image.encode_visible_only
    for name, tensor in shared.image.state_dict().items():
        assert torch.equal(mae.image.state_dict()[name], tensor), name
