"""The shapes generator: deterministic, captions true of the pixels, levels ordered by specificity, held-out
combinations absent from training, zero-shot prompts that no caption equals, control and matched pairs."""

import re

import numpy as np
import pytest

from probloss.data.shapes import (
    COLOURS, DEFAULT_TEMPLATES, PLACEHOLDERS, PLACEHOLDER_WORDS, RELATIONS, SHAPES, SIZES, TEST_INDEX_OFFSET,
    VAL_INDEX_OFFSET, caption_words, class_names, generate_sample, heldout_combos,
)

N = 150


def _pixels(seed, index, size=32):
    image, caption, meta = generate_sample(seed, index, image_size=size)
    return np.asarray(image), caption, meta


def test_deterministic():
    for index in (0, 7, 123456):
        a, b = _pixels(3, index), _pixels(3, index)
        assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert not np.array_equal(_pixels(3, 0)[0], _pixels(4, 0)[0])
    assert not np.array_equal(_pixels(3, 0)[0], _pixels(3, 1)[0])


@pytest.mark.parametrize("size", [32, 64])
def test_captions_are_true_of_the_pixels(size):
    counts = {1: 0, 2: 0, 3: 0}
    for index in range(N):
        pixels, caption, meta = _pixels(0, index, size)
        objs = meta["objects"]
        counts[len(objs)] += 1
        assert pixels.shape == (size, size, 3)
        drawn = np.zeros((size, size), dtype=bool)
        centroids = []
        for obj in objs:
            mask = (pixels == COLOURS[obj["colour"]]).all(-1)  # colours are distinct within a scene
            assert mask.sum() >= 0.25 * obj["extent"] ** 2, (index, obj)
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = obj["bbox"]
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
            cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
            centroids.append((cx, cy))
            assert int(cx * 3 // size) == obj["col"] and int(cy * 3 // size) == obj["row"], (index, obj, cx, cy)
            box = mask[y0:y1, x0:x1]
            if obj["shape"] == "square":
                assert box.mean() > 0.95
            else:
                assert box.mean() < 0.9, obj
            if obj["shape"] == "triangle":  # flat bottom, pointed top
                assert box[-1].mean() > 0.7 and box[0].mean() < 0.5
            drawn |= mask
        assert (pixels[~drawn] == (20, 20, 20)).all()  # nothing else in the picture
        rel = meta["relation"]
        if rel is not None:
            (sx, sy), (ox, oy) = centroids[rel["subject"]], centroids[rel["object"]]
            dx, dy = ox - sx, oy - sy
            expect = {"left of": dx > abs(dy), "right of": -dx > abs(dy), "above": dy > abs(dx),
                      "below": -dy > abs(dx)}
            assert expect[rel["relation"]], (index, rel, centroids)
        else:
            assert len(objs) == 1
    assert min(counts.values()) > 0.1 * N


def _facts(caption: str) -> set:
    """The facts a caption states, parsed with the grammar's words (independently of shapes.parse_caption)."""
    words = caption.replace(",", "").split()
    if len(words) == 2 and words[0] in ("two", "three"):
        assert words[1] in PLACEHOLDER_WORDS[len(PLACEHOLDER_WORDS) // 2:], caption  # a plural placeholder
        count = {"two": 2, "three": 3}[words[0]]
    else:
        count = words.count("a") + words.count("an")
    facts = {("count", count)}
    facts |= {("colour", w) for w in words if w in COLOURS} | {("shape", w) for w in words if w in SHAPES}
    facts |= {("size", w) for w in words if w in SIZES}
    for rel in RELATIONS:
        if f" {rel} " in caption:
            facts.add(("relation", rel))
    if " at the " in caption:
        facts.add(("position", caption.split(" at the ")[1]))
    return facts


def test_levels_are_ordered_by_specificity_and_true():
    for index in range(N):
        _, caption, meta = _pixels(1, index)
        objs = meta["objects"]
        truth = {("count", len(objs))} | {(k, o[k]) for o in objs for k in ("colour", "shape", "size")}
        if meta["relation"]:
            truth.add(("relation", meta["relation"]["relation"]))
        else:
            truth.add(("position", objs[0]["position"]))
        facts = [_facts(c) for c in meta["captions"]]
        for lower, higher in zip(facts, facts[1:]):
            assert lower < higher, meta["captions"]  # strictly more specific
        assert facts[-1] <= truth, (meta["captions"][-1], truth)
        assert caption == meta["captions"][meta["level"]]


def test_hard_negatives_use_the_same_words_but_are_false():
    seen = 0
    for index in range(N):
        _, _, meta = _pixels(2, index)
        neg, l3 = meta["negatives"], meta["captions"][3]
        if meta["relation"] is None:
            assert neg["relation"] is None and neg["binding"] is None and neg["control"]
            continue
        seen += 1
        a, b = meta["objects"][0], meta["objects"][1]
        for text in (neg["relation"], neg["binding"]):
            assert text != l3 and sorted(text.split()) == sorted(l3.split())  # a bag of words cannot tell
        # The relation negative puts object 1 first; the binding negative gives object 0 object 1's colour.
        assert neg["relation"].startswith(f"a {b['size']} {b['colour']} {b['shape']}".replace("a o", "an o"))
        assert f"{b['colour']} {a['shape']}" in neg["binding"] and f"{a['colour']} {b['shape']}" in neg["binding"]
    assert seen > 0.4 * N


def test_level_probs_and_labels():
    names = class_names()
    assert len(names) == len(COLOURS) * len(SHAPES) == len(set(names))
    for index in range(60):
        _, caption, meta = generate_sample(0, index, level_probs=(0, 0, 1, 0))
        assert meta["level"] == 2 and caption == meta["captions"][2]
        if len(meta["objects"]) == 1:
            o = meta["objects"][0]
            assert names[meta["label"]] == f"{o['colour']} {o['shape']}"
        else:
            assert meta["label"] is None
    levels = [generate_sample(0, i)[2]["level"] for i in range(400)]
    assert np.bincount(levels, minlength=4).min() > 60  # uniform by default


# --- splits: held-out combinations, prompts, control negative, matched pair ---------------------------------------


def _texts(meta) -> list[str]:
    """Every text a sample carries: its four captions, its negatives and its matched pairs."""
    pairs = [t for pair in meta["matched_pair"] for t in pair]
    return meta["captions"] + [t for t in meta["negatives"].values() if t] + pairs


COMBO = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")  # "red circle", "small red circle"


def _combos(text: str) -> set:
    return set(COMBO.findall(text))


def test_heldout_combos_cover_every_colour_and_shape():
    for seed in range(20):
        combos = heldout_combos(seed)
        assert len(combos) == len(set(combos)) == 8
        assert {c for c, _ in combos} == set(COLOURS) and {s for _, s in combos} == set(SHAPES), (seed, combos)
        assert combos == heldout_combos(seed)  # seeded
    assert heldout_combos(0) != heldout_combos(1)
    assert heldout_combos(0, 0) == () and len(set(heldout_combos(3, 20))) == 20
    with pytest.raises(ValueError, match="heldout_combos"):
        heldout_combos(0, 21)


def test_training_samples_never_show_a_heldout_combination():
    exclude = frozenset(heldout_combos(0))
    hits_without = 0
    for index in range(2000):
        _, caption, meta = generate_sample(0, index, exclude=exclude)
        assert not {(o["colour"], o["shape"]) for o in meta["objects"]} & exclude, (index, meta["objects"])
        for text in _texts(meta):
            assert not _combos(text) & exclude, (index, text)
        hits_without += bool(any(_combos(t) & exclude for t in _texts(generate_sample(0, index)[2])))
    assert hits_without > 200  # the same indices without the exclusion do show them: the check can fail


def test_val_and_test_keep_the_heldout_combinations():
    exclude = set(heldout_combos(0))
    names = class_names()
    for offset in (VAL_INDEX_OFFSET, TEST_INDEX_OFFSET):
        labelled = {names[m["label"]] for m in (generate_sample(0, offset + i)[2] for i in range(1500))
                    if m["label"] is not None}
        assert {f"{c} {s}" for c, s in exclude} <= labelled, offset  # as one-object, labelled scenes


def test_control_negative_replaces_one_attribute_by_an_absent_one():
    kinds = set()
    for index in range(300):
        _, _, meta = generate_sample(4, index)
        l3, control = meta["captions"][3].split(), meta["negatives"]["control"].split()
        assert len(l3) == len(control)
        (i,) = [k for k, (a, b) in enumerate(zip(l3, control)) if a != b]  # exactly one word differs
        used = {o[a] for o in meta["objects"] for a in ("colour", "shape")}
        assert l3[i] in used and control[i] in set(COLOURS) | set(SHAPES) and control[i] not in used
        kinds.add(("colour" if control[i] in COLOURS else "shape", len(meta["objects"])))
    assert kinds == {(a, n) for a in ("colour", "shape") for n in (1, 2, 3)}  # one-object scenes included


def test_matched_pairs_have_equal_word_counts_and_true_facts():
    kinds = set()
    for index in range(300):
        _, _, meta = generate_sample(5, index)
        objs = meta["objects"]
        truth = {("count", len(objs))} | {(k, o[k]) for o in objs for k in ("colour", "shape", "size")}
        assert len(meta["matched_pair"]) == (2 if len(objs) == 1 else 3)
        for less, more in meta["matched_pair"]:
            assert len(re.findall(r"\w+", less)) == len(re.findall(r"\w+", more)) <= 16
            assert _facts(less) <= truth and _facts(more) <= truth, (less, more, truth)
            assert less not in meta["captions"] and more not in meta["captions"]
            placeholders = [{w for w in _words(t) if w in PLACEHOLDER_WORDS} for t in (less, more)]
            assert placeholders[1] <= placeholders[0] and len(placeholders[0]) <= 1  # one placeholder word a pair
            kinds.add((len(objs), len(_words(less))))
    assert {n for n, _ in kinds} == {1, 2, 3}


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", text.lower()))  # what the word tokenizer sees


def test_zero_shot_prompts_are_never_training_captions():
    from probloss.eval.dual_encoder import fill_template
    from probloss.models import build_tokenizer

    assert len(DEFAULT_TEMPLATES) >= 4
    captions, n_objects = set(), set()
    for index in range(1500):
        for exclude in (frozenset(), frozenset(heldout_combos(0))):
            meta = generate_sample(6, index, exclude=exclude)[2]
            captions |= {_words(t) for t in _texts(meta)}
            n_objects.add(len(meta["objects"]))
    assert n_objects == {1, 2, 3} and len(captions) > 5000
    prompts = [fill_template(t, name) for t in DEFAULT_TEMPLATES for name in class_names()]
    assert "the orange cross" in prompts and "an orange cross object" in prompts  # the article rule applied
    assert not {_words(p) for p in prompts} & captions
    assert {_words(fill_template("a {}", n)) for n in class_names()} <= captions  # "a {}" would be: it can fail
    tokens = build_tokenizer("word", vocab=caption_words(), max_len=16)(prompts)
    assert (tokens != 2).all()  # every prompt word is in the vocabulary (2: unknown)
