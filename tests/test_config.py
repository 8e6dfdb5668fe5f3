"""Every config in configs/ composes and instantiates; bad keys and values fail at start-up, naming the key."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf
from tiny import TINY, make_task, sft_export, tiny_config

from vlm.cli import CONFIG_DIR, PATTERN_KEYS, compose_config, preflight, quote_values
from vlm.config import ConfigError, TrainConfig, load_config, to_dict, to_train_config
from vlm.export import ExportConfig
from vlm.infer import InferConfig
from vlm.models.factory import make_tiler, new_vlm
from vlm.server.settings import ServeSettings
from vlm.training.loggers import build_logger
from vlm.training.stages import STAGES, get_stage

GROUPS = {group: sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
          for group in ("stage", "model", "data", "tiler", "trainer")}


@pytest.mark.parametrize("group,option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_option_composes_to_its_own_values(group, option):
    """Picking `group=option` gives the typed config exactly the values its YAML file sets."""
    config = tiny_config(f"{group}={option}", tiny=group != "model")
    written = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))
    written.pop("defaults", None)
    composed = to_dict(getattr(config, group))
    assert written and _leaves(written).items() <= _leaves(composed).items()


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_instantiates_with_tiny_models(stage, tmp_path):
    start = sft_export(tmp_path / "sft") if stage == "dpo" else None  # dpo learns from a chat model's answers
    task = make_task(tiny_config(stage=stage), classnames=["a", "b"], init_from=start)
    trained = get_stage(stage).trains
    assert trained and all(task.parameter_counts[part][0] > 0 for part in trained)
    assert all(task.parameter_counts[part][0] == 0 for part in task.parameter_counts if part not in trained)


@pytest.mark.parametrize("tier", GROUPS["tiler"])
def test_every_tiler_tier_builds_a_tiler(tier):
    config = tiny_config(f"tiler={tier}", stage="sft")
    bundle = new_vlm(config.model, config.tiler)
    tiler = make_tiler(config.tiler, bundle.model.vision, bundle.model.tokens_per_tile)
    assert tiler.config.max_tiles == {"low": 1, "mid": 4, "high": 12}[tier]
    assert (tiler.tile_size, tiler.tokens_per_tile) == (config.model.vision.image_size, bundle.model.tokens_per_tile)


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
    with pytest.raises(ConfigError, match="tiler.max_tiles=0 must be >= 1"):
        tiny_config("tiler.max_tiles=0")
    with pytest.raises(ConfigError, match=r"trainer.precision='bf17' is not valid; choose one of \['auto', '32-true'"):
        tiny_config("trainer.precision=bf17")
    with pytest.raises(ConfigError, match=r"unknown config key 'stage.lrr'. Did you mean 'stage.lr'\? Valid config "
                                          r"keys under 'stage': \[.*'lr',"):
        to_train_config({"stage": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"^config key 'stage.lr' has no value; give it one \(key=value\)$"):
        tiny_config("stage.lr=???")


@pytest.mark.parametrize("override,message", [
    ("stage.max_steps=0", "stage.max_steps=0 must be >= 1"),
    ("stage.batch_size=-2", "stage.batch_size=-2 must be >= 1"),
    ("model.projector.reduction_factor=0", "model.projector.reduction_factor=0 must be >= 1"),
    ("model.projector.image_slots=-1", "model.projector.image_slots=-1 must be >= 0"),
    ("stage.min_lr_ratio=1.5", "stage.min_lr_ratio=1.5 must be <= 1"),
    ("tiler.max_long_side=100000", "tiler.max_long_side=100000 must be <= 6144"),
    ("stage.betas=[0.9]", r"stage.betas=\[0.9\] must be two numbers in \[0, 1\)"),
    ("stage.betas=[0.9,1.5]", r"stage.betas=\[0.9, 1.5\] must be two numbers"),
    ("stage.beta=0", r"stage.beta=0(.0)? must be > 0: the preference losses divide by it"),
    ("stage.beta=inf", "stage.beta=inf must be a finite number"),
    ("stage.sft_weight=nan", "stage.sft_weight=nan must be a finite number"),
    ("stage.lr=-inf", "stage.lr=-inf must be a finite number"),
    (f"stage.warmup_steps=-{10**400}", f"stage.warmup_steps=-{10**400} must be >= 0"),
    ("trainer.devices=0", "trainer.devices=0: give a count"),
    ("trainer.devices=abc", "trainer.devices='abc': give a count"),
    ("trainer.accelerator=tpu", r"trainer.accelerator='tpu' is not valid; choose one of \['auto', 'cpu'"),
    ("model.vision.image_size=60", "model.vision.image_size=60 must be a multiple of model.vision.patch_size=8"),
    ("model.vision.global_pool=bogus", "model.vision.global_pool='bogus' is not a timm ViT pooling: use one of token"),
    ("model.vision.heads=5", "model.vision.heads=5 does not divide model.vision.width=32"),
    ("model.text.heads=3", "model.text.heads=3 does not divide model.text.width="),
    ("eval.templates=[]", r"eval.templates=\[\] holds no prompt"),
    ("eval.templates=['a photo']", "eval.templates: 'a photo' has no {} for the class name"),
    ("model.clip.init_logit_bias=-5", "model.clip.init_logit_bias=-5 applies to model.clip.loss=siglip only"),
    ("eval.templates=['a {} of a {}']", r"eval.templates: 'a \{\} of a \{\}' is not a prompt with one \{\} for the "
                                       r"class name \(Replacement index 1 out of range"),
    ("eval.templates=['{} {kind}']", r"eval.templates: '\{\} \{kind\}' is not a prompt with one"),
])
def test_out_of_range_numbers_name_the_key_and_the_bound(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)


@pytest.mark.parametrize(("devices", "taken"), [("auto", "auto"), ("1", 1), ("-1", -1), ("[0,1]", [0, 1]),
                                               ("'0,1'", "0,1")])
def test_every_form_of_trainer_devices_lightning_takes_passes_the_check(devices, taken):
    assert tiny_config(f"trainer.devices={devices}").trainer.devices == taken


def test_settings_lightning_refuses_and_a_bad_model_name_are_one_error_leaving_no_run_folder(tmp_path):
    from vlm.train import run

    for override, message in (("trainer.devices=[0,1]", r"trainer settings \(accelerator=cpu, devices=\[0, 1\].*"
                                                         r"CPUAccelerator"),
                              ("model.vision.name=nonexistent_vit", "model.vision.name='nonexistent_vit'")):
        with pytest.raises(ConfigError, match=message):
            run(tiny_config(override, "trainer.accelerator=cpu", f"output_root={tmp_path}"))
    assert list((tmp_path / "contrastive").iterdir()) == []  # each failed start removed its folder
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot make the run folder .* check output_root="):
        run(tiny_config(f"output_root={tmp_path / 'file'}"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm.train", *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)


def _cli_concurrently(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """`python -m vlm.train ARGS` for each list of args, run side by side (each spends its time importing)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: _cli(*args), commands))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train", "eval", "infer", "serve", "export", "constitution"])
def test_help_describes_the_entry_point_its_groups_and_its_settings(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        preflight(["--help"], name)
    shown = capsys.readouterr().out
    assert exit_.value.code == 0 and shown.startswith(f"`python -m vlm.{name}")
    assert f"usage: python -m vlm.{name}" in shown and f"settings of configs/{name}.yaml" in shown
    assert "hydra:" not in shown and "defaults:" not in shown
    if example := re.search(r"nested keys with dots, e\.g\. ([\w.]+)=", shown):  # a key this entry point takes
        assert OmegaConf.select(compose_config(name), example[1]) is not None, example[1]
    assert (example is None) == (name == "export")  # vlm.export has no nested keys
    if name == "train":
        assert "  stage: align, contrastive (default), dpo, sft" in shown
    if name == "eval":  # stage and tiler: the export's own unless given
        assert "  stage: align, contrastive, dpo, sft (default: the export's own)" in shown
        assert "  tiler: high, low, mid (default: the export's own)" in shown
    if name in ("train", "eval"):
        assert "eval:" in shown
        # each group's chosen option, with the comment on each key
        assert "settings of configs/stage/contrastive.yaml (stage.KEY=VALUE" in shown and "max_steps:" in shown
        assert "settings of configs/model/tiny.yaml" in shown and "settings of configs/trainer/cpu.yaml" in shown
    if name == "train":  # a group chosen on the command line: its file and the ones it builds on
        with pytest.raises(SystemExit):
            preflight(["stage=dpo", "--help"], name)
        shown = capsys.readouterr().out
        assert "  stage: align, contrastive, dpo (chosen), sft" in shown
        assert shown.index("configs/stage/contrastive.yaml") < shown.index("configs/stage/sft.yaml") < \
            shown.index("configs/stage/dpo.yaml") and "beta: 0.3" in shown
    if name == "constitution":
        assert "  critic: http, self (default), synthetic" in shown and "stage:" not in shown
    if name in ("infer", "serve", "export"):
        assert "config groups" not in shown and "checkpoint: null" in shown


def test_help_with_a_mistyped_group_option_names_it_as_a_run_would(capsys):
    with pytest.raises(SystemExit) as stop:
        preflight(["stage=sftt", "--help"], "train")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: stage='sftt' is not valid; choose one of ['align', 'contrastive', " \
                                      "'dpo', 'sft']. Did you mean 'sft'?\n"


@pytest.mark.parametrize("config,arg,message", [
    ("infer", "model=base", "model='base': vlm.infer has no config group 'model'; it reads the model and its settings "
                            "from the export given by checkpoint="),
    ("constitution", "stage=sft", "stage='sft': vlm.constitution has no config group 'stage'; its groups are "
                                  "['critic', 'data']"),
])
def test_another_entry_points_config_group_is_named_as_not_this_ones(config, arg, message, capsys):
    """Hydra's own answer ("Could not override 'model'... use +model=base") would send the user the wrong way."""
    with pytest.raises(SystemExit) as stop:
        preflight([arg], config)
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_help_piped_into_a_reader_that_stops_early_is_no_error():
    """`python -m vlm.train --help | head -3`: the reader closes the pipe before the help is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-c", "from vlm.cli import print_help; print_help('settings ' * 9000)"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.slow  # three `python -m vlm.train` processes, each importing torch and Lightning
def test_cli_typo_names_key_and_choices():
    key_typo, group_typo = _cli_concurrently(["stage.lrr=0.1"], ["model=tny"])
    assert key_typo.returncode == 2
    assert "unknown config key 'stage.lrr'. Did you mean 'stage.lr'?" in key_typo.stderr
    assert group_typo.returncode == 2
    assert "model='tny' is not valid; choose one of ['base', 'large', 'tiny']. Did you mean 'tiny'?" \
           in group_typo.stderr


@pytest.mark.parametrize("config,arg,message", [
    ("train", "stage=sfft", "stage='sfft' is not valid; choose one of ['align', 'contrastive', 'dpo', 'sft']. "
                            "Did you mean 'sft'?"),
    ("constitution", "critic=synth", "critic='synth' is not valid; choose one of ['http', 'self', 'synthetic']. "
                                     "Did you mean 'synthetic'?"),
    ("train", "model.projector.type=mlp", "model.projector.type='mlp' is not valid; choose one of ['linear', "
                                          "'mlp2x_gelu']. Did you mean 'mlp2x_gelu'?"),  # the one it starts
])
def test_a_mistyped_choice_names_the_valid_ones_and_the_closest(config, arg, message, capsys):
    if "." in arg:  # a key's value is checked when the config loads
        with pytest.raises(ConfigError, match=re.escape(message)):
            tiny_config(arg)
        return
    with pytest.raises(SystemExit):
        preflight([arg], config)
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.slow
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


@pytest.mark.parametrize("key", PATTERN_KEYS)
def test_a_pattern_the_shell_expanded_into_one_argument_per_shard_is_refused(key, capsys):
    """`data.train=/d/shard-{000..002}.tar` unquoted reaches vlm as three arguments; Hydra would keep the last and
    train on one shard of three. Other keys may repeat (the last wins, as over a shell alias's settings)."""
    shards = [f"{key}=/d/shard-00000{i}.tar" for i in range(3)]
    with pytest.raises(SystemExit) as stop:
        preflight(["stage=sft", *shards], "train")
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {key} is given 3 times ('/d/shard-000000.tar', '/d/shard-000001.tar', '/d/shard-000002.tar'): the "
        f"shell expands an unquoted brace pattern into one argument per shard, and only the last would be read. "
        f"Quote the pattern: {key}='/d/shard-{{000000..000002}}.tar'\n")
    preflight(["stage.max_steps=2", "stage.max_steps=3", shards[0]], "train")  # composes: no error
    preflight([f"{key}=/d/val-a.tar", f"{key}=/d/val-b.tar"], "train")  # an alias's pattern overridden
    preflight([f"{key}=/d/s-1.tar", f"{key}=/d/s-1.tar"], "train")  # given twice alike


def test_infer_and_serve_configs_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        infer = compose("infer", overrides=["checkpoint=/x", "prompt=hi"])
        serve = compose("serve", overrides=["checkpoint=/x", "port=9000"])
    assert infer.checkpoint == "/x" and infer.generation.max_new_tokens > 0
    values = {k: v for k, v in OmegaConf.to_container(serve, resolve=True).items() if k != "hydra"}
    settings = ServeSettings.from_dict(values)
    assert (settings.host, settings.port) == ("127.0.0.1", 9000)


def _defaults_disagreeing(schema: type, composed: dict, path: str = "") -> list[str]:
    """Fields of `schema` whose dataclass default differs from the value the YAML composes."""
    hints = typing.get_type_hints(schema)
    wrong = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            wrong += _defaults_disagreeing(hints[f.name], composed[f.name], f"{path}{f.name}.")
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if default is dataclasses.MISSING or default == MISSING:
            continue  # no default: the YAML is the only source
        if (list(default) if isinstance(default, tuple) else default) != composed[f.name]:
            wrong.append(f"{path}{f.name}: dataclass {default!r}, YAML {composed[f.name]!r}")
    return wrong


@pytest.mark.parametrize("name,schema", [("train", TrainConfig), ("infer", InferConfig), ("serve", ServeSettings),
                                         ("export", ExportConfig)])
def test_dataclass_defaults_agree_with_the_yaml(name, schema):
    """The YAML files are the only source of defaults: a dataclass default exists only where it equals them."""
    composed = {k: v for k, v in OmegaConf.to_container(compose_config(name), resolve=True).items() if k != "hydra"}
    assert set(composed) == {f.name for f in dataclasses.fields(schema)}
    assert _defaults_disagreeing(schema, composed) == []


def test_a_tensorboard_logger_without_its_package_names_the_extra_before_anything_starts(tmp_path, monkeypatch):
    from vlm.train import run

    find_spec = importlib.util.find_spec  # as on a machine without tensorboard, and with everything else
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("tensorboard", "tensorboardX") else find_spec(name, *args))
    message = r"^trainer.logger=tensorboard needs the tensorboard package: pip install 'vlm\[tensorboard\]'"
    with pytest.raises(ConfigError, match=message):
        build_logger("tensorboard", tmp_path, None)
    with pytest.raises(ConfigError, match=message):  # the message alone, and no run folder
        run(tiny_config("trainer.logger=tensorboard", f"output_root={tmp_path / 'runs'}"))
    assert not (tmp_path / "runs").exists()


