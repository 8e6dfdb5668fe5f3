"""How models are scored: zero-shot classification and image<->text retrieval for contrastive models, exact-match
answer accuracy for chat models."""

from __future__ import annotations

import torch

from vlm.models.clip import CLIPModel


@torch.no_grad()
def class_embeddings(model: CLIPModel, tokenizer, classnames: list[str], templates: list[str],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """One unit-norm embedding per class: the mean over the prompt templates, as CLIP does. -> (C, E)"""
    texts = [template.format(name) for name in classnames for template in templates]
    ids = tokenizer(texts).to(device)  # (C * T, L)
    embeddings = model.encode_text(ids).reshape(len(classnames), len(templates), -1).mean(dim=1)  # (C, E)
    return torch.nn.functional.normalize(embeddings, dim=-1)


def contrastive_metrics(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                        classes: torch.Tensor | None) -> dict[str, float]:
    """image (N, E), text (N, E), labels (N,), classes (C, E) or None -> top-1 / R@1 figures."""
    similarity = image @ text.T  # (N, N)
    target = torch.arange(len(image))
    metrics = {"i2t_r1": (similarity.argmax(dim=1) == target).float().mean().item(),
               "t2i_r1": (similarity.argmax(dim=0) == target).float().mean().item()}
    if classes is not None:
        predicted = (image @ classes.T).argmax(dim=1)  # (N,)
        metrics["zero_shot_top1"] = (predicted == labels).float().mean().item()
    return metrics


def normalize_answer(text: str) -> str:
    """Exact match ignores case, surrounding space and a final full stop."""
    return text.strip().lower().rstrip(".").strip()


def exact_match_metrics(answers: dict[str, list[bool]]) -> dict[str, float]:
    """{type: [correct?]} -> overall and per-type exact match."""
    every = [hit for hits in answers.values() for hit in hits]
    metrics = {"exact_match": sum(every) / len(every)}
    metrics.update({f"exact_match/{kind}": sum(hits) / len(hits) for kind, hits in sorted(answers.items())})
    return metrics
