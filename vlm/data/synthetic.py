"""The synthetic shapes dataset: the embedded default that every stage trains on when no data is given.

Coloured shapes drawn at a random position and size on a random tinted background, with captions in varied
phrasings (phase 1 and `align`) and question/answer conversations (`sft`): colour, shape, count, position, and a
two-image comparison. Everything is a pure function of the seed, so the same config always yields the same shards.
Splits are written as webdataset shards into a cache directory on first use and reused after.

CLI: `python -m vlm.data.synthetic shape.png [a.png ...] [--seed N] [--size S]` draws pictures of the kind a model
trained on this data answers about, and prints what each shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlm.config import ConfigError, SyntheticConfig

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 200, 210),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
    "pink": (250, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
CLASSNAMES = [f"{color} {shape}" for color in COLORS for shape in SHAPES]  # label = index; 32 classes

CAPTION_TEMPLATES = (
    "a {c} {s}",
    "a {c} {s} in the {p}",
    "a photo of a {c} {s}.",
    "there is a {c} {s} in the {p} of the picture",
    "an image showing a {c} {s} on a plain background",
    "a single {c} {s}, {p}",
    "{c} {s}",
    "a drawing of a {c} {s} near the {p} corner",
    "the picture shows one {s}; it is {c}",
    "a small {c} {s}",
)
# A quarter of the caption images hold two or three shapes, so the image tower learns to see how many there are.
COUNT_CAPTION_TEMPLATES = (
    "{n} {c} {ss}",
    "a photo of {n} {c} {ss}.",
    "there are {n} {c} {ss} in the picture",
    "{n} small {c} {ss} on a plain background",
    "a drawing of {n} {ss}, all {c}",
)
MULTI_SHAPE_FRACTION = 0.25
DESCRIBE_PROMPTS = (
    "Describe the image.",
    "What do you see?",
    "Write a short caption for this picture.",
    "What is shown here?",
    "Give a brief description of the image.",
)
QUESTIONS = {
    "color": ("What color is the shape?", "Which colour is the shape in the picture?",
              "What is the color of the shape?", "Tell me the shape's color."),
    "shape": ("What shape is this?", "Which shape is drawn in the image?", "What kind of shape do you see?",
              "Name the shape in the picture."),
    "position": ("Where is the shape?", "In which corner is the shape?", "Where in the image is the shape located?",
                 "Which part of the picture holds the shape?"),
    "count": ("How many shapes are there?", "How many shapes do you see?", "Count the shapes in the image.",
              "What is the number of shapes in the picture?"),
}
COMPARE_QUESTIONS = ("Which image shows the {c} {s}, the first or the second?",
                     "Is the {c} {s} in the first image or the second image?",
                     "Which picture contains the {c} {s}: first or second?")
# train-only two-image questions that name the colour alone (words the tokenizer already knows)
COLOR_ONLY_QUESTIONS = tuple(question.replace("{c} {s}", "{c} shape") for question in COMPARE_QUESTIONS)
QUESTION_TYPES = ("color", "shape", "position", "count", "compare")
GENERATOR_VERSION = 7  # bump when what a split holds changes (drawing, record fields), so caches are regenerated


@dataclass(frozen=True)
class ShapeSpec:
    color: str
    shape: str
    position: str  # quadrant of the shape's centre
    count: int = 1

    @property
    def label(self) -> int:
        return CLASSNAMES.index(f"{self.color} {self.shape}")


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    # a plus sign whose arms are 0.4 r thick: its concave corners set it apart from every other shape
    t = 0.4 * r
    return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def render(spec: ShapeSpec, rng: random.Random, size: int) -> Image.Image:
    """Draw `spec.count` shapes of one colour and kind: one in quadrant `spec.position`, or one per random quadrant."""
    gray = rng.randint(20, 235)
    image = Image.new("RGB", (size, size), _jitter((gray, gray, gray), rng, 18))
    draw = ImageDraw.Draw(image)
    fill = _jitter(COLORS[spec.color], rng, 15)
    if spec.count == 1:
        radius = rng.uniform(0.17, 0.24) * size
        col, row = POSITIONS.index(spec.position) % 2, POSITIONS.index(spec.position) // 2
        lo, hi = radius + 1, size / 2 - 2  # the centre stays inside its quadrant, the shape inside the image
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        centres = [(size - x if col else x, size - y if row else y)]
    else:
        # one shape per quadrant, never overlapping, each big enough (>= 3 patches across) to recognise
        radius = rng.uniform(0.12, 0.16) * size
        cells = rng.sample(range(4), spec.count)
        cell, slack = size / 2, size / 4 - radius - 1
        centres = [((c % 2 + 0.5) * cell + rng.uniform(-slack, slack),
                    (c // 2 + 0.5) * cell + rng.uniform(-slack, slack)) for c in cells]
    for cx, cy in centres:
        if spec.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            draw.polygon(_shape_points(spec.shape, cx, cy, radius), fill=fill)
    return image


def random_spec(rng: random.Random, count: int = 1) -> ShapeSpec:
    return ShapeSpec(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(POSITIONS), count)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def caption(spec: ShapeSpec, rng: random.Random) -> str:
    if spec.count > 1:
        return rng.choice(COUNT_CAPTION_TEMPLATES).format(n=COUNT_WORDS[spec.count], c=spec.color,
                                                          ss=plural(spec.shape))
    return rng.choice(CAPTION_TEMPLATES).format(c=spec.color, s=spec.shape, p=spec.position)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def caption_samples(num: int, seed: int, image_size: int) -> Iterator[dict]:
    """Phase 1 and `align` samples: {"__key__", "png", "txt", "cls"}; the class is the colour and shape."""
    rng = random.Random(seed)
    for index in range(num):
        spec = random_spec(rng, count=rng.choice((2, 3)) if rng.random() < MULTI_SHAPE_FRACTION else 1)
        image = render(spec, rng, image_size)
        yield {"__key__": f"{index:08d}", "png": _png(image), "txt": caption(spec, rng), "cls": str(spec.label)}


def _answer(kind: str, spec: ShapeSpec) -> str:
    return {"color": spec.color, "shape": spec.shape, "position": spec.position,
            "count": COUNT_WORDS[spec.count]}[kind]


def question_rotation(mix: dict[str, int] | None = None) -> list[str]:
    """The order in which samples take their question types: each type `mix[type]` times per cycle (every type once
    when `mix` is None), interleaved so that a type's samples are spread through the cycle."""
    weights = mix or dict.fromkeys(QUESTION_TYPES, 1)
    if set(weights) != set(QUESTION_TYPES) or min(weights.values()) < 0 or not any(weights.values()):
        raise ConfigError(f"data.synthetic.question_mix={weights} needs a count >= 0 for each of "
                          f"{list(QUESTION_TYPES)}, and at least one above 0")
    return [kind for round_ in range(max(weights.values())) for kind in QUESTION_TYPES if weights[kind] > round_]


