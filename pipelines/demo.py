"""`foundation demo [--out DIR]`: the whole AstroCLIP pipeline on built-in data, on a CPU, resumable.

    synth astroclip → prepare astroclip → pretrain (SpecFormer masked modelling) → pretrain
    (contrastive alignment) → export (+ random-init control [+ shuffled-pair control]) → search
    index + an example query → zero-shot regression report → retrieval report → summary,
    and the property table's supervised baselines (after prepare, beside the alignment) and the
    spectrum tower's own embeddings (after its pretraining; regression only)

Each stage is one `foundation ...` command run by the stage engine `foundation.stages` (a child
process each, output in `DIR/logs/<stage>.log`, a marker in `DIR/.stages/<stage>.json` when it
succeeds). Re-running the demo skips every stage whose marker matches and whose outputs exist; a
stage that changed (other options) or whose inputs were redone runs again, and so does everything
after it. An interrupted pretraining or export resumes from its own checkpoint / partial file. This
module holds the plan (which commands, in which order), the settings and the summary, which is read
from the reports the evaluation commands wrote; the demo computes no number of its own. Stages that
do not depend on each other run side by side (`--jobs`, default 2), each with its share of the cores.

Controls: raw-input baselines (PCA + k-NN and a supervised MLP on pixels
/ fluxes) and a random-initialised model are always evaluated; `--controls` also trains the
alignment again on a shard set whose spectra are permuted among the training objects (the
shuffled-pair control), which roughly doubles the alignment time.
"""

from __future__ import annotations

import argparse
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundation.atomic import write_text
from foundation.cli import Command
from foundation.errors import ConfigError
from foundation.stages import Stage, read_json, run_stages

REPO_ROOT = Path(__file__).resolve().parents[1]
RAW_FIELDS = "image=image,spectrum=spectrum"
#: Rows the paper's table supersedes, left out of the demo's zero-shot report: the MLP probe (the
#: table's few-shot MLP is the same protocol) and the raw-input supervised MLP on PCA components
#: (the table's supervised baselines train on the raw inputs end to end).
ZERO_SHOT_LIGHTER = ("--no-mlp", "--no-supervised")


# ----------------------------------------------------------------------------- the AstroCLIP demo


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults take ~6.5 min on 2 idle cores with AMX (bf16), 7.5 min on
    the same CPU in fp32 and 10.5 min on an AVX2-only one (docs/embeddings.md, "Time")."""

    n: int = 5000
    spectrum_steps: int | None = None
    """None: the spectrum config's own train.steps."""
    align_steps: int | None = None
    """None: the alignment config's own train.steps."""
    seed: int = 0
    controls: bool = False
    spectrum_config: str = "configs/astroclip/specformer-tiny.yaml"
    align_config: str = "configs/astroclip/align-tiny.yaml"
    precision: str = "auto"
    """Training precision: auto = bf16 where the CPU has bf16 matrix hardware (AMX), else fp32."""
    targets: tuple[str, ...] = ("redshift", "stellar_mass")
    extra_pretrain: tuple[str, ...] = ()
    """Dotted overrides added to both pretraining commands (e.g. data.num_workers=0)."""
    jobs: int = 2
    """Independent stages run side by side (the baselines beside the alignment and the exports)."""


def training_precision(requested: str) -> str:
    """The demo's pretraining precision: `auto` takes bf16 autocast where the CPU has AMX (about
    1.4x the samples/s of fp32 in stage 1 there), fp32 elsewhere (AVX-512-BF16 alone: 0.78x of
    fp32; AVX2: emulated, 6x slower); a GPU run is bf16 either way."""
    from foundation.device import PRECISIONS, cpu_bf16_is_fast

    if requested not in PRECISIONS:
        raise ConfigError(f"--precision takes auto, fp32 or bf16, not {requested!r}")
    if requested != "auto":
        return requested

    return "bf16" if cpu_bf16_is_fast() else "auto"


