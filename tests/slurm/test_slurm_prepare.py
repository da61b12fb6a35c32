"""slurm/prepare.sbatch on a real (one-node) SLURM cluster: the chain `submit` starts (xVal: fit the
vocabulary once, an array of 2 parts reusing it, a dependent merge; MPP: an array of 3 parts and
the merge; AstroCLIP: 2 parts of the sky and the merge) writes the set one `foundation prepare`
over all inputs writes; re-submitting redoes only what is missing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from foundation.cli import main
from foundation.data import Manifest
from tests.testkit import REPO, child_env
from tests.testkit.same_shards import members_by_key

pytestmark = pytest.mark.slurm

PREPARE = REPO / "slurm" / "prepare.sbatch"
FRACTIONS = "train=0.6,valid=0.2,test=0.2"
PREPARE_ARGS = f"--vocab-size 300 --samples-per-shard 16 --min-field-count 5 --split-fractions {FRACTIONS}"


def _corpus(folder: Path) -> list[str]:
    folder.mkdir()
    files = []
    for f in range(3):
        path = folder / f"in{f}.jsonl"
        lines = [{"text": f"star {i} of file {f} has mass {1.5 + i * 0.37 + f:.3f}"} for i in range(30)]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        files.append(str(path))
    return files


def _submit(slurm, workspace: Path, env: dict[str, str]) -> dict[str, str]:
    """`slurm/prepare.sbatch submit`, as a user runs it; {step: job id} of the jobs it submitted."""
    done = subprocess.run(
        ["bash", str(PREPARE), "submit"], cwd=workspace, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    jobs = dict(re.findall(r"submitted (vocabulary|array|merge) job (\d+)", done.stdout))
    slurm.jobs.extend(jobs.values())
    return jobs


def _env(**variables: str) -> dict[str, str]:
    env = child_env(SBATCH_ARGS="--cpus-per-task=1", **variables)
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        env["VENV"] = sys.prefix
    return env


def _wait_chain(slurm, workspace: Path, jobs: dict[str, str], tasks: int = 2) -> None:
    if "vocabulary" in jobs:
        vocab_log = workspace / f"foundation-prepare-vocab-{jobs['vocabulary']}.out"
        assert slurm.wait_finished(jobs["vocabulary"], 120, vocab_log)["JobState"] == "COMPLETED"
    for task in range(tasks):
        log = workspace / f"foundation-prepare-{jobs['array']}_{task}.out"
        assert slurm.wait_finished(f"{jobs['array']}_{task}", 120, log)["JobState"] == "COMPLETED"
    merge_log = workspace / f"foundation-prepare-merge-{jobs['merge']}.out"
    final = slurm.wait_finished(jobs["merge"], 120, merge_log)
    assert final["JobState"] == "COMPLETED", f"{final}\n{merge_log.read_text()}"


def _assert_equal_to_one_run(merged: Path, whole: Path) -> None:
    a, b = Manifest.load(merged), Manifest.load(whole)
    assert a.extra == b.extra and a.files == b.files and a.stats["normalizer"] == b.stats["normalizer"]
    assert set(a.splits) == set(b.splits) == {"train", "valid", "test"}
    for split in b.splits:
        assert members_by_key(merged, split) == members_by_key(whole, split), split


def test_xval_prepare_array_and_merge_match_one_prepare_and_resubmitting_resumes(slurm, tmp_path):
    workspace = tmp_path
    files = _corpus(workspace / "corpus")
    out = workspace / "shards"
    parts_dir = workspace / "shards.parts"
    env = _env(FAMILY="xval", INPUTS=" ".join(files), OUT=str(out), PARTS="2", PREPARE_ARGS=PREPARE_ARGS)
    jobs = _submit(slurm, workspace, env)
    assert set(jobs) == {"vocabulary", "array", "merge"}
    _wait_chain(slurm, workspace, jobs)

    # The same corpus in one run, with the vocabulary the chain fitted.
    whole = workspace / "whole"
    args = ["--out", str(whole), "--vocab-from", str(parts_dir / "vocab"), *PREPARE_ARGS.split()]
    assert main(["prepare", "xval", *files, *args]) == 0
    _assert_equal_to_one_run(out, whole)

    # Lose part 1 and the merged set: re-submitting keeps the vocabulary and part 0, redoes the rest.
    kept = (parts_dir / "part-00000" / "manifest.json").stat().st_mtime_ns
    for folder in (out, parts_dir / "part-00001"):
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    again = _submit(slurm, workspace, env)
    assert set(again) == {"array", "merge"}
    _wait_chain(slurm, workspace, again)
    log = (workspace / f"foundation-prepare-{again['array']}_0.out").read_text()
    assert "is already written; skipping" in log
    assert (parts_dir / "part-00000" / "manifest.json").stat().st_mtime_ns == kept
    _assert_equal_to_one_run(out, whole)


def test_mpp_prepare_array_of_three_and_merge_match_one_prepare(slurm, tmp_path):
    from tests.mpp.test_mpp_pipeline import _assert_same_set_as_one_run, _toy_well_file

    for i in range(4):
        _toy_well_file(tmp_path / "toy" / f"toy{i}.hdf5", seed=i, n_traj=4)
    args = f"--history 2 --stride 2 --samples-per-shard 4 --split-fractions {FRACTIONS}"
    out = tmp_path / "shards"
    env = _env(FAMILY="mpp", INPUTS=str(tmp_path / "toy"), OUT=str(out), PARTS="3", PREPARE_ARGS=args)
    jobs = _submit(slurm, tmp_path, env)
    assert set(jobs) == {"array", "merge"}
    _wait_chain(slurm, tmp_path, jobs, tasks=3)
    assert [
        Manifest.load(out.with_name("shards.parts") / f"part-{i:05d}").provenance["part"]["index"]
        for i in range(3)
    ] == [0, 1, 2]
    assert (
        main(["prepare", "mpp", str(tmp_path / "toy"), "--out", str(tmp_path / "whole"), *args.split()]) == 0
    )
    _assert_same_set_as_one_run(out, tmp_path / "whole")


def test_astroclip_prepare_array_of_sky_parts_and_merge_match_one_prepare(slurm, tmp_path):
    """Two parts of the sky (HEALPix pixels, matched with the pixels around them) and the merge:
    the pairs, keys and match report of one prepare; the training statistics to float64 rounding."""
    import math

    from encoders.astroclip.survey import synthesize

    summary = synthesize(str(tmp_path / "survey"), 40, seed=4, image_size=16, wave_step=8.0, progress=False)
    args = (
        f"--images {summary['images']} --spectra {summary['spectra']} --catalog {summary['catalog']} "
        f"--grid 3600:9800:40 --samples-per-shard 8 --splits {FRACTIONS}"
    )
    out = tmp_path / "shards"
    env = _env(FAMILY="astroclip", OUT=str(out), PARTS="2", PREPARE_ARGS=args)
    jobs = _submit(slurm, tmp_path, env)
    assert set(jobs) == {"array", "merge"}
    _wait_chain(slurm, tmp_path, jobs)
    assert main(["prepare", "astroclip", *args.split(), "--out", str(tmp_path / "whole")]) == 0
    merged, whole = Manifest.load(out), Manifest.load(tmp_path / "whole")
    assert merged.extra == whole.extra and merged.files == whole.files
    for split in whole.splits:
        assert members_by_key(out, split) == members_by_key(tmp_path / "whole", split), split
    assert merged.stats["image_sky_sigma"] == whole.stats["image_sky_sigma"]
    tokens = merged.stats["spectrum_stats_token"], whole.stats["spectrum_stats_token"]
    for key in ("mean", "std"):
        for a, b in zip(tokens[0][key], tokens[1][key], strict=True):
            assert math.isclose(a, b, rel_tol=1e-12)