def test_one_value_given_for_a_group_of_settings_names_the_group_and_its_keys():
    """OmegaConf's merge error names no key for it; the message must."""
    from vlm.infer import InferConfig

    with pytest.raises(ConfigError, match=r"bad value for 'generation.h2o': it is a group of settings \(heavy, "
                                          r"recent, sinks, ranking, prompt_block\); set them one by one, e.g. "
                                          r"generation.h2o.heavy=\.\.\., got 5"):
        load_config(InferConfig, compose_config("infer", ["generation.h2o=5"]))


def test_heads_that_split_no_width_of_the_timm_models_own_are_one_error_naming_the_key():
    from vlm.models.vision import VisionTower

    config = tiny_config("model.vision.width=null", "model.vision.heads=5")  # the timm model's own width, 192
    with pytest.raises(ConfigError, match=r"cannot be built with .*model.vision.heads=5.*: dim should be divisible"):
        VisionTower(config.model.vision)


@pytest.mark.parametrize("stage, overrides, unread", [
    ("contrastive", ["stage.lr_llm=0.1", "stage.train_projector=true", "stage.lr_text=0.1"],
     ["stage.lr_llm=0.1 has no effect in stage=contrastive: its model has no 'llm' part",
      "stage.train_projector=True has no effect in stage=contrastive: its model has no 'projector' part"]),
    ("sft", ["stage.lr_text=0.1", "stage.beta=0.5", "stage.lr_llm=0.1"],
     ["stage.lr_text=0.1 has no effect in stage=sft: its model has no 'text' part",
      "stage.beta=0.5 has no effect in stage=sft: it is a preference setting, read by stage=dpo"]),
])
def test_stage_settings_a_stage_reads_nothing_of_are_named(caplog, stage, overrides, unread):
    """stage.lr_llm in the contrastive stage, or stage.beta in sft, would otherwise do nothing without a word."""
    with caplog.at_level(logging.WARNING, logger="vlm.training.freezing"):
        make_task(tiny_config(*overrides, stage=stage))
    warned = [record.getMessage() for record in caplog.records if "has no effect" in record.getMessage()]
    assert len(warned) == len(unread) and all(w.startswith(u) for w, u in zip(warned, unread, strict=True)), warned
