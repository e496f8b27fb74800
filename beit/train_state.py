"""Training-state checkpoints (``checkpoint-NNNNNNNN.pth`` in a run folder) and the rules for resuming from them.

A training state is what a run needs to continue exactly: model, optimizer, scaler, step, epoch, the batch within
the epoch, every rank's RNG state, the data record and the options. Not to be confused with the weight layouts of
``beit.checkpoint`` (official, timm, Hugging Face), which hold weights only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from beit.distributed import Dist
from beit.errors import TrainingError

CKPT_RE = re.compile(r"checkpoint-(\d+)\.pth$")
REQUIRED_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "batch_in_epoch", "args")


def rng_state(device: torch.device) -> dict:
    # NumPy's global generator is not saved: nothing here draws from it (the loaders seed their own).
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gathered_rng_states(d: Dist) -> dict:
    """Every rank's RNG state, keyed by rank (a collective: every rank calls it)."""
    mine = rng_state(d.device)
    if not d.enabled:
        return {str(d.rank): mine}
    gathered = [None] * d.world_size
    dist.all_gather_object(gathered, mine)
    return {str(r): s for r, s in enumerate(gathered)}


def checksum_path(path: Path) -> Path:
    """The checksum file written with a checkpoint (``sha256sum`` format)."""
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_durably(path: Path, write, before_replace=None) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, ``before_replace()`` if given, rename over
    ``path``; the temporary file is removed on any failure."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _HashingWriter:
    """A file's ``write`` that also feeds the bytes to a hash (torch.save writes a file front to back)."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make the renames durable where the OS allows it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_verified(state: dict, path: Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename) with its checksum file, then read the
    file on disk back against it. The checksum is of the bytes torch.save produced, renamed into place before the
    file itself, so every such file has one. A write error (disk full, permission denied) is one TrainingError
    naming the folder and the cause, the temporary file removed and the previous file at ``path`` untouched."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()

    def write_checksum() -> None:
        _write_durably(checksum_path(path), lambda f: f.write(f"{digest.hexdigest()}  {path.name}\n".encode()))

    try:
        _write_durably(path, lambda f: torch.save(state, _HashingWriter(f, digest)), before_replace=write_checksum)
    except BaseException as e:
        cause = _os_error(e)
        if cause is not None:  # disk full, permission denied, ...: one line, the older files untouched
            raise TrainingError(
                f"cannot write a checkpoint into {folder}: {cause.strerror or cause}; the last good checkpoint "
                "there is intact, and a resume continues from it once the folder can be written"
            ) from e
        raise
    _fsync_dir(folder)
    problem = checkpoint_problem(path)
    if problem is not None:  # the file on disk is not what was written
        raise TrainingError(f"{path} was written damaged ({problem}); the older checkpoints are kept")
    return path


def save_checkpoint(state: dict, output_dir: Path, step: int, keep: int) -> Path:
    """``save_verified`` as ``checkpoint-{step}.pth``, then keep the newest ``keep``: the older checkpoints are
    deleted only after the new one is in place and verified."""
    path = save_verified(state, output_dir / f"checkpoint-{step:08d}.pth")
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    return path


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``, itself or in its chain (torch.save reports a full disk as a RuntimeError of its
    zip writer, with the OSError as its context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def remove_leftovers(output_dir: Path) -> list[str]:
    """Delete the temporary files a run killed while writing a checkpoint left (``.checkpoint-*.pth.tmp``); returns
    their names. Only the run holding the folder's lock may call it."""
    removed = []
    for p in Path(output_dir).glob(".*.pth*.tmp"):  # checkpoints, best weights and their checksum files
        p.unlink(missing_ok=True)
        removed.append(p.name)
    return sorted(removed)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted, or None: its contents against the checksum written with
    it. A checkpoint without a checksum file (written before checksums were) is trusted as it loads."""
    sums = checksum_path(Path(path))
    if not sums.is_file():
        return None
    try:
        expected = sums.read_text().split()[0]
    except (OSError, IndexError) as e:
        return f"its checksum file {sums.name} is unreadable ({e or 'empty'})"
    try:
        actual = _sha256(Path(path))
    except OSError as e:
        return f"it cannot be read ({e})"
    if actual != expected:
        return f"its contents do not match the checksum written with it ({sums.name}): the file is damaged"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints in the folder, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def read_verified(path: str | os.PathLike, what: str = "training checkpoint") -> object:
    """A file this package wrote with torch.save, read without executing code (``weights_only``), its checksum
    verified first when it has one; any problem is a TrainingError naming the file."""
    problem = checkpoint_problem(Path(path)) if Path(path).is_file() else None
    if problem is not None:
        raise TrainingError(f"{path} cannot be used: {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise TrainingError(f"checkpoint not found: {path}") from e
    except Exception as e:
        from beit.checkpoint import torch_load_problem  # without torch's advice to load with weights_only=False

        raise TrainingError(f"{path} is not a readable {what} ({torch_load_problem(e)})") from e


def load_checkpoint(path: str | os.PathLike, kind: str = "beit-pretrain") -> dict:
    """A verified training state (checksum first, then the keys a resume needs)."""
    ckpt = read_verified(path)
    if not isinstance(ckpt, dict):
        raise TrainingError(f"{path} is not a {kind} checkpoint: it holds a {type(ckpt).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise TrainingError(f"{path} is not a {kind} checkpoint: it lacks {', '.join(missing)}")
    return ckpt


def find_resume(resume: str, out_dir: Path, move_aside: bool = True) -> Path | None:
    """``--resume``: "none", "auto" (the newest intact checkpoint in the run folder, if any) or a path. A damaged
    checkpoint that "auto" passes over is renamed ``*.damaged`` (by the caller with ``move_aside``, the main rank),
    so that neither the rotation nor a later resume takes it for the newest."""
    if resume == "none":
        return None
    if resume == "auto":
        for path in reversed(list_checkpoints(out_dir)):  # the newest intact one
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            note = ""
            if move_aside:
                aside = path.with_name(path.name + ".damaged")
                with contextlib.suppress(FileNotFoundError):  # its checksum goes with it, still checking it
                    os.replace(checksum_path(path), checksum_path(aside))
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, aside)
                note = f"; kept as {aside.name}"
            print(f"--resume auto: skipping {path}: {problem}{note}", file=sys.stderr, flush=True)
        return None
    path = Path(resume)
    if not path.is_file():
        raise TrainingError(f"--resume {resume}: no such checkpoint")
    return path


def check_compatible(ckpt: dict, args, path, keys: tuple[str, ...]) -> None:
    """Refuse a resume whose options ``keys`` differ from the checkpoint's."""
    old = ckpt["args"]
    for key in keys:
        if key in old and old[key] != getattr(args, key):
            raise TrainingError(
                f"{path} was written with --{key.replace('_', '-')} {old[key]}, this run has {getattr(args, key)}: "
                "resume with the same settings or start a new output folder"
            )


