"""`jest_shapes`: a procedurally generated image–text dataset, built locally.

Every image shows one object described by four attributes (shape, colour,
size, position) on a varied background. Three splits:

* ``raw``: a noisy "web" pool. About 45% of pairs are clean; the rest carry one
  corruption: a caption describing another object, a generic caption, a
  destroyed image, or a near-duplicate of an earlier clean pair (redundancy,
  so not clean either).
* ``curated``: a smaller, all-clean pool for training the reference model.
* ``eval``: a clean held-out split for zero-shot classification and retrieval.

The ``confusable`` build is the regime where in-batch hard negatives abound (the paper's
explanation of why joint selection beats independent selection): every object belongs to
one of 16 families, a (shape, size, position) fixed once from the seed, and comes in any
colour; every caption names the colour. A super-batch of 320 then holds about 20 members of
each family, pairs that differ only in colour (image and caption alike).

Each split draws from its own RNG stream and every example from its own seed
``(config.seed, split_id, index)``, so the data depend only on the config,
never on iteration order. Attribute labels always describe the object that was
drawn (for a corrupted image: the object before corruption).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import numpy as np
import PIL.Image
import PIL.ImageDraw
import tensorflow_datasets as tfds
from etils import epath

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "diamond", "cross", "star"],
    "color": ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"],
    "size": ["small", "medium", "large"],
    "position": [
        "top left", "top center", "top right",
        "center left", "center", "center right",
        "bottom left", "bottom center", "bottom right",
    ],
}
CORRUPTIONS: list[str] = [
    "none", "mismatched_caption", "generic_caption", "corrupted_image", "near_duplicate",
]
# Raw-pool mixture, in CORRUPTIONS order.
_CORRUPTION_PROBS = np.array([0.45, 0.15, 0.12, 0.13, 0.15])
_SPLIT_IDS = {"raw": 0, "curated": 1, "eval": 2}

_ZERO_SHOT_TEMPLATES = {
    "shape": ["a {}", "a photo of a {}", "a {} shape"],
    "color": ["a {} object", "a photo of something {}", "{}"],
    "size": ["a {} object", "a photo of a {} shape", "something {}"],
    "position": ["an object in the {}", "a shape in the {}", "a photo of an object in the {}"],
}

_RGB = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30),
    "green": (40, 180, 50), "cyan": (30, 205, 215), "blue": (40, 70, 225),
    "purple": (140, 50, 200), "pink": (245, 120, 190),
}
# Object half-extent as a fraction of the image side.
_RADIUS = {"small": 0.11, "medium": 0.17, "large": 0.25}

# The canonical class name comes first and is drawn half the time, so zero-shot
# prompts built from class names match the captions.
_COLOR_WORDS = {
    "red": ["red", "crimson", "scarlet"], "orange": ["orange", "tangerine", "amber"],
    "yellow": ["yellow", "golden", "lemon"], "green": ["green", "emerald", "grass-green"],
    "cyan": ["cyan", "turquoise", "aqua"], "blue": ["blue", "azure", "cobalt"],
    "purple": ["purple", "violet", "lilac"], "pink": ["pink", "rose", "hot pink"],
}
_SHAPE_WORDS = {
    "circle": ["circle", "disc", "dot", "round blob"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge", "triangular shape"],
    "diamond": ["diamond", "rhombus", "lozenge"],
    "cross": ["cross", "plus sign", "plus"],
    "star": ["star", "five-pointed star", "starburst"],
}
_SIZE_WORDS = {
    "small": ["small", "tiny", "little"],
    "medium": ["medium", "medium-sized", "mid-sized"],
    "large": ["large", "big", "huge"],
}
_POSITION_WORDS = {
    "top left": ["in the top left", "in the upper left", "in the top-left corner",
                 "at the upper left"],
    "top center": ["in the top center", "at the top", "near the top edge", "in the upper middle"],
    "top right": ["in the top right", "in the upper right", "in the top-right corner",
                  "at the upper right"],
    "center left": ["in the center left", "on the left", "on the left side", "in the middle left"],
    "center": ["in the center", "in the middle", "centered", "in the centre"],
    "center right": ["in the center right", "on the right", "on the right side",
                     "in the middle right"],
    "bottom left": ["in the bottom left", "in the lower left", "in the bottom-left corner",
                    "at the lower left"],
    "bottom center": ["in the bottom center", "at the bottom", "near the bottom edge",
                      "in the lower middle"],
    "bottom right": ["in the bottom right", "in the lower right", "in the bottom-right corner",
                     "at the lower right"],
}
_FRAMES = [
    "{}", "{}", "a photo of {}", "there is {}", "an image of {}", "a picture showing {}",
    "a drawing of {}", "close-up of {}", "{} on a {bg} background", "this is {}",
]
_GENERIC_CAPTIONS = [
    "image", "photo", "picture", "click here to see more", "best price!!",
    "free shipping on all orders", "untitled", "stock photo", "thumbnail", "download now",
    "view larger image", "screenshot", "wallpaper hd 4k", "sale 50% off", "loading...",
    "my new favourite thing", "share this post", "see more details", "product image",
    "no description available",
]
_GENERIC_FILENAMES = ["IMG_{:04d}.jpg", "DSC{:05d}.JPG", "image_{}.png", "photo {}", "{}.jpeg"]


def zero_shot_templates(attribute: str) -> list[str]:
    """Prompt templates (with a ``{}`` placeholder) for zero-shot on `attribute`."""
    if attribute not in _ZERO_SHOT_TEMPLATES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {list(ATTRIBUTES)}")
    return list(_ZERO_SHOT_TEMPLATES[attribute])


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Size and seed of a `jest_shapes` build."""

    seed: int = 0
    num_raw: int = 40_000
    num_curated: int = 10_000
    num_eval: int = 1_000
    image_size: int = 32
    # 0: every attribute drawn independently. k > 0: each object is one of k (shape, size,
    # position) families, in any colour, and its caption always names the colour.
    families: int = 0


class JestShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural image–text pairs with a noisy raw pool, a curated pool and eval."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    zero_shot_templates = staticmethod(zero_shot_templates)  # found via datasets.EMBEDDED
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", description="40k raw, 10k curated, 1k eval."),
        ShapesConfig(name="tiny", num_raw=512, num_curated=256, num_eval=128,
                     description="A few hundred examples per split, for tests."),
        ShapesConfig(name="confusable", families=16,
                     description="40k raw, 10k curated, 1k eval; 16 (shape, size, position) "
                                 "families in any colour: many pairs differ only in colour."),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default lookup needs `importlib_resources` for classes outside
        # its own package tree; the answer is simply this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        labels = {k: tfds.features.ClassLabel(names=v) for k, v in ATTRIBUTES.items()}
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "is_clean": tfds.features.Scalar(np.bool_),
            "corruption": tfds.features.ClassLabel(names=CORRUPTIONS),
            **labels,
        })
        # Keeping generation order makes record i of a split its example i.
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # nothing to download
        cfg = self.builder_config
        sizes = {"raw": cfg.num_raw, "curated": cfg.num_curated, "eval": cfg.num_eval}
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        for index in range(num):
            yield index, generate_example(cfg.seed, split, index, cfg.image_size, cfg.families)


def generate_example(seed: int, split: str, index: int, image_size: int = 32,
                     families: int = 0) -> dict:
    """Example `index` of `split`, as the builder writes it (image as PNG bytes);
    `families` as in `ShapesConfig`."""
    split_id = _SPLIT_IDS[split]
    rng = _example_rng(seed, split_id, index)
    corruption = _draw_corruption(rng) if split == "raw" else 0
    source = None
    if CORRUPTIONS[corruption] == "near_duplicate":
        source = _find_clean_source(seed, split_id, index, rng)
        if source is None:  # nothing clean before it: keep this one clean
            corruption = 0
    if source is not None:
        # Replay the source's stream: its first draw was its corruption type.
        src_rng = _example_rng(seed, split_id, source)
        _draw_corruption(src_rng)
        src = _clean_pair(src_rng, image_size, family_attributes(seed, families))
        image, caption, attrs = _near_duplicate(rng, src["image"]), src["caption"], src["attrs"]
    else:
        pair = _clean_pair(rng, image_size, family_attributes(seed, families))
        image, caption, attrs = pair["image"], pair["caption"], pair["attrs"]
        kind = CORRUPTIONS[corruption]
        if kind == "mismatched_caption":
            caption = _caption(rng, _other_attributes(rng, attrs), pair["background"])
        elif kind == "generic_caption":
            caption = _generic_caption(rng)
        elif kind == "corrupted_image":
            image = _corrupt_image(rng, image, pair["geometry"])
    return {"image": encode_png(image), "caption": caption, "is_clean": corruption == 0,
            "corruption": corruption, **attrs}


