"""The parts of the tiny CLIP that open_clip does not have: the patch embeddings ("stems") of its ViT, a
convolutional stem trained with it or a frozen ImageNet CNN (a hybrid ViT), and a token-embedding table cut down to
the caption world's vocabulary. A stem replaces open_clip's ``VisionTransformer.conv1``, so the transformer blocks
that follow, and the adapters AA-CLIP puts on them, stay the same; the table replaces ``CLIP.token_embedding``
behind the same tokenizer.

Used by: ``adlib.features.clip.build_tiny_clip``.
"""
from __future__ import annotations

import math
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn


class ConvStem(nn.Sequential):
    """A convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see better").

    (N, 3, S, S) -> (N, width, S / patch, S / patch), like the ViT's linear patch projection it replaces,
    but through log2(patch) stride-2 3x3 convolutions: one per entry of ``channels`` (with batch norm and
    GELU), then a last one to ``width`` channels (plain, as the linear projection it replaces). Trained
    from scratch on a small data set, a ViT with a linear stem learnt the toy world's colours but not its
    shapes; with this stem it learns both.

    Used by: ``adlib.features.clip.build_tiny_clip``.
    """

    def __init__(self, patch: int, width: int, channels: Sequence[int]):
        n = int(math.log2(patch))
        if 2 ** n != patch or len(channels) != n - 1:
            raise ValueError(f"A conv stem needs a power-of-two patch and log2(patch) - 1 = {n - 1} widths, "
                             f"got patch {patch} and {list(channels)}.")
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.GELU()]
            c_in = c
        super().__init__(*layers, nn.Conv2d(c_in, width, 3, 2, 1))


class PretrainedStem(nn.Module):
    """A hybrid ViT's patch embedding (Dosovitskiy et al. 2021, Sec. 3.1): the first stages of a frozen ImageNet
    CNN (``backbone``, a name of :data:`adlib.features.backbones.BACKBONES`, up to stage ``stage``), then a trained
    1x1 convolution to ``width`` channels.

    (N, 3, S, S) CLIP-normalised images -> (N, width, S / stride, S / stride); the stride of EfficientNet-Lite0's
    stage 2 is 8, the tiny CLIP's patch size. The CNN stays frozen and in eval mode (its batch-norm statistics are
    ImageNet's), and sees the images normalised as its weights expect.

    Used by: ``adlib.features.clip.build_tiny_clip``.
    """

    def __init__(self, width: int, backbone: str = "effnet-lite0", stage: int = 2):
        from adlib.features import cnn

        super().__init__()
        self.trunk = cnn.feature_extractor(backbone, layers=(stage,))
        self.trunk.requires_grad_(False)
        channels = self.trunk.net.feature_info.channels()[-1]
        self.proj = nn.Conv2d(channels, width, 1)
        self.register_buffer("clip_mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("clip_std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def train(self, mode: bool = True) -> PretrainedStem:
        super().train(mode)
        self.trunk.eval()  # frozen: ImageNet's batch-norm statistics, whatever the CLIP around it does
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(x * self.clip_std + self.clip_mean)[-1])


class VocabularyEmbedding(nn.Module):
    """A token-embedding table of ``rows`` tokens behind open_clip's tokenizer: token ids of the full BPE
    vocabulary (``vocab_size``) in, (..., width) embeddings out. ``index`` maps each id to its row; every id outside
    the kept vocabulary reads the last row, zeros (an unknown token). Cut from a trained table by :meth:`cut`, a
    text of known tokens embeds exactly as with the full table.

    Used by: ``adlib.features.clip.build_tiny_clip``, ``adlib.features.clip.restrict_vocabulary``.
    """

    def __init__(self, rows: int, width: int, vocab_size: int):
        super().__init__()
        self.register_buffer("index", torch.full((vocab_size,), rows, dtype=torch.int16))  # rows < 2^15
        self.weight = nn.Parameter(torch.zeros(rows + 1, width))

    @classmethod
    def cut(cls, table: nn.Embedding, ids: torch.Tensor) -> VocabularyEmbedding:
        """The rows ``ids`` (K,) of a full ``table``, the vocabulary of the result."""
        ids = torch.unique(ids)
        cut = cls(len(ids), table.weight.shape[1], table.weight.shape[0])
        cut.index[ids] = torch.arange(len(ids), dtype=torch.int16)
        with torch.no_grad():
            cut.weight[:-1] = table.weight[ids]
        return cut

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.index[tokens].long(), self.weight)
