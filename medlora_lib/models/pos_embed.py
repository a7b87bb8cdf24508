"""Fixed sin-cos positional embeddings, bit-for-bit as CineMA computes them.

Chapter: notebooks/00_foundation_model_and_lora (the foundation model).

CineMA builds the coordinate grid with ``numpy.meshgrid`` in its default ``"xy"``
indexing, which swaps the first two axes: for a (G1, G2, G3) grid flattened in the
token order ``t = (h * G2 + w) * G3 + d``, the first channel block encodes the *W*
index (2nd spatial axis), the second the *H* index and the third the *D* index (for
square H = W grids; we reproduce the exact numpy construction for any grid). Each
axis gets ``d = floor(E / n_axes)`` channels rounded down to even, ``[sin | cos]``
within the block, ``omega_k = 10000 ** (-k / (d / 2))`` in float32, and zero padding
at the end when ``E != n_axes * d``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["sincos_1d", "sincos_pos_embed", "sincos_pos_embed_tensor"]


def sincos_1d(
    embed_dim: int, positions: np.ndarray, max_period: int = 10000
) -> np.ndarray:
    """1-D sin/cos embedding of ``positions`` (any shape, flattened), float32.

    Args:
        embed_dim: number of channels E (must be even).
        positions: positions to encode, float32.
        max_period: the longest period.

    Returns:
        Array (M, E): ``[sin(pos * omega), cos(pos * omega)]``.

    Raises:
        ValueError: if ``embed_dim`` is odd.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    half = embed_dim // 2
    omega = np.arange(half, dtype=np.float32)
    # CineMA ran numpy 1.x, where a float64 scalar times a float32 array stays float32;
    # under numpy 2 we cast explicitly to keep the same bits.
    omega = np.exp(np.float32(-np.log(max_period)) * omega / np.float32(half))
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def sincos_pos_embed(embed_dim: int, grid_size: tuple[int, ...]) -> np.ndarray:
    """N-D sin/cos table for a token grid, exactly as CineMA's ``get_pos_embed``.

    Args:
        embed_dim: number of channels E.
        grid_size: token grid (G1, G2[, G3]) in (H, W, D) order.

    Returns:
        float32 array (prod(grid_size), E), rows in token order.
    """
    grid = np.stack(
        np.meshgrid(*[np.arange(s, dtype=np.float32) for s in grid_size]), axis=0
    )
    n = grid.shape[0]
    d = embed_dim // n
    d -= d % 2
    pad = embed_dim - d * n
    emb = np.concatenate([sincos_1d(d, grid[i]) for i in range(n)], axis=1)
    if pad > 0:
        emb = np.concatenate([emb, np.zeros((emb.shape[0], pad), np.float32)], axis=1)
    assert emb.shape == (math.prod(grid_size), embed_dim)
    return emb.astype(np.float32)


def sincos_pos_embed_tensor(embed_dim: int, grid_size: tuple[int, ...]) -> torch.Tensor:
    """:func:`sincos_pos_embed` as a float32 tensor of shape (1, N, E)."""
    return torch.from_numpy(sincos_pos_embed(embed_dim, grid_size)).unsqueeze(0)
