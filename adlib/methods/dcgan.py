"""The DCGAN encoder and decoder shared by the autoencoder, the VAE and GANomaly (Radford et al. 2016)."""
from __future__ import annotations

import math

import torch
from torch import nn


def n_stages(image_size: int) -> int:
    """Number of stride-2 stages that take ``image_size`` down to ``4x4``.

    Used by: ``adlib.methods.dcgan.DCGANDecoder``, ``adlib.methods.dcgan.DCGANEncoder``.
    """
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(
            f"image_size must be a power of two >= 8 (8, 16, 32, 64, 128, ...), got {image_size!r}; "
            "resize the images, e.g. with torchvision.transforms.Resize."
        )
    return int(math.log2(image_size)) - 2


def check_images(x: torch.Tensor, in_channels: int, image_size: int) -> None:
    """Refuse images that are not (N, ``in_channels``, ``image_size``, ``image_size``), with the shape expected.

    Used by: ``adlib.methods.autoencoder.ConvAutoencoder``, ``adlib.methods.ganomaly.GanomalyDiscriminator``.
    """
    if x.ndim != 4 or tuple(x.shape[1:]) != (in_channels, image_size, image_size):
        raise ValueError(
            f"Expected images of shape (N, {in_channels}, {image_size}, {image_size}), got {tuple(x.shape)}; "
            "resize the images or build the model with matching in_channels and image_size."
        )


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation, as the official GANomaly ``weights_init``: use ``model.apply(dcgan_init)``.

    (Transposed) convolution weights ~ N(0, 0.02) and biases 0; BatchNorm weights ~ N(1, 0.02), biases 0.

    Used by: ``adlib.methods.autoencoder.ConvAutoencoder``, ``adlib.methods.ganomaly.GanomalyDiscriminator``.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANEncoder(nn.Module):
    """(N, C, S, S) images -> (N, latent_dim) codes; ``features`` gives the last (N, C', 4, 4) feature map.

    ``C' = base_channels * 2 ** (log2(S) - 3)``. The first convolution has no BatchNorm (DCGAN).

    Used by: ``adlib.methods.autoencoder.ConvAutoencoder``, ``adlib.methods.ganomaly.GanomalyDiscriminator``.
    """

    def __init__(self, in_channels: int, image_size: int, latent_dim: int, base_channels: int) -> None:
        super().__init__()
        n = n_stages(image_size)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2),
        ]
        ch = base_channels
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * ch), nn.LeakyReLU(0.2)]
            ch *= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(ch, latent_dim, 4, 1, 0, bias=False)  # 4x4 -> 1x1
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten(1)


class DCGANDecoder(nn.Module):
    """(N, latent_dim) codes -> (N, C, S, S) images in [0, 1] (sigmoid output).

    Unlike DCGAN, the last layer has a bias: with a sigmoid on [0, 1] data (rather than tanh on [-1, 1]),
    the output needs its own offset, or dark images stay stuck near 0.5 early in training.

    Used by: ``adlib.methods.autoencoder.ConvAutoencoder``, ``adlib.methods.ganomaly.GanomalyGenerator``.
    """

    def __init__(self, out_channels: int, image_size: int, latent_dim: int, base_channels: int) -> None:
        super().__init__()
        n = n_stages(image_size)
        ch = base_channels * 2 ** (n - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, ch, 4, 1, 0, bias=False),  # 1x1 -> 4x4
            nn.BatchNorm2d(ch),
            nn.ReLU(),
        ]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU()]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, out_channels, 4, 2, 1, bias=True), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])
