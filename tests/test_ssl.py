"""adlib.methods.simclr: NT-Xent against a double loop, augmentation statistics, steps, one-class heads vs sklearn."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.neighbors import KernelDensity

from adlib.methods import simclr, ssl_occ
from adlib.training.loop import fit


def nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """NT-Xent written out as in the SimCLR paper (algorithm 1), one anchor at a time."""
    z = [v / v.norm() for v in torch.cat([z1, z2])]
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert simclr.nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_loop(z1, z2, t), rel=1e-10)


def test_nt_xent_hand_case_and_errors():
    # two images, views identical and orthogonal to the other image: each anchor sees e^(1/t) vs 1 + e^(1/t)
    e = torch.eye(2, dtype=torch.float64)
    t = 0.5
    assert simclr.nt_xent(e, e, t).item() == pytest.approx(-math.log(math.e**2 / (math.e**2 + 2)))
    with pytest.raises(ValueError, match="same shape"):
        simclr.nt_xent(torch.ones(3, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        simclr.nt_xent(torch.ones(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="temperature"):
        simclr.nt_xent(e, e, 0.0)


def test_augmentation_shapes_range_and_seed():
    aug = simclr.simclr_augmentation(16)
    x = torch.rand(64, 3, 24, 24)
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    b = aug(x)
    assert a.shape == (64, 3, 16, 16) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 + 1e-6
    assert aug(x[0]).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="float image"):
        aug(torch.rand(2, 1, 8, 8))


def test_augmentation_probabilities():
    # a colourful image: grayscale views (p 0.2) have equal channels, others almost never do
    torch.manual_seed(1)
    x = torch.rand(4000, 3, 8, 8)
    x[:, 0] = 1.0
    x[:, 1:] *= 0.3
    out = simclr.simclr_augmentation(8, s=1.0)(x)
    grey = (out.amax(1) - out.amin(1)).amax(dim=(1, 2)) < 1e-5
    assert abs(grey.float().mean().item() - 0.2) < 0.03
    # without jitter, grayscale, blur and with crops of the whole image, only flips remain
    plain = simclr._resized_crop_flip(x, 8, min_scale=1.0)
    flipped = torch.isclose(plain, x.flip(-1), atol=1e-5).flatten(1).all(1)
    same = torch.isclose(plain, x, atol=1e-5).flatten(1).all(1)
    assert (flipped | same).all()  # area 1 with an aspect ratio != 1 never fits: the whole image is kept
    assert abs(flipped.float().mean().item() - 0.5) < 0.05


def test_blur_matches_explicit_kernel():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 9, 9, dtype=torch.float64)
    torch.manual_seed(5)
    out = simclr._gaussian_blur(x, 3, p=1.0)
    torch.manual_seed(5)
    torch.rand(3)  # the p draw
    sigma = torch.empty(3).uniform_(0.1, 2.0)
    for i in range(3):
        k1 = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / sigma[i].double()) ** 2)
        k1 = k1 / k1.sum()
        pad = torch.nn.functional.pad(x[i : i + 1], (1, 1, 1, 1), mode="reflect")[0]
        ref = sum(k1[a] * k1[b] * pad[:, a : a + 9, b : b + 9] for a in range(3) for b in range(3))
        assert torch.allclose(out[i], ref, atol=1e-6)


def test_rotate_and_rotation_step_learns():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    r = simclr.rotate(x, torch.tensor([1, 3]))
    assert torch.equal(r[0], torch.rot90(x[0], 1, (1, 2))) and torch.equal(r[1], torch.rot90(x[1], 3, (1, 2)))
    with pytest.raises(ValueError, match="one rotation per image"):
        simclr.rotate(x, torch.tensor([1]))
    # digits' rotations are easy to tell apart: a few steps must beat chance (0.25) clearly
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    imgs = simclr.digit_images(load_digits().data[:128] / 16.0, size=8)
    enc = simclr.ConvEncoder(width=8)
    clf = torch.nn.Linear(enc.feature_dim, 4)
    opt = torch.optim.Adam([*enc.parameters(), *clf.parameters()], lr=1e-2)
    loader = torch.utils.data.DataLoader(imgs, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    hist = fit(ssl_occ.rotation_step(enc, clf, opt), loader, epochs=4, progress=False)
    assert hist[-1]["acc"] > 0.6 and hist[-1]["loss"] < hist[0]["loss"]


def test_simclr_step_reduces_loss_and_distribution_augmentation():
    torch.manual_seed(0)
    imgs = torch.rand(64, 3, 8, 8)
    enc = simclr.ConvEncoder(width=8)
    head = simclr.ProjectionHead(enc.feature_dim, out_dim=16)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
    loader = torch.utils.data.DataLoader(imgs, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    aug = simclr.simclr_augmentation(8, blur=False)
    hist = fit(simclr.simclr_step(enc, head, opt, aug, temperature=0.5), loader, epochs=8, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]
    # with DA the augmentation receives each image in one of its four rotations, not always upright
    seen = []
    spy = lambda x: seen.append(x) or aug(x)  # noqa: E731
    step = simclr.simclr_step(enc, head, opt, spy, distribution_augmentation=True)
    batch = imgs[:32]
    assert np.isfinite(step(batch)["loss"])
    rotations = torch.stack([torch.rot90(batch, k, (2, 3)) for k in range(4)], dim=1)  # (32, 4, 3, 8, 8)
    k = (seen[0][:, None] == rotations).flatten(2).all(2).float().argmax(1)
    assert torch.equal(seen[0], simclr.rotate(batch, k)) and len(set(k.tolist())) > 1


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    return rng.normal(size=(80, 6)) + 3.0, rng.normal(size=(30, 6)) * 2


def test_ocsvm_head_paper_gamma(feats):
    from sklearn.svm import OneClassSVM

    tr, te = feats
    ntr, nte = tr / np.linalg.norm(tr, axis=1, keepdims=True), te / np.linalg.norm(te, axis=1, keepdims=True)
    gamma = 10.0 / (np.var(ntr) * ntr.shape[1])
    ref = -OneClassSVM(kernel="rbf", gamma=gamma).fit(ntr).score_samples(nte)
    np.testing.assert_allclose(ssl_occ.ocsvm_head(tr)(te), ref, rtol=1e-8)


def test_kde_head_is_a_gaussian_kde(feats):
    tr, te = feats
    ntr, nte = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in (tr, te))
    gamma = 10.0 / (np.var(ntr) * ntr.shape[1])
    # exp(-gamma |x - f|^2) is sklearn's Gaussian kernel with bandwidth h, gamma = 1 / (2 h^2)
    log_density = KernelDensity(bandwidth=np.sqrt(1 / (2 * gamma))).fit(ntr).score_samples(nte)
    ours = ssl_occ.kde_head(tr)(te)
    # ours = -(1/gamma) logsumexp(-gamma |x-f|^2 + 2 gamma) = -(log_density + const) / gamma - 2
    slope, _ = np.polyfit(log_density, ours, 1)
    np.testing.assert_allclose(slope, -1 / gamma, rtol=1e-6)
    dens = np.log(rbf_kernel(nte, ntr, gamma=gamma).sum(1))
    np.testing.assert_allclose(ours, -(dens + 2 * gamma) / gamma, rtol=1e-8)


def test_gaussian_head_matches_mahalanobis(feats):
    tr, te = feats
    ntr, nte = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in (tr, te))
    mu = ntr.mean(0)
    cov = np.cov(ntr, rowvar=False, bias=True) + 1e-6 * np.eye(6)
    d2 = np.einsum("ni,ij,nj->n", nte - mu, np.linalg.inv(cov), nte - mu)
    ours = ssl_occ.gaussian_head(tr)(te)
    const = 0.5 * (6 * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1])
    np.testing.assert_allclose(ours, 0.5 * d2 + const, rtol=1e-6)
    assert set(ssl_occ.ONE_CLASS_HEADS) == {"OC-SVM", "KDE", "Gaussian"}


def test_heads_detect_an_outlier_cluster():
    rng = np.random.default_rng(1)
    normal = rng.normal(size=(100, 4)) * 0.2 + np.array([1.0, 0, 0, 0])
    odd = rng.normal(size=(20, 4)) * 0.2 + np.array([0, 1.0, 0, 0])
    for name, head in ssl_occ.ONE_CLASS_HEADS.items():
        s = head(normal[:80])(np.vstack([normal[80:], odd]))
        assert s[:20].max() < s[20:].min(), name
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        ssl_occ.kde_head(np.ones(5))


def test_augmentation_switches_and_coloured_digits():
    from sklearn.datasets import load_digits

    x = simclr.digit_images(load_digits().data[:8] / 16.0, size=16, colour_seed=0)
    assert x.shape == (8, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    # every image has its own stroke and background colour; grey digits have none
    assert x.std(dim=(0, 2, 3)).min() > 0.05 and not torch.allclose(x[:, 0], x[:, 1])
    grey = simclr.digit_images(load_digits().data[:8] / 16.0, size=16)
    assert torch.equal(grey[:, 0], grey[:, 1])
    torch.manual_seed(0)
    assert torch.equal(simclr.simclr_augmentation(16, crop=False, colour=False, blur=False)(x), x)  # nothing left
    colour_only = simclr.simclr_augmentation(16, crop=False, blur=False)(x)
    # colour only: the geometry is untouched, so the (per-image standardised) grey level keeps its layout
    g0, g1 = simclr.grey_level(x), simclr.grey_level(colour_only)
    corr = [abs(torch.corrcoef(torch.stack([g0[i].flatten(), g1[i].flatten()]))[0, 1]) for i in range(8)]
    assert min(corr) > 0.95
    crop_only = simclr.simclr_augmentation(16, colour=False, blur=False)(x)
    # crop only: pixel colours come from the image itself (a bilinear mix of its two colours)
    assert not torch.equal(crop_only, x)
    stroke_ground = torch.stack([x.amin(dim=(2, 3)), x.amax(dim=(2, 3))])
    assert (crop_only.amin(dim=(2, 3)) >= stroke_ground[0] - 1e-5).all()
    assert (crop_only.amax(dim=(2, 3)) <= stroke_ground[1] + 1e-5).all()


def test_cross_view_nce_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    n1, n2 = z1 / z1.norm(dim=1, keepdim=True), z2 / z2.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(5):  # anchor i of view 1 against the 5 second views: 1 positive, 4 negatives
        logits = [float(n1[i] @ n2[j]) / 0.2 for j in range(5)]
        expected += -(logits[i] - math.log(sum(math.exp(v) for v in logits))) / 5
    assert simclr.cross_view_nce(z1, z2, 0.2).item() == pytest.approx(expected, rel=1e-10)
    # one direction: swapping the views changes the loss, unlike NT-Xent
    assert simclr.cross_view_nce(z2, z1, 0.2).item() != pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        simclr.simclr_step(torch.nn.Identity(), torch.nn.Identity(), None, lambda x: x, loss="triplet")


def test_official_crop_is_a_square_of_whole_pixels_resized_as_tf():
    # every view must be some square crop of side >= half the image, resized with half-pixel centres
    torch.manual_seed(0)
    x = torch.rand(24, 3, 8, 8)
    aug = ssl_occ.official_augmentation(8, jitter=0.0, gray=0.0, flip=False)
    out = aug(x)
    for img, view in zip(x, out):
        crops = [F.interpolate(img[None, :, oy : oy + w, ox : ox + w], size=(8, 8), mode="bilinear",
                               align_corners=False)[0]
                 for w in range(4, 9) for oy in range(9 - w) for ox in range(9 - w)]
        assert min(float((c - view).abs().max()) for c in crops) < 1e-5
    assert torch.allclose(ssl_occ.official_augmentation(8, min_scale=1.0, jitter=0.0, gray=0.0, flip=False)(x), x,
                          atol=1e-6)
    flipped = ssl_occ.official_augmentation(8, min_scale=1.0, jitter=0.0, gray=0.0)(x)
    assert all(torch.allclose(f, v, atol=1e-6) or torch.allclose(f, v.flip(-1), atol=1e-6) for f, v in zip(flipped, x))
    with pytest.raises(ValueError, match="N, 3, S, S"):
        aug(torch.rand(3, 8, 8))


def test_official_jitter_is_always_applied_and_brightness_is_additive():
    # on a flat grey image contrast, saturation and hue do nothing: what is left is brightness
    x = torch.full((400, 3, 8, 8), 0.25)
    torch.manual_seed(0)
    out = ssl_occ.official_augmentation(8, jitter=0.4, gray=0.0)(x)
    level = out.mean(dim=(1, 2, 3))
    assert (out - level.view(-1, 1, 1, 1)).abs().max() < 1e-5
    assert ((level - 0.25).abs() > 1e-4).all()  # every image jittered (SimCLR's: 80 %)
    # additive 0.25 + U(-0.4, 0.4), clamped at 0; a factor U(0.6, 1.4) would stay within [0.15, 0.35]
    assert level.max() > 0.6 and (level == 0).float().mean() > 0.1


def test_mlp_head_is_the_official_get_head():
    rot = ssl_occ.mlp_head(16, [32] * 8, num_class=4)
    linears = [m for m in rot if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 9 and sum(isinstance(m, torch.nn.BatchNorm1d) for m in rot) == 7
    assert all(m.bias is None for m in linears[:7]) and linears[7].bias is not None
    assert rot(torch.randn(5, 16)).shape == (5, 4)
    clr = ssl_occ.mlp_head(16, [32] * 8 + [128])
    linears = [m for m in clr if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 9 and linears[-1].bias is None and clr(torch.randn(5, 16)).shape == (5, 128)
    with pytest.raises(ValueError, match="dims"):
        ssl_occ.mlp_head(16, [])


def test_rotation_score_and_independent_views():
    torch.manual_seed(0)
    enc = simclr.ConvEncoder(width=4)
    clf = torch.nn.Linear(enc.feature_dim, 4)
    x = torch.rand(6, 3, 8, 8)
    expected = []
    with torch.no_grad():
        enc.eval()
        for img in x:
            logp = [torch.log_softmax(clf(enc(torch.rot90(img, r, (1, 2))[None])), 1)[0, r] for r in range(4)]
            expected.append(-float(sum(logp)))
    assert np.allclose(ssl_occ.rotation_score(enc, clf, x), expected, atol=1e-5)
    seen = []
    opt = torch.optim.SGD([*enc.parameters(), *clf.parameters()], lr=0.01)
    ssl_occ.rotation_step(enc, clf, opt, augment=lambda v: seen.append(len(v)) or v, independent_views=True)(x)
    ssl_occ.rotation_step(enc, clf, opt, augment=lambda v: seen.append(len(v)) or v)(x)
    assert seen == [24, 6]  # four copies augmented one by one, or one view rotated four times
