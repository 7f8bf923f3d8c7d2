"""The built-in "shapes" image-caption data: a deterministic generator ``(seed, index) -> sample``.

Each image (RGB, ``image_size`` px, 32 to 64 is sensible) holds 1 to 3 objects on a dark background. An object has
a shape, a colour, a size (small, large) and a position (a cell of a 3x3 grid: "top left" ... "bottom right").
Objects in one scene have distinct colours and distinct shapes, so every caption names each object uniquely and
the hard negatives below are false. Two- and three-object scenes carry a spatial relation between objects 0
and 1 (left of, right of, above, below: same grid row or column, different cells).

Captions at four specificity levels (each level's facts include the previous level's). An object without its
shape is named by a placeholder word, drawn per caption from :data:`PLACEHOLDERS` ("object", "thing", "item",
"shape"; plurals in L0), so no single placeholder token marks the vague levels and every word is trained::

    L0  "an object" / "a thing" / "two items" / "three shapes"             count
    L1  "a red thing" or "a circle" (one attribute, for every object)      + colour or shape
    L2  "a red circle" / "a red circle and a blue square"                  + colour and shape
    L3  "a small red circle at the top left"                               + size and position
        "a small red circle left of a large blue square"                   + sizes and relation
        "a small red circle left of a large blue square and a small green triangle"

Three-object L3 captions give the relation of objects 0 and 1 but no grid positions, so that every caption fits
in 16 word tokens (SigLIP's text length).

Metadata (the ``{key}.json`` of a shard; :func:`generate_sample` documents every key):

- ``captions`` [L0, L1, L2, L3] and ``level`` (the training caption is ``captions[level]``);
- ``negatives``: hard negatives built from the L3 caption. ``relation`` swaps the subject and object of the
  relation ("a large blue square left of a small red circle") and ``binding`` swaps the colours of objects 0
  and 1 ("a small blue circle left of a large red square"): both use exactly the words of the true caption, so
  a bag-of-words text tower cannot tell them apart; None for one-object scenes. ``control`` (every scene)
  replaces one object's colour or shape by one no object of the scene has ("... left of a large blue diamond"
  for "... left of a large blue square"): a new word, so even a bag of words can pass it; the probes' control
  (the seminar's "a blue cube and a yellow sphere" for "a blue cube and a yellow cube").
- ``heldout_mentions`` {"caption", "relation", "binding", "control"}: whether the L3 caption / each negative
  names a held-out (colour, shape) combination of the split's data (``heldout`` of :func:`generate_sample`; all
  False in training, which excludes them). A probe pair with unequal flags tests familiarity, not binding: the
  evaluator keeps the pairs whose flags agree.
- ``matched_pair``: a list of pairs [less specific, more specific] (below).
- ``label``: the colour x shape class index (``colour_index * len(SHAPES) + shape_index``, names in
  :func:`class_names`) for one-object scenes, else None.

Matched pairs (:func:`matched_pairs`). Two descriptions of the same scene with equal word counts, the second
fitting fewer scenes, to compare sigma across specificity with every trivial cue neutral. Each object is
described by a subset of {size, colour, shape} ("a small thing", "a red circle", ...): size and colour cost a word
each, shape costs none (it replaces the placeholder), and they carry about 1, 3 and 2.3 bits (2, 8 and 5 values).
The pair types, for objects x, y (a random ordered pair) and, in three-object scenes, z (one random attribute,
the same in both members)::

    one object   {size} < {size, shape}                       "a small thing"  < "a small circle"
                 {size, colour} < {size, colour, shape}       "a small red thing" < "a small red circle"
    two, three   A:  x {size}, y {colour}  <  x {size}, y {colour, shape}
                     "a small thing and a blue thing" < "a small thing and a blue square"
                 D:  x {size}, y {size, shape}  <  x {colour}, y {size, shape}   (and with x, y swapped)
                     "a small thing and a large square" < "a red thing and a large square"

Why this design: (i) no member is a training caption (training captions describe every object with the same
attributes, and one-object L3 captions end in a position), so every member's training frequency is 0 and the
frequency cue ties; the word count and the object count tie by construction. (ii) No single token separates the
members: within a pair the placeholder word is the same, and in two- and three-object pairs both members keep a
placeholder; a size or colour word that only one member has belongs to a different object in the other member
(D) or ties (A). Since every pair gains its specificity from a shape (A, one object) or from a colour for a size
(D), those classes cannot balance exactly: a shape token is only in the more specific member in a fraction
(the A pairs) / 5 of the pairs, a size token in about a quarter of the D pairs, a placeholder in a quarter of
the one-object pairs. tests/data/test_data_shapes.py measures every cue (each at most 0.56 on 2000 val samples;
the former single pair, "a red object and a blue object" < "a red circle and a blue square", gave 1.000 to the
token "object" and 0.98 to the training frequency). (iii) The more specific member gains at least 2 bits; the
same test checks with :func:`plausible_matrix` that it fits fewer scenes. A and the one-object pairs are entailed
(the more specific member implies the other); D trades a 1-bit size for a 3-bit colour.

Plausible matches (:func:`plausible_matrix`). A caption fits a scene when every fact it states holds: it names
exactly the scene's number of objects (every caption of a scene describes all of them), and the described
objects can be assigned to DISTINCT scene objects so that each one's colour, shape, size and grid position (where
stated) match and the stated relation holds between the objects assigned to its subject and object: "left of" /
"right of" = same grid row, the subject's column smaller / larger; "above" / "below" = same column, the
subject's row smaller / larger (as the generator places them).

Splits. Training samples take ``exclude``, a set of held-out (colour, shape) combinations (:func:`heldout_combos`)
that then appear in no object, caption, negative or matched pair of any training sample; val and test samples are
drawn without it (the natural distribution, held-out combinations included), so zero-shot accuracy can be split
into seen and unseen classes. :data:`DEFAULT_TEMPLATES` are zero-shot prompts that no caption equals.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any, Collection, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {  # well separated in RGB so the pixel tests can tell them apart
    "red": (230, 40, 40),
    "green": (40, 200, 40),
    "blue": (50, 90, 240),
    "yellow": (240, 225, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 215, 225),
    "white": (245, 245, 245),
    "orange": (250, 140, 10),
}
VERSION = 2  # part of the shapes cache key: bump it whenever generated samples change (2: placeholders, pairs)

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.22, "large": 0.40}  # object extent as a fraction of the image side
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
RELATIONS = ("left of", "right of", "above", "below")
# The words that stand for an object whose shape a caption does not state: singular -> plural (L0 counts).
PLACEHOLDERS = {"object": "objects", "thing": "things", "item": "items", "shape": "shapes"}
PLACEHOLDER_WORDS: tuple[str, ...] = (*PLACEHOLDERS, *PLACEHOLDERS.values())
NUMBER_WORDS = {2: "two", 3: "three"}
BACKGROUND = (20, 20, 20)
DEFAULT_LEVEL_PROBS = (0.25, 0.25, 0.25, 0.25)
VAL_INDEX_OFFSET = 10**9  # val sample i is generate_sample(seed, VAL_INDEX_OFFSET + i): independent of train_size
TEST_INDEX_OFFSET = 2 * 10**9  # test sample i is generate_sample(seed, TEST_INDEX_OFFSET + i)
NEGATIVE_KINDS = ("relation", "binding", "control")  # the keys of meta["negatives"]
# data.hard_negatives -> the kinds of negative captions in a training batch, in this order.
HARD_NEGATIVES = {"none": (), "relation": ("relation",), "binding": ("binding",), "control": ("control",),
                  "all": NEGATIVE_KINDS}
# Zero-shot prompts. Every word is a caption word, so the word tokenizer has trained every prompt token (a
# CLIP-style "a photo of a {}" would bring tokens no caption trains, mixing transfer with untrained-embedding
# noise), but no filled prompt equals a caption (tests/data/test_data_shapes.py checks it): captions start
# with "a", "an", "two" or "three", never end in "circle object", and "an object" stands alone. So zero-shot
# measures transfer from captions to new sentences, not the lookup of a memorised caption ("a {}" would
# be exactly the L2 caption of a one-object scene).
DEFAULT_TEMPLATES = ("the {}", "a {} object", "the {} object", "an object: a {}")
Combo = tuple[str, str]  # (colour, shape)
FULL = ("size", "colour", "shape")  # the attributes an L3 caption states of every object


def class_names() -> list[str]:
    """Zero-shot class names, index = ``colour_index * len(SHAPES) + shape_index``: "red circle", ..."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def heldout_combos(seed: int, n: int = 8) -> tuple[Combo, ...]:
    """``n`` (colour, shape) combinations held out of training, seeded, in class order.

    Drawn in rounds of one combination per colour, the shapes of a round from two shuffles of SHAPES, so the
    first 8 hold out every colour once and every shape at least once. ``n`` is at most 20 (half the classes),
    which leaves every colour and every shape several training partners.
    """
    if not 0 <= n <= len(COLOURS) * len(SHAPES) // 2:
        raise ValueError(f"heldout_combos must be in [0, {len(COLOURS) * len(SHAPES) // 2}], got {n}")
    rng = random.Random(f"heldout-{int(seed)}")  # its own stream: independent of every sample
    out: list[Combo] = []
    while len(out) < n:
        colours = rng.sample(list(COLOURS), len(COLOURS))
        shapes = rng.sample(SHAPES, len(SHAPES)) + rng.sample(SHAPES, len(SHAPES))
        for combo in zip(colours, shapes):
            if combo not in out and len(out) < n:
                out.append(combo)
    names = class_names()
    return tuple(sorted(out, key=lambda c: names.index(f"{c[0]} {c[1]}")))


