"""The shard manifest `DST/_manifest.json`: the only thing a reader trusts.

Written last and atomically by the sharder; it lists every shard (path relative to DST, split,
rows, bytes, sha256, rows per row group), the source lists, the bad-input report and the
format version. Its content is deterministic: a resumed run writes the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from compresszoo import storage

FORMAT = "compresszoo.vimeo90k-shards"
FORMAT_VERSION = 2
MANIFEST_NAME = "_manifest.json"
# How frames are stored: "qoi" re-encodes each PNG losslessly as QOI (decodes ~3.5x faster
# than PNG, ~15% larger; pixels verified equal when sharding); "png" keeps the source bytes.
CODECS = ("qoi", "png")
DEFAULT_CODEC = "qoi"

# One row per frame: the encoded image (already compressed, so the column is written
# uncompressed), the CRC-32 of those bytes (QOI has no checksum of its own: a changed byte
# must not decode into a wrong image), and height/width to plan crops without decoding.
SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("image", pa.binary()),
        ("crc32", pa.uint32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)


class ManifestError(RuntimeError):
    """The manifest is missing, unreadable or of an unknown format."""


class ShardError(RuntimeError):
    """A shard listed by the manifest is missing or corrupt; the message names it."""


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the manifest's folder
    split: str
    rows: int
    bytes: int
    sha256: str
    row_groups: tuple[int, ...]  # rows in each Parquet row group

    @classmethod
    def from_json(cls, d) -> ShardInfo:
        """Parse one `shards` entry; raise ValueError saying which field is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"a shard entry is {type(d).__name__}, expected an object")
        path, split, sha = (_field(d, k, str) for k in ("path", "split", "sha256"))
        rows, nbytes = (_field(d, k, int) for k in ("rows", "bytes"))
        groups = _field(d, "row_groups", list)
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"shard path {path!r} must be relative to the manifest's folder, without '..'")
        if rows < 0 or nbytes < 0:
            raise ValueError(f"shard {path!r}: rows {rows} and bytes {nbytes} must not be negative")
        if not all(_is_int(n) and n > 0 for n in groups) or sum(groups) != rows:
            raise ValueError(f"shard {path!r}: row_groups must be positive integers adding up to rows={rows}")
        return cls(path, split, rows, nbytes, sha, tuple(groups))

    def to_json(self) -> dict:
        d = asdict(self)
        d["row_groups"] = list(self.row_groups)
        return d


@dataclass
class Manifest:
    root: str  # URI of the folder that holds the manifest and the shards (not serialized)
    shards: list[ShardInfo]
    tuplet: str = "sep"
    source: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    bad_input: dict = field(default_factory=dict)
    codec: str = DEFAULT_CODEC

    def shard_uri(self, shard: ShardInfo) -> str:
        return storage.join(self.root, shard.path)

    def shards_for(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def frames(self, split: str | None = None) -> int:
        return sum(s.rows for s in self.shards if split is None or s.split == split)

    def to_json(self) -> str:
        splits = {}
        for s in self.shards:
            entry = splits.setdefault(s.split, {"frames": 0, "shards": 0, "bytes": 0})
            entry["frames"] += s.rows
            entry["shards"] += 1
            entry["bytes"] += s.bytes
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tuplet": self.tuplet,
            "codec": self.codec,
            "splits": splits,
            "source": self.source,
            "params": self.params,
            "bad_input": self.bad_input,
            "shards": [s.to_json() for s in self.shards],
        }
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    def save(self) -> None:
        storage.write_bytes(manifest_uri(self.root), self.to_json().encode())

    @classmethod
    def load(cls, uri: str) -> Manifest:
        """Load from the dataset folder or the manifest file itself."""
        root = _root_of(uri)
        path = manifest_uri(root)
        try:
            doc = json.loads(storage.read_bytes(path))
        except FileNotFoundError:
            raise ManifestError(
                f"{path}: no manifest; run pipelines/prepare_vimeo90k.py --dst {root} "
                "(a dataset without a manifest is unfinished)"
            ) from None
        except (OSError, ValueError) as e:
            raise ManifestError(f"{path}: unreadable manifest ({e}); rerun the sharder to rewrite it") from None
        except RecursionError:
            raise ManifestError(f"{path}: unreadable manifest (nested too deeply); rerun the sharder to rewrite it") from None
        if not isinstance(doc, dict):
            raise ManifestError(f"{path}: the manifest is a JSON {type(doc).__name__}, not an object; rerun the sharder")
        if doc.get("format") != FORMAT or not _is_int(doc.get("format_version")) \
                or doc.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"{path}: format {_short(doc.get('format'))} version {_short(doc.get('format_version'))}; "
                f"this code reads {FORMAT!r} version {FORMAT_VERSION}; rerun the sharder"
            )
        try:
            shards = [ShardInfo.from_json(s) for s in _field(doc, "shards", list)]
            codec = _field(doc, "codec", str)
            if codec not in CODECS:
                raise ValueError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
            manifest = cls(
                root=root,
                shards=shards,
                tuplet=_field(doc, "tuplet", str, ""),
                source=_field(doc, "source", dict, {}),
                params=_field(doc, "params", dict, {}),
                bad_input=_field(doc, "bad_input", dict, {}),
                codec=codec,
            )
        except ValueError as e:
            raise ManifestError(f"{path}: malformed manifest ({e}); rerun the sharder to rewrite it") from None
        return manifest


_MISSING = object()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not here


def _field(doc: dict, key: str, kind: type, default=_MISSING):
    """doc[key], checked to be of `kind` (int excludes bool); `default` when absent, if given."""
    value = doc.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ValueError(f"{key!r} is missing")
        return default
    if not (_is_int(value) if kind is int else isinstance(value, kind)):
        raise ValueError(f"{key!r} is {type(value).__name__} {_short(value)}, expected {kind.__name__}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def manifest_uri(root: str) -> str:
    return storage.join(root, MANIFEST_NAME)


def _root_of(uri: str) -> str:
    uri = str(uri).rstrip("/")
    return uri[: -len(MANIFEST_NAME) - 1] if uri.endswith("/" + MANIFEST_NAME) else uri