def _config(path: str) -> str:
    p = Path(path)
    if not p.is_absolute():
        p = REPO_ROOT / p
    if not p.is_file():
        raise ConfigError(
            f"demo config {p} does not exist; the demo needs the repository's configs/ folder "
            "(install with `pip install -e .` from a checkout) or pass --spectrum-config / --align-config"
        )
    return str(p)


def data_recipe(align_config: str) -> dict[str, str]:
    """synth/prepare options that fit the alignment config's towers: the spectrum grid it expects,
    cutouts big enough for its crop plus shifts (synth draws a slightly larger stamp)."""
    from foundation.config import read_yaml

    model = read_yaml(align_config).get("model") or {}
    spectrum, image = model.get("spectrum") or {}, model.get("image") or {}
    try:
        grid = f"{spectrum['wave_min']}:{spectrum['wave_max']}:{spectrum['wave_step']}"
        cutout = int(image["size"]) + 2 * int(image.get("max_shift", 0))
    except KeyError as exc:
        raise ConfigError(
            f"{align_config}: model.spectrum.wave_* and model.image.size are needed ({exc})"
        ) from None
    return {"grid": grid, "cutout": str(cutout), "image_size": str(cutout + 8)}


def synth_argv(survey: Path, n: int, recipe: dict[str, str]) -> list[str]:
    """`foundation synth astroclip` arguments for a survey that fits `recipe` (see data_recipe)."""
    return [
        "synth",
        "astroclip",
        "--out",
        str(survey),
        "--n",
        str(n),
        "--image-size",
        recipe["image_size"],
        "--wave-step",
        "2",
    ]


def prepare_argv(survey: Path, shards: Path, recipe: dict[str, str]) -> list[str]:
    """`foundation prepare astroclip` arguments for a survey written by `synth astroclip`."""
    return [
        "prepare",
        "astroclip",
        "--images",
        str(survey / "legacysurvey"),
        "--spectra",
        str(survey / "desi"),
        "--catalog",
        str(survey / "provabgs"),
        "--grid",
        recipe["grid"],
        "--cutout",
        recipe["cutout"],
        "--out",
        str(shards),
    ]


def _config_steps(path: str) -> int:
    from foundation.config import read_yaml

    steps = (read_yaml(path).get("train") or {}).get("steps")
    if not isinstance(steps, int):
        raise ConfigError(f"{path} sets no train.steps; pass --spectrum-steps / --align-steps")
    return steps


@dataclass(frozen=True)
class _Layout:
    """Where the demo's stages read and write, under its output folder."""

    out: Path

    @property
    def survey(self) -> Path:
        return self.out / "survey"

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def emb(self) -> Path:
        return self.out / "embeddings"

    @property
    def baselines(self) -> Path:
        return self.out / "reports" / "baselines.json"


def _pretrain_argv(
    config: str, data: Path, run_dir: Path, steps: int, common: list[str], init: Path | None = None
) -> list[str]:
    """`foundation pretrain` arguments (with `model.spectrum_init` for the alignment runs)."""
    spectrum_init = [f"model.spectrum_init={init}"] if init is not None else []
    return [
        "pretrain",
        config,
        f"data.path={data}",
        f"run.dir={run_dir}",
        *spectrum_init,
        f"train.steps={steps}",
        *common,
    ]


def _export_stage(
    name: str, description: str, checkpoint: Path, data: Path, out: Path, trained_by: str, *options: str
) -> Stage:
    """A `foundation export` of `checkpoint` (written by stage `trained_by`) over `data` into `out`;
    `options` follow the checkpoint (--random-init and its overrides). A redone stage starts afresh:
    its output and partial file are removed."""
    from foundation.embeddings import partial_path

    return Stage(
        name,
        description,
        [out],
        argv=["export", "--checkpoint", str(checkpoint), *options]
        + ["--data", str(data), "--out", str(out), "--progress", "off"],
        after=["prepare", trained_by],
        clean=[out, partial_path(out)],
    )


