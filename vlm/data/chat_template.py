"""The chat template of a tokenizer, as training and chat read it: a conversation rendered to text, where each
assistant reply lies in that text (its labels), and which tokens start or end a turn (text may not spell them)."""

from __future__ import annotations

import re

import jinja2
from transformers import PreTrainedTokenizerBase

from vlm.data.shards import SkipSample
from vlm.data.tokenizer import IMAGE_TOKEN


class SampleError(SkipSample):
    """A conversation that cannot be encoded; the message names the sample."""


class ChatTemplate:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        # the template's control tokens (role markers, end of turn, padding): text that spelled one would start or
        # end a turn, so a message could forge another role's turn
        controls = [t.content for t in tokenizer.added_tokens_decoder.values()
                    if t.special and t.content != IMAGE_TOKEN]
        self.control_token = re.compile("|".join(map(re.escape, controls))) if controls else None
        self.markers = re.compile("|".join(map(re.escape, [IMAGE_TOKEN, *controls])))  # what as_plain_text breaks

    def control_problem(self, text: str, where: str) -> str | None:
        """Why `text` (named by `where`) cannot be a message: the first control token it spells; None when it spells
        none."""
        if found := self.control_token.search(text) if self.control_token else None:
            return (f"{where} holds {found.group()!r}, a control token of the chat template; text may not spell one, "
                    f"since it would start or end a turn")
        return None

    def markup_problem(self, text: str, where: str) -> str | None:
        """Why `text` (named by `where`) cannot be training text: the first `<image>` or control token it spells, which
        training would read as an image or a turn's start or end; None when it spells neither."""
        if IMAGE_TOKEN in text:
            return f"{where} spells {IMAGE_TOKEN}, which training reads as an image"
        return self.control_problem(text, where)

    def as_plain_text(self, text: str) -> str:
        """`text` with every `<image>` and control token broken by a zero-width space after its first character, so
        the tokenizer reads it as the plain characters it was, not as a marker: text from a client or from the model
        itself (an answer about SVG or ChatML) then never places an image nor opens or ends a turn."""
        return self.markers.sub(lambda found: found.group()[0] + "\u200b" + found.group()[1:], text)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False, name: str = "sample") -> str:
        """The conversation as the chat template writes it; a conversation the template refuses (a system turn where
        it has none, roles that do not alternate) is a SampleError naming `name` with the template's reason."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as err:
            raise SampleError(f"{name}: the model's chat template refuses this conversation: {err}") from None

    def assistant_spans(self, messages: list[dict[str, str]], text: str, name: str = "sample") -> list[tuple[int, int]]:
        """Character spans of each assistant reply (with its end-of-turn marker) in `text`, the conversation as
        `render` writes it; a template that refuses a prefix is named in a SampleError for `name`.

        Rendering the prefix before a reply with a generation prompt, and the prefix including it, brackets the reply
        for templates that render a prefix as the start of the whole and the reply right after the generation prompt
        (ChatML, Llama 3, SmolLM, ...). Templates that render a conversation's last turn otherwise (Qwen3 puts an
        empty think block before it; Mistral moves the system prompt into the last user turn) fail that check, and
        their replies are found by their text instead, so a reply's labels are the same in any conversation.
        """
        spans = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                before = self.render(messages[:i], add_generation_prompt=True, name=name)
                through = self.render(messages[: i + 1], name=name)
                reply_follows = text[len(before):len(through)].lstrip(" ").startswith(message["content"].strip())
                if not (text.startswith(before) and text.startswith(through) and reply_follows):
                    return self.spans_by_text(messages, text, name)
                spans.append((len(before), len(through)))
        return spans

    def spans_by_text(self, messages: list[dict[str, str]], text: str, name: str) -> list[tuple[int, int]]:
        """Each reply's span found in order in `text`: its content (as templates trim it) where a control token (or
        the text's end) follows it, that token, and the newline after it. Walking the user and assistant turns in
        order keeps a reply from being found in the question before it, and the control token after it from being
        found in the template's markup ("a" in "<|im_start|>assistant"); system turns may move (Mistral's) and are
        not looked for."""
        spans, cursor = [], 0
        ends_turn = f"(?={self.control_token.pattern}|$)" if self.control_token else ""
        for i, message in enumerate(messages):
            content = message["content"].strip()
            if message["role"] == "system" or not content:
                continue
            # a reply keeps the whitespace the template leaves after it (Qwen3 does not trim replies)
            pattern = re.escape(content) + (r"\s*" + ends_turn if message["role"] == "assistant" else "")
            if not (found := re.compile(pattern).search(text, cursor)):
                raise SampleError(f"{name}: the chat template does not render message {i} ({message['role']}) as "
                                  f"written, so its reply cannot be told apart for the labels")
            start, end = found.span()
            if message["role"] == "assistant":
                start = cursor + len(text[cursor:start].rstrip(" "))  # a space before the reply is its first token's
                if ending := self.control_token.match(text, end) if self.control_token else None:
                    end = ending.end() + text.startswith("\n", ending.end())
                spans.append((start, end))
            cursor = end
        return spans
