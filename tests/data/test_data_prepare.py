"""A run's data (probloss/data/prepare.py): the shapes cache with train/val/test, held-out classes and templates
from splits.json, configured shards with and without it, hard negatives through train_batches."""

import json
from types import SimpleNamespace

import pytest

from probloss.config import ConfigError, compose_config
from probloss.data import write_shapes_shards
from probloss.data.prepare import load_eval, prepare_data, shapes_cache_folder, train_batches
from probloss.data.shapes import DEFAULT_TEMPLATES, class_names, heldout_combos
from probloss.models import build_tokenizer
from probloss.settings import RunSettings

TOK = build_tokenizer("word", max_len=16)


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


def test_unknown_hard_negatives_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="data.hard_negatives choice 'foo'.*none, relation, binding, control, all"):
        _data("data.hard_negatives=foo")
    with pytest.raises(ConfigError, match="heldout_combos"):
        _data("data.heldout_combos=30")