def _data_stages(at: _Layout, s: DemoSettings, recipe: dict[str, str]) -> list[Stage]:
    """Synthetic survey, then shards."""
    survey, shards = at.survey, at.shards
    return [
        Stage(
            "synth",
            f"write a synthetic galaxy survey of {s.n} objects (MMU HDF5: images, spectra, catalogue)",
            [survey / "legacysurvey", survey / "desi", survey / "provabgs"],
            argv=[*synth_argv(survey, s.n, recipe), "--seed", str(s.seed), "--overwrite"],
        ),
        Stage(
            "prepare",
            "cross-match images and spectra on the sky, join the catalogue, write shards",
            [shards / "manifest.json"],
            argv=[*prepare_argv(survey, shards, recipe), "--seed", str(s.seed), "--overwrite"],
            after=["synth"],
        ),
    ]


def _pretrain_stages(at: _Layout, s: DemoSettings, common: list[str], steps: tuple[int, int]) -> list[Stage]:
    """SpecFormer masked modelling of the spectrum tower, then the contrastive alignment."""
    spectrum_steps, align_steps = steps
    spectrum_config, align_config = _config(s.spectrum_config), _config(s.align_config)
    return [
        Stage(
            "pretrain-spectrum",
            f"SpecFormer masked-segment pretraining of the spectrum tower ({spectrum_steps} steps)",
            [at.runs / "spectrum" / "model.pt"],
            argv=_pretrain_argv(spectrum_config, at.shards, at.runs / "spectrum", spectrum_steps, common),
            after=["prepare"],
            inputs=[Path(spectrum_config)],
            clean=[at.runs / "spectrum"],
            alone=True,  # the longest stage: two threads (~1.6x) beat sharing it with the baselines
        ),
        Stage(
            "pretrain-align",
            f"contrastive alignment of image and spectrum ({align_steps} steps)",
            [at.runs / "astroclip" / "model.pt"],
            argv=_pretrain_argv(
                align_config, at.shards, at.runs / "astroclip", align_steps, common, at.runs / "spectrum"
            ),
            after=["prepare", "pretrain-spectrum"],
            inputs=[Path(align_config)],
            clean=[at.runs / "astroclip"],
        ),
    ]


def _baselines_stage(at: _Layout, s: DemoSettings) -> Stage:
    """The property table's supervised baselines: they read only the shards, so they train beside
    the alignment, the exports and the search (one thread each: two one-thread processes use two
    cores better than one process of two threads); the spectrum pretraining runs alone before."""
    return Stage(
        "baselines",
        "supervised baselines of the property table (image CNN, spectrum conv+attention, photometry MLP)",
        [at.baselines],
        argv=[
            "evaluate",
            "baselines",
            "--raw-data",
            str(at.shards),
            "--raw-fields",
            RAW_FIELDS,
            "--seed",
            str(s.seed),
            "--out",
            str(at.baselines),
        ],
        after=["prepare"],
    )


def _export_stages(at: _Layout) -> list[Stage]:
    """Embeddings of the aligned model, of its randomly initialised control and of the spectrum
    tower before the alignment (the paper's SpecFormer row)."""
    aligned, random_init, tower = at.emb / "astroclip.h5", at.emb / "random-init.h5", at.emb / "specformer.h5"
    no_towers = ("--override", "model.spectrum_init=null", "--override", "model.image_init=null")
    aligned_run, tower_run = at.runs / "astroclip", at.runs / "spectrum"
    return [
        _export_stage(
            "export",
            "embed every object with the aligned model",
            aligned_run,
            at.shards,
            aligned,
            "pretrain-align",
        ),
        _export_stage(
            "export-random-init",
            "control: embed with the same architecture, randomly initialised (no pretrained tower)",
            aligned_run,
            at.shards,
            random_init,
            "pretrain-align",
            "--random-init",
            *no_towers,
        ),
        _export_stage(
            "export-spectrum-tower",
            "embed every spectrum with the masked-modelling tower alone, before the alignment",
            tower_run,
            at.shards,
            tower,
            "pretrain-spectrum",
        ),
    ]


