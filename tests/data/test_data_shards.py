"""Shard writing: layout (train/val/test, splits.json), round trip through the reader, reuse, the make_data CLI,
missing shards."""

import io
import json
import tarfile

import numpy as np
import pytest

from probloss.cli import make_data_command as main
from probloss.data import (
    expand_shards, generate_sample, load_eval_set, make_train_loader, read_train_captions, write_shapes_shards,
)
from probloss.data.shapes import (
    DEFAULT_TEMPLATES, TEST_INDEX_OFFSET, VAL_INDEX_OFFSET, caption_words, class_names, heldout_combos,
)
from probloss.errors import ConfigError
from probloss.models import build_tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, write_shapes_shards(out, train_size=50, val_size=12, test_size=20, seed=5, shard_size=16,
                                    progress=False)


def test_layout(shards):
    out, patterns = shards
    assert patterns == {"train": f"{out}/train/{{00000..00003}}.tar", "val": f"{out}/val/00000.tar",
                        "test": f"{out}/test/{{00000..00001}}.tar"}
    assert json.loads((out / "splits.json").read_text()) == {
        "heldout_combos": [f"{c} {s}" for c, s in heldout_combos(5)], "seed": 5,
        "sizes": {"train": 50, "val": 12, "test": 20}, "templates": list(DEFAULT_TEMPLATES)}
    assert set(json.loads((out / "splits.json").read_text())["heldout_combos"]) < set(class_names())
    assert len(expand_shards(patterns["train"])) == 4
    assert json.loads((out / "classes.json").read_text()) == class_names()
    assert json.loads((out / "train" / "sizes.json").read_text()) == {
        "00000.tar": 16, "00001.tar": 16, "00002.tar": 16, "00003.tar": 2}
    with tarfile.open(out / "train" / "00000.tar") as tar:
        names = tar.getnames()
        assert sorted(names[:3]) == ["0000000000.json", "0000000000.png", "0000000000.txt"]
        meta = json.loads(tar.extractfile("0000000000.json").read())
    for key in ("captions", "level", "objects", "relation", "negatives", "matched_pair", "heldout_mentions", "label"):
        assert key in meta
    assert len(meta["captions"]) == 4 and set(meta["negatives"]) == {"relation", "binding", "control"}


@pytest.mark.parametrize("split,offset,n", [("train", 0, 50), ("val", VAL_INDEX_OFFSET, 12),
                                            ("test", TEST_INDEX_OFFSET, 20)])