def position_name(row: int, col: int) -> str:
    """Grid cell -> words: (0, 0) "top left", (0, 1) "top", (1, 1) "center", (1, 0) "left"."""
    if (row, col) == (1, 1):
        return "center"
    return " ".join(w for w in (ROWS[row] if row != 1 else "", COLS[col] if col != 1 else "") if w)


def caption_words() -> list[str]:
    """Every word the caption grammar can produce (the word tokenizer's vocabulary), sorted."""
    words = {"a", "an", "and", "at", "the", *NUMBER_WORDS.values(), *PLACEHOLDER_WORDS, *COLOURS, *SHAPES, *SIZES}
    words |= {w for r in RELATIONS for w in r.split()}
    words |= {w for name in (*ROWS, *COLS) for w in name.split()}
    return sorted(words)


# --- captions ------------------------------------------------------------------------------------------------


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def describe(obj: dict, attributes: Collection[str] = FULL, placeholder: str = "object") -> str:
    """One object in words: the article, its size and colour where ``attributes`` has them, then its shape
    (with "shape" in ``attributes``) or ``placeholder``. ``describe(o, ("colour",), "thing")`` -> "a red thing"."""
    words = [obj[a] for a in ("size", "colour") if a in attributes]
    words.append(obj["shape"] if "shape" in attributes else placeholder)
    return _a(" ".join(words))


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _l3(objects: list[dict], relation: dict | None) -> str:
    if relation is None:
        (obj,) = objects
        return f"{describe(obj)} at the {obj['position']}"
    s, o = objects[relation["subject"]], objects[relation["object"]]
    text = f"{describe(s)} {relation['relation']} {describe(o)}"
    rest = [describe(x) for i, x in enumerate(objects) if i not in (relation["subject"], relation["object"])]
    return _join([text, *rest])


