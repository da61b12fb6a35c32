"""Synthetic embeddings files for the search and evaluation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foundation.embeddings import EmbeddingsWriter, merge_embeddings


def latent_embeddings(n: int = 400, dim: int = 16, noise: float = 0.05, seed: int = 0) -> dict:
    """ids, image/spectrum vectors that both encode (redshift, stellar_mass), targets, splits."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.0, 1.0, n)
    mass = rng.normal(10.0, 0.7, n)
    latents = np.stack([z * 2 - 1, (mass - 10.0) / 0.7, rng.normal(size=n)], axis=1)
    mix = rng.normal(size=(3, dim))
    clean = np.tanh(latents @ mix)
    image = clean + noise * rng.normal(size=(n, dim))
    spectrum = clean + noise * rng.normal(size=(n, dim))
    return {
        "ids": [f"gal-{i:05d}" for i in range(n)],
        "vectors": {"image": image.astype(np.float32), "spectrum": spectrum.astype(np.float32)},
        "targets": {"redshift": z, "stellar_mass": mass},
        "split": np.where(rng.uniform(size=n) < 0.25, "test", "train").tolist(),
    }


def write_embeddings(path: Path, data: dict, chunk: int = 128, **attrs) -> Path:
    attrs = {"checkpoint": "synthetic", "family": "test", **attrs}
    writer = EmbeddingsWriter(path, attrs=attrs, chunk_rows=chunk)
    for start in range(0, len(data["ids"]), chunk):
        sl = slice(start, start + chunk)
        writer.append(
            data["ids"][sl],
            {m: v[sl] for m, v in data["vectors"].items()},
            {t: v[sl] for t, v in data["targets"].items()},
            split=data["split"][sl] if data.get("split") is not None else None,
        )
    return writer.finish()


def export_parts(folder: Path) -> tuple[list[Path], Path]:
    """Two part files of one export (disjoint ids, as `export` array tasks write them) and their
    merge: the input of a streamed or sharded index build."""
    paths = []
    for part, (n, seed) in enumerate([(700, 0), (600, 1)]):
        data = latent_embeddings(n=n, seed=seed)
        data["ids"] = [f"p{part}-{oid}" for oid in data["ids"]]
        paths.append(write_embeddings(folder / f"emb.part-{part:05d}-of-00002.h5", data))
    return paths, merge_embeddings(paths, folder / "emb.h5")
