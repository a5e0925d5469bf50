"""Read the official Vimeo90K layout (lists + sequences/NNNNN/NNNN/imK.png) from any storage URI.

Septuplets: sep_trainlist.txt / sep_testlist.txt, frames im1..im7; triplets: tri_* lists,
im1..im3. Every problem with the lists or the files goes into a BadInputReport.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from compresszoo import storage
from compresszoo.data.report import BadInputError, BadInputReport

TUPLETS = {"sep": 7, "tri": 3}
SPLITS = ("train", "test")
_SEQUENCE = re.compile(r"^\d{5}/\d{4}$")


def list_name(tuplet: str, split: str) -> str:
    return f"{tuplet}_{split}list.txt"


@dataclass(frozen=True)
class Frame:
    """One source frame: key '00001/0001/im1', its split and its encoded size in bytes."""

    key: str
    split: str
    size: int

    def source_path(self, root: str) -> str:
        return f"{root}/sequences/{self.key}.png"


@dataclass
class SourceScan:
    """What a source folder holds: the frames to shard, the lists they came from, the problems."""

    uri: str
    tuplet: str
    frames: list[Frame]
    lists: dict[str, dict] = field(default_factory=dict)
    report: BadInputReport = field(default_factory=BadInputReport)


def detect_tuplet(fs: pafs.FileSystem, root: str, uri: str) -> str:
    for tuplet in TUPLETS:
        names = [f"{root}/{list_name(tuplet, s)}" for s in SPLITS]
        if any(info.type == pafs.FileType.File for info in fs.get_file_info(names)):
            return tuplet
    raise BadInputError(
        f"{uri}: no sep_trainlist.txt/sep_testlist.txt or tri_trainlist.txt/tri_testlist.txt; "
        "--src must be the Vimeo90K folder that holds sequences/ and the list files"
    )


def scan_source(uri: str, tuplet: str = "auto") -> SourceScan:
    """List the frames named by the train and test lists of the Vimeo90K folder at `uri`.

    Fatal (BadInputError whatever the on-bad policy): the folder, sequences/ or both lists
    missing, or a list none of whose sequences exist (the wrong list for this folder).
    Everything else is recorded in the report for the caller's policy.
    """
    fs, root = storage.resolve(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise BadInputError(f"{uri}: source folder does not exist; check --src")
    if tuplet == "auto":
        tuplet = detect_tuplet(fs, root, uri)
    if tuplet not in TUPLETS:
        raise ValueError(f"tuplet={tuplet!r}; expected one of auto, {', '.join(TUPLETS)}")

    seq_root = f"{root}/sequences"
    if fs.get_file_info(seq_root).type != pafs.FileType.Directory:
        raise BadInputError(f"{uri}: no sequences/ folder; --src must be the Vimeo90K root folder")
    # One recursive listing (a few LIST requests per 1000 files on S3) instead of a stat per frame.
    on_disk = {
        info.path[len(seq_root) + 1 :]: info.size
        for info in fs.get_file_info(pafs.FileSelector(seq_root, recursive=True))
        if info.type == pafs.FileType.File
    }

    report = BadInputReport()
    scan = SourceScan(uri=uri, tuplet=tuplet, frames=[], report=report)
    seen: dict[str, str] = {}
    n_frames = TUPLETS[tuplet]
    for split in SPLITS:
        name = list_name(tuplet, split)
        path = f"{root}/{name}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            report.add("list", name, "list file missing; its split is left out")
            continue
        with fs.open_input_stream(path) as f:
            raw = f.read()
        sequences = []
        for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            seq = line.strip()
            if not seq:
                continue
            where = f"{name}:{lineno}"
            if not _SEQUENCE.match(seq):
                report.add("list", where, f"{seq[:40]!r} is not a sequence id NNNNN/NNNN")
            elif seq in seen:
                report.add("list", where, f"{seq} already listed at {seen[seq]}")
            else:
                seen[seq] = where
                sequences.append(seq)
        found = 0
        for seq in sequences:
            for k in range(1, n_frames + 1):
                key = f"{seq}/im{k}"
                size = on_disk.get(f"{key}.png")
                if size is None:
                    report.add("missing", key, f"named by {name}")
                else:
                    scan.frames.append(Frame(key, split, size))
                    found += 1
        if sequences and found == 0:
            raise BadInputError(
                f"{uri}/{name}: none of its {len(sequences)} sequences exist under sequences/ "
                f"(expected e.g. sequences/{sequences[0]}/im1.png); is this the right list for this folder?"
            )
        scan.lists[split] = {
            "file": name,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "sequences": len(sequences),
            "frames": found,
        }
    if not scan.lists:
        raise BadInputError(f"{uri}: neither {list_name(tuplet, 'train')} nor {list_name(tuplet, 'test')} exists")
    return scan
