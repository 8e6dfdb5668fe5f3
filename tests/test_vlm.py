"""The vision-language model: the image-token merge, the wrapper's transparency, checkpointing and freezing."""

from __future__ import annotations

import re

import pytest
import torch
from tiny import make_task, tiny_config

from vlm.config import ConfigError
from vlm.models.factory import new_vlm
from vlm.models.reduction import TokenReducer
from vlm.training.freezing import apply_freezing, trainable_parts
from vlm.training.stages import get_stage


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    config = tiny_config(stage="sft")
    return new_vlm(config.model, config.tiler)


def _inputs(bundle, n_images: int = 2):
    """Two turns, two images in different turns, plus text after each image."""
    messages = [{"role": "user", "content": "<image>\nWhat color is the shape?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And here? <image> Which shape?"},
                {"role": "assistant", "content": "star"}]
    from PIL import Image

    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")][:n_images]
    return bundle.processor.encode(messages, images, name="two-turn")


def test_merge_puts_each_image_at_its_placeholders(bundle):
    encoded = _inputs(bundle)
    model = bundle.model
    ids = encoded.input_ids[None]  # (1, L)
    embeds = model.embed(ids, encoded.pixel_values)  # (1, L, D)
    features = model.image_features(encoded.pixel_values)  # (2 * T, D)
    positions = (ids[0] == model.image_token_id).nonzero().squeeze(1)
    tokens = model.tokens_per_tile
    assert len(positions) == 2 * tokens == sum(encoded.image_tokens)
    # image 0's run comes first in the text and gets image 0's features plus slot 0 times each token's RMS; image 1's
    # second, with slot 1
    slots = model.image_slot_embeddings.weight  # (8, D)
    rms = features.pow(2).mean(-1, keepdim=True).sqrt()  # (2 * T, 1)
    assert torch.allclose(embeds[0, positions[:tokens]], features[:tokens] + slots[0] * rms[:tokens], atol=1e-6)
    assert torch.allclose(embeds[0, positions[tokens:]], features[tokens:] + slots[1] * rms[tokens:], atol=1e-6)
    assert positions[tokens] - positions[tokens - 1] > 1  # the two runs are separated by text
    text_rows = ids[0] != model.image_token_id
    assert torch.equal(embeds[0, text_rows], model.lm.get_input_embeddings()(ids[0, text_rows]))


def test_image_slots_tell_the_images_of_a_sample_apart(bundle):
    """Two identical pictures in one sample: their tokens differ by exactly the slot embeddings, so a token copied
    by attention still says which image it came from. pad_batch numbers the images per sample."""
    import copy

    from PIL import Image

    from vlm.data.processor import pad_batch

    model = copy.deepcopy(bundle.model)
    torch.nn.init.normal_(model.image_slot_embeddings.weight)
    same = [Image.new("RGB", (64, 64), "red")] * 2
    two = bundle.processor.encode([{"role": "user", "content": "<image><image> Which one is red?"},
                                   {"role": "assistant", "content": "both"}], same, name="adjacent")
    one = bundle.processor.encode([{"role": "user", "content": "<image> Color?"},
                                   {"role": "assistant", "content": "red"}], same[:1], name="one")
    tokens = model.tokens_per_tile
    batch = pad_batch([one, two], pad_id=0)
    assert batch["image_slots"].tolist() == [0] * tokens + [0] * tokens + [1] * tokens

    ids = two.input_ids[None]
    embeds = model.embed(ids, two.pixel_values, batch["image_slots"][tokens:])
    rows = embeds[0, ids[0] == model.image_token_id]  # (2T, D)
    slot = model.image_slot_embeddings.weight
    rms = model.image_features(one.pixel_values).pow(2).mean(-1, keepdim=True).sqrt()  # (T, 1)
    assert torch.allclose(rows[tokens:] - rows[:tokens], (slot[1] - slot[0]) * rms, atol=1e-5)
    # without explicit slots, runs of image tokens count as images: adjacent placeholders merge into one run
    assert torch.equal(model.embed(ids, two.pixel_values), model.embed(ids, two.pixel_values, torch.zeros_like(
        batch["image_slots"][tokens:])))
    separated = _inputs(bundle)
    slots = pad_batch([separated], pad_id=0)["image_slots"]
    assert torch.equal(model.embed(separated.input_ids[None], separated.pixel_values),
                       model.embed(separated.input_ids[None], separated.pixel_values, slots))
    # more images than slots: the extra ones share the last slot
    many = torch.full((tokens,), 50)
    last = model.embed(one.input_ids[None], one.pixel_values, many)
    assert torch.equal(last, model.embed(one.input_ids[None], one.pixel_values, torch.full((tokens,), 7)))


