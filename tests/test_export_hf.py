"""format=hf: an sft export of the tiny preset loads in stock transformers (remote code) with the same inputs, logits
and greedy answers as vlm; the README's snippets run as written; bad input is refused without a half folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import REGISTERED_VIT, contrastive_export, sft_export, tiny_config
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    PerceptionLMForConditionalGeneration,
    pipeline,
)

from benchmarks.llava_twin import llava_twin
from vlm.config import ConfigError
from vlm.data.processor import pad_batch
from vlm.export import ExportConfig, convert
from vlm.exports.format import PROVENANCE_FILE, ConversionError, ExportError
from vlm.exports.hf import export_hf
from vlm.exports.open_clip import export_open_clip
from vlm.exports.vlm import load_vlm
from vlm.models.factory import new_vlm

ROOT = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "<image>\nWhat color is the shape?"}]
# the settings PerceptionLM expresses: one patchify convolution, every patch token, no image slots
STOCK = ["model.vision.conv_stem=false", "model.projector.reduction=none", "model.projector.image_slots=0"]


@pytest.fixture(scope="module")
def hf_folder(tiny_sft_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "my-vlm-hf"
    convert(ExportConfig(checkpoint=str(tiny_sft_export), format="hf", out=str(out), hf_route="auto",
                         log_level="INFO"))
    return out


def picture(width: int = 90, height: int = 50) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_transformers_gives_the_same_inputs_logits_and_greedy_answer(tiny_sft_export, hf_folder):
    model = AutoModelForImageTextToText.from_pretrained(hf_folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(hf_folder, trust_remote_code=True)
    ours = load_vlm(tiny_sft_export)
    ours.model.eval()
    image = picture()  # not square: the letterbox padding must match too
    expected = ours.processor.prompt(QUESTION, [image])
    inputs = processor(images=[image], text=ours.processor.template.render(QUESTION, add_generation_prompt=True),
                       return_tensors="pt")
    assert torch.equal(inputs["input_ids"][0], expected.input_ids)
    assert torch.allclose(inputs["pixel_values"], expected.pixel_values, atol=1e-6)
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = ours.model(expected.input_ids[None], pixel_values=expected.pixel_values).logits
    assert (logits - reference).abs().max() < 1e-4
    assert type(AutoModel.from_pretrained(hf_folder, trust_remote_code=True)).__name__ == type(model).__name__
    theirs = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    mine = ours.model.generate(expected.input_ids[None], pixel_values=expected.pixel_values, max_new_tokens=6,
                               do_sample=False)
    assert torch.equal(theirs, mine)
    # two images: the second one's tokens get the second image slot, as vlm's batches number them
    two = [{"role": "user", "content": "<image>\nand <image>\nWhich one is red?"}]
    expected = pad_batch([ours.processor.prompt(two, [image, picture(40, 70)])], ours.tokenizer.pad_token_id)
    text = ours.processor.template.render(two, add_generation_prompt=True)
    inputs = processor(images=[image, picture(40, 70)], text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = ours.model(expected["input_ids"], pixel_values=expected["pixel_values"],
                               image_slots=expected["image_slots"]).logits
    assert (logits - reference).abs().max() < 1e-4
    # list-style messages (as pipelines send them) render as our "<image>\n" text does
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    assert processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=False) == \
        ours.processor.template.render(QUESTION, add_generation_prompt=True)
    provenance = json.loads((hf_folder / PROVENANCE_FILE).read_text())
    assert provenance["source"] == str(tiny_sft_export.resolve())
    assert "model.projector.image_slots=8" in provenance["remote_code_because"]


def test_a_towers_non_persistent_buffers_are_computed_again_when_transformers_loads_it(tmp_path):
    """EVA02's rotary tables are buffers the checkpoint does not hold; from_pretrained builds the model on the meta
    device, so the remote code must compute them again, or every logit is NaN."""
    eva = ["model.vision.name=eva02_tiny_patch14_224", "model.vision.image_size=56", "model.vision.patch_size=14",
           "model.vision.width=64", "model.vision.conv_stem=false", "model.vision.global_pool=null"]
    source = sft_export(tmp_path / "export", *eva)
    out = export_hf(source, tmp_path / "hf", route="remote_code")
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    ours = load_vlm(source)
    expected = ours.processor.prompt(QUESTION, [picture()])
    inputs = processor(images=[picture()], text=ours.processor.template.render(QUESTION, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = ours.model(expected.input_ids[None], pixel_values=expected.pixel_values).logits
    assert (logits - reference).abs().max() < 1e-4


def test_an_image_text_to_text_pipeline_answers(tiny_sft_export, hf_folder):
    chat = pipeline("image-text-to-text", model=str(hf_folder), trust_remote_code=True)
    image = picture()
    answer = chat(text=[{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": "What color is the shape?"}]}],
                  max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    ours = load_vlm(tiny_sft_export)
    ours.model.eval()
    prompt = ours.processor.prompt(QUESTION, [image])
    ids = ours.model.generate(prompt.input_ids[None], pixel_values=prompt.pixel_values, max_new_tokens=6,
                              do_sample=False)
    assert isinstance(answer, str) and answer == ours.tokenizer.decode(ids[0], skip_special_tokens=True)
    # batched (left-padded: the second question is longer), each answer as it is alone
    questions = ["What color is the shape?", "How many shapes are in this picture, and where is each one?"]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q}]}]
                     for q in questions]
    batched = chat(text=conversations, batch_size=2, max_new_tokens=6, return_full_text=False)
    alone = [chat(text=c, max_new_tokens=6, return_full_text=False)[0]["generated_text"] for c in conversations]
    assert [out[0]["generated_text"] for out in batched] == alone


def test_the_readme_snippets_run_as_written(hf_folder, tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use your model elsewhere", 1)[1].split("\n## ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) == 2
    monkeypatch.chdir(tmp_path)
    os.symlink(hf_folder, tmp_path / "my-vlm-hf")
    export_open_clip(contrastive_export(tmp_path / "clip", *REGISTERED_VIT), tmp_path / "my-clip")
    picture(160, 160).save(tmp_path / "shape.png")
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] in ("a red circle", "a blue square")  # the open_clip snippet's zero-shot label
    assert len(printed) > 2  # the two answers of the hf snippet came first (a random model may answer blank lines)


def test_settings_that_map_load_in_stock_perception_lm_without_remote_code(tmp_path):
    source = sft_export(tmp_path / "export", *STOCK)
    out = export_hf(source, tmp_path / "hf")
    assert not list(out.glob("*.py")) and "auto_map" not in json.loads((out / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(out).eval()  # trust_remote_code stays off
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(model, PerceptionLMForConditionalGeneration)
    ours = load_vlm(source)
    ours.model.eval()
    image = picture(100, 100)  # square: resized to the tile as our tiler does (other shapes are stretched)
    expected = ours.processor.prompt(QUESTION, [image])
    inputs = processor(images=[image], text=ours.processor.template.render(QUESTION, add_generation_prompt=True),
                       return_tensors="pt")
    assert torch.equal(inputs["input_ids"][0], expected.input_ids)
    assert torch.allclose(inputs["pixel_values"][0], expected.pixel_values, atol=1e-6)  # (1 image, 1 tile, 3, S, S)
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = ours.model(expected.input_ids[None], pixel_values=expected.pixel_values).logits
    assert (logits - reference).abs().max() < 1e-4
    theirs = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(theirs, ours.model.generate(expected.input_ids[None], pixel_values=expected.pixel_values,
                                                   max_new_tokens=6, do_sample=False))
    answer = pipeline("image-text-to-text", model=str(out))(
        text=[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Color?"}]}],
        max_new_tokens=3, return_full_text=False)[0]["generated_text"]
    assert isinstance(answer, str)
    assert json.loads((out / PROVENANCE_FILE).read_text())["hf_route"] == "stock"


def test_the_stock_route_refuses_settings_it_cannot_express(tiny_sft_export, tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match=r"hf_route=stock: .*model.vision.conv_stem=True.*image_slots=8"):
        export_hf(tiny_sft_export, tmp_path / "out", route="stock")
    assert not (tmp_path / "out").exists()
    # PerceptionLM puts transparent pixels on white: another background needs the remote code
    source = sft_export(tmp_path / "export", *STOCK, "tiler.background=[0,0,0]")
    with pytest.raises(ConversionError, match=r"hf_route=stock: no stock transformers class takes "
                                              r"tiler.background=\[0, 0, 0\]"):
        export_hf(source, tmp_path / "out", route="stock")
    # auto then takes the remote code, into an empty folder the shell stands in: filled in place, not replaced
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    export_hf(source, Path("."))
    assert "modeling_vlm.py" in os.listdir(".")  # the shell's own folder, not one renamed onto its path


@pytest.mark.parametrize(("overrides", "named"), [
    (["model.vision.keep_cls=true"], "model.vision.keep_cls=true (PerceptionLM reads the patch tokens only)"),
    (["model.vision.name=deit_tiny_distilled_patch16_224", "model.vision.patch_size=16", "model.vision.image_size=32",
      "model.vision.global_pool=null"],
     "a tower with 2 prefix tokens (distillation or register tokens beside the CLS token)"),
])
def test_the_stock_route_names_the_cls_and_prefix_tokens_perception_lm_cannot_read(tmp_path, overrides, named):
    source = sft_export(tmp_path / "export", *STOCK, *overrides)
    with pytest.raises(ConversionError, match=re.escape(named)):
        export_hf(source, tmp_path / "hf", route="stock")


def _llm_folder(folder: Path, case: str) -> Path:
    """A tiny random LLM that PerceptionLM would read otherwise than vlm, saved with a tokenizer."""
    from tokenizers import processors
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        PhiConfig,
        PhiForCausalLM,
    )

    from vlm.data import synthetic
    from vlm.data.tokenizer import build_local_tokenizer

    tokenizer = build_local_tokenizer(list(synthetic.corpus()))
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1100}
    torch.manual_seed(0)
    if case == "projected embeddings":  # OPT-350m: 32-wide embeddings projected to the 64-wide hidden size
        model = OPTForCausalLM(OPTConfig(**sizes, ffn_dim=128, word_embed_proj_dim=32))
    elif case == "soft-capped logits":  # Gemma 2
        model = Gemma2ForCausalLM(Gemma2Config(**sizes, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                               final_logit_softcapping=30.0))
    elif case == "scaled logits":  # Cohere multiplies its logits by logit_scale after lm_head
        model = CohereForCausalLM(CohereConfig(**sizes, intermediate_size=128, num_key_value_heads=2,
                                               logit_scale=0.25))
    elif case == "output bias":  # Phi-2's lm_head has a bias
        model = PhiForCausalLM(PhiConfig(**sizes, intermediate_size=128))
    else:  # a BOS added by the tokenizer to every text (Llama 3)
        bos = "<|endoftext|>"
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
        tokenizer.bos_token = bos
        model = LlamaForCausalLM(LlamaConfig(**sizes, intermediate_size=128, num_key_value_heads=2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("case", ["projected embeddings", "soft-capped logits", "scaled logits", "output bias",
                                  "tokenizer adds a BOS"])
def test_llms_perception_lm_would_read_otherwise_take_the_remote_code_and_give_vlms_logits(tmp_path, case):
    """Each would load in PerceptionLM and answer otherwise, or not load: a projector sized for the hidden size
    (OPT-350m's does not fit), logits without Gemma 2's soft cap or Cohere's scale, no output bias (Phi-2), a second
    BOS from its processor."""
    folder = _llm_folder(tmp_path / "llm", case)
    source = sft_export(tmp_path / "export", *STOCK, f"model.llm.name_or_path={folder}")
    out = export_hf(source, tmp_path / "hf")
    because = json.loads((out / PROVENANCE_FILE).read_text())["remote_code_because"]
    reason = {"projected embeddings": "input embeddings are 32 wide, not its hidden size 64",
              "soft-capped logits": "scales or soft-caps its logits", "scaled logits": "scales or soft-caps its logits",
              "output bias": "output layer has a bias", "tokenizer adds a BOS": "adds special tokens"}[case]
    assert any(reason in item for item in because), because
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    ours = load_vlm(source)
    ours.model.eval()
    expected = ours.processor.prompt(QUESTION, [picture()])
    inputs = processor(images=[picture()], text=ours.processor.template.render(QUESTION, add_generation_prompt=True),
                       return_tensors="pt")
    assert torch.equal(inputs["input_ids"][0], expected.input_ids)
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = ours.model(expected.input_ids[None], pixel_values=expected.pixel_values).logits
    assert (logits - reference).abs().max() < 1e-4


def test_our_model_gives_the_logits_of_llava_built_at_the_same_sizes():
    """litgpt-style: LLaVA with our weights copied across (a CLIP-shaped timm ViT, LLaVA's penultimate layer)."""
    config = tiny_config(*STOCK, "model.vision.name=vit_base_patch16_clip_224", "model.vision.image_size=32",
                         "model.vision.global_pool=null",
                         "model.vision.feature_layer=-2", stage="sft")
    torch.manual_seed(0)
    ours = new_vlm(config.model, config.tiler).model.eval()
    with torch.no_grad():  # timm's small init makes attention near-uniform, which would hide a q/k mix-up
        for parameter in ours.vision.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    llava = llava_twin(ours, copy_vision=True).eval()
    ids = torch.tensor([[5, 6, 7] + [ours.image_token_id] * ours.tokens_per_tile + [8, 9, 10, 11]])  # (1, L)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        difference = (ours(ids, pixel_values=pixels).logits - llava(input_ids=ids, pixel_values=pixels).logits)
    assert difference.abs().max() < 1e-4


def test_bad_input_is_refused_by_name_without_a_half_folder(tiny_sft_export, tmp_path):
    contrastive = contrastive_export(tmp_path / "clip", *REGISTERED_VIT)
    with pytest.raises(ConversionError, match="holds a 'contrastive' model; format=hf takes an align, sft or dpo"):
        export_hf(contrastive, tmp_path / "out")
    mid = sft_export(tmp_path / "mid", "tiler=mid")
    with pytest.raises(ConversionError, match="tiler.max_tiles=4"):
        export_hf(mid, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        export_hf(tiny_sft_export, tmp_path / "busy")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["keep.txt"]
    with pytest.raises(ConversionError, match=r"keep.txt' is a file, so no folder can be made inside it"):
        export_hf(tiny_sft_export, tmp_path / "busy" / "keep.txt" / "sub")  # refused before the model loads
    with pytest.raises(ConversionError, match=r"out='/proc/vlm-export': cannot make a folder beside it"):
        export_hf(tiny_sft_export, "/proc/vlm-export")  # a file system that makes no folders
    with pytest.raises(ConfigError, match="out=DIR is required"):
        convert(ExportConfig(checkpoint=str(tiny_sft_export), format="hf", out=None, hf_route="auto",
                             log_level="INFO"))
    with pytest.raises(ExportError, match=r"^checkpoint='/no/such/export' does not exist: give an export folder"):
        convert(ExportConfig(checkpoint="/no/such/export", format="open_clip", out=str(tmp_path / "x"),
                             hf_route="auto", log_level="INFO"))


def test_batches_beams_and_image_files_give_each_prompt_its_own_images(tiny_sft_export, hf_folder, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(hf_folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(hf_folder, trust_remote_code=True)
    ours = load_vlm(tiny_sft_export)
    two = [{"role": "user", "content": "<image>\nand <image>\nWhich one is red?"}]
    prompts = [(two, [picture(), picture(40, 70)]), (QUESTION, [picture(30, 30)])]
    texts = [ours.processor.template.render(messages, add_generation_prompt=True) for messages, _ in prompts]
    batch = processor(images=[im for _, images in prompts for im in images], text=texts, return_tensors="pt")
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate counts them past left padding
    with torch.no_grad():
        last = model(**batch, position_ids=positions).logits[:, -1]  # (2, V): each row ends with its own prompt
        for row, (text, (_, images)) in enumerate(zip(texts, prompts, strict=True)):
            alone = model(**processor(images=images, text=text, return_tensors="pt")).logits[0, -1]
            assert (last[row] - alone).abs().max() < 1e-4
        # beams and num_return_sequences copy each prompt: its copies must see its own two images
        ids, kwargs = model._expand_inputs_for_generation(2, input_ids=batch["input_ids"], **{
            k: v for k, v in batch.items() if k != "input_ids"})
        copies = model(input_ids=ids, position_ids=positions.repeat_interleave(2, dim=0), **kwargs).logits[:, -1]
    assert (copies - last.repeat_interleave(2, dim=0)).abs().max() < 1e-4
    # an image file, turned by its EXIF orientation, as vlm's tiler reads it
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    picture(30, 20).save(turned, exif=exif, quality=95)
    # ... and any mode, as the tiler reads it: 16-bit greys scaled (converting to RGB would clip them at 255)
    deep = Image.fromarray((np.arange(30 * 20).reshape(20, 30) * 100).astype(np.uint16))
    for image in (str(turned), deep):
        inputs = processor(images=[image], text=texts[1], return_tensors="pt")
        assert torch.allclose(inputs["pixel_values"], ours.processor.prompt(QUESTION, [image]).pixel_values,
                              atol=1e-6)
    # arrays in the layouts transformers' image processors take: channels first, floats in [0, 1], tensors
    colours = np.asarray(picture(30, 20))  # (H, W, 3) uint8
    expected = ours.processor.prompt(QUESTION, [Image.fromarray(colours)]).pixel_values
    for image in (colours.transpose(2, 0, 1), colours / 255.0, torch.from_numpy(colours.transpose(2, 0, 1).copy())):
        inputs = processor(images=[image], text=texts[1], return_tensors="pt")
        assert torch.allclose(inputs["pixel_values"], expected, atol=1e-6), type(image)


def test_a_folder_of_the_users_beside_the_output_is_left_alone(tiny_sft_export, tmp_path):
    (tmp_path / "res.partial").mkdir()
    (tmp_path / "res.partial" / "notes.txt").write_text("mine")
    export_hf(tiny_sft_export, tmp_path / "res")
    assert (tmp_path / "res.partial" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res", "res.partial"]


def test_a_model_trained_with_local_global_attention_is_exported_with_a_note(tmp_path, caplog):
    """transformers has no local + global attention: the export attends densely, which is the same pattern only up
    to the window; the log and the provenance say so."""
    trained = sft_export(tmp_path / "sparse", "model.llm.attention=local_global", "model.llm.sparse.window=8",
                         "model.llm.sparse.stride=4", "model.llm.sparse.sinks=1")
    with caplog.at_level("WARNING", logger="vlm.export"):
        out = export_hf(trained, tmp_path / "hf")
    note = json.loads((out / PROVENANCE_FILE).read_text())["attention"]
    assert note in caplog.text
    assert "window 8, stride 4, sinks 1" in note and "answers as vlm does for sequences up to 8 tokens" in note


def test_exported_files_have_the_umasks_permissions(tiny_sft_export, hf_folder):
    """safetensors writes owner-only files; an export is meant to be shared (another user, a container), so every
    file gets what the umask gives a new file (0644 under the usual 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    for folder in (tiny_sft_export, hf_folder):
        modes = {str(p.relative_to(folder)): oct(p.stat().st_mode & 0o777) for p in folder.rglob("*") if p.is_file()}
        assert "model.safetensors" in modes
        assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_the_processor_pads_as_asked_and_refuses_a_truncation_that_would_cut_an_image(tiny_sft_export, hf_folder):
    processor = AutoProcessor.from_pretrained(hf_folder, trust_remote_code=True)
    text = load_vlm(tiny_sft_export).processor.template.render(QUESTION, add_generation_prompt=True)
    alone = processor(images=[picture()], text=text, return_tensors="pt")["input_ids"]
    padded = processor(images=[picture()], text=text, return_tensors="pt", padding="max_length",
                       max_length=alone.shape[1] + 7)
    assert padded["input_ids"].shape == (1, alone.shape[1] + 7) and padded["attention_mask"].sum() == alone.shape[1]
    multiple = processor(images=[picture()], text=text, return_tensors="pt", pad_to_multiple_of=64)
    assert multiple["input_ids"].shape[1] % 64 == 0
    with pytest.raises(ValueError, match=f"truncation to max_length=5 would cut a prompt of {alone.shape[1]} tokens"):
        processor(images=[picture()], text=text, return_tensors="pt", truncation=True, max_length=5)
    fits = processor(images=[picture()], text=text, return_tensors="pt", truncation=True, max_length=alone.shape[1])
    assert torch.equal(fits["input_ids"], alone)


def test_a_killed_writers_staging_folder_is_removed_by_the_next_writer(tmp_path):
    """`vlm.export` killed before its rename (SIGKILL, SIGTERM) left `.OUT.<pid>-<id>.partial`, possibly gigabytes,
    that nothing removed. The next writer of OUT removes the staging folders of writers no longer running, and leaves
    a running writer's and every other folder alone."""
    import subprocess
    import sys

    from vlm.exports.format import new_staging_folder

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    final = tmp_path / "hf"
    abandoned = tmp_path / f".hf.{gone.pid}-0123456789ab.partial"
    running = tmp_path / f".hf.{os.getpid()}-ba9876543210.partial"
    other = tmp_path / f".hf2.{gone.pid}-0123456789ab.partial"  # another output's
    for folder in (abandoned, running, other):
        (folder / "weights").mkdir(parents=True)
    staging = new_staging_folder(final)
    assert staging.is_dir() and staging.name.startswith(f".hf.{os.getpid()}-")
    assert not abandoned.exists() and running.is_dir() and other.is_dir()