def make_captions(objects: list[dict], relation: dict | None, l1_attribute: str, placeholder: str = "object"
                  ) -> list[str]:
    """The four captions L0..L3 of a scene (see the module docstring). ``l1_attribute``: "colour" or "shape";
    ``placeholder``: a key of :data:`PLACEHOLDERS`, for L0 and the colour form of L1."""
    n = len(objects)
    l0 = _a(placeholder) if n == 1 else f"{NUMBER_WORDS[n]} {PLACEHOLDERS[placeholder]}"
    l1 = _join([describe(o, (l1_attribute,), placeholder) for o in objects])
    l2 = _join([describe(o, ("colour", "shape")) for o in objects])
    return [l0, l1, l2, _l3(objects, relation)]


def matched_pairs(objects: list[dict], rng: np.random.Generator) -> list[list[str]]:
    """[[less specific, more specific], ...]: descriptions of the scene in equal word counts, the second fitting
    fewer scenes, with every trivial cue neutral (the pair types and why: module docstring)."""
    names = list(PLACEHOLDERS)

    def text(attributes: dict[int, tuple[str, ...]], placeholder: str) -> str:  # objects in scene order
        return _join([describe(objects[i], attributes[i], placeholder) for i in sorted(attributes)])

    if len(objects) == 1:
        p, q = (names[int(k)] for k in rng.integers(len(names), size=2))
        return [[text({0: ("size",)}, p), text({0: ("size", "shape")}, p)],
                [text({0: ("size", "colour")}, q), text({0: ("size", "colour", "shape")}, q)]]
    order = [int(i) for i in rng.permutation(len(objects))]
    x, y = order[0], order[1]
    shared = {}  # z: the third object, described alike in both members (its tokens tie)
    if len(objects) == 3:
        shared = {order[2]: (("colour",), ("size",), ("shape",))[int(rng.integers(3))]}
    p, q, r = (names[int(k)] for k in rng.integers(len(names), size=3))
    sized_shape = ("size", "shape")
    return [  # A, then D for (x, y) and for (y, x)
        [text({x: ("size",), y: ("colour",), **shared}, p), text({x: ("size",), y: ("colour", "shape"), **shared}, p)],
        [text({x: ("size",), y: sized_shape, **shared}, q), text({x: ("colour",), y: sized_shape, **shared}, q)],
        [text({y: ("size",), x: sized_shape, **shared}, r), text({y: ("colour",), x: sized_shape, **shared}, r)],
    ]