def test_round_trip(shards, split, offset, n):
    _, patterns = shards
    tok = build_tokenizer("word", vocab=caption_words(), max_len=16)
    ev = load_eval_set(patterns[split], tok, image_size=32)
    assert len(ev) == n and ev.skipped == 0 and ev.images.shape == (n, 3, 32, 32)
    heldout = frozenset(heldout_combos(5))
    exclude = heldout if split == "train" else frozenset()  # val and test: all combinations
    for i in range(n):
        image, caption, meta = generate_sample(5, offset + i, exclude=exclude, heldout=heldout)
        pixels = np.round((ev.images[i].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255)
        assert np.array_equal(pixels, np.asarray(image)), i  # PNG is lossless
        assert ev.captions[i] == caption and ev.json[i] == meta and ev.keys[i] == f"{offset + i:010d}"
    assert ev.tokens.equal(tok(ev.captions))
    assert len(load_eval_set(patterns[split], tok, image_size=32, max_samples=5)) == 5


def test_train_captions_json_counts_what_the_training_shards_hold(shards):
    out, patterns = shards
    tok = build_tokenizer("word", vocab=caption_words(), max_len=16)
    train = load_eval_set(patterns["train"], tok, image_size=32)
    counted = {}
    for caption, meta in zip(train.captions, train.json):
        count, level = counted.get(caption, (0, meta["level"]))
        assert level == meta["level"], caption  # one level per caption string
        counted[caption] = (count + 1, level)
    stats = read_train_captions(out / "train_captions.json")
    assert stats == counted and sum(n for n, _ in stats.values()) == 50 and len(stats) > 10
    assert {level for _, level in stats.values()} == {0, 1, 2, 3}
    # The eval sets of this folder carry them when asked; absent file -> None.
    assert load_eval_set(patterns["val"], tok, image_size=32, train_captions=out / "train_captions.json"
                         ).train_caption_stats == stats
    assert load_eval_set(patterns["val"], tok, image_size=32).train_caption_stats is None
    assert read_train_captions(out / "missing.json") is None


def test_val_and_test_flag_heldout_mentions_and_train_never_does(tmp_path):
    write_shapes_shards(tmp_path, 300, 300, test_size=0, seed=2, shard_size=300, num_workers=1, progress=False)
    tok = build_tokenizer("word", vocab=caption_words(), max_len=16)
    flags = {split: [any(m["heldout_mentions"].values()) for m in load_eval_set(
        str(tmp_path / split / "00000.tar"), tok, image_size=32).json] for split in ("train", "val")}
    assert not any(flags["train"]) and sum(flags["val"]) > 30


def test_existing_dataset_is_reused(shards):
    out, patterns = shards
    mtime = (out / "train" / "00000.tar").stat().st_mtime_ns
    assert write_shapes_shards(out, 50, 12, test_size=20, seed=5, shard_size=16, progress=False) == patterns
    assert (out / "train" / "00000.tar").stat().st_mtime_ns == mtime


def test_heldout_setting_changes_train_only(tmp_path, shards):
    out, patterns = shards
    other = write_shapes_shards(tmp_path, 50, 12, test_size=0, heldout_combos=0, seed=5, shard_size=16,
                                progress=False)
    assert "test" not in other and not (tmp_path / "test").exists()
    assert json.loads((tmp_path / "splits.json").read_text())["heldout_combos"] == []
    assert json.loads((tmp_path / "splits.json").read_text())["sizes"] == {"train": 50, "val": 12, "test": 0}
    tok = build_tokenizer("word", vocab=caption_words(), max_len=16)
    read = lambda p: load_eval_set(p, tok, image_size=32).captions  # noqa: E731
    assert read(other["val"]) == read(patterns["val"])  # val does not depend on the held-out setting
    assert read(other["train"]) == [generate_sample(5, i)[1] for i in range(50)]


def test_cli(tmp_path, capsys):
    patterns = main([f"out={tmp_path}", "train_size=20", "val_size=4", "test_size=3", "heldout_combos=12", "seed=1",
                     "image_size=48", "shard_size=10"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == patterns
    with tarfile.open(tmp_path / "val" / "00000.tar") as tar:
        from PIL import Image
        assert Image.open(io.BytesIO(tar.extractfile("1000000000.png").read())).size == (48, 48)
    with tarfile.open(tmp_path / "test" / "00000.tar") as tar:
        assert len(tar.getnames()) == 3 * 3 and "2000000002.json" in tar.getnames()
    assert len(json.loads((tmp_path / "splits.json").read_text())["heldout_combos"]) == 12
    with pytest.raises(ConfigError, match="missing .*train_size"):
        main([f"out={tmp_path}", "val_size=4"])
    with pytest.raises(ConfigError, match="unknown config key 'trainsize'. Did you mean 'train_size'"):
        main([f"out={tmp_path}", "trainsize=4", "val_size=4"])


def test_missing_shards_fail_before_reading(tmp_path, shards):
    tok = build_tokenizer("byte")
    for pattern in (str(tmp_path / "nothing" / "{00000..00003}.tar"), str(tmp_path / "*.tar")):
        with pytest.raises(FileNotFoundError, match="nothing|\\*"):
            make_train_loader(pattern, tok, 4, image_size=32)
        with pytest.raises(FileNotFoundError, match="shard pattern"):
            load_eval_set(pattern, tok, image_size=32)
    out, _ = shards
    with pytest.raises(FileNotFoundError, match="misses 1 of 5"):  # one shard too many in the range
        make_train_loader(f"{out}/train/{{00000..00004}}.tar", tok, 4, image_size=32)