def _example_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split_id, index])


def _draw_corruption(rng: np.random.Generator) -> int:
    return int(rng.choice(len(CORRUPTIONS), p=_CORRUPTION_PROBS))


def _find_clean_source(
    seed: int, split_id: int, index: int, rng: np.random.Generator
) -> int | None:
    """A uniformly drawn earlier raw index whose pair is clean, or None."""
    if index == 0:
        return None
    for _ in range(32):
        j = int(rng.integers(0, index))
        if _draw_corruption(_example_rng(seed, split_id, j)) == 0:
            return j
    return None


def family_attributes(seed: int, families: int) -> list[dict[str, int]]:
    """The `families` distinct (shape, size, position) triples of a build; [] for 0."""
    if not families:
        return []
    keys = ("shape", "size", "position")
    counts = [len(ATTRIBUTES[k]) for k in keys]
    if families > int(np.prod(counts)):
        raise ValueError(f"families={families}: there are only {int(np.prod(counts))} "
                         "(shape, size, position) triples")
    picks = np.random.default_rng([seed, 1_000_003]).choice(int(np.prod(counts)), families,
                                                             replace=False)
    return [dict(zip(keys, map(int, np.unravel_index(int(i), counts)), strict=True)) for i in picks]


def _clean_pair(rng: np.random.Generator, size: int,
                families: list[dict[str, int]] = ()) -> dict:
    """Draws attributes (a family's, in any colour, if `families`), renders the image and
    writes a matching caption."""
    if families:
        attrs = {**families[int(rng.integers(len(families)))],
                 "color": int(rng.integers(len(ATTRIBUTES["color"])))}
        attrs = {k: attrs[k] for k in ATTRIBUTES}
    else:
        attrs = {k: int(rng.integers(len(v))) for k, v in ATTRIBUTES.items()}
    background, bg_words = _background(rng, size)
    mask, geometry = _object_mask(rng, attrs, size)
    rgb = np.array(_RGB[ATTRIBUTES["color"][attrs["color"]]], np.float32)
    rgb = rgb + rng.uniform(-15, 15, 3)
    alpha = mask[..., None]
    image = np.clip(background * (1 - alpha) + rgb * alpha, 0, 255).round().astype(np.uint8)
    caption = _caption(rng, attrs, bg_words, name_color=bool(families))
    return {"image": image, "caption": caption, "attrs": attrs,
            "background": bg_words, "geometry": geometry}


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A dark or light, low-saturation solid / gradient / texture, plus sensor noise."""
    light = bool(rng.random() < 0.5)

    def tone() -> np.ndarray:
        base = rng.uniform(170, 235) if light else rng.uniform(15, 75)
        return base + rng.normal(0, 8, 3)

    kind = int(rng.integers(3))
    if kind == 0:
        bg = np.broadcast_to(tone(), (size, size, 3)).astype(np.float32)
        words = "plain " + ("light" if light else "dark")
    elif kind == 1:
        a, b = tone(), tone()
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        bg = (a + (b - a) * t[..., None]).astype(np.float32)
        words = ("light" if light else "dark") + " gradient"
    else:
        grid = int(rng.integers(2, 9))
        coarse = rng.normal(0, rng.uniform(6, 16), (grid, grid)).astype(np.float32)
        coarse = PIL.Image.fromarray(coarse)
        texture = np.asarray(coarse.resize((size, size), PIL.Image.BILINEAR))
        bg = (tone() + texture[..., None]).astype(np.float32)
        words = "textured " + ("light" if light else "dark")
    # Per-pixel noise makes every image unique, even with identical attributes.
    bg = bg + rng.normal(0, rng.uniform(1.0, 3.0), (size, size, 3))
    return bg, words


def _object_mask(rng: np.random.Generator, attrs: dict, size: int) -> tuple[np.ndarray, tuple]:
    """Antialiased coverage in [0, 1] (drawn 4x larger, box-downsampled)."""
    radius = _RADIUS[ATTRIBUTES["size"][attrs["size"]]] * size * rng.uniform(0.92, 1.08)
    row, col = divmod(attrs["position"], 3)
    margin = radius + 1
    # Grid centres shrink inwards with the radius so the object stays in frame.
    cx = margin + col / 2 * (size - 2 * margin) + rng.uniform(-0.8, 0.8)
    cy = margin + row / 2 * (size - 2 * margin) + rng.uniform(-0.8, 0.8)
    angle = rng.uniform(-0.2, 0.2)  # small, so a square never turns into a diamond
    k = 4
    canvas = PIL.Image.new("L", (size * k, size * k), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    shape = ATTRIBUTES["shape"][attrs["shape"]]
    if shape == "circle":
        r = 0.95 * radius * k
        draw.ellipse([cx * k - r, cy * k - r, cx * k + r, cy * k + r], fill=255)
    else:
        pts = _polygon(shape) @ np.array([[np.cos(angle), np.sin(angle)],
                                          [-np.sin(angle), np.cos(angle)]])
        pts = (pts * radius + [cx, cy]) * k
        draw.polygon([tuple(p) for p in pts], fill=255)
    mask = np.asarray(canvas.reduce(k), np.float32) / 255.0
    return mask, (cx, cy, radius)


def _polygon(shape: str) -> np.ndarray:
    """Unit-radius outline of `shape`, centred at the origin, y pointing down."""
    if shape == "square":
        h = 0.85
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "diamond":
        return np.array([[0, -1.0], [0.7, 0], [0, 1.0], [-0.7, 0]])
    if shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(a), np.sin(a) + 0.2], -1) * 1.05
    if shape == "cross":
        w = 0.33
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w],
                         [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]])
    if shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a) + 0.08], -1)
    raise ValueError(f"no outline for {shape!r}")


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[0] if rng.random() < 0.5 else words[int(rng.integers(len(words)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(rng: np.random.Generator, attrs: dict, bg_words: str,
             name_color: bool = False) -> str:
    """A caption naming some attributes (always the shape or the colour; always the colour
    with `name_color`)."""
    names = {k: ATTRIBUTES[k][v] for k, v in attrs.items()}
    say = {k: bool(rng.random() < p) for k, p in
           (("size", 0.55), ("color", 0.8), ("shape", 0.8), ("position", 0.55))}
    if not (say["shape"] or say["color"]):
        say["shape" if rng.random() < 0.5 else "color"] = True
    say["color"] = say["color"] or name_color
    size = _pick(rng, _SIZE_WORDS[names["size"]]) if say["size"] else ""
    color = _pick(rng, _COLOR_WORDS[names["color"]]) if say["color"] else ""
    noun = (_pick(rng, _SHAPE_WORDS[names["shape"]]) if say["shape"]
            else ["object", "shape", "thing"][int(rng.integers(3))])
    where = _pick(rng, _POSITION_WORDS[names["position"]]) if say["position"] else ""
    style = rng.random()
    if style < 0.6:  # a sentence
        body = _with_article(" ".join(w for w in (size, color, noun) if w))
        text = _FRAMES[int(rng.integers(len(_FRAMES)))].format(
            body + (" " + where if where else ""), bg=bg_words)
    elif style < 0.85:  # comma-separated tags, e.g. "red circle, big, upper left"
        short = where
        if where.startswith(("in the", "at the", "on the", "near the")):
            short = where.split(" ", 2)[-1]
        text = ", ".join(w for w in (" ".join(w for w in (color, noun) if w), size, short) if w)
    else:  # predicative, e.g. "a star that is blue, on the left"
        subject = _with_article(" ".join(w for w in (size, noun) if w))
        text = subject + (f" that is {color}" if color else "") + (", " + where if where else "")
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.25:
        text += "."
    return text


def _other_attributes(rng: np.random.Generator, attrs: dict) -> dict:
    """Random attributes with a different shape and colour (for mismatched captions)."""
    other = {k: int(rng.integers(len(v))) for k, v in ATTRIBUTES.items()}
    for key in ("shape", "color"):
        n = len(ATTRIBUTES[key])
        other[key] = (attrs[key] + 1 + int(rng.integers(n - 1))) % n
    return other


def _generic_caption(rng: np.random.Generator) -> str:
    if rng.random() < 0.3:
        template = _GENERIC_FILENAMES[int(rng.integers(len(_GENERIC_FILENAMES)))]
        return template.format(int(rng.integers(1, 10_000)))
    return _GENERIC_CAPTIONS[int(rng.integers(len(_GENERIC_CAPTIONS)))]


def _corrupt_image(rng: np.random.Generator, image: np.ndarray, geometry: tuple) -> np.ndarray:
    """Destroys the evidence for the caption: noise, blank, occlusion, colour cast or scramble."""
    size = image.shape[0]
    img = image.astype(np.float32)
    kind = int(rng.integers(5))
    if kind == 0:
        w = rng.uniform(0.75, 0.95)
        img = img * (1 - w) + rng.uniform(0, 255, img.shape) * w
    elif kind == 1:
        img = np.broadcast_to(rng.uniform(0, 255, 3), img.shape) + rng.normal(0, 2, img.shape)
    elif kind == 2:
        cx, cy, r = geometry
        half = 1.4 * r + 2
        y0, y1 = int(max(cy - half, 0)), int(min(cy + half + 1, size))
        x0, x1 = int(max(cx - half, 0)), int(min(cx + half + 1, size))
        img[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    elif kind == 3:
        # A channel rotation moves every hue, so the named colour is wrong.
        img = img[..., [1, 2, 0] if rng.random() < 0.5 else [2, 0, 1]]
        img = 0.5 * img + 0.5 * rng.uniform(0, 255, 3)
    else:
        p = max(size // 4, 1)
        tiles = [img[i:i + p, j:j + p] for i in range(0, size, p) for j in range(0, size, p)]
        order = rng.permutation(len(tiles))
        n = size // p
        rows = [np.concatenate([tiles[order[r * n + c]] for c in range(n)], 1) for r in range(n)]
        img = np.concatenate(rows, 0)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _near_duplicate(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A re-encoded-looking copy: small brightness/contrast change, noise, maybe a 1 px shift."""
    img = image.astype(np.float32)
    img = (img - 128) * rng.uniform(0.95, 1.05) + 128 + rng.uniform(-5, 5)
    img = img + rng.normal(0, 2.0, img.shape)
    if rng.random() < 0.5:
        axis, step = int(rng.integers(2)), 1 if rng.random() < 0.5 else -1
        img = np.roll(img, step, axis=axis)
        edge = 0 if step == 1 else -1
        # Replicate the border instead of wrapping the opposite edge around.
        if axis == 0:
            img[edge] = img[edge + step]
        else:
            img[:, edge] = img[:, edge + step]
    return np.clip(img, 0, 255).round().astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """uint8[H, W, 3] → PNG bytes (how TFDS stores images without TensorFlow)."""
    buf = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()
