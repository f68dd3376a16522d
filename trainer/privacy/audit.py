"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski 2023), model-agnostic.

``m`` gradient-space canaries are made, each included in the training set with probability 1/2
(independently, from OS entropy). An included canary is one more private example: at every step
it is Poisson-sampled with the run's q, and when sampled it contributes a per-example gradient
of norm ``canary_norm`` along one coordinate of the trainable vector (its own coordinate, a
"Dirac canary"), which the DP engine clips like any example. The auditor sees what DP-SGD
releases, the noisy gradient of every step, and scores each canary by the likelihood ratio of
"sampled with probability q at each step" against "never there" on its coordinate. It then
guesses "in" for the highest scores (and "out" for the lowest) and turns the number of correct
guesses into a lower bound on epsilon that holds with the stated confidence for ANY
(epsilon, delta)-DP algorithm (their Theorem 5.2, with delta). A correct implementation gives a
bound below the claimed epsilon (up to the 5% the confidence allows); a run without noise or
without clipping gives a bound far above a small claim.

The bound cannot exceed a ceiling set by the number of canaries: with ``r`` guesses, all correct,
it is ``log(p / (1 - p))`` with ``p = alpha ** (1 / r)`` (see :func:`ceiling`): at 95% confidence,
2.2 for m = 100, 3.9 for m = 500, 4.6 for m = 1000, 6.2 for m = 5000. One-run audits are loose
for a correct run (the bound is typically well below the claim even for a tight implementation);
they are a test for bugs, not a measurement of epsilon.

What the canaries audit is the DP-SGD step's treatment of a given per-example gradient: its
clipping, the noise once per coordinate and the division. They are sampled here (not by the
training's sampler) and clipped as ready gradients (not through the layer rules), and the
ceiling lies far below usual claims, so the per-example norms of real examples (the engine's
self-check covers those), the Poisson sampler, several processes and the accountant are not
what this bound tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from torch import Tensor

CANARY_NORM = 100.0  # in units of the clipping norm: a correct engine clips it to C, a missing clip shows 100x


class GradientCanaries:
    """``m`` Dirac canaries on distinct coordinates of a ``dim``-element trainable vector.

    ``included`` (bool [m]) is the secret the audit tries to guess; ``coords`` (int64 [m]) are
    public. ``generator`` draws both (and the per-step sampling); by default from OS entropy.
    """

    def __init__(self, m: int, dim: int, norm: float, generator: torch.Generator):
        if not 1 <= m <= dim:
            raise ValueError(f"the number of canaries must be in [1, {dim}] (one coordinate each), got {m}")
        self.m, self.dim, self.norm = m, dim, float(norm)
        self.generator = generator
        self.coords = torch.randperm(dim, generator=generator)[:m]
        self.included = torch.rand(m, generator=generator, dtype=torch.float64) < 0.5
        self.observed: list[Tensor] = []

    def sample(self, q: float) -> Tensor:
        """Indices of the included canaries drawn into this step's Poisson batch."""
        draws = torch.rand(self.m, generator=self.generator, dtype=torch.float64)
        return torch.nonzero(self.included & (draws < q)).flatten()

    def gradients(self, rows: Tensor) -> Tensor:
        """Per-example gradients [len(rows), dim] of the canaries ``rows``: ``norm`` on their coordinate."""
        grads = torch.zeros(len(rows), self.dim)
        grads[torch.arange(len(rows)), self.coords[rows]] = self.norm
        return grads

    def observe(self, released: Tensor) -> None:
        """Record the released (noisy, averaged) gradient of one step, flattened to [dim], at the canaries."""
        self.observed.append(released[self.coords].double().cpu())


def scores(observed: Tensor, noise_multiplier: float, sample_rate: float, max_grad_norm: float,
           expected_batch_size: float) -> Tensor:
    """Log-likelihood ratio of each canary [m] from the released gradients ``observed`` [steps, m].

    On its coordinate, a canary's step value ``B * g / C``, less the coordinate's median over the
    steps (the drift of the real data), is N(0, sigma^2) when absent and N(1, sigma^2) when
    sampled (clipped to C), i.e. a mixture with weight q for an included canary.
    """
    y = observed * expected_batch_size / max_grad_norm
    y = y - y.median(dim=0).values
    a = (y - 0.5) / noise_multiplier**2
    per_step = torch.logaddexp(torch.full_like(a, math.log1p(-sample_rate)), math.log(sample_rate) + a)
    return per_step.sum(dim=0)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses are right] for an (eps, delta)-DP algorithm, m canaries (Thm 5.2)."""
    p = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, p))
    worst, between = 0.0, 0.0
    for i in range(1, v + 1):
        between += float(stats.binom.pmf(v - i, r, p))
        worst = max(worst, between / i)
    return min(1.0, tail + 2 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float) -> float:
    """Largest eps rejected at level ``alpha`` by ``v`` right guesses of ``r`` (0 if none is)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return lo
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def ceiling(m: int, confidence: float = 0.95) -> float:
    """The largest bound :func:`audit` can certify with ``m`` canaries (every guess right, delta = 0)."""
    alpha = (1 - confidence) / len(_guess_plans(m))
    return max(math.log(p / (1 - p)) for p in (alpha ** (1 / (k_in + k_out)) for k_in, k_out in _guess_plans(m)))


def _guess_plans(m: int) -> list[tuple[int, int]]:
    """(guesses "in" from the top, guesses "out" from the bottom), fixed before looking at the scores."""
    plans = []
    for frac in (0.02, 0.05, 0.1, 0.25):
        k = max(1, int(frac * m))
        plans += [(k, 0), (k, k)]
    return sorted(set(plans))


@dataclass
class AuditResult:
    lower_bound: float                 # epsilon lower bound at `confidence`
    claimed: float                     # the run's epsilon (PRV upper bound)
    confidence: float
    canaries: int
    included: int
    guesses: int                       # of the plan that gave the bound
    correct: int
    ceiling: float
    plans: list = field(default_factory=list)  # every plan: (k_in, k_out, right, bound)

    def line(self) -> str:
        return (f"epsilon lower bound: {self.lower_bound:.3f} at {self.confidence:.0%} confidence; "
                f"claimed epsilon: {self.claimed:.3f}")


def audit(canary_scores: Tensor, included: Tensor, delta: float, claimed: float,
          confidence: float = 0.95) -> AuditResult:
    """Guess by score with each fixed plan, bound epsilon at ``alpha / #plans`` each (Bonferroni), keep the best."""
    m = len(canary_scores)
    plans = _guess_plans(m)
    alpha = (1 - confidence) / len(plans)
    order = np.argsort(-canary_scores.numpy(), kind="stable")
    truth = included.numpy()[order]
    best, rows = (0.0, 0, 0), []
    for k_in, k_out in plans:
        right = int(truth[:k_in].sum()) + (int((~truth[m - k_out:]).sum()) if k_out else 0)
        bound = epsilon_lower_bound(m, k_in + k_out, right, delta, alpha)
        rows.append((k_in, k_out, right, bound))
        if bound > best[0]:
            best = (bound, k_in + k_out, right)
    return AuditResult(best[0], claimed, confidence, m, int(included.sum()), best[1], best[2],
                       ceiling(m, confidence), rows)