def _shuffled_pair_stages(at: _Layout, s: DemoSettings, common: list[str], align_steps: int) -> list[Stage]:
    """The shuffled-pair control: the alignment trained again on spectra permuted among objects."""
    shards, shuffled, shuffled_emb = at.shards, at.out / "shards-shuffled", at.emb / "shuffled.h5"
    align_config = _config(s.align_config)
    return [
        Stage(
            "shuffle-pairs",
            "control: a copy of the shards with spectra permuted among the training objects",
            [shuffled / "manifest.json"],
            func=lambda: _shuffle_pairs(shards, shuffled, seed=s.seed),
            key=f"shuffle_pairs(seed={s.seed})",
            after=["prepare"],
        ),
        Stage(
            "pretrain-align-shuffled",
            f"control: the same alignment on shuffled pairs ({align_steps} steps)",
            [at.runs / "shuffled" / "model.pt"],
            argv=_pretrain_argv(
                align_config, shuffled, at.runs / "shuffled", align_steps, common, at.runs / "spectrum"
            ),
            after=["shuffle-pairs", "pretrain-spectrum"],
            inputs=[Path(align_config)],
            clean=[at.runs / "shuffled"],
        ),
        _export_stage(
            "export-shuffled",
            "control: embed the true pairs with the shuffled-pair model",
            at.runs / "shuffled",
            shards,
            shuffled_emb,
            "pretrain-align-shuffled",
        ),
    ]


def _search_stages(at: _Layout) -> list[Stage]:
    """A spectrum index, and an example cross-modal query of it."""
    search, index, aligned = at.out / "search", at.out / "index", at.emb / "astroclip.h5"
    build = ["search", "build", "--embeddings", str(aligned), "--modality", "spectrum", "--out", str(index)]
    query = [
        "search",
        "query",
        "--index",
        str(index),
        "--query-modality",
        "image",
        "--ids-file",
        str(search / "query_ids.txt"),
        "--k",
        "5",
        "--save",
        str(search / "query.json"),
        "--plot",
        str(search / "query.png"),
    ]
    return [
        Stage(
            "search-index",
            "faiss index over the spectrum embeddings",
            [index / "index.json"],
            argv=[*build, "--overwrite"],
            after=["export"],
        ),
        Stage(
            "query-ids",
            "pick held-out galaxies for the example query",
            [search / "query_ids.txt"],
            func=lambda: write_query_ids(aligned, search / "query_ids.txt"),
            key="first 3 test-split objects of embeddings/astroclip.h5",
            after=["export"],
        ),
        Stage(
            "search-query",
            "example cross-modal search: held-out galaxy images -> nearest spectra (JSON + PNG)",
            [search / "query.json", search / "query.png"],
            argv=query,
            after=["search-index", "query-ids"],
        ),
    ]


def _evaluation_stages(
    at: _Layout, s: DemoSettings, labelled: list[str], evaluated: list[str], single: dict[str, str]
) -> list[Stage]:
    """Zero-shot regression and retrieval reports over every export (`labelled`, made by `evaluated`);
    exports of one modality (`single`: label=file by the stage making it) get the regression only."""
    reports = at.out / "reports"
    embeddings = [a for item in labelled for a in ("--embeddings", item)]
    regressed = [*embeddings, *(a for item in single.values() for a in ("--embeddings", item))]
    return [
        Stage(
            "zero-shot",
            "zero-shot k-NN regression and the paper's property table, against baselines and the controls",
            [reports / "zero-shot" / "report.json"],
            argv=[
                "evaluate",
                "zero-shot",
                *regressed,
                "--targets",
                ",".join(s.targets),
                "--raw-data",
                str(at.shards),
                "--raw-fields",
                RAW_FIELDS,
                *ZERO_SHOT_LIGHTER,
                "--seed",
                str(s.seed),
                "--out",
                str(reports / "zero-shot"),
                "--paper-table",
                "--baselines-from",
                str(at.baselines),
            ],
            after=[*evaluated, *single, "baselines"],
        ),
        Stage(
            "retrieval",
            "cross-modal retrieval (top-k, median rank) against chance and the controls",
            [reports / "retrieval" / "report.json"],
            argv=[
                "evaluate",
                "retrieval",
                *embeddings,
                "--out",
                str(reports / "retrieval"),
                "--paper-table",
                "--raw-data",
                str(at.shards),
            ],
            after=evaluated,
        ),
    ]


