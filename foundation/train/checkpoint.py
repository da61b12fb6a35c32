"""Checkpoints: `torch.distributed.checkpoint` folders written atomically, keep-last-K, resume.

Layout of one checkpoint, `<run>/checkpoints/step-<N>/`:
    .metadata, __<r>_0.distcp   DCP files: {"model": ..., "optim": ...} (sharded under FSDP2)
    rank-<r>.json               per-rank state: loader position, RNG states, lr schedule (JSON;
                                tensors as base64 bytes with dtype and shape)
    meta.json                   step, world size, parallel mode, config hash and config, versions,
                                and the size of every file of the folder
    COMPLETE                    written last; a folder without it is not a checkpoint
Every rank writes into `checkpoints/.tmp-step-<N>/`; when all are done, rank 0 writes `meta.json`
and `COMPLETE`, fsyncs, and renames the folder to `step-<N>` — so a job killed at any moment
leaves the previous checkpoints untouched and loadable. Multi-node runs need the run directory on
a file system every node sees (as DCP itself does).

Files are data, never code. Nothing here unpickles freely: DCP's `.metadata` (a pickle) is read
by an unpickler that knows only DCP's own metadata classes, torch sizes/dtypes/layouts and paths;
DCP's non-tensor entries (optimiser hyperparameters) and tensors are read with
`torch.load(weights_only=True)`; the per-rank state is JSON. Every file name, offset and length
in `.metadata` is checked against the folder before anything is read. Checkpoints of older
versions (`rank-<r>.pt`, a torch pickle) are read with `weights_only=True` and numpy's array
classes allowed.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import pathlib
import pickle
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from foundation import atomic
from foundation.errors import ConfigError, DataError
from foundation.train.distributed import Distributed

_log = logging.getLogger(__name__)

FORMAT = "foundation.checkpoint"
VERSION = 2  # 2: per-rank state in rank-<r>.json (1: rank-<r>.pt, a torch pickle)
COMPLETE = "COMPLETE"
META = "meta.json"
#: Bounds on files read before they are parsed (a checkpoint's own are far smaller: meta.json
#: ~10 KiB, a rank's state ~20 KiB, DCP metadata ~1 KiB per tensor and rank).
MAX_META_BYTES = 16 * 2**20
MAX_RANK_STATE_BYTES = 16 * 2**20
MAX_DCP_METADATA_BYTES = 512 * 2**20


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / META).is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    root = checkpoints_root(run_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            name = child.name
            if name.startswith("step-") and name[5:].isdigit() and is_complete(child):
                found.append((int(name[5:]), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _check_size(path: Path, limit: int) -> None:
    size = path.stat().st_size
    if size > limit:
        raise DataError(f"{str(path)!r} is {size} bytes, more than the {limit} a checkpoint file may have")


def _read_bounded(path: Path, limit: int) -> bytes:
    _check_size(path, limit)
    return path.read_bytes()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checked `meta.json` of a complete checkpoint folder; DataError if it is damaged."""
    path = Path(path)
    if not is_complete(path):
        raise ConfigError(
            f"{str(path)!r} is not a complete checkpoint folder (no {COMPLETE} marker or {META})"
        )
    try:
        meta = json.loads(_read_bounded(path / META, MAX_META_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(
            f"{str(path / META)!r} is not valid JSON ({exc}); the checkpoint is damaged"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{str(path / META)!r} is not a foundation checkpoint's meta.json (format {found!r})")
    version = meta.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise ConfigError(
            f"checkpoint {str(path)!r} has format version {version!r}; this version reads <= {VERSION}"
        )
    for key, kind in (("step", int), ("world_size", int), ("config", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DataError(f"{str(path / META)!r}: {key!r} is missing or not a {kind.__name__}")
    if meta["step"] < 0 or meta["world_size"] < 1:
        raise DataError(
            f"{str(path / META)!r}: step {meta['step']} / world_size {meta['world_size']} out of range"
        )
    return meta


def remove_partial(run_dir: str | Path) -> None:
    """Delete folders left by saves that never completed (rank 0, under the run's lock)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith(".tmp-") or child.name.startswith(".old-"):
            _log.warning("removing incomplete checkpoint folder %s", child)
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith("step-") and not is_complete(child):
            _log.warning("ignoring incomplete checkpoint folder %s", child)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never listed again), so
    that the step it held can be saved afresh."""
    aside = path.with_name(f"damaged-{path.name}-{time.strftime('%Y%m%dT%H%M%S')}")
    os.rename(path, aside)
    _log.warning("moved damaged checkpoint %s to %s; delete it once inspected", path, aside)
    return aside


# ---------------------------------------------------------------------- per-rank state (JSON)


def rng_state() -> dict[str, Any]:
    """Every random stream of this process (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`; DataError if the saved state does not have its shape."""
    try:
        random.setstate(_as_tuples(state["python"]))
        np.random.set_state(tuple(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"the checkpoint's random-number state is malformed ({exc})") from None


def _as_tuples(value: Any) -> Any:
    """Python's `random.setstate` wants nested tuples (a legacy state may hold lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__")


def encode_state(value: Any) -> Any:
    """`value` (dicts, lists, tuples, scalars, tensors, numeric numpy arrays) as plain JSON data."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, np.generic):
        return encode_state(value.item())
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        dtype = str(value.dtype).removeprefix("torch.")
        return {"__tensor__": [dtype, list(value.shape), base64.b64encode(raw).decode("ascii")]}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"cannot store a numpy array of dtype {value.dtype} in a checkpoint")
        raw = np.ascontiguousarray(value).tobytes()
        return {"__ndarray__": [value.dtype.str, list(value.shape), base64.b64encode(raw).decode("ascii")]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v) for v in value]}
    if isinstance(value, list):
        return [encode_state(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
            return {k: encode_state(v) for k, v in value.items()}
        return {"__items__": [[encode_state(k), encode_state(v)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint's per-rank state")


def decode_state(data: Any) -> Any:
    """Inverse of `encode_state`; ValueError on anything it would not have written."""
    if isinstance(data, list):
        return [decode_state(v) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1 and next(iter(data)) in _TAGS:
        tag, payload = next(iter(data.items()))
        if tag == "__tuple__":
            return tuple(decode_state(v) for v in _expect(payload, list))
        if tag == "__items__":
            return {decode_state(k): decode_state(v) for k, v in map(_pair, _expect(payload, list))}
        if tag == "__float__":
            if payload not in ("nan", "inf", "-inf"):
                raise ValueError(f"bad float {payload!r}")
            return float(payload)
        return _decode_array(tag, payload)
    return {k: decode_state(v) for k, v in data.items()}


def _expect(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"expected a {kind.__name__}, found {type(value).__name__}")
    return value


def _pair(item: Any) -> tuple[Any, Any]:
    if not isinstance(item, list) or len(item) != 2:
        raise ValueError("an __items__ entry is not a [key, value] pair")
    return item[0], item[1]


def _decode_array(tag: str, payload: Any) -> torch.Tensor | np.ndarray:
    if not (isinstance(payload, list) and len(payload) == 3):
        raise ValueError(f"{tag} is not [dtype, shape, data]")
    dtype_name, shape, data = payload
    shape = _expect(shape, list)
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40 for n in shape):
        raise ValueError(f"bad shape {shape!r}")
    raw = base64.b64decode(_expect(data, str).encode("ascii"), validate=True)
    count = math.prod(shape)
    if tag == "__ndarray__":
        dtype = np.dtype(_expect(dtype_name, str))
        if dtype.kind not in "biuf" or count * dtype.itemsize != len(raw):
            raise ValueError(f"ndarray of {dtype} and shape {shape} does not match its {len(raw)} bytes")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    dtype = getattr(torch, _expect(dtype_name, str), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {dtype_name!r}")
    if count * dtype.itemsize != len(raw):
        raise ValueError(f"tensor of {dtype} and shape {shape} does not match its {len(raw)} bytes")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank-{rank}.json"


def write_rank_state(path: Path, rank: int, state: dict[str, Any]) -> None:
    _rank_file(path, rank).write_text(json.dumps(encode_state(state), allow_nan=False))


def read_rank_state(path: Path, rank: int) -> dict[str, Any]:
    """This rank's saved state (JSON; a version-1 `rank-<r>.pt` with weights_only=True)."""
    file = _rank_file(path, rank)
    if file.is_file():
        try:
            state = decode_state(json.loads(_read_bounded(file, MAX_RANK_STATE_BYTES).decode("utf-8")))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DataError(f"{str(file)!r} is damaged ({exc})") from None
    elif (path / f"rank-{rank}.pt").is_file():
        state = _read_legacy_rank_state(path / f"rank-{rank}.pt")
    else:
        raise DataError(f"checkpoint {str(path)!r} has no state for rank {rank} ({file.name})")
    problem = _rank_state_problem(state)
    if problem:
        raise DataError(f"the state of rank {rank} in {str(path)!r} is malformed: {problem}")
    return state


def _rank_state_problem(state: Any) -> str | None:
    """What is wrong with the shape of a rank's state (as `Trainer._save` writes it), if anything."""
    if not isinstance(state, dict) or not isinstance(state.get("schedule"), dict):
        return "no schedule"
    if not isinstance(state.get("loader"), dict | None) or not isinstance(
        state.get("metrics_window"), dict | None
    ):
        return "loader or metrics window is not an object"
    rng = state.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        return "no torch RNG state"
    if rng["torch"].dtype != torch.uint8 or rng["torch"].ndim != 1:
        return "the torch RNG state is not a byte vector"
    python, numpy_state = rng.get("python"), rng.get("numpy")
    if not (isinstance(python, tuple | list) and len(python) == 3 and isinstance(python[1], tuple | list)):
        return "the python RNG state is not (version, state, gauss)"
    if not (isinstance(numpy_state, tuple | list) and len(numpy_state) == 5):
        return "the numpy RNG state is not (kind, keys, pos, has_gauss, gauss)"
    if not isinstance(numpy_state[1], np.ndarray) or numpy_state[1].dtype != np.uint32:
        return "the numpy RNG keys are not uint32"
    return None


def _read_legacy_rank_state(file: Path) -> Any:
    """A version-1 per-rank file: a torch pickle of plain containers, tensors and numpy's RNG
    array. Read with torch's restricted unpickler, which allows numpy's array classes here."""
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    allowed.append(multiarray._reconstruct)
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        raise DataError(
            f"{str(file)!r} was written by an older foundation; resuming it needs torch >= 2.5 "
            "(or load only its weights: `foundation export`/`load_pretrained` read them)"
        )
    _check_size(file, MAX_RANK_STATE_BYTES)
    try:
        with safe_globals(allowed):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DataError(
            f"{str(file)!r} (per-rank state of an older checkpoint) cannot be read safely: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from None


# ---------------------------------------------------------------------- DCP, read without pickle


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` knowing only the classes DCP writes there; any other global
    (the way a pickle runs code) is refused before it is looked up. A pickle can still set
    attributes on a class it names (BUILD), which would change that class process-wide:
    `unpickle_metadata` undoes that and refuses the file."""

    _CLASSES = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    }
    _PATHS = {
        "PosixPath": pathlib.PurePosixPath,
        "PurePosixPath": pathlib.PurePosixPath,
        "WindowsPath": pathlib.PureWindowsPath,
        "PureWindowsPath": pathlib.PureWindowsPath,
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self._CLASSES.get(module, ()):
            return getattr(dcp_metadata if module.endswith(".metadata") else dcp_filesystem, name)
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype | torch.layout):
            return vars(torch)[name]  # not getattr: torch's module __getattr__ imports on demand
        if module == "torch.serialization" and name == "_get_layout":
            return _layout_by_name
        if module in ("pathlib", "pathlib._local") and name in self._PATHS:
            return self._PATHS[name]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in checkpoint metadata")

    @classmethod
    def reachable(cls) -> list[Any]:
        """Everything `find_class` hands out that has attributes a pickle could set."""
        classes = [getattr(dcp_metadata, n) for n in cls._CLASSES["torch.distributed.checkpoint.metadata"]]
        return [*classes, dcp_filesystem._StorageInfo, *set(cls._PATHS.values()), _layout_by_name]


def unpickle_metadata(stream: IO[bytes]) -> Any:
    """`_MetadataUnpickler` on `stream`, with every class it can reach left exactly as it was."""
    reachable = _MetadataUnpickler.reachable()
    before = [dict(vars(obj)) for obj in reachable]
    try:
        return _MetadataUnpickler(stream).load()
    finally:
        changed = [obj for obj, saved in zip(reachable, before, strict=True) if _restore(obj, saved)]
        if changed:
            raise pickle.UnpicklingError(f"the pickle changes {changed[0]!r}")  # noqa: B012 - on purpose


def _restore(obj: Any, saved: dict[str, Any]) -> bool:
    """Put `obj`'s attributes back to `saved`; whether anything had changed."""
    now = dict(vars(obj))
    changed = now.keys() != saved.keys() or any(now[k] is not v for k, v in saved.items())
    for key in now.keys() - saved.keys():
        delattr(obj, key)
    for key, value in saved.items():
        if now.get(key) is not value:
            setattr(obj, key, value)
    return changed


def _layout_by_name(name: str) -> torch.layout:
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if name not in layouts:
        raise pickle.UnpicklingError(f"unknown tensor layout {name!r}")
    return layouts[name]


def read_dcp_metadata(folder: Path, filename: str = ".metadata") -> dcp_metadata.Metadata:
    """DCP's metadata of `folder`, unpickled safely and checked against the folder's files."""
    file = folder / filename
    if not file.is_file():
        raise DataError(f"checkpoint {str(folder)!r} has no {filename} (DCP metadata)")
    _check_size(file, MAX_DCP_METADATA_BYTES)
    try:
        with open(file, "rb") as handle:  # streamed: a file of zeros fails at its first byte
            metadata = unpickle_metadata(handle)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in many ways; all mean the same
        raise DataError(f"{str(file)!r} is not readable DCP metadata ({exc})") from None
    _check_dcp_metadata(folder, file, metadata)
    return metadata


def _check_dcp_metadata(folder: Path, file: Path, metadata: Any) -> None:
    """Every storage entry names a plain file of `folder` and a byte range inside it."""
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
        raise DataError(f"{str(file)!r} is not DCP checkpoint metadata")
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        if not isinstance(info, dcp_filesystem._StorageInfo):
            raise DataError(f"{str(file)!r}: a storage entry is a {type(info).__name__}")
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise DataError(f"{str(file)!r} names the data file {name!r}, which is not a plain file name")
        if getattr(info, "transform_descriptors", None):
            raise DataError(f"{str(file)!r} asks for stream transforms {info.transform_descriptors!r}")
        if name not in sizes:
            data_file = folder / name
            if not data_file.is_file():
                raise DataError(f"checkpoint {str(folder)!r} lacks its data file {name!r}")
            sizes[name] = data_file.stat().st_size
        offset, length = info.offset, info.length
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise DataError(f"{str(file)!r}: bad byte range {offset!r}+{length!r} in {name!r}")
        if offset + length > sizes[name]:
            raise DataError(
                f"{str(file)!r}: bytes {offset}..{offset + length} of {name!r} are past its end "
                f"({sizes[name]} bytes); the checkpoint is truncated or damaged"
            )


class SafeFileSystemReader(dcp_filesystem.FileSystemReader):
    """DCP's file reader with the metadata read by `read_dcp_metadata` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        filename = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = read_dcp_metadata(Path(self.path), filename)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries read by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - see read_dcp_metadata
            raise DataError(
                f"checkpoint entry {fqn!r} is not plain data ({str(exc).splitlines()[0]})"
            ) from None
        # Where DefaultLoadPlanner.load_bytes puts it.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _dcp_load(state: dict[str, Any], path: Path, **kwargs: Any) -> None:
    # Checked before torch sees it: DCP logs a traceback for unreadable metadata before it fails.
    read_dcp_metadata(path)
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), **kwargs)


# ---------------------------------------------------------------------- save


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written checkpoint visible (the one step a crash can interrupt harmlessly)."""
    atomic.publish(tmp, final, overwrite=False)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file() and f.name != META}


def _raise_os_error_of(exc: BaseException) -> None:
    """DCP wraps every rank's failure in a CheckpointException; a full or read-only disk is an
    OSError the CLI reports in one line, so unwrap it."""
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, OSError):
            raise inner from None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    dist_info: Distributed,
    keep_last: int,
) -> Path:
    """Write `step-<step>` atomically (collective: every rank calls it) and prune to `keep_last`."""
    root = checkpoints_root(run_dir)
    final = root / f"step-{step}"
    if is_complete(final):
        return final
    tmp = root / f".tmp-step-{step}"
    if dist_info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist_info.barrier()
    start = time.perf_counter()
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    except dcp.api.CheckpointException as exc:
        _raise_os_error_of(exc)
        raise
    write_rank_state(tmp, dist_info.rank, rank_state)
    dist_info.barrier()
    if dist_info.is_main:
        full_meta = {"format": FORMAT, "version": VERSION, "step": step, "world_size": dist_info.world_size}
        full_meta.update(meta)
        full_meta["files"] = _file_sizes(tmp)
        (tmp / META).write_text(json.dumps(full_meta, indent=1, default=str))
        atomic.fsync_tree(tmp)  # everything on disk before COMPLETE says so
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():  # an incomplete folder of the same step from an older crash
            shutil.rmtree(final)
        _publish(tmp, final)
        _prune(root, keep_last)
    dist_info.barrier()
    if dist_info.is_main:
        _log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - start)
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = list_checkpoints(root.parent)
    for _, path in complete[:-keep_last] if keep_last > 0 else []:
        trash = path.with_name(f".old-{path.name}")
        os.rename(path, trash)  # unpublish first: a half-deleted folder never looks complete
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------- load


def verify_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """Check a checkpoint before any of it is loaded: its meta.json, the sizes it recorded, DCP's
    metadata and byte ranges, and this rank's state. {meta, rank_state}; DataError if damaged."""
    meta = read_meta(path)
    files = meta.get("files") or {}  # absent in version 1
    if not isinstance(files, dict):
        raise DataError(f"{str(path / META)!r}: 'files' is not an object")
    for name, size in files.items():
        file = path / str(name)
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            raise DataError(f"{str(file)!r} is {actual} bytes, but the checkpoint recorded {size}")
    read_dcp_metadata(path)
    return {"meta": meta, "rank_state": read_rank_state(path, rank)}


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, dist_info: Distributed
) -> dict[str, Any]:
    """Restore model and optimiser in place (collective); return this rank's saved state.
    Check the folder with `verify_checkpoint` first: a failure here leaves the model half loaded."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    _dcp_load(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_rank_state(path, dist_info.rank)


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load only the model part of a checkpoint into a plain (unwrapped) model, in one process."""
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        try:
            _dcp_load(state, path, no_dist=True)
        except dcp.api.CheckpointException as exc:
            raise DataError(f"checkpoint {str(path)!r} cannot be read: {_first_failure(exc)}") from None
    model.load_state_dict(state["model"])


def _first_failure(exc: BaseException) -> str:
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''}"[:500]
    return str(exc).splitlines()[0][:500]
