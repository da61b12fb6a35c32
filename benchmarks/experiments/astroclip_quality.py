"""AstroCLIP quality self-check on the built-in data: synth → prepare → SpecFormer pretraining →
alignment (tiny configs, through the real `foundation` commands), then zero-shot k-NN redshift R²
and cross-modal retrieval from the embeddings, next to baselines and controls:

- raw-input PCA (32 components of the pixels / fluxes) + the same k-NN,
- the aligned architecture with random weights,
- the SpecFormer (stage 1) alone (mean-pooled tokens),
- a shuffled-pair control: the same alignment run on shards whose train-split image/spectrum
  pairing is permuted (retrieval must stay at chance, image→redshift must collapse).

Protocol (Parker et al.): StandardScaler fitted on train-split embeddings, k-NN regression with
k=16 and distance weighting fitted on the train split, R² on the test split. Cross-modal R²: image
embeddings of test objects query the train split's *spectrum* embeddings. Retrieval: top-1 of the
true partner among all test objects (chance = 1/N_test).

    python benchmarks/experiments/astroclip_quality.py --work /tmp/astroclip-quality

Stages already done in --work are skipped (delete the folder to start over). CPU seconds of each
stage are measured from the child processes (the wall clock on a shared machine is not).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_stage(name: str, cmd: list[str], done: Path, timings: dict, env: dict | None = None) -> None:
    if done.exists():
        print(f"[{name}] done already ({done})")
        return
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    cpu0, wall0 = _cpu_children(), time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    timings[name] = {
        "cpu_s": round(_cpu_children() - cpu0, 1),
        "wall_s": round(time.time() - wall0, 1),
        "load_avg_1min": os.getloadavg()[0],
    }
    print(f"[{name}] cpu {timings[name]['cpu_s']} s, wall {timings[name]['wall_s']} s", flush=True)


def shuffle_pairs(src: Path, dst: Path, seed: int = 0) -> None:
    """A copy of a shard set whose train split pairs every image with another object's spectrum."""
    from foundation.data import Manifest, ShardDataset, ShardSetWriter

    manifest = Manifest.load(src)
    spectral = ("spectrum", "spectrum_ivar", "spectrum_mask")
    with ShardSetWriter(
        dst,
        {s: 1.0 / len(manifest.splits) for s in manifest.splits},
        family=manifest.family,
        schema={k: v.to_dict() for k, v in manifest.schema.items()},
        stats=manifest.stats,
        extra={**manifest.extra, "control": "train pairs shuffled"},
    ) as writer:
        for split in manifest.splits:
            ds = ShardDataset.in_order(src, split, 1, lambda samples: samples[0])
            samples = list(ds)
            if split == "train":
                perm = np.random.default_rng(seed).permutation(len(samples))
                perm = np.roll(perm, 1)[np.argsort(perm)]  # a derangement: i -> next in a random cycle
                spectra = [{k: samples[j][k] for k in spectral} for j in perm]
                for sample, spectrum in zip(samples, spectra, strict=True):
                    sample.update(spectrum)
            for sample in samples:
                writer.write(sample, split=split)