def _negative_scenes(objects: list[dict], relation: dict | None, control: tuple[int, str, str]
                     ) -> dict[str, tuple[list[dict], dict | None] | None]:
    """The (objects, relation) each hard negative describes (see :func:`make_negatives`)."""
    i, attribute, value = control
    changed = [dict(o) for o in objects]
    changed[i][attribute] = value
    out = {"relation": None, "binding": None, "control": (changed, relation)}
    if relation is not None:
        reversed_rel = dict(relation, subject=relation["object"], object=relation["subject"])
        swapped = [dict(o) for o in objects]
        swapped[0]["colour"], swapped[1]["colour"] = objects[1]["colour"], objects[0]["colour"]
        out.update(relation=(objects, reversed_rel), binding=(swapped, relation))
    return out


def make_negatives(objects: list[dict], relation: dict | None, control: tuple[int, str, str]) -> dict[str, str | None]:
    """Hard negatives of the L3 caption (see the module docstring). ``control``: (object index, "colour" or
    "shape", the new value) of the control negative."""
    return {kind: None if scene is None else _l3(*scene)
            for kind, scene in _negative_scenes(objects, relation, control).items()}


def heldout_mentions(objects: list[dict], relation: dict | None, control: tuple[int, str, str],
                     heldout: Collection[Combo]) -> dict[str, bool]:
    """{"caption", "relation", "binding", "control"}: whether the L3 caption / each hard negative names one of
    the ``heldout`` (colour, shape) combinations (False for a negative the scene lacks)."""
    def names(scene: tuple[list[dict], dict | None] | None) -> bool:
        return scene is not None and any((o["colour"], o["shape"]) in heldout for o in scene[0])

    scenes = _negative_scenes(objects, relation, control)
    return {"caption": names((objects, relation)), **{kind: names(scenes[kind]) for kind in NEGATIVE_KINDS}}


