"""`foundation demo [--out DIR]`: the whole AstroCLIP pipeline on built-in data, on a CPU, resumable.

    synth astroclip → prepare astroclip → pretrain (SpecFormer masked modelling) → pretrain
    (contrastive alignment) → export (+ random-init control [+ shuffled-pair control]) → search
    index + an example query → zero-shot regression report → retrieval report → summary

Each stage is one `foundation ...` command (printed, so it can be re-run by hand) run as a child
process with its output in `DIR/logs/<stage>.log`. When a stage succeeds a marker
`DIR/.stages/<stage>.json` records the command, what it produced, its timings and a fingerprint
of the command plus the runs of the stages it depends on. Re-running the demo skips every stage
whose marker matches and whose outputs exist; a stage that changed (other options) or whose
inputs were redone runs again, and so does everything after it. An interrupted pretraining or
export resumes from its own checkpoint / partial file. The summary is read from the reports
the evaluation commands wrote; the demo computes no number of its own.

Controls: raw-input baselines (PCA + k-NN and a supervised MLP on pixels
/ fluxes) and a random-initialised model are always evaluated; `--controls` also trains the
alignment again on a shard set whose spectra are permuted among the training objects (the
shuffled-pair control), which roughly doubles the alignment time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation.cli import Command
from foundation.errors import ConfigError, FoundationError

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKERS = ".stages"


class StageFailed(FoundationError):
    """A demo stage exited with an error (its log says why)."""


@dataclass
class Stage:
    """One step of the demo: a `foundation` command, or an in-process function for glue steps."""

    name: str
    description: str
    outputs: list[Path]
    argv: list[str] | None = None
    """Arguments of `foundation` (run as `python -m foundation.cli ARGV`)."""
    func: Callable[[], None] | None = None
    key: str = ""
    """For `func` stages: what determines their result (part of the fingerprint)."""
    after: list[str] = field(default_factory=list)
    """Stages whose results this one reads: redoing them redoes this."""
    inputs: list[Path] = field(default_factory=list)
    """Files (configs) whose content is part of the fingerprint: editing one redoes the stage."""
    clean: list[Path] = field(default_factory=list)
    """What to delete before redoing a stage whose earlier result is stale (a run directory that
    holds checkpoints of another config, an export of other weights); an interrupted stage (no
    marker) keeps them, so that it resumes."""


def _fingerprint(stage: Stage, upstream: Sequence[str]) -> str:
    contents = {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in stage.inputs}
    blob = json.dumps(
        {"argv": stage.argv, "key": stage.key, "upstream": list(upstream), "inputs": contents}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_stages(
    stages: Sequence[Stage], out: Path, echo: Callable[[str], None] = print, *, in_process: bool = False
) -> list[dict[str, Any]]:
    """Run (or skip) every stage in order; returns the markers of all stages.

    `in_process` runs the `foundation` commands in this interpreter instead of child processes
    (saves each one's start-up; for tests - a child process is the isolation users get)."""
    from foundation import __version__

    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    runs: dict[str, str] = {}  # stage name -> run id of its result
    markers = []
    for number, stage in enumerate(stages, 1):
        missing_deps = [d for d in stage.after if d not in runs]
        if missing_deps:
            raise ValueError(f"stage {stage.name} depends on {missing_deps}, which do not come before it")
        fingerprint = _fingerprint(stage, [runs[d] for d in stage.after])
        marker_path = out / MARKERS / f"{stage.name}.json"
        marker = _read_marker(marker_path)
        head = f"[{number}/{len(stages)}] {stage.name}"
        if (
            marker is not None
            and marker.get("fingerprint") == fingerprint
            and all(Path(p).exists() for p in stage.outputs)
        ):
            echo(f"{head}: done already ({marker['finished']}, {marker['wall_seconds']:.0f} s) - skipped")
            runs[stage.name] = marker["run_id"]
            markers.append(marker)
            continue
        echo(f"{head}: {stage.description}")
        if marker is not None:  # done before, with other inputs: its old results must not be resumed
            stale = [p for p in stage.clean if p.exists()]
            for path in stale:
                _remove(path)
            if stale:
                echo(f"    (inputs changed since {marker['finished']}; removed {', '.join(map(str, stale))})")
            marker_path.unlink()
        log_path = logs / f"{stage.name}.log"
        start, cpu_start = time.perf_counter(), _children_cpu() + _self_cpu()
        if stage.argv is not None:
            command = "foundation " + shlex.join(stage.argv)
            echo(f"    $ {command}")
            _run_command(stage.argv, log_path, echo, in_process=in_process)
        else:
            command = f"(in-process) {stage.key}"
            assert stage.func is not None
            stage.func()
        absent = [str(p) for p in stage.outputs if not Path(p).exists()]
        if absent:
            raise StageFailed(
                f"stage {stage.name} finished but did not produce {', '.join(absent)}; see {log_path}"
            )
        wall = time.perf_counter() - start
        marker = {
            "stage": stage.name,
            "command": command,
            "fingerprint": fingerprint,
            "run_id": uuid.uuid4().hex,
            "upstream": {d: runs[d] for d in stage.after},
            "outputs": [str(p) for p in stage.outputs],
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_seconds": round(wall, 1),
            "cpu_seconds": round(_children_cpu() + _self_cpu() - cpu_start, 1),
            "foundation_version": __version__,
            "log": str(log_path) if stage.argv is not None else None,
        }
        _write_marker(marker_path, marker)
        runs[stage.name] = marker["run_id"]
        markers.append(marker)
        echo(f"    done in {wall:.0f} s (CPU {marker['cpu_seconds']:.0f} s)")
    return markers


def _run_command(
    argv: list[str], log_path: Path, echo: Callable[[str], None], *, in_process: bool = False
) -> None:
    """`python -m foundation.cli ARGV`, its output streamed to the log and (indented) to the screen."""
    if in_process:
        import contextlib

        from foundation.cli import main

        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ foundation {shlex.join(argv)}\n")
            log.flush()
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                try:
                    code = main(argv)
                except SystemExit as exc:  # argparse errors
                    code = exc.code if isinstance(exc.code, int) else 2
        if code != 0:
            raise StageFailed(
                f"`foundation {shlex.join(argv)}` failed (exit {code}); its output is in {log_path}"
            )
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ foundation {shlex.join(argv)}\n")
        proc = subprocess.Popen(
            [sys.executable, "-m", "foundation.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            bufsize=1,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                echo("    | " + line.rstrip())
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        code = proc.wait()
    if code != 0:
        raise StageFailed(
            f"`foundation {shlex.join(argv)}` failed (exit {code}); its output is in {log_path}. "
            "Fix the cause and run the demo again: finished stages are kept"
        )


# ----------------------------------------------------------------------------- the AstroCLIP demo


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults fit 10 minutes on a 2-core CPU (see docs/embeddings.md)."""

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


def training_precision(requested: str) -> str:
    """The demo's pretraining precision: `auto` takes bf16 autocast where the CPU has AMX (about
    1.45x the samples/s of fp32 in stage 1 there), fp32 elsewhere; a GPU run is bf16 either way."""
    if requested not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision takes auto, fp32 or bf16, not {requested!r}")
    if requested != "auto":
        return requested
    from foundation.train.trainer import cpu_bf16_is_fast

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


def _export_files(path: Path) -> list[Path]:
    from foundation.embeddings import partial_path

    return [path, partial_path(path)]


def _config_steps(path: str) -> int:
    from foundation.config import read_yaml

    steps = (read_yaml(path).get("train") or {}).get("steps")
    if not isinstance(steps, int):
        raise ConfigError(f"{path} sets no train.steps; pass --spectrum-steps / --align-steps")
    return steps


def plan(out: Path, s: DemoSettings) -> list[Stage]:
    """The demo's stages, in order."""
    survey, shards, runs, emb = out / "survey", out / "shards", out / "runs", out / "embeddings"
    reports = out / "reports"
    common = [f"run.seed={s.seed}", f"train.precision={training_precision(s.precision)}", *s.extra_pretrain]
    recipe = data_recipe(_config(s.align_config))
    spectrum_steps = s.spectrum_steps or _config_steps(_config(s.spectrum_config))
    align_steps = s.align_steps or _config_steps(_config(s.align_config))
    stages = [
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
        Stage(
            "pretrain-spectrum",
            f"SpecFormer masked-segment pretraining of the spectrum tower ({spectrum_steps} steps)",
            [runs / "spectrum" / "model.pt"],
            argv=[
                "pretrain",
                _config(s.spectrum_config),
                f"data.path={shards}",
                f"run.dir={runs / 'spectrum'}",
                f"train.steps={spectrum_steps}",
                *common,
            ],
            after=["prepare"],
            inputs=[Path(_config(s.spectrum_config))],
            clean=[runs / "spectrum"],
        ),
        Stage(
            "pretrain-align",
            f"contrastive alignment of image and spectrum ({align_steps} steps)",
            [runs / "astroclip" / "model.pt"],
            argv=[
                "pretrain",
                _config(s.align_config),
                f"data.path={shards}",
                f"run.dir={runs / 'astroclip'}",
                f"model.spectrum_init={runs / 'spectrum'}",
                f"train.steps={align_steps}",
                *common,
            ],
            after=["prepare", "pretrain-spectrum"],
            inputs=[Path(_config(s.align_config))],
            clean=[runs / "astroclip"],
        ),
        Stage(
            "export",
            "embed every object with the aligned model",
            [emb / "astroclip.h5"],
            argv=[
                "export",
                "--checkpoint",
                str(runs / "astroclip"),
                "--data",
                str(shards),
                "--out",
                str(emb / "astroclip.h5"),
                "--progress",
                "off",
            ],
            after=["prepare", "pretrain-align"],
            clean=_export_files(emb / "astroclip.h5"),
        ),
        Stage(
            "export-random-init",
            "control: embed with the same architecture, randomly initialised (no pretrained tower)",
            [emb / "random-init.h5"],
            argv=[
                "export",
                "--checkpoint",
                str(runs / "astroclip"),
                "--random-init",
                "--override",
                "model.spectrum_init=null",
                "--override",
                "model.image_init=null",
                "--data",
                str(shards),
                "--out",
                str(emb / "random-init.h5"),
                "--progress",
                "off",
            ],
            after=["prepare", "pretrain-align"],
            clean=_export_files(emb / "random-init.h5"),
        ),
    ]
    labelled = [f"astroclip={emb / 'astroclip.h5'}", f"random-init={emb / 'random-init.h5'}"]
    evaluated = ["export", "export-random-init"]
    if s.controls:
        shuffled = out / "shards-shuffled"
        stages += [
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
                [runs / "shuffled" / "model.pt"],
                argv=[
                    "pretrain",
                    _config(s.align_config),
                    f"data.path={shuffled}",
                    f"run.dir={runs / 'shuffled'}",
                    f"model.spectrum_init={runs / 'spectrum'}",
                    f"train.steps={align_steps}",
                    *common,
                ],
                after=["shuffle-pairs", "pretrain-spectrum"],
                inputs=[Path(_config(s.align_config))],
                clean=[runs / "shuffled"],
            ),
            Stage(
                "export-shuffled",
                "control: embed the true pairs with the shuffled-pair model",
                [emb / "shuffled.h5"],
                argv=[
                    "export",
                    "--checkpoint",
                    str(runs / "shuffled"),
                    "--data",
                    str(shards),
                    "--out",
                    str(emb / "shuffled.h5"),
                    "--progress",
                    "off",
                ],
                after=["prepare", "pretrain-align-shuffled"],
                clean=_export_files(emb / "shuffled.h5"),
            ),
        ]
        labelled.append(f"shuffled-pairs={emb / 'shuffled.h5'}")
        evaluated.append("export-shuffled")
    search = out / "search"
    stages += [
        Stage(
            "search-index",
            "faiss index over the spectrum embeddings",
            [out / "index" / "index.json"],
            argv=[
                "search",
                "build",
                "--embeddings",
                str(emb / "astroclip.h5"),
                "--modality",
                "spectrum",
                "--out",
                str(out / "index"),
                "--overwrite",
            ],
            after=["export"],
        ),
        Stage(
            "query-ids",
            "pick held-out galaxies for the example query",
            [search / "query_ids.txt"],
            func=lambda: write_query_ids(emb / "astroclip.h5", search / "query_ids.txt"),
            key="first 3 test-split objects of embeddings/astroclip.h5",
            after=["export"],
        ),
        Stage(
            "search-query",
            "example cross-modal search: held-out galaxy images -> nearest spectra (JSON + PNG)",
            [search / "query.json", search / "query.png"],
            argv=[
                "search",
                "query",
                "--index",
                str(out / "index"),
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
            ],
            after=["search-index", "query-ids"],
        ),
        Stage(
            "zero-shot",
            "zero-shot k-NN regression + MLP probe, against raw-input baselines and the controls",
            [reports / "zero-shot" / "report.json"],
            argv=[
                "evaluate",
                "zero-shot",
                *[a for item in labelled for a in ("--embeddings", item)],
                "--targets",
                ",".join(s.targets),
                "--raw-data",
                str(shards),
                "--raw-fields",
                "image=image,spectrum=spectrum",
                "--mlp-for",
                "astroclip",
                "--seed",
                str(s.seed),
                "--out",
                str(reports / "zero-shot"),
            ],
            after=evaluated,
        ),
        Stage(
            "retrieval",
            "cross-modal retrieval (top-k, median rank) against chance and the controls",
            [reports / "retrieval" / "report.json"],
            argv=[
                "evaluate",
                "retrieval",
                *[a for item in labelled for a in ("--embeddings", item)],
                "--out",
                str(reports / "retrieval"),
            ],
            after=evaluated,
        ),
    ]
    return stages


def write_query_ids(embeddings: Path, path: Path, count: int = 3) -> list[str]:
    """The first `count` held-out objects of an export (test split if recorded)."""
    from foundation.embeddings import open_embeddings

    with open_embeddings(embeddings) as emb:
        split = emb.split
        rows = [i for i in range(emb.rows) if split is None or split[i] == "test"][:count] or list(
            range(count)
        )
        ids = [str(emb.ids[i]) for i in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(ids) + "\n")
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
    zs = _read_marker(out / "reports" / "zero-shot" / "report.json")
    if zs:
        from pipelines.evaluate_zeroshot import render_table

        lines += [
            "Zero-shot regression, held-out split (R²; redshift MAE, outlier fraction |dz|/(1+z) > 0.15):",
            "",
            render_table(zs["results"]),
            "",
        ]
    ret = _read_marker(out / "reports" / "retrieval" / "report.json")
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
        ("logs", out / "logs"),
    ]:
        if path.exists():
            lines.append(f"  {label:<18} {path}")
    return "\n".join(lines)


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
        "--pretrain-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Extra dotted override for both pretraining runs (repeatable).",
    )


def _run(args: argparse.Namespace) -> int:
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
    )
    stages = plan(out, settings)
    start = time.perf_counter()
    print(f"foundation demo -> {out}")
    markers = run_stages(stages, out)
    text = summary(out, markers)
    (out / "SUMMARY.md").write_text("# foundation demo\n\n" + text + "\n")
    print()
    print(text)
    print(f"\ntotal {time.perf_counter() - start:.0f} s this run; summary -> {out / 'SUMMARY.md'}")
    return 0


COMMANDS = [
    Command(
        ("demo",),
        "Run the whole AstroCLIP pipeline on built-in data (CPU, ~10 min; re-running resumes).",
        _add_arguments,
        _run,
    )
]
