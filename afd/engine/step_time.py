"""Step-time model: predicts the next step's time from its shape, calibrated online.

Ranks run in lockstep, so a step costs what its slowest attention rank costs plus the FFN
work of every token: t = w0 + max_r(w1*tokens_r + w2*work_r) + w3*total_tokens, where a
rank's attention work is the sum over its sequences of new tokens x context. The slowest rank
is picked with the current weights; the weights are fitted by ridge least squares on recent
measured steps, pulled toward a conservative prior until data arrives."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

NUM_FEATURES = 4


@dataclass
class StepShapeStats:
    """The features of one step (or a candidate step), accumulated per attention rank."""

    tokens: list[int]
    work: list[int]  # sum over sequences of new tokens x context length

    @classmethod
    def empty(cls, num_ranks: int) -> StepShapeStats:
        return cls([0] * num_ranks, [0] * num_ranks)

    def add(self, rank: int, num_new: int, context: int) -> None:
        self.tokens[rank] += num_new
        self.work[rank] += num_new * context

    def features(
        self, weights: np.ndarray, rank: int = -1, tokens: int = 0, work: int = 0
    ) -> np.ndarray:
        """Features of this step, plus `tokens`/`work` more on `rank` (a candidate chunk)."""
        cost, best = -1.0, (0, 0)
        for r, (t, w) in enumerate(zip(self.tokens, self.work, strict=True)):
            if r == rank:
                t, w = t + tokens, w + work
            c = weights[1] * t + weights[2] * w
            if c > cost:
                cost, best = c, (t, w)
        return np.array([1.0, best[0], best[1], sum(self.tokens) + tokens])


class StepTimeModel:
    def __init__(
        self,
        prior: tuple[float, ...] = (5e-3, 1e-4, 2e-7, 2e-5),
        window: int = 512,
        prior_weight: float = 4.0,
    ) -> None:
        self.prior = np.array(prior, dtype=np.float64)
        self.weights = self.prior.copy()
        self.samples: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self.prior_weight = prior_weight
        self._since_fit = 0

    def predict(
        self, shape: StepShapeStats, rank: int = -1, tokens: int = 0, work: int = 0
    ) -> float:
        return float(shape.features(self.weights, rank, tokens, work) @ self.weights)

    def predict_uniform(self, tokens: int, work: int, num_ranks: int) -> float:
        """The step if every rank carried this load (a rank's fair share of the target)."""
        return float(np.array([1.0, tokens, work, num_ranks * tokens]) @ self.weights)

    def predict_features(self, x: np.ndarray) -> float:
        return float(x @ self.weights)

    def observe(self, shape: StepShapeStats, seconds: float) -> None:
        self.samples.append((shape.features(self.weights), seconds))
        self._since_fit += 1
        if self._since_fit >= 8:  # refitting every step would cost more than it gains
            self.fit()

    def fit(self) -> None:
        """Ridge regression toward the prior, scaled per feature so units do not matter."""
        self._since_fit = 0
        x = np.stack([s[0] for s in self.samples])  # [N, F]
        y = np.array([s[1] for s in self.samples])  # [N]
        scale = np.maximum(np.abs(x).max(axis=0), 1.0)
        xs = x / scale
        reg = self.prior_weight * np.eye(NUM_FEATURES)
        w = np.linalg.solve(xs.T @ xs + reg, xs.T @ y + reg @ (self.prior * scale))
        self.weights = np.maximum(w / scale, 0.0)  # costs never go negative
