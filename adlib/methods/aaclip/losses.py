"""AA-CLIP's losses: the disentangle loss on text anchors and the segmentation loss (focal + dice)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- losses


def disentangle_loss(anchors: torch.Tensor) -> torch.Tensor:
    """The official disentangle ("orthogonal") loss: the squared batch mean of <normal, anomalous>.

    ``anchors`` (B, 2, D) or (2, D) unit anchors [normal, anomalous] -> scalar ``(mean_b n_b . a_b)^2``.

    Used by: ``adlib.methods.aaclip.training.text_adapter_training``.
    """
    if anchors.dim() == 2:
        anchors = anchors[None]
    if anchors.dim() != 3 or anchors.shape[1] != 2:
        raise ValueError(f"anchors must be (B, 2, D) or (2, D) [normal, anomalous], got {tuple(anchors.shape)}.")
    return (anchors[:, 0] * anchors[:, 1]).sum(-1).mean() ** 2


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The official focal loss on 2-class probability maps, averaged over pixels.

    ``probs`` (N, 2, H, W) [normal, anomalous] probabilities; ``mask`` (N, H, W) in {0, 1}. With the
    smoothed one-hot target (``1 - smooth`` / ``smooth``), ``p_t = (1 - smooth) p_true + smooth p_other
    + smooth`` and the loss is ``-(1 - p_t)^gamma log p_t``.

    Used by: ``adlib.methods.aaclip.losses.segmentation_loss``.
    """
    target = F.one_hot(mask.long(), 2).permute(0, 3, 1, 2).to(probs.dtype).clamp(smooth, 1.0 - smooth)
    pt = (target * probs).sum(1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary dice loss with smoothing 1: ``1 - mean_n (2 sum(p t) + 1) / (sum p + sum t + 1)``; (N, H, W) each.

    Used by: ``adlib.methods.aaclip.losses.segmentation_loss``.
    """
    p, t = pred.flatten(1), target.flatten(1).to(pred.dtype)
    return 1.0 - ((2.0 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)).mean()


def segmentation_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Official patch-level loss: focal + dice(normal map, 1 - mask) + dice(anomalous map, mask).

    ``probs`` (N, 2, H, W) probabilities, ``mask`` (N, H, W) in {0, 1} -> scalar.

    Used by: ``adlib.methods.aaclip.training.stage2_loss``.
    """
    mask = mask.to(probs.dtype)
    return focal_loss(probs, mask) + dice_loss(probs[:, 0], 1.0 - mask) + dice_loss(probs[:, 1], mask)
