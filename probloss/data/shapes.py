"""The built-in "shapes" image-caption data: a deterministic generator ``(seed, index) -> sample``.

Each image (RGB, ``image_size`` px, 32 to 64 is sensible) holds 1 to 3 objects on a dark background. An object has
a shape, a colour, a size (small, large) and a position (a cell of a 3x3 grid: "top left" ... "bottom right").
Objects in one scene have distinct colours and distinct shapes, so every caption names each object uniquely and
the hard negatives below are false. Two- and three-object scenes carry a spatial relation between objects 0
and 1 (left of, right of, above, below: same grid row or column, different cells).

Captions at four specificity levels (each level's facts include the previous level's)::

    L0  "an object" / "two objects" / "three objects"                      count
    L1  "a red object" or "a circle" (one attribute, for every object)     + colour or shape
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
- ``matched_pair`` [less specific, more specific]: the L1 colour form and L2 ("a red object and a blue object"
  / "a red circle and a blue square"), equal in word count, so sigma can be compared across specificity
  without caption length as a confound.
- ``label``: the colour x shape class index (``colour_index * len(SHAPES) + shape_index``, names in
  :func:`class_names`) for one-object scenes, else None.

Splits. Training samples take ``exclude``, a set of held-out (colour, shape) combinations (:func:`heldout_combos`)
that then appear in no object, caption or negative of any training sample; val and test samples are drawn
without it (the natural distribution, held-out combinations included), so zero-shot accuracy can be split into
seen and unseen classes. :data:`DEFAULT_TEMPLATES` are zero-shot prompts that no caption equals.
"""

from __future__ import annotations

import random
from typing import Any, Collection, Sequence

import numpy as np
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
VERSION = 1  # part of the shapes cache key: bump it whenever generated samples change

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.22, "large": 0.40}  # object extent as a fraction of the image side
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {1: "an object", 2: "two objects", 3: "three objects"}
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
    words = {"a", "an", "and", "at", "the", "object", "objects", "two", "three", *COLOURS, *SHAPES, *SIZES}
    words |= {w for r in RELATIONS for w in r.split()}
    words |= {w for name in (*ROWS, *COLS) for w in name.split()}
    return sorted(words)


# --- captions ------------------------------------------------------------------------------------------------


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _describe(obj: dict, *, size: bool = False) -> str:
    return _a(f"{obj['size'] + ' ' if size else ''}{obj['colour']} {obj['shape']}")


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _l3(objects: list[dict], relation: dict | None) -> str:
    if relation is None:
        (obj,) = objects
        return f"{_describe(obj, size=True)} at the {obj['position']}"
    s, o = objects[relation["subject"]], objects[relation["object"]]
    text = f"{_describe(s, size=True)} {relation['relation']} {_describe(o, size=True)}"
    rest = [_describe(x, size=True) for i, x in enumerate(objects) if i not in (relation["subject"], relation["object"])]
    return _join([text, *rest])


def make_captions(objects: list[dict], relation: dict | None, l1_attribute: str) -> list[str]:
    """The four captions L0..L3 of a scene (see the module docstring). ``l1_attribute``: "colour" or "shape"."""
    l1_colour, l2 = matched_pair(objects)
    l1 = l1_colour if l1_attribute == "colour" else _join([f"a {o['shape']}" for o in objects])
    return [COUNT_WORDS[len(objects)], l1, l2, _l3(objects, relation)]


def matched_pair(objects: list[dict]) -> list[str]:
    """[L1 colour form, L2]: the same scene with and without shapes, in the same number of words."""
    return [_join([_a(f"{o['colour']} object") for o in objects]), _join([_describe(o) for o in objects])]


def make_negatives(objects: list[dict], relation: dict | None, control: tuple[int, str, str]) -> dict[str, str | None]:
    """Hard negatives of the L3 caption (see the module docstring). ``control``: (object index, "colour" or
    "shape", the new value) of the control negative."""
    i, attribute, value = control
    changed = [dict(o) for o in objects]
    changed[i][attribute] = value
    out = {"relation": None, "binding": None, "control": _l3(changed, relation)}
    if relation is not None:
        reversed_rel = dict(relation, subject=relation["object"], object=relation["subject"])
        swapped = [dict(o) for o in objects]
        swapped[0]["colour"], swapped[1]["colour"] = objects[1]["colour"], objects[0]["colour"]
        out.update(relation=_l3(objects, reversed_rel), binding=_l3(swapped, relation))
    return out


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

    Returns:
        ``(image, caption, meta)``: a PIL RGB image, the training caption and the metadata dict with keys
        ``captions`` (L0..L3), ``level`` (of the training caption), ``objects`` (shape, colour, size, position,
        row, col, center [x, y] in px, extent in px, bbox [x0, y0, x1, y1) in px), ``relation`` ({subject,
        object, relation} over object indices, or None), ``negatives`` ({relation, binding, control}; relation
        and binding None for one-object scenes), ``matched_pair`` ([L1 colour form, L2], equal word counts),
        ``label`` (class index or None), ``seed``, ``index``.
    """
    exclude = frozenset(map(tuple, exclude))
    rng = np.random.default_rng([int(seed), int(index)])
    n = int(rng.choice(3, p=np.asarray(object_probs) / np.sum(object_probs))) + 1
    objects, relation = _layout(rng, n, image_size, exclude)
    l1_attribute = "colour" if rng.random() < 0.5 else "shape"
    level = int(rng.choice(4, p=np.asarray(level_probs, dtype=float) / np.sum(level_probs)))
    control = _control(rng, objects, exclude)

    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        obj["bbox"] = _draw(draw, obj)
    captions = make_captions(objects, relation, l1_attribute)
    label = None
    if n == 1:
        label = list(COLOURS).index(objects[0]["colour"]) * len(SHAPES) + SHAPES.index(objects[0]["shape"])
    meta = dict(captions=captions, level=level, objects=objects, relation=relation,
                negatives=make_negatives(objects, relation, control), matched_pair=matched_pair(objects),
                label=label, seed=int(seed), index=int(index))
    return image, captions[level], meta
