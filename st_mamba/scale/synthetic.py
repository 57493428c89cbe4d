"""Synthetic unit vectors shaped like sentence embeddings, for index benchmarks and tests.

Real embeddings are not spread evenly over the sphere: documents fall into topics, and within a
topic they vary along a few directions only (their intrinsic dimension is far below ``dimension``).
So a vector here is a topic centre, plus a Gaussian offset in a ``latent``-dimensional subspace of
its own topic, plus a little isotropic noise, normalised to length 1. Queries are fresh points of the
same topics with extra noise: near some documents, equal to none.
"""

from __future__ import annotations

import numpy as np

_BLOCK = 65_536  # rows generated at a time, so temporaries stay small next to the output


class ClusteredEmbeddings:
    """A Gaussian mixture of ``clusters`` topics on the unit sphere of R^dimension.

    Args:
        dimension: length of each vector.
        clusters: number of topics.
        latent: dimensions along which documents of one topic vary.
        spread: size of a document's offset from its topic centre (the centre has length 1).
        noise: size of the isotropic noise added to every vector.
        seed: the topics (centres and subspaces) depend only on it.
    """

    def __init__(
        self,
        dimension: int = 384,
        clusters: int = 1024,
        latent: int = 24,
        spread: float = 0.6,
        noise: float = 0.1,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.dimension, self.latent, self.spread, self.noise = dimension, latent, spread, noise
        self.centres = _unit(rng.standard_normal((clusters, dimension), dtype=np.float32))  # (K, D)
        # An orthonormal basis of each topic's subspace: (K, latent, D).
        self.bases = np.linalg.qr(rng.standard_normal((clusters, dimension, latent), dtype=np.float32))[0]
        self.bases = np.ascontiguousarray(self.bases.transpose(0, 2, 1))

    def sample(self, n: int, seed: int, extra_noise: float = 0.0) -> np.ndarray:
        """``n`` unit vectors (n, dimension) float32; ``extra_noise`` > 0 makes queries rather than documents."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dimension), dtype=np.float32)
        for start in range(0, n, _BLOCK):
            rows = min(_BLOCK, n - start)
            topics = rng.integers(0, len(self.centres), rows)
            offsets = rng.standard_normal((rows, self.latent), dtype=np.float32) * (self.spread / self.latent**0.5)
            block = self.centres[topics]  # (rows, D)
            for topic in np.unique(topics):  # one small matmul per topic rather than a (rows, latent, D) gather
                members = np.flatnonzero(topics == topic)
                block[members] += offsets[members] @ self.bases[topic]
            sigma = (self.noise + extra_noise) / self.dimension**0.5
            block += rng.standard_normal(block.shape, dtype=np.float32) * sigma
            out[start : start + rows] = _unit(block)
        return out


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
