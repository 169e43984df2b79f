"""A built-in, deliberately ambiguous image-caption dataset.

Each scene holds 2-5 objects (shape, colour, size, position on a 3x3 grid). Each of its 5
captions describes a *different* subset of the objects or a relation between two of them
("a red circle left of a blue square"), so one caption fits many scenes and one scene fits
captions about different objects: the ambiguity set-based embeddings exist for.

Scenes are a pure function of (seed, index), so any slice can be generated independently and
the dataset is identical however it is sharded. Two renderings:
  image    a small RGB picture (PIL), stored as JPEG
  regions  one feature vector per object plus background rows (like detector regions), from
           a fixed attribute embedding shared by every split, so the region path trains fast.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "REGION_DIM",
    "SHAPES",
    "Scene",
    "SceneObject",
    "make_scene",
    "render_image",
    "render_regions",
]

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
GRID = 3
REGION_DIM = 32
NUM_REGIONS = 8
_SPLIT_OFFSET = {"train": 0, "val": 10_000_019, "test": 20_000_039}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    def phrase(self, with_size: bool = False) -> str:
        size = f"{self.size} " if with_size else ""
        return f"a {size}{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    index: int
    objects: tuple[SceneObject, ...]
    captions: tuple[str, ...]


def _relation(a: SceneObject, b: SceneObject) -> str | None:
    if a.col < b.col:
        return "left of"
    if a.col > b.col:
        return "right of"
    if a.row < b.row:
        return "above"
    if a.row > b.row:
        return "below"
    return None


_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")


def _where(obj: SceneObject) -> str:
    if (obj.row, obj.col) == (1, 1):
        return "in the center"
    if obj.row == 1:
        return f"on the {_COLS[obj.col]}"
    if obj.col == 1:
        return f"at the {_ROWS[obj.row]}"
    return f"at the {_ROWS[obj.row]} {_COLS[obj.col]}"


def _captions(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> tuple[str, ...]:
    """Five captions, each about a different subset of objects: one object with its place,
    a relation between two objects, or a loose pair."""
    n = len(objects)
    candidates: list[str] = []
    for i in range(n):
        candidates.append(f"{objects[i].phrase(with_size=True)} {_where(objects[i])}")
        for j in range(n):
            if i != j and (rel := _relation(objects[i], objects[j])):
                candidates.append(
                    f"{objects[i].phrase(with_size=True)} {rel} {objects[j].phrase(with_size=True)}"
                )
            if i < j:
                candidates.append(f"{objects[i].phrase()} and {objects[j].phrase()}")
    unique = sorted(set(candidates))
    order = rng.permutation(len(unique))
    picked = [unique[k] for k in order[:5]]
    while len(picked) < 5:  # tiny scenes: reuse with an explicit count of objects
        picked.append(f"{n} shapes including {objects[len(picked) % n].phrase()}")
    return tuple(picked)


def make_scene(seed: int, index: int, split: str = "train") -> Scene:
    """The deterministic scene number `index` of a split for `seed`."""
    rng = np.random.default_rng([seed, _SPLIT_OFFSET[split] + index])
    n = int(rng.integers(2, 6))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    colours = list(COLOURS)
    objects = tuple(
        SceneObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=colours[int(rng.integers(len(colours)))],
            size=SIZES[int(rng.integers(len(SIZES)))],
            row=int(c) // GRID,
            col=int(c) % GRID,
        )
        for c in cells
    )
    return Scene(index=index, objects=objects, captions=_captions(objects, rng))


def render_image(scene: Scene, size: int = 64, quality: int = 90) -> bytes:
    """JPEG bytes of the scene drawn on a grey background."""
    img = Image.new("RGB", (size, size), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    for obj in scene.objects:
        r = cell * (0.42 if obj.size == "large" else 0.24)
        cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _attribute_projection() -> np.ndarray:
    # Fixed across seeds and splits: the "detector" is the same for train and test.
    width = len(SHAPES) + len(COLOURS) + len(SIZES) + 2 * GRID
    return np.random.default_rng(1234).standard_normal((width, REGION_DIM)).astype(np.float32)


_PROJECTION = _attribute_projection()


def render_regions(scene: Scene, noise: float = 0.1) -> np.ndarray:
    """(NUM_REGIONS, REGION_DIM) float32: one row per object, background rows, shuffled."""
    rng = np.random.default_rng([scene.index, 7])
    rows = []
    for obj in scene.objects:
        onehot = np.zeros(_PROJECTION.shape[0], dtype=np.float32)
        onehot[SHAPES.index(obj.shape)] = 1
        onehot[len(SHAPES) + list(COLOURS).index(obj.colour)] = 1
        onehot[len(SHAPES) + len(COLOURS) + SIZES.index(obj.size)] = 1
        base = len(SHAPES) + len(COLOURS) + len(SIZES)
        onehot[base + obj.row] = 1
        onehot[base + GRID + obj.col] = 1
        rows.append(onehot @ _PROJECTION)
    while len(rows) < NUM_REGIONS:
        rows.append(rng.standard_normal(REGION_DIM).astype(np.float32) * 0.5)
    feats = np.stack(rows) + noise * rng.standard_normal((NUM_REGIONS, REGION_DIM)).astype(
        np.float32
    )
    return feats[rng.permutation(NUM_REGIONS)].astype(np.float32)
