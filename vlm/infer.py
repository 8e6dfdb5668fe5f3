"""`python -m vlm.infer checkpoint=PATH [image=a.jpg prompt="..."]`: chat with an exported model in the terminal.

Without `prompt` it opens a chat REPL: answers stream as they are generated, `/image PATH [PATH...]` attaches images
to the next message, `/reset` forgets the conversation, `/help` lists the commands, `/quit` (or Ctrl-D) leaves, a
message between \"\"\" lines may span several lines, and Ctrl-C stops the current answer but keeps the session.
With `prompt` it answers once and exits. Settings live in configs/infer.yaml; the chat itself is `vlm.chat` (also the
Python API).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from PIL import Image

from vlm.chat import ChatSession, PromptError, with_placeholders
from vlm.cli import (
    CONFIG_DIR,
    LIST_TEXT_KEYS,
    TEXT_KEYS,
    fail,
    load_chat_model,
    preflight,
    quote_values,
    require_chat_export,
    setup_logging,
    user_errors,
)
from vlm.config import load_config, setting
from vlm.data.tiler import ImageLoadError, pil_bomb_limit
from vlm.errors import UserError
from vlm.generation.completion import check_system_prompt, check_text
from vlm.generation.options import GenerationOptions, H2OSettings
from vlm.signals import interrupts_deferred

log = logging.getLogger("vlm.infer")


@dataclass
class InferConfig:
    """configs/infer.yaml, which gives every default and documents each key."""

    checkpoint: str | None = setting()  # an align or sft export folder
    image: Any = setting()  # one-shot: an image path, or a list of them
    prompt: str | None = setting()  # one-shot: the question; without it the chat REPL opens
    system: str | None = setting()  # system prompt for every conversation
    device: str = setting()
    dtype: str = setting()
    log_level: str = setting()
    generation: GenerationOptions = field(default_factory=GenerationOptions)


HELP = """commands:
  /image PATH [PATH...]  attach images to your next message (quote paths with spaces)
  /reset                 forget the conversation and any attached images
  /help                  show this list
  /quit                  leave (Ctrl-D works too)
  \"\"\"                    start a message of several lines (pasted code, a list); a line ending in \"\"\" sends it
Ctrl-C stops the answer being written; the chat goes on."""
MULTILINE = '"""'  # opens and closes a message of several lines


def read_block(first_line: str, read_line: Callable[[], str]) -> str:
    """A message of several lines: `first_line` (starting with \"\"\") and the lines `read_line` reads, up to one
    ending with \"\"\", joined by newlines with their indentation kept. EOFError or KeyboardInterrupt from `read_line`
    goes on up, and the message is dropped."""
    text = first_line.removeprefix(MULTILINE)
    lines = []
    while not text.rstrip().endswith(MULTILINE):
        lines.append(text)
        text = read_line()
    lines.append(text.rstrip().removesuffix(MULTILINE))
    return "\n".join(lines).strip("\n")


def image_file_problem(path: str) -> str | None:
    """Why `path` cannot be attached (missing, a folder, not an image), read from its header only; None if it can."""
    if not path.strip():
        return "image= is empty: give an image file, or a list of them: image=[a.jpg,b.jpg]"
    file = Path(path).expanduser()
    if file.is_dir():
        return f"image {path!r} is a folder, not an image file"
    if not file.is_file():
        parts = [part.strip() for part in path.split(",")]
        if len(parts) > 1 and all(Path(part).expanduser().is_file() for part in parts):  # a list without brackets
            return f"image {path!r} not found; for several images write image=[{','.join(parts)}]"
        return f"image {path!r} not found"
    try:  # the header only: the model's tiler judges the size (tiler.max_pixels) when it reads the pixels
        with pil_bomb_limit(sys.maxsize), Image.open(file):
            return None
    except Exception:  # PIL raises many types for files that are not images
        empty = file.stat().st_size == 0
        return f"image {path!r} is an empty file (0 bytes)" if empty else \
            f"image {path!r} is not an image, or not a format this Pillow build can read"


