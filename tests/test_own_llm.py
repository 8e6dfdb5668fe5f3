"""`model.llm.name_or_path=FOLDER`: a user's own Hugging Face LLM and tokenizer, saved locally with tiny random
weights: what loads and trains, and what is refused with the key named."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from images import solid
from tiny import tiny_config
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    Lfm2Config,
    Lfm2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from vlm.config import ConfigError
from vlm.data.processor import pad_batch
from vlm.data.tokenizer import build_local_tokenizer, new_tokenizer, prepare_tokenizer
from vlm.models.attention import use_attention
from vlm.models.factory import new_vlm
from vlm.models.llm import build_llm
from vlm.models.packing import attention_break_even

SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "vocab_size": 1100}


def _plain_tokenizer(folder, eos: str | None = "<|endoftext|>"):
    """A byte-level BPE as many base LLMs ship it: an EOS token (or none) and no chat template or pad token."""
    tokenizer = build_local_tokenizer(["a red circle", "two blue squares"], vocab_size=300)
    tokenizer.chat_template, tokenizer.pad_token, tokenizer.eos_token = None, None, eos
    tokenizer.save_pretrained(folder)
    return folder


def _saved(folder, model, tokenizer: bool = True):
    model.save_pretrained(folder)
    if tokenizer:
        _plain_tokenizer(folder)
    return str(folder)


def test_an_llm_saved_in_bfloat16_trains_with_the_float32_projector(tmp_path):
    folder = _saved(tmp_path / "llama-bf16", LlamaForCausalLM(LlamaConfig(**SIZES)).to(torch.bfloat16))
    config = tiny_config(f"model.llm.name_or_path={folder}", stage="sft")
    bundle = new_vlm(config.model, config.tiler)
    assert {p.dtype for p in bundle.model.parameters()} == {torch.float32}
    prompt = bundle.processor.prompt([{"role": "user", "content": "<image>\nWhat colour?"}], [solid((255, 0, 0))])
    batch = pad_batch([prompt], bundle.tokenizer.pad_token_id)
    out = bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["input_ids"], pixel_values=batch["pixel_values"], image_slots=batch["image_slots"])
    out.loss.backward()  # was: masked_scatter between bfloat16 embeddings and float32 image features
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("kind, message", [
    ("t5", "is not a causal language model (ValueError: Unrecognized configuration class"),
    ("bert", "(BertLMHeadModel) is not causal: its tokens attend to later ones"),
])
def test_a_model_that_is_no_causal_lm_is_refused_naming_the_key(tmp_path, kind, message):
    model = (T5ForConditionalGeneration(T5Config(vocab_size=1100, d_model=32, d_ff=64, num_layers=1, num_heads=2))
             if kind == "t5" else BertModel(BertConfig(vocab_size=1100, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2)))
    folder = _saved(tmp_path / kind, model)
    llm = tiny_config(f"model.llm.name_or_path={folder}", stage="sft").model.llm
    with pytest.raises(ConfigError, match=re.escape(f"model.llm.name_or_path='{folder}' {message}")):
        build_llm(llm, new_tokenizer(llm))


def _gpt2_folder(tmp_path, positions: int) -> str:
    return _saved(tmp_path / "gpt2", GPT2LMHeadModel(GPT2Config(vocab_size=1100, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=positions)))


def test_a_max_length_past_a_learned_position_table_is_refused_naming_both(tmp_path):
    """GPT-2's learned positions would fail at the first sample longer than them (an IndexError inside the model,
    hours into a run): refused when the model is built, with the key its config.json spells."""
    folder = _gpt2_folder(tmp_path, 64)
    llm = tiny_config(f"model.llm.name_or_path={folder}", "model.llm.max_length=65", stage="sft").model.llm
    with pytest.raises(ConfigError, match=r"^model.llm.max_length=65 is more than the 64 positions GPT2LMHeadModel's "
                                          r"position table holds \(n_positions in its config\): set "
                                          r"model.llm.max_length=64 or less$"):
        build_llm(llm, new_tokenizer(llm))
    fits = tiny_config(f"model.llm.name_or_path={folder}", "model.llm.max_length=64", stage="sft").model.llm
    assert build_llm(fits, new_tokenizer(fits)).config.n_positions == 64


@pytest.mark.parametrize("scaling, warned", [(None, True), (2.0, False)])
def test_a_max_length_past_rotary_positions_is_warned_unless_rope_scaling_covers_it(tmp_path, caplog, scaling,
                                                                                   warned):
    """Rotary positions run past their trained length, so that is a warning, not an error; a rope scaling factor
    that covers the length (linear x2 on 64 positions: 128) is no warning at all."""
    rope = {"rope_type": "linear", "factor": scaling, "rope_theta": 10000.0} if scaling else None
    config = LlamaConfig(**SIZES, max_position_embeddings=64, **({"rope_parameters": rope} if rope else {}))
    folder = _saved(tmp_path / "llama", LlamaForCausalLM(config))
    llm = tiny_config(f"model.llm.name_or_path={folder}", "model.llm.max_length=128", stage="sft").model.llm
    with caplog.at_level(logging.WARNING, logger="vlm.models.llm"):
        build_llm(llm, new_tokenizer(llm))
    expected = ("model.llm.max_length=128 is more than the 64 positions LlamaForCausalLM was trained on "
                "(max_position_embeddings in its config)")
    assert (expected in caplog.text) == warned, caplog.text


def test_held_out_answers_stop_where_a_learned_position_table_ends(tmp_path, monkeypatch):
    """A held-out prompt as long as `max_length` (the longest the position check allows) leaves GPT-2 no room for
    eval.max_new_tokens: validation answers up to the table's end instead of failing with an IndexError."""
    from vlm.training.stages import get_stage
    from vlm.training.vlm_task import VLMTask

    torch.manual_seed(0)  # the random model's greedy answer, which must not end before the table does
    config = tiny_config(f"model.llm.name_or_path={_gpt2_folder(tmp_path, 128)}", "model.llm.max_length=128",
                         "eval.max_new_tokens=64", stage="sft")
    task = VLMTask.create(config, get_stage("sft"), None, None)
    prompt = task.bundle.processor.prompt([{"role": "user", "content": "<image>\n" + "Which colour? " * 5}],
                                          [solid((255, 0, 0))])
    room = 128 - len(prompt.input_ids)
    assert 0 < room < 64, room
    batch = pad_batch([prompt], task.bundle.tokenizer.pad_token_id, left=True)
    generated = []  # the new token ids of each generate call, which goes through to the model's own

    def generate(*args, **kwargs):
        generated.append(generate_of_the_model(*args, **kwargs))
        return generated[-1]

    generate_of_the_model = task.model.generate
    monkeypatch.setattr(task.model, "generate", generate)
    (answer,) = task.answer(batch)
    # the answer runs to the table's last position: every place left after the prompt holds one of its tokens
    assert [tuple(ids.shape) for ids in generated] == [(1, room)]
    assert answer and answer == task.bundle.tokenizer.decode(generated[0][0], skip_special_tokens=True)
    task.position_limit = None  # the control: uncapped, the random model writes on past the table
    with pytest.raises(IndexError):
        task.answer(batch)


