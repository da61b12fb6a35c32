"""InfoNCE (hand-computed value, symmetry, temperature), masked reconstruction, cross-rank negatives."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from encoders.astroclip.loss import info_nce, masked_mse
from tests.testkit.ranks import spawn_ranks


def test_info_nce_matches_a_hand_computed_value():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    spectrum = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    # cosine similarities: s = [[1/sqrt2, 0], [1/sqrt2, 1]]
    r = 1 / math.sqrt(2)
    s = [[r, 0.0], [r, 1.0]]
    i2s = (
        -(
            math.log(math.exp(2 * s[0][0]) / (math.exp(2 * s[0][0]) + math.exp(2 * s[0][1])))
            + math.log(math.exp(2 * s[1][1]) / (math.exp(2 * s[1][0]) + math.exp(2 * s[1][1])))
        )
        / 2
    )
    s2i = (
        -(
            math.log(math.exp(2 * s[0][0]) / (math.exp(2 * s[0][0]) + math.exp(2 * s[1][0])))
            + math.log(math.exp(2 * s[1][1]) / (math.exp(2 * s[0][1]) + math.exp(2 * s[1][1])))
        )
        / 2
    )
    loss, metrics = info_nce(image, spectrum, scale)
    assert loss.item() == pytest.approx((i2s + s2i) / 2, rel=1e-6)
    assert metrics["loss_image_to_spectrum"] == pytest.approx(i2s, rel=1e-6)
    assert metrics["loss_spectrum_to_image"] == pytest.approx(s2i, rel=1e-6)


def test_info_nce_is_symmetric_and_scale_invariant_in_inputs():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(10.0)
    assert info_nce(a, b, scale)[0].item() == pytest.approx(info_nce(b, a, scale)[0].item(), rel=1e-6)
    # embeddings are L2-normalised inside: rescaling rows changes nothing
    assert info_nce(3 * a, 0.5 * b, scale)[0].item() == pytest.approx(
        info_nce(a, b, scale)[0].item(), rel=1e-6
    )
    # aligned pairs have lower loss than random ones
    assert info_nce(a, a, scale)[0] < info_nce(a, b, scale)[0]


def test_masked_mse_scores_only_masked_tokens_and_good_pixels():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    target = torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[True, False, False, True, False], [False, False, True, False, False]])
    weight = torch.ones(2, 5, 4)
    weight[0, 0, :2] = 0  # two bad pixels inside a masked token
    loss = masked_mse(pred, target, mask, weight)
    expected = ((pred - target) ** 2 * mask[..., None] * weight).sum() / (mask[..., None] * weight).sum()
    assert loss.item() == pytest.approx(expected.item())
    # changing predictions of unmasked tokens or bad pixels does not change the loss, and gets no gradient
    other = pred.detach().clone()
    other[~mask] += 100.0
    other[0, 0, :2] += 100.0
    assert masked_mse(other, target, mask, weight).item() == pytest.approx(loss.item())
    loss.backward()
    assert torch.all(pred.grad[~mask] == 0)
    assert torch.all(pred.grad[0, 0, :2] == 0)
    assert torch.all(pred.grad[mask][1:] != 0)


def _gather_worker(rank: int, world: int, image, spectrum, sizes) -> tuple:
    torch.manual_seed(0)
    proj = torch.nn.Linear(image.shape[1], 4)  # same init on both ranks
    proj = torch.nn.parallel.DistributedDataParallel(proj)
    scale = torch.nn.Parameter(torch.tensor(5.0))
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    loss, metrics = info_nce(proj(image[rows]), proj(spectrum[rows]) * 2.0, scale)
    loss.backward()
    dist.all_reduce(scale.grad)
    scale.grad /= world  # DDP averages parameter gradients; do the same for this loose parameter
    total = loss.detach().clone() * sizes[rank]
    dist.all_reduce(total)
    return (
        rank,
        float(total) / sum(sizes),
        proj.module.weight.grad.tolist(),
        float(scale.grad),
        metrics["negatives"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(4, 4), (5, 3)])
def test_negatives_gathered_across_two_gloo_ranks_match_one_process(sizes):
    """Two ranks with gathered negatives: same loss and the same gradients as one process on the
    global batch (equal and unequal per-rank batch sizes)."""
    g = torch.Generator().manual_seed(3)
    n = sum(sizes)
    image, spectrum = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 4)
    scale = torch.nn.Parameter(torch.tensor(5.0))
    # one process, global batch; the per-rank losses average over their own rows, so the global
    # reference weights rows the same way
    logits = lambda a, b: scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # noqa: E731
    a, b = proj(image), proj(spectrum) * 2.0
    labels = torch.arange(n)
    per_row = 0.5 * (
        F.cross_entropy(logits(a, b), labels, reduction="none")
        + F.cross_entropy(logits(b, a), labels, reduction="none")
    )
    start = 0
    rank_losses = []
    for s in sizes:
        rank_losses.append(per_row[start : start + s].mean())
        start += s
    reference = torch.stack(rank_losses).mean()
    reference.backward()
    results = spawn_ranks(_gather_worker, image, spectrum, list(sizes), nproc=2, timeout=120)
    for rank, _total, weight_grad, scale_grad, negatives in results:
        assert negatives == n - 1  # every rank scored against the global batch
        assert torch.allclose(torch.tensor(weight_grad), proj.weight.grad, atol=1e-6), rank
        assert scale_grad == pytest.approx(scale.grad.item(), abs=1e-6)
    if sizes[0] == sizes[1]:
        assert results[0][1] == pytest.approx(per_row.mean().item(), rel=1e-6)
