"""Vision transformers as feature extractors: patch tokens of chosen blocks, attention maps, attention distance."""
from __future__ import annotations

import timm
import torch
from torch import nn

from adlib.weights.registry import load_weights, shipped_entry, timm_pretrained


def vit_backbone(name: str = "vit_base_patch16_224", image_size: int = 224, weights: str | None = None,
                 patch_size: int | None = None, depth: int | None = None, seed: int = 0) -> nn.Module:
    """A timm Vision Transformer for ``image_size`` px inputs, without classifier, in eval mode (for
    :class:`ViTStages`).

    ``weights`` as in :func:`feature_extractor`: ``None`` = random init seeded by ``seed``, ``"imagenet"`` =
    timm's pretrained weights (needs the hub or its cache), a shipped name (e.g. ``"book-vit-tiny"``, whose
    patch size and depth come from the registry) or a local file. Position embeddings are resized to
    ``image_size``. ``patch_size`` and ``depth`` (number of blocks) override the architecture's; pretrained
    weights fix them. Tensors of a weights file that the model lacks (e.g. a classifier head) are ignored;
    tensors the model needs but the file lacks are an error.

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """
    options = {"img_size": image_size, "num_classes": 0} | ({"patch_size": patch_size} if patch_size else {}) | (
        {"depth": depth} if depth else {})
    if weights == "imagenet":
        if patch_size or depth:
            raise ValueError("patch_size and depth cannot change with pretrained weights; leave them None.")
        return timm_pretrained(name, "vit_backbone", **options).eval()
    entry = shipped_entry(weights, name, "vit_backbone")
    if entry is not None:
        fixed = entry.get("options", {})
        clash = {k: v for k, v in fixed.items() if k in options and options[k] != v}
        if clash:
            raise ValueError(f"{weights!r} was trained with {fixed}; leave {sorted(clash)} unset.")
        options |= fixed
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **options)
    if weights is not None:
        state = load_weights(weights)
        if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
            from timm.layers import resample_abs_pos_embed
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(model.patch_embed.grid_size),
                                                        num_prefix_tokens=prefix)
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"weights {str(weights)!r} lack {len(missing)} tensors of {name!r}, e.g. "
                             f"{missing[:3]}; they were trained for another architecture.")
    return model.eval()


class ViTStages(nn.Module):
    """A timm ViT seen like a ``features_only`` CNN: ``forward`` returns the patch-token maps of ``blocks``.

    images (N, 3, H, W) -> list of (N, C, H / patch, W / patch), class token dropped; blocks after the
    last requested one are not run. :func:`patch_features` and ``adlib.recipes.pretrain`` use it like a CNN trunk.

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """

    def __init__(self, vit: nn.Module, blocks: tuple[int, ...]):
        super().__init__()
        depth = len(vit.blocks)
        if not blocks or min(blocks) < 0 or max(blocks) >= depth:
            raise ValueError(f"blocks must be indices in 0..{depth - 1} of the model's {depth} blocks, got {blocks}.")
        self.vit, self.blocks = vit, tuple(blocks)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.vit.forward_intermediates(images, indices=list(self.blocks), stop_early=True,
                                              output_fmt="NCHW", intermediates_only=True)


@torch.no_grad()
def attention_maps(vit: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The attention probabilities of every block of a timm ViT for ``images`` (N, 3, H, W), as the model
    expects them (normalised if its weights need it): a list, one per block, of (N, heads, T, T) with T tokens,
    prefix (class) tokens first. Recomputed from each block's query and key projections, softmax(q k^T / sqrt(d)).

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """
    inputs: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in vit.blocks]
    try:
        vit.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for block, x in zip(vit.blocks, inputs):
        attn = block.attn
        b, t, _ = x.shape
        q, k, _ = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out.append((q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1))
    return out


def mean_attention_distance(attention: torch.Tensor, grid: tuple[int, int], patch_px: int,
                            n_prefix: int = 1) -> torch.Tensor:
    """Mean attention distance per head (heads,), in pixels: for every patch token, the distance to the other
    patch tokens weighted by its attention to them (renormalised over the patch tokens), averaged over tokens and
    images. ``attention`` (N, heads, T, T) from :func:`attention_maps`; ``grid`` the token grid (h, w);
    ``n_prefix`` the class/register tokens to drop. A CNN's receptive field grows with depth; this measures how
    far a ViT's blocks look (Dosovitskiy et al. 2021, Fig. 7).

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """
    h, w = grid
    a = attention[..., n_prefix:, n_prefix:]
    if a.shape[-1] != h * w:
        raise ValueError(f"attention has {a.shape[-1]} patch tokens, the grid {h} x {w} has {h * w}.")
    a = a / a.sum(-1, keepdim=True)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], 1).to(a.dtype) * patch_px
    dist = torch.cdist(pos, pos)  # (h*w, h*w)
    return (a * dist).sum(-1).mean(dim=(0, 2))
