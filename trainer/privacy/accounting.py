"""Privacy accounting for DP-SGD with Poisson sampling: (epsilon, delta) for add/remove neighbours.

``epsilon`` is the PRV accountant's upper bound (prv-accountant, numerical composition of
privacy loss random variables); ``rdp_epsilon`` is the looser RDP bound, a cross-check.
``calibrate_noise`` finds the smallest sigma meeting a target epsilon, and
:class:`PrivacyLedger` holds a training run to its plan and budget. ``composed_epsilon`` bounds
several runs on one data set together (each a ``Mechanism``: sigma, q, steps).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple, Sequence

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis
from prv_accountant import PRVAccountant
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

EPS_ERROR = 0.01  # absolute error of the PRV epsilon estimate; the upper bound accounts for it
ACCOUNTANT_NAME = f"prv (prv-accountant 0.2.0 PRVAccountant, Poisson-subsampled Gaussian, upper bound, eps_error={EPS_ERROR})"
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
SCREEN_ORDERS = [1 + x / 10.0 for x in (5, 10, 20, 30, 40, 50, 70, 90)] + [12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 255]
# PRV is within ~20% of RDP below this; far above it, its discretisation exhausts memory (2000 steps
# at sigma 0.3, q 0.5: RDP 5935 -> > 24 GB). Plans that large are refused anyway (epsilon <= 100).
PRV_RDP_LIMIT = 200.0


class Mechanism(NamedTuple):
    """``steps`` DP-SGD steps of Poisson rate ``sample_rate`` and noise multiplier ``noise_multiplier``."""
    noise_multiplier: float
    sample_rate: float
    steps: int


def _validate(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _prv_accountant(noise_multiplier: float, sample_rate: float, max_steps: int, delta: float) -> PRVAccountant:
    return _prv_accountant_of([Mechanism(noise_multiplier, sample_rate, max_steps)], delta)


# A ledger's accountant (~0.1-2 s to build, 10-50 MB; immutable once built): the ledgers of one plan in a
# process (a rerun, a resume, the reports) share it.
_plan_accountant = functools.lru_cache(maxsize=4)(_prv_accountant)


def _prv_accountant_of(mechanisms: Sequence[Mechanism], delta: float) -> PRVAccountant:
    """The PRV accountant of the mechanisms, each up to its ``steps`` (ValueError if it cannot be built)."""
    try:
        return PRVAccountant(
            prvs=[PoissonSubsampledGaussianMechanism(sampling_probability=m.sample_rate,
                                                     noise_multiplier=m.noise_multiplier) for m in mechanisms],
            eps_error=EPS_ERROR,
            delta_error=delta / 1000,
            max_self_compositions=[m.steps for m in mechanisms],
        )
    except (RuntimeError, OverflowError, FloatingPointError) as err:
        plans = ", ".join(f"sigma={m.noise_multiplier}, q={m.sample_rate}, steps={m.steps}" for m in mechanisms)
        raise ValueError(
            f"the PRV accountant cannot evaluate {plans}, delta={delta} (noise too small for its discretisation; "
            f"epsilon is very large): {err}"
        ) from err


def _prv_upper(accountant: PRVAccountant, steps: int, delta: float) -> float:
    _, _, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=[steps])
    return _upper_bound(upper)


def _upper_bound(upper: float) -> float:
    """The PRV accountant's upper bound, clamped at 0; NaN (no bound at all) is refused, never read as 0."""
    if math.isnan(upper):
        raise ValueError("the PRV accountant returned no epsilon bound (NaN)")
    return max(0.0, float(upper))


# The accountant is a pure function of its numbers and a PRV evaluation takes ~0.1-1.5 s: a process
# that plans, checks and reports the same runs (the demo, a sweep) asks for the same values again.
@functools.lru_cache(maxsize=1024, typed=True)
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Upper bound on epsilon after ``steps`` DP-SGD steps (PRV accountant).

    When the RDP bound exceeds ``PRV_RDP_LIMIT`` the PRV accountant is not run (its
    discretisation then needs tens of GB) and the RDP bound, also an upper bound, is returned.
    """
    _validate(noise_multiplier, sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    rdp = _rdp_beyond_prv([Mechanism(noise_multiplier, sample_rate, steps)], delta)
    if rdp is not None:
        return rdp
    return _prv_upper(_prv_accountant(noise_multiplier, sample_rate, steps, delta), steps, delta)


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon from the RDP analysis of the subsampled Gaussian (looser than PRV)."""
    return composed_rdp_epsilon([Mechanism(noise_multiplier, sample_rate, steps)], delta)


