"""What one answer is: the encoded prompt that asked it, and the Completion that came back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm.data.processor import Encoded
from vlm.errors import UserError

Message = dict[str, str]


class PromptError(UserError, ValueError):
    """A conversation the model cannot answer as given (placeholders and images disagree, bad roles, ...)."""


class ContextOverflow(PromptError):
    """A conversation longer than the model's context; a chat session answers it by forgetting old turns."""


@dataclass
class Prompt:
    """A conversation encoded by the processor, ready for `ChatModel.generate` / `stream`."""

    messages: list[Message]
    encoded: Encoded

    @property
    def input_tokens(self) -> int:
        return len(self.encoded.input_ids)


@dataclass
class Completion:
    """One answer. `output_tokens` counts every generated token, including the end-of-turn token."""

    text: str
    stop_reason: str  # one of vlm.generation.stopping.STOP_REASONS
    input_tokens: int  # prompt tokens, image tokens included
    output_tokens: int
    stop_sequence: str | None = None  # which stop sequence ended it
    token_ids: list[int] = field(default_factory=list)  # the generated ids (what output_tokens counts)
    temperature: float | None = None  # the temperature used; None for greedy or beam search
