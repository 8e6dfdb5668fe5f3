"""Every config in configs/ composes and instantiates; bad keys and values fail at start-up, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TINY, tiny_config

from vlm.cli import CONFIG_DIR, PATTERN_KEYS, quote_values
from vlm.config import ConfigError, to_train_config
from vlm.lit.contrastive import ContrastiveTask
from vlm.loading import make_tiler, new_vlm
from vlm.stages import STAGES

GROUPS = {group: sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
          for group in ("stage", "model", "data", "tiler", "trainer")}


@pytest.mark.parametrize("group,option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_option_composes(group, option):
    config = tiny_config(f"{group}={option}", tiny=group != "model")
    assert getattr(config, group).__class__.__name__.endswith("Config")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_instantiates_with_tiny_models(stage):
    config = tiny_config(stage=stage)
    if stage == "contrastive":
        task = ContrastiveTask.create(config, ["a", "b"])
        assert task.parameter_counts["vision"][0] > 0
    else:
        bundle = new_vlm(config.model, config.tiler)
        assert bundle.model.tokens_per_tile == bundle.processor.tiler.tokens_per_tile


@pytest.mark.parametrize("tier", GROUPS["tiler"])
def test_every_tiler_tier_builds_a_tiler(tier):
    config = tiny_config(f"tiler={tier}", stage="sft")
    bundle = new_vlm(config.model, config.tiler)
    tiler = make_tiler(config.tiler, bundle.model.vision, bundle.model.tokens_per_tile)
    assert (tiler.config.max_long_side, tiler.config.max_short_side) == (6144, 4096)


@pytest.mark.parametrize("preset", ["base", "large"])
def test_real_size_presets_name_real_models(preset):
    import timm

    config = tiny_config(f"model={preset}", tiny=False)
    assert config.model.vision.pretrained and timm.is_model(config.model.vision.name)
    assert config.model.llm.name_or_path  # a Hugging Face causal LM, loaded by name for users with the hub


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"model.clip.loss='clp' is not valid; choose one of \['clip', 'siglip'\]"):
        tiny_config("model.clip.loss=clp")
    with pytest.raises(ConfigError, match="bad value for 'stage.max_steps'"):
        tiny_config("stage.max_steps=abc")
    with pytest.raises(ConfigError, match="tiler.max_tiles must be an integer >= 1"):
        tiny_config("tiler.max_tiles=0")
    with pytest.raises(ConfigError, match="unknown config key 'stage.lrr'"):
        to_train_config({"stage": {"lrr": 1}})


@pytest.mark.parametrize("override,message", [
    ("stage.max_steps=0", "stage.max_steps=0 must be >= 1"),
    ("stage.batch_size=-2", "stage.batch_size=-2 must be >= 1"),
    ("model.projector.reduction_factor=0", "model.projector.reduction_factor=0 must be >= 1"),
    ("model.projector.image_slots=-1", "model.projector.image_slots=-1 must be >= 0"),
])
def test_out_of_range_numbers_name_the_key_and_the_bound(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm.train", *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)


def test_cli_typo_names_key_and_choices():
    result = _cli("stage.lrr=0.1")
    assert result.returncode == 2
    assert "unknown config key 'stage.lrr'. Did you mean 'stage.lr'?" in result.stderr
    result = _cli("model=tny")
    assert result.returncode == 2 and "Could not find 'model/tny'" in result.stderr and "tiny" in result.stderr


def test_cli_missing_shards_name_the_pattern(tmp_path):
    pattern = str(tmp_path / "shard-{000..003}.tar")
    result = _cli(f"data.train={pattern}", f"output_root={tmp_path / 'out'}", *TINY)
    assert result.returncode == 2
    assert f"data.train='{pattern}' matches no shard file" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_shard_patterns_need_no_hydra_quoting():
    args = ["data.train=/d/s-{000..009}.tar", "stage=sft", r"data.val=/d/we\ird/x.tar"]
    assert quote_values(args, PATTERN_KEYS) == ["data.train='/d/s-{000..009}.tar'", "stage=sft",
                                                r"data.val='/d/we\ird/x.tar'"]


def test_infer_and_serve_configs_compose():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlm.serve import ServeSettings

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        infer = compose("infer", overrides=["checkpoint=/x", "prompt=hi"])
        serve = compose("serve", overrides=["checkpoint=/x", "port=9000"])
    assert infer.checkpoint == "/x" and infer.generation.max_new_tokens > 0
    values = {k: v for k, v in OmegaConf.to_container(serve, resolve=True).items() if k != "hydra"}
    settings = ServeSettings.from_dict(values)
    assert (settings.host, settings.port) == ("127.0.0.1", 9000)