def composed_epsilon(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """Upper bound on epsilon at ``delta`` of running every mechanism on one data set (adaptively).

    The PRV accountant composes their privacy loss distributions (tighter than adding epsilons);
    when the RDP composition exceeds ``PRV_RDP_LIMIT`` that bound is returned instead, as in
    :func:`epsilon`, and where the PRV accountant fails. Mechanisms of zero steps spend nothing.
    """
    for m in mechanisms:  # before any conversion: 2.9 steps is refused, not counted as 2
        _validate(m.noise_multiplier, m.sample_rate, m.steps, delta)
    active = [Mechanism(float(m.noise_multiplier), float(m.sample_rate), int(m.steps)) for m in mechanisms]
    merged: dict[tuple[float, float], int] = {}  # k and l steps of one mechanism are k + l steps of it
    for m in active:
        if m.steps > 0:
            merged[(m.noise_multiplier, m.sample_rate)] = merged.get((m.noise_multiplier, m.sample_rate), 0) + m.steps
    return _composed_epsilon(tuple(sorted(Mechanism(sigma, q, steps) for (sigma, q), steps in merged.items())), delta)


@functools.lru_cache(maxsize=256, typed=True)
def _composed_epsilon(active: tuple[Mechanism, ...], delta: float) -> float:
    """``composed_epsilon`` of validated, merged mechanisms of at least one step each (in a canonical order)."""
    if not active:
        return 0.0
    rdp = _rdp_beyond_prv(active, delta)
    if rdp is not None:
        return rdp
    try:
        accountant = _prv_accountant_of(active, delta)
        _, _, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=[m.steps for m in active])
        return _upper_bound(upper)
    except (ValueError, RuntimeError):  # the PRV discretisation cannot take it: the RDP bound still holds
        return composed_rdp_epsilon(active, delta)


def composed_rdp_epsilon(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """Epsilon at ``delta`` from the summed RDP curves of the mechanisms (looser than PRV; a cross-check)."""
    for m in mechanisms:
        _validate(m.noise_multiplier, m.sample_rate, m.steps, delta)
    return _rdp_of(mechanisms, delta, RDP_ORDERS)


def _rdp_of(mechanisms: Sequence[Mechanism], delta: float, orders: Sequence[float]) -> float:
    """Epsilon at ``delta`` from the mechanisms' summed RDP curves at ``orders`` (inputs already validated)."""
    total = np.zeros(len(orders))
    for m in mechanisms:
        if m.steps:
            total += rdp_analysis.compute_rdp(q=m.sample_rate, noise_multiplier=m.noise_multiplier, steps=m.steps,
                                              orders=orders)
    if not total.any():
        return 0.0
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


def _rdp_beyond_prv(mechanisms: Sequence[Mechanism], delta: float) -> float | None:
    """The RDP bound of the mechanisms when it exceeds ``PRV_RDP_LIMIT`` (the PRV accountant is then not run),
    else None. ``SCREEN_ORDERS`` are a subset of ``RDP_ORDERS``, so their bound is never below the full one:
    at or under the limit there, the full bound (ten times the work) need not be computed."""
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": only the bound matters here
        warnings.simplefilter("ignore", UserWarning)
        screened = _rdp_of(mechanisms, delta, SCREEN_ORDERS)
    if screened <= PRV_RDP_LIMIT:
        return None
    rdp = _rdp_of(mechanisms, delta, RDP_ORDERS)
    return rdp if rdp > PRV_RDP_LIMIT else None


@functools.lru_cache(maxsize=256, typed=True)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest sigma (to 1%) with ``epsilon(sigma, q, steps, delta) <= target_epsilon``.

    The returned sigma meets the target, and a sigma 0.5% below it was evaluated and does not (so, epsilon
    decreasing in sigma, neither does 0.99 * sigma).
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}")
    _validate(1.0, sample_rate, steps, delta)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate noise (zero steps spend no privacy)")

    def excess(sigma: float) -> float:
        """log(epsilon / target), <= 0 exactly where epsilon <= target (compared before any rounding)."""
        try:
            eps = epsilon(sigma, sample_rate, steps, delta)
        except ValueError:  # the accountant cannot handle sigma this small: far above target
            return math.inf
        if eps <= target_epsilon:
            return min(math.log(max(eps, 1e-300)) - math.log(target_epsilon), 0.0)
        if eps > target_epsilon:
            return max(math.log(eps) - math.log(target_epsilon), math.ulp(0.0))
        return math.inf  # NaN: no bound, so not met

    hi, f_hi = 1.0, excess(1.0)
    while f_hi > 0:
        hi *= 2.0
        if hi > 1e6:
            raise ValueError(f"no sigma <= 1e6 reaches epsilon {target_epsilon} with q={sample_rate}, steps={steps}")
        f_hi = excess(hi)
    lo, f_lo = hi / 2.0, excess(hi / 2.0)
    while f_lo <= 0:
        hi, f_hi, lo = lo, f_lo, lo / 2.0
        if lo < 1e-3:
            return hi
        f_lo = excess(lo)
    # invariant: hi meets, lo does not; stop when they are 0.5% apart (a margin below the 1% promised).
    def narrow(sigma: float) -> None:
        nonlocal lo, f_lo, hi, f_hi
        if lo < sigma < hi:
            f = excess(sigma)
            if f <= 0:
                hi, f_hi = sigma, f
            else:
                lo, f_lo = sigma, f

    # log epsilon is nearly linear in log sigma: probing just either side of the interpolated root usually
    # closes the bracket in two evaluations (bisection took ~8).
    while hi - lo > 0.005 * hi:
        width = hi - lo
        if math.isfinite(f_lo) and f_lo > f_hi:
            guess = math.exp(math.log(lo) + math.log(hi / lo) * f_lo / (f_lo - f_hi))
            narrow(guess * 0.998)
            narrow(guess * 1.002)
        if hi - lo > 0.5 * width:  # no interpolation, or it did not pay this round: bisect
            narrow(0.5 * (lo + hi))
    return hi


