"""Tests of adlib.features.clip: encodings, weights on disk, WinCLIP-style scores, CLIPN losses and scores."""
from __future__ import annotations

import copy
import json
import math
import time

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from sklearn.metrics import roc_auc_score

from adlib import cli
from adlib.core.checksum import sha256sum
from adlib.data import image_folders, toyworld
from adlib.data.imageset import ImageSet
from adlib.features import clip, clip_parts
from adlib.methods import clipn, winclip
from adlib.recipes import tiny_clip
from adlib.weights import registry
from test_train import Interrupted, interrupted_after

SMALL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return clip.build_tiny_clip(SMALL).eval()


@pytest.fixture(scope="module")
def images():
    return toyworld.sample(6, seed=0, image_size=32).images


# --------------------------------------------------------------------------- encodings


def test_encode_images_matches_open_clip_and_gives_patch_tokens(model, images):
    glob, patches = clip.encode_images(model, images, batch_size=4)
    assert glob.shape == (6, 16) and patches.shape == (6, (32 // 8) ** 2, 16)
    with torch.no_grad():
        ref = model.encode_image(clip.to_tensor(images), normalize=True)
    torch.testing.assert_close(glob, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(6, 16), atol=1e-5, rtol=0)
    assert model.visual.output_tokens is False  # restored


def test_to_tensor_normalises_an_image_set_and_rejects_other_input():
    x = clip.to_tensor(ImageSet(np.ones((1, 3, 4, 4), np.float32)))
    expected = (1 - torch.tensor(open_clip.OPENAI_DATASET_MEAN)) / torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(x[0, :, 0, 0], expected)
    torch.testing.assert_close(clip.to_tensor(torch.ones(1, 3, 4, 4)), x)  # a float tensor in [0, 1] too
    assert clip.to_tensor(np.ones((2, 3, 4, 4), np.float32), size=8).shape == (2, 3, 8, 8)
    for wrong, says in [(np.zeros((1, 4, 4, 3), np.uint8), "ImageSet.from_uint8"),
                        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "ImageSet.from_uint8"),
                        (np.zeros((1, 4, 4, 3), np.float32), r"\(N, 3, H, W\)"),
                        (torch.randn(1, 3, 4, 4), "before any normalisation")]:
        with pytest.raises(ValueError, match=says):
            clip.to_tensor(wrong)


def test_to_tensor_of_an_image_set_equals_the_old_uint8_preprocessing_bit_for_bit():
    """CLIP's preprocessing used to read (N, H, W, 3) uint8; an ImageSet.from_uint8 of the same photos gives the same
    bits, memory layout included (so the convolutions that follow run the same kernels)."""
    photos = np.random.default_rng(0).integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    old = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255.0
    for size in (None, 20, 32):
        ref = old if size in (None, 20) else F.interpolate(old, size=(size, size), mode="bicubic",
                                                           align_corners=False).clamp(0, 1)
        ref = (ref - mean) / std
        for images in (ImageSet.from_uint8(photos), ImageSet.from_uint8(photos)[[0, 2, 4, 1, 3]][[0, 3, 1, 4, 2]],
                       np.ascontiguousarray(ImageSet.from_uint8(photos).images)):
            new = clip.to_tensor(images, size)
            assert torch.equal(new, ref) and new.stride() == ref.stride()


def test_zero_shot_accuracy_equals_brute_force(model, images):
    labels = np.array([0, 1, 2, 0, 1, 2])
    names = ["star", "circle", "ring"]
    acc = clip.zero_shot_accuracy(model, images, labels, names, templates=("a photo of a {}.",))
    glob, _ = clip.encode_images(model, images)
    text = clip.encode_texts(model, [f"a photo of a {n}." for n in names])
    pred = [int(np.argmax([float(g @ t) for t in text])) for g in glob]
    assert acc == pytest.approx(np.mean(np.array(pred) == labels))


# --------------------------------------------------------------------------- weights


def test_save_load_roundtrip_and_sha_check(model, tmp_path):
    path = tmp_path / "w.safetensors"
    sha = clip.save_clip(model, path, SMALL, {"note": "test"})
    card = clip.tiny_clip_card(path)
    assert card["sha256"] == sha == sha256sum(path) and card["note"] == "test" and card["config"] == SMALL
    loaded = clip.load_tiny_clip(path, sha256=sha)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float() if v.is_floating_point() else v)
    with pytest.raises(ValueError, match="sha256"):
        clip.load_tiny_clip(path, sha256="0" * 64)
    with pytest.raises(FileExistsError, match="exists"):
        clip.save_clip(model, path, SMALL)  # nothing is overwritten
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        clip.load_tiny_clip(broken)
    with pytest.raises(FileNotFoundError, match="neither a shipped name"):
        clip.load_tiny_clip(tmp_path / "missing.safetensors")
    # The bytes (so the sha256) do not depend on the file's name.
    assert clip.save_clip(model, tmp_path / "other_name.safetensors", SMALL) == clip.save_clip(
        model, tmp_path / "x.safetensors", SMALL)


