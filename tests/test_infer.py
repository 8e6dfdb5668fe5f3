"""`python -m vlm.infer`: the one-shot command, the REPL driven through stdin, and clean errors (exit 2)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tty
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from images import crafted_png
from PIL import Image

from vlm.cli import CONFIG_DIR, LIST_TEXT_KEYS, PATH_KEYS, PATTERN_KEYS, TEXT_KEYS, quote_values
from vlm.config import ConfigError, load_config
from vlm.errors import UserError
from vlm.exports.format import PROVENANCE_FILE, ExportError, not_a_folder, read_meta
from vlm.generation.options import GenerationOptions
from vlm.infer import InferConfig, image_file_problem, infer_config, stream_answer

ROOT = Path(__file__).resolve().parents[1]
GREEDY = ["device=cpu", "generation.temperature=0", "generation.max_new_tokens=5"]


def run_infer(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "vlm.infer", *args], input=stdin, capture_output=True, text=True,
                          encoding="utf-8", cwd=ROOT, env=env, timeout=120)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = [folder / "red.png", folder / "blue square.png"]
    Image.new("RGB", (40, 30), (220, 20, 20)).save(paths[0])
    Image.new("RGB", (32, 32), (20, 20, 220)).save(paths[1])
    return [str(p) for p in paths]


@pytest.mark.slow
def test_one_shot_prints_the_answer(tiny_sft_export, tiny_chat_model, pictures):
    """The images reach the model in the order given: the tiny model answers this question differently when the two
    are swapped."""
    question = "First or second, which is blue?"  # a comma: Hydra would read it as a list unquoted
    result = run_infer(f"checkpoint={tiny_sft_export}", f"image=[{pictures[0]},'{pictures[1]}']",
                       f"prompt={question}", *GREEDY)
    assert result.returncode == 0, result.stderr
    messages = [{"role": "user", "content": f"<image>\n<image>\n{question}"}]
    expected = tiny_chat_model.generate(messages, pictures, max_new_tokens=5, temperature=0)
    swapped = tiny_chat_model.generate(messages, pictures[::-1], max_new_tokens=5, temperature=0)
    assert swapped.text != expected.text  # otherwise this test could not tell the order
    assert result.stdout == expected.text + "\n"


@pytest.mark.slow
def test_repl_via_stdin(tiny_sft_export, tiny_chat_model, pictures):
    # a refused message keeps its attached image for the next one; a message of several lines keeps its indentation
    script = (f"/help\n/image {pictures[0]}\n<image> or <image>?\nWhat color is the shape?\n/reset\n"
              '"""And now?\n  /indented\n"""\n/bogus\n/quit\n')
    result = run_infer(f"checkpoint={tiny_sft_export}", *GREEDY, stdin=script)
    assert result.returncode == 0, result.stderr
    first = tiny_chat_model.generate([{"role": "user", "content": "<image>\nWhat color is the shape?"}],
                                     pictures[:1], max_new_tokens=5, temperature=0)
    after_reset = tiny_chat_model.generate([{"role": "user", "content": "And now?\n  /indented"}], max_new_tokens=5,
                                           temperature=0)
    out = result.stdout
    assert "/image PATH" in out and "attached 1 image" in out and "conversation cleared" in out
    assert f"vlm> {first.text}\n" in out and f"vlm> {after_reset.text}\n" in out  # the reset forgot turn one
    assert "unknown command '/bogus'" in out
    # right after the prompt the user typed it at (no empty line before it), and the image stays for the next message
    assert "you> error: the message has 2 <image> placeholders but 1 image attached" in out
    assert "(the attached image stays attached)\nyou> " in out


@pytest.mark.slow
def test_missing_image_and_bad_option_are_clean_errors(tiny_sft_export, tmp_path, pictures):
    checkpoint = f"checkpoint={tiny_sft_export}"
    commands = [(checkpoint, f"image={tmp_path / 'nope.png'}", "prompt=hi"), (checkpoint, "prompt="),
                (checkpoint, "generation.temprature=0"),
                (checkpoint, f"image={pictures[0]}", "prompt=<image> or <image>?")]
    with ThreadPoolExecutor(len(commands)) as pool:  # side by side: each spends its time importing
        missing_image, empty_prompt, typo, placeholders = pool.map(lambda args: run_infer(*args), commands)
    assert missing_image.returncode == 2 and "nope.png" in missing_image.stderr
    assert "Traceback" not in missing_image.stderr
    assert empty_prompt.returncode == 2 and "prompt is empty" in empty_prompt.stderr and empty_prompt.stdout == ""
    assert typo.returncode == 2 and "generation.temperature" in typo.stderr  # the typo's closest key
    assert placeholders.returncode == 2 and "2 <image> placeholders but 1 image attached" in placeholders.stderr
    assert "loaded" not in placeholders.stderr  # found before the model loads


@pytest.mark.slow
def test_an_answer_piped_to_a_reader_that_left_ends_quietly(tiny_sft_export, pictures):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "vlm.infer", f"checkpoint={tiny_sft_export}", f"image={pictures[1]}",
               "prompt=hi", "generation.max_new_tokens=8"]
    # `| true`: the reader is gone before the first word, as `| head -c 5` is after its fifth byte
    result = subprocess.run(["bash", "-c", shlex.join(command) + ' | true; exit "${PIPESTATUS[0]}"'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 141 and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_an_answer_that_cannot_be_written_is_one_clear_error(monkeypatch):
    from vlm.infer import to_stdout

    full = open("/dev/full", "w")  # noqa: SIM115 (every write fails: no space left on device)
    monkeypatch.setattr(sys, "stdout", full)
    with pytest.raises(UserError, match=r"cannot write the answer to stdout \(No space left on device\)"):
        to_stdout("an answer")
    with contextlib.suppress(OSError):  # closing flushes the unwritten answer again
        full.close()


def test_h2o_settings_without_the_h2o_cache_are_warned_about():
    from vlm.generation.options import H2OSettings
    from vlm.infer import unused_h2o_settings

    assert unused_h2o_settings(GenerationOptions()) is None
    assert unused_h2o_settings(GenerationOptions(kv_cache="h2o", h2o=H2OSettings(heavy=0.5))) is None
    assert unused_h2o_settings(GenerationOptions(h2o=H2OSettings(heavy=0.5))) == (
        "generation.h2o.* is set but generation.kv_cache=dynamic: the H2O budget applies only with "
        "generation.kv_cache=h2o")


def test_an_image_is_checked_before_the_model_loads(tmp_path, pictures):
    (tmp_path / "notes.png").write_text("not a picture")
    assert image_file_problem(pictures[0]) is None
    assert image_file_problem(str(tmp_path)) == f"image {str(tmp_path)!r} is a folder, not an image file"
    assert image_file_problem(str(tmp_path / "nope.png")) == f"image {str(tmp_path / 'nope.png')!r} not found"
    assert "is not an image" in image_file_problem(str(tmp_path / "notes.png"))
    listed = f"{pictures[0]},{pictures[1]}"  # image=a.png,b.png: Hydra reads one name
    assert image_file_problem(listed) == f"image {listed!r} not found; for several images write image=[{listed}]"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert image_file_problem(str(tmp_path / "empty.jpg")) == f"image {str(tmp_path / 'empty.jpg')!r} is an empty " \
                                                              f"file (0 bytes)"
    assert image_file_problem("") == "image= is empty: give an image file, or a list of them: image=[a.jpg,b.jpg]"
    (tmp_path / "big.png").write_bytes(crafted_png(20_000, 20_000))  # past PIL's own hard limit: the tiler judges it
    assert image_file_problem(str(tmp_path / "big.png")) is None


def test_a_file_or_folder_given_for_an_export_folder_says_what_to_pass(tiny_sft_export, tmp_path):
    assert not_a_folder(tiny_sft_export) is None
    config = Path(tiny_sft_export) / "config.json"
    assert not_a_folder(config) == f"{str(config)!r} is a file; pass the export folder that holds it " \
                                   f"({str(tiny_sft_export)!r})"
    checkpoint = tmp_path / "run" / "checkpoints" / "step00000004.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    assert not_a_folder(checkpoint).startswith(f"{str(checkpoint)!r} is a training checkpoint, not an export; pass "
                                               f"its run's export folder ({str(tmp_path / 'run' / 'export')!r})")
    (tmp_path / "run" / "export").mkdir()
    with pytest.raises(ExportError, match="it is a run folder; pass its export folder .*run/export'$"):
        read_meta(tmp_path / "run")
    with pytest.raises(ExportError, match="it holds a run's training checkpoints; pass the export beside them "
                                          ".*run/export'$"):
        read_meta(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "export").rmdir()  # stopped before its export
    for given in (tmp_path / "run" / "checkpoints", tmp_path / "run"):
        with pytest.raises(ExportError, match="training checkpoints of a run that has not written its export yet; "
                                              "resume=auto run_name=run \\(with its stage and output_root\\) "
                                              "finishes it$"):
            read_meta(given)
    stage = tmp_path / "sft"
    (stage / "r1").mkdir(parents=True)
    (stage / "r1" / "export").symlink_to(tiny_sft_export)
    with pytest.raises(ExportError, match="it holds runs; pass one's export folder, e.g. .*sft/r1/export'$"):
        read_meta(stage)
    converted = tmp_path / "my-vlm-hf"
    converted.mkdir()
    (converted / PROVENANCE_FILE).write_text(json.dumps({"source": "/runs/sft/export"}))
    with pytest.raises(ExportError, match="converted for another library .* export it came from: '/runs/sft/export'"):
        read_meta(converted)


@pytest.mark.parametrize("text", ["Which is blue, the first or the second?", "it's [x, y] = {a: 1}", "a \\' b\\",
                                  "cost: ${x}", ""])
def test_free_text_arguments_reach_the_config_verbatim(text):
    (override,) = quote_values([f"prompt={text}"], TEXT_KEYS)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        composed = compose("infer", overrides=[override])
    assert composed.prompt == text
    assert load_config(InferConfig, composed).prompt == text  # checked against the schema, still verbatim
    assert quote_values(['prompt="already, quoted"', "image=[a.png,b.png]"], TEXT_KEYS) == ['prompt="already, quoted"',
                                                                                    "image=[a.png,b.png]"]
    assert quote_values(["prompt=null"], TEXT_KEYS) == ["prompt='null'"]  # a word here, not Hydra's null


@pytest.mark.parametrize("name", ["IMG (1).png", "café.png", "photo's.png", "a,b.png", "~/x=1 {2}.png", "null.png"])
def test_file_names_reach_the_config_verbatim(name):
    keys = PATH_KEYS + PATTERN_KEYS
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        composed = compose("infer", overrides=quote_values([f"image={name}", f"checkpoint=runs/{name}"], keys))
        assert (composed.image, composed.checkpoint) == (name, f"runs/{name}")
        assert compose("export", overrides=quote_values(["out=null"], keys)).out is None  # null still means none
        if "," not in name:  # in a list, a comma separates names (quote such a name yourself)
            listed = compose("infer", overrides=quote_values([f"image=[{name}, second.png]"], keys)).image
            assert list(listed) == [name, "second.png"]
        quote = '"' if "'" in name else "'"  # quoted, any name is one item of the list
        listed = compose("infer", overrides=quote_values([f"image=[{quote}{name}{quote},second.png]"], keys)).image
        assert list(listed) == [name, "second.png"]


@pytest.mark.slow
def test_control_characters_of_an_answer_reach_a_terminal_escaped_and_a_file_as_they_are(monkeypatch, tmp_path):
    """An answer asking the terminal to write the clipboard (OSC 52) and clear the screen (CSI 2J, C1 form) is shown
    as text on a real terminal (a pseudo-terminal here); redirected to a file it stays the model's exact text."""
    from vlm.infer import to_stdout

    answer = "a red circle\x1b]52;c;cGFzdGVk\x07\x9b2J\tthen\r\nmore"
    controller, terminal_fd = os.openpty()
    tty.setraw(terminal_fd)  # no newline translation: the bytes written are the bytes read
    with os.fdopen(terminal_fd, "w", encoding="utf-8") as terminal:
        monkeypatch.setattr(sys, "stdout", terminal)
        to_stdout(answer)
    shown = os.read(controller, 4096).decode()
    os.close(controller)
    assert shown == "a red circle\\x1b]52;c;cGFzdGVk\\x07\\x9b2J\tthen\r\nmore"

    with open(tmp_path / "answer.txt", "w", encoding="utf-8") as file:
        monkeypatch.setattr(sys, "stdout", file)
        to_stdout(answer)
    assert (tmp_path / "answer.txt").read_bytes().decode() == answer