def test_the_slot_mark_keeps_its_share_of_growing_features(bundle):
    """Projected features grow during training (norms of 13-20 in the tiny preset); a slot that scales with each
    token's RMS stays the same share of it, where an unscaled one would be buried. Exports written before
    `image_slot_scale` existed load with the unscaled slots they were trained with."""
    import copy

    from vlm.config import model_config_from, to_dict
    from vlm.models.vlm import VisionLanguageModel

    encoded = _inputs(bundle)
    ids, pixels = encoded.input_ids[None], encoded.pixel_values
    is_image = ids[0] == bundle.model.image_token_id

    def slot_mark(model) -> torch.Tensor:  # (2T, D): what the slots add to the image rows
        return model.embed(ids, pixels)[0, is_image] - model.image_features(pixels)

    model = copy.deepcopy(bundle.model)
    before = slot_mark(model).norm(dim=-1) / model.image_features(pixels).norm(dim=-1)  # (2T,)
    with torch.no_grad():
        model.projector[-1].weight.mul_(10)
        model.projector[-1].bias.mul_(10)
    after = slot_mark(model).norm(dim=-1) / model.image_features(pixels).norm(dim=-1)
    assert torch.allclose(before, after, rtol=1e-4)

    recorded = to_dict(bundle.model.config)
    del recorded["projector"]["image_slot_scale"]
    earlier = model_config_from(recorded)
    assert earlier.projector.image_slot_scale == "embedding"
    earlier_model = VisionLanguageModel(earlier, model.lm, model.image_token_id)
    earlier_model.load_state_dict(model.state_dict())
    slots = model.image_slot_embeddings.weight
    tokens = model.tokens_per_tile
    assert torch.allclose(slot_mark(earlier_model)[:tokens], slots[0].expand(tokens, -1), atol=1e-5)


def test_merge_count_mismatch_raises(bundle):
    encoded = _inputs(bundle)
    tokens = bundle.model.tokens_per_tile  # two images' placeholders, one image's tile
    with pytest.raises(ValueError, match=rf"^the batch has {2 * tokens} image-token positions but its images give "
                                         rf"{tokens} image features \({tokens} per tile\)"):
        bundle.model.embed(encoded.input_ids[None], encoded.pixel_values[:1])


def test_a_batch_of_no_tiles_runs_the_tower_with_sdpas_math_kernel_alone(bundle):
    """Text-only batches and fully cached ones still run the tower (FSDP's ranks must stay in step), and their attention
    runs on SDPA's math kernel: CUDA's flash and cuDNN kernels fail on a batch of 0, and torch 2.11's returned None for
    it. Batches with tiles keep every kernel."""
    vision = bundle.model.vision
    seen = []  # (batch size, flash allowed, cuDNN allowed) at the first block
    hook = vision.vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(
        (len(args[0]), torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())))
    try:
        size = bundle.processor.tiler.tile_size
        features = vision.patch_features(torch.zeros(0, 3, size, size))
        one = vision.patch_features(torch.zeros(1, 3, size, size))
        ids = torch.randint(0, 400, (2, 12))
        text_only = bundle.model(ids, torch.ones_like(ids), torch.zeros(0, 3, size, size), ids.clone())
    finally:
        hook.remove()
    assert features.shape == (0, *one.shape[1:])
    assert seen == [(0, False, False), (1, True, True), (0, False, False)]
    assert torch.isfinite(text_only.loss) and torch.backends.cuda.flash_sdp_enabled()  # restored after the call


