"""Small preference shards for tests: synthetic shape images with a question, a right and a wrong answer."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import webdataset as wds

from vlm.data.synthetic import random_spec, render


def png(seed: int, size: int = 64) -> bytes:
    rng = random.Random(seed)
    buffer = io.BytesIO()
    render(random_spec(rng), rng, size).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pairs(path: Path, count: int, answer_words: int = 1, chosen: bool = True, history: bool = False,
                anchors: int = 0, images: bool = True, first_image: int = 0) -> str:
    """A shard of `count` colour questions, each with a chosen and a rejected answer; `history` puts an earlier
    question and answer before the asked one; `anchors` conversation samples (a shape question and its answer)
    come before the pairs; `images=False` asks about a tomato instead, with no image. Pair i shows the image drawn
    from seed `first_image + i` (its key is i whatever `first_image`). Returns the shard path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for i in range(count, count + anchors):
            turns = [{"role": "user", "content": "<image>\nWhat shape is this?"},
                     {"role": "assistant", "content": "a circle"}]
            sink.write({"__key__": f"{i:06d}", "json": json.dumps({"conversations": turns, "type": "shape"}),
                        "0.png": png(i)})
        for i in range(count):
            question = "<image>\nWhat color is the shape?" if images else "What color is a ripe tomato?"
            prompt = [{"role": "user", "content": question}]
            if history:
                prompt = [*prompt, {"role": "assistant", "content": "blue"},
                          {"role": "user", "content": "What shape is this?"}]
            record = {"prompt": prompt, "rejected": " ".join(["blue"] * answer_words), "type": "color"}
            if chosen:
                record["chosen"] = " ".join(["red"] * answer_words)
            image = {"0.png": png(first_image + i)} if images else {}
            sink.write({"__key__": f"{i:06d}", "json": json.dumps(record)} | image)
    return str(path)


def finished_pairs(folder: Path, train: str, made_by: Path | str, val: str | None = None) -> Path:
    """A finished `vlm.constitution` output folder whose record names the `train` (and `val`) pair shards and the
    export `made_by` whose answers they are, as `stage=dpo` finds the newest pairs without data.train."""
    from vlm.data.preferences import PAIRS_DONE

    folder.mkdir(parents=True, exist_ok=True)
    (folder / PAIRS_DONE).write_text(json.dumps({"train": train, "val": val, "qa_val": None, "train_pairs": 1,
                                                 "checkpoint": str(made_by)}))
    return folder
