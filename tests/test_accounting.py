"""Accounting against opacus' accountants; calibration and the ledger's refusals."""
from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant as OpacusPRV
from opacus.accountants import RDPAccountant as OpacusRDP

from trainer.privacy import (Mechanism, PrivacyBudgetExceeded, PrivacyLedger, calibrate_noise, composed_epsilon,
                             epsilon, rdp_epsilon)
from trainer.privacy.accounting import EPS_ERROR, composed_rdp_epsilon

DELTA = 1e-5


def opacus_epsilon(accountant_cls, sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    return opacus_composed(accountant_cls, [(sigma, q, steps)], delta)


def opacus_composed(accountant_cls, history: list, delta: float) -> float:
    accountant = accountant_cls()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 500), (0.8, 0.05, 200), (2.0, 0.1, 50)])
def test_epsilon_agrees_with_opacus_and_is_below_rdp(sigma, q, steps):
    eps = epsilon(sigma, q, steps, DELTA)
    assert abs(eps - opacus_epsilon(OpacusPRV, sigma, q, steps)) <= EPS_ERROR
    rdp = rdp_epsilon(sigma, q, steps, DELTA)
    assert rdp <= opacus_epsilon(OpacusRDP, sigma, q, steps) + 1e-9
    assert eps < rdp


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    assert epsilon(1.0, 0.01, 0, DELTA) == 0.0
    assert epsilon(1.0, 0.01, 100, DELTA) < epsilon(1.0, 0.01, 400, DELTA)
    assert epsilon(2.0, 0.01, 400, DELTA) < epsilon(1.0, 0.01, 400, DELTA)


@pytest.mark.parametrize("target,delta,q,steps", [(2.0, DELTA, 0.01, 300),
                                                   (10.0, 1e-3, 0.1, 3)])  # the last: PRV fails below ~0.48
def test_calibrate_noise_hits_target(target, delta, q, steps):
    sigma = calibrate_noise(target, delta, q, steps)
    assert epsilon(sigma, q, steps, delta) <= target
    try:
        assert epsilon(0.99 * sigma, q, steps, delta) > target
    except ValueError:  # the accountant cannot evaluate it: calibration must not have gone there
        pass


def test_the_rdp_screen_never_sends_a_plan_past_the_prv_limit_to_the_prv_accountant():
    """``epsilon`` screens with a few RDP orders before the full set: a subset's bound is never below the full one,
    so a plan under the limit on the screen is under it in full."""
    from trainer.privacy.accounting import RDP_ORDERS, SCREEN_ORDERS, _rdp_of
    assert set(SCREEN_ORDERS) <= set(RDP_ORDERS)
    for plan in [Mechanism(0.3, 0.5, 2000), Mechanism(0.48, 0.2, 400), Mechanism(0.8, 1 / 30, 800)]:
        assert _rdp_of([plan], DELTA, SCREEN_ORDERS) >= _rdp_of([plan], DELTA, RDP_ORDERS)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"delta": 1.0}, "delta"),
        ({"steps": -1}, "steps"),
    ],
)
def test_inputs_are_validated(kwargs, match):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": DELTA} | kwargs
    with pytest.raises(ValueError, match=match):
        epsilon(**args)
    with pytest.raises(ValueError, match=match):
        rdp_epsilon(**args)


def test_answers_remembered_for_a_plan_do_not_pass_an_invalid_one():
    """The accountant remembers its answers; an argument equal to a remembered one but of another type
    (3.0 steps for 3) is still refused."""
    assert epsilon(1.0, 0.01, 3, DELTA) == epsilon(1.0, 0.01, 3, DELTA) > 0
    with pytest.raises(ValueError, match="steps"):
        epsilon(1.0, 0.01, 3.0, DELTA)
    sigma = calibrate_noise(2.0, DELTA, 0.01, 3)
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise(2.0, DELTA, 0.01, 3.0)
    assert calibrate_noise(2.0, DELTA, 0.01, 3) == sigma


def test_a_fractional_step_count_is_refused_in_a_composition():
    with pytest.raises(ValueError, match="steps"):
        composed_epsilon([Mechanism(1.0, 0.01, 2.9)], DELTA)


def test_a_nan_from_the_prv_accountant_is_never_read_as_zero(monkeypatch):
    """No bound at all: ``epsilon`` refuses, a composition falls back to the RDP bound (both upper bounds)."""
    from trainer.privacy import accounting
    monkeypatch.setattr(accounting.PRVAccountant, "compute_epsilon", lambda self, **kw: (math.nan,) * 3)
    with pytest.raises(ValueError, match="NaN"):
        epsilon(1.2345, 0.01, 10, DELTA)  # a plan no other test asks for: not answered from memory
    runs = [Mechanism(1.2345, 0.01, 10), Mechanism(2.345, 0.02, 5)]
    assert composed_epsilon(runs, DELTA) == composed_rdp_epsilon(runs, DELTA) > 0


def test_ledger_refuses_a_plan_over_budget():
    planned = epsilon(1.0, 0.01, 200, DELTA)
    with pytest.raises(ValueError, match=r"epsilon=.*over the budget epsilon=0.5"):
        PrivacyLedger(1.0, 0.01, DELTA, epsilon_budget=0.5, planned_steps=200)
    assert planned > 0.5