def embed_split(model, family, cfg, shards: Path, split: str, targets=("redshift",)):
    import torch

    from foundation.data import Manifest, ShardDataset

    manifest = Manifest.load(shards)
    collate = family.make_collate(cfg, manifest, False)
    ds = ShardDataset.in_order(shards, split, 256, collate)
    out: dict[str, list] = {}
    model.eval()
    with torch.no_grad():
        for batch in ds:
            for k, v in family.embed(model, batch).items():
                out.setdefault(k, []).append(v.numpy())
            for t in targets:
                out.setdefault(t, []).append(batch[t].numpy())
            if "image" in batch:
                out.setdefault("raw_image", []).append(batch["image"].flatten(1).numpy())
            if "spectrum" in batch:
                out.setdefault("raw_spectrum", []).append(batch["spectrum"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def knn_r2(x_train, y_train, x_test, y_test, k: int = 16) -> float:
    from sklearn.metrics import r2_score
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    ok_train, ok_test = np.isfinite(y_train), np.isfinite(y_test)
    scaler = StandardScaler().fit(x_train[ok_train])
    knn = KNeighborsRegressor(n_neighbors=k, weights="distance").fit(
        scaler.transform(x_train[ok_train]), y_train[ok_train]
    )
    return float(r2_score(y_test[ok_test], knn.predict(scaler.transform(x_test[ok_test]))))


def cross_modal_r2(query_test, bank_train, y_train, y_test, k: int = 16) -> float:
    """Query one modality's test embeddings against the other modality's train embeddings (cosine)."""
    from sklearn.metrics import r2_score

    sims = query_test @ bank_train.T
    top = np.argsort(-sims, axis=1)[:, :k]
    w = np.take_along_axis(sims, top, axis=1).clip(min=1e-6)
    pred = (w * y_train[top]).sum(1) / w.sum(1)
    return float(r2_score(y_test, pred))


def retrieval_top1(a, b) -> float:
    return float((np.argmax(a @ b.T, axis=1) == np.arange(len(a))).mean())


def pca_baseline(train, test, key, components: int = 32) -> float:
    from sklearn.decomposition import PCA

    pca = PCA(components, random_state=0).fit(train[key])
    return knn_r2(pca.transform(train[key]), train["redshift"], pca.transform(test[key]), test["redshift"])


def evaluate(work: Path, run_dirs: dict[str, Path], shards: Path) -> dict:
    import torch

    from foundation.train import load_pretrained

    rows = {}
    spec_model, spec_cfg, family = load_pretrained(run_dirs["specformer"])
    tr = embed_split(spec_model, family, spec_cfg.model, shards, "train")
    te = embed_split(spec_model, family, spec_cfg.model, shards, "test")
    rows["SpecFormer (stage 1, mean-pooled)"] = {
        "R2 z spectrum": knn_r2(tr["spectrum"], tr["redshift"], te["spectrum"], te["redshift"])
    }
    model, cfg, family = load_pretrained(run_dirs["align"])
    tr = embed_split(model, family, cfg.model, shards, "train")
    te = embed_split(model, family, cfg.model, shards, "test")
    chance = 1.0 / len(te["image"])
    rows["PCA of raw inputs (32 comp.)"] = {
        "R2 z spectrum": pca_baseline(tr, te, "raw_spectrum"),
        "R2 z image": pca_baseline(tr, te, "raw_image"),
    }

    def scores(trn, tst):
        return {
            "R2 z spectrum": knn_r2(trn["spectrum"], trn["redshift"], tst["spectrum"], tst["redshift"]),
            "R2 z image": knn_r2(trn["image"], trn["redshift"], tst["image"], tst["redshift"]),
            "R2 z image->spectrum bank": cross_modal_r2(
                tst["image"], trn["spectrum"], trn["redshift"], tst["redshift"]
            ),
            "top1 image->spectrum": retrieval_top1(tst["image"], tst["spectrum"]),
            "top1 spectrum->image": retrieval_top1(tst["spectrum"], tst["image"]),
        }

    rows["AstroCLIP aligned"] = scores(tr, te)
    torch.manual_seed(0)
    from foundation.data import Manifest

    fresh_cfg = type(cfg.model)(**{**cfg.model.__dict__, "spectrum_init": None, "image_init": None})
    random_model = family.build_model(fresh_cfg, Manifest.load(shards))  # same normalisation, random weights
    rows["random-init towers + heads"] = scores(
        embed_split(random_model, family, cfg.model, shards, "train"),
        embed_split(random_model, family, cfg.model, shards, "test"),
    )
    if "shuffled" in run_dirs and run_dirs["shuffled"].exists():
        m2, c2, _ = load_pretrained(run_dirs["shuffled"])
        rows["shuffled-pair control"] = scores(
            embed_split(m2, family, c2.model, shards, "train"),
            embed_split(m2, family, c2.model, shards, "test"),
        )
    return {
        "rows": rows,
        "chance_top1": chance,
        "test_objects": len(te["image"]),
        "train_objects": len(tr["image"]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/astroclip-quality")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--wave-step", type=float, default=2.0)
    p.add_argument("--grid", default="3600:9824:8")
    p.add_argument("--cutout", type=int, default=40)
    p.add_argument("--spec-config", default="configs/astroclip/specformer-tiny.yaml")
    p.add_argument("--align-config", default="configs/astroclip/align-tiny.yaml")
    p.add_argument("--spec-overrides", default="", help="Extra dotted overrides, space-separated.")
    p.add_argument("--align-overrides", default="")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training processes.")
    p.add_argument("--no-control", action="store_true", help="Skip the shuffled-pair control run.")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fnd = [sys.executable, "-m", "foundation.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    timings: dict = {}
    data, shards, shuffled = work / "data", work / "shards", work / "shards-shuffled"
    runs = {
        "specformer": work / "runs/specformer",
        "align": work / "runs/align",
        "shuffled": work / "runs/align-shuffled",
    }
    run_stage(
        "synth",
        fnd
        + [
            "synth",
            "astroclip",
            "--out",
            str(data),
            "--n",
            str(args.n),
            "--image-size",
            str(args.image_size),
            "--wave-step",
            str(args.wave_step),
        ],
        data / "desi",
        timings,
        env,
    )
    run_stage(
        "prepare",
        fnd
        + [
            "prepare",
            "astroclip",
            "--images",
            str(data / "legacysurvey"),
            "--spectra",
            str(data / "desi"),
            "--catalog",
            str(data / "provabgs"),
            "--grid",
            args.grid,
            "--cutout",
            str(args.cutout),
            "--out",
            str(shards),
        ],
        shards / "manifest.json",
        timings,
        env,
    )
    common = [f"data.path={shards}"]
    run_stage(
        "pretrain spectrum",
        fnd
        + [
            "pretrain",
            args.spec_config,
            *common,
            f"run.dir={runs['specformer']}",
            *args.spec_overrides.split(),
        ],
        runs["specformer"] / "model.pt",
        timings,
        env,
    )
    align = [f"model.spectrum_init={runs['specformer']}", *args.align_overrides.split()]
    run_stage(
        "align",
        fnd + ["pretrain", args.align_config, *common, f"run.dir={runs['align']}", *align],
        runs["align"] / "model.pt",
        timings,
        env,
    )
    if not args.no_control:
        if not (shuffled / "manifest.json").exists():
            shuffle_pairs(shards, shuffled)
        run_stage(
            "align (shuffled pairs)",
            fnd
            + ["pretrain", args.align_config, f"data.path={shuffled}", f"run.dir={runs['shuffled']}", *align],
            runs["shuffled"] / "model.pt",
            timings,
            env,
        )
    result = evaluate(work, runs, shards)
    result["timings"] = timings
    (work / "quality.json").write_text(json.dumps(result, indent=2))
    cols = [
        "R2 z spectrum",
        "R2 z image",
        "R2 z image->spectrum bank",
        "top1 image->spectrum",
        "top1 spectrum->image",
    ]
    print(
        f"\ntest objects: {result['test_objects']} (train {result['train_objects']}); chance top-1 = "
        f"{result['chance_top1']:.4f}"
    )
    print("| model | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, row in result["rows"].items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in cols) + " |")
    print("\nCPU seconds per stage:", json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
