"""What the raw inputs of a shard set hold about the AstroCLIP properties, read by simple models.

The property table asks two things of the embeddings: spectrum zero-shot near the supervised
spectrum model, image zero-shot above the photometry MLP. Whether the second is possible depends
on what the inputs carry and on how much a k-NN read-out loses against a trained regressor. This
fits small probes on fixed representations of the raw inputs, on the shards' train split, and
prints held-out R² per property:

- photometry: g, r, z magnitudes of the aperture fluxes (the photometry baseline's inputs), read
  by an MLP (64, 64) and by the reference k-NN (k = 64, distance-weighted, standardised);
- spectra binned to `--bins` pixels per bin, as SpecFormer sees them (standardised per spectrum)
  without and with its statistics token's features (asinh mean, ln std), and as log flux;
- with `--spectrum-run`, a trained SpecFormer's output tokens (its statistics token, and the mean
  of its slice tokens): what the tower holds before an alignment head pools it.

    python benchmarks/experiments/astroclip_inputs.py --data /tmp/demo/shards \
        --spectrum-run /tmp/demo/runs/spectrum

The probes are scikit-learn's `MLPRegressor` (Adam, early stopping on 10 % of the training rows)
on standardised inputs and targets, seeded by `--seed`.
"""

from __future__ import annotations

import argparse

import numpy as np


def representations(images: np.ndarray, flux: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    from encoders.astroclip.baselines import aperture_magnitudes

    mean = flux.mean(axis=1, keepdims=True)
    std = np.maximum(flux.std(axis=1, keepdims=True), 0.2)  # SpecFormer's floor
    usable = flux.shape[1] // bins * bins

    def binned(x: np.ndarray) -> np.ndarray:
        return x[:, :usable].reshape(len(x), -1, bins).mean(axis=2)

    shape = binned((flux - mean) / std)
    return {
        "photometry: aperture g, r, z magnitudes": aperture_magnitudes(images),
        "spectrum: standardised shape only": shape,
        "spectrum: standardised + (asinh mean, ln std)": np.c_[shape, np.arcsinh(mean), np.log(std)],
        "spectrum: log10 flux": np.log10(np.maximum(binned(flux), 1e-3)),
    }


def tower_tokens(run: str, flux: np.ndarray) -> dict[str, np.ndarray]:
    """The spectrum tower's output statistics token and mean slice token of each spectrum."""
    import torch

    from foundation.export import load_model

    tower = load_model(run).model.spectrum
    if tower is None:
        raise SystemExit(f"{run} has no spectrum tower")
    with torch.no_grad():
        tokens = np.concatenate(
            [
                tower(torch.from_numpy(flux[i : i + 256]).float())["tokens"].numpy()
                for i in range(0, len(flux), 256)
            ]
        )
    return {
        "SpecFormer: output statistics token": tokens[:, 0],
        "SpecFormer: mean of output slice tokens": tokens[:, 1:].mean(axis=1),
    }


def mlp_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mean, std = y_train.mean(axis=0), y_train.std(axis=0)
    model = make_pipeline(
        StandardScaler(),
        MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=500, early_stopping=True, random_state=seed),
    )
    model.fit(x_train, (y_train - mean) / std)
    return model.predict(x_test).reshape(len(x_test), -1) * std + mean


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="Shard set of `foundation prepare astroclip`.")
    parser.add_argument("--bins", type=int, default=19, help="Spectrum pixels averaged per bin.")
    parser.add_argument("--spectrum-run", help="A stage-1 (or aligned) run whose spectrum tower to probe.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from encoders.astroclip.evaluate import (
        PAPER_PROPERTIES,
        labelled_rows,
        paper_property_names,
        r2_per_column,
        reference_zero_shot,
        shard_objects,
    )
    from foundation.data import Manifest
    from foundation.export import default_targets
    from pipelines.evaluate_common import raw_arrays

    names = paper_property_names(default_targets(Manifest.load(args.data)))
    objects = shard_objects(args.data, names, test_fraction=0.2, seed=args.seed)
    train, test, y = labelled_rows(objects.targets, objects.train_rows, objects.test_rows)
    raw = raw_arrays(args.data, objects.ids.tolist(), {"image": "image", "spectrum": "spectrum"})
    flux = np.asarray(raw["spectrum"], dtype=np.float64)
    reps = representations(np.asarray(raw["image"]), flux, args.bins)
    if args.spectrum_run:
        reps.update(tower_tokens(args.spectrum_run, flux))
    print(f"{args.data}: {len(train)} train / {len(test)} test objects; {args.bins} pixels a bin\n")
    print("| input | read-out | " + " | ".join(PAPER_PROPERTIES[n] for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, x in reps.items():
        readouts = [("MLP (64, 64)", mlp_probe(x[train], y[train], x[test], args.seed))]
        if label.startswith("photometry") or "log10" in label:
            readouts.append(("k-NN (reference)", reference_zero_shot(x[train], y[train], x[test])))
        for readout, pred in readouts:
            r2 = r2_per_column(y[test], pred, names)
            print(f"| {label} | {readout} | " + " | ".join(f"{r2[n]:.3f}" for n in names) + " |", flush=True)


if __name__ == "__main__":
    main()