def test_ledger_counts_and_refuses_the_step_past_the_plan():
    ledger = PrivacyLedger(1.0, 0.05, DELTA, epsilon_budget=5.0, planned_steps=3)
    assert ledger.spent_epsilon() == 0.0
    spent = []
    for _ in range(3):
        ledger.record_step()
        spent.append(ledger.spent_epsilon())
    assert spent[0] < spent[1] < spent[2] <= 5.0
    assert spent[2] == pytest.approx(epsilon(1.0, 0.05, 3, DELTA), abs=EPS_ERROR)
    with pytest.raises(PrivacyBudgetExceeded, match="step 4 refused"):
        ledger.record_step()
    assert ledger.steps_taken == 3
    report = ledger.report()
    assert report["steps"] == 3 and report["epsilon"] == spent[2] and report["delta"] == DELTA
    assert report["noise_multiplier"] == 1.0 and report["sample_rate"] == 0.05
    assert "prv" in report["accountant"]


def test_ledger_state_round_trip():
    ledger = PrivacyLedger(1.0, 0.05, DELTA, epsilon_budget=5.0, planned_steps=4)
    ledger.record_step()
    ledger.record_step()
    resumed = PrivacyLedger(1.0, 0.05, DELTA, epsilon_budget=5.0, planned_steps=4)
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.steps_taken == 2 and resumed.spent_epsilon() == ledger.spent_epsilon()
    other_plan = PrivacyLedger(1.1, 0.05, DELTA, epsilon_budget=5.0, planned_steps=4)
    with pytest.raises(ValueError, match="noise_multiplier"):
        other_plan.load_state_dict(ledger.state_dict())


def test_ledger_refuses_the_state_of_another_private_set():
    """Same plan, other people: their steps are not this set's (a resume on another set would leave the
    first set's steps counted for neither); a state saved before ledgers named their set is accepted."""
    ledger = PrivacyLedger(1.0, 0.05, DELTA, epsilon_budget=5.0, planned_steps=4, private_set={"split": "train"})
    ledger.record_step()
    state = ledger.state_dict()
    assert state["private_set"] == {"split": "train"}
    other_set = PrivacyLedger(1.0, 0.05, DELTA, epsilon_budget=5.0, planned_steps=4, private_set={"split": "val"})
    with pytest.raises(ValueError, match="private_set"):
        other_set.load_state_dict(state)
    with pytest.raises(ValueError, match="private_set"):
        PrivacyLedger(1.0, 0.05, DELTA, epsilon_budget=5.0, planned_steps=4).load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "private_set"}
    other_set.load_state_dict(older)
    assert other_set.steps_taken == 1


def test_huge_epsilon_falls_back_to_rdp_instead_of_exhausting_memory():
    """sigma 0.3, q 0.5, 2000 steps: the PRV discretisation would need > 24 GB; RDP is a valid upper bound."""
    from trainer.privacy.accounting import PRV_RDP_LIMIT
    eps = epsilon(0.3, 0.5, 2000, 1e-5)
    assert eps == rdp_epsilon(0.3, 0.5, 2000, 1e-5) > PRV_RDP_LIMIT
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(float("inf"), 1e-5, 0.01, 10)


# two runs on one private set: budgets like the demo's two, and a run continued under another plan
RUNS = [[Mechanism(0.8, 0.05, 200), Mechanism(1.5, 0.025, 150)], [Mechanism(1.0, 0.01, 300), Mechanism(2.0, 0.1, 50)]]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("runs", RUNS)
def test_composed_epsilon_agrees_with_opacus_and_beats_adding_epsilons(runs):
    delta = 2 * DELTA
    eps = composed_epsilon(runs, delta)
    assert abs(eps - opacus_composed(OpacusPRV, [tuple(m) for m in runs], delta)) <= 2 * EPS_ERROR
    rdp = composed_rdp_epsilon(runs, delta)
    assert rdp == pytest.approx(opacus_composed(OpacusRDP, [tuple(m) for m in runs], delta))
    assert eps < rdp
    each = [epsilon(*m, DELTA) for m in runs]
    assert max(epsilon(*m, delta) for m in runs) <= eps < sum(each)


def test_composing_one_plan_in_pieces_is_running_it_whole():
    whole = epsilon(0.8, 0.02, 500, DELTA)
    assert composed_epsilon([Mechanism(0.8, 0.02, 200), Mechanism(0.8, 0.02, 300)], DELTA) == \
        pytest.approx(whole, abs=EPS_ERROR)
    assert composed_epsilon([Mechanism(0.8, 0.02, 500), Mechanism(3.0, 0.5, 0)], DELTA) == pytest.approx(whole)
    assert composed_epsilon([Mechanism(0.8, 0.02, 200), Mechanism(1.0, 0.02, 300), Mechanism(0.8, 0.02, 300)],
                            DELTA) == pytest.approx(composed_epsilon([Mechanism(0.8, 0.02, 500),
                                                                      Mechanism(1.0, 0.02, 300)], DELTA))
    assert composed_epsilon([], DELTA) == 0.0
    with pytest.raises(ValueError, match="noise_multiplier"):
        composed_epsilon([Mechanism(0.0, 0.02, 5)], DELTA)
