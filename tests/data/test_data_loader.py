"""The shard reader: equal and disjoint batches per rank, determinism, corrupt input, noise, real (JPEG) data."""

import ctypes
import io
import random
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

import probloss
from probloss.data import load_eval_set, make_train_loader, write_shapes_shards
from probloss.data.shapes import caption_words
from probloss.models import build_dual_encoder, build_tokenizer

TOK = build_tokenizer("word", vocab=caption_words(), max_len=16)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """8 shards of 40 (even) and the same data as 5 uneven shards."""
    root = tmp_path_factory.mktemp("loader")
    even = write_shapes_shards(root / "even", 320, 8, test_size=0, seed=2, shard_size=40, progress=False)["train"]
    uneven = write_shapes_shards(root / "uneven", 300, 8, test_size=0, seed=2, shard_size=70, progress=False)["train"]
    return even, uneven


def _keys(batches):
    return [m["index"] for b in batches for m in b["json"]]


def _epoch(pattern, **kw):
    kw = {"image_size": 32, "seed": 0, **kw}
    return list(make_train_loader(pattern, TOK, kw.pop("batch_size", 16), **kw))


def test_batch_format(shapes):
    (b,) = _epoch(shapes[0], batches_per_epoch=1)
    assert b["image"].shape == (16, 3, 32, 32) and b["image"].dtype == torch.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["tokens"].shape == (16, 16) and b["tokens"].dtype == torch.long
    assert len(b["caption"]) == len(b["json"]) == 16 and b["skipped"] == 0
    assert b["tokens"].equal(TOK(b["caption"]))
    assert [m["captions"][m["level"]] for m in b["json"]] == b["caption"]
    assert "negative_tokens" not in b  # hard_negatives="none" (the default)


@pytest.mark.parametrize("option,kinds", [("relation", ["relation"]), ("control", ["control"]),
                                          ("all", ["relation", "binding", "control"])])
def test_hard_negative_tokens(shapes, option, kinds):
    (b,) = _epoch(shapes[0], batches_per_epoch=1, batch_size=32, hard_negatives=option, caption_noise=0.5)
    assert b["negative_tokens"].shape == (32, len(kinds), 16) and b["negative_tokens"].dtype == torch.long
    one_object = 0
    for row, meta in zip(b["negative_tokens"], b["json"]):
        neg = meta["negatives"]
        one_object += neg["relation"] is None
        # A kind a one-object scene lacks (relation, binding) is filled with its control negative.
        expect = [neg[k] if neg[k] is not None else neg["control"] for k in kinds]
        assert row.equal(TOK(expect)), (expect, meta["captions"])
        assert not any(row[k].equal(TOK(meta["captions"][3])[0]) for k in range(len(kinds)))  # all false
    assert 0 < one_object < 32  # both kinds of scene were checked
    with pytest.raises(ValueError, match="none\\|relation\\|binding\\|control\\|all"):
        make_train_loader(shapes[0], TOK, 4, image_size=32, hard_negatives="foo")


