"""The shared data layer: shard sets on disk (writer, manifest, verification) and the loader.

    from foundation.data import ShardSetWriter, ShardWriter, ShardDataset, Manifest

Format: docs/shards.md. Loader design: foundation/data/plan.py and dataset.py.
"""

from foundation.data.dataset import ShardDataset, resolve_rank
from foundation.data.manifest import FileInfo, Manifest, ShardInfo, SplitInfo
from foundation.data.reader import ShardReader
from foundation.data.schema import FieldSpec
from foundation.data.writer import ShardSetWriter, ShardWriter, split_for_key

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