@pytest.mark.slow  # a REPL process answering twice, the second time to the end of its context
def test_ctrl_c_stops_the_answer_and_keeps_the_session(tiny_sft_export, tiny_chat_model):
    """Ctrl-C cuts the answer, and the next message is answered in the conversation so far: the question, the
    partial answer and the new message."""
    question, follow_up = "Tell me everything.", "And then?"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    # unbuffered bytes: a buffered pipe's read(1) reads ahead, and communicate() never sees what it took (the shown
    # answer then lacks pieces the REPL printed); and a text pipe would read a "\r" the model wrote as "\n"
    process = subprocess.Popen([sys.executable, "-m", "vlm.infer", f"checkpoint={tiny_sft_export}", "device=cpu",
                                "generation.temperature=0", "generation.max_new_tokens=480"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                               env=env, bufsize=0,
                               # a shell's background job (`pytest &`) would pass SIGINT on ignored, and so would Popen
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        process.stdin.write(f"{question}\n".encode())
        seen = b""
        while b"vlm> " not in seen[:-1]:  # the answer's first piece is out: it is streaming
            byte = process.stdout.read(1)
            assert byte, process.stderr.read().decode()
            seen += byte
        process.send_signal(signal.SIGINT)
        out_bytes, err_bytes = process.communicate(f"{follow_up}\n/quit\n".encode(), timeout=60)
    finally:
        process.kill()
    out, err = (seen + out_bytes).decode(), err_bytes.decode()
    assert process.returncode == 0, err
    assert "[stopped]" in out and "Traceback" not in err
    partial, stopped, after = out.split("vlm> ", 1)[1].partition(" [stopped]\n")
    assert stopped and after.startswith("you> vlm> ") and after.endswith("\nyou> "), after

    followed = after.removeprefix("you> vlm> ").removesuffix("\nyou> ")
    forgotten = tiny_chat_model.generate([{"role": "user", "content": follow_up}], max_new_tokens=480, temperature=0)
    assert followed and followed != forgotten.text  # a session cleared by Ctrl-C would answer this

    # Which history the follow-up was asked over, read from the REPL's own report of its prompt's size (the answer
    # fills the 512-token context), not from its text: greedy text from another process can part at a near-tie.
    took = re.findall(r"the answer filled the model's context of 512 tokens \(the prompt took (\d+)\)", err)
    assert len(took) == 1 and tiny_chat_model.context_length == 512, err

    def prompt_tokens(history: str) -> int:
        conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": history},
                        {"role": "user", "content": follow_up}]
        return tiny_chat_model.prepare(conversation).input_tokens

    # Ctrl-C lands between pieces, or while one is printed: then the history holds that piece too, unseen
    pieces = list(tiny_chat_model.stream([{"role": "user", "content": question}], max_new_tokens=480, temperature=0))
    shown = next(i for i in range(len(pieces) + 1) if "".join(pieces[:i]) == partial)
    assert int(took[0]) in {prompt_tokens(partial), prompt_tokens(partial + "".join(pieces[shown:shown + 1]))}


@pytest.mark.slow
def test_ctrl_c_in_one_shot_mode_exits_130_so_a_script_sees_a_cut_answer(tiny_sft_export):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    process = subprocess.Popen([sys.executable, "-m", "vlm.infer", f"checkpoint={tiny_sft_export}", "device=cpu",
                                "prompt=Tell me everything.", "generation.temperature=1", "generation.seed=0",
                                "generation.max_new_tokens=480"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env, text=True,
                               encoding="utf-8", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = process.stdout.read(1)  # the answer has started
        assert first, process.stderr.read()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "[stopped]" not in first + out and "error: stopped by Ctrl-C; the answer above is cut short" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_chat_that_cannot_write_to_stdout_is_one_clear_error(tiny_sft_export):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open("/dev/full", "w") as full:  # every write fails: no space left on device
        result = subprocess.run([sys.executable, "-m", "vlm.infer", f"checkpoint={tiny_sft_export}", *GREEDY],
                                input="hi\n", stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                                timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: cannot write the answer to stdout (No space left on device)" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_temperature_choice_is_logged_before_the_answer_starts(tiny_chat_model):
    """In the REPL, "temperature auto -> 0.7" must not land between the `vlm> ` prompt and the answer."""
    events: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            events.append("log: " + record.getMessage())

    logger = logging.getLogger("vlm")
    handler, level = Recorder(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        session = tiny_chat_model.session(temperature="auto", max_new_tokens=2, seed=0)
        stream_answer(session, "Describe it.", [], lambda text: events.append("out: " + text), prefix="vlm> ")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    choice = next(i for i, e in enumerate(events) if e.startswith("log: temperature auto"))
    assert choice < events.index("out: vlm> ")


def test_an_answer_cut_by_the_context_says_so_not_max_new_tokens(tiny_chat_model, caplog):
    caplog.set_level(logging.INFO, logger="vlm.infer")
    long = tiny_chat_model.session(temperature=0, max_new_tokens=4000)
    stream_answer(long, "word " * 120, [], lambda text: None)  # 488 prompt tokens of the tiny model's 512
    assert "the answer filled the model's context of 512 tokens (the prompt took 488)" in caplog.text
    assert "max_new_tokens" not in caplog.text
    short = tiny_chat_model.session(temperature=0, max_new_tokens=3)
    stream_answer(short, "word", [], lambda text: None)
    assert "the answer reached max_new_tokens=3" in caplog.text
    # the same reasons in the API (the server's Anthropic stop_reason; OpenAI says "length" for both)
    cut_by_context = tiny_chat_model.generate(long.messages[:1], temperature=0, max_new_tokens=4000)
    assert cut_by_context.stop_reason == "model_context_window_exceeded"
    assert tiny_chat_model.generate(short.messages[:1], temperature=0, max_new_tokens=3).stop_reason == "max_tokens"


def test_one_value_given_to_a_list_key_is_shown_as_a_list():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        composed = compose("infer", overrides=["generation.stop=foo"])
    with pytest.raises(ConfigError, match=r"^bad value for 'generation.stop': it takes a list, e.g. "
                                          r"generation.stop=\[foo\], got 'foo'$"):
        load_config(InferConfig, composed)


def test_stop_sequences_typed_in_a_shell_read_their_escapes():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):  # as bash passes them on
        composed = compose("infer", overrides=[r'generation.stop=["\n\n",a\tb,"c:\\n"]'])
    assert infer_config(composed).generation.stop == ("\n\n", "a\tb", "c:\\n")


def test_stop_sequences_are_the_text_typed_not_numbers_or_hydra_grammar():
    """`generation.stop=[2.]` stops at the second item of a numbered list: not at "2.0", which Hydra's float
    would become."""
    typed = ["2.", "1.50", "true", "+1", "1e3", "###", "<|im_end|>", "null", r"a\tb", r'"\n\n"']
    override = quote_values([f"generation.stop=[{','.join(typed)}]"], TEXT_KEYS + LIST_TEXT_KEYS)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        composed = compose("infer", overrides=override)
    assert infer_config(composed).generation.stop == ("2.", "1.50", "true", "+1", "1e3", "###", "<|im_end|>", "null",
                                                      "a\tb", "\n\n")


@pytest.mark.parametrize("typed", ["[]", "[ ]"])
def test_an_empty_list_of_stop_sequences_typed_in_a_shell_is_none(typed):
    """`generation.stop=[]`, the config's own default, was one empty stop sequence, and refused."""
    override = quote_values([f"generation.stop={typed}"], TEXT_KEYS + LIST_TEXT_KEYS)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        assert infer_config(compose("infer", overrides=override)).generation.stop == ()


def test_infer_and_serve_name_a_missing_or_damaged_export_in_one_line(tiny_sft_export, tmp_path, capsys):
    import shutil

    from vlm.cli import load_chat_model, require_chat_export

    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    damaged = Path(shutil.copytree(tiny_sft_export, tmp_path / "damaged"))
    (damaged / "model.safetensors").write_bytes(b"\0" * 64)
    for check, expected in ((lambda: require_chat_export(None), "error: checkpoint=PATH is required: an align or "
                             "sft export folder, e.g. checkpoint=checkpoints/sft/RUN/export"),
                            (lambda: require_chat_export(str(notes)), f"error: checkpoint={not_a_folder(str(notes))}"),
                            (lambda: load_chat_model(str(damaged), "cpu", None),
                             f"error: {str(damaged / 'model.safetensors')!r} cannot be read")):
        with pytest.raises(SystemExit) as stop:
            check()
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(expected) and err.count("\n") == 1, err
    missing = tmp_path / "no-such-export"
    with pytest.raises(SystemExit):
        require_chat_export(str(missing))
    assert capsys.readouterr().err == f"error: checkpoint={str(missing)!r} does not exist: give an export folder " \
                                      f"(OUTPUT_ROOT/STAGE/RUN/export)\n"
    require_chat_export(str(tiny_sft_export))  # an export folder passes
    assert load_chat_model(str(tiny_sft_export), "cpu", None, name="mine").name == "mine"


def test_ctrl_c_while_the_model_loads_is_one_line_and_exit_130(tiny_sft_export, capsys, monkeypatch):
    from vlm.cli import load_chat_model

    def interrupted(*args, **kwargs):  # Ctrl-C lands while the weights are read
        raise KeyboardInterrupt

    monkeypatch.setattr("vlm.chat.load_vlm", interrupted)
    with pytest.raises(SystemExit) as stop:
        load_chat_model(str(tiny_sft_export), "cpu", None)
    assert stop.value.code == 130
    assert capsys.readouterr().err == "error: stopped by Ctrl-C while the model was loading\n"


def test_a_ctrl_c_while_a_piece_is_printed_leaves_the_history_as_shown(tiny_chat_model):
    """The piece being written when Ctrl-C comes is written whole, and the answer stops after it: the history holds
    what the screen shows, no piece more."""
    session = tiny_chat_model.session(temperature=0, max_new_tokens=12)
    shown: list[str] = []
    calls = 0

    def write(text: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:  # the prefix, then three pieces: Ctrl-C while the fourth is written
            signal.raise_signal(signal.SIGINT)
        shown.append(text)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # the REPL's (pytest-xdist workers ignore it)
    try:
        stream_answer(session, "What is it?", [], write)  # the tiny model's greedy answer: 11 visible pieces
    finally:
        signal.signal(signal.SIGINT, previous)
    assert shown[-2:] == [" [stopped]", "\n"] and len(shown) == 7
    assert session.messages[-1] == {"role": "assistant", "content": "".join(shown[1:-2])}
