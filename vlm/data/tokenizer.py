"""The LLM tokenizer: a Hugging Face tokenizer by name or path, or a small local one for the synthetic default.

Either way it gets the `<image>` placeholder as a special token, a pad token, and a chat template: the tokenizer's
own when it has one, else DEFAULT_CHAT_TEMPLATE (ChatML).
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlm.config import LLMConfig
from vlm.data import synthetic
from vlm.errors import first_line

IMAGE_TOKEN = "<image>"


def joined_parts(parts: list[str]) -> str:
    """A message given as parts (texts, and IMAGE_TOKEN for each image) as the one text the chat template gets: the
    parts on lines of their own, so an image precedes its question as `<image>\n` does in LLaVA-style data. The
    server's APIs, TRL-style preference records and the HF export's chat template (FLATTEN_CONTENT_PARTS) all
    render parts this way."""
    return "\n".join(parts)

# ChatML, as Qwen and SmolLM use: <|im_start|>role\ncontent<|im_end|>\n per message.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LOCAL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_local_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`: any text encodes, and the synthetic words are single tokens after a space
    (at the start of a reply some are several; `synthetic.corpus` says why)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_LOCAL_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token=None,
                                   pad_token="<pad>", unk_token=None, chat_template=DEFAULT_CHAT_TEMPLATE)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Add `<image>` and a pad token, and make sure there is a chat template."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if chat_template:
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        # the model learns to end each answer with <|im_end|>: generation must stop there (as TRL's chat format)
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str, key: str = "tokenizer") -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer by name or path; `key` names the setting it came from, for errors."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # no such folder or hub name; a folder without tokenizer files
        raise FileNotFoundError(f"{key}={name_or_path!r}: cannot load a tokenizer from it ({first_line(err)[:300]})"
                                ) from None


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def new_tokenizer(config: LLMConfig) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer by name or path (`model.llm.tokenizer`, else `model.llm.name_or_path`), or, for the tiny
    random LLM, a byte-level BPE trained on the synthetic corpus; prepared either way."""
    source = config.tokenizer or config.name_or_path
    key = "model.llm.tokenizer" if config.tokenizer else "model.llm.name_or_path"
    tokenizer = load_tokenizer(source, key) if source else build_local_tokenizer(list(synthetic.corpus()))
    return prepare_tokenizer(tokenizer, config.chat_template)