def plan(out: Path, s: DemoSettings) -> list[Stage]:
    """The demo's stages, in order."""
    at = _Layout(out)
    common = [f"run.seed={s.seed}", f"train.precision={training_precision(s.precision)}", *s.extra_pretrain]
    recipe = data_recipe(_config(s.align_config))
    spectrum_steps = s.spectrum_steps or _config_steps(_config(s.spectrum_config))
    align_steps = s.align_steps or _config_steps(_config(s.align_config))
    stages = [
        *_data_stages(at, s, recipe),
        *_pretrain_stages(at, s, common, (spectrum_steps, align_steps)),
        _baselines_stage(at, s),
        *_export_stages(at),
    ]
    labelled = [f"astroclip={at.emb / 'astroclip.h5'}", f"random-init={at.emb / 'random-init.h5'}"]
    evaluated = ["export", "export-random-init"]
    if s.controls:
        stages += _shuffled_pair_stages(at, s, common, align_steps)
        labelled.append(f"shuffled-pairs={at.emb / 'shuffled.h5'}")
        evaluated.append("export-shuffled")
    single = {"export-spectrum-tower": f"specformer={at.emb / 'specformer.h5'}"}
    evaluations = _evaluation_stages(at, s, labelled, evaluated, single)
    return stages + _search_stages(at) + evaluations + [_report_stage(at, evaluations)]


def _report_stage(at: _Layout, evaluations: list[Stage]) -> Stage:
    """`foundation report` over every result table the evaluations wrote (last, so that it sees all)."""
    report = at.out / "report"
    return Stage(
        "report",
        "the papers' result tables, ours beside the paper's, as Markdown and HTML pages",
        [report / "index.html"],
        argv=["report", str(at.out / "reports"), "--out", str(report), "--overwrite"],
        after=[stage.name for stage in evaluations],
    )


def write_query_ids(embeddings: Path, path: Path, count: int = 3) -> list[str]:
    """The first `count` held-out objects of an export (test split if recorded)."""
    from foundation.embeddings import open_embeddings

    with open_embeddings(embeddings) as emb:
        split = emb.split
        rows = [i for i in range(emb.rows) if split is None or split[i] == "test"][:count] or list(
            range(count)
        )
        ids = [str(emb.ids[i]) for i in rows]
    write_text(path, "\n".join(ids) + "\n")
    return ids


def _shuffle_pairs(src: Path, dst: Path, *, seed: int) -> None:
    """The shuffled-pair control stage (the library is imported when it runs, so that
    `foundation --help` does not load it)."""
    from encoders.astroclip.prepare import shuffle_pairs

    shuffle_pairs(src, dst, seed=seed)


# ----------------------------------------------------------------------------- summary


def summary(out: Path, markers: list[dict[str, Any]]) -> str:
    """The table printed at the end, read from the evaluation reports (and stage markers)."""
    from pipelines.evaluate_common import markdown_table

    lines = []
    zs = read_json(out / "reports" / "zero-shot" / "report.json")
    if zs:
        from pipelines.evaluate_zeroshot import render_table

        lines += [
            "Zero-shot regression, held-out split (R²; redshift MAE, outlier fraction |dz|/(1+z) > 0.15):",
            "",
            render_table(zs["results"]),
            "",
        ]
    ret = read_json(out / "reports" / "retrieval" / "report.json")
    if ret:
        from pipelines.evaluate_retrieval import render

        lines += ["Cross-modal retrieval (held-out objects):", "", render(ret["results"], ret["ks"]), ""]
    rows = [
        [m["stage"], f"{m['wall_seconds']:.0f}", f"{m['cpu_seconds']:.0f}", m["finished"]] for m in markers
    ]
    lines += [
        "Stages (wall and CPU seconds of the run that produced them):",
        "",
        markdown_table(["stage", "wall s", "CPU s", "finished"], rows),
        "",
    ]
    lines += ["Artefacts:"]
    for label, path in [
        ("shards", out / "shards"),
        ("runs", out / "runs"),
        ("embeddings", out / "embeddings"),
        ("search index", out / "index"),
        ("example query", out / "search" / "query.png"),
        ("zero-shot report", out / "reports" / "zero-shot" / "report.md"),
        ("retrieval report", out / "reports" / "retrieval" / "report.md"),
        ("property table", out / "reports" / "zero-shot" / "astroclip-properties.table.json"),
        ("differences", out / "reports" / "zero-shot" / "astroclip-property-differences.table.json"),
        ("retrieval table", out / "reports" / "retrieval" / "astroclip-retrieval.table.json"),
        ("result tables", out / "report" / "index.html"),
        ("logs", out / "logs"),
    ]:
        if path.exists():
            lines.append(f"  {label:<18} {path}")
    return "\n".join(lines)


