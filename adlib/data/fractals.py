"""Fractal images from random iterated function systems (Kataoka et al. 2020), the book's offline pretraining data."""
from __future__ import annotations

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------- data
def ifs_system(rng: np.random.Generator, max_maps: int = 8) -> np.ndarray:
    """A random contractive IFS: (n_maps, 6) rows (a, b, c, d, e, f) of x' = [[a, b], [c, d]] x + [e, f].

    As FractalDB, parameters are uniform in [-1, 1]; maps are shrunk to spectral norm <= 0.9 so every
    system converges, and systems whose attractor fills too little of its bounding box are redrawn.

    Used by: ``adlib.data.fractals.fractal_dataset``.
    """
    while True:
        n = int(rng.integers(2, max_maps + 1))
        p = rng.uniform(-1, 1, size=(n, 6))
        a = p[:, :4].reshape(n, 2, 2)
        norms = np.linalg.norm(a, ord=2, axis=(1, 2))
        p[:, :4] *= np.minimum(1.0, 0.9 / norms)[:, None]
        pts, _ = ifs_points(p, rng, n_chains=256, n_steps=24)
        if _fill_rate(pts, 32) >= 0.12:
            return p


def ifs_points(params: np.ndarray, rng: np.random.Generator, n_chains: int = 1024,
               n_steps: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Chaos-game points (M, 2) of an IFS and the index (M,) of the map that placed each point.

    Used by: ``adlib.data.fractals.ifs_system``, ``adlib.data.fractals.render_fractal``.
    """
    a = params[:, :4].reshape(-1, 2, 2)
    b = params[:, 4:]
    prob = np.abs(np.linalg.det(a)) + 1e-3  # FractalDB picks maps in proportion to their area
    cum = np.cumsum(prob / prob.sum())
    x = rng.uniform(-1, 1, size=(n_chains, 2))
    pts, ids = [], []
    for step in range(n_steps):
        k = np.minimum(np.searchsorted(cum, rng.uniform(size=n_chains)), len(params) - 1)
        x = np.einsum("nij,nj->ni", a[k], x) + b[k]
        if step >= 6:  # the first steps have not reached the attractor yet
            pts.append(x)
            ids.append(k)
    return np.concatenate(pts), np.concatenate(ids)


def _fill_rate(pts: np.ndarray, size: int) -> float:
    lo, hi = pts.min(0), pts.max(0)
    ij = ((pts - lo) / np.maximum(hi - lo, 1e-9) * (size - 1)).astype(int)
    return len(np.unique(ij[:, 0] * size + ij[:, 1])) / size ** 2


def render_fractal(params: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One training image (size, size, 3) float32 in [0, 1]: 1-4 coloured instances of one IFS class.

    Each instance jitters the parameters a little (intra-class variation), is rotated, scaled and placed
    at random, and colours its points by the map that placed them; the background is a random colour
    with smooth noise, so the class is told by shape and local structure, not by colour.

    Used by: ``adlib.data.fractals.fractal_dataset``.
    """
    yy, xx = np.mgrid[0:size, 0:size] / size
    bg = rng.uniform(0, 1, 3) + rng.uniform(-0.2, 0.2, 3) * np.sin(
        2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy + rng.uniform()))[..., None]
    acc = np.zeros((size * size, 3))
    cnt = np.zeros(size * size)
    for _ in range(int(rng.integers(1, 5))):
        p = params + rng.normal(0, 0.03, size=params.shape)
        pts, ids = ifs_points(p, rng, n_chains=16 * size)
        finite = np.isfinite(pts).all(1)
        pts, ids = pts[finite], ids[finite]
        lo, hi = np.percentile(pts, [1, 99], axis=0)
        pts = (pts - (lo + hi) / 2) / np.maximum(hi - lo, 1e-6).max()
        t = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) * rng.uniform(0.3, 1.1) * size
        ij = (pts @ rot.T + rng.uniform(0.2, 0.8, 2) * size).astype(int)
        keep = ((ij >= 0) & (ij < size)).all(1)
        flat = ij[keep, 0] * size + ij[keep, 1]
        colours = rng.uniform(0, 1, size=(len(params), 3))[ids[keep]]
        for ch in range(3):
            acc[:, ch] += np.bincount(flat, weights=colours[:, ch], minlength=size * size)
        cnt += np.bincount(flat, minlength=size * size)
    alpha = (1 - np.exp(-cnt / 3.0))[:, None]
    fg = acc / np.maximum(cnt, 1)[:, None]
    img = bg.reshape(-1, 3) * (1 - alpha) + fg * alpha
    return np.clip(img.reshape(size, size, 3), 0, 1).astype(np.float32)


def fractal_dataset(n_classes: int, per_class: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n_classes * per_class, 3, size, size) uint8 and labels: ``n_classes`` random IFS classes.

    Used by: ``adlib.recipes.pretrain._train``.
    """
    rng = np.random.default_rng(seed)
    systems = [ifs_system(rng) for _ in range(n_classes)]
    images = np.stack([render_fractal(s, size, rng) for s in systems for _ in range(per_class)])
    labels = np.repeat(np.arange(n_classes), per_class)
    return torch.from_numpy((images * 255).round().astype(np.uint8)).permute(0, 3, 1, 2), torch.from_numpy(labels)
