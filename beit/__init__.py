"""BEiT masked image modeling: the reference model, blockwise masking and checkpoint interop.

``beit.create_model(name, **overrides)`` builds a model for pretraining, ``beit.create_classifier(name, num_classes)``
the fine-tuning classifier; ``beit.load_pretrained(model, path)`` loads an official
(unilm), timm or Hugging Face checkpoint into it.
"""

__version__ = "0.1.0"

from beit.checkpoint import convert_state_dict, export_state_dict, load_pretrained  # noqa: E402
from beit.classifier import ClassifierConfig, VisionTransformer, create_classifier, list_classifiers  # noqa: E402
from beit.masking import MaskingGenerator, generate_masks, mask_to_index  # noqa: E402
from beit.model import (  # noqa: E402
    IMPLS,
    BeitConfig,
    VisionTransformerForMaskedImageModeling,
    create_model,
    list_models,
    resolve_impl,
)
from beit.pretrained import resize_rel_pos_table  # noqa: E402

__all__ = [
    "__version__",
    "IMPLS",
    "BeitConfig",
    "ClassifierConfig",
    "MaskingGenerator",
    "VisionTransformerForMaskedImageModeling",
    "VisionTransformer",
    "convert_state_dict",
    "create_classifier",
    "create_model",
    "export_state_dict",
    "generate_masks",
    "list_classifiers",
    "list_models",
    "load_pretrained",
    "mask_to_index",
    "resize_rel_pos_table",
    "resolve_impl",
]
