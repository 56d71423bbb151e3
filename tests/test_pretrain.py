"""adlib.recipes.pretrain: the IFS renderer, the NT-Xent loss, weights files and a smoke run of the command."""
import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adlib import cli
from adlib.data import fractals, heldout, synthtex
from adlib.features import vit
from adlib.recipes import pretrain, pretrain_recipes
from adlib.weights import registry
from test_train import Interrupted, interrupted_after


def test_ifs_points_converge_to_the_fixed_point_of_one_map():
    # x' = 0.5 x + (0.5, -0.25) has the single fixed point (1, -0.5); after 6 steps chains are within 2 * 2^-6.
    pts, ids = fractals.ifs_points(np.array([[0.5, 0, 0, 0.5, 0.5, -0.25]]), np.random.default_rng(0),
                                   n_chains=16, n_steps=10)
    assert pts.shape == (16 * 4, 2) and (ids == 0).all()
    assert np.abs(pts - [1.0, -0.5]).max() <= 2 * 0.5 ** 7 + 1e-12


def test_ifs_systems_are_contractive_and_renders_repeat():
    rng = np.random.default_rng(0)
    system = fractals.ifs_system(rng)
    a = system[:, :4].reshape(-1, 2, 2)
    assert 2 <= len(system) <= 8 and (np.linalg.norm(a, ord=2, axis=(1, 2)) <= 0.9 + 1e-9).all()
    img = fractals.render_fractal(system, 48, np.random.default_rng(1))
    assert img.shape == (48, 48, 3) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    np.testing.assert_array_equal(img, fractals.render_fractal(system, 48, np.random.default_rng(1)))
    images, labels = fractals.fractal_dataset(3, 2, 32, seed=0)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_training_data_is_disjoint_from_evaluation():
    evaluation = set(synthtex.CATEGORIES) | {"brick", "grass", "gravel"}
    assert not set(pretrain.NATURAL_IMAGES) & set(heldout.VALIDATION_IMAGES)
    assert not (set(pretrain.NATURAL_IMAGES) | set(heldout.VALIDATION_IMAGES)) & evaluation


def test_validation_set_labels_match_masks():
    val = heldout.validation_set(image_size=64, n_train=2, n_test_good=2, n_per_defect=1)
    assert set(val) == set(heldout.VALIDATION_IMAGES)
    for name, (train, test) in val.items():
        assert train.images.shape == (2, 3, 64, 64) and test.images.shape == (2 + len(synthtex.DEFECTS), 3, 64, 64)
        assert train.labels.tolist() == [0, 0] and train.masks is None
        np.testing.assert_array_equal(test.masks.reshape(len(test), -1).any(1), test.labels == 1)
        assert test.defects == ("good", "good", *synthtex.DEFECTS) and set(test.objects) == {name}


def test_augment_keeps_range_and_shape():
    x = torch.rand(4, 3, 16, 16)
    y = pretrain.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1


def test_save_weights_writes_fp16_and_its_sha256(tmp_path):
    state = {"w": torch.randn(3, 2), "n": torch.tensor(7)}
    sha = pretrain.save_weights(state, tmp_path / "w.safetensors")
    assert sha == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    back = load_file(str(tmp_path / "w.safetensors"))
    assert back["w"].dtype == torch.float16 and back["n"].item() == 7
    torch.testing.assert_close(back["w"].float(), state["w"].half().float())


@pytest.mark.parametrize("recipe", ["fractal", "simclr"])
def test_smoke_run_of_the_command_is_deterministic(tmp_path, capsys, recipe):
    args = ["pretrain", recipe, "--steps", "1", "--batch-size", "4", "--n-classes", "3", "--per-class", "2"]
    shas = []
    for name in ("a", "b"):
        assert cli.main(args + ["--out", str(tmp_path / f"{name}.safetensors")]) == 0
        shas.append(json.loads(capsys.readouterr().out)["sha256"])
    assert shas[0] == shas[1]
    weights = load_file(str(tmp_path / "a.safetensors"))
    assert "layer2.1.conv2.weight" in weights and "layer3.0.conv1.weight" not in weights


def test_smoke_run_of_the_vit_command_loads_as_a_vit(tmp_path, capsys):
    args = ["pretrain", "fractal_vit", "--steps", "2", "--batch-size", "4", "--n-classes", "3", "--per-class", "2"]
    out = tmp_path / "vit.safetensors"
    assert cli.main(args + ["--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["recipe"]["arch"] == "vit_tiny_patch16_224" and summary["final_loss"] > 0
    recipe = pretrain_recipes.RECIPES["fractal_vit"]
    weights = load_file(str(out))
    assert f"blocks.{recipe.stages - 1}.mlp.fc2.weight" in weights
    assert f"blocks.{recipe.stages}.norm1.weight" not in weights
    maps = pretrain.validation_model(recipe, out)(torch.rand(2, 3, 128, 128))
    assert [m.shape for m in maps] == [(2, 192, 16, 16)] * 2
    with pytest.raises(ValueError, match="lack"):  # a 12-block ViT cannot be filled from 4 trained blocks
        vit.vit_backbone(recipe.arch, 64, weights=str(out), patch_size=recipe.patch_size)


def test_pretraining_resumes_bit_exactly_after_an_interruption(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "steps_per_epoch", lambda steps: 2)  # 3 epochs of 2 steps
    recipe = pretrain_recipes.Recipe("fractal_simclr", steps=6, batch_size=4, n_classes=3, per_class=2)
    whole, log = pretrain.train(recipe, log_every=0)
    ckpt = tmp_path / "ckpt.pt"
    with interrupted_after(4), pytest.raises(Interrupted):  # during the third epoch
        pretrain.train(recipe, log_every=0, checkpoint=ckpt)
    resumed, log_resumed = pretrain.train(recipe, log_every=0, checkpoint=ckpt)
    assert log_resumed["loss"] == log["loss"] and len(log["history"]) == 3
    for k, v in whole.items():
        assert torch.equal(v, resumed[k]), k


def test_unknown_recipe_kind_is_refused():
    with pytest.raises(ValueError, match="Unknown recipe"):
        pretrain.train(pretrain_recipes.Recipe("rotation", steps=1))


def test_candidates_table_matches_the_registry_and_the_model_card():
    rows = pretrain.candidates()
    shipped = {r["shipped_as"]: r for r in rows if r["shipped_as"]}
    backbone_entries = {name: e for name, e in registry.shipped_weights().items()
                        if e.get("kind", "backbone") == "backbone"}
    assert set(shipped) == set(backbone_entries)
    card = (registry.WEIGHTS_DIR / "MODEL_CARD.md").read_text()
    for name, row in shipped.items():
        assert backbone_entries[name]["recipe"] == row["recipe"].split()[0]
    for row in rows:  # every number of the json is in the card's tables
        for key in ("val_image_auroc", "val_pixel_auroc", "synthtex_image_auroc", "synthtex_aupro"):
            assert f"{row[key]:.3f}" in card, (row["candidate"], key)
