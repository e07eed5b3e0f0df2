"""Deterministic, resumable sampling: epoch permutations and a saved numpy Generator.

Every data source draws only from these, so its whole position is a small dict that a
checkpoint stores, and every torchrun rank draws the same global batches.
"""
from __future__ import annotations

import numpy as np


class EpochSampler:
    """Indices 0..n-1 in a fresh permutation per epoch (seeded by seed, salt, epoch)."""

    def __init__(self, n: int, seed: int, salt: int = 0):
        if n < 1:
            raise ValueError("nothing to sample from: the data set is empty")
        self.n, self.seed, self.salt = n, seed, salt
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.salt, self.epoch]).permutation(self.n)

    def next(self) -> int:
        if self.pos == self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        i = int(self._perm[self.pos])
        self.pos += 1
        return i

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.pos = st["epoch"], st["pos"]
        self._perm = self._permutation()


class Rng:
    """A numpy Generator whose state goes into checkpoints."""

    def __init__(self, seed: int, salt: int = 0):
        self.gen = np.random.default_rng([seed, salt])

    def state_dict(self) -> dict:
        return self.gen.bit_generator.state

    def load_state_dict(self, st: dict) -> None:
        self.gen.bit_generator.state = st
