"""adlib.features.cnn weights: shipped backbones (sha256-checked), local files, and timm's weights offline."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from adlib.features import cnn, vit
from adlib.weights import registry


def _registry(folder, name, file, sha, arch="resnet18", max_stage=3):
    entry = {"file": file, "arch": arch, "max_stage": max_stage, "sha256": sha, "command": "python -m adlib pretrain"}
    (folder / "registry.json").write_text(json.dumps({name: entry}))


def _trunk_state(seed):
    return cnn.feature_extractor("resnet18", (1, 2, 3), seed=seed).net.state_dict()


def test_local_file_loads_exactly(tmp_path):
    path = tmp_path / "trunk.pth"
    torch.save(_trunk_state(3), path)
    images = torch.rand(2, 3, 32, 32)
    ours = cnn.feature_extractor("resnet18", (1, 2), weights=str(path))
    ref = cnn.feature_extractor("resnet18", (1, 2), seed=3)
    for a, b in zip(ours(images), ref(images)):
        torch.testing.assert_close(a, b)


def test_shipped_name_is_sha_checked(tmp_path, monkeypatch):
    state = {k: v.half() if v.is_floating_point() else v for k, v in _trunk_state(5).items()}
    save_file(state, str(tmp_path / "toy.safetensors"))
    sha = hashlib.sha256((tmp_path / "toy.safetensors").read_bytes()).hexdigest()
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    _registry(tmp_path, "toy-resnet18", "toy.safetensors", sha)
    model = cnn.feature_extractor("resnet18", (1, 2), weights="toy-resnet18")
    torch.testing.assert_close(model.net.state_dict()["conv1.weight"], state["conv1.weight"].float())
    _registry(tmp_path, "toy-resnet18", "toy.safetensors", "0" * 64)
    with pytest.raises(ValueError, match="sha256 mismatch for .*toy.safetensors"):
        cnn.feature_extractor("resnet18", (1, 2), weights="toy-resnet18")
    _registry(tmp_path, "toy-resnet18", "toy.safetensors", sha, max_stage=2)
    with pytest.raises(ValueError, match="ships stages 0-2"):
        cnn.feature_extractor("resnet18", (1, 2, 3), weights="toy-resnet18")
    with pytest.raises(ValueError, match="is a 'resnet18'"):
        cnn.feature_extractor("resnet34", (1, 2), weights="toy-resnet18")


def test_bad_weights_give_actionable_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a shipped name"):
        cnn.feature_extractor("resnet18", (1, 2), weights=str(tmp_path / "nope.pth"))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lack"):
        cnn.feature_extractor("resnet18", (1, 2), weights=str(tmp_path / "partial.pth"))


def test_imagenet_offline_says_what_to_download(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-adlib-test-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent-adlib-test-cache")
    with pytest.raises(RuntimeError, match="huggingface.co/timm/resnet18"):
        cnn.feature_extractor("resnet18", (1, 2), weights="imagenet")


def test_every_shipped_backbone_loads_and_is_not_random():
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    shipped = {name: e for name, e in registry.shipped_weights().items() if e.get("kind", "backbone") == "backbone"}
    assert {"book-resnet18", "book-vit-tiny"} <= set(shipped)
    for name, entry in shipped.items():
        if entry["arch"].startswith("vit"):
            model = vit.ViTStages(vit.vit_backbone(entry["arch"], 64, weights=name), (1, 3))
            random = vit.ViTStages(vit.vit_backbone(entry["arch"], 64, **entry["options"]), (1, 3))
        else:
            model = cnn.feature_extractor(entry["arch"], (1, 2), weights=name)
            random = cnn.feature_extractor(entry["arch"], (1, 2), seed=0)
        feats = cnn.patch_features(model, images, grid=8)
        assert feats.shape == cnn.patch_features(random, images, grid=8).shape
        assert torch.isfinite(feats).all()
        assert not torch.allclose(feats, cnn.patch_features(random, images, grid=8))
        assert (registry.WEIGHTS_DIR / entry["file"]).stat().st_size <= 15 * 2**20


def test_shipped_vit_fixes_its_patch_size_and_depth():
    net = vit.vit_backbone("vit_tiny_patch16_224", 64, weights="book-vit-tiny")
    assert net.patch_embed.patch_size == (8, 8) and len(net.blocks) == 4 and net.pos_embed.shape[1] == 1 + 8 * 8
    with pytest.raises(ValueError, match="leave \\['patch_size'\\] unset"):
        vit.vit_backbone("vit_tiny_patch16_224", 64, weights="book-vit-tiny", patch_size=16)
    with pytest.raises(ValueError, match="is a 'vit_tiny_patch16_224'"):
        vit.vit_backbone("vit_small_patch16_224", 64, weights="book-vit-tiny")


def test_attention_maps_reproduce_each_blocks_attention_output():
    net = vit.vit_backbone("vit_tiny_patch16_224", 32, patch_size=8, depth=2, seed=0)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = vit.attention_maps(net, images)
    assert len(maps) == 2 and maps[0].shape == (2, net.blocks[0].attn.num_heads, 17, 17)
    assert torch.allclose(maps[0].sum(-1), torch.ones(()), atol=1e-5)
    # attention @ values, through the block's output projection, is what the block's attention module returns
    x = net.norm_pre(net._pos_embed(net.patch_embed(images)))
    attn = net.blocks[0].attn
    xn = net.blocks[0].norm1(x)
    v = attn.qkv(xn).reshape(2, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    mixed = (maps[0] @ v).transpose(1, 2).reshape(2, 17, -1)
    assert torch.allclose(attn.proj(attn.norm(mixed)), attn(xn), atol=1e-5)


def test_mean_attention_distance_by_hand():
    uniform = torch.full((1, 1, 5, 5), 0.2)  # one class token and a 2 x 2 grid, attention spread evenly
    # from each corner of a 2 x 2 grid: distances 0, 1, 1 and sqrt(2) patches of 8 px
    expected = 8 * (0 + 1 + 1 + 2 ** 0.5) / 4
    assert torch.allclose(vit.mean_attention_distance(uniform, (2, 2), 8), torch.tensor([expected]))
    local = torch.zeros(1, 2, 5, 5)
    local[..., 1:, 1:] = torch.eye(4)  # every patch attends only to itself
    assert torch.equal(vit.mean_attention_distance(local, (2, 2), 8), torch.zeros(2))
    with pytest.raises(ValueError, match="the grid 3 x 3 has 9"):
        vit.mean_attention_distance(uniform, (3, 3), 8)