def image_list(value: Any) -> list[str]:
    """`image=a.jpg` or `image=[a.jpg,b.jpg]` -> paths, each checked before the model loads."""
    if value is None:
        return []
    paths = [str(p) for p in (value if isinstance(value, list) else [value])]
    for path in paths:
        if problem := image_file_problem(path):
            fail(problem)
    return [str(Path(p).expanduser()) for p in paths]


def stream_answer(session: ChatSession, text: str, images: list[str], write: Callable[[str], Any],
                  prefix: str = "", keep_on_interrupt: bool = True) -> None:
    """Print `prefix`, then the answer as it is generated. Ctrl-C stops it: with `keep_on_interrupt` (the REPL) the
    partial answer stays in the history and the chat goes on; without, the KeyboardInterrupt goes on up. The stream
    is created first, so its log lines (the temperature=auto choice) come before the prefix."""
    stream = session.stream(text, images=images)
    write(prefix)
    try:
        for piece in stream:
            with interrupts_deferred():  # a piece the history keeps is shown whole, a Ctrl-C then stops after it
                write(piece)
    except KeyboardInterrupt:
        if not keep_on_interrupt:
            raise
        write(" [stopped]")
    finally:
        stream.close()  # Ctrl-C, or a write that failed (a closed pipe), stops the generation; done, it does nothing
    write("\n")
    completion = stream.completion
    reason = completion.stop_reason if completion is not None else None
    if reason == "model_context_window_exceeded":  # before max_new_tokens was reached
        log.info("the answer filled the model's context of %d tokens (the prompt took %d); /reset in the chat, or a "
                 "shorter prompt, leaves more room", session.model.context_length, completion.input_tokens)
    elif reason == "max_tokens":
        log.info("the answer reached max_new_tokens=%d; raise generation.max_new_tokens for longer answers",
                 session.options.max_new_tokens)


def repl(session: ChatSession, banner: str) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass

    say(banner)
    pending: list[str] = []  # images attached to the next message
    while True:
        try:
            line = input("you> ").strip()
            block = read_block(line, lambda: input("...  ")) if line.startswith(MULTILINE) else None
        except EOFError:
            say()
            return
        except BrokenPipeError:
            raise
        except OSError as err:  # the prompt could not be written (a full disk)
            raise stdout_failure(err) from None
        except KeyboardInterrupt:
            say("\n(/quit or Ctrl-D leaves)")
            continue
        if block is None and line.startswith("/"):
            if not run_command(line, session, pending):
                return
            continue
        message = line if block is None else block
        if not message.strip():
            continue
        images, pending = pending, []
        try:
            stream_answer(session, message, images, to_stdout, prefix="vlm> ")
        except PromptError as err:  # the message, not its images: they stay for the retyped one
            pending = images
            kept = ("(the attached image stays attached)" if len(images) == 1 else
                    f"(the {len(images)} attached images stay attached)")
            say(f"error: {err}" + (f" {kept}" if images else ""))
        except ImageLoadError as err:  # before the answer starts: nothing was printed for it
            say(f"error: {err} (attach images again with /image)")
        except KeyboardInterrupt:  # before the answer started streaming
            to_stdout(" [stopped]\n")


def run_command(line: str, session: ChatSession, pending: list[str]) -> bool:
    """Run a REPL command (`line` starts with "/"); `pending` holds the images attached to the next message.
    False: leave the chat."""
    try:
        command, *args = shlex.split(line)
    except ValueError as err:
        say(f"error: {err}")
        return True
    if command in ("/quit", "/exit"):
        return False
    if command == "/help":
        say(HELP)
    elif command == "/reset":
        session.reset()
        pending.clear()
        say("(conversation cleared)")
    elif command == "/image":
        problems = [problem for p in args if (problem := image_file_problem(p))]
        if not args or problems:
            say(f"error: {problems[0]}" if problems else "usage: /image PATH [PATH...]")
            return True
        pending += [str(Path(p).expanduser()) for p in args]
        say(f"(attached {len(pending)} image{'s' if len(pending) > 1 else ''} to your next message)")
    else:
        say(f"unknown command {command!r}\n{HELP}")
    return True