def test_a_folder_without_tokenizer_files_is_named_by_its_key(tmp_path):
    (tmp_path / "empty").mkdir()
    llm = tiny_config(f"model.llm.name_or_path={tmp_path / 'empty'}", stage="sft").model.llm
    with pytest.raises(FileNotFoundError, match=rf"^model.llm.name_or_path='{tmp_path / 'empty'}': cannot load a "
                                                r"tokenizer from it"):
        new_tokenizer(llm)


def test_a_tokenizer_without_a_chat_template_ends_answers_where_the_template_ends_turns(tmp_path):
    """The ChatML template vlm falls back on ends each answer with <|im_end|>, which the model learns to write:
    generation stops there only if it is the EOS (the base model's EOS never ends an answer)."""
    tokenizer = prepare_tokenizer(build_local_tokenizer(["a red circle"], vocab_size=300).__class__.from_pretrained(
        _plain_tokenizer(tmp_path / "tok")))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "red"}], tokenize=False)
    assert "red<|im_end|>" in rendered
    # one with a template of its own and no EOS or pad token still gets a pad token to batch with
    bare = build_local_tokenizer(["a red circle"], vocab_size=300)
    bare.pad_token, bare.eos_token = None, None
    prepared = prepare_tokenizer(bare)
    assert prepared.pad_token == "<pad>" and prepared.pad_token_id is not None


def test_local_global_refuses_llms_whose_own_attention_it_would_drop(tmp_path, caplog):
    settings = tiny_config("model.llm.attention=local_global", stage="sft").model.llm
    windowed = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=16))
    with pytest.raises(ConfigError, match=r"model.llm.attention='local_global' cannot attend as MistralForCausalLM "
                                          r"does: its layers attend within a sliding window of their own "
                                          r"\(sliding_window=16\)"):
        use_attention(windowed, settings)
    use_attention(MistralForCausalLM(MistralConfig(**SIZES, sliding_window=None)), settings)  # no window: it attends
    # a window longer than the positions never takes effect (Phi-3.5: 262144 for 131072)
    use_attention(MistralForCausalLM(MistralConfig(**SIZES, sliding_window=512, max_position_embeddings=256)),
                  settings)
    hybrid = Lfm2ForCausalLM(Lfm2Config(**SIZES, layer_types=["conv", "full_attention"]))  # LFM2's convolutions
    with pytest.raises(ConfigError, match=r"model.llm.attention='local_global' cannot attend as Lfm2ForCausalLM "
                                          r"does: it has conv layers besides attention \(layer_types\)"):
        use_attention(hybrid, settings)
    dense = tiny_config("model.llm.sparse.window=24", stage="sft").model.llm
    with caplog.at_level(logging.WARNING, logger="vlm.models.attention"):
        use_attention(LlamaForCausalLM(LlamaConfig(**SIZES)), dense)
    assert "model.llm.sparse.* is set (window=24," in caplog.text and "has no effect" in caplog.text