def signal_to_noise_bound(noise_multiplier: float, expected_batch_size: float, steps: int, dim: int) -> float:
    """Largest possible ratio of signal norm to noise norm summed over a whole run.

    Even if every clipped example gradient (norm <= C) pointed the same way in every step, the
    summed signal would have norm ``steps * B * C`` against noise of norm about
    ``sqrt(steps) * sigma * C * sqrt(dim)``. Below 1 the noise drowns any signal the data could give.
    """
    return math.sqrt(steps) * expected_batch_size / (noise_multiplier * math.sqrt(dim))


class PrivacyBudgetExceeded(RuntimeError):
    """A DP-SGD step was refused: it would go past the planned steps (and so the budget)."""


class PrivacyLedger:
    """Holds a run to its plan: refuses a plan over budget, and any step past the plan.

    The plan (sigma, q, delta, planned_steps) is checked at construction:
    ``epsilon(planned_steps) <= epsilon_budget``. Epsilon grows with steps, so refusing
    every step past the plan keeps the spent epsilon within the budget. ``private_set`` says
    whose budget it is (a JSON-able description, opaque here): a saved state of another set is
    refused like one of another plan.
    """

    def __init__(
        self, noise_multiplier: float, sample_rate: float, delta: float, epsilon_budget: float, planned_steps: int,
        private_set: dict | None = None,
    ):
        _validate(noise_multiplier, sample_rate, planned_steps, delta)
        if not epsilon_budget > 0 or not math.isfinite(epsilon_budget):
            raise ValueError(f"epsilon_budget must be a positive finite number, got {epsilon_budget}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.epsilon_budget = float(epsilon_budget)
        self.planned_steps = int(planned_steps)
        self.private_set = private_set
        self.steps_taken = 0
        self._accountant = None
        if planned_steps > 0:
            self._accountant = _plan_accountant(self.noise_multiplier, self.sample_rate, self.planned_steps,
                                                self.delta)
        self.planned_epsilon = self._epsilon_at(planned_steps)
        if self.planned_epsilon > self.epsilon_budget:
            raise ValueError(
                f"the plan spends epsilon={self.planned_epsilon:.4f} (sigma={noise_multiplier}, q={sample_rate}, "
                f"steps={planned_steps}, delta={delta}), over the budget epsilon={epsilon_budget}"
            )

    def _epsilon_at(self, steps: int) -> float:
        return 0.0 if steps == 0 else _prv_upper(self._accountant, steps, self.delta)

    def record_step(self) -> None:
        """Call before each optimizer step; raises (and records nothing) if the step is past the plan."""
        if self.steps_taken + 1 > self.planned_steps:
            raise PrivacyBudgetExceeded(
                f"step {self.steps_taken + 1} refused: the plan has {self.planned_steps} steps "
                f"(epsilon={self.planned_epsilon:.4f} of the budget {self.epsilon_budget})"
            )
        self.steps_taken += 1

    def spent_epsilon(self) -> float:
        return self._epsilon_at(self.steps_taken)

    def report(self) -> dict:
        return {
            "epsilon": self.spent_epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps_taken,
            "planned_steps": self.planned_steps,
            "planned_epsilon": self.planned_epsilon,
            "epsilon_budget": self.epsilon_budget,
            "accountant": ACCOUNTANT_NAME,
        }

    def state_dict(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "planned_steps": self.planned_steps,
            "steps_taken": self.steps_taken,
            **({} if self.private_set is None else {"private_set": self.private_set}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the step count; the stored plan must be this ledger's plan, and its private set this
        one's (a state saved before ledgers named their set has none and is taken as this set's)."""
        for key in ("noise_multiplier", "sample_rate", "delta", "epsilon_budget", "planned_steps", "steps_taken"):
            if key not in state:
                raise KeyError(f"ledger state lacks {key!r}")
        for key in ("noise_multiplier", "sample_rate", "delta", "epsilon_budget", "planned_steps", "private_set"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"ledger state has {key}={state[key]!r}, but this ledger's plan has {getattr(self, key)!r}")
        if not 0 <= state["steps_taken"] <= self.planned_steps:
            raise ValueError(f"ledger state has steps_taken={state['steps_taken']}, outside [0, {self.planned_steps}]")
        self.steps_taken = int(state["steps_taken"])