def conversation_samples(num: int, seed: int, image_size: int, mix: dict[str, int] | None = None,
                         same_shape_pairs: float = 0.0, color_only_pairs: float = 0.0) -> Iterator[dict]:
    """`sft` samples in the LLaVA form: {"__key__", "json": {"conversations", "type", "pictures"}, "0.png"[, "1.png"]};
    each assistant turn also carries the type of the question it answers, so held-out answers are scored per type, and
    `pictures` holds what each image shows (colour, shape, position, count).

    Types rotate (see `question_rotation`) so every split holds each one. A third of the single-image samples ask a
    second question about the same image in a second turn, and half of the two-image samples ask about either image
    again in a second turn. A `same_shape_pairs` share of the two-image samples show one shape in two colours, so
    only the colour tells the pictures apart; the others draw both pictures at random (about 1 in 4 share the shape).
    A `color_only_pairs` share of them ask by colour alone ("the pink shape"), about pictures of two colours.
    """
    rng = random.Random(seed)
    rotation = question_rotation(mix)
    for index in range(num):
        kind = rotation[index % len(rotation)]
        images: list[Image.Image] = []
        if kind == "compare":
            first, second = random_spec(rng), random_spec(rng)
            # these two draw from the rng only when set, so a split without them stays as it was
            if same_shape_pairs and rng.random() < same_shape_pairs:
                other_colors = [color for color in COLORS if color != first.color]
                second = dataclasses.replace(second, shape=first.shape, color=rng.choice(other_colors))
            while (second.color, second.shape) == (first.color, first.shape):
                second = random_spec(rng)
            by_color = bool(color_only_pairs) and rng.random() < color_only_pairs
            while by_color and second.color == first.color:  # asked by colour alone: the colours must differ
                second = random_spec(rng)
            templates = COLOR_ONLY_QUESTIONS if by_color else COMPARE_QUESTIONS
            target = rng.choice(("first", "second"))
            asked = first if target == "first" else second
            specs = [first, second]
            images = [render(first, rng, image_size), render(second, rng, image_size)]
            question = rng.choice(templates).format(c=asked.color, s=asked.shape)
            turns = [("<image>\n<image>\n" + question, target, kind)]
            if rng.random() < 0.5:  # a follow-up about either picture: twice the two-image signal per sample
                # drawn afresh, not "the other one": that answer follows from the first one's text, without looking
                follow_target = rng.choice(("first", "second"))
                asked = first if follow_target == "first" else second
                question = rng.choice(templates).format(c=asked.color, s=asked.shape)
                turns.append((question, follow_target, kind))
        else:
            spec = random_spec(rng, count=rng.randint(1, 3) if kind == "count" else 1)
            specs = [spec]
            images = [render(spec, rng, image_size)]
            turns = [("<image>\n" + rng.choice(QUESTIONS[kind]), _answer(kind, spec), kind)]
            if kind != "count" and rng.random() < 1 / 3:
                follow = rng.choice([k for k in ("color", "shape", "position") if k != kind])
                turns.append((rng.choice(QUESTIONS[follow]), _answer(follow, spec), follow))
        conversations = []
        for question, answer, asked in turns:  # each answer carries its own question type, for per-type scoring
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer, "type": asked}]
        record = {"conversations": conversations, "type": kind,
                  "pictures": [dataclasses.asdict(spec) for spec in specs]}  # the truth, for reading errors
        sample = {"__key__": f"{index:08d}", "json": json.dumps(record)}
        for i, image in enumerate(images):
            sample[f"{i}.png"] = _png(image)
        yield sample


