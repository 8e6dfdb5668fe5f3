"""Shared fixtures: a clean run environment for every test, one small synthetic dataset per session, and a tiny random
sft export with its chat model. Nothing here trains or downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import tiny_config

from vlm.chat import ChatModel
from vlm.exports.vlm import export_vlm
from vlm.models.factory import new_vlm
from vlm.training.runs import INIT_ENV, PARENT_ENV, RESUME_ENV, RUN_DIR_ENV

# The tiny models are far too small for intra-op threads to help; on CI's 2 shared cores they only contend (a
# generate step was ~25x slower with 2 threads than with 1 while other work ran).
torch.set_num_threads(1)

# The longest files run first: with the suite split over two workers (pytest-xdist, `--dist loadfile`, in collection
# order: `--no-loadscope-reorder` in pyproject.toml), each of them then starts on one, and the short files fill in
# around them instead of one long file ending the run alone. Longest first, from `pytest --durations=0` on 2 cores.
LONGEST_FIRST = ("test_two_images.py", "test_distributed.py", "test_resume.py", "test_infer.py", "test_compile.py",
                 "test_attention.py", "test_web.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture(autouse=True)
def fresh_run_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`prepare_run` leaves its choice of run folder in the environment, for the DDP ranks Lightning starts from this
    process; a test that trains in this process must not hand that choice to the next test."""
    for name in (RUN_DIR_ENV, RESUME_ENV, INIT_ENV, PARENT_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides for a small synthetic dataset (64 train, 16 held-out, 16 per shard), generated once per session."""
    cache = tmp_path_factory.mktemp("synthetic")
    return [f"data.synthetic.cache_dir={cache}", "data.synthetic.num_train=64", "data.synthetic.num_val=16",
            "data.synthetic.samples_per_shard=16"]


@pytest.fixture(scope="session")
def tiny_sft_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sft export folder of the tiny preset with random weights (seeded, so its greedy answers are stable)."""
    config = tiny_config(stage="sft", tiny=False)
    torch.manual_seed(0)
    return export_vlm(tmp_path_factory.mktemp("tiny") / "export", new_vlm(config.model, config.tiler), "sft",
                      config.tiler)


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_sft_export: Path) -> ChatModel:
    """`vlm.chat.ChatModel` on the CPU over `tiny_sft_export`, loaded once per test session."""
    return ChatModel.load(tiny_sft_export, device="cpu")