def test_shipped_tiny_clip_is_checked_by_the_registry(monkeypatch, tmp_path):
    entry = registry.shipped_weights()[clip.TINY_CLIP]
    assert entry["kind"] == "clip" and entry["command"].startswith(clip.TRAIN_COMMAND)
    copy = tmp_path / entry["file"]
    copy.write_bytes((registry.WEIGHTS_DIR / entry["file"]).read_bytes()[:-1] + b"x")
    (tmp_path / "registry.json").write_text((registry.WEIGHTS_DIR / "registry.json").read_text())
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ValueError, match="sha256 mismatch .*tiny-clip.safetensors.*train-clip"):
        clip.load_tiny_clip()


def test_the_premise_control_differs_from_the_shipped_clip_only_in_its_captions():
    shipped = registry.shipped_weights()
    clip_, control = shipped[clip.TINY_CLIP], shipped[clip.TINY_CLIP_CONTROL]

    def settings(entry: dict) -> tuple[dict, dict]:
        config = {k: v for k, v in entry["config"].items() if k != "vocabulary"}  # each keeps its captions' tokens
        train = {k: v for k, v in entry["train"].items() if k not in ("seconds", "final_loss")}
        return config, train

    (config, train), (control_config, control_train) = settings(clip_), settings(control)
    assert config == control_config
    assert train["world"]["caption_world"] == control_train["world"]["caption_world"] | {"defect_words": True}
    assert not control_train["world"]["caption_world"]["defect_words"]
    train["world"], control_train["world"] = {}, {}
    assert train == control_train  # the same steps, batches, seed and optimiser
    assert control["command"].endswith("--world caption-no-defect-words" + clip_["command"].split("caption")[-1])


