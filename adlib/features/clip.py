"""CLIP for anomaly and OOD detection: the model, its encoders and its weights.

Everything here works on an ``open_clip.CLIP`` model: the book's tiny CLIP (``load_tiny_clip``: trained
on :mod:`adlib.data.toyworld` by :mod:`adlib.recipes.tiny_clip`, shipped as package data with a sha256) or a real one
(``load_open_clip``: ViT-B-16 and friends from a local file or a pretrained tag, for the paper profile).

* Encoding: ``tokenize``, ``to_tensor`` (CLIP's preprocessing of an :class:`adlib.data.imageset.ImageSet`),
  ``encode_images`` (global and patch embeddings), ``encode_texts``.
* Zero-shot classification: ``class_embeddings``, ``zero_shot_accuracy``.
* Weights: ``save_clip``, ``load_tiny_clip``, ``tiny_clip_card``, ``load_open_clip`` (a file or a pretrained
  tag; offline it fails at once with a message).
* Paper-profile data: ``read_image_text_folder``, ``read_image_folder``, ``encode_image_files``.

The methods built on it have their own modules: :mod:`adlib.methods.winclip` (WinCLIP-style zero-shot anomaly
scores) and :mod:`adlib.methods.clipn` (CLIPN). For segmentation (chapter 10, AA-CLIP) ``encode_images`` returns the
projected patch tokens of open_clip's ``VisionTransformer`` (its ``output_tokens`` switch) next to the global
embedding.

The shipped weights are ``"tiny-clip"`` in the package's one weights registry (``adlib/weights/registry.json``,
sha256-checked, safetensors with the config in the file's metadata); reproduce them with
``python -m adlib train-clip --out adlib/weights/tiny-clip.safetensors``.

Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from adlib.core.checksum import sha256sum
from adlib.data.imageset import ImageSet, as_image_set
from adlib.features.clip_parts import ConvStem, PretrainedStem, VocabularyEmbedding

#: The tiny CLIP: a ViT with 8 x 8 patches on 64 px images and a small causal text transformer.
#: open_clip's BPE vocabulary (49408 tokens) is kept so the real tokenizer works unchanged.
#: ``conv_stem``: the ViT's patch embedding is a stack of stride-2 3x3 convolutions with these widths
#: (:class:`adlib.features.clip_parts.ConvStem`) instead of one linear patch projection; ``pretrained_stem`` instead:
#: the first stages of a frozen ImageNet CNN of that name (:class:`adlib.features.clip_parts.PretrainedStem`).
TINY_CONFIG: dict = {
    "embed_dim": 64,
    "conv_stem": [32, 64],
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_CLIP = "tiny-clip"  # its name in the weights registry
#: The premise's control (chapter 10): the same training on captions that never name a defect.
TINY_CLIP_CONTROL = "tiny-clip-no-defect-words"
TRAIN_COMMAND = "python -m adlib train-clip --out adlib/weights/tiny-clip.safetensors"
FORMAT = "adlib-tiny-clip/1"
#: Toy-world settings of the tiny CLIP's training captions: defects rare (10 %) and mostly unnamed (10 % of those).
TINY_WORLD = {"defect_rate": 0.1, "name_defect_rate": 0.1, "image_size": 64}


# --------------------------------------------------------------------------- model, text, images


def build_tiny_clip(config: dict | None = None) -> open_clip.CLIP:
    """A randomly initialised ``open_clip.CLIP`` of ``config`` (default :data:`TINY_CONFIG`).

    With a ``conv_stem`` entry the ViT's ``conv1`` (its patch projection) becomes a
    :class:`adlib.features.clip_parts.ConvStem`, with ``pretrained_stem`` a
    :class:`adlib.features.clip_parts.PretrainedStem`; with ``vocabulary`` the token table is a
    :class:`adlib.features.clip_parts.VocabularyEmbedding` of that many rows (:func:`restrict_vocabulary`).

    Used by: ``adlib.features.clip.load_tiny_clip``, ``adlib.recipes.tiny_clip.train_tiny_clip``.
    """
    cfg = copy.deepcopy(config or TINY_CONFIG)
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    if cfg.get("conv_stem"):
        vision = cfg["vision_cfg"]
        model.visual.conv1 = ConvStem(vision["patch_size"], vision["width"], cfg["conv_stem"])
    elif cfg.get("pretrained_stem"):
        model.visual.conv1 = PretrainedStem(cfg["vision_cfg"]["width"], cfg["pretrained_stem"])
    if cfg.get("vocabulary"):  # a table cut by restrict_vocabulary (its index comes with the weights)
        text = cfg["text_cfg"]
        model.token_embedding = VocabularyEmbedding(cfg["vocabulary"], text["width"], text["vocab_size"])
    return model


def restrict_vocabulary(model: open_clip.CLIP, tokens: torch.Tensor, config: dict) -> dict:
    """Cut ``model``'s token table down to the token ids in ``tokens`` (e.g. its training captions through
    :func:`tokenize`), in place (a :class:`adlib.features.clip_parts.VocabularyEmbedding`), and return ``config``
    with the ``vocabulary`` size that :func:`build_tiny_clip` needs to load it. Rows of tokens no training caption
    holds never moved from their random start, so a text of the kept tokens embeds exactly as before.

    Used by: ``adlib.recipes.tiny_clip.train_tiny_clip``.
    """
    model.token_embedding = VocabularyEmbedding.cut(model.token_embedding, tokens.flatten())
    return copy.deepcopy(config) | {"vocabulary": int(model.token_embedding.weight.shape[0] - 1)}


def context_length(model: open_clip.CLIP) -> int:
    """The number of text tokens ``model`` reads.

    Used by: ``adlib.features.clip.tokenize``, ``adlib.methods.aaclip.adapters.AACLIP``.
    """
    return int(model.positional_embedding.shape[0])


def tokenize(texts: Sequence[str] | str, model: open_clip.CLIP) -> torch.Tensor:
    """open_clip's BPE tokenizer (offline) at the model's context length: (T,) strings -> (T, L) int64.

    Used by: ``adlib.methods.clipn.no_encoder_training``, ``adlib.recipes.tiny_clip.train_tiny_clip``.
    """
    return open_clip.tokenize(texts, context_length=context_length(model))


def image_size(model: open_clip.CLIP) -> int:
    """Side of the square images the model's ViT expects.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    return int(model.visual.image_size[0])


