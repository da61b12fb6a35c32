"""Embeddings shaped like real ones, at any size and width: a model fitted to an exported file.

Random unit vectors are the worst case for approximate search (every point's neighbours are barely
closer than the rest); trained towers give clustered vectors with a few dominant directions (the
demo's AstroCLIP embeddings have an effective dimension of 3-6). `fit_embedding_model` fits, to the
unit vectors of one modality: their mean, the leading principal components holding `variance`
of the spread (at most `max_rank`), a Gaussian mixture in those components, and the total variance
left in the others. `generate` draws N vectors of any dimension D from it: the mean and the
mixture placed on random orthonormal directions of R^D, the residual variance spread evenly over
the other directions as isotropic noise, each row normalised. The spectrum (hence the effective
dimension) and the cluster structure of the source carry over; the orientation is random.
Chunks are generated independently from (seed, chunk number), so any chunk can be regenerated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from foundation.errors import DataError
from foundation.search.kinds import normalized


@dataclass
class EmbeddingModel:
    """Fitted parameters (small: a few kB), stored as JSON."""

    source: str
    source_dim: int
    source_rows: int
    mean_norm: float
    weights: list[float]
    means: list[list[float]]
    """Mixture means, in the leading principal components (C x r)."""
    covariances: list[list[list[float]]]
    tail_variance: float
    """Total variance of the unit vectors outside the r leading components."""
    participation_ratio: float
    """Effective dimension of the source: (sum of eigenvalues)^2 / sum of their squares."""

    @property
    def rank(self) -> int:
        return len(self.means[0])

    def save(self, path: str | Path) -> Path:
        from foundation.atomic import write_json

        write_json(path, asdict(self), indent=1)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingModel:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(
                f"{path} is not an embedding model written by fit_embedding_model: {exc}"
            ) from None


def participation_ratio(eigenvalues: np.ndarray) -> float:
    return float(eigenvalues.sum() ** 2 / np.sum(eigenvalues**2))


def fit_embedding_model(
    vectors: np.ndarray,
    *,
    source: str,
    components: int = 8,
    variance: float = 0.95,
    max_rank: int = 32,
    seed: int = 0,
) -> EmbeddingModel:
    """Fit the model described in the module doc to (N, d) embeddings (normalised here)."""
    from sklearn.mixture import GaussianMixture

    x = normalized(vectors).astype(np.float64)
    n, d = x.shape
    if n < 10 * components:
        raise DataError(
            f"fitting {components} mixture components needs at least {10 * components} rows, got {n}"
        )
    mean = x.mean(axis=0)
    centred = x - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    eig = s**2 / (n - 1)
    rank = int(min(max_rank, d - 1, np.searchsorted(np.cumsum(eig) / eig.sum(), variance) + 1))
    z = centred @ vt[:rank].T
    gmm = GaussianMixture(components, covariance_type="full", random_state=seed, reg_covar=1e-6).fit(z)
    return EmbeddingModel(
        source=source,
        source_dim=d,
        source_rows=n,
        mean_norm=float(np.linalg.norm(mean)),
        weights=gmm.weights_.tolist(),
        means=gmm.means_.tolist(),
        covariances=gmm.covariances_.tolist(),
        tail_variance=float(eig[rank:].sum()),
        participation_ratio=participation_ratio(eig),
    )


def generate(
    model: EmbeddingModel, n: int, dim: int, *, seed: int = 0, stream: int = 0, chunk: int = 100_000
) -> Iterator[np.ndarray]:
    """N unit vectors of dimension `dim` drawn from `model`, in chunks of `chunk` rows.

    `seed` fixes the directions the model is placed on; `stream` draws other rows on the same
    directions (stream 1 for queries of a database drawn as stream 0)."""
    r = model.rank
    if dim < r + 2:
        raise DataError(f"dimension {dim} is too small for a model of rank {r} (at least {r + 2})")
    q, _ = np.linalg.qr(np.random.default_rng([seed, 0]).standard_normal((dim, r + 1)))
    mean_dir, basis = q[:, 0], q[:, 1:]
    sigma = np.sqrt(model.tail_variance / (dim - r - 1))
    weights = np.asarray(model.weights) / np.sum(model.weights)
    means = np.asarray(model.means)
    chol = np.linalg.cholesky(np.asarray(model.covariances))
    for number, start in enumerate(range(0, n, chunk), start=1):
        rng = np.random.default_rng([seed, stream, number])
        size = min(chunk, n - start)
        comp = rng.choice(len(weights), size, p=weights)
        z = means[comp] + np.einsum("nij,nj->ni", chol[comp], rng.standard_normal((size, r)))
        x = (model.mean_norm * mean_dir + z @ basis.T).astype(np.float32)
        x += np.float32(sigma) * rng.standard_normal((size, dim), dtype=np.float32)
        yield normalized(x, inplace=True)


def effective_dimension(vectors: np.ndarray) -> float:
    """Participation ratio of the covariance eigenvalues of (a sample of) unit vectors."""
    x = normalized(vectors).astype(np.float64)
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    return participation_ratio(s**2)


def mixture_eigenvalues(model: EmbeddingModel) -> np.ndarray:
    """Eigenvalues of the mixture's covariance in its r components (the structured spread)."""
    w = np.asarray(model.weights) / np.sum(model.weights)
    means, covs = np.asarray(model.means), np.asarray(model.covariances)
    mean = w @ means
    total = np.einsum("c,cij->ij", w, covs + np.einsum("ci,cj->cij", means, means)) - np.outer(mean, mean)
    return np.clip(np.linalg.eigvalsh(total), 0.0, None)


def with_effective_dimension(model: EmbeddingModel, target: float, dim: int) -> EmbeddingModel:
    """`model` with its residual noise scaled so that `dim`-wide samples have effective dimension
    about `target` (more noise, a higher dimension; bisection on the covariance spectrum, before
    normalisation — the benchmark prints the dimension it measures on the vectors drawn).

    A model fitted to a briefly trained export is more collapsed than a trained model's embeddings;
    this matches a known effective dimension without changing the cluster structure."""
    from dataclasses import replace

    structured = mixture_eigenvalues(model)

    def ratio(scale: float) -> float:
        noise = model.tail_variance * scale / (dim - model.rank - 1)
        eig = np.concatenate([structured + noise, np.full(dim - model.rank, noise)])
        return participation_ratio(eig)

    lo, hi = 1e-6, 1e6
    if not ratio(lo) <= target <= ratio(hi):
        raise DataError(f"effective dimension {target} is out of reach of this model at {dim}-d")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ratio(mid) < target else (lo, mid)
    return replace(model, tail_variance=model.tail_variance * math.sqrt(lo * hi))
