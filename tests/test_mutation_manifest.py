"""Tests written against mutants of data/manifest.py that survived `make mutation`
(benchmarks/mutation.py): how a dataset folder is named (only trailing slashes dropped), what
each refusal tells the user (the file, why, what to run), the defaults of the optional fields,
how long a value in a message may be, and the manifest's bytes: the same content gives the
same bytes (the dataset's identity is their sha256), one field a line so that two manifests
diff by the field that changed."""

from __future__ import annotations

import difflib
import json
import re
import shlex
from pathlib import Path

import pytest

from compresszoo.data.manifest import MANIFEST_NAME, Manifest, ManifestError, ShardInfo


def _shard(path: str = "train/s0.parquet", sha: str = "ab" * 32) -> ShardInfo:
    return ShardInfo(path, path.split("/")[0], 5, 100, sha, (3, 2))


def _save(folder) -> Manifest:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root=str(folder), shards=[_shard(), _shard("test/s0.parquet")])
    manifest.save()
    return manifest


def _refusal(folder, text: str | bytes | None = None) -> str:
    """Write `text` as the folder's manifest (None: no manifest) and return load()'s message."""
    if text is not None:
        (folder / MANIFEST_NAME).write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ManifestError) as err:
        Manifest.load(str(folder))
    return str(err.value)


# ------------------------------------------------------------------ naming the dataset


@pytest.mark.parametrize("name", ["shards-X", "shards-x", "v2", "vimeo shards "])
def test_only_trailing_slashes_are_dropped_from_the_folder_name(tmp_path, name):
    """The folder, the folder with a slash (or two) and the manifest file name one dataset with
    one root; the folder's own name is kept whole, whatever character ends it (a capital X,
    a space)."""
    folder = tmp_path / name
    saved = _save(folder)
    for uri in (str(folder), f"{folder}/", f"{folder}//", f"{folder}/{MANIFEST_NAME}", f"{folder}/{MANIFEST_NAME}/"):
        loaded = Manifest.load(uri)
        assert loaded.root == str(folder), uri
        assert loaded.shards == saved.shards, uri
        assert loaded.shard_uri(loaded.shards[0]) == str(folder / "train" / "s0.parquet"), uri


# ------------------------------------------------------------------ what a refusal says


def test_a_folder_without_a_manifest_says_what_to_run_and_why(tmp_path):
    message = _refusal(tmp_path)
    assert message.startswith(f"{tmp_path / MANIFEST_NAME}: ")
    # the command is the sharder writing into this folder, and nothing else: a user copies it
    command = re.search(r"; run (.*?)(?: \(|$)", message)
    assert command and shlex.split(command.group(1)) == ["pipelines/prepare_vimeo90k.py", "--dst", str(tmp_path)]
    assert "unfinished" in message  # why: the sharder writes the manifest last


@pytest.mark.parametrize("text, reason", [
    ("{\"format\": ", "line 1 column 12"),  # cut short: the parser's position is passed on
    (b"{\"format\": \"\x80\"}", "utf-8"),  # not UTF-8 text
])
def test_an_unreadable_manifest_names_the_file_the_fault_and_the_remedy(tmp_path, text, reason):
    message = _refusal(tmp_path, text)
    assert message.startswith(f"{tmp_path / MANIFEST_NAME}: ")
    assert "unreadable" in message and reason in message.lower() and "rerun the sharder" in message


def test_a_manifest_that_is_a_folder_is_unreadable_naming_it(tmp_path):
    (tmp_path / MANIFEST_NAME).mkdir()
    message = _refusal(tmp_path)
    assert message.startswith(f"{tmp_path / MANIFEST_NAME}: ") and "unreadable" in message
    assert "rerun the sharder" in message


def test_a_manifest_nested_too_deeply_is_refused_naming_the_file(tmp_path):
    """docs/security.md: any structural fault, nesting included, is a ManifestError naming the file."""
    message = _refusal(tmp_path, "[" * 100_000 + "]" * 100_000)
    assert message.startswith(f"{tmp_path / MANIFEST_NAME}: ")
    assert "nested too deeply" in message and "rerun the sharder" in message and "\n" not in message


@pytest.mark.parametrize("length", [59, 60])
def test_a_value_is_shown_whole_up_to_60_characters(tmp_path, length):
    doc = json.loads(_save(tmp_path).to_json())
    value = "f" * (length - 2)  # its repr adds two quotes
    assert len(repr(value)) == length
    message = _refusal(tmp_path, json.dumps(dict(doc, format=value)))
    assert f"format {value!r} version 2;" in message


