"""The dataset layer: Vimeo90K -> Parquet shards + manifest in any storage, streamed by Ray Data.

prepare() shards a Vimeo90K folder; TrainStream / validation_batches read the shards inside
training workers; make_miniature() writes a small real-image copy of the layout for tests.
"""

from compresszoo.data.manifest import Manifest, ManifestError, ShardError, ShardInfo
from compresszoo.data.miniature import make_miniature
from compresszoo.data.reader import TrainStream, check_shards, validation_batches
from compresszoo.data.report import BadInputError, BadInputReport
from compresszoo.data.shards import plan_shards, prepare
from compresszoo.data.vimeo import scan_source

__all__ = [
    "BadInputError",
    "BadInputReport",
    "Manifest",
    "ManifestError",
    "ShardError",
    "ShardInfo",
    "TrainStream",
    "check_shards",
    "make_miniature",
    "plan_shards",
    "prepare",
    "scan_source",
    "validation_batches",
]
