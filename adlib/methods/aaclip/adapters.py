"""AA-CLIP (Ma et al., CVPR 2025): making CLIP anomaly-aware with two-stage residual adapters.

CLIP's text embeddings of "a bottle" and "a damaged bottle" are nearly the same vector, so comparing
patch features with them localises defects poorly ("anomaly unawareness"). AA-CLIP keeps CLIP frozen
and adds small residual adapters,

    x <- lam * A(x) * |x| / |A(x)| + (1 - lam) * x,   lam = 0.1,

after the first few transformer blocks. Stage 1 trains adapters in the *text* encoder so the normal and
anomalous text anchors of an object separate (image-level classification, patch-level segmentation
against frozen CLIP features, and a disentangle loss on the anchors' inner product). Stage 2 freezes the
text side and trains adapters in the *image* encoder, with one projection per chosen layer, so that
multi-layer patch features line up with those anchors.

Everything runs on an ``open_clip.CLIP``: the book's tiny CLIP (:mod:`adlib.features.clip`) or the paper's
ViT-L-14-336 with OpenAI weights at 518 px (:func:`paper_clip`). Defaults are the official code's
(github.com/Mwxinnn/AA-CLIP: ``model/adapter.py``, ``train.py``, ``forward_utils.py``).

Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
"""
from __future__ import annotations

import functools
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from adlib.features.clip import context_length, encode_normalised, load_open_clip

#: The official prompt states and templates (``dataset/constants.py``): 3 x 2 normal, 5 x 2 anomalous prompts.
NORMAL_STATES: tuple[str, ...] = ("{}", "a {}", "the {}")
ANOMALOUS_STATES: tuple[str, ...] = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect",
                                     "a {} with damage")
TEMPLATES: tuple[str, ...] = ("{}.", "a photo of {}.")


def prompts(object_name: str) -> tuple[list[str], list[str]]:
    """AA-CLIP's (normal prompts, anomalous prompts) for one object name: 6 and 10 strings.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    normal = [t.format(s.format(object_name)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(object_name)) for s in ANOMALOUS_STATES for t in TEMPLATES]
    return normal, anomalous


@functools.lru_cache(maxsize=None)
def _prompt_tokens(object_name: str, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (normal, anomalous) prompts of one object, tokenised once: training asks for them at every step."""
    return tuple(open_clip.tokenize(texts, context_length=context_length) for texts in prompts(object_name))


# --------------------------------------------------------------------------- residual adapters


def residual_adapt(x: torch.Tensor, adapted: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """AA-CLIP's residual update ``lam * a * |x| / |a| + (1 - lam) * x`` along the last dimension.

    ``x``, ``adapted`` (..., C) -> (..., C). Rescaling ``a`` to the norm of ``x`` bounds the change:
    ``|out| <= |x|`` (triangle inequality), with equality when ``a`` points along ``x``, whatever scale
    the adapter's weights have.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam is a mixing weight in [0, 1], got {lam}.")
    scaled = adapted * x.norm(dim=-1, keepdim=True) / adapted.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return lam * scaled + (1.0 - lam) * x


class Adapter(nn.Module):
    """The official ``SimpleAdapter``: a bias-free linear layer and a LeakyReLU, (..., C) -> (..., C).

    Used by: ``adlib.methods.aaclip.adapters.AACLIP``.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.fc(x))