def _control(rng: np.random.Generator, objects: list[dict], exclude: Collection[Combo]) -> tuple[int, str, str]:
    """(object, attribute, value) of the control negative: a seeded object and attribute, and a value no object
    of the scene has and that makes no excluded combination (the next object/attribute if none is left)."""
    options = [(i, attribute) for i in range(len(objects)) for attribute in ("colour", "shape")]
    for k in rng.permutation(len(options)):
        i, attribute = options[int(k)]
        used = {o[attribute] for o in objects}
        other = objects[i]["shape" if attribute == "colour" else "colour"]
        values = [v for v in (COLOURS if attribute == "colour" else SHAPES) if v not in used and
                  ((v, other) if attribute == "colour" else (other, v)) not in exclude]
        if values:
            return i, attribute, values[int(rng.integers(len(values)))]
    raise ValueError(f"no control negative avoids the excluded combinations {sorted(exclude)}")  # not for n <= 20


# --- layout and drawing -----------------------------------------------------------------------------------------


def _attributes(rng: np.random.Generator, n: int, exclude: Collection[Combo]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct colours and distinct shapes for n objects; with ``exclude``, redrawn until no object and no
    binding negative (colours of objects 0 and 1 swapped) is an excluded combination."""
    names = list(COLOURS)
    for _ in range(10_000):
        colours = rng.choice(len(COLOURS), size=n, replace=False)
        shapes = rng.choice(len(SHAPES), size=n, replace=False)
        combos = [(names[c], SHAPES[s]) for c, s in zip(colours, shapes)]
        if n > 1:
            combos += [(names[colours[1]], SHAPES[shapes[0]]), (names[colours[0]], SHAPES[shapes[1]])]
        if not any(c in exclude for c in combos):
            return colours, shapes
    raise ValueError(f"cannot draw {n} objects avoiding the excluded combinations {sorted(exclude)}")


def _layout(rng: np.random.Generator, n: int, image_size: int, exclude: Collection[Combo] = ()
            ) -> tuple[list[dict], dict | None]:
    """Sample n objects with distinct colours/shapes, grid cells and a relation, placed without overlap."""
    colours, shapes = _attributes(rng, n, exclude)
    sizes = rng.choice(list(SIZES), size=n)
    rel_name = RELATIONS[rng.integers(len(RELATIONS))] if n > 1 else None
    s = image_size
    for attempt in range(1000):
        if attempt == 500:  # crowded scene (three large objects): make everything small rather than loop forever
            sizes = np.array(["small"] * n)
        cells = _cells(rng, n, rel_name)
        if cells is None:
            continue
        objs = []
        for i, (row, col) in enumerate(cells):
            extent = max(3, round(SIZES[str(sizes[i])] * s))
            half = extent / 2
            # Cell centres at 1/6, 1/2, 5/6 of the side, jittered, clamped so the object stays inside the image.
            cx = float(np.clip((col + 0.5) * s / 3 + rng.uniform(-s / 18, s / 18), half, s - half))
            cy = float(np.clip((row + 0.5) * s / 3 + rng.uniform(-s / 18, s / 18), half, s - half))
            objs.append(dict(shape=SHAPES[shapes[i]], colour=list(COLOURS)[colours[i]], size=str(sizes[i]),
                             position=position_name(row, col), row=int(row), col=int(col),
                             center=[round(cx, 2), round(cy, 2)], extent=extent))
        if all(_apart(a, b) for i, a in enumerate(objs) for b in objs[i + 1:]):
            relation = None if rel_name is None else {"subject": 0, "object": 1, "relation": rel_name}
            return objs, relation
    raise RuntimeError(f"could not place {n} objects in a {image_size}px image")  # unreachable for n <= 3


def _cells(rng: np.random.Generator, n: int, rel: str | None) -> list[tuple[int, int]] | None:
    """Distinct grid cells; objects 0 and 1 share a row (left/right of) or a column (above/below)."""
    if rel is None:
        return [(int(rng.integers(3)), int(rng.integers(3)))]
    a, b = sorted(rng.choice(3, size=2, replace=False).tolist())  # a < b
    line = int(rng.integers(3))
    if rel in ("left of", "right of"):
        first, second = (line, a), (line, b)  # subject left of object for "left of"
    else:
        first, second = (a, line), (b, line)  # subject above object for "above"
    if rel in ("right of", "below"):
        first, second = second, first
    cells = [first, second]
    while len(cells) < n:
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        if cell in cells:
            return None
        cells.append(cell)
    return cells


def _apart(a: dict, b: dict, gap: float = 1.0) -> bool:
    """Bounding boxes separated by at least ``gap`` px along x or y."""
    need = (a["extent"] + b["extent"]) / 2 + gap
    return abs(a["center"][0] - b["center"][0]) >= need or abs(a["center"][1] - b["center"][1]) >= need


def _draw(draw: ImageDraw.ImageDraw, obj: dict) -> list[int]:
    """Draw one object on an integer pixel box; returns the box [x0, y0, x1, y1) (far edge exclusive)."""
    e = obj["extent"]
    x0, y0 = round(obj["center"][0] - e / 2), round(obj["center"][1] - e / 2)
    x1, y1 = x0 + e - 1, y0 + e - 1  # PIL boxes include their far edge
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    fill = COLOURS[obj["colour"]]
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        t = max(1, round(e / 6))  # half the bar thickness
        draw.rectangle([x0, round(cy - t + 0.5), x1, round(cy + t - 0.5)], fill=fill)
        draw.rectangle([round(cx - t + 0.5), y0, round(cx + t - 0.5), y1], fill=fill)
    else:  # pragma: no cover - SHAPES and this function change together
        raise ValueError(shape)
    return [x0, y0, x1 + 1, y1 + 1]


def generate_sample(
    seed: int,
    index: int,
    image_size: int = 32,
    level_probs: Sequence[float] = DEFAULT_LEVEL_PROBS,
    object_probs: Sequence[float] = (0.4, 0.4, 0.2),
    *,
    exclude: Collection[Combo] = frozenset(),
    heldout: Collection[Combo] | None = None,
) -> tuple[Image.Image, str, dict[str, Any]]:
    """One sample, a pure function of ``(seed, index)`` and the keyword arguments.

    Args:
        seed: dataset seed.
        index: sample index (val samples use ``VAL_INDEX_OFFSET + i``, test samples ``TEST_INDEX_OFFSET + i``).
        image_size: side of the square RGB image in pixels.
        level_probs: probabilities of drawing the training caption from L0, L1, L2, L3.
        object_probs: probabilities of 1, 2 and 3 objects.
        exclude: (colour, shape) combinations that must not appear in any object, caption or negative of the
            sample (training samples: :func:`heldout_combos`; val and test: none).
        heldout: the split's held-out combinations, only for the ``heldout_mentions`` flags (val and test:
            :func:`heldout_combos`; None: ``exclude``, so training samples get all False).

    Returns:
        ``(image, caption, meta)``: a PIL RGB image, the training caption and the metadata dict with keys
        ``captions`` (L0..L3), ``level`` (of the training caption), ``objects`` (shape, colour, size, position,
        row, col, center [x, y] in px, extent in px, bbox [x0, y0, x1, y1) in px), ``relation`` ({subject,
        object, relation} over object indices, or None), ``negatives`` ({relation, binding, control}; relation
        and binding None for one-object scenes), ``heldout_mentions`` ({caption, relation, binding, control}:
        names a ``heldout`` combination), ``matched_pair`` ([[less specific, more specific], ...], equal word
        counts within a pair; :func:`matched_pairs`), ``label`` (class index or None), ``seed``, ``index``.
    """
    exclude = frozenset(map(tuple, exclude))
    rng = np.random.default_rng([int(seed), int(index)])
    n = int(rng.choice(3, p=np.asarray(object_probs) / np.sum(object_probs))) + 1
    objects, relation = _layout(rng, n, image_size, exclude)
    l1_attribute = "colour" if rng.random() < 0.5 else "shape"
    level = int(rng.choice(4, p=np.asarray(level_probs, dtype=float) / np.sum(level_probs)))
    control = _control(rng, objects, exclude)
    placeholder = list(PLACEHOLDERS)[int(rng.integers(len(PLACEHOLDERS)))]
    pairs = matched_pairs(objects, rng)

    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        obj["bbox"] = _draw(draw, obj)
    captions = make_captions(objects, relation, l1_attribute, placeholder)
    label = None
    if n == 1:
        label = list(COLOURS).index(objects[0]["colour"]) * len(SHAPES) + SHAPES.index(objects[0]["shape"])
    meta = dict(captions=captions, level=level, objects=objects, relation=relation,
                negatives=make_negatives(objects, relation, control),
                heldout_mentions=heldout_mentions(objects, relation, control,
                                                  exclude if heldout is None else frozenset(map(tuple, heldout))),
                matched_pair=pairs,
                label=label, seed=int(seed), index=int(index))
    return image, captions[level], meta


# --- plausible matches: the facts a caption states, and the scenes they hold for -----------------------------------

_POSITIONS = {position_name(r, c): 3 * r + c for r in range(3) for c in range(3)}  # "top left" -> grid cell 0
_PLURALS = {plural: singular for singular, plural in PLACEHOLDERS.items()}
_COUNTS = {word: n for n, word in NUMBER_WORDS.items()}
_SPLIT = re.compile(r", | and ")
# One described object: article, optional size and colour, shape or placeholder, optional position.
_OBJECT = re.compile(rf"(an?) (?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLOURS)}) )?"
                     rf"({'|'.join((*SHAPES, *PLACEHOLDERS))})"
                     rf"(?: at the ({'|'.join(sorted(_POSITIONS, key=len, reverse=True))}))?")
_PART = re.compile(rf"({_OBJECT.pattern})(?: ({'|'.join(RELATIONS)}) ({_OBJECT.pattern}))?")
Facts = tuple[tuple[tuple[int, int, int, int], ...], int]  # ((colour, shape, size, cell) per object, relation)


def parse_caption(caption: str) -> Facts:
    """The facts a caption of the generator's grammar states (module docstring), as indices (-1: not stated).

    Returns:
        ``(objects, relation)``: per described object ``(colour, shape, size, cell)`` indices into COLOURS, SHAPES,
        SIZES and the 3x3 grid (``3 * row + col``); ``relation`` the index into RELATIONS that holds between
        described objects 0 (subject) and 1 (object), or -1.

    Raises:
        ValueError: naming the caption, for text outside the grammar (e.g. a zero-shot prompt "the red circle").
    """
    words = caption.split(" ")
    if len(words) == 2 and words[0] in _COUNTS and words[1] in _PLURALS:  # L0: "two things"
        return ((-1, -1, -1, -1),) * _COUNTS[words[0]], -1
    objects, relation = [], -1
    for k, part in enumerate(_SPLIT.split(caption)):
        match = _PART.fullmatch(part)
        if match is None or (k > 0 and match.group(7) is not None):  # a relation only in the first part
            raise ValueError(f"caption {caption!r} is outside the shapes caption grammar (at {part!r})")
        if match.group(7) is not None:
            relation = RELATIONS.index(match.group(7))
        for start in (2, 9) if match.group(7) is not None else (2,):
            article, size, colour, noun, position = match.group(*range(start, start + 5))
            if article != ("an" if (size or colour or noun)[0] in "aeiou" else "a"):
                raise ValueError(f"caption {caption!r} is outside the shapes caption grammar (article {article!r} "
                                 f"before {(size or colour or noun)!r})")
            objects.append((list(COLOURS).index(colour) if colour else -1, SHAPES.index(noun) if noun in SHAPES else -1,
                            list(SIZES).index(size) if size else -1, _POSITIONS[position] if position else -1))
    return tuple(objects), relation


def _scene_array(meta: dict) -> np.ndarray:
    """(n, 4) colour, shape, size, cell indices of a sample's objects (json ``objects``)."""
    if not meta.get("objects") or any(k not in o for o in meta["objects"] for k in ("colour", "shape", "size", "row")):
        raise ValueError(f"sample {meta.get('index', '?')}: plausible matches need the json `objects` of the shapes "
                         "data (colour, shape, size, row, col of every object)")
    return np.array([(list(COLOURS).index(o["colour"]), SHAPES.index(o["shape"]), list(SIZES).index(o["size"]),
                      3 * int(o["row"]) + int(o["col"])) for o in meta["objects"]], dtype=np.int64).reshape(-1, 4)