def test_packing_sizes_rows_for_gpt2_style_configs():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=64, attn_implementation="sdpa"))
    # per token: q, k, v, o 4 x 32 x 32; an ungated MLP (n_inner=None: 4 x 32 wide) 2 x 32 x 128; attention
    # 2 x 4 heads x 8 dims per key
    assert attention_break_even(gpt2) == (4 * 32 * 32 + 2 * 32 * 128) / (2 * 4 * 8)


def test_chat_prompts_may_use_a_gpt2_style_llm_whole_position_table(tmp_path):
    """GPT-2 names its positions n_positions: chat reads them as the context, past the training max_length."""
    from vlm.chat import ChatModel
    from vlm.training.stages import get_stage
    from vlm.training.vlm_task import VLMTask

    config = tiny_config(f"model.llm.name_or_path={_gpt2_folder(tmp_path, 128)}", "model.llm.max_length=64",
                         stage="sft")
    bundle = VLMTask.create(config, get_stage("sft"), None, None).bundle
    chat = ChatModel(bundle.model, bundle.tokenizer, bundle.processor, torch.device("cpu"))
    assert (bundle.processor.max_length, chat.context_length) == (64, 128)


def _greedy_ids(bundle, prompt: dict, steps: int) -> list[int]:
    """The likeliest next token, `steps` times, from full forward passes: greedy decoding with nothing else."""
    ids = prompt["input_ids"]
    for _ in range(steps):
        logits = bundle.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt["pixel_values"],
                              image_slots=prompt["image_slots"]).logits[0, -1]
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, prompt["input_ids"].shape[1]:].tolist()


def test_an_llms_sampling_defaults_do_not_change_vlms_answers_and_an_export_keeps_its_end_ids(tmp_path):
    """A hub LLM's generation_config.json may hold sampling defaults (Qwen2.5-Instruct: repetition_penalty 1.05,
    top_p 0.8, top_k 20). vlm's own decoding settings decide, so greedy chat is plain greedy decoding, as in the
    Hugging Face export that carries only the token ids; the end-of-turn ids stay, on reload too, and an export that
    recorded such defaults drops them when loaded."""
    from vlm.chat import ChatModel
    from vlm.exports.format import CONFIG_FILE
    from vlm.exports.vlm import export_vlm, load_vlm

    torch.manual_seed(1)  # a random model whose greedy answer repeats itself, which the penalty would change
    llama = LlamaForCausalLM(LlamaConfig(**SIZES))
    llama.generation_config.update(repetition_penalty=3.0, top_p=0.8, top_k=20, do_sample=True, temperature=0.7,
                                   eos_token_id=[2, 7])
    config = tiny_config(f"model.llm.name_or_path={_saved(tmp_path / 'llama', llama)}", stage="sft")
    bundle = new_vlm(config.model, config.tiler)
    bundle.model.eval()  # as chat runs it (the conv stem's BatchNorm)
    kept = bundle.model.lm.generation_config
    assert (kept.eos_token_id, kept.repetition_penalty, kept.top_p, kept.top_k, kept.do_sample) == \
        ([2, 7], None, None, None, None)
    conversation, image = [{"role": "user", "content": "<image>\nWhat colour?"}], [solid((255, 0, 0))]
    prompt = pad_batch([bundle.processor.prompt(conversation, image)], bundle.tokenizer.pad_token_id)
    expected = _greedy_ids(bundle, prompt, 8)
    assert not {2, 7} & set(expected) and len(set(expected)) < 8  # runs to the end, and repeats a token
    chat = ChatModel(bundle.model, bundle.tokenizer, bundle.processor, torch.device("cpu"))
    assert chat.generate(conversation, image, max_new_tokens=8, temperature=0).token_ids == expected

    export = export_vlm(tmp_path / "export", bundle, "sft", config.tiler)
    meta = json.loads((export / CONFIG_FILE).read_text())
    meta["llm_generation_config"].update(repetition_penalty=3.0, top_k=20)  # as exports written before recorded them
    (export / CONFIG_FILE).write_text(json.dumps(meta))
    reloaded = load_vlm(export).model.lm.generation_config
    assert (reloaded.eos_token_id, reloaded.repetition_penalty, reloaded.top_k) == ([2, 7], None, None)