def test_conv_stem_replaces_the_patch_projection(images, tmp_path):
    cfg = dict(SMALL, conv_stem=[8, 16])
    torch.manual_seed(0)
    m = clip.build_tiny_clip(cfg).eval()
    assert isinstance(m.visual.conv1, clip_parts.ConvStem)
    glob, patches = clip.encode_images(m, images)
    assert glob.shape == (6, 16) and patches.shape == (6, (32 // 8) ** 2, 16)
    clip.save_clip(m, tmp_path / "w.safetensors", cfg)  # batch-norm buffers travel with the weights
    torch.testing.assert_close(clip.encode_images(clip.load_tiny_clip(tmp_path / "w.safetensors"), images)[0], glob,
                               atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        clip_parts.ConvStem(6, 16, [8])
    with pytest.raises(ValueError, match="widths"):
        clip_parts.ConvStem(8, 16, [8])


def test_shipped_tiny_clip_loads_is_small_and_knows_shapes():
    card = clip.tiny_clip_card()
    assert registry.weights_file(clip.TINY_CLIP).stat().st_size <= 15 * 2**20
    m = clip.load_tiny_clip()  # checks the sha256
    assert clip.image_size(m) == card["config"]["vision_cfg"]["image_size"]
    # Recomputed here on fresh held-out scenes: far above chance (0.1) for shapes, the classes of chapter 9.
    held = toyworld.sample(200, seed=card["eval"]["seed"] + 100, **clip.TINY_WORLD)
    assert clip.zero_shot_accuracy(m, held.images, held.classes, toyworld.SHAPES) > 0.5


def test_pretrained_stem_is_a_frozen_imagenet_cnn_that_stays_in_eval_mode(images, tmp_path):
    cfg = dict(SMALL, pretrained_stem="effnet-lite0")
    torch.manual_seed(0)
    m = clip.build_tiny_clip(cfg)
    stem = m.visual.conv1
    assert isinstance(stem, clip_parts.PretrainedStem)
    assert not any(p.requires_grad for p in stem.trunk.parameters()) and stem.proj.weight.requires_grad
    m.train()
    assert not stem.trunk.training and stem.proj.training  # ImageNet's batch-norm statistics stay
    x = clip.to_tensor(images, 32)
    # the trunk sees the images as its weights expect, whatever CLIP's normalisation did to them
    torch.testing.assert_close(stem.trunk(x * stem.clip_std + stem.clip_mean)[-1],
                               stem.trunk(torch.from_numpy(images.images))[-1], atol=1e-4, rtol=0)
    assert stem(x).shape == (6, 32, 4, 4)  # stride 8, the patch size
    glob, patches = clip.encode_images(m.eval(), images)
    clip.save_clip(m, tmp_path / "w.safetensors", cfg)
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert not any(k.startswith(clip.FROZEN_TRUNK) for k in f.keys())  # the package's ImageNet weights
    loaded = clip.load_tiny_clip(tmp_path / "w.safetensors")
    for k, v in m.state_dict().items():
        if k.startswith(clip.FROZEN_TRUNK):
            assert torch.equal(loaded.state_dict()[k], v), k  # the exact fp32 trunk, not an fp16 copy
    torch.testing.assert_close(clip.encode_images(loaded, images)[0], glob, atol=2e-3, rtol=0)


def test_a_vocabulary_table_embeds_known_texts_as_the_full_table_and_is_small(tmp_path):
    torch.manual_seed(0)
    full = clip.build_tiny_clip(SMALL).eval()
    captions = ["a photo of a small red star on wood.", "the ring is blue."]
    cut = copy.deepcopy(full)
    config = clip.restrict_vocabulary(cut, clip.tokenize(captions, cut), SMALL)
    known = ["a photo of a red ring.", "the star.", "a small blue star on wood."]
    assert torch.equal(clip.encode_texts(cut, known), clip.encode_texts(full, known))
    assert isinstance(cut.token_embedding, clip_parts.VocabularyEmbedding)
    rows = cut.token_embedding.weight.shape[0]
    assert config["vocabulary"] == rows - 1 == len(torch.unique(clip.tokenize(captions, cut)))
    unknown = clip.tokenize(["dragon"], cut)[0, 1]  # an id no caption holds reads the zero row
    assert not cut.token_embedding(unknown[None]).any()
    clip.save_clip(cut, tmp_path / "cut.safetensors", config)
    clip.save_clip(full, tmp_path / "full.safetensors", SMALL)
    assert (tmp_path / "cut.safetensors").stat().st_size < 0.5 * (tmp_path / "full.safetensors").stat().st_size
    loaded = clip.load_tiny_clip(tmp_path / "cut.safetensors")
    torch.testing.assert_close(clip.encode_texts(loaded, known), clip.encode_texts(full, known), atol=2e-3, rtol=0)


def _train_clip_command(out, monkeypatch, *extra: str) -> dict:
    """Run ``python -m adlib train-clip`` for 2 steps of a small CLIP into ``out``; its card."""
    monkeypatch.setattr(tiny_clip, "TINY_CONFIG", SMALL)
    n_threads = torch.get_num_threads()
    try:
        argv = ["train-clip", "--out", str(out), "--steps", "2", "--batch-size", "8", "--pairs", "16", "--eval", "10",
                *extra]
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(n_threads)
    return clip.tiny_clip_card(out)


def test_train_tiny_command_smoke(tmp_path, monkeypatch):
    out = tmp_path / "tiny.safetensors"
    card = _train_clip_command(out, monkeypatch, "--threads", "1", "--defect-rate", "0.5", "--name-defect-rate", "1")
    assert card["train"]["steps"] == 2 and card["sha256"] == sha256sum(out)
    assert card["train"]["world"] == {"defect_rate": 0.5, "name_defect_rate": 1.0, "image_size": 32}
    # The settings that differ from the defaults; --out and --threads do not change the weights.
    assert card["command"] == (clip.TRAIN_COMMAND + " --steps 2 --batch-size 8 --pairs 16 --eval 10 "
                               "--defect-rate 0.5 --name-defect-rate 1.0")
    clip.load_tiny_clip(out)


def test_train_tiny_command_on_the_caption_world(tmp_path, monkeypatch):
    card = _train_clip_command(tmp_path / "tiny.safetensors", monkeypatch, "--world", "caption-no-defect-words",
                               "--stem", "effnet-lite0")
    assert card["train"]["world"]["caption_world"]["defect_words"] is False
    assert card["config"]["pretrained_stem"] == "effnet-lite0" and "conv_stem" not in card["config"]
    assert card["command"].endswith("--eval 10 --world caption-no-defect-words --stem effnet-lite0")
    assert 0 <= card["eval"]["zero_shot_shape_accuracy"] <= 1 and card["config"]["vocabulary"] < 200
    assert set(card["eval"]["tower"]) == {"held-out object accuracy", "image: global feature",
                                          "image: max of a patch probe", "patch: inside a defect?",
                                          "anchor cosine (normal, anomalous)", "WinCLIP image AUROC"}


def test_tiny_clip_training_resumes_bit_exactly_after_an_interruption(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_clip, "steps_per_epoch", lambda steps: 2)  # 2 epochs of 2 steps
    args = dict(steps=4, batch_size=8, n_pairs=16, warmup=1, n_eval=10, config=SMALL, progress=False)
    tiny_clip.train_tiny_clip(tmp_path / "whole.safetensors", **args)
    ckpt = tmp_path / "ckpt.pt"
    with interrupted_after(3), pytest.raises(Interrupted):
        tiny_clip.train_tiny_clip(tmp_path / "never.safetensors", checkpoint=ckpt, **args)
    tiny_clip.train_tiny_clip(tmp_path / "resumed.safetensors", checkpoint=ckpt, **args)
    whole, resumed = (clip.load_tiny_clip(tmp_path / f"{n}.safetensors").state_dict() for n in ("whole", "resumed"))
    for k, v in whole.items():
        assert torch.equal(v, resumed[k]), k


def test_load_open_clip_from_a_local_state_dict(tmp_path, model):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "adlib-test-tiny.json").write_text(json.dumps(SMALL))
    open_clip.add_model_config(tmp_path / "cfg")
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    loaded, preprocess = clip.load_open_clip("adlib-test-tiny", str(path))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert callable(preprocess)


def test_load_open_clip_offline_tag_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.time()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        clip.load_open_clip("ViT-B-16", "openai")
    assert time.time() - start < 5
    with pytest.raises(FileNotFoundError, match="neither a file nor a pretrained tag"):
        clip.load_open_clip("ViT-B-16", "no-such-tag")


# --------------------------------------------------------------------------- WinCLIP-style baseline


def test_prompt_ensemble_sizes():
    normal, anomalous = winclip.prompt_ensemble("star")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert "a photo of a flawless star." in normal and "a photo of a damaged star." in anomalous


def test_winclip_scores_match_manual_computation(model, images):
    scores, maps = winclip.winclip_scores(model, images, "star")
    assert scores.shape == (6,) and maps.shape == (6, 32, 32)
    assert ((0 <= maps) & (maps <= 1)).all()
    normal, anomalous = winclip.prompt_ensemble("star")
    anchors = torch.stack([F.normalize(clip.encode_texts(model, p).mean(0), dim=-1) for p in (normal, anomalous)])
    glob, patches = clip.encode_images(model, images)
    s = model.logit_scale.exp().item()
    for i in range(6):
        a, b = s * float(glob[i] @ anchors[0]), s * float(glob[i] @ anchors[1])
        assert scores[i] == pytest.approx(math.exp(b) / (math.exp(a) + math.exp(b)), rel=1e-4)
    # the map's mean equals the mean patch probability (bilinear upsampling by an integer factor, edges clamped)
    p = (s * patches @ anchors.T).softmax(-1)[..., 1]
    assert maps[0].max() <= p[0].max().item() + 1e-6 and maps[0].min() >= p[0].min().item() - 1e-6
    # the same images as a float tensor or array give the same scores; uint8 photos are refused
    for same in (images.tensor(), images.images):
        again = winclip.winclip_scores(model, same, "star")
        np.testing.assert_array_equal(again[0], scores)
        np.testing.assert_array_equal(again[1], maps)
    with pytest.raises(ValueError, match="from_uint8"):
        winclip.winclip_scores(model, np.zeros((1, 32, 32, 3), np.uint8), "star")


# --------------------------------------------------------------------------- CLIPN losses and scores


def test_itbo_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    no = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # yes logits = identity, no logits = anti-identity (scale 1):
    # match (i, i): p_yes = e^1 / (e^1 + e^0); non-match (i, j): p_no = e^1 / (e^0 + e^1)
    p = math.e / (math.e + 1)
    loss_yes, loss_no = clipn.itbo_loss(img, txt, no, 1.0)
    assert loss_yes.item() == pytest.approx(-math.log(p))
    assert loss_no.item() == pytest.approx(-math.log(p))
    # with scale 2 and a custom match matrix that calls every pair a match, loss_no has no terms -> 0
    loss_yes, loss_no = clipn.itbo_loss(img, txt, no, 2.0, positives=torch.ones(2, 2, dtype=torch.bool))
    q_diag, q_off = math.exp(2) / (math.exp(2) + 1), 1 / (1 + math.exp(2))
    assert loss_yes.item() == pytest.approx(-(2 * math.log(q_diag) + 2 * math.log(q_off)) / 4)
    assert loss_no.item() == 0.0


def test_tso_loss_hand_computed():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert clipn.tso_loss(t, t).item() == pytest.approx(2 - math.sqrt(1e-4), rel=1e-5)
    assert clipn.tso_loss(t, -t).item() == pytest.approx(2 - math.sqrt(4 + 1e-4), abs=1e-6)
    orth = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert clipn.tso_loss(t, orth).item() == pytest.approx(2 - math.sqrt(2 + 1e-4), rel=1e-5)
    parts = clipn.clipn_loss(t, t, orth, 1.0)
    assert parts["loss"].item() == pytest.approx(0.5 * (parts["itbo_yes"] + parts["itbo_no"] + parts["tso"]).item())


def test_ood_scores_against_loops():
    gen = torch.Generator().manual_seed(0)
    yes, no = torch.randn(5, 3, generator=gen) * 3, torch.randn(5, 3, generator=gen) * 3
    msp, ctw, atd = clipn.msp_score(yes), clipn.ctw_score(yes, no), clipn.atd_score(yes, no)
    for i in range(5):
        e = np.exp(yes[i].numpy().astype(np.float64))
        probs = e / e.sum()
        p_yes = [math.exp(yes[i, c]) / (math.exp(yes[i, c]) + math.exp(no[i, c])) for c in range(3)]
        k = int(np.argmax(probs))
        assert 1 / (1 + math.exp(-msp[i])) == pytest.approx(1 - probs[k], abs=1e-6)  # log-odds of 1 - max p
        assert 1 / (1 + math.exp(-ctw[i])) == pytest.approx(1 - p_yes[k], abs=1e-6)  # sigmoid(no - yes) = p_no
        assert math.exp(atd[i]) == pytest.approx(1 - sum(probs[c] * p_yes[c] for c in range(3)), abs=1e-6)


def test_ood_scores_rank_without_ties_at_clip_scale_and_keep_the_probability_order():
    gen = torch.Generator().manual_seed(0)
    yes, no = 100 * torch.rand(500, 6, generator=gen), 100 * torch.rand(500, 6, generator=gen)
    # the probabilities the scores stand for, the old way: float32 softmaxes at CLIP's scale saturate and tie
    p_yes_c = torch.stack([yes, no], -1).softmax(-1)[..., 0]
    old_atd = (1 - (yes.softmax(-1) * p_yes_c).sum(-1)).numpy()
    old_msp = (1 - yes.softmax(-1).amax(-1)).numpy()
    assert len(np.unique(old_atd)) < 400 and len(np.unique(old_msp)) < 400
    for score in (clipn.msp_score(yes), clipn.ctw_score(yes, no), clipn.atd_score(yes, no)):
        assert score.dtype == np.float64 and len(np.unique(score)) == 500
    # at a small scale nothing saturates: each score is a monotone transform of its probability
    small_yes, small_no = yes / 50, no / 50
    p_small = torch.stack([small_yes, small_no], -1).double().softmax(-1)[..., 0]
    probs = small_yes.double().softmax(-1)
    pred = small_yes.argmax(-1, keepdim=True)
    exact = {"msp": 1 - probs.amax(-1), "ctw": 1 - p_small.gather(1, pred)[:, 0], "atd": 1 - (probs * p_small).sum(-1)}
    got = {"msp": clipn.msp_score(small_yes), "ctw": clipn.ctw_score(small_yes, small_no),
           "atd": clipn.atd_score(small_yes, small_no)}
    for key in exact:
        assert np.array_equal(np.argsort(exact[key].numpy()), np.argsort(got[key])), key
    assert np.allclose(np.exp(got["atd"]), exact["atd"].numpy())


def test_ood_metrics_against_sklearn_and_brute_force():
    rng = np.random.default_rng(0)
    is_ood = np.r_[np.zeros(40), np.ones(30)].astype(int)
    scores = rng.normal(size=70) + is_ood
    m = clipn.ood_metrics(is_ood, scores)
    assert m["AUROC"] == pytest.approx(100 * roc_auc_score(is_ood, scores))
    # brute force: the largest threshold keeping >= 95 % of ID scores below-or-equal; OOD accepted = OOD at or below it
    id_s, ood_s = np.sort(scores[is_ood == 0]), scores[is_ood == 1]
    best = min(100 * np.mean(ood_s <= t) for t in np.r_[id_s, ood_s] if np.mean(id_s <= t) >= 0.95)
    assert m["FPR95"] == pytest.approx(best)


def test_no_encoder_starts_as_the_text_encoder_and_trains(model):
    no_enc = clipn.NoTextEncoder(model, n_prompts=4)
    texts = ["a photo of a star.", "a red ring on wood."]
    torch.testing.assert_close(no_enc.encode(model, texts), clip.encode_texts(model, texts), atol=1e-5, rtol=1e-5)
    data = toyworld.sample(24, seed=0, image_size=32)
    image_emb, _ = clip.encode_images(model, data.images)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    hist = clipn.train_no_encoder(model, no_enc, image_emb, data.captions, steps=15, batch_size=12, lr=3e-3)
    assert len(hist) == 15 and hist[-1]["tso"] < hist[0]["tso"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # CLIP is not trained
    assert [p.requires_grad for p in model.parameters()] == flags  # ... and the caller's model is left as it was
    assert no_enc.prompts.abs().sum() > 0  # the no-prompts learned
    yes, no = clipn.yes_no_logits(model, no_enc, image_emb, ["star", "ring"])
    assert yes.shape == no.shape == (24, 2)
    with pytest.raises(ValueError, match="one caption per image"):
        clipn.train_no_encoder(model, no_enc, image_emb, data.captions[:3], steps=1)


def test_no_encoder_copies_train_even_from_a_frozen_clip(model):
    frozen = copy.deepcopy(model).requires_grad_(False)
    encoder = clipn.NoTextEncoder(frozen, n_prompts=2)
    assert all(p.requires_grad for p in encoder.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())


def test_no_encoder_training_resumes_bit_exactly(model, tmp_path):
    """Six steps in one go equal one step stopped by its time budget, an interruption (other global random state, a
    new encoder), then the rest from the checkpoint; the cosine schedule runs over all six either way."""
    data = toyworld.sample(24, seed=0, image_size=32)
    image_emb, _ = clip.encode_images(model, data.images)
    args = dict(steps=6, batch_size=8, lr=3e-3, seed=5)

    def fresh() -> clipn.NoTextEncoder:
        torch.manual_seed(0)
        return clipn.NoTextEncoder(model, n_prompts=4)

    whole = fresh()
    h_whole = clipn.train_no_encoder(model, whole, image_emb, data.captions, **args)
    ckpt = tmp_path / "no.pt"
    first = clipn.train_no_encoder(model, fresh(), image_emb, data.captions, checkpoint=ckpt, budget_s=0, **args)
    assert len(first) == 1
    # The official optimiser: AdamW (0.9, 0.98), eps 1e-6, weight decay 0.2 on matrices only, cosine over 6 steps.
    saved = torch.load(ckpt, weights_only=False)["state"]
    gains, matrices = saved["optimizer"]["param_groups"]
    assert (gains["weight_decay"], matrices["weight_decay"]) == (0.0, 0.2)
    assert gains["betas"] == (0.9, 0.98) and gains["eps"] == 1e-6
    named = dict(fresh().named_parameters())
    assert len(gains["params"]) == sum(p.ndim < 2 or "ln" in n or "bias" in n for n, p in named.items())
    assert saved["schedule"]["_last_lr"][0] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi / 6)))
    resumed = fresh()
    torch.manual_seed(99)
    h_resumed = clipn.train_no_encoder(model, resumed, image_emb, data.captions, checkpoint=ckpt, **args)
    assert h_resumed == h_whole and len(h_whole) == 6
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_no_encoders_trained_in_processes_equal_those_trained_here(model):
    """Chapter 9's study trains its encoders two at a time in fresh processes: the same tensors and histories as one
    :func:`clipn.train_no_encoder` after another here, for the diagonal and for a match matrix."""
    data = toyworld.sample(16, seed=1, image_size=32)
    image_emb, _ = clip.encode_images(model, data.images)
    match = toyworld.match_matrix(data.captions, data.scenes)
    runs = [(image_emb, data.captions, None, 3), (image_emb, data.captions, match, 4)]
    args = dict(steps=3, batch_size=8, lr=3e-3)
    apart = clipn.train_no_encoders(model, runs, n_jobs=2, **args)
    for (emb, captions, mm, seed), (encoder, history) in zip(runs, apart):
        here = clipn.NoTextEncoder(model)
        positives = None if mm is None else (lambda idx, mm=mm: torch.from_numpy(mm[np.ix_(idx, idx)]))
        assert history == clipn.train_no_encoder(model, here, emb, captions, positives=positives, seed=seed, **args)
        for k, v in here.state_dict().items():
            assert torch.equal(v, encoder.state_dict()[k]), k


