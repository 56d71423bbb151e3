"""The autoencoder, VAE and GANomaly: losses against hand computations, scores against loops, a tiny AE that
detects."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from adlib.core.runtime import seed_everything
from adlib.methods import autoencoder, ganomaly, vae
from adlib.training.loop import fit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


SIZES = [(1, 8), (3, 32), (3, 64), (3, 128)]


@pytest.mark.parametrize("channels,size", SIZES)
def test_shapes(channels, size):
    torch.manual_seed(0)
    x = torch.rand(2, channels, size, size)
    ae = autoencoder.ConvAutoencoder(channels, size, latent_dim=6, base_channels=4)
    out = ae(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1

    net = vae.ConvVAE(channels, size, latent_dim=6, base_channels=4)
    rec, mu, logvar = net(x)
    assert rec.shape == x.shape and mu.shape == logvar.shape == (2, 6)

    gen = ganomaly.GanomalyGenerator(channels, size, latent_dim=5, base_channels=4)
    x_hat, z, z_hat = gen(x)
    assert x_hat.shape == x.shape and z.shape == z_hat.shape == (2, 5)

    disc = ganomaly.GanomalyDiscriminator(channels, size, base_channels=4)
    logit, feat = disc(x)
    stages = int(math.log2(size)) - 2
    assert logit.shape == (2,) and feat.shape == (2, 4 * 2 ** (stages - 1), 4, 4)


def test_vae_eval_is_deterministic_and_train_samples():
    torch.manual_seed(0)
    net = vae.ConvVAE(1, 8, latent_dim=4, base_channels=4)
    x = torch.rand(3, 1, 8, 8)
    net.eval()
    assert torch.equal(net(x)[0], net(x)[0])
    net.train()
    assert not torch.equal(net(x)[0], net(x)[0])


def test_bad_sizes_are_explained():
    with pytest.raises(ValueError, match="power of two"):
        autoencoder.ConvAutoencoder(3, 48)
    with pytest.raises(ValueError, match="power of two"):
        ganomaly.GanomalyGenerator(1, 4)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        autoencoder.ConvAutoencoder(3, 32, base_channels=4)(torch.rand(2, 3, 64, 64))


def test_ganomaly_generator_loss_by_hand():
    # batch of 2, so element-wise averaging over the batch is checked too
    x = torch.tensor([[[[0.0, 1.0]]], [[[0.5, 0.5]]]])        # (2, 1, 1, 2)
    x_hat = torch.tensor([[[[0.5, 1.0]]], [[[0.0, 1.5]]]])
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    z_hat = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    f_real = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).reshape(2, 2, 1, 1)
    f_fake = torch.tensor([[0.0, 3.0], [2.0, 1.0]]).reshape(2, 2, 1, 1)
    con = (0.5 + 0.0 + 0.5 + 1.0) / 4               # mean |x - x_hat|
    enc = (1.0 + 4.0 + 9.0 + 0.0) / 4               # mean (z - z_hat)^2
    adv = (1.0 + 4.0 + 0.0 + 1.0) / 4               # mean (f_real - f_fake)^2
    out = ganomaly.ganomaly_generator_loss(x, x_hat, z, z_hat, f_real, f_fake)
    assert out["con"].item() == pytest.approx(con)
    assert out["enc"].item() == pytest.approx(enc)
    assert out["adv"].item() == pytest.approx(adv)
    assert out["total"].item() == pytest.approx(1 * adv + 50 * con + 1 * enc)
    out = ganomaly.ganomaly_generator_loss(x, x_hat, z, z_hat, f_real, f_fake, w_adv=2, w_con=3, w_enc=5)
    assert out["total"].item() == pytest.approx(2 * adv + 3 * con + 5 * enc)


def test_ganomaly_discriminator_loss_by_hand():
    logit_real = torch.tensor([0.0, math.log(3.0)])    # probabilities 1/2 and 3/4
    logit_fake = torch.tensor([0.0, -math.log(3.0)])   # probabilities 1/2 and 1/4
    real = (-math.log(0.5) - math.log(0.75)) / 2       # -log p for label 1
    fake = (-math.log(0.5) - math.log(1 - 0.25)) / 2   # -log(1 - p) for label 0
    out = ganomaly.ganomaly_discriminator_loss(logit_real, logit_fake)
    assert out["real"].item() == pytest.approx(real)
    assert out["fake"].item() == pytest.approx(fake)
    assert out["total"].item() == pytest.approx(0.5 * (real + fake))


def test_vae_loss_by_hand_and_closed_form():
    x = torch.zeros(2, 1, 1, 2)
    rec = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 3.0]]]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    recon_term = ((1 + 4) + (0 + 9)) / 2
    # KL(N(1, 1) || N(0, 1)) = 1/2; KL(N(0, 2) || N(0, 1)) = (2 - 1 - log 2) / 2; the second sample's KL is 0
    kl_term = (0.5 + 0.5 * (1 - math.log(2.0)) + 0.0) / 2
    total, r, k = vae.vae_loss(x, rec, mu, logvar, beta=2.0)
    assert r.item() == pytest.approx(recon_term)
    assert k.item() == pytest.approx(kl_term)
    assert total.item() == pytest.approx(recon_term + 2.0 * kl_term)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(2, 2), torch.ones(2, 2))
    assert k.item() == pytest.approx(torch.distributions.kl_divergence(q, p).sum(1).mean().item())


def test_reconstruction_nll_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    x, r = torch.rand(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g).clamp(0.01, 0.99)
    # Gaussian with sigma^2 = 1/2: -log N = (x - r)^2 + const, so the sum of squared errors is the NLL up to a constant
    nll = -torch.distributions.Normal(r, math.sqrt(0.5)).log_prob(x).flatten(1).sum(1)
    const = 16 * 0.5 * math.log(2 * math.pi * 0.5)
    assert vae.reconstruction_nll(x, r, "gaussian").tolist() == pytest.approx((nll - const).tolist(), rel=1e-5)
    # Bernoulli (continuous cross-entropy): -[x log r + (1 - x) log(1 - r)], summed
    expected = [-sum(x[i].flatten()[j] * math.log(r[i].flatten()[j]) + (1 - x[i].flatten()[j])
                     * math.log(1 - r[i].flatten()[j]) for j in range(16)).item() for i in range(3)]
    assert vae.reconstruction_nll(x, r, "bernoulli").tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        vae.reconstruction_nll(x, r, "poisson")
    _, bern, _ = vae.vae_loss(x, r, torch.zeros(3, 2), torch.zeros(3, 2), likelihood="bernoulli")
    assert bern.item() == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_ganomaly_score_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    z, z_hat = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    expected = [sum((z[i, j].item() - z_hat[i, j].item()) ** 2 for j in range(7)) / 7 for i in range(5)]
    assert ganomaly.ganomaly_score(z, z_hat).tolist() == pytest.approx(expected)
    assert ganomaly.ganomaly_score(z[..., None, None], z_hat[..., None, None]).tolist() == pytest.approx(expected)


def test_residual_map_and_image_scores():
    g = torch.Generator().manual_seed(0)
    x, r = torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 3, 4, 5, generator=g)
    amap = autoencoder.residual_map(x, r)
    assert amap.shape == (2, 4, 5)
    for n in range(2):
        for i in range(4):
            for j in range(5):
                expected = sum((x[n, c, i, j].item() - r[n, c, i, j].item()) ** 2 for c in range(3)) / 3
                assert amap[n, i, j].item() == pytest.approx(expected)
    flat = amap.reshape(2, -1).tolist()
    assert autoencoder.image_score_from_map(amap).tolist() == pytest.approx([sum(v) / len(v) for v in flat])
    assert autoencoder.image_score_from_map(amap, "max").tolist() == pytest.approx([max(v) for v in flat])
    with pytest.raises(ValueError, match="'mean' or 'max'"):
        autoencoder.image_score_from_map(amap, "median")


def _ganomaly_after_one_step(d_reinit_below):
    seed_everything(0)
    gen = ganomaly.GanomalyGenerator(1, 8, latent_dim=4, base_channels=4)
    disc = ganomaly.GanomalyDiscriminator(1, 8, base_channels=4)
    opt_g, opt_d = ganomaly.ganomaly_optimizers(gen, disc)
    out = ganomaly.ganomaly_step(gen, disc, opt_g, opt_d, d_reinit_below=d_reinit_below)(torch.rand(4, 1, 8, 8))
    return gen, disc, out


def test_ganomaly_step_reinitialises_the_discriminator_when_its_loss_collapses():
    gen_a, disc_a, out_a = _ganomaly_after_one_step(0.0)             # never re-initialise
    gen_b, disc_b, out_b = _ganomaly_after_one_step(float("inf"))    # always re-initialise
    assert out_a["d_reinit"] == 0.0 and out_b["d_reinit"] == 1.0
    assert set(out_a) == {"loss_g", "adv", "con", "enc", "loss_d", "d_reinit"}
    # G is updated before D is judged, so G is identical; D is replaced by a fresh DCGAN initialisation
    for pa, pb in zip(gen_a.parameters(), gen_b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(disc_a.encoder.head.weight, disc_b.encoder.head.weight)
    assert disc_b.encoder.head.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_ganomaly_optimizer_defaults():
    gen = ganomaly.GanomalyGenerator(1, 8, latent_dim=4, base_channels=4)
    disc = ganomaly.GanomalyDiscriminator(1, 8, base_channels=4)
    for opt in ganomaly.ganomaly_optimizers(gen, disc):
        assert opt.param_groups[0]["lr"] == 2e-4 and opt.param_groups[0]["betas"] == (0.5, 0.999)


def test_two_epoch_autoencoder_scores_a_bright_square_above_constant_images():
    size = 16
    g = torch.Generator().manual_seed(0)
    levels = 0.15 + 0.1 * torch.rand(64, generator=g)      # normal: constant dark-grey images
    train_x = levels[:, None, None, None].expand(64, 1, size, size).clone()
    test_levels = torch.linspace(0.15, 0.25, 6)
    normal = test_levels[:, None, None, None].expand(6, 1, size, size).clone()
    anomalous = normal.clone()
    anomalous[:, :, 4:8, 4:8] = 1.0                         # a bright 4x4 square

    seed_everything(0)
    model = autoencoder.ConvAutoencoder(1, size, latent_dim=8, base_channels=8)

    def scores(x):
        model.eval()
        with torch.no_grad():
            return autoencoder.image_score_from_map(autoencoder.residual_map(x, model(x)))

    untrained = scores(normal)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(TensorDataset(train_x), batch_size=4, shuffle=True)
    history = fit(autoencoder.ae_step(model, opt), loader, epochs=2, seed=0, progress=False)
    assert history[1]["loss"] < 0.5 * history[0]["loss"]
    s_normal, s_anomalous = scores(normal), scores(anomalous)
    assert s_normal.mean() < untrained.mean()              # it learnt to reconstruct normal images
    assert s_anomalous.min() > s_normal.max()


def test_autoencoder_detector_gives_the_caller_its_random_state_back():
    """Fitting seeds the global generators with the detector's seed inside; the caller's next draws do not move."""
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seed_everything(123)
    expected = torch.rand(3)
    seed_everything(123)
    det = autoencoder.AutoencoderDetector(epochs=1, latent_dim=4, base_channels=4, seed=7).fit(images)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    # the detector's own training still repeats exactly: the same seed gives the same history
    again = autoencoder.AutoencoderDetector(epochs=1, latent_dim=4, base_channels=4, seed=7).fit(images)
    assert det.history == again.history


def test_kl_per_image_and_active_units_against_an_independent_computation():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    prior = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    posterior = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(posterior, prior).sum(1)
    assert torch.allclose(vae.kl_per_image(mu, logvar), expected, atol=1e-5)
    codes = torch.zeros(100, 4)
    codes[:, 1] = torch.linspace(-1, 1, 100)  # varies: variance ~0.34
    codes[:, 3] = 0.01 * torch.linspace(-1, 1, 100)  # varies too little to count
    assert vae.active_units(codes) == 1 and vae.active_units(codes, threshold=1e-6) == 2


def test_the_mnist_recipes_schedule_data_and_held_out_loss():
    from adlib.recipes import recon_mnist

    # 15 epochs of the nine normal digits of MNIST's 60,000 training images, full batches of 64
    assert recon_mnist.official_steps(0) == 15 * math.floor((60_000 - 5_923) / 64) == 12_660
    task = recon_mnist.digit_task(3)
    assert task.x_train.shape[1:] == (1, 32, 32) and len(task.x_val) == (len(task.x_train) + len(task.x_val)) // 10
    assert set(task.classes_test[task.y_test == 1]) == {3} and 3 not in set(task.classes_test[task.y_test == 0])
    training = recon_mnist.setup("ganomaly", 3, seed=0)
    run = training.model
    x = torch.from_numpy(task.x_val[:16])
    run.eval()
    x_hat, z, z_hat = run(x)
    by_hand = ganomaly.ganomaly_generator_loss(x, x_hat, z, z_hat, torch.zeros(1), torch.zeros(1), w_adv=0.0)
    assert recon_mnist.held_out_loss("ganomaly", run, x) == pytest.approx(by_hand["total"].item(), rel=1e-6)


def test_ganomaly_run_keeps_the_epoch_means_of_the_game():
    from adlib.recipes import recon_mnist

    training = recon_mnist.setup("ganomaly", 0, seed=0)
    batches = iter(training.loader)
    logged = [training.step(next(batches)) for _ in range(3)]
    n = len(training.loader)
    for j, key in enumerate(recon_mnist.CURVES):
        assert training.model.curves[0, j].item() == pytest.approx(sum(o[key] for o in logged) / n, rel=1e-5)
    assert int(training.model.steps_done) == 3 and training.model.curves[1:].abs().sum() == 0
