"""Critics for `vlm.constitution`: who critiques an answer under a principle and writes its revision, or scores it.

- `ChatCritic` asks a chat model, as in Constitutional AI: the few-shot examples, then the prompt and the answer,
  then the principle's critique request, then its revision request. The model is the policy itself (`self`, through
  `vlm.chat`) or any OpenAI-compatible or Anthropic Messages endpoint (`http`, with timeouts, retries with backoff
  and a bounded number of requests in flight).
- `SyntheticCritic` is no language model: for the built-in synthetic data it knows each scene's ground truth (the
  recorded answer of the synthetic sample), names the wrong claim and writes the correct answer as the revision.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlm.data.tiler import sniff_media_type
from vlm.data.tokenizer import IMAGE_TOKEN
from vlm.errors import UserError
from vlm.metrics import score_answer

if TYPE_CHECKING:  # vlm.chat loads torch and transformers; an HTTP critic needs neither
    from vlm.chat import ChatModel

log = logging.getLogger(__name__)
Message = dict[str, str]
Request = tuple[list[Message], list[bytes]]  # a conversation and its images, in <image> order


class CriticUnreachable(UserError, ConnectionError):
    """Every request of a batch failed: the endpoint is down or wrong."""


class CriticRefused(UserError, ValueError):
    """Every request of a batch was refused (a 4xx) or answered in a form the API does not have: retrying the same
    requests cannot help."""


class MalformedReply(ValueError):
    """A critic's reply that is not an OpenAI chat completion or an Anthropic message with text."""