def corpus(seed: int = 0, num: int = 4000) -> Iterator[str]:
    """Every word the synthetic data can say, for training a small local tokenizer."""
    rng = random.Random(seed)
    for _ in range(num):
        spec = random_spec(rng, count=rng.randint(1, 3))
        yield caption(spec, rng)
    for kind in QUESTIONS:
        yield from QUESTIONS[kind]
    yield from DESCRIBE_PROMPTS
    for template in COMPARE_QUESTIONS:
        yield template.format(c=" ".join(COLORS), s=" ".join(SHAPES))
    # Answer words are learned after a space only, so at the start of a reply "second" is "s" "e" "co" "nd". Making
    # each one token there kept two-image answers at chance on seeds 1 and 3 (see README); the pieces stay.
    yield " ".join(POSITIONS) + " " + " ".join(COUNT_WORDS.values()) + " first second"
    yield from ["system\n", "user\n", "assistant\n"] * 50  # chat-template role words become single tokens


KINDS = ("captions", "conversations")  # captions: contrastive and align; conversations: sft


def train_choices(settings: SyntheticConfig, kind: str, split: str) -> dict[str, Any]:
    """What a train split of conversations may favour: hard question types (`mix`), and two-image questions about one
    shape in two colours or asked by colour alone. The held-out split asks every type equally, draws its pictures at
    random and names colour and shape, so scores compare across settings."""
    if kind != "conversations" or split != "train":
        return {}
    return {"mix": dataclasses.asdict(settings.question_mix), "same_shape_pairs": settings.same_shape_pairs,
            "color_only_pairs": settings.color_only_pairs}


def write_split(kind: str, directory: Path, num: int, seed: int, image_size: int, samples_per_shard: int,
                **choices: Any) -> str:
    """Write one split as shards, conversations drawn with `choices` (`train_choices`, passed to
    `conversation_samples`); returns the brace pattern that reads it back."""
    from tqdm import tqdm

    from vlm.data.shard_writer import ShardSplitWriter

    with ShardSplitWriter(directory, samples_per_shard) as sink:
        samples = (conversation_samples(num, seed, image_size, **choices) if kind == "conversations"
                   else caption_samples(num, seed, image_size))
        for sample in tqdm(samples, total=num, desc=f"synthetic {kind} -> {directory.name}",
                           unit="img", leave=False, disable=None):  # None: no bar when stderr is a log file
            sink.write(sample)
    return sink.pattern()