SHELL_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


def unescaped(text: str) -> str:
    r"""A stop sequence as typed in a shell: `generation.stop=["\n\n"]` arrives with a backslash and an n, which
    Hydra keeps; here \n, \t and \r are a newline, a tab and a return, and \\ one backslash."""
    return re.sub(r"\\[ntr\\]", lambda match: SHELL_ESCAPES[match.group(0)], text)


def infer_config(cfg: DictConfig) -> InferConfig:
    """The composed config, checked; stop sequences with their shell escapes read."""
    config = load_config(InferConfig, cfg)
    config.generation.stop = tuple(unescaped(s) for s in config.generation.stop)
    return config


def unused_h2o_settings(generation: GenerationOptions) -> str | None:
    """A warning for generation.h2o.* set while another KV cache answers: the budget would silently do nothing."""
    if generation.kv_cache == "h2o" or generation.h2o == H2OSettings():
        return None
    return (f"generation.h2o.* is set but generation.kv_cache={generation.kv_cache}: the H2O budget applies only "
            f"with generation.kv_cache=h2o")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="infer")
def infer(cfg: DictConfig) -> None:
    with user_errors():
        config = infer_config(cfg)
    setup_logging(config.log_level)
    if message := unused_h2o_settings(config.generation):
        log.warning(message)
    require_chat_export(config.checkpoint)
    if config.prompt is not None and not config.prompt.strip():
        fail("prompt is empty: give a question, or leave prompt out to chat in the REPL")
    images = image_list(config.image)
    if images and config.prompt is None:
        fail("image=... needs prompt=\"...\" (in the chat REPL, attach images with /image PATH)")
    with user_errors():  # before the model loads
        check_system_prompt(config.system)
        if config.prompt is not None:
            check_text(config.prompt, "prompt")
            with_placeholders(config.prompt, len(images))
    model = load_chat_model(config.checkpoint, config.device, config.dtype)
    with user_errors():
        session = model.session(system=config.system, **config.generation.as_dict())
    with user_errors():  # an unreadable image, a prompt longer than the context, a full disk
        try:
            if config.prompt is None:
                repl(session, f"vlm chat with {model.name} on {model.device}. /help lists the commands.")
            else:
                stream_answer(session, config.prompt, images, to_stdout, keep_on_interrupt=False)
        except BrokenPipeError:  # `vlm.infer ... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or flushing stdout at exit fails again
            sys.exit(141)  # as a shell reports a process ended by SIGPIPE
        except KeyboardInterrupt:  # one question: a cut answer must not pass for a whole one in a script
            print("\nerror: stopped by Ctrl-C; the answer above is cut short", file=sys.stderr)
            sys.exit(130)  # as a shell reports a process ended by SIGINT


# Control characters but tab, newline and carriage return: C0, DEL and C1. From a model's answer (asked to, say, by
# text in an image) an ESC sequence would reach the terminal as a command: set its title, write the clipboard (OSC 52),
# hide the text after it. A terminal shows them escaped; a pipe gets the answer's exact text.
TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """`text` with every control character a terminal would act on written as its escape (ESC -> \\x1b)."""
    return TERMINAL_CONTROLS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def to_stdout(text: str) -> None:
    try:
        sys.stdout.write(terminal_safe(text) if sys.stdout.isatty() else text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise  # the reader left (`| head`): infer() ends quietly
    except OSError as err:
        raise stdout_failure(err) from None


def say(*lines: str) -> None:
    """print() for the REPL, through to_stdout's error handling."""
    to_stdout(" ".join(lines) + "\n")


def stdout_failure(err: OSError) -> UserError:
    return UserError(f"cannot write the answer to stdout ({err.strerror or err})")


def main() -> None:
    sys.argv[1:] = quote_values(sys.argv[1:], TEXT_KEYS + LIST_TEXT_KEYS)
    preflight(sys.argv[1:], "infer")
    infer()


if __name__ == "__main__":
    main()
