"""Training-state checkpoints that cannot be silently damaged, and one writer per run folder."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _testutil import make_train_assets, tiny_run_args

from beit.errors import TrainingError
from beit.train import main
from beit.train_state import (
    RunFolderLock,
    checkpoint_problem,
    checksum_path,
    find_resume,
    list_checkpoints,
    load_checkpoint,
    remove_leftovers,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_train_assets(tmp_path_factory.mktemp("state_assets"))


def run_args(assets, out, *extra):
    return tiny_run_args(assets, out, "--precision", "fp32", "--ckpt-interval", "2", *extra)


def damage(path: Path) -> None:
    """4 KiB of 0xFF in the middle of the file: torch.load still reads it, with wrong tensor bytes."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 4096] = b"\xff" * min(4096, len(raw) - mid)
    path.write_bytes(bytes(raw))


def test_every_checkpoint_has_a_checksum_that_verifies(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint({"step": step, "w": torch.ones(3) * step}, tmp_path, step, keep=2)
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["checkpoint-00000002.pth", "checkpoint-00000003.pth"]
    assert all(checksum_path(p).is_file() and checkpoint_problem(p) is None for p in kept)
    assert not checksum_path(tmp_path / "checkpoint-00000001.pth").exists()  # rotated with its checkpoint
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    damage(kept[-1])
    assert "damaged" in checkpoint_problem(kept[-1])
    # A checkpoint written before checksums existed has none: trusted as it loads.
    checksum_path(kept[0]).unlink()
    assert checkpoint_problem(kept[0]) is None


def test_a_damaged_newest_checkpoint_is_skipped_by_auto_and_refused_by_path(assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(run_args(assets, run, "--steps", "4")) == 0
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(run)] == [2, 4]
    newest = list_checkpoints(run)[-1]
    damage(newest)
    capsys.readouterr()
    # An explicit path to it is refused, naming it.
    assert main(run_args(assets, run, "--steps", "6", "--resume", str(newest))) == 2
    err = capsys.readouterr().err
    assert str(newest) in err and "damaged" in err
    # auto passes over it (moved aside, named) and resumes from the intact one, without error.
    assert main(run_args(assets, run, "--steps", "6")) == 0
    out = capsys.readouterr()
    assert f"skipping {newest}" in out.err and "damaged" in out.err
    assert "resumed from" in out.out and "checkpoint-00000002.pth at step 2" in out.out
    assert (run / (newest.name + ".damaged")).is_file()
    steps = [load_checkpoint(p)["step"] for p in list_checkpoints(run)]
    assert steps[-1] == 6 and all(checkpoint_problem(p) is None for p in list_checkpoints(run))
    with pytest.raises(TrainingError, match="damaged"):
        load_checkpoint(run / (newest.name + ".damaged"))  # its checksum file went with it
    # find_resume on a folder of damaged checkpoints only: nothing to resume (and nothing moved when asked not to).
    only = tmp_path / "only"
    save_checkpoint({"step": 1}, only, 1, keep=1)
    damage(list_checkpoints(only)[0])
    assert find_resume("auto", only, move_aside=False) is None and list_checkpoints(only)


def test_a_second_run_into_a_locked_folder_is_refused_before_any_work(assets, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunFolderLock(run)
    try:
        before = sorted(p.name for p in run.iterdir())
        with pytest.raises(TrainingError, match=f"another run is writing to {run}"):
            RunFolderLock(run)
        assert main(run_args(assets, run, "--steps", "2")) == 2
        assert sorted(p.name for p in run.iterdir()) == before  # nothing written
    finally:
        lock.release()
    assert main(run_args(assets, run, "--steps", "2")) == 0  # released: the folder is free again


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from beit.train_state import RunFolderLock\n"
        "lock = RunFolderLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=str(proc.pid)):  # the message names the holder
            RunFolderLock(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while True:  # the OS drops the lock with the process
        try:
            RunFolderLock(tmp_path).release()
            break
        except TrainingError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_a_full_disk_is_one_line_and_loses_nothing(assets, tmp_path, monkeypatch, capsys):
    import errno

    run = tmp_path / "run"
    assert main(run_args(assets, run, "--steps", "2")) == 0
    good = list_checkpoints(run)[-1]
    before = good.read_bytes()
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # a partial file on disk, then the writer's error, as torch reports ENOSPC
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 0") from None

    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    assert main(run_args(assets, run, "--steps", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write a checkpoint into {run}: No space left on device" in err[0], err
    assert "inline_container" not in err[0]
    assert list_checkpoints(run) == [good] and good.read_bytes() == before and checkpoint_problem(good) is None
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", real_save)
    # A .tmp left by a run killed while writing goes at the next start.
    (run / ".checkpoint-00000004.pth.tmp").write_bytes(b"partial")
    assert main(run_args(assets, run, "--steps", "4")) == 0
    assert "removed" in capsys.readouterr().out and not (run / ".checkpoint-00000004.pth.tmp").exists()
    assert load_checkpoint(list_checkpoints(run)[-1])["step"] == 4


def test_the_log_holds_each_step_once_after_a_resume(assets, tmp_path):
    import json

    run = tmp_path / "run"
    assert main(run_args(assets, run, "--steps", "4", "--log-interval", "1")) == 0
    # As a kill after step 4's log line and before its checkpoint would leave the folder (a partial line too).
    last = list_checkpoints(run)[-1]
    last.unlink()
    checksum_path(last).unlink()
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    assert main(run_args(assets, run, "--steps", "4", "--log-interval", "1")) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_kill_during_a_checkpoint_write_leaves_the_last_good_one(tmp_path):
    """kill -9 while the newest checkpoint is being written: the older one stays the newest intact checkpoint,
    resume picks it, and the leftover temporary file goes at the next start."""
    code = (
        "import sys, torch; from pathlib import Path; from beit.train_state import save_checkpoint\n"
        "out = Path(sys.argv[1]); save_checkpoint({'step': 1, 'w': torch.ones(4)}, out, 1, keep=1)\n"
        "print('first', flush=True)\n"
        "save_checkpoint({'step': 2, 'w': torch.ones(1 << 28)}, out, 2, keep=1)\n"  # 1 GiB: slow to write
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        tmp = tmp_path / ".checkpoint-00000002.pth.tmp"
        deadline = time.time() + 60
        while not (tmp.exists() and tmp.stat().st_size > 0):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    first = tmp_path / "checkpoint-00000001.pth"
    assert list_checkpoints(tmp_path) == [first] and checkpoint_problem(first) is None
    assert find_resume("auto", tmp_path) == first
    assert torch.load(first, weights_only=True)["step"] == 1
    assert remove_leftovers(tmp_path) == [tmp.name] and not tmp.exists()