def _relations_hold(subject_cell: np.ndarray, object_cell: np.ndarray) -> np.ndarray:
    """(S, len(RELATIONS)): whether each relation holds from a subject's grid cell to an object's (as placed)."""
    rs, cs, ro, co = subject_cell // 3, subject_cell % 3, object_cell // 3, object_cell % 3
    return np.stack([(rs == ro) & (cs < co), (rs == ro) & (cs > co), (cs == co) & (rs < ro), (cs == co) & (rs > ro)], 1)


def plausible_matrix(captions: Sequence[str], metas: Sequence[dict], chunk: int = 1024) -> torch.Tensor:
    """``[i, j]`` True when every fact caption j states holds for the scene of sample i (module docstring).

    Each distinct caption is parsed once (:func:`parse_caption`); then, per object count n and per assignment
    (permutation) of described objects to scene objects, all captions with n described objects are compared with
    all n-object scenes at once (numpy, captions in chunks of ``chunk``).

    Args:
        captions: M candidate captions of the generator's grammar (duplicates allowed).
        metas: N sample jsons with ``objects`` (colour, shape, size, row, col per object).

    Returns:
        Bool tensor (N, M).

    Raises:
        ValueError: naming the caption, for a caption outside the grammar; a sample without ``objects``.
    """
    unique = list(dict.fromkeys(captions))
    facts = [parse_caption(c) for c in unique]
    scenes = [_scene_array(m) for m in metas]
    fits = np.zeros((len(metas), len(unique)), dtype=bool)  # (N, U)
    for n in sorted({len(s) for s in scenes}):
        rows = np.array([i for i, s in enumerate(scenes) if len(s) == n])
        cols = np.array([j for j, (objs, _) in enumerate(facts) if len(objs) == n])
        if len(rows) == 0 or len(cols) == 0:
            continue
        scene = np.stack([scenes[i] for i in rows])  # (S, n, 4)
        stated = np.array([facts[j][0] for j in cols])  # (C, n, 4), -1 = not stated
        relation = np.array([facts[j][1] for j in cols])  # (C,)
        for lo in range(0, len(cols), chunk):
            d, rel = stated[lo:lo + chunk], relation[lo:lo + chunk]
            found = np.zeros((len(d), len(rows)), dtype=bool)  # (C, S)
            for perm in itertools.permutations(range(n)):
                ok = np.ones((len(d), len(rows)), dtype=bool)
                for j, target in enumerate(perm):
                    for a in range(4):  # described object j as scene object ``target``: attribute a matches
                        want = d[:, j, a, None]  # (C, 1)
                        ok &= (want < 0) | (want == scene[None, :, target, a])
                if n > 1:
                    holds = _relations_hold(scene[:, perm[0], 3], scene[:, perm[1], 3])  # (S, 4)
                    ok &= (rel[:, None] < 0) | holds[:, np.maximum(rel, 0)].T
                found |= ok
            fits[np.ix_(rows, cols[lo:lo + chunk])] = found.T
    index = {c: j for j, c in enumerate(unique)}
    return torch.from_numpy(fits[:, [index[c] for c in captions]])
