"""What one answer is: the encoded prompt that asked it, and the Completion that came back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm.data.processor import Encoded
from vlm.data.tokenizer import IMAGE_TOKEN
from vlm.errors import UserError, is_text

Message = dict[str, str]


class PromptError(UserError, ValueError):
    """A conversation the model cannot answer as given (placeholders and images disagree, bad roles, ...)."""


class ContextOverflow(PromptError):
    """A conversation longer than the model's context; a chat session answers it by forgetting old turns. `tokens`:
    its length, images included, when it was encoded (None when its text alone was too long to encode)."""

    def __init__(self, message: str, tokens: int | None = None):
        super().__init__(message)
        self.tokens = tokens


def check_conversation(messages: list[Message]) -> None:
    """A conversation a chat model can answer: messages {'role': 'system'|'user'|'assistant', 'content': str}, no
    empty user message, a user turn last. An assistant turn may come first (a chat that opened with a greeting); a
    chat template that needs the user first refuses it with its own reason. Raises PromptError naming the message."""
    if not messages:
        raise PromptError("the conversation is empty; send at least one user message")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise PromptError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, "
                              f"got {m!r:.120}")
        if m["role"] == "user" and not m["content"].strip():
            raise PromptError(f"message {i} (user) is empty; ask something, or attach an image")
        check_text(m["content"], f"message {i} ({m['role']})")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or turns[-1] != "user":
        raise PromptError(f"the conversation must end with a user message, got {turns or 'system messages only'}; "
                          f"the answer is the next assistant message")


def check_text(text: str, where: str) -> None:
    """Raise PromptError naming `where` for text no tokenizer can encode."""
    if not is_text(text):
        raise PromptError(f"{where} is not valid text: it holds an unpaired surrogate, as Python reads bytes that "
                          f"are not UTF-8 (a terminal or file in another encoding)")


def check_system_prompt(system: str | None) -> None:
    """A system prompt a chat can open with: text, and no `<image>` (images go in user messages)."""
    if system is None:
        return
    check_text(system, "the system prompt")
    if IMAGE_TOKEN in system:
        raise PromptError(f"the system prompt has an {IMAGE_TOKEN} placeholder; images go in user messages")


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