def data_record(loader, world_size: int) -> dict:
    """What an epoch's sample order depends on besides --seed and --batch-size: the files and the ranks."""
    files = hashlib.sha256("\n".join(map(str, loader.files)).encode()).hexdigest()[:16]
    return {"num_files": len(loader.files), "files_sha256": files, "world_size": world_size}


def check_resume_point(ckpt: dict, seed: int, path, record: dict, out_dir: Path) -> None:
    """Refuse a resume that would repeat or skip samples, or leave two histories in one folder."""
    if ckpt["batch_in_epoch"] > 0:  # mid-epoch: the rest of the epoch must be the same sample order
        old = dict(ckpt.get("data") or {}, seed=ckpt["args"].get("seed"))
        new = dict(record, seed=seed)
        changed = [k for k in ("seed", "world_size", "num_files", "files_sha256") if k in old and old[k] != new[k]]
        if changed:
            what = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in changed)
            raise TrainingError(
                f"{path} stopped in the middle of epoch {ckpt['epoch']} (batch {ckpt['batch_in_epoch']}); resuming "
                f"with another {what} would repeat some samples of that epoch and skip others: resume with the "
                "same --seed, number of processes and data, or from a checkpoint at an epoch's end"
            )
    newer = [p for p in list_checkpoints(out_dir) if int(CKPT_RE.search(p.name).group(1)) > ckpt["step"]]
    if newer:
        raise TrainingError(
            f"{out_dir} holds checkpoints newer than {path} (step {ckpt['step']}): {', '.join(p.name for p in newer)}."
            " This run would write a second history beside them, its rotation would delete the older ones, and "
            "--resume auto would later pick theirs: move them away, or give another --output-dir"
        )


LOCK_NAME = ".beit-run.lock"


class RunFolderLock:
    """An exclusive advisory lock (``flock``) on a run folder, held while the run lives: the OS drops it when the
    process ends, killed or not, so a dead run never leaves a stale lock. A second run into a locked folder gets a
    TrainingError before any work."""

    def __init__(self, out_dir: Path):
        import fcntl

        self.path = Path(out_dir) / LOCK_NAME
        self._file = open(self.path, "a+")  # noqa: SIM115  (held open for the life of the run)
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise TrainingError(
                f"another run is writing to {out_dir} (process {holder} holds {self.path}): wait for it to end, or "
                "give another --output-dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the descriptor releases the lock


def jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def write_args(args, out_dir: Path) -> None:
    """The resolved options, as a YAML file that works as a --config."""
    (out_dir / "args.yaml").write_text(yaml.safe_dump(jsonable(vars(args)), sort_keys=True))


def open_run_folder(d: Dist, out_dir: Path) -> RunFolderLock | None:
    """Create the run folder and take its lock (rank 0), before any work; under torchrun every rank stops when rank 0
    is refused, rather than waiting at its first collective. Then remove what a killed run left half-written.
    Returns the lock (None on other ranks); release it when the run ends."""
    lock, refused = None, None
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunFolderLock(out_dir)
        except TrainingError as e:
            refused = e
    if d.enabled:
        flag = torch.tensor([0.0 if refused is None else 1.0], device=d.device)
        d.all_reduce(flag, "max")
        if flag.item() and refused is None:
            refused = TrainingError(f"{out_dir} is locked by another run (rank 0 could not take its lock)")
    if refused is not None:
        raise refused
    if d.main:
        for name in remove_leftovers(out_dir):
            print(f"removed {out_dir / name}, left by a run killed while writing a checkpoint", flush=True)
    return lock


def restore(ckpt: dict, path, d: Dist, model, optimizer, scaler) -> tuple[int, int, int]:
    """Load a verified training state into the model, optimizer, scaler and this rank's RNGs; returns
    (step, epoch, batch_in_epoch). A model that does not fit the checkpoint is a TrainingError naming the file."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise TrainingError(f"{path} does not fit this model: {str(e).splitlines()[0]}") from e
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng", {}).get(str(d.rank))
    if rng is not None:
        set_rng_state(rng, d.device)
    if d.main:
        print(f"resumed from {path} at step {ckpt['step']} (epoch {ckpt['epoch']}, batch {ckpt['batch_in_epoch']})",
              flush=True)  # fmt: skip
    return ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
