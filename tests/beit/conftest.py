"""Fixtures shared by the trainer tests."""

import pytest


@pytest.fixture(scope="session")
def pretraining_demo(tmp_path_factory):
    """The folder of one ``beit-pretrain --demo`` run (its data, tokenizer, checkpoints, logs), run once per session:
    the pretraining demo's test checks it, the fine-tuning demo starts from it."""
    from beit.train import main

    out = tmp_path_factory.mktemp("pretraining_demo") / "demo"
    assert main(["--demo", "--output-dir", str(out), "--no-progress"]) == 0
    return out