def test_without_images_the_wrapper_equals_the_plain_llm(bundle):
    torch.manual_seed(1)
    ids = torch.randint(0, 400, (2, 12))
    labels = ids.clone()
    ours = bundle.model(ids, torch.ones_like(ids), None, labels)
    plain = bundle.model.lm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert torch.allclose(ours.logits, plain.logits)
    assert torch.allclose(ours.loss, plain.loss)


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = new_vlm(tiny_config(stage="sft").model, tiny_config(stage="sft").tiler)
    checkpointed = new_vlm(tiny_config("model.llm.gradient_checkpointing=true",
                                       "model.vision.gradient_checkpointing=true", stage="sft").model,
                           tiny_config(stage="sft").tiler)
    checkpointed.model.load_state_dict(plain.model.state_dict())
    assert checkpointed.model.lm.is_activation_checkpointing and not plain.model.lm.is_activation_checkpointing
    assert checkpointed.model.vision.vit.grad_checkpointing
    encoded = _inputs(plain)
    grads = []
    for b in (plain, checkpointed):
        b.model.train()
        out = b.model(encoded.input_ids[None], None, encoded.pixel_values, encoded.labels[None])
        out.loss.backward()
        named = b.model.named_parameters()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in named if p.grad is not None}))
    assert torch.allclose(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys() and len(grads[0][1]) > 10
    for name, grad in grads[0][1].items():
        assert torch.allclose(grad, grads[1][1][name], atol=1e-6), name


@pytest.mark.parametrize("stage,trained", [("align", {"projector"}), ("sft", {"projector", "llm"})])
def test_each_stage_freezes_what_its_table_says(bundle, stage, trained):
    config = tiny_config(stage=stage)
    counts = apply_freezing(bundle.model.parts(), trainable_parts(get_stage(stage).trains, config.stage))
    for part, module in bundle.model.parts().items():
        flags = {p.requires_grad for p in module.parameters()}
        assert flags == {part in trained}, part
        assert counts[part][0] == (counts[part][1] if part in trained else 0)


def test_stage_override_unfreezes_vision(bundle):
    config = tiny_config("stage.train_vision=true", stage="sft")
    assert trainable_parts(get_stage("sft").trains, config.stage) == {"vision", "projector", "llm"}



@pytest.mark.parametrize("feature_layer", [-1, -2, 0])
def test_every_parameter_phase_2_trains_gets_a_gradient(feature_layer):
    """DDP (find_unused_parameters=False) needs a gradient for every trainable parameter: with the ViT training, its
    pooling head and the blocks past the feature layer never train, and they are left out of the counts."""
    config = tiny_config("stage.train_vision=true", f"model.vision.feature_layer={feature_layer}", stage="sft")
    task = make_task(config)
    encoded = _inputs(task.bundle)
    task.model(encoded.input_ids[None], None, encoded.pixel_values, encoded.labels[None]).loss.backward()
    trained = {name for name, p in task.model.named_parameters() if p.requires_grad}
    assert trained == {name for name, p in task.model.named_parameters() if p.grad is not None}
    vision = {name.removeprefix("vision.") for name in trained if name.startswith("vision.")}
    assert "vit.blocks.0.attn.qkv.weight" in vision and not any(n.startswith("vit.fc_norm") for n in vision)
    depth = len(task.model.vision.vit.blocks)
    last = feature_layer % depth
    assert any(n.startswith(f"vit.blocks.{last}.") for n in vision)
    assert not any(n.startswith(f"vit.blocks.{last + 1}.") for n in vision)
    idle = sum(p.numel() for p in task.model.idle_parameters())
    assert idle > 0 and task.parameter_counts["vision"][0] == task.parameter_counts["vision"][1] - idle


def test_a_feature_layer_past_the_vits_blocks_is_named():
    with pytest.raises(ConfigError, match=r"model.vision.feature_layer=2 is not a block of vit_tiny_patch16_224 "
                                          r"\(2 blocks\): use 0 to 1, or -1 \(the last\) to -2"):
        make_task(tiny_config("model.vision.feature_layer=2", stage="sft"))

@pytest.mark.parametrize("kind,width", [("pixel_shuffle", 4 * 8), ("avg_pool", 8), ("none", 8)])
def test_token_reduction_reads_each_block_of_patches_in_order(kind, width):
    reducer = TokenReducer(kind, 2)
    tokens = torch.arange(2 * 16 * 8, dtype=torch.float).reshape(2, 16, 8)  # (B, 4x4 grid, D)
    out = reducer(tokens)
    assert out.shape == (2, reducer.out_tokens(16), width)
    # output token (row i, column j) of the 2x2 grid reads the 2x2 block of patches at rows 2i, 2i+1 and columns
    # 2j, 2j+1 of the 4x4 grid, its patches in row-major order: pixel shuffle concatenates them, pooling averages
    for sample in range(2):
        for i in range(2):
            for j in range(2):
                block = [tokens[sample, (2 * i + di) * 4 + 2 * j + dj] for di in range(2) for dj in range(2)]
                token = out[sample, 2 * i + j]
                if kind == "pixel_shuffle":
                    assert torch.equal(token, torch.cat(block)), (sample, i, j)
                elif kind == "avg_pool":
                    assert torch.allclose(token, torch.stack(block).mean(dim=0)), (sample, i, j)
    if kind == "none":
        assert torch.equal(out, tokens)


def test_frozen_parts_stay_in_eval_mode_while_training():
    config = tiny_config("model.vision.conv_stem=true", stage="sft")
    task = make_task(config)
    task.train()
    assert not task.model.vision.training  # BatchNorm in the frozen conv stem keeps its statistics
    assert task.model.lm.training and task.model.projector.training


def test_loss_counts_assistant_tokens_only(bundle):
    encoded = _inputs(bundle)
    out = bundle.model(encoded.input_ids[None], None, encoded.pixel_values, encoded.labels[None])
    logits = out.logits[0, :-1]  # (L-1, V): position t predicts token t+1
    targets = encoded.labels[1:]
    kept = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert 0 < kept.sum() < len(targets) / 4  # the replies are a small part of the sequence


@pytest.mark.parametrize("tied", [True, False])
def test_an_export_loads_back_exactly(tmp_path, tied):
    """load_vlm skips the random init (every weight comes from the file, strictly), so nothing may be left out:
    every tensor comes back, tied embeddings come back tied, and the logits are the same."""
    from vlm.exports.vlm import export_vlm, load_vlm

    torch.manual_seed(0)
    config = tiny_config(f"model.llm.config.tie_word_embeddings={str(tied).lower()}", stage="sft")
    original = new_vlm(config.model, config.tiler)
    loaded = load_vlm(export_vlm(tmp_path / "export", original, "sft", config.tiler))
    mine, theirs = original.model.state_dict(), loaded.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    lm = loaded.model.lm
    assert (lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()) == tied
    encoded = _inputs(original)
    with torch.no_grad():
        logits = [b.model.eval()(encoded.input_ids[None], None, encoded.pixel_values).logits
                  for b in (original, loaded)]
    assert torch.equal(logits[0], logits[1])


def test_a_loaded_export_sees_each_image_alone_whatever_else_is_in_the_batch(tmp_path):
    """An export loads ready to answer: in eval mode, so the conv stem's BatchNorm uses its running statistics and an
    image's features do not depend on the other images of the batch."""
    from vlm.exports.vlm import export_vlm, load_vlm

    torch.manual_seed(0)
    config = tiny_config("model.vision.conv_stem=true", stage="sft")
    loaded = load_vlm(export_vlm(tmp_path / "export", new_vlm(config.model, config.tiler), "sft", config.tiler))
    size = config.model.vision.image_size
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        alone = loaded.model.vision.patch_features(images[:1])
        together = loaded.model.vision.patch_features(images)[:1]
    torch.testing.assert_close(alone, together)


def test_a_run_continuing_an_export_names_the_model_settings_it_cannot_apply(tmp_path, caplog):
    from tiny import sft_export

    export = sft_export(tmp_path / "sft")
    with caplog.at_level("WARNING", logger="vlm.training.vlm_task"):
        make_task(tiny_config(stage="sft"), init_from=export)  # the export's own settings: nothing to say
        assert not caplog.records
        config = tiny_config("model.llm.config.num_attention_heads=4", "model.llm.attention=local_global",
                             stage="sft")
        task = make_task(config, init_from=export)
    assert len(caplog.records) == 1, caplog.text  # the attention pattern is a run setting, and applies
    assert "model.llm.config.num_attention_heads=4 is ignored: this run starts from" in caplog.text
    assert "built with 2" in caplog.text
    assert task.bundle.model.lm.config.num_attention_heads == 2
    # the run's config (its config.json) records what it trained: the export's heads, this run's attention
    assert config.model.llm.config["num_attention_heads"] == 2 and config.model.llm.attention == "local_global"
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlm.training.vlm_task"):  # another LLM: the export's is trained on
        make_task(tiny_config(f"model.llm.name_or_path={tmp_path / 'my-llm'}", stage="sft"), init_from=export)
    assert f"model.llm.name_or_path='{tmp_path / 'my-llm'}' is ignored: this run starts from" in caplog.text


@pytest.fixture
def command_line(monkeypatch):
    """Gives this process a Hydra entry point's command line: the config composed with those arguments, recorded
    where Hydra records the one it runs with. Afterwards the process is outside any Hydra app again."""
    from hydra.core.hydra_config import HydraConfig

    from vlm.cli import compose_config

    hydra_config = HydraConfig.instance()
    monkeypatch.setattr(hydra_config, "cfg", None)

    def given(config_name: str, args: list[str]) -> None:
        hydra_config.set_config(compose_config(config_name, args, return_hydra_config=True))

    return given


def test_the_keys_set_on_the_command_line_are_read_from_hydra(command_line):
    """Each key or group an argument sets, an added (+) or deleted (~) one by its name; none outside a Hydra app."""
    from vlm.cli import command_line_keys

    assert command_line_keys() is None
    command_line("eval", ["checkpoint=/x", "stage=sft", "model.llm.config.num_attention_heads=4",
                          "+model.llm.config.rope_theta=5.0", "~eval.turns", "data.val='/d/shard-{0..1}.tar'",
                          "eval.templates=['{}']"])
    assert command_line_keys() == {"checkpoint", "stage", "model.llm.config.num_attention_heads",
                                   "model.llm.config.rope_theta", "eval.turns", "data.val", "eval.templates"}


def test_only_the_model_keys_given_on_the_command_line_are_warned_about(tmp_path, caplog, command_line):
    """A preset's own defaults that differ from the export's are no mistake of the user's: only the keys the command
    line set are named (here it set the heads, and the preset the length)."""
    from tiny import sft_export

    export = sft_export(tmp_path / "sft")
    command_line("train", ["stage=sft", "model.llm.config.num_attention_heads=4"])
    config = tiny_config("model.llm.config.num_attention_heads=4", "model.llm.max_length=100", stage="sft")
    with caplog.at_level("WARNING", logger="vlm.training.vlm_task"):
        make_task(config, init_from=export)
    assert len(caplog.records) == 1 and "num_attention_heads=4 is ignored" in caplog.text, caplog.text
    assert config.model.llm.max_length != 100 and config.model.llm.config["num_attention_heads"] == 2


def test_phase_2_takes_the_vit_architecture_of_its_contrastive_export(tmp_path, caplog):
    from tiny import contrastive_export

    export = contrastive_export(tmp_path / "clip", "model.vision.global_pool=token")
    with caplog.at_level("WARNING", logger="vlm.training.vlm_task"):
        task = make_task(tiny_config("model.vision.global_pool=avg", stage="align"), init_from=export)
    assert "model.vision.global_pool='avg' is ignored" in caplog.text and "built with 'token'" in caplog.text
    assert task.bundle.model.vision.num_prefix_tokens == 1  # the export's CLS token, with its trained weights
    assert "starts from the contrastive export" not in caplog.text  # align is the stage that does so
    # which block feeds the projector, and whether with the CLS token, is the new projector's choice, not the ViT's
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlm.training.vlm_task"):
        task = make_task(tiny_config("model.vision.global_pool=token", "model.vision.feature_layer=-2",
                                     "model.vision.keep_cls=true", "model.projector.reduction=none",
                                     "model.vision.gradient_checkpointing=true", stage="align"),
                         init_from=export)
    assert "is ignored" not in caplog.text, caplog.text
    vision = task.bundle.model.vision
    assert (vision.config.feature_layer, vision.feature_block, vision.config.keep_cls) == (-2, 0, True)
    assert vision.vit.grad_checkpointing  # how this run trains the ViT is this run's too
    assert task.config.model.vision.feature_layer == -2  # as the run's config.json records it
    pixels = torch.randn(1, 3, vision.config.image_size, vision.config.image_size)
    assert vision.patch_features(pixels).shape[1] == vision.vit.patch_embed.num_patches + 1  # the CLS token kept


@pytest.mark.parametrize(("name", "sizes", "refusal"), [
    ("resnet18", "null", r"cannot be built with an image and patch size \(.*img_size.*\)"),  # no ViT arguments
    ("naflexvit_base_patch16_gap", "2", r"\(NaFlexVit\) has no patch_embed and blocks"),  # a ViT of another layout
])
def test_a_vision_tower_that_is_no_timm_vit_is_refused_by_name(name, sizes, refusal):
    config = tiny_config(f"model.vision.name={name}", f"model.vision.width={sizes}", f"model.vision.depth={sizes}",
                         f"model.vision.heads={sizes}", "model.vision.conv_stem=false", "model.vision.global_pool=null",
                         "model.vision.patch_size=16", "model.vision.image_size=32", stage="sft")
    with pytest.raises(ConfigError, match=rf"^model.vision.name='{name}' {refusal}: vlm trains timm ViTs"):
        new_vlm(config.model, config.tiler)


def test_sft_from_a_contrastive_export_says_the_projector_and_llm_start_fresh(tmp_path, caplog):
    from tiny import contrastive_export

    export = contrastive_export(tmp_path / "clip")
    with caplog.at_level("WARNING", logger="vlm.training.vlm_task"):
        make_task(tiny_config(stage="sft"), init_from=export)
    assert f"stage=sft starts from the contrastive export {export}: only its ViT comes trained, the projector and " \
           f"the LLM start fresh. stage=align trains the projector first" in caplog.text


def _damage(folder, how: str) -> str:
    """Damage a copy of an export as `how` says; -> the file the error must name."""
    import json

    if how == "weights-cut-short":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        return "model.safetensors"
    if how == "weights-empty":
        (folder / "model.safetensors").write_bytes(b"")
        return "model.safetensors"
    if how.startswith("config-"):
        config = json.loads((folder / "config.json").read_text())
        if how == "config-without-model":
            del config["model"]
        elif how == "config-tiler-null":
            config["tiler"] = None
        elif how == "config-tiler-zero":  # hand-edited values are named with the file, not as the command line's
            config["tiler"]["max_tiles"] = 0
        elif how == "config-llm-type":
            config["llm_config"]["model_type"] = "nosuch"
        elif how == "config-templates":
            config["templates"] = "a photo of a {}."
        else:  # config-wider-llm: the weights no longer fit the model it describes, and the error is theirs
            config["llm_config"]["hidden_size"] *= 2
        (folder / "config.json").write_text(json.dumps(config))
        return "model.safetensors" if how == "config-wider-llm" else "config.json"
    (folder / "tokenizer" / ("tokenizer.json" if how == "tokenizer-missing" else "chat_template.jinja")).unlink()
    return "tokenizer"


@pytest.mark.parametrize("how", ["weights-cut-short", "weights-empty", "config-without-model", "config-tiler-null",
                                 "config-wider-llm", "config-tiler-zero", "config-llm-type", "config-templates",
                                 "tokenizer-missing", "chat-template-missing"])
def test_a_damaged_export_is_one_error_naming_the_file(tiny_sft_export, tmp_path, how):
    import shutil

    from vlm.exports.format import ExportError
    from vlm.exports.vlm import load_vlm

    folder = tmp_path / "export"
    shutil.copytree(tiny_sft_export, folder)
    named = _damage(folder, how)
    # a mismatch names the first tensor that does not fit, with both shapes
    with pytest.raises(ExportError, match=f"'{folder / named}'.*(damaged|lacks|size mismatch for .*torch.Size)"):
        load_vlm(folder)


@pytest.mark.parametrize("pool,prefix", [("avg", 0), ("token", 1)])
@pytest.mark.parametrize("layer", [-1, -2])
def test_keep_cls_keeps_the_prefix_tokens_a_tower_has_at_any_feature_layer(pool, prefix, layer):
    from vlm.models.vision import VisionTower

    shapes = {}
    for keep in (False, True):
        config = tiny_config(f"model.vision.global_pool={pool}", f"model.vision.feature_layer={layer}",
                             f"model.vision.keep_cls={str(keep).lower()}").model.vision
        tower = VisionTower(config).eval()
        assert tower.num_prefix_tokens == prefix
        shapes[keep] = tower.patch_features(torch.randn(2, 3, config.image_size, config.image_size)).shape
    assert shapes[True][1] == shapes[False][1] + prefix and shapes[True][0] == 2


def test_a_folder_of_shards_given_as_a_model_is_named_as_data(tmp_path):
    from vlm.exports.format import ExportError
    from vlm.exports.vlm import load_vlm

    (tmp_path / "pairs" / "train").mkdir(parents=True)
    for i in range(2):
        (tmp_path / "pairs" / "train" / f"shard-00000{i}.tar").write_bytes(b"")
    with pytest.raises(ExportError, match=re.escape(f"it holds data shards, not a model (as data: data.train='"
                                                    f"{tmp_path}/pairs/train/shard-{{000000..000001}}.tar')")):
        load_vlm(tmp_path / "pairs")


def test_weight_decay_spares_what_the_model_names_embeddings_norms_and_biases():
    """Decided by each parameter's name in the model: the image slots are an embedding table (2-D, so only their
    name keeps them out), the LLM's token embeddings decay as under Hugging Face's Trainer."""
    from vlm.training.optim import build_optimizer

    config = tiny_config("stage.weight_decay=0.1", stage="sft")
    task = make_task(config)
    assert task.model.image_slot_embeddings is not None and task.model.image_slot_embeddings.weight.ndim == 2
    decays = {id(p): group["weight_decay"] > 0 for group in build_optimizer(task.model.parts(), config.stage)
              .param_groups for p in group["params"]}
    names = {name: decays[id(p)] for name, p in task.model.named_parameters() if id(p) in decays}
    assert names["image_slot_embeddings.weight"] is False
    assert all(not decay for name, decay in names.items() if "embedding" in name or name.endswith(".bias"))
    assert names["lm.model.embed_tokens.weight"] is True and names["lm.model.layers.0.mlp.up_proj.weight"] is True


def test_each_part_learns_at_its_own_rate_and_zero_is_a_rate():
    from vlm.training.optim import build_optimizer

    config = tiny_config("stage.lr=1e-3", "stage.lr_projector=0", "stage.lr_llm=2e-4", stage="sft")
    task = make_task(config)
    optimizer = build_optimizer(task.model.parts(), config.stage)
    rates = {group["part"]: group["lr"] for group in optimizer.param_groups}
    assert rates == {"projector": 0.0, "llm": 2e-4}
    projector = [p.clone() for p in task.model.projector.parameters()]
    encoded = _inputs(task.bundle)
    task.model(encoded.input_ids[None], None, encoded.pixel_values, encoded.labels[None]).loss.backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(projector, task.model.projector.parameters(), strict=True))