def test_hard_negatives_from_shards_without_them_name_the_shard_and_the_fix(tmp_path):
    from probloss.errors import ConfigError

    _write_tar(tmp_path / "0.tar", [{"__key__": f"k{i}", "png": _png(i), "txt": "x", "json": b'{"label": 1}'}
                                    for i in range(8)])
    with pytest.raises(ConfigError, match=r"data.hard_negatives=binding: sample 'k\d' of shard .*0.tar .*"
                                          r"scripts/make_data.py.*data.hard_negatives=none"):
        _epoch(str(tmp_path / "0.tar"), batch_size=4, hard_negatives="binding")


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (2, 2)])
def test_ranks_get_disjoint_equal_count_batches(shapes, world_size, num_workers):
    per_rank = [_epoch(shapes[0], rank=r, world_size=world_size, num_workers=num_workers) for r in range(world_size)]
    assert [len(b) for b in per_rank] == [320 // (16 * world_size)] * world_size
    keys = [_keys(b) for b in per_rank]
    assert all(len(k) == len(set(k)) for k in keys)  # each rank sees a sample at most once per epoch
    assert not set(keys[0]) & set(keys[1])


def test_uneven_shards_and_few_shards_still_give_equal_disjoint_batches(shapes):
    counts = [len(_epoch(shapes[1], rank=r, world_size=3)) for r in range(3)]  # 5 shards of 70, 70, 70, 70, 20
    assert counts == [300 // 48] * 3
    # 5 shards < 3 ranks x 2 workers: readers split by sample instead of by shard.
    keys = [_keys(_epoch(shapes[1], rank=r, world_size=3, num_workers=2, batches_per_epoch=4)) for r in range(3)]
    assert all(len(k) == 64 for k in keys)
    assert not (set(keys[0]) & set(keys[1])) | (set(keys[1]) & set(keys[2])) | (set(keys[0]) & set(keys[2]))


def test_deterministic_given_seed_epoch_rank(shapes):
    a, b = _epoch(shapes[0], rank=1, world_size=2), _epoch(shapes[0], rank=1, world_size=2)
    assert _keys(a) == _keys(b) and all(x["image"].equal(y["image"]) for x, y in zip(a, b))
    assert _keys(_epoch(shapes[0], rank=1, world_size=2, epoch=1)) != _keys(a)
    assert _keys(_epoch(shapes[0], rank=1, world_size=2, seed=1)) != _keys(a)
    loader = make_train_loader(shapes[0], TOK, 16, image_size=32, rank=1, world_size=2, seed=0)
    first, second = _keys(loader), _keys(loader)  # each pass is the next epoch
    assert first == _keys(a) and second == _keys(_epoch(shapes[0], rank=1, world_size=2, epoch=1))


def test_caption_and_image_noise(shapes):
    clean = _epoch(shapes[0], batches_per_epoch=2)
    noisy = _epoch(shapes[0], batches_per_epoch=2, caption_noise=1.0, image_noise=0.2, image_blur=1.0)
    assert _keys(clean) == _keys(noisy)
    assert all(b["noisy"].all() for b in noisy) and not any(b["noisy"].any() for b in clean)
    changed = [c != m["captions"][m["level"]] for b in noisy for c, m in zip(b["caption"], b["json"])]
    assert np.mean(changed) > 0.5
    assert not clean[0]["image"].equal(noisy[0]["image"])
    ev = [load_eval_set(shapes[0], TOK, image_size=32, max_samples=20, image_noise=0.1, seed=3) for _ in range(2)]
    assert ev[0].images.equal(ev[1].images)  # robustness evaluation sees the same corruption every time
    assert not ev[0].images.equal(load_eval_set(shapes[0], TOK, image_size=32, max_samples=20).images)


def _write_tar(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def _png(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_corrupt_input_is_skipped_and_counted(tmp_path, caplog):
    good = [{"__key__": f"good{i:03d}", "png": _png(i), "txt": f"caption {i}"} for i in range(40)]
    _write_tar(tmp_path / "0.tar", good[:20])
    _write_tar(tmp_path / "1.tar", [
        {"__key__": "nocap", "png": _png(100)},                      # missing caption
        {"__key__": "noimg", "txt": "no image here"},                # missing image
        {"__key__": "badimg", "png": b"not a png at all", "txt": "x"},  # undecodable image
        {"__key__": "empty", "png": _png(101), "txt": "  "},         # empty caption
        *good[20:30],
    ])
    _write_tar(tmp_path / "full.tar", good[30:])
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "2.tar").write_bytes(data[: len(data) // 2])         # truncated tar
    (tmp_path / "full.tar").unlink()
    (tmp_path / "3.tar").write_bytes(b"garbage" * 100)               # not a tar at all
    pattern = str(tmp_path / "{0..3}.tar")

    ev = load_eval_set(pattern, TOK, image_size=32)
    assert set(ev.keys) <= {s["__key__"] for s in good} and len(ev) >= 30
    assert ev.skipped >= 6  # 4 bad samples, the truncated tar, the garbage file
    assert "skipping corrupt data" in caplog.text

    batches = _epoch(pattern, batch_size=8, batches_per_epoch=10)    # 80 samples: more than one pass
    assert len(batches) == 10
    assert {k for b in batches for k in b["caption"]} <= {s["txt"] for s in good}
    assert sum(b["skipped"] for b in batches) >= 6


def test_jpeg_shards_from_arbitrary_images_train_one_step(tmp_path):
    rng = random.Random(0)
    words = ["a photo of", "ein Bild von", "un chat", "🐈 cat", "dog", "the sea at dusk", "x"]
    samples = []
    for i in range(24):
        w, h = rng.choice([(64, 48), (40, 80), (32, 32), (100, 100)])
        img = Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8))
        if i % 3 == 0:
            img = img.convert("L")  # grayscale JPEGs must become RGB
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        samples.append({"__key__": f"img{i:04d}", "jpg": buf.getvalue(), "txt": f"{rng.choice(words)} {i}"})
    _write_tar(tmp_path / "00000.tar", samples[:12])
    _write_tar(tmp_path / "00001.tar", samples[12:])
    tok = build_tokenizer("byte", max_len=24)
    assert len(make_train_loader(str(tmp_path / "*.tar"), tok, 8, image_size=32)) == 3  # counted from tar headers
    (batch,) = make_train_loader(str(tmp_path / "{00000..00001}.tar"), tok, 8, image_size=32, seed=0,
                                 batches_per_epoch=1)
    assert batch["image"].shape == (8, 3, 32, 32) and batch["json"] == [{}] * 8

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/model/tiny.yaml").read_text())
    cfg.pop("defaults")  # Hydra's defaults list: the other keys take their defaults (probloss/models/settings.py)
    torch.manual_seed(0)
    model = build_dual_encoder(cfg, vocab_size=tok.vocab_size, max_len=tok.max_len, image_size=32, log_std=False)
    loss = probloss.build_loss("infonce")
    opt = torch.optim.SGD(list(model.parameters()) + list(loss.parameters()), lr=0.1)
    value = loss(*model(batch["image"], batch["tokens"]).loss_args())
    value.backward()
    opt.step()
    assert torch.isfinite(value)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


class _PdeathsigProbe(torch.utils.data.IterableDataset):
    """Yields the DataLoader worker's parent-death signal (Linux prctl PR_GET_PDEATHSIG)."""
    epoch = 0

    def __len__(self):
        return 1

    def __iter__(self):
        sig = ctypes.c_int(0)
        ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(sig))  # 2 = PR_GET_PDEATHSIG
        yield torch.tensor(sig.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_loader_workers_die_with_the_training_process():
    # A SIGKILLed training run must not leave its DataLoader workers hanging on a full pipe.
    from probloss.data.loader import TrainLoader

    (value,) = list(TrainLoader(_PdeathsigProbe(), num_workers=1))
    assert int(value) == signal.SIGKILL


def test_shards_are_cycled_not_resampled(shapes):
    """configs/data/webdataset.yaml: a reader goes through its part of the shards pass after pass (a seeded
    shuffled order each pass), so every sample comes once per pass; resampling would repeat some and miss others."""
    keys = _keys(_epoch(shapes[0], batches_per_epoch=2 * 320 // 16))
    assert sorted(keys[:320]) == sorted(keys[320:]) == sorted(set(keys)) and len(set(keys)) == 320
    assert keys[:320] != keys[320:]  # the second pass is in another order


def test_partial_captions_are_the_same_scene_one_level_less_specific(shapes):
    (batch,) = _epoch(shapes[0], batches_per_epoch=1, batch_size=64, partial_captions=True, caption_noise=0.25)
    assert batch["partial_tokens"].shape == batch["tokens"].shape and batch["partial_mask"].dtype == torch.bool
    for i, meta in enumerate(batch["json"]):
        has_view = meta["level"] >= 1 and not batch["noisy"][i]
        assert bool(batch["partial_mask"][i]) == has_view
        want = meta["captions"][meta["level"] - 1] if has_view else batch["caption"][i]
        assert torch.equal(batch["partial_tokens"][i], TOK([want])[0])
    assert batch["partial_mask"].any() and not batch["partial_mask"].all()
    assert "partial_tokens" not in _epoch(shapes[0], batches_per_epoch=1)[0]


def _batch_digest(batches):
    return [(m["index"], c) for b in batches for m, c in zip(b["json"], b["caption"])], \
        [b["image"] for b in batches], [b["tokens"] for b in batches]


def test_decoded_cache_gives_the_same_batches_and_later_passes_read_nothing(shapes, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(Path(shapes[0]).parent, folder)
    pattern = str(folder / Path(shapes[0]).name)
    noise = {"image_noise": 0.2, "caption_noise": 0.3}  # drawn per epoch, after the cache
    plain = make_train_loader(pattern, TOK, 16, image_size=32, seed=0, **noise)
    cached = make_train_loader(pattern, TOK, 16, image_size=32, seed=0, cache_mb=64, **noise)
    first = [list(plain), list(cached)]
    for a, b in zip(_batch_digest(first[0]), _batch_digest(first[1])):
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a[0], torch.Tensor) else a == b
    assert len(cached.dataset._cache.shards) == 8  # every shard was read to its end and kept

    for shard in folder.glob("*.tar"):
        shard.unlink()  # the next epoch comes from memory or not at all
    second = list(cached)
    assert len(second) == len(first[1]) and sum(b["skipped"] for b in second) == 0
    reference = list(make_train_loader(shapes[0], TOK, 16, image_size=32, seed=0, epoch=1, **noise))
    for a, b in zip(_batch_digest(reference), _batch_digest(second)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a[0], torch.Tensor) else a == b
    assert _keys(second) != _keys(first[1])  # another epoch: another order and noise


def test_a_cache_over_budget_keeps_nothing_and_changes_nothing(shapes):
    small = make_train_loader(shapes[0], TOK, 16, image_size=32, seed=0, cache_mb=0.01)
    assert _keys(small) == _keys(_epoch(shapes[0])) and small.dataset._cache.shards == {}


@pytest.mark.parametrize("num_workers,batches_per_epoch", [(0, 5), (1, 5), (2, 6), (2, 5)])
def test_the_stream_is_the_epochs_one_after_another(shapes, num_workers, batches_per_epoch):
    """One persistent DataLoader (2 workers: 6 batches per epoch split evenly) or, where workers' shares differ
    (5 over 2), a DataLoader per epoch: the same batches as epoch-by-epoch passes, numbered by epoch."""
    kw = {"image_size": 32, "seed": 0, "batches_per_epoch": batches_per_epoch, "num_workers": num_workers,
          "cache_mb": 64, "rank": 1, "world_size": 2}
    stream = make_train_loader(shapes[0], TOK, 8, epoch=2, **kw).stream()
    got = [next(stream) for _ in range(3 * batches_per_epoch)]
    assert [(e, i) for e, i, _ in got] == [(e, i) for e in (2, 3, 4) for i in range(batches_per_epoch)]
    expect = [b for e in (2, 3, 4) for b in make_train_loader(shapes[0], TOK, 8, epoch=e, **kw)]
    assert _keys([b for _, _, b in got]) == _keys(expect)
    assert all(torch.equal(a["image"], b["image"]) for (_, _, a), b in zip(got, expect))
