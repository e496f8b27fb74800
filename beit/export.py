"""``beit-export CKPT OUT``: a checkpoint's weights in the layouts other code reads.

Default (``--task mim``), into the folder OUT:
    model.safetensors        our (= the official) parameter names, safetensors
    beit_unilm.pth           the official unilm layout, ``{"model": state_dict}`` with the relative_position_index
                             buffers, as ``run_beit_pretraining.py`` saves it
    hf/config.json, hf/model.safetensors
                             a Hugging Face ``BeitForMaskedImageModeling`` folder (the hub's transformers 4 names,
                             which transformers 5 also reads), loadable with ``from_pretrained``
CKPT is a ``beit-pretrain`` checkpoint (its ``model_config`` rebuilds the model) or any checkpoint
``beit.load_pretrained`` reads, with ``--model`` naming the architecture. A ``beit-finetune`` checkpoint is written
the same way, its Hugging Face folder a ``BeitForImageClassification``.

``--task segmentation --img-size 640``: the encoder for semantic segmentation (no MIM head, mask token, final norm
or classifier), with a relative position table in every block (a shared one copied) resized to the target patch
grid (640 / 16 = 40 a side) by the official scheme (``beit.pretrained.resize_rel_pos_table``), and an absolute
position embedding, if any, resized bicubically:
    beit_backbone.pth        the official mmseg backbone's layout (unilm ``semantic_segmentation/backbone/beit.py``:
                             ``cls_token``, ``patch_embed.proj``, ``blocks.N.attn.relative_position_bias_table`` and
                             its ``relative_position_index``, ...), as ``{"model": state_dict}``, which its
                             ``load_checkpoint`` reads; its ``fpn1``-``fpn4`` necks start fresh
    hf/config.json, hf/model.safetensors
                             a ``BeitForSemanticSegmentation`` folder: ``from_pretrained`` finds every encoder weight
                             and starts only the FPN neck and the decode and auxiliary heads fresh
CKPT is any BEiT checkpoint ``beit.load_pretrained`` reads: pretraining (ours, unilm, Hugging Face) or fine-tuning
(intermediate fine-tuning before segmentation); the architecture is read from its weights.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

import beit
from beit.checkpoint import (
    checkpoint_grid,
    detect_source,
    export_state_dict,
    hf_config_kwargs,
    is_classifier,
    read_state_dict,
    state_dict_to_hf,
    unwrap_state_dict,
)
from beit.fileformat import SHA256_KEY, tensors_sha256
from beit.model import BeitConfig, VisionTransformerForMaskedImageModeling

TASKS = ("mim", "segmentation")
# The encoder outputs the segmentation necks read: the official configurations' for BEiT-B and BEiT-L.
_OUT_INDICES = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}


def _is_classifier_config(cfg) -> bool:
    return isinstance(cfg, dict) and "num_classes" in cfg


def model_from_checkpoint(path: str | Path, model_name: str | None = None, **overrides):
    """Rebuild the MIM model of a checkpoint and load its weights (strict)."""
    return _mim_model(read_state_dict(path), path, model_name, **overrides)


def _mim_model(ckpt, path, model_name: str | None = None, **overrides):
    if isinstance(ckpt, dict) and "model_config" in ckpt:
        if _is_classifier_config(ckpt["model_config"]):
            raise ValueError(f"{path} holds a classifier (a fine-tuning checkpoint), not a pretraining model")
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


def exportable_model(path: str | Path, model_name: str | None = None):
    """The model of a checkpoint as it is, for ``export``: a fine-tuning checkpoint's classifier (rebuilt from its
    ``model_config``, loaded strictly), else the MIM model of ``model_from_checkpoint``."""
    ckpt = read_state_dict(path)
    if isinstance(ckpt, dict) and _is_classifier_config(ckpt.get("model_config")):
        from beit.classifier import classifier_from_config

        model = classifier_from_config(ckpt["model_config"])
        model.load_state_dict(unwrap_state_dict(ckpt))
        return model
    return _mim_model(ckpt, path, model_name)


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # The safetensors files carry a checksum of their tensors in their metadata, verified by read_state_dict.
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    save_file(sd, str(path), metadata={"format": "pt", SHA256_KEY: tensors_sha256(sd)})


def export(model, out: str | Path) -> dict[str, Path]:
    """Write ``model`` (a MIM model or a classifier) in our, the unilm and the Hugging Face layouts into ``out``;
    the Hugging Face folder is a ``BeitForMaskedImageModeling`` or a ``BeitForImageClassification``."""
    out = Path(out)
    (out / "hf").mkdir(parents=True, exist_ok=True)
    paths = {"safetensors": out / "model.safetensors", "unilm": out / "beit_unilm.pth", "hf": out / "hf"}
    _save_safetensors(model.state_dict(), paths["safetensors"])
    torch.save({"model": export_state_dict(model, "unilm")}, paths["unilm"])
    _save_safetensors(export_state_dict(model, "hf"), out / "hf" / "model.safetensors")
    arch = "BeitForImageClassification" if is_classifier(model) else "BeitForMaskedImageModeling"
    config = dict(hf_config_kwargs(model), model_type="beit", architectures=[arch])
    (out / "hf" / "config.json").write_text(json.dumps(config, indent=2))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Segmentation


def architecture_of(sd: dict[str, torch.Tensor], config: dict | None = None) -> dict:
    """The ``ClassifierConfig`` fields of the encoder a state dict in our names holds: width, patch size and input
    channels from the patch embedding, depth from the blocks, heads from a relative position table, the MLP ratio,
    head dimension, q/v biases and layer scale from the first block; the LayerNorm eps from ``config`` (ours or
    Hugging Face's) when there is one, else the official 1e-6."""
    proj = sd.get("patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if proj is None or proj.dim() != 4 or not blocks or "blocks.0.attn.qkv.weight" not in sd:
        raise ValueError("not a BEiT encoder: no patch_embed.proj.weight [D, C, p, p] or blocks")
    if proj.shape[2] != proj.shape[3]:
        raise ValueError(f"a non-square patch {tuple(proj.shape[2:])} is not supported")
    table = next((v for k, v in sd.items() if k.endswith("relative_position_bias_table")), None)
    config = config or {}
    heads = config.get("num_heads", config.get("num_attention_heads"))
    if heads is None:
        if table is None:
            raise ValueError("cannot tell the number of heads: the checkpoint has no relative position table")
        heads = table.shape[1]
    dim = proj.shape[0]
    all_head_dim = sd["blocks.0.attn.qkv.weight"].shape[0] // 3
    eps = config.get("layer_norm_eps", 1e-6)
    return dict(
        patch_size=int(proj.shape[2]),
        in_chans=int(proj.shape[1]),
        embed_dim=int(dim),
        depth=max(blocks) + 1,
        num_heads=int(heads),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.attn.q_bias" in sd,
        attn_head_dim=None if all_head_dim == dim else all_head_dim // heads,
        init_values=0.1 if "blocks.0.gamma_1" in sd else None,  # the values are loaded; only presence matters
        layer_norm_eps=float(eps),
        use_abs_pos_emb="pos_embed" in sd,
    )


def segmentation_encoder(path: str | Path, img_size: int):
    """The encoder of the BEiT checkpoint at ``path`` for ``img_size`` x ``img_size`` images: a classifier without
    head (``num_classes=0``) and with a table per block, loaded by ``beit.load_pretrained`` (tables and position
    embedding resized to the new grid). Returns (encoder, load report)."""
    from beit.classifier import ClassifierConfig, VisionTransformer

    raw = read_state_dict(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a BEiT checkpoint (it holds a {type(raw).__name__}, not a dict)")
    flat = unwrap_state_dict(raw)
    try:
        source = detect_source(flat)
        sd = beit.convert_state_dict(flat, source)
        config = raw.get("model_config") if isinstance(raw.get("model_config"), dict) else None
        if config is None and Path(path).is_dir() and (Path(path) / "config.json").is_file():
            config = json.loads((Path(path) / "config.json").read_text())
        arch = architecture_of(sd, config)
    except ValueError as e:
        raise ValueError(f"{path} is not a BEiT checkpoint: {e}") from e
    p = arch["patch_size"]
    if img_size <= 0 or img_size % p != 0:
        raise ValueError(f"--img-size {img_size} is not a positive multiple of the checkpoint's patch size {p}")
    encoder = VisionTransformer(
        ClassifierConfig(
            img_size=img_size,
            num_classes=0,
            use_rel_pos_bias=True,
            use_shared_rel_pos_bias=False,
            use_mean_pooling=True,
            impl="ref",
            **arch,
        )
    )
    report = beit.load_pretrained(encoder, raw, src=source, src_grid=checkpoint_grid(path, raw))
    missing = [k for k in report.missing_keys if not k.startswith("fc_norm.")]
    if missing:
        raise ValueError(f"{path} lacks encoder weights: {', '.join(missing)}")
    return encoder, report


def _encoder_state_dict(encoder) -> dict[str, torch.Tensor]:
    """The encoder's weights without the pooling norms and head, which the segmentation models do not have."""
    return {k: v for k, v in encoder.state_dict().items() if not k.startswith(("fc_norm.", "norm.", "head."))}


def segmentation_out_indices(depth: int) -> list[int]:
    """The 4 encoder outputs the segmentation neck reads: the official ones for depth 12 and 24, else spread evenly
    up to the last block."""
    if depth in _OUT_INDICES:
        return list(_OUT_INDICES[depth])
    if depth < 4:
        raise ValueError(f"a segmentation model reads 4 distinct encoder outputs: depth {depth} has too few blocks")
    return [round(depth * (j + 1) / 4) for j in range(4)]


def export_segmentation(encoder, out: str | Path, num_labels: int = 150) -> dict[str, Path]:
    """Write ``encoder`` (from ``segmentation_encoder``) as the official mmseg backbone's checkpoint and as a
    Hugging Face ``BeitForSemanticSegmentation`` folder (``num_labels`` classes: ADE20K's 150 by default)."""
    out = Path(out)
    (out / "hf").mkdir(parents=True, exist_ok=True)
    paths = {"mmseg": out / "beit_backbone.pth", "hf": out / "hf"}
    sd = _encoder_state_dict(encoder)
    official = dict(sd)
    for name, buf in encoder.named_buffers():
        if name.endswith("relative_position_index"):
            official[name] = buf.detach()
    torch.save({"model": dict(sorted(official.items()))}, paths["mmseg"])

    _save_safetensors(state_dict_to_hf(sd, classifier=True), out / "hf" / "model.safetensors")
    config = dict(
        hf_config_kwargs(encoder),
        use_mean_pooling=True,  # BeitModel's final norm is then the identity: the encoder has none
        out_indices=segmentation_out_indices(encoder.config.depth),
        model_type="beit",
        architectures=["BeitForSemanticSegmentation"],
    )
    config["num_labels"] = num_labels
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    (out / "hf" / "config.json").write_text(json.dumps(config, indent=2))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("beit-export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("out", help="output folder")
    p.add_argument("--model", help="architecture, for checkpoints without model_config (see beit.list_models())")
    p.add_argument("--task", choices=TASKS, default="mim", help="mim (default): the model as it is; segmentation: "
                   "the encoder for the official mmseg backbone and BeitForSemanticSegmentation")  # fmt: skip
    p.add_argument("--img-size", type=int, default=640, help="segmentation: the input size the tables are resized for")
    p.add_argument("--num-labels", type=int, default=150, help="segmentation: classes of the Hugging Face config")
    args = p.parse_args(argv)
    try:
        if args.task == "segmentation":
            if args.num_labels < 1:
                raise ValueError(f"--num-labels must be at least 1, got {args.num_labels}")
            encoder, report = segmentation_encoder(args.checkpoint, args.img_size)
            segmentation_out_indices(encoder.config.depth)  # refused before anything is written
            for note in report.notes:
                print(note)
            paths = export_segmentation(encoder, args.out, num_labels=args.num_labels)
        else:
            paths = export(exportable_model(args.checkpoint, args.model), args.out)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        print(f"beit-export: error: {e}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
