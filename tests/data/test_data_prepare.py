"""A run's data (probloss/data/prepare.py): the shapes cache with train/val/test, held-out classes and templates
from splits.json, configured shards with and without it, hard negatives through train_batches."""

import json
import re
from types import SimpleNamespace

import pytest

from probloss.data import write_shapes_shards
from probloss.data.prepare import load_eval, prepare_data, shapes_cache_folder, train_batches
from probloss.data.shapes import DEFAULT_TEMPLATES, caption_words, class_names, heldout_combos
from probloss.errors import ConfigError
from probloss.models import build_tokenizer
from probloss.training.config import compose_config
from probloss.training.settings import RunSettings

TOK = build_tokenizer("word", vocab=caption_words(), max_len=16)


def _data(*overrides):
    return RunSettings.from_config(compose_config(["data.num_workers=0", *overrides])).data


def test_shapes_cache_has_a_test_split_and_the_heldout_classes(tmp_path):
    data = _data(f"data.cache_dir={tmp_path}", "data.train_size=40", "data.val_size=8", "data.test_size=6",
                 "data.gen_seed=3", "data.hard_negatives=all")
    spec = prepare_data(data, global_batch=8)
    assert spec.test is not None and spec.steps_per_epoch == 5
    assert spec.heldout == tuple(f"{c} {s}" for c, s in heldout_combos(3)) and set(spec.heldout) < set(spec.classnames)
    assert spec.templates == DEFAULT_TEMPLATES and spec.classnames == tuple(class_names())
    assert len(load_eval(spec, data, TOK, seed=0)) == 8 and len(load_eval(spec, data, TOK, split="test", seed=0)) == 6
    stats = load_eval(spec, data, TOK, split="test", seed=0).train_caption_stats  # the training split's captions
    assert sum(n for n, _ in stats.values()) == 40 and stats == load_eval(spec, data, TOK, seed=0).train_caption_stats
    with pytest.raises(ValueError, match="'val' or 'test'"):
        load_eval(spec, data, TOK, split="train", seed=0)
    # The cache key holds every generation parameter: another test size or held-out setting is another folder.
    same = [f"data.cache_dir={tmp_path}", "data.train_size=40", "data.val_size=8", "data.gen_seed=3"]
    others = [_data(*same, "data.test_size=7"), _data(*same, "data.test_size=6", "data.heldout_combos=0")]
    assert len({shapes_cache_folder(d) for d in (data, *others)}) == 3
    pos = SimpleNamespace(epoch=0, batch=0, skipped=0)
    batch = next(train_batches(spec, data, TOK, 4, 0, 1, 0, pos))
    assert batch["negative_tokens"].shape == (4, 3, 16)  # data.hard_negatives reaches the loader


def test_configured_shards_with_and_without_splits_json(tmp_path, capsys):
    patterns = write_shapes_shards(tmp_path, 16, 8, test_size=0, seed=1, shard_size=100, progress=False)
    shards = [f"data.train_shards={patterns['train']}", f"data.val_shards={patterns['val']}",
              "data.batches_per_epoch=2"]
    spec = prepare_data(_data(*shards), global_batch=8)
    assert spec.heldout == tuple(json.loads((tmp_path / "splits.json").read_text())["heldout_combos"])
    assert spec.classnames == tuple(class_names()) and spec.test is None and spec.templates == DEFAULT_TEMPLATES
    with pytest.raises(ValueError, match="data.test_shards"):
        load_eval(spec, _data(*shards), TOK, split="test", seed=0)
    assert "splits.json" not in capsys.readouterr().out

    (tmp_path / "splits.json").unlink()
    spec = prepare_data(_data(*shards, "data.templates=['the {}']"), global_batch=8)
    assert spec.heldout is None and spec.classnames == tuple(class_names()) and spec.templates == ("the {}",)
    assert capsys.readouterr().out.splitlines() == [
        "no splits.json next to the shards: seen/unseen zero-shot keys are skipped"]
    spec = prepare_data(_data("data=webdataset", *shards, f"data.test_shards={patterns['val']}"), global_batch=8)
    assert spec.heldout is None and spec.classnames is None and spec.templates is None and spec.test == patterns["val"]
    assert load_eval(spec, _data(*shards), TOK, seed=0).train_caption_stats is not None  # beside the train split
    (tmp_path / "train_captions.json").unlink()  # e.g. webdataset data written elsewhere: unknown
    spec = prepare_data(_data(*shards), global_batch=8)
    assert load_eval(spec, _data(*shards), TOK, seed=0).train_caption_stats is None