def browse_command(out: Path) -> str:
    """`foundation search serve` over the demo's index, embeddings and shards (a page on localhost)."""
    emb, shards = out / "embeddings" / "astroclip.h5", out / "shards"
    return "foundation search serve " + shlex.join(
        map(str, [out / "index", "--embeddings", emb, "--data", shards])
    )


# ----------------------------------------------------------------------------- command


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    parser.add_argument(
        "--out", default="demo", help="Directory for everything the demo makes (default ./demo)."
    )
    parser.add_argument(
        "--n", type=int, default=d.n, help=f"Galaxies in the synthetic survey (default {d.n})."
    )
    parser.add_argument(
        "--spectrum-steps", type=int, help="Masked-modelling steps (default: the config's train.steps)."
    )
    parser.add_argument(
        "--align-steps", type=int, help="Contrastive alignment steps (default: the config's)."
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="The one seed of data, training and evaluation."
    )
    parser.add_argument(
        "--controls",
        action="store_true",
        help="Also train the shuffled-pair control (about 2x alignment time).",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=d.precision,
        help="Pretraining precision (default auto: bf16 on CPUs with AMX and on GPUs, else fp32).",
    )
    parser.add_argument("--spectrum-config", default=d.spectrum_config, help="Spectrum pretraining config.")
    parser.add_argument("--align-config", default=d.align_config, help="Alignment config.")
    parser.add_argument(
        "--jobs",
        type=int,
        default=d.jobs,
        help=f"Independent stages run at once, sharing the cores (default {d.jobs}; 1: one by one).",
    )
    parser.add_argument(
        "--pretrain-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Extra dotted override for both pretraining runs (repeatable).",
    )


def _run(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, not {args.jobs}")
    out = Path(args.out).resolve()
    settings = DemoSettings(
        n=args.n,
        spectrum_steps=args.spectrum_steps,
        align_steps=args.align_steps,
        seed=args.seed,
        controls=args.controls,
        precision=args.precision,
        spectrum_config=args.spectrum_config,
        align_config=args.align_config,
        extra_pretrain=tuple(args.pretrain_override),
        jobs=args.jobs,
    )
    stages = plan(out, settings)
    start = time.perf_counter()
    print(f"foundation demo -> {out}")
    markers = run_stages(stages, out, jobs=settings.jobs)
    text = summary(out, markers)
    write_text(out / "SUMMARY.md", "# foundation demo\n\n" + text + "\n")
    print()
    print(text)
    print(f"\ntotal {time.perf_counter() - start:.0f} s this run; summary -> {out / 'SUMMARY.md'}")
    print(f"result tables (Markdown and HTML) -> {out / 'report' / 'index.html'}")
    if (out / "index" / "index.json").exists():
        print(f"browse the search results: {browse_command(out)}")
    return 0


COMMANDS = [
    Command(
        ("demo",),
        "Run the whole AstroCLIP pipeline on built-in data (2 idle CPU cores: 6-12 min; re-running resumes).",
        _add_arguments,
        _run,
    )
]
