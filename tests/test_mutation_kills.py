"""Tests written against mutants that survived `make mutation` (benchmarks/mutation.py): the
manifest's checks of each shard entry, each with the message that names what is wrong, and the
split counts the trainer's epoch length comes from."""

from __future__ import annotations

import json

import pytest

from compresszoo.data.manifest import MANIFEST_NAME, Manifest, ManifestError, ShardInfo


def _entry(**changes) -> dict:
    entry = {"path": "train/s0.parquet", "split": "train", "rows": 5, "bytes": 100,
             "sha256": "ab" * 32, "row_groups": [3, 2]}
    entry.update(changes)
    return entry


@pytest.fixture
def folder(tmp_path):
    shards = [ShardInfo.from_json(_entry()),
              ShardInfo.from_json(_entry(path="train/s1.parquet", rows=4, row_groups=[4])),
              ShardInfo.from_json(_entry(path="test/s0.parquet", split="test", rows=2, row_groups=[2]))]
    Manifest(root=str(tmp_path), shards=shards).save()
    return tmp_path


def test_split_counts_and_shards_come_from_the_entries(folder):
    m = Manifest.load(str(folder))
    assert (m.frames(), m.frames("train"), m.frames("test"), m.frames("val")) == (11, 9, 2, 0)
    assert [s.path for s in m.shards_for("train")] == ["train/s0.parquet", "train/s1.parquet"]
    assert [s.path for s in m.shards_for("test")] == ["test/s0.parquet"]
    assert Manifest.load(str(folder / MANIFEST_NAME)).shards == m.shards  # the file itself


@pytest.mark.parametrize("entry,message", [
    ([1], "a shard entry is list, expected an object"),
    (_entry(path="/abs/s0.parquet"), "shard path '/abs/s0.parquet' must be relative"),
    (_entry(path="a/../s0.parquet"), "shard path 'a/../s0.parquet' must be relative"),
    (_entry(path=""), "shard path '' must be relative"),
    (_entry(rows=-1, row_groups=[]), "shard 'train/s0.parquet': rows -1 and bytes 100 must not be negative"),
    (_entry(bytes=-1), "rows 5 and bytes -1 must not be negative"),
    (_entry(row_groups=[3, 3]), "row_groups must be positive integers adding up to rows=5"),
    (_entry(row_groups=[5, 0]), "row_groups must be positive integers adding up to rows=5"),
    (_entry(rows=True), "'rows' is bool True, expected int"),
    (_entry(split=3), "'split' is int 3, expected str"),
    ({k: v for k, v in _entry().items() if k != "sha256"}, "'sha256' is missing"),
])
def test_each_bad_shard_entry_is_refused_naming_the_field(tmp_path, entry, message):
    doc = json.loads(Manifest(root=str(tmp_path), shards=[]).to_json())
    doc["shards"] = [entry]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="malformed manifest") as err:
        Manifest.load(str(tmp_path))
    assert message in str(err.value)


@pytest.mark.parametrize("changes", [{"rows": 0, "row_groups": []}, {"bytes": 0},
                                     {"path": "a..b/s0.parquet"}])
def test_the_edges_that_are_allowed(tmp_path, changes):
    """Empty shards, zero bytes and '..' inside a name (not a path part) are valid entries."""
    doc = json.loads(Manifest(root=str(tmp_path), shards=[]).to_json())
    doc["shards"] = [_entry(**changes)]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    (shard,) = Manifest.load(str(tmp_path)).shards
    assert shard == ShardInfo.from_json(_entry(**changes))


def test_every_field_round_trips_and_the_split_summary_adds_the_entries(folder):
    m = Manifest.load(str(folder))
    m.tuplet, m.codec = "tri", "png"
    m.source, m.params, m.bad_input = {"train": "a.txt"}, {"row_group_mb": 0.05}, {"skipped": ["x.png"]}
    m.save()
    doc = json.loads((folder / MANIFEST_NAME).read_text())
    assert doc["splits"] == {"train": {"frames": 9, "shards": 2, "bytes": 200},
                             "test": {"frames": 2, "shards": 1, "bytes": 100}}
    assert doc["shards"][0]["row_groups"] == [3, 2]
    back = Manifest.load(str(folder))
    assert (back.tuplet, back.codec, back.source, back.params, back.bad_input, back.shards) == \
        ("tri", "png", m.source, m.params, m.bad_input, m.shards)


@pytest.mark.parametrize("doc,message", [
    ([], "the manifest is a JSON list, not an object"),
    ("codec", "codec 'webp' is not one of qoi, png"),
    ("version", "version '" + "9" * 56 + "...; "),  # a long value: its repr cut to 57 characters + ...
])
def test_whole_document_errors_name_what_is_wrong(tmp_path, doc, message):
    good = json.loads(Manifest(root=str(tmp_path), shards=[]).to_json())
    if doc == "codec":
        doc = dict(good, codec="webp")
    elif doc == "version":
        doc = dict(good, format_version="9" * 70)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ManifestError) as err:
        Manifest.load(str(tmp_path))
    assert message in str(err.value) and "rerun the sharder" in str(err.value)


@pytest.mark.parametrize("epoch_steps,ends", [(0, []), (1, [1, 2, 3, 4, 5, 6]), (3, [3, 6])])
def test_epoch_ends_every_epoch_steps_and_never_without_an_epoch_length(epoch_steps, ends):
    """epoch_steps=0 (not yet known: train() sets it from the manifest) ends no epoch and does
    not divide by zero; one-step epochs end at every step but the first step 0."""
    from compresszoo.train import LrSchedule

    schedule = LrSchedule(lr=1e-4, constant_steps=0, epoch_steps=epoch_steps, patience=2)
    assert [s for s in range(7) if schedule.is_epoch_end(s)] == ends