def split_seed(seed: int, kind: str, split: str) -> int:
    """Each (kind, split) draws from its own stream, so held-out samples never repeat training ones."""
    return seed * 1000 + (1 if split == "train" else 2) + (10 if kind == "conversations" else 0)


def ensure_split(kind: str, split: str, settings: SyntheticConfig) -> str:
    """Return the shard pattern of a synthetic split ("train" or "val"), generating it into the cache on first use."""
    num = settings.num_train if split == "train" else settings.num_val
    seed, image_size, samples_per_shard = settings.seed, settings.image_size, settings.samples_per_shard
    choices = train_choices(settings, kind, split)
    question_rotation(choices.get("mix"))  # a bad mix fails here, before anything is written
    recipe = [GENERATOR_VERSION, kind, num, seed, image_size, samples_per_shard, CLASSNAMES, CAPTION_TEMPLATES,
              COUNT_CAPTION_TEMPLATES, MULTI_SHAPE_FRACTION, QUESTIONS] + ([choices] if choices else [])
    fingerprint = hashlib.sha1(json.dumps(recipe).encode()).hexdigest()[:10]
    directory = Path(settings.cache_dir).expanduser() / f"{kind}-{split}-{fingerprint}"
    done = directory / "DONE"
    if done.exists():
        return done.read_text().strip()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks started together (srun, torchrun): one generates, the rest wait
        if done.exists():
            return done.read_text().strip()
        if directory.exists():  # an interrupted earlier generation: start that split over
            for stale in directory.iterdir():
                stale.unlink()
        pattern = write_split(kind, directory, num, split_seed(seed, kind, split), image_size, samples_per_shard,
                              **choices)
        (directory / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
        done.write_text(pattern + "\n")
    return pattern


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A natural-looking RGB picture of any size, fast, for trying the tiler on large photos (tests, benchmarks):
    smooth gradients and shapes drawn at 1/8 size, upscaled, plus mild noise."""
    rng = np.random.default_rng(seed)
    sw, sh = max(8, width // 8), max(8, height // 8)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / sw * 3.1 + 0.5) * np.cos(y / sh * 2.3),
            128 + 90 * np.cos(x / sw * 1.7 - y / sh * 2.9),
            128 + 80 * np.sin((x + y) / (sw + sh) * 5.0 + 1.0),
        ],
        axis=-1,
    )
    small = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(small)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, sw)), int(rng.integers(0, sh))
        x1, y1 = x0 + int(rng.integers(4, sw // 4 + 5)), y0 + int(rng.integers(4, sh // 4 + 5))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    small = small.filter(ImageFilter.GaussianBlur(1))
    big = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC))
    noise = rng.integers(-6, 7, size=(min(height, 1024), min(width, 1024), 3), dtype=np.int16)
    reps = (-(-height // noise.shape[0]), -(-width // noise.shape[1]), 1)
    noisy = big.astype(np.int16) + np.tile(noise, reps)[:height, :width]
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


MAX_PICTURE_SIDE = 4096  # pictures to ask about: the tiler would scale anything larger down anyway


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm.data.synthetic",
                                     description="Draw synthetic shape pictures to ask a trained model about; prints "
                                                 "what each one shows.")
    parser.add_argument("paths", nargs="+", type=Path, help="image files to write (.png, .jpg or .webp)")
    parser.add_argument("--seed", type=int, default=2, help="the same seed draws the same pictures")
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels (the training data's: 64)")
    args = parser.parse_args(argv)
    if bad := [str(p) for p in args.paths if p.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp")]:
        parser.error(f"{bad[0]}: give a file name ending in .png, .jpg or .webp")
    if not 8 <= args.size <= MAX_PICTURE_SIDE:
        parser.error(f"--size {args.size}: give 8 to {MAX_PICTURE_SIDE} pixels")
    if missing := [path for path in args.paths if not path.parent.is_dir()]:  # before any picture is written
        parser.error(f"cannot write {str(missing[0])!r}: there is no folder {str(missing[0].parent)!r}")
    rng = random.Random(args.seed)
    for path in args.paths:
        spec = random_spec(rng)
        try:
            render(spec, rng, args.size).save(path)
        except OSError as err:
            parser.exit(2, f"error: cannot write {str(path)!r} ({err.strerror or err})\n")
        article = "an" if spec.color[0] in "aeiou" else "a"
        print(f"{path}: {article} {spec.color} {spec.shape}, {spec.position}")


if __name__ == "__main__":
    main()
