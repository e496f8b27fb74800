"""``beit-export CKPT OUT``: a pretraining checkpoint's encoder in the layouts other code reads.

Writes into the folder OUT:
    model.safetensors        our (= the official) parameter names, safetensors
    beit_unilm.pth           the official unilm layout, ``{"model": state_dict}`` with the relative_position_index
                             buffers, as ``run_beit_pretraining.py`` saves it
    hf/config.json, hf/model.safetensors
                             a Hugging Face ``BeitForMaskedImageModeling`` folder (the hub's transformers 4 names,
                             which transformers 5 also reads), loadable with ``from_pretrained``
CKPT is a ``beit-pretrain`` checkpoint (its ``model_config`` rebuilds the model) or any checkpoint
``beit.load_pretrained`` reads, with ``--model`` naming the architecture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import beit
from beit.checkpoint import export_state_dict, hf_config_kwargs, read_state_dict
from beit.fileformat import SHA256_KEY, tensors_sha256
from beit.model import BeitConfig, VisionTransformerForMaskedImageModeling


def model_from_checkpoint(path: str | Path, model_name: str | None = None, **overrides):
    """Rebuild the model of a checkpoint and load its weights (strict)."""
    ckpt = read_state_dict(path)
    if isinstance(ckpt, dict) and "model_config" in ckpt:
        cfg = dict(ckpt["model_config"], **overrides)
        cfg["impl"] = cfg.get("impl", "auto")
        if isinstance(cfg.get("img_size"), list):
            cfg["img_size"] = tuple(cfg["img_size"])
        model = VisionTransformerForMaskedImageModeling(BeitConfig(**cfg))
        model.load_state_dict(ckpt["model"])
        return model
    if model_name is None:
        raise ValueError(f"{path} holds no model_config (not a beit-pretrain checkpoint): pass --model NAME")
    model = beit.create_model(model_name, **overrides)
    beit.load_pretrained(model, ckpt, strict=True)
    return model


def export(model: VisionTransformerForMaskedImageModeling, out: str | Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    out = Path(out)
    (out / "hf").mkdir(parents=True, exist_ok=True)
    paths = {"safetensors": out / "model.safetensors", "unilm": out / "beit_unilm.pth", "hf": out / "hf"}
    # The safetensors files carry a checksum of their tensors in their metadata, verified by read_state_dict.
    ours = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(ours, str(paths["safetensors"]), metadata={"format": "pt", SHA256_KEY: tensors_sha256(ours)})
    torch.save({"model": export_state_dict(model, "unilm")}, paths["unilm"])
    hf = {k: v.contiguous() for k, v in export_state_dict(model, "hf").items()}
    save_file(hf, str(out / "hf" / "model.safetensors"), metadata={"format": "pt", SHA256_KEY: tensors_sha256(hf)})
    config = dict(hf_config_kwargs(model), model_type="beit", architectures=["BeitForMaskedImageModeling"])
    (out / "hf" / "config.json").write_text(json.dumps(config, indent=2))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("beit-export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("out", help="output folder")
    p.add_argument("--model", help="architecture, for checkpoints without model_config (see beit.list_models())")
    args = p.parse_args(argv)
    try:
        model = model_from_checkpoint(args.checkpoint, args.model)
        paths = export(model, args.out)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"beit-export: error: {e}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
