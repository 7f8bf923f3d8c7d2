"""Planted noise (issue 33): wrong captions for the scenes that hold one attribute, in training only, at rate p."""

import math

import numpy as np
import pytest

from probloss.data import make_train_loader, shapes, write_shapes_shards
from probloss.data.loader import _planted_captions, holds_attribute
from probloss.data.shapes import caption_words
from probloss.errors import ConfigError
from probloss.models import build_tokenizer
from probloss.training.config import compose_config
from probloss.training.settings import RunSettings

TOK = build_tokenizer("word", vocab=caption_words(), max_len=16)


@pytest.fixture(scope="module")
def samples():
    """600 training samples of the generator (captions and metadata)."""
    out = [shapes.generate_sample(3, i, 32) for i in range(600)]
    return [caption for _, caption, _ in out], [meta for _, _, meta in out]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return write_shapes_shards(root, 384, 64, test_size=64, seed=1, shard_size=64, progress=False)


def _batches(captions, metas, rate, attribute="magenta", size=64, seed=0):
    rng = np.random.default_rng(seed)
    for lo in range(0, len(captions), size):
        yield (captions[lo:lo + size], metas[lo:lo + size],
               *_planted_captions(captions[lo:lo + size], metas[lo:lo + size], attribute, rate, rng))


@pytest.mark.parametrize("attribute", ["magenta", "circle"])
def test_replaced_captions_are_wrong_pairs_at_rate_p_and_only_in_attribute_scenes(samples, attribute):
    captions, metas = samples
    replaced = scenes = 0
    for clean, meta, out, planted, holds in _batches(captions, metas, 0.5, attribute):
        assert holds.tolist() == [any(attribute in (o["colour"], o["shape"]) for o in m["objects"]) for m in meta]
        assert not planted[~holds].any()  # exactly 0 among the other scenes
        assert [o for o, p in zip(out, planted) if not p] == [c for c, p in zip(clean, planted) if not p]
        for i in np.flatnonzero(planted):
            assert out[i] != clean[i] and out[i] in clean  # another sample's caption of the batch
            assert not shapes.plausible_matrix([out[i]], [meta[i]])[0, 0]  # false of the scene: a wrong pair
        replaced, scenes = replaced + int(planted.sum()), scenes + int(holds.sum())
    assert scenes > 100
    # the rate is p within binomial noise (4 sd; a row without a wrong candidate in the batch would lower it)
    assert abs(replaced / scenes - 0.5) < 4 * math.sqrt(0.25 / scenes), (replaced, scenes)


def test_rate_zero_and_one(samples):
    captions, metas = samples
    for clean, _, out, planted, holds in _batches(captions, metas, 0.0):
        assert out == clean and not planted.any() and holds.any()
    for _, _, _, planted, holds in _batches(captions, metas, 1.0):
        assert (planted == holds).all()  # every attribute scene finds a wrong caption in a batch of 64


def test_without_an_attribute_nothing_is_read_or_changed():
    out, planted, holds = _planted_captions(["a", "b"], [{}, {}], None, 0.9, np.random.default_rng(0))
    assert out == ["a", "b"] and not planted.any() and not holds.any()
    with pytest.raises(ConfigError, match="noise_attribute=magenta.*objects"):
        holds_attribute({"index": 4}, "magenta")


def test_loader_plants_in_training_batches_and_leaves_caption_noise_alone(shards):
    def epoch(**kw):
        return list(make_train_loader(shards["train"], TOK, 64, image_size=32, seed=0, caption_noise=0.2, **kw))

    plain, zero, half = epoch(), epoch(noise_attribute="magenta", noise_rate=0.0), epoch(noise_attribute="magenta",
                                                                                         noise_rate=0.5)
    for a, b, c in zip(plain, zero, half):
        assert a["caption"] == b["caption"] and a["noisy"].equal(b["noisy"])  # rate 0: the same batches
        assert not a["planted"].any() and not a["attribute"].any()
        assert b["attribute"].any() and not b["planted"].any()
        assert c["noisy"].equal(a["noisy"])  # caption noise draws its own stream: unchanged by planting
        assert not (c["planted"] & ~c["attribute"]).any()
        for i in np.flatnonzero(c["planted"].numpy()):
            clean = c["json"][i]["captions"][c["json"][i]["level"]]
            if not c["noisy"][i]:
                assert c["caption"][i] != clean and not shapes.plausible_matrix([c["caption"][i]], [c["json"][i]])[0, 0]
    assert sum(int(b["planted"].sum()) for b in half) > 0
    with pytest.raises(ValueError, match="noise_rate"):
        make_train_loader(shards["train"], TOK, 64, image_size=32, noise_attribute="magenta", noise_rate=1.5)