class Projection(nn.Linear):
    """The official ``SimpleProj``: a bias-free linear layer from a Xavier-uniform start, then a LeakyReLU if
    ``relu`` (the official text projection has it; the image projections, trained without ``--relu``, do not).
    (..., C_in) -> (..., C_out).

    Used by: ``adlib.methods.aaclip.adapters.AACLIP``.
    """

    def __init__(self, c_in: int, c_out: int, relu: bool) -> None:
        super().__init__(c_in, c_out, bias=False)
        nn.init.xavier_uniform_(self.weight)
        self.relu = relu

    @classmethod
    def copy_of(cls, proj: torch.Tensor | nn.Linear) -> Projection:
        """A trainable linear copy of a CLIP projection (a (C, D) matrix used as ``x @ proj``, or a Linear)."""
        weight = proj.weight if isinstance(proj, nn.Linear) else proj.T
        layer = cls(weight.shape[1], weight.shape[0], relu=False)
        layer.weight.data.copy_(weight.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return F.leaky_relu(y) if self.relu else y


class AACLIP(nn.Module):
    """A frozen ``open_clip.CLIP`` with AA-CLIP's text adapters (stage 1) and image adapters (stage 2).

    Text: residual adapters after the first ``text_adapt_until`` blocks and a trainable projection.
    Image: residual adapters after the first ``image_adapt_until`` blocks; the patch tokens after the
    blocks in ``levels`` (1-based) go through ``ln_post`` and one trainable projection per level
    (segmentation); a separate projection of the last level, averaged over patches, is the image-level
    ("detection") feature. Defaults are the paper's for ViT-L-14 (24 image and 12 text blocks).

    The trainable projections are the official ones (:class:`Projection`, from a random start);
    ``copy_projections=True`` starts them instead as linear copies of CLIP's own projections, so both stages start
    from CLIP's joint space (an earlier version of the book did that).

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """

    def __init__(
        self,
        clip: open_clip.CLIP,
        text_adapt_until: int = 3,
        image_adapt_until: int = 6,
        levels: Sequence[int] = (6, 12, 18, 24),
        text_adapt_weight: float = 0.1,
        image_adapt_weight: float = 0.1,
        copy_projections: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(clip, open_clip.CLIP) or not hasattr(clip.visual, "_embeds"):
            raise ValueError("AACLIP needs an open_clip.CLIP with a ViT image tower (e.g. ViT-L-14-336, "
                             "or adlib.features.clip.build_tiny_clip()); CustomTextCLIP and ResNet towers are not "
                             "supported.")
        n_text, n_image = len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks)
        levels = tuple(sorted(set(int(i) for i in levels)))
        if not 0 <= text_adapt_until <= n_text or not 0 <= image_adapt_until <= n_image:
            raise ValueError(f"text_adapt_until must be in [0, {n_text}] and image_adapt_until in [0, {n_image}] "
                             f"for this CLIP, got {text_adapt_until} and {image_adapt_until}.")
        if not levels or levels[0] < 1 or levels[-1] > n_image:
            raise ValueError(f"levels are 1-based image block indices in [1, {n_image}], got {levels}.")
        if not clip.transformer.batch_first or not clip.visual.transformer.batch_first:
            raise ValueError("AACLIP expects open_clip's batch-first transformers (open_clip >= 2.23).")
        self.clip = clip.eval().requires_grad_(False)
        self.levels, self.text_lam, self.image_lam = levels, text_adapt_weight, image_adapt_weight
        width_t, width_v = clip.transformer.width, clip.visual.transformer.width
        self.text_adapters = nn.ModuleList(Adapter(width_t) for _ in range(text_adapt_until))
        self.image_adapters = nn.ModuleList(Adapter(width_v) for _ in range(image_adapt_until))
        if copy_projections:
            self.text_proj = Projection.copy_of(clip.text_projection)
            self.seg_proj = nn.ModuleList(Projection.copy_of(clip.visual.proj) for _ in levels)
            self.det_proj = Projection.copy_of(clip.visual.proj)
        else:
            dim = clip.visual.proj.shape[1]
            self.text_proj = Projection(width_t, dim, relu=True)
            self.seg_proj = nn.ModuleList(Projection(width_v, dim, relu=False) for _ in levels)
            self.det_proj = Projection(width_v, dim, relu=False)

    def train(self, mode: bool = True) -> "AACLIP":
        super().train(mode)
        self.clip.eval()  # the backbone never leaves eval mode (no dropout, frozen statistics)
        return self

    def text_parameters(self) -> list[nn.Parameter]:
        """The stage-1 parameters: text adapters and text projection."""
        return [*self.text_adapters.parameters(), *self.text_proj.parameters()]

    def image_parameters(self) -> list[nn.Parameter]:
        """The stage-2 parameters: image adapters and the segmentation and detection projections."""
        return [*self.image_adapters.parameters(), *self.seg_proj.parameters(), *self.det_proj.parameters()]

    @property
    def logit_scale(self) -> float:
        """CLIP's temperature (100 for OpenAI CLIP, the constant of the official code)."""
        return float(self.clip.logit_scale.exp())

    def encode_text(self, tokens: torch.Tensor, adapt: bool = True) -> torch.Tensor:
        """(T, L) tokens -> (T, D) unit text embeddings; ``adapt=False`` is plain CLIP."""
        clip = self.clip
        if not adapt:
            return clip.encode_text(tokens, normalize=True)
        x = clip.token_embedding(tokens) + clip.positional_embedding
        for i, block in enumerate(clip.transformer.resblocks):
            x = block(x, attn_mask=clip.attn_mask)
            if i < len(self.text_adapters):
                x = residual_adapt(x, self.text_adapters[i](x), self.text_lam)
        x = text_global_pool(clip.ln_final(x), tokens, clip.text_pool_type,
                             eos_token_id=getattr(clip, "text_eos_id", None))
        return F.normalize(self.text_proj(x), dim=-1)

    def anchors(self, object_name: str, adapt: bool = True) -> torch.Tensor:
        """(2, D) unit text anchors [normal, anomalous] of one object: each the normalised mean of its prompts."""
        device = self.text_proj.weight.device
        out = []
        for tokens in _prompt_tokens(object_name, context_length(self.clip)):
            emb = self.encode_text(tokens.to(device), adapt)
            out.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(out)

    def encode_image(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(N, 3, S, S) normalised images -> (per level (N, P, D) unit patch features, (N, D) image feature).

        The image feature is the official "detection" token: the patch mean of the unit-normalised
        projection of the last level (not renormalised).
        """
        visual = self.clip.visual
        x = visual._embeds(images)
        tokens = []
        for i, block in enumerate(visual.transformer.resblocks[: self.levels[-1]]):
            x = block(x)
            if i < len(self.image_adapters):
                x = residual_adapt(x, self.image_adapters[i](x), self.image_lam)
            if i + 1 in self.levels:
                tokens.append(visual.ln_post(x[:, 1:]))
        patches = [F.normalize(proj(t), dim=-1) for proj, t in zip(self.seg_proj, tokens)]
        image = F.normalize(self.det_proj(tokens[-1]), dim=-1).mean(1)
        return patches, image

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1's image side from frozen CLIP, for (N, 3, S, S) images through
        :func:`adlib.features.clip.to_tensor`: ((N, P, D) patch + class features, (N, D) class features).

        As the official code, every unit patch feature gets the unit class embedding added, so the
        patch-level loss also sees the image-level evidence.
        """
        image, patches = encode_normalised(self.clip, images)
        device = self.text_proj.weight.device
        return (patches + image[:, None]).to(device), image.to(device)


def resize_input(clip: open_clip.CLIP, image_size: int) -> open_clip.CLIP:
    """Let a ViT CLIP read ``image_size`` px images by interpolating its position embeddings (in place).

    The paper runs ViT-L-14-336 at 518 px (37 x 37 patches); open_clip's ``resize_pos_embed`` does the
    bicubic interpolation.

    Used by: ``adlib.methods.aaclip.adapters.paper_clip``.
    """
    visual = clip.visual
    patch = visual.patch_size[0]
    if image_size % patch:
        raise ValueError(f"image_size must be a multiple of the patch size {patch}, got {image_size}.")
    old = {"visual.positional_embedding": visual.positional_embedding.data}
    visual.image_size = (image_size, image_size)
    visual.grid_size = (image_size // patch, image_size // patch)
    open_clip.model.resize_pos_embed(old, clip)
    visual.positional_embedding = nn.Parameter(old["visual.positional_embedding"],
                                               requires_grad=visual.positional_embedding.requires_grad)
    return clip


def paper_clip(name: str = "ViT-L-14-336", pretrained: str = "openai", image_size: int = 518,
               device: str | torch.device = "cpu") -> open_clip.CLIP:
    """The paper's backbone: ``name`` with ``pretrained`` weights (a tag or a local file) at ``image_size`` px.

    Loading goes through :func:`adlib.features.clip.load_open_clip`, which stops with a clear message when the
    weights are not available offline.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    model, _ = load_open_clip(name, pretrained, device)
    return resize_input(model, image_size)
