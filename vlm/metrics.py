"""How models are scored: zero-shot classification and image<->text retrieval for contrastive models, exact-match
answer accuracy for chat models."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from vlm.models.clip import CLIPModel

CLASSES_PER_FORWARD = 10  # prompts of this many classes per text-tower pass: 1,000 classes x 80 templates never at once


def class_embeddings(model: CLIPModel, tokenizer: Callable[[list[str]], torch.Tensor], classnames: list[str],
                     templates: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """One unit-norm embedding per class: the mean of its unit-norm prompt embeddings over the templates, as CLIP
    does (open_clip's zero-shot classifier, a few classes per pass). -> (C, E)"""
    return build_zero_shot_classifier(model, tokenizer, classnames, templates, CLASSES_PER_FORWARD, device).T


SIMILARITY_BLOCK = 1 << 24  # similarities held at once (64 MiB): 50,000 held-out samples are never scored N x N


@dataclass
class Retrieval:
    """Image<->text retrieval over N held-out pairs (image i's caption is text i), from unit-norm features. A match is
    any held-out pair: an image's other captions, or a caption's other images (the same words for another picture),
    count as its own."""

    image_to_text: torch.Tensor  # (N,) bool: whether a caption of the image is among those it scores highest
    text_to_image: torch.Tensor  # (N,) bool: whether an image of the caption is among those it scores highest
    caption_ranks: torch.Tensor  # (N,) captions not the image's own scored above its caption i (0: none)


def retrieve(image: torch.Tensor, text: torch.Tensor, image_groups: list[int] | None = None,
             text_groups: list[int] | None = None) -> Retrieval:
    """image (N, E), text (N, E), and which samples share an image (`image_groups`, an id per sample) or a caption's
    words (`text_groups`), by default none -> `Retrieval`, scored a block of rows at a time: never N x N similarities
    at once. A tie between a match and another candidate counts for the match."""
    count = len(image)
    image_groups = list(range(count)) if image_groups is None else image_groups
    text_groups = list(range(count)) if text_groups is None else text_groups
    captions_of_images = _Matches(image_groups, text_groups)
    images_of_captions = _Matches(text_groups, image_groups)
    rows = max(1, SIMILARITY_BLOCK // max(count, 1))
    image_to_text, text_to_image, caption_ranks = [], [], []
    for start in range(0, count, rows):
        block = range(start, min(start + rows, count))
        similarity = image[start:block.stop] @ text.T  # (R, N)
        own = similarity.diagonal(offset=start)  # (R,) each image with its own caption
        best, matches_above = captions_of_images.best(similarity, block, own)
        image_to_text.append(best >= similarity.amax(dim=1))
        caption_ranks.append((similarity > own.unsqueeze(1)).sum(dim=1) - matches_above)
        similarity = text[start:block.stop] @ image.T  # (R, N)
        best, _ = images_of_captions.best(similarity, block, similarity.diagonal(offset=start))
        text_to_image.append(best >= similarity.amax(dim=1))
    return Retrieval(torch.cat(image_to_text), torch.cat(text_to_image), torch.cat(caption_ranks))


class _Matches:
    """Which columns match each row: sample j's column group (its caption, or its image) paired in the held-out data
    with sample i's row group (its image, or its caption)."""

    def __init__(self, row_groups: list[int], column_groups: list[int]):
        self.row_groups = row_groups
        self.partners: dict[int, set[int]] = defaultdict(set)  # row group -> the column groups paired with it
        self.holders: dict[int, list[int]] = defaultdict(list)  # column group -> the samples in it
        for row_group, column_group in zip(row_groups, column_groups, strict=True):
            self.partners[row_group].add(column_group)
        for j, column_group in enumerate(column_groups):
            self.holders[column_group].append(j)

    def best(self, similarity: torch.Tensor, block: range, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the rows `block` of the similarities (R, N): each row's best score among its matches, and how many of
        its matches score above `own` (R,)."""
        rows: list[int] = []
        columns: list[int] = []
        for local, i in enumerate(block):
            for column_group in self.partners[self.row_groups[i]]:
                rows.extend([local] * len(self.holders[column_group]))
                columns.extend(self.holders[column_group])
        local_rows, columns_read = torch.tensor(rows, dtype=torch.long), torch.tensor(columns, dtype=torch.long)
        scores = similarity[local_rows, columns_read]  # read from the block, so ties compare exactly
        best = torch.full_like(own, -torch.inf).scatter_reduce(0, local_rows, scores, "amax")
        above = torch.zeros(len(own), dtype=torch.long).scatter_add(0, local_rows, (scores > own[local_rows]).long())
        return best, above


def groups_of(values: Iterable[Hashable]) -> list[int]:
    """An id per value, equal for equal values: which samples share an image (by its fingerprint) or a caption."""
    first_seen: dict[Hashable, int] = {}
    return [first_seen.setdefault(value, len(first_seen)) for value in values]


def contrastive_metrics(retrieved: Retrieval, labels: torch.Tensor,
                        class_scores: torch.Tensor | None) -> dict[str, float]:
    """Retrieval over N pairs, labels (N,), class_scores (N, C) image x class or None -> top-1 / R@1."""
    metrics = {"i2t_r1": retrieved.image_to_text.float().mean().item(),
               "t2i_r1": retrieved.text_to_image.float().mean().item()}
    labelled = labels >= 0  # (N,) samples without a class label ("cls") are left out of the zero-shot score
    if class_scores is not None and bool(labelled.any()):
        predicted = class_scores.argmax(dim=1)  # (N,)
        metrics["zero_shot_top1"] = (predicted[labelled] == labels[labelled]).float().mean().item()
    return metrics


def contrastive_predictions(retrieved: Retrieval, labels: torch.Tensor, class_scores: torch.Tensor | None,
                            classnames: list[str] | None, keys: list[str], captions: list[str],
                            top: int = 5) -> list[dict]:
    """One row per sample: its caption's rank for its image among the captions not the image's own (0 is retrieved
    first), and with class scores its label, the predicted class, the `top` best classes and whether the prediction
    is right. `retrieved` and class_scores (N, C) are those `contrastive_metrics` reads."""
    rows = [{"key": key, "caption": caption, "caption_rank": rank}
            for key, caption, rank in zip(keys, captions, retrieved.caption_ranks.tolist(), strict=True)]
    if class_scores is not None and classnames:
        best = class_scores.topk(min(top, len(classnames)), dim=1).indices.tolist()  # (N, top)
        for row, label, ranked in zip(rows, labels.tolist(), best, strict=True):
            row.update(prediction=classnames[ranked[0]], top=[classnames[i] for i in ranked])
            if label >= 0:
                row.update(label=classnames[label], correct=ranked[0] == label)
    return rows


# The VQA evaluation's normalisation (Antol et al. 2015): number words as digits, articles dropped, punctuation out
# except decimal points. Apostrophes are dropped too, so "don't" and "dont" agree.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"""[;/\\\[\]"{}()=+_\-><@`?!*#%^&$~|:,]""")
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")
_PERIOD_OUTSIDE_NUMBER = re.compile(r"(?<!\d)\.|\.(?!\d)")
SCORES = ("exact_match", "normalized_match", "contains")


def normalize_exact(text: str) -> str:
    """Exact match ignores case, runs of whitespace and trailing punctuation ("Red." == "red")."""
    return " ".join(text.lower().split()).rstrip(".!?,;: ")


def normalize_vqa(text: str) -> str:
    """The VQA normalisation: "Two red circles." -> "2 red circles", "1,000.5" -> "1000.5", "The cat's" -> "cats"."""
    text = _COMMA_IN_NUMBER.sub("", text.lower())
    text = _PERIOD_OUTSIDE_NUMBER.sub(" ", text).replace("'", "")
    words = [_NUMBER_WORDS.get(word, word) for word in _PUNCTUATION.sub(" ", text).split() if word not in _ARTICLES]
    return " ".join(words)


def score_answer(prediction: str, reference: str) -> dict[str, float]:
    """One answer's scores: exact match, VQA-normalised match, and whether the reference appears in the answer."""
    exact = normalize_exact(prediction) == normalize_exact(reference)
    predicted, wanted = normalize_vqa(prediction), normalize_vqa(reference)
    if not wanted:  # a reference of articles or punctuation alone (choice "A"): the VQA normalisation erases it
        predicted, wanted = normalize_exact(prediction), normalize_exact(reference)
    contains = bool(wanted) and re.search(rf"(?:^| ){re.escape(wanted)}(?: |$)", predicted) is not None
    return {"exact_match": float(exact), "normalized_match": float(predicted == wanted), "contains": float(contains)}


def answer_metrics(scored: list[tuple[str | None, dict[str, float]]]) -> dict[str, float]:
    """[(group or None, scores)] -> each score's mean overall ("exact_match") and per group ("exact_match/color")."""
    metrics: dict[str, float] = {}
    groups = sorted({group for group, _ in scored if group is not None})
    for name in SCORES:
        metrics[name] = sum(s[name] for _, s in scored) / len(scored)
        for group in groups:
            values = [s[name] for g, s in scored if g == group]
            metrics[f"{name}/{group}"] = sum(values) / len(values)
    return metrics
