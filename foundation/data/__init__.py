"""The shared data layer: shard sets on disk (writer, manifest, verification) and the loader.

    from foundation.data import ShardSetWriter, ShardWriter, ShardDataset, Manifest

Format: docs/shards.md. Loader design: foundation/data/plan.py and dataset.py.
"""

from foundation.data.manifest import FileInfo, Manifest, ShardInfo, SplitInfo
from foundation.data.reader import ShardReader
from foundation.data.schema import FieldSpec
from foundation.data.writer import ShardSetWriter, ShardWriter, split_for_key


def __getattr__(name: str):
    """The loader (torch) is imported when first asked for, so that writing shards, and `prepare`'s
    worker processes, do without torch."""
    if name in ("ShardDataset", "resolve_rank"):
        from foundation.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FieldSpec",
    "FileInfo",
    "Manifest",
    "ShardDataset",
    "ShardInfo",
    "ShardReader",
    "ShardSetWriter",
    "ShardWriter",
    "SplitInfo",
    "resolve_rank",
    "split_for_key",
]