def test_unknown_hard_negatives_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="data.hard_negatives choice 'foo'.*none, relation, binding, control, all"):
        _data("data.hard_negatives=foo")
    with pytest.raises(ConfigError, match="heldout_combos"):
        _data("data.heldout_combos=30")


def test_epoch_size_from_sizes_json_else_from_the_tar_headers(tmp_path, capsys):
    patterns = write_shapes_shards(tmp_path, 48, 8, test_size=0, seed=1, shard_size=20, progress=False)
    shards = ["data=webdataset", f"data.train_shards='{patterns['train']}'", f"data.val_shards={patterns['val']}",
              "data.batches_per_epoch=null"]
    assert prepare_data(_data(*shards), global_batch=8).steps_per_epoch == 6  # 48 // 8, from sizes.json
    assert "tar headers" not in capsys.readouterr().out
    (tmp_path / "train" / "sizes.json").unlink()  # img2dataset output has none
    assert prepare_data(_data(*shards), global_batch=16).steps_per_epoch == 3
    assert ("data.batches_per_epoch is null: counting the samples of 3 of 3 shards by reading their tar headers"
            in capsys.readouterr().out)


def _cut(path, keep: int, out):
    out.write_bytes(path.read_bytes()[:keep])
    return out


def test_truncated_shards_are_found_and_say_where_they_end(tmp_path):
    from probloss.data.loader import truncated_shards

    patterns = write_shapes_shards(tmp_path, 40, 8, test_size=0, seed=1, shard_size=20, progress=False)
    whole = tmp_path / "train" / "00000.tar"
    size = whole.stat().st_size
    assert truncated_shards([str(whole)]) == {}
    # tar pads the archive to 10 KiB records: a cut in that padding, after both end blocks, loses nothing
    assert truncated_shards([str(_cut(whole, size - 1024, tmp_path / "padding.tar"))]) == {}
    cut = _cut(whole, 30_000, tmp_path / "download.tar")  # the first 30 KB, as an interrupted download leaves it
    assert re.fullmatch(r"it ends (inside|without) .* after member '\d{10}\.(png|txt|json)'.*", truncated_shards(
        [str(cut)])[str(cut)])
    in_member = _cut(whole, 512 + 100, tmp_path / "member.tar")  # the first member's header and 100 of its bytes
    assert "it ends inside member '0000000000.json' (100 of" in truncated_shards([str(in_member)])[str(in_member)]
    no_end = _cut(whole, 1536, tmp_path / "no_end.tar")  # a whole number of blocks, no end-of-archive blocks
    assert truncated_shards([str(no_end)])


def test_a_truncated_shard_among_real_ones_is_named_once_counted_and_an_error_when_strict(tmp_path, capsys):
    from probloss.errors import DataError
    from probloss.data.loader import load_eval_set

    patterns = write_shapes_shards(tmp_path, 60, 8, test_size=0, seed=1, shard_size=20, progress=False)
    _cut(tmp_path / "train" / "00001.tar", 30_000, tmp_path / "train" / "00001.tar")
    shards = [f"data.train_shards='{patterns['train']}'", f"data.val_shards={patterns['val']}"]
    spec = prepare_data(_data(*shards), global_batch=8)
    assert spec.truncated == (str(tmp_path / "train" / "00001.tar"),)
    err = capsys.readouterr().err
    assert err.count("truncated shard") == 1 and "00001.tar (data.train_shards)" in err and "data.strict=true" in err
    # what tarfile does with it: the samples before the cut and no error; the ones after it are not even counted
    # as skipped (why the check exists)
    read = load_eval_set(str(tmp_path / "train" / "00001.tar"), TOK, image_size=32)
    assert 0 < len(read) and len(read) + read.skipped < 20
    with pytest.raises(DataError, match=r"00001.tar \(data.train_shards\): it ends .* Fix: download or write it"):
        prepare_data(_data(*shards, "data.strict=true"), global_batch=8)