@pytest.mark.parametrize("length", [61, 62])
def test_a_longer_value_is_cut_to_60_characters_ending_in_dots(tmp_path, length):
    doc = json.loads(_save(tmp_path).to_json())
    value = "f" * (length - 2)
    message = _refusal(tmp_path, json.dumps(dict(doc, format=value)))
    assert repr(value) not in message
    shown = re.search(r"format (.*?) version 2;", message).group(1)
    assert len(shown) == 60 and shown.endswith("...") and repr(value).startswith(shown[:-3])


@pytest.mark.parametrize("version", [1, 3, "2", 2.0, True])
def test_only_this_format_version_is_read(tmp_path, version):
    """A newer or older version (or 2 written as text, a float, a boolean) is refused, naming
    what the file says and what this code reads."""
    doc = json.loads(_save(tmp_path).to_json())
    message = _refusal(tmp_path, json.dumps(dict(doc, format_version=version)))
    assert f"version {version!r};" in message and "reads 'compresszoo.vimeo90k-shards' version 2" in message


def test_a_row_group_of_one_row_is_valid(tmp_path):
    """Row groups are positive: one row (the last frames of a shard) is a whole group."""
    _save(tmp_path)
    doc = json.loads((tmp_path / MANIFEST_NAME).read_text())
    doc["shards"][0].update(rows=5, row_groups=[4, 1])
    doc["shards"][1].update(rows=1, row_groups=[1])
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    m = Manifest.load(str(tmp_path))
    assert [s.row_groups for s in m.shards] == [(4, 1), (1,)] and m.frames() == 6


# ------------------------------------------------------------------ optional fields


def test_a_manifest_without_the_optional_fields_loads_with_empty_ones_and_saves_again(tmp_path):
    """tuplet, source, params and bad_input may be absent: they load as "not recorded" (an
    empty string, empty objects), never as null, and the manifest saved again loads again."""
    doc = json.loads(_save(tmp_path).to_json())
    for key in ("tuplet", "source", "params", "bad_input"):
        del doc[key]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    m = Manifest.load(str(tmp_path))
    assert (m.tuplet, m.source, m.params, m.bad_input) == ("", {}, {}, {})
    assert m.params.get("row_group_mb") is None  # what a caller does with it
    m.save()
    again = Manifest.load(str(tmp_path))
    assert (again.tuplet, again.source, again.params, again.bad_input) == ("", {}, {}, {})


# ------------------------------------------------------------------ the bytes


def test_the_same_content_gives_the_same_bytes_whatever_order_it_was_built_in(tmp_path):
    """The dataset's identity (publish.manifest_sha) is the sha256 of the manifest's bytes: two
    runs that built the same source lists, parameters and bad-input report in another order
    must write the same file."""
    shards = [_shard(), _shard("test/s0.parquet")]
    one = Manifest(root=str(tmp_path / "one"), shards=shards, tuplet="sep",
                   source={"train": {"file": "sep_trainlist.txt", "lines": 2}, "test": {"file": "t.txt", "lines": 1}},
                   params={"row_group_mb": 1.0, "codec": "qoi", "shard_mb": 64},
                   bad_input={"unreadable": [["a", "b"]], "missing": []})
    two = Manifest(root=str(tmp_path / "two"), shards=shards, tuplet="sep",
                   source={"test": {"lines": 1, "file": "t.txt"}, "train": {"lines": 2, "file": "sep_trainlist.txt"}},
                   params={"shard_mb": 64, "codec": "qoi", "row_group_mb": 1.0},
                   bad_input={"missing": [], "unreadable": [["a", "b"]]})
    for m in (one, two):
        Path(m.root).mkdir()
        m.save()
    assert (tmp_path / "one" / MANIFEST_NAME).read_bytes() == (tmp_path / "two" / MANIFEST_NAME).read_bytes()


def test_two_manifests_differ_by_one_line_when_one_shard_changed(tmp_path):
    """One field a line: a diff of two manifests (a re-sharded file) shows the changed
    checksum alone, not a line holding the whole document."""
    before = Manifest(root=str(tmp_path), shards=[_shard(), _shard("train/s1.parquet")]).to_json()
    after = Manifest(root=str(tmp_path), shards=[_shard(), _shard("train/s1.parquet", sha="cd" * 32)]).to_json()
    changed = [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:2] in ("- ", "+ ")]
    assert len(changed) == 2, changed
    assert all(("ab" * 32 in line or "cd" * 32 in line) and "parquet" not in line for line in changed)
