"""The shapes generator: deterministic, captions true of the pixels, levels ordered by specificity."""

import numpy as np
import pytest

from probloss.data.shapes import COLOURS, RELATIONS, SHAPES, SIZES, class_names, generate_sample

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
    """The facts a caption states, parsed with the grammar's words."""
    words = caption.replace(",", "").split()
    facts = {("count", {"an": 1, "two": 2, "three": 3}[words[0]] if words[-1] in ("object", "objects") and
              words[0] in ("two", "three") or caption == "an object" else words.count("a") + words.count("an"))}
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
            assert neg == {"relation": None, "binding": None}
            continue
        seen += 1
        a, b = meta["objects"][0], meta["objects"][1]
        for text in neg.values():
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