def test_val_and_test_stay_clean(shards, tmp_path):
    """A run with planted noise reads val and test exactly as written: every caption is its sample's own."""
    from probloss.data.prepare import load_eval, prepare_data

    overrides = [f"data.{split}_shards='{shards[split]}'" for split in ("train", "val", "test")]
    overrides += [f"data.cache_dir={tmp_path}", "data.noise_attribute=magenta", "data.noise_rate=1.0"]
    run = RunSettings.from_config(compose_config(overrides))
    spec = prepare_data(run.data, 64)
    for split in ("val", "test"):
        eval_set = load_eval(spec, run.data, TOK, split=split, seed=0)
        assert any(holds_attribute(m, "magenta") for m in eval_set.json)
        assert eval_set.captions == [m["captions"][m["level"]] for m in eval_set.json]


@pytest.mark.parametrize("overrides,expected", [
    (["data.noise_attribute=purple"], "unknown data.noise_attribute (a colour or shape) 'purple'"),
    (["data.noise_attribute=magenta", "data.noise_rate=1.5"], "data.noise_rate must be a probability in [0, 1]"),
    (["data.noise_attribute=magenta", "data.noise_rate=-0.1"], "data.noise_rate must be a probability in [0, 1]"),
    (["data.noise_rate=0.5"], "data.noise_rate=0.5 needs data.noise_attribute"),
])
def test_bad_settings_are_one_line_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as err:
        RunSettings.from_config(compose_config(overrides))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_every_colour_and_shape_is_a_valid_attribute():
    for word in (*shapes.COLOURS, *shapes.SHAPES):
        run = RunSettings.from_config(compose_config([f"data.noise_attribute={word}", "data.noise_rate=0.5"]))
        assert run.data.noise_attribute == word and run.data.noise_rate == 0.5


def test_a_run_with_planted_noise_reports_the_rate_and_the_planted_keys(tmp_path, cache_dir):
    """End to end: the training loop passes the options to the loader, counts what it replaced, and the final
    evaluation adds the planted keys on val and test."""
    from probloss.training.loop import main

    summary = main([f"out_dir={tmp_path}", f"data.cache_dir={cache_dir}", "data.train_size=512", "data.val_size=64",
                    "data.test_size=64", "trainer.batch_size=64", "trainer.max_steps=8", "trainer.warmup_steps=2",
                    "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.progress=false", "fabric.accelerator=cpu",
                    "fabric.devices=1", "eval.projector_samples=0", "loss=gaussian_var",
                    "data.noise_attribute=magenta", "data.noise_rate=0.5"])
    scenes = summary["data/planted_scene_frac"] * 8 * 64
    assert 0.1 < summary["data/planted_scene_frac"] < 0.35  # about a fifth of the scenes hold magenta
    assert abs(summary["data/planted_replaced_frac"] - 0.5) < 4 * math.sqrt(0.25 / scenes)
    for prefix in ("", "test/"):
        for key in ("unc/planted_auroc", "unc/planted_auroc_image", "unc/free/top1/planted_auroc",
                    "unc/cue/words/planted_auroc"):
            assert 0.0 <= summary[prefix + key] <= 1.0, prefix + key
    assert summary["test/unc/cue/words/planted_auroc"] == 0.5
    assert {"test/t2i_r@1_plausible_planted", "test/i2t_r@1_plausible_unplanted"} <= set(summary)
