"""Uninformed Students: receptive fields, exact dense evaluation, losses and the normalised score."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adlib import cli
from adlib.core import checksum
from adlib.features import cnn
from adlib.methods import base
from adlib.methods.students import ensemble, teacher
from adlib.weights import registry


@pytest.mark.parametrize("patch_size, stride", [(17, 1), (17, 4), (33, 4), (17, 8), (33, 8), (9, 1)])
def test_descriptor_shapes_and_exact_receptive_field(patch_size, stride):
    torch.manual_seed(0)
    net = teacher.PatchNet(patch_size, dim=5, width=4, stride=stride).double()
    x = torch.rand(1, 3, 48, 48, dtype=torch.float64, requires_grad=True)
    out = net(x)
    assert out.shape == (1, 5, 48 // stride, 48 // stride)
    i, j = out.shape[-2] // 2, out.shape[-1] // 2
    out[0, :, i, j].sum().backward()
    rows, cols = np.nonzero(x.grad[0].abs().sum(0).numpy())
    # The pixels the descriptor depends on form exactly the p x p patch that cell_origin names.
    assert (rows.min(), rows.max() + 1) == (net.cell_origin(i), net.cell_origin(i) + patch_size)
    assert (cols.min(), cols.max() + 1) == (net.cell_origin(j), net.cell_origin(j) + patch_size)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_dense_output_equals_network_on_each_patch(stride):
    torch.manual_seed(0)
    net = teacher.PatchNet(17, dim=6, width=5, stride=stride, n=2).double()
    x = torch.rand(2, 3, 28, 28, dtype=torch.float64)
    dense = net(x)
    cells = [(i, j) for i in range(dense.shape[-2]) for j in range(dense.shape[-1])
             if min(net.cell_origin(i), net.cell_origin(j)) >= 0
             and max(net.cell_origin(i), net.cell_origin(j)) + 17 <= 28]  # border cells see padding
    assert cells
    patches = torch.cat([x[:, :, net.cell_origin(i):net.cell_origin(i) + 17, net.cell_origin(j):net.cell_origin(j) + 17]
                         for i, j in cells])
    expected = torch.cat([dense[:, :, i, j] for i, j in cells])
    torch.testing.assert_close(net(patches, dense=False)[:, :, 0, 0], expected)


def test_border_cells_see_the_image_not_a_frame():
    # Regression: with zero padding the border cells of a constant image got descriptors unlike any interior
    # cell, and their scores outranked the defects (below-chance localisation). A constant image must give the
    # descriptor of a constant patch at every cell, border included.
    torch.manual_seed(0)
    net = teacher.PatchNet(17, dim=4, width=4, stride=4).double()
    x = torch.full((1, 3, 40, 40), 0.7, dtype=torch.float64)
    dense = net(x)[0].flatten(1)
    patch = net(x[:, :, :17, :17], dense=False)[0, :, 0, 0]
    torch.testing.assert_close(dense, patch[:, None].expand_as(dense))


def test_bright_square_is_scored_where_it_is():
    # The cells whose patch overlaps a bright square, upsampled to pixels as the chapter does, centre on the
    # square: a shifted map (e.g. by half a patch) would be off by several pixels.
    torch.manual_seed(0)
    net = teacher.PatchNet(9, dim=4, width=4, stride=4).double()
    x = torch.full((1, 3, 64, 64), 0.5, dtype=torch.float64)
    y = x.clone()
    y[:, :, 38:45, 14:21] = 1.0  # centre (41, 17)
    touched = ((net(y) - net(x)).abs().sum(1) > 1e-9).double().detach().numpy()
    pixel = base.to_pixel_maps(touched, 64, sigma=0)[0]
    rows, cols = np.mgrid[:64, :64]
    centre = (rows * pixel).sum() / pixel.sum(), (cols * pixel).sum() / pixel.sum()
    assert abs(centre[0] - 41) <= 1 and abs(centre[1] - 17) <= 1


def test_grouped_students_are_independent_networks():
    torch.manual_seed(0)
    ens = teacher.PatchNet(17, dim=3, width=4, stride=4, n=2).double()
    single = teacher.PatchNet(17, dim=3, width=4, stride=4, n=1).double()
    # Copy the second group's weights into a single network: it must reproduce that student's output.
    for conv_e, conv_s in zip(ens.convs, single.convs):
        out = conv_s.out_channels
        conv_s.weight.data = conv_e.weight.data[out:].clone()
        conv_s.bias.data = conv_e.bias.data[out:].clone()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ens(x)[:, 3:], single(x))


def test_unreachable_patch_size_is_refused():
    with pytest.raises(ValueError, match="not reachable"):
        teacher.PatchNet(65, stride=3)
    with pytest.raises(ValueError, match="dense=False expects"):
        teacher.PatchNet(17, dim=2, width=2, stride=4)(torch.rand(1, 3, 20, 20), dense=False)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        teacher.PatchNet(17, dim=2, width=2, stride=4)(torch.rand(1, 3, 16, 40))


def test_compactness_loss_against_numpy():
    d = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    corr = np.corrcoef(d.numpy(), rowvar=False)
    expected = (corr**2).sum() - np.trace(corr**2)
    assert teacher.compactness_loss(d).item() == pytest.approx(expected, rel=1e-6)
    # Uncorrelated (orthogonal, centred) channels cost nothing.
    a = np.random.default_rng(0).normal(size=(50, 4))
    q, _ = np.linalg.qr(a - a.mean(0))  # orthonormal columns, still centred
    assert teacher.compactness_loss(torch.from_numpy(q)).item() == pytest.approx(0.0, abs=1e-12)


def test_errors_and_variances_against_loops():
    g = np.random.default_rng(0)
    s, t = g.normal(size=(3, 2, 4, 2, 3)), g.normal(size=(2, 4, 2, 3))
    e, v = ensemble.errors_and_variances(torch.from_numpy(s), torch.from_numpy(t))
    for n in range(2):
        for i in range(2):
            for j in range(3):
                preds = s[:, n, :, i, j]  # (M, dim)
                assert e[n, i, j].item() == pytest.approx(((preds.mean(0) - t[n, :, i, j]) ** 2).sum())
                assert v[n, i, j].item() == pytest.approx(preds.var(0).sum())  # trace of the covariance


def test_score_is_normalised_with_held_out_statistics():
    torch.manual_seed(0)
    net = teacher.PatchNet(17, dim=4, width=4, stride=4).eval()
    st = ensemble.StudentTeacher(net, n_students=2)
    images = torch.rand(6, 3, 32, 32)
    st.fit(images[:4], epochs=1, batch_size=2, progress=False)
    with pytest.raises(RuntimeError, match="calibrate"):
        st.score_maps(images)
    st.calibrate(images[4:])
    e, v = (a.double().numpy() for a in st.errors_and_variances(images[4:]))
    e_norm, v_norm = st.normalised_terms(images[4:])
    np.testing.assert_allclose(e_norm, (e - e.mean()) / e.std(ddof=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v_norm, (v - v.mean()) / v.std(ddof=1), rtol=1e-5, atol=1e-5)
    both = st.score_maps(images[4:])
    np.testing.assert_allclose(both, e_norm + v_norm)
    # Normalisation uses the calibration images only: scoring other images does not change it.
    assert abs(both.mean()) < 1e-5
    assert abs(st.score_maps(images[:4]).mean()) > 1e-3


def test_shipped_teachers_load_and_explain_their_targets():
    teachers = {name: e for name, e in registry.shipped_weights().items() if e.get("kind") == "teacher"}
    assert {"teacher-p17", "teacher-p33"} <= set(teachers)
    extractor = cnn.feature_extractor(teacher.TEACHER_BACKBONE, layers=teacher.TEACHER_LAYERS)
    images = teacher.teacher_images()
    for name, entry in teachers.items():
        net, decoder = teacher.load_teacher(name)
        assert (net.patch_size, net.dim, net.width, net.stride) == tuple(
            entry["options"][k] for k in ("patch_size", "dim", "width", "stride"))
        assert (registry.WEIGHTS_DIR / entry["file"]).stat().st_size <= 15 * 2**20
        patches = teacher.random_patches(images, net.patch_size, 64, seed=5)
        targets = teacher.pretrained_descriptors(extractor, patches, teacher.TEACHER_RECIPE["target_size"])
        explained = teacher.explained_variance(net, decoder, patches, targets)
        assert explained > 0.3, (name, explained)  # a random network explains nothing (about 0 or below)
        random_teacher = teacher.PatchNet(net.patch_size, net.dim, net.width, net.stride)
        assert teacher.explained_variance(random_teacher, decoder, patches, targets) < 0.1


def test_teacher_command_writes_a_loadable_file_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    assert cli.main(["distill-teacher", "--patch-size", "17", "--out", str(out), "--epochs", "1",
                     "--n-patches", "128"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sha256"] == checksum.sha256sum(out) and len(summary["history"]) == 1
    net, decoder = teacher.load_teacher(str(out))
    assert net.patch_size == 17 and decoder.out_features == 320
    assert cli.main(["distill-teacher", "--patch-size", "17", "--out", str(out)]) == 2  # before any training
    assert "exists" in capsys.readouterr().err