def to_tensor(images: ImageSet | np.ndarray | torch.Tensor, size: int | None = None) -> torch.Tensor:
    """CLIP's preprocessing: an :class:`adlib.data.imageset.ImageSet` or float (N, 3, H, W) images in [0, 1] ->
    (N, 3, size, size) float32, resized (bicubic, clamped to [0, 1]) when ``size`` differs and normalised with
    CLIP's mean and std. (Image files go through open_clip's own ``preprocess``: :func:`encode_image_files`.)

    Used by: ``adlib.features.clip.encode_images``, ``adlib.methods.aaclip.scoring.anomaly_scores``.
    """
    x = as_image_set(images).images  # checked there: float (N, 3, H, W) in [0, 1], never uint8
    # Channels-last, the memory layout CLIP's preprocessing always had (it came from (N, H, W, 3) photos): the
    # convolutions that follow then run the same kernels and give the same bits.
    x = torch.as_tensor(x).float().contiguous(memory_format=torch.channels_last)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_images(model: open_clip.CLIP, images: ImageSet | np.ndarray | torch.Tensor, batch_size: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised global and patch embeddings in the joint space.

    ``images``: an :class:`adlib.data.imageset.ImageSet` or float (N, 3, H, W) in [0, 1], preprocessed by
    :func:`to_tensor` at the model's image size. Returns ((N, D) global, (N, P, D) patches) where P = (S / patch)^2
    in row-major order; patch tokens pass through the same final norm and projection as the class token (the way
    WinCLIP-style methods read them), so they can be compared with text embeddings.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    return encode_normalised(model, to_tensor(images, image_size(model)), batch_size)


def patch_maps(patch_scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, P) scores of the patch tokens of :func:`encode_images` (row-major on a square grid) -> (N, H, W) maps at
    the image ``size``, upsampled bilinearly.

    Used by: ``adlib.methods.winclip.winclip_scores``, ``adlib.recipes.clipn_caption.CLIPNDetector``.
    """
    side = int(round(math.sqrt(patch_scores.shape[1])))
    grid = patch_scores.reshape(-1, 1, side, side)
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def encode_normalised(model: open_clip.CLIP, x: torch.Tensor, batch_size: int = 256
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_images` of images already through :func:`to_tensor`: (N, 3, S, S) -> ((N, D), (N, P, D)).

    Used by: ``adlib.features.clip.encode_images``, ``adlib.methods.aaclip.adapters.AACLIP``.
    """
    visual, device = model.visual, next(model.parameters()).device
    pooled_all, tokens_all = [], []
    before = visual.output_tokens
    visual.output_tokens = True  # open_clip's VisionTransformer then returns (pooled, tokens)
    try:
        for i in range(0, len(x), batch_size):
            pooled, tokens = visual(x[i:i + batch_size].to(device))
            if visual.proj is not None:
                tokens = tokens @ visual.proj
            pooled_all.append(F.normalize(pooled.float(), dim=-1).cpu())
            tokens_all.append(F.normalize(tokens.float(), dim=-1).cpu())
    finally:
        visual.output_tokens = before
    return torch.cat(pooled_all), torch.cat(tokens_all)


@torch.no_grad()
def encode_texts(model: open_clip.CLIP, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """(T,) strings -> (T, D) L2-normalised text embeddings.

    Used by: ``adlib.features.clip.class_embeddings``, ``adlib.methods.winclip.text_anchors``.
    """
    device = next(model.parameters()).device
    tokens = tokenize(list(texts), model)
    out = [model.encode_text(tokens[i:i + batch_size].to(device), normalize=True).float().cpu()
           for i in range(0, len(tokens), batch_size)]
    return torch.cat(out)


# --------------------------------------------------------------------------- zero-shot classification

#: Prompt templates for zero-shot classification of toy objects (an ensemble, as CLIP does for ImageNet).
CLASS_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "a picture of a {}.")


def class_embeddings(model: open_clip.CLIP, classnames: Sequence[str],
                     templates: Sequence[str] = CLASS_TEMPLATES,
                     encode: Callable[[Sequence[str]], torch.Tensor] | None = None) -> torch.Tensor:
    """(C,) class names -> (C, D) unit class embeddings: the mean of the normalised template embeddings.

    ``encode`` maps strings to (T, D) unit embeddings (default: the model's text encoder); CLIPN passes
    its "no" encoder here.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    encode = encode or (lambda texts: encode_texts(model, texts))
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = encode(prompts).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


def zero_shot_logits(model: open_clip.CLIP, image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """(N, D) image and (C, D) class embeddings (unit) -> (N, C) logits scaled by the model's temperature.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    return model.logit_scale.exp().detach().float() * image_emb @ class_emb.T


def zero_shot_accuracy(model: open_clip.CLIP, images: ImageSet | np.ndarray | torch.Tensor, labels: np.ndarray,
                       classnames: Sequence[str], templates: Sequence[str] = CLASS_TEMPLATES) -> float:
    """Top-1 accuracy of zero-shot classification: images as :func:`encode_images` takes them, (N,) ``labels``
    indexing ``classnames``.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    image_emb, _ = encode_images(model, images)
    pred = (image_emb @ class_embeddings(model, classnames, templates).T).argmax(1).numpy()
    return float((pred == np.asarray(labels)).mean())


# --------------------------------------------------------------------------- weights on disk


#: The state-dict keys of a pretrained stem's frozen CNN (:class:`adlib.features.clip_parts.PretrainedStem`). They are
#: not written: they are the ImageNet weights that :func:`build_tiny_clip` loads from the package, which training
#: never changes, so a hybrid file holds only what training made (0.8 MB instead of 6.7) and loads with the exact
#: fp32 trunk it was trained with.
FROZEN_TRUNK = "visual.conv1.trunk."


def save_clip(model: open_clip.CLIP, path: str | os.PathLike, config: dict, meta: dict | None = None) -> str:
    """Write ``model`` as fp16 safetensors with ``config`` (its :func:`build_tiny_clip` config) and ``meta`` (JSON)
    in the file's metadata, without a pretrained stem's frozen CNN (:data:`FROZEN_TRUNK`); refuses to overwrite a
    file; returns the file's sha256.

    Used by: ``adlib.recipes.tiny_clip.train_tiny_clip``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose another file or delete it first.")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items() if not k.startswith(FROZEN_TRUNK)}
    # One metadata key: safetensors writes several in no fixed order, and the bytes (so the sha256) must repeat.
    header = json.dumps({"format": FORMAT, "config": config, "meta": meta or {}}, sort_keys=True)
    save_file(state, str(path), metadata={"adlib": header})
    return sha256sum(path)


def _read_clip_file(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state dict, config, meta) of a file written by :func:`save_clip`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("adlib", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); is it corrupt?") from err
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tiny CLIP written by adlib.features.clip.save_clip (format {FORMAT}).")
    return state, header["config"], header["meta"]


def load_tiny_clip(weights: str | os.PathLike | None = None, sha256: str | None = None) -> open_clip.CLIP:
    """A tiny CLIP, in eval mode, fp32: the shipped ``"tiny-clip"`` (None; sha256-checked by the registry) or a file
    written by :func:`save_clip` (checked against ``sha256`` if given).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    from adlib.weights.registry import weights_file

    path = weights_file(TINY_CLIP if weights is None else weights)
    if sha256 is not None and (actual := sha256sum(path)) != sha256:
        raise ValueError(f"{path} has sha256 {actual}, expected {sha256}: the file is corrupt or was replaced. "
                         f"Restore it or retrain with `{TRAIN_COMMAND}`.")
    state, config, _ = _read_clip_file(path)
    model = build_tiny_clip(config)  # a pretrained stem's frozen CNN comes from here, not from the file
    model.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(FROZEN_TRUNK)}
                          | {k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def tiny_clip_card(weights: str | os.PathLike | None = None) -> dict:
    """What is known about tiny CLIP weights: for the shipped one (None) its registry entry (sha256, config,
    command, training settings ``train``, evaluation ``eval``), for a file its metadata plus its sha256.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    from adlib.weights.registry import shipped_weights, weights_file

    name = TINY_CLIP if weights is None else str(weights)
    registry = shipped_weights()
    if name in registry:
        return registry[name]
    path = weights_file(name)
    _, config, meta = _read_clip_file(path)
    return {"file": path.name, "sha256": sha256sum(path), "config": config, **meta}


def load_open_clip(name: str = "ViT-B-16", pretrained: str = "openai", device: str | torch.device = "cpu"
                   ) -> tuple[open_clip.CLIP, Callable]:
    """A real CLIP through ``open_clip.create_model_and_transforms``: (model in eval mode, test preprocess).

    ``pretrained`` is a local checkpoint file (an open_clip/OpenAI state dict) or a pretrained tag such
    as ``"openai"`` or ``"laion2b_s34b_b88k"``. With ``HF_HUB_OFFLINE=1`` (or no network) a tag that is
    not already in the Hugging Face cache stops at once with a message saying what to download.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    if name not in open_clip.list_models():
        raise ValueError(f"Unknown open_clip model {name!r}; see open_clip.list_models().")
    if not os.path.isfile(pretrained):
        tags = [t for m, t in open_clip.list_pretrained() if m == name]
        if pretrained not in tags:
            raise FileNotFoundError(f"{pretrained!r} is neither a file nor a pretrained tag of {name} ({tags}).")
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if offline and not _in_hf_cache(cfg):
            raise FileNotFoundError(
                f"{name}/{pretrained} weights are not in the Hugging Face cache and HF_HUB_OFFLINE is set. "
                f"On a machine with internet run open_clip.create_model_and_transforms({name!r}, "
                f"pretrained={pretrained!r}) once (hub repo {cfg.get('hf_hub') or cfg.get('url')}), or pass "
                f"pretrained='/path/to/weights.bin' (a local state dict).")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except RuntimeError as err:
        raise FileNotFoundError(f"Could not load {name} weights {pretrained!r}: {err}. Download them on a "
                                f"machine with internet, or pass a local file path.") from err
    return model.eval(), preprocess


def _in_hf_cache(cfg: dict) -> bool:
    """Whether a pretrained tag's weights are already in the local Hugging Face cache (no network)."""
    hub = cfg.get("hf_hub") or ""
    if not hub:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo_id = "/".join(hub.strip("/").split("/")[:2])
    files = [hub.strip("/").split("/", 2)[2]] if hub.strip("/").count("/") >= 2 else [
        "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files)


@torch.no_grad()
def encode_image_files(model: open_clip.CLIP, preprocess: Callable, paths: Sequence[Path], batch_size: int = 128
                       ) -> torch.Tensor:
    """Image files -> (N, D) unit embeddings, with open_clip's preprocessing (paper profile).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    from PIL import Image

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
        out.append(model.encode_image(x.to(device), normalize=True).float().cpu())
    return torch.cat(out)
