"""Fréchet distance between Gaussians fitted to features (FID's formula, any feature extractor).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

``tr sqrt(S1 S2)`` is computed from the eigenvalues of the symmetric matrix ``S1^1/2 S2 S1^1/2`` (which has the
same eigenvalues as ``S1 S2``) with symmetric ``eigh`` in float64, clamping the tiny negative eigenvalues
round-off produces. Unlike ``scipy.linalg.sqrtm`` this needs no complex arithmetic and no "imaginary
component" fallback, and it is stable for the rank-deficient covariances of few samples.
"""
from __future__ import annotations

import numpy as np
import torch



def _f64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """``feats`` ``(N, D)`` (tensor or array, N >= 2) -> ``(mu (D,), sigma (D, D))`` in float64.

    ``sigma`` is the unbiased sample covariance (``ddof=1``), as in FID.
    """
    f = _f64(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats: expected features of shape (N >= 2, D), got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("feature_stats: features contain NaN or inf")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """``tr((S1 S2)^1/2)`` = sum of square roots of the eigenvalues of ``S1^1/2 S2 S1^1/2``."""
    s1, s2 = _f64(sigma1), _f64(sigma2)
    r = _psd_sqrt((s1 + s1.T) / 2)
    m = r @ ((s2 + s2.T) / 2) @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``mu`` ``(D,)``, ``sigma`` ``(D, D)``, tensors or arrays; computed in float64; returns a float >= 0
    (round-off below zero is clamped).
    """
    m1, m2, s1, s2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    d = m1.shape[0] if m1.ndim == 1 else -1
    if m1.ndim != 1 or m2.shape != m1.shape or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shape mismatch: mu1 {m1.shape}, sigma1 {s1.shape}, "
                         f"mu2 {m2.shape}, sigma2 {s2.shape}")
    for name, a in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    diff = m1 - m2
    dist = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return max(float(dist), 0.0)