def test_the_bench_clipn_detector_scores_as_chapter_9_with_the_shipped_encoder():
    """The image score is chapter 9's competing-to-win with the object as the only ID class (agreeing-to-differ ranks
    the images the same way then); the map holds the same score of every patch token."""
    from adlib.data import captionworld
    from adlib.methods import catalog
    from adlib.recipes import clipn_caption

    test = captionworld.labelled_set(("pentagon",), 2, 1, seed=1)
    out = catalog.make_detector("clipn", object_name="pentagon", sigma=0.0).fit(test[test.labels == 0]).predict(test)
    tiny, encoder = clip.load_tiny_clip(None), clipn_caption.trained_no_encoder(0).model
    global_emb, patch_emb = clip.encode_images(tiny, test)
    yes, no = clipn.yes_no_logits(tiny, encoder, global_emb, ["pentagon"])
    np.testing.assert_allclose(out.image, clipn.ctw_score(yes, no), rtol=1e-5)
    assert (np.argsort(clipn.atd_score(yes, no)) == np.argsort(out.image)).all()
    yes, no = clipn.yes_no_logits(tiny, encoder, patch_emb[0], ["pentagon"])  # the first image's patches
    side = int(len(patch_emb[0]) ** 0.5)
    cell = test.size[0] // side
    centres = out.maps[0][cell // 2::cell, cell // 2::cell]  # bilinear upsampling keeps the cells' centres near
    assert np.corrcoef(centres.ravel(), clipn.ctw_score(yes, no))[0, 1] > 0.9


def test_paper_data_readers(tmp_path):
    from PIL import Image

    pairs = tmp_path / "pairs"
    (pairs / "a").mkdir(parents=True)
    for i, text in enumerate(["a dog.", "a cat on a mat."]):
        Image.new("RGB", (8, 8)).save(pairs / "a" / f"{i}.jpg")
        (pairs / "a" / f"{i}.txt").write_text(text + "\n")
    Image.new("RGB", (8, 8)).save(pairs / "a" / "no_caption.jpg")
    paths, captions = image_folders.read_image_text_folder(pairs)
    assert [p.name for p in paths] == ["0.jpg", "1.jpg"] and captions == ["a dog.", "a cat on a mat."]
    with pytest.raises(FileNotFoundError, match="caption file"):
        image_folders.read_image_text_folder(tmp_path / "missing")
    folder = tmp_path / "val"
    for wnid, n in (("n02", 2), ("n01", 1)):
        (folder / wnid).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(folder / wnid / f"{i}.JPEG")
    paths, labels, names = image_folders.read_image_folder(folder)
    assert names == ["n01", "n02"] and labels.tolist() == [0, 1, 1]
    (folder / "classnames.txt").write_text("goldfish\ntench\n")
    assert image_folders.read_image_folder(folder)[2] == ["goldfish", "tench"]
    (folder / "classnames.txt").write_text("goldfish\n")
    with pytest.raises(ValueError, match="1 names for 2 class folders"):
        image_folders.read_image_folder(folder)
    with pytest.raises(FileNotFoundError, match="Download"):
        image_folders.read_image_folder(tmp_path / "nothing")


def test_train_tiny_refuses_an_existing_file_before_training(tmp_path, capsys):
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"a user's file")
    assert cli.main(["train-clip", "--out", str(out), "--steps", "1"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"a user's file"


def test_shipped_no_encoders_ran_the_official_steps_on_a_cosine_schedule():
    from adlib.recipes import checkpoints, clipn_caption

    # run.sh of the CLIPN code: 10 epochs of CC3M's 2,891,445 pairs at a global batch of 4 x 512
    assert clipn_caption.OFFICIAL_STEPS == 10 * 1412 == 14_120
    table = checkpoints.registry.shipped_weights()
    for seed in clipn_caption.SEEDS:
        for factor in clipn_caption.FACTORS:
            rec = table[clipn_caption.name_of(seed, factor)]["record"]
            assert rec["steps"] == factor * clipn_caption.OFFICIAL_STEPS and rec["official_steps"] == 14_120
            # the recorded learning rate: the peak at the start, close to zero at the end (so the loss rule fails)
            assert rec["lr"][0] == pytest.approx(clipn_caption.LR, rel=1e-3) and rec["lr"][-1] < 0.01 * clipn_caption.LR