def reply_text(reply: Any, api: str) -> str:
    """The text of an OpenAI chat completion (`choices[0].message.content`, a string or a list of text parts) or an
    Anthropic message (`content`, a list of blocks); MalformedReply for anything else."""
    where = "choices[0].message.content" if api == "openai" else "content"
    try:
        content = reply["choices"][0]["message"]["content"] if api == "openai" else reply["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedReply(f"the reply has no {where}") from None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
    raise MalformedReply(f"the reply's {where} is {type(content).__name__}, not text")


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # the critique request
    revision: str  # the revision request
    types: tuple[str, ...] = ()  # the question types (a record's "type") it judges; empty: every question

    def judges(self, question_type: str | None) -> bool:
        return not self.types or question_type in self.types


@dataclass(frozen=True)
class Example:
    """A few-shot example: how a critique and a revision look."""

    question: str
    answer: str
    critique: str
    revision: str


@dataclass
class Item:
    """One prompt of the pipeline."""

    key: str
    messages: list[Message]  # the conversation up to and including the last user turn
    images: list[bytes]
    reference: str | None  # the recorded answer (the synthetic critic's ground truth)
    image_names: list[str] = field(default_factory=list)  # the images' shard fields (0.png, 1.jpg, ...)
    group: str | None = None  # the question type (the record's or the last turn's "type"), kept with the pair


@dataclass
class Revision:
    critique: str
    revision: str


class Critic:
    failed = 0  # requests that failed (logged); the run goes on without their pairs

    def revise(self, items: Sequence[Item], answers: Sequence[str],
               principles: Sequence[Principle]) -> list[Revision | None]:
        raise NotImplementedError

    def score(self, items: Sequence[Item], answers: Sequence[str],
              principles: Sequence[Principle]) -> list[float | None]:
        """A score per answer, higher is better; None where the request failed, NaN where the reply held none."""
        raise NotImplementedError


class SyntheticCritic(Critic):
    """A perfect labeler for the synthetic data: it compares the answer with the scene's recorded answer."""

    def revise(self, items: Sequence[Item], answers: Sequence[str],
               principles: Sequence[Principle]) -> list[Revision | None]:
        out: list[Revision | None] = []
        for item, answer in zip(items, answers, strict=True):
            if item.reference is None:
                raise UserError(f"critic=synthetic needs the recorded answer of {item.key}; it judges the built-in "
                                f"synthetic data (or conversation shards whose last turn is the true answer)")
            if self._right(item, answer):
                out.append(Revision("The answer matches the image.", answer))
            else:
                out.append(Revision(f"The answer says {answer!r}, but the image shows {item.reference!r}.",
                                    item.reference))
        return out

    def score(self, items: Sequence[Item], answers: Sequence[str],
              principles: Sequence[Principle]) -> list[float | None]:
        return [float(self._right(item, answer)) for item, answer in zip(items, answers, strict=True)]

    @staticmethod
    def _right(item: Item, answer: str) -> bool:
        return score_answer(answer, item.reference or "")["exact_match"] == 1.0


SCORED = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE)  # "9/10", "2 out of 10"
SCALE = re.compile(r"\b[01]\s*(?:-|–|to)\s*10\b|\bout of 10\b|/\s*10\b", re.IGNORECASE)  # "(1-10)", "out of 10"
LABELLED = re.compile(r"\b(?:score|rating)\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)  # "Score: 8" (then a reason)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def read_score(reply: str) -> float:
    """The 1-10 score in a critic's reply: "8", "Score: 8" (then its reasons), "8/10", "I would rate it 8 out of 10",
    "Score (1-10): 8". NaN when it holds none, several different ones ("9, or maybe 3", "Score: 3 ... a right answer
    would be 9/10"), or one outside 0-10: a guess could pair answers the wrong way."""
    found = {float(n) for n in SCORED.findall(reply)}
    rest = SCALE.sub(" ", SCORED.sub(" ", reply))
    found |= {float(n) for n in LABELLED.findall(rest)}
    if not found:
        found = {float(n) for n in NUMBER.findall(rest)}
    if len(found) != 1:
        return math.nan
    score = found.pop()
    return score if 0 <= score <= 10 else math.nan


class ChatCritic(Critic):
    """Critique and revision requests sent as chat turns to `complete` (a batch of conversations -> replies, None
    for a failed request). With `fits` (does a conversation fit the critic's context?), each request carries as many
    of the few-shot examples as leave room for a `reply_tokens` critique and the revision request after it."""

    def __init__(self, complete: Callable[[list[Request]], list[str | None]], examples: Sequence[Example],
                 fits: Callable[[list[Message], list[bytes]], bool] | None = None, reply_tokens: int = 0):
        self.complete = complete
        self.examples = examples
        self.fits = fits
        self.reply_tokens = reply_tokens
        self.told_fewer_examples = False  # the warning that the context holds fewer few-shot examples, said once

    def _critique_request(self, item: Item, answer: str, principle: Principle) -> list[Message]:
        # the prompt's own system messages open the request, before the examples: chat templates take them first
        opening = next((i for i, m in enumerate(item.messages) if m["role"] != "system"), len(item.messages))
        system = item.messages[:opening]
        asked = [*item.messages[opening:], {"role": "assistant", "content": answer},
                 {"role": "user", "content": principle.critique}]
        count = next((count for count in range(len(self.examples), 0, -1)
                      if self._fits([*system, *self._shots(principle, count), *asked], item, principle)), 0)
        if count < len(self.examples) and not self.told_fewer_examples:
            self.told_fewer_examples = True
            log.warning("the critic's context holds %d of the constitution's %d few-shot examples for %s (and may "
                        "hold fewer for other prompts): without them small critics tend to answer 'Sure, here is a "
                        "revised response'; shorten the examples, or use a critic with a longer context", count,
                        len(self.examples), item.key)
        return [*system, *self._shots(principle, count), *asked]

    def _fits(self, request: list[Message], item: Item, principle: Principle) -> bool:
        """Whether the critic's context holds `request` with room for its critique and the revision request after."""
        room = [*request, {"role": "assistant", "content": "x " * self.reply_tokens},
                {"role": "user", "content": principle.revision}]
        return self.fits is None or self.fits(room, item.images)

    def _shots(self, principle: Principle, count: int) -> list[Message]:
        turns: list[Message] = []
        for e in self.examples[:count]:
            turns += [{"role": "user", "content": e.question}, {"role": "assistant", "content": e.answer},
                      {"role": "user", "content": principle.critique}, {"role": "assistant", "content": e.critique},
                      {"role": "user", "content": principle.revision}, {"role": "assistant", "content": e.revision}]
        return turns

    def revise(self, items: Sequence[Item], answers: Sequence[str],
               principles: Sequence[Principle]) -> list[Revision | None]:
        asked = [self._critique_request(item, answer, p) for item, answer, p in zip(items, answers, principles,
                                                                                      strict=True)]
        critiques = self._complete([(m, item.images) for m, item in zip(asked, items, strict=True)])
        todo = [i for i, c in enumerate(critiques) if c]  # None: the request failed; "": nothing to revise with
        revisions = self._complete([([*asked[i], {"role": "assistant", "content": critiques[i]},
                                      {"role": "user", "content": principles[i].revision}], items[i].images)
                                    for i in todo])
        out: list[Revision | None] = [None if c is None else Revision("", "") for c in critiques]
        for i, revision in zip(todo, revisions, strict=True):
            out[i] = None if revision is None else Revision(critiques[i] or "", revision)
        return out

    def score(self, items: Sequence[Item], answers: Sequence[str],
              principles: Sequence[Principle]) -> list[float | None]:
        asked = [([*item.messages, {"role": "assistant", "content": answer},
                   {"role": "user", "content": f"{p.critique} Rate the answer from 1 (bad) to 10 (good); reply with "
                                               f"the number only."}], item.images)
                 for item, answer, p in zip(items, answers, principles, strict=True)]
        replies = self._complete(asked)
        scores = [None if reply is None else read_score(reply) for reply in replies]
        unscored = [reply for reply, score in zip(replies, scores, strict=True) if score is not None and
                    math.isnan(score)]
        if unscored:
            log.warning("the critic's reply held no score, or several, for %d of %d answers (e.g. %r): they are "
                        "dropped", len(unscored), len(replies), unscored[0][:80])
        return scores

    def _complete(self, requests: list[Request]) -> list[str | None]:
        replies = self.complete(requests) if requests else []
        self.failed += sum(r is None for r in replies)
        return [r.strip() if r else r for r in replies]


def fits_context(chat_model: ChatModel) -> Callable[[list[Message], list[bytes]], bool]:
    """Whether a conversation (and its images) fits the chat model's context, as a prompt."""
    from vlm.generation.completion import PromptError

    def fits(messages: list[Message], images: list[bytes]) -> bool:
        try:
            chat_model.prepare(messages, images)
        except PromptError:
            return False
        return True

    return fits


def self_completion(chat_model: ChatModel, max_new_tokens: int) -> Callable[[list[Request]], list[str | None]]:
    """The policy as its own critic: greedy replies through `ChatModel.generate_batch`; a conversation too long for
    its context is a failed request."""
    from vlm.generation.completion import PromptError

    def complete(requests: list[Request]) -> list[str | None]:
        prompts, index = [], []
        for i, (messages, images) in enumerate(requests):
            try:
                prompts.append(chat_model.prepare(messages, images))
                index.append(i)
            except PromptError as err:
                log.warning("critic=self: request %d cannot be asked: %s", i, err)
        replies: list[str | None] = [None] * len(requests)
        for i, reply in zip(index, chat_model.generate_batch(prompts, temperature=0, max_new_tokens=max_new_tokens),
                            strict=True):
            replies[i] = reply
        return replies

    return complete


def api_key(api_key_env: str | None) -> str:
    """The key in the environment variable `api_key_env` names ("" for none named); a named one that is unset is
    an error, found before any request."""
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    if api_key_env and not key:
        raise UserError(f"critic.api_key_env={api_key_env!r}: that environment variable is not set")
    return key


class HttpCompletion:
    """Requests to an OpenAI-compatible (`/v1/chat/completions`) or Anthropic Messages (`/v1/messages`) endpoint:
    `concurrency` in flight, each with `timeout` seconds and `retries` retries with exponential backoff."""

    def __init__(self, url: str, api: str, model: str | None, api_key_env: str | None, timeout: float, retries: int,
                 concurrency: int, max_new_tokens: int):
        self.url = url.rstrip("/") + ("/v1/chat/completions" if api == "openai" else "/v1/messages")
        self.api, self.model, self.timeout, self.retries = api, model or "default", timeout, retries
        self.concurrency, self.max_new_tokens = concurrency, max_new_tokens
        self.key = api_key(api_key_env)
        self.last_failure = ""  # the reason the latest failed request gave up
        self.last_refused = False  # ... and whether retrying could not have helped
        self.stopping = threading.Event()  # set on Ctrl-C: requests in flight give up instead of retrying

    def __call__(self, requests: list[Request]) -> list[str | None]:
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            replies = list(pool.map(self._ask, requests))
        except BaseException:  # Ctrl-C: drop the queued requests and end the ones in flight at their next retry
            self.stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        if replies and all(r is None for r in replies):
            if self.last_refused:
                raise CriticRefused(f"critic.url {self.url} refused every request of a batch (the last: "
                                    f"{self.last_failure}); check critic.api={self.api!r}, critic.model, the key "
                                    f"in critic.api_key_env, and that the prompts fit the critic's context")
            raise CriticUnreachable(f"every request to critic.url {self.url} failed (the last: {self.last_failure})")
        return replies

    def _failed(self, reason: str, refused: bool) -> None:
        self.last_failure, self.last_refused = reason, refused
        log.warning("critic request to %s failed: %s", self.url, reason)

    def _body(self, messages: list[Message], images: list[bytes]) -> dict:
        """The API's request body: each <image> placeholder becomes an image part, in order."""
        pending = list(images)
        out, system = [], None
        for m in messages:
            if m["role"] == "system":
                system = m["content"]
                continue
            parts = []
            for i, text in enumerate(m["content"].split(IMAGE_TOKEN)):
                if i > 0 and pending:
                    image = pending.pop(0)
                    data, kind = base64.b64encode(image).decode(), sniff_media_type(image) or "image/png"
                    parts.append({"type": "image_url", "image_url": {"url": f"data:{kind};base64,{data}"}}
                                 if self.api == "openai" else
                                 {"type": "image", "source": {"type": "base64", "media_type": kind, "data": data}})
                if text.strip():
                    parts.append({"type": "text", "text": text.strip()})
            out.append({"role": m["role"], "content": parts})
        body = {"model": self.model, "messages": out, "max_tokens": self.max_new_tokens, "temperature": 0}
        if system and self.api == "anthropic":
            body["system"] = system
        elif system:
            out.insert(0, {"role": "system", "content": system})
        return body

    def _ask(self, request: Request) -> str | None:
        data = json.dumps(self._body(*request)).encode()
        headers = {"content-type": "application/json"}
        if self.api == "anthropic":
            headers |= {"anthropic-version": "2023-06-01", **({"x-api-key": self.key} if self.key else {})}
        elif self.key:
            headers["authorization"] = f"Bearer {self.key}"
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, data, headers),
                                            timeout=self.timeout) as response:
                    return reply_text(json.loads(response.read()), self.api)
            except urllib.error.HTTPError as err:
                reason = f"HTTP {err.code}: {err.read()[:200]!r}"
                if err.code < 500 and err.code != 429:  # the request itself is wrong: retrying will not help
                    self._failed(reason, refused=True)
                    return None
            except MalformedReply as err:  # the server answered, in another API's form: so will it again
                self._failed(f"{err} (is critic.api={self.api!r} the endpoint's API?)", refused=True)
                return None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError, ValueError) as err:
                reason = str(getattr(err, "reason", err)) or type(err).__name__
            if attempt == self.retries or self.stopping.wait(0.5 * 2 ** attempt):  # the backoff, or Ctrl-C
                break
        self._failed(f"{reason} ({attempt + 1} tries)", refused=False)
        return None
