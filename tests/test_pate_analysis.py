"""PATE's privacy analysis: every function against the reference implementation's values
(tests/fixtures/pate_reference.json, made by make_pate_reference.py), plus properties."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkd.privacy import pate_analysis as pa

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "pate_reference.json").read_text())
ORDERS = np.array(FIXTURE["orders"])
HISTOGRAMS = FIXTURE["histograms"]
RTOL = 1e-6


def decode(runs: list[list[float]]) -> np.ndarray:
    return np.concatenate([np.full(int(count), value) for value, count in runs])


def label(entry: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in entry.items() if isinstance(v, (str, int, float)))


def close(actual, expected, rtol: float = RTOL, atol: float = 1e-15) -> None:
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# --- per-query quantities against the reference --------------------------------------------


@pytest.mark.parametrize("entry", FIXTURE["gnmax"], ids=label)
def test_gnmax_q_and_rdp_match_reference(entry):
    votes = HISTOGRAMS[entry["histogram"]]["votes"]
    logq = pa.compute_logq_gnmax(votes, sigma=entry["sigma"])
    close(logq, entry["logq"])
    close(pa.compute_q_gnmax(votes, sigma=entry["sigma"]), math.exp(entry["logq"]))
    close(
        pa.rdp_gnmax_data_dependent(logq, sigma=entry["sigma"], orders=ORDERS),
        entry["rdp_data_dependent"],
    )
    close(
        pa.rdp_gnmax_data_independent(sigma=entry["sigma"], orders=ORDERS),
        entry["rdp_data_independent"],
    )


@pytest.mark.parametrize("entry", FIXTURE["threshold"], ids=label)
def test_threshold_probability_and_rdp_match_reference(entry):
    votes = HISTOGRAMS[entry["histogram"]]["votes"]
    logpr = pa.compute_logpr_answered(votes, threshold=entry["threshold"], sigma=entry["sigma1"])
    close(logpr, entry["logpr_answered"])
    close(
        pa.rdp_threshold_data_dependent(logpr, sigma=entry["sigma1"], orders=ORDERS),
        entry["rdp_data_dependent"],
    )
    close(
        pa.rdp_threshold_data_independent(sigma=entry["sigma1"], orders=ORDERS),
        entry["rdp_data_independent"],
    )


def test_data_dependent_rdp_exercises_both_regimes():
    # The fixture is only a good test if some curves are data-dependent and some are not.
    dependent = [
        np.any(np.array(e["rdp_data_dependent"]) < np.array(e["rdp_data_independent"])) for e in FIXTURE["gnmax"]
    ]
    assert any(dependent) and not all(dependent)
    dependent = [
        np.any(np.array(e["rdp_data_dependent"]) < np.array(e["rdp_data_independent"])) for e in FIXTURE["threshold"]
    ]
    assert any(dependent) and not all(dependent)


@pytest.mark.parametrize("entry", FIXTURE["logq0"], ids=label)
def test_logq0_matches_reference(entry):
    close(pa.logq0_gnmax(sigma=entry["sigma"], order=entry["order"]), entry["logq0"])


@pytest.mark.parametrize("entry", FIXTURE["local_sensitivity_gnmax"], ids=label)
def test_local_sensitivity_gnmax_matches_reference(entry):
    ls = pa.local_sensitivity_gnmax(
        entry["votes"],
        num_teachers=entry["num_teachers"],
        sigma=entry["sigma"],
        order=entry["order"],
    )
    close(ls, decode(entry["ls"]), atol=1e-300)


def far_distance(votes, num_teachers: int) -> int:
    # The distance at which the reference's threshold walk stops one short (see
    # local_sensitivity_threshold's docstring).
    current = round(max(votes))
    return max(current, num_teachers - current)


@pytest.mark.parametrize("entry", FIXTURE["local_sensitivity_threshold"], ids=label)
def test_local_sensitivity_threshold_matches_reference(entry):
    ls = pa.local_sensitivity_threshold(
        entry["votes"],
        num_teachers=entry["num_teachers"],
        threshold=entry["threshold"],
        sigma=entry["sigma1"],
        order=entry["order"],
    )
    reference = decode(entry["ls"])
    far = far_distance(entry["votes"], entry["num_teachers"])
    keep = np.arange(len(ls)) != far
    close(ls[keep], reference[keep], atol=1e-300)
    if far < len(ls):
        # The reference leaves 0 at the far end; the one-step change there is filled in.
        assert reference[far] == 0.0 and ls[far] >= 0.0


def test_threshold_far_end_is_filled_in():
    # From max = 100 of 250, the unanimous histogram lies 150 votes away; its local
    # sensitivity is the RDP step between max 249 and 250, which is not 0.
    kwargs = {"num_teachers": 250, "threshold": 200.0, "sigma": 10.0, "order": 10.0}
    ls = pa.local_sensitivity_threshold([100, 90, 60], **kwargs)
    curve = [
        pa.rdp_threshold_data_dependent(
            pa.compute_logpr_answered([v], threshold=200.0, sigma=10.0),
            sigma=10.0,
            orders=[10.0],
        )[0]
        for v in (249, 250)
    ]
    assert ls[150] == pytest.approx(abs(curve[1] - curve[0]), rel=1e-12) and ls[150] > 0


@pytest.mark.parametrize("entry", FIXTURE["smooth_sensitivity"], ids=label)
def test_smooth_sensitivity_matches_reference(entry):
    ls = decode(FIXTURE["local_sensitivity_gnmax"][entry["local_sensitivity_gnmax_index"]]["ls"])
    close(pa.smooth_sensitivity(ls, beta=entry["beta"]), entry["value"])


@pytest.mark.parametrize("entry", FIXTURE["rdp_gnss"], ids=label)
def test_rdp_of_smooth_sensitivity_release_matches_reference(entry):
    close(
        pa.rdp_smooth_sensitivity_gaussian(beta=entry["beta"], sigma=entry["sigma"], order=entry["order"]),
        entry["rdp"],
    )


@pytest.mark.parametrize("entry", FIXTURE["ss_release_params"], ids=label)
def test_smooth_sensitivity_parameters_match_reference(entry):
    close(
        pa.smooth_sensitivity_parameters(epsilon=entry["epsilon"], delta=entry["delta"]),
        (entry["alpha"], entry["beta"]),
    )


@pytest.mark.parametrize("entry", FIXTURE["always_data_independent_gnmax"], ids=label)
def test_gnmax_always_data_independent_matches_reference(entry):
    value = pa.gnmax_always_data_independent(
        num_teachers=entry["num_teachers"],
        num_classes=entry["num_classes"],
        sigma=entry["sigma"],
        orders=ORDERS,
    )
    assert value.tolist() == entry["value"]


@pytest.mark.parametrize("entry", FIXTURE["always_data_independent_threshold"], ids=label)
def test_threshold_always_data_independent_matches_reference(entry):
    value = pa.threshold_always_data_independent(
        num_teachers=entry["num_teachers"],
        threshold=entry["threshold"],
        sigma=entry["sigma1"],
        orders=[entry["order"]],
    )
    assert value == entry["value"]


# --- whole runs --------------------------------------------------------------------------------


def run_kwargs(run: dict) -> dict:
    return {
        "threshold": run["threshold"],
        "sigma1": run["sigma1"],
        "sigma2": run["sigma2"],
    }


@pytest.mark.parametrize(
    "run",
    FIXTURE["runs"],
    ids=lambda r: label({k: r[k] for k in ("num_teachers", "num_classes", "sigma1", "sigma2")}),
)
def test_run_cost_matches_reference(run):
    for delta_key, expected in run["epsilon"].items():
        cost = pa.confident_gnmax_cost(
            run["votes"],
            answered=np.array(run["answered"]),
            orders=ORDERS,
            delta=float(delta_key),
            **run_kwargs(run),
        )
        close(cost.rdp, run["rdp"])
        close(cost.data_independent_rdp, run["rdp_data_independent"])
        close(cost.epsilon, expected["epsilon"])
        close(cost.data_independent_epsilon, expected["data_independent_epsilon"])
        assert cost.order == expected["order"] and cost.data_independent_order == expected["data_independent_order"]
        assert cost.answered == sum(run["answered"])


@pytest.mark.parametrize(
    "run",
    FIXTURE["runs"],
    ids=lambda r: f"sigma2={r['sigma2']}-classes={r['num_classes']}",
)
def test_expected_run_cost_matches_reference_composition(run):
    # The reference's run_analysis weights GNMax by Pr[answered].
    expected = run["expected"]
    cost = pa.confident_gnmax_cost(
        run["votes"],
        answered=None,
        orders=expected["orders"],
        delta=expected["delta"],
        **run_kwargs(run),
    )
    close(cost.epsilon, expected["epsilon"])
    close(cost.answered, expected["answered"])
    assert cost.order == expected["order"]


@pytest.mark.parametrize(
    "run",
    FIXTURE["runs"],
    ids=lambda r: f"sigma2={r['sigma2']}-classes={r['num_classes']}",
)
def test_run_local_and_smooth_sensitivity_match_reference(run):
    smooth = run["smooth"]
    kwargs = {
        "answered": np.array(run["answered"]),
        "num_teachers": run["num_teachers"],
        "order": smooth["order"],
    }
    ls = pa.run_local_sensitivity(run["votes"], **kwargs, **run_kwargs(run))
    reference = decode(smooth["local_sensitivity"])
    # Equal except at the distances where the reference's threshold walk stops short.
    if smooth["threshold_always_data_independent"]:
        far = np.zeros(len(ls), dtype=bool)
    else:
        far = np.isin(
            np.arange(len(ls)),
            [far_distance(v, run["num_teachers"]) for v in run["votes"]],
        )
    close(ls[~far], reference[~far], atol=1e-300)
    assert np.all(ls[far] >= reference[far] * (1 - 1e-9))
    for beta_key, value in smooth["smooth_sensitivity"].items():
        mine = pa.smooth_sensitivity(ls, beta=float(beta_key))
        assert mine >= value * (1 - 1e-9)
        if not far.any():
            close(mine, value)


def test_release_adds_smooth_sensitivity_scaled_noise_and_reports_its_cost():
    run = FIXTURE["runs"][-1]  # the 50-teacher run: both steps are data-dependent
    smooth = run["smooth"]
    order, beta, sigma_ss, delta = smooth["order"], 0.005, 5.0, 1e-5
    kwargs = {
        "answered": np.array(run["answered"]),
        "num_teachers": run["num_teachers"],
        "order": order,
        **run_kwargs(run),
    }
    release = pa.release_epsilon(
        run["votes"],
        delta=delta,
        beta=beta,
        sigma_ss=sigma_ss,
        rng=np.random.default_rng(7),
        **kwargs,
    )
    ss = pa.smooth_sensitivity(pa.run_local_sensitivity(run["votes"], **kwargs), beta=beta)
    assert ss > 0
    z = np.random.default_rng(7).standard_normal()
    close(
        release.epsilon,
        smooth["rdp_at_order"] + ss * sigma_ss * z + math.log(1 / delta) / (order - 1),
    )
    close(
        release.release_cost,
        pa.rdp_smooth_sensitivity_gaussian(beta=beta, sigma=sigma_ss, order=order),
    )
    assert release.total_epsilon == release.epsilon + release.release_cost


def opacus_get_privacy_spent():
    # Opacus's RDP module is plain numpy; loading it by path spares the test importing torch.
    package = importlib.util.find_spec("opacus")
    assert package is not None and package.origin is not None
    path = Path(package.origin).parent / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("opacus_rdp_analysis", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_privacy_spent


def test_improved_conversion_matches_opacus():
    get_privacy_spent = opacus_get_privacy_spent()
    rdp = np.array(FIXTURE["runs"][0]["rdp"])
    eps, order = pa.epsilon_from_rdp(rdp, orders=ORDERS, delta=1e-5, improved_conversion=True)
    expected_eps, expected_order = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-5)
    close(eps, expected_eps, rtol=1e-12)
    assert order == expected_order
    assert eps < pa.epsilon_from_rdp(rdp, orders=ORDERS, delta=1e-5)[0]


# --- properties ------------------------------------------------------------------------------


def histograms_strategy(num_classes: int = 6, max_teachers: int = 120):
    return st.lists(
        st.integers(0, max_teachers // num_classes),
        min_size=num_classes,
        max_size=num_classes,
    ).filter(lambda votes: sum(votes) > 0)


SIGMAS = st.sampled_from([2.0, 5.0, 10.0, 40.0])


@settings(max_examples=60, deadline=None)
@given(
    votes=histograms_strategy(),
    sigma=SIGMAS,
    threshold=st.floats(0, 150),
    sigma1=SIGMAS,
)
def test_data_dependent_rdp_never_exceeds_the_data_independent_bound(votes, sigma, threshold, sigma1):
    logq = pa.compute_logq_gnmax(votes, sigma=sigma)
    gnmax = pa.rdp_gnmax_data_dependent(logq, sigma=sigma, orders=ORDERS)
    assert np.all(gnmax >= 0) and np.all(gnmax <= pa.rdp_gnmax_data_independent(sigma=sigma, orders=ORDERS))
    logpr = pa.compute_logpr_answered(votes, threshold=threshold, sigma=sigma1)
    check = pa.rdp_threshold_data_dependent(logpr, sigma=sigma1, orders=ORDERS)
    assert np.all(check >= 0) and np.all(check <= pa.rdp_threshold_data_independent(sigma=sigma1, orders=ORDERS))


@settings(max_examples=60, deadline=None)
@given(votes=histograms_strategy(), sigma=SIGMAS, donor=st.integers(0, 5))
def test_q_is_non_increasing_in_the_vote_margin(votes, sigma, donor):
    votes = np.array(votes)
    top = int(np.argmax(votes))
    if donor == top or votes[donor] == 0:
        return
    wider = votes.copy()
    wider[donor] -= 1
    # The leader gains a vote from another class: every margin grows or stays.
    wider[top] += 1
    assert pa.compute_logq_gnmax(wider, sigma=sigma) <= pa.compute_logq_gnmax(votes, sigma=sigma)


@st.composite
def runs(draw):
    queries = draw(st.integers(1, 6))
    votes = [draw(histograms_strategy()) for _ in range(queries)]
    answered = np.array(draw(st.lists(st.booleans(), min_size=queries, max_size=queries)))
    return np.array(votes), answered


RUN_PARAMS = {
    "threshold": 15.0,
    "sigma1": 5.0,
    "sigma2": 4.0,
    "orders": ORDERS,
    "delta": 1e-5,
}


@settings(max_examples=40, deadline=None)
@given(run=runs(), drop=st.lists(st.booleans(), min_size=6, max_size=6))
def test_answering_fewer_queries_never_costs_more(run, drop):
    votes, answered = run
    fewer = answered & ~np.array(drop[: len(answered)])
    full = pa.confident_gnmax_cost(votes, answered=answered, **RUN_PARAMS)
    less = pa.confident_gnmax_cost(votes, answered=fewer, **RUN_PARAMS)
    assert np.all(less.rdp <= full.rdp) and less.epsilon <= full.epsilon
    assert less.data_independent_epsilon <= full.data_independent_epsilon
    assert less.answered <= full.answered


@settings(max_examples=40, deadline=None)
@given(run=runs(), refused=histograms_strategy())
def test_a_refused_query_costs_only_the_threshold_check(run, refused):
    votes, answered = run
    before = pa.confident_gnmax_cost(votes, answered=answered, **RUN_PARAMS)
    after = pa.confident_gnmax_cost(np.vstack([votes, refused]), answered=np.append(answered, False), **RUN_PARAMS)
    logpr = pa.compute_logpr_answered(refused, threshold=15.0, sigma=5.0)
    close(
        after.rdp - before.rdp,
        pa.rdp_threshold_data_dependent(logpr, sigma=5.0, orders=ORDERS),
        rtol=1e-9,
        atol=1e-12,
    )
    close(
        after.data_independent_rdp - before.data_independent_rdp,
        pa.rdp_threshold_data_independent(sigma=5.0, orders=ORDERS),
        rtol=1e-9,
    )
    assert after.answered == before.answered


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pa.compute_logq_gnmax([5, 1], sigma=0.0), "sigma must be"),
        (lambda: pa.compute_logq_gnmax([], sigma=1.0), "at least 2 class"),
        (lambda: pa.compute_logq_gnmax([5], sigma=1.0), "at least 2 class"),
        (
            lambda: pa.rdp_gnmax_data_independent(sigma=-1.0, orders=[2]),
            "sigma must be",
        ),
        (
            lambda: pa.rdp_gnmax_data_dependent(-1.0, sigma=1.0, orders=[1.0, 2.0]),
            "> 1",
        ),
        (lambda: pa.rdp_gnmax_data_dependent(0.5, sigma=1.0, orders=[2.0]), "≤ 0"),
        (
            lambda: pa.compute_logpr_answered([], threshold=1.0, sigma=1.0),
            "at least 1 class",
        ),
        (
            lambda: pa.compute_logpr_answered([3], threshold=1.0, sigma=0.0),
            "sigma1 must be",
        ),
        (lambda: pa.epsilon_from_rdp([1.0], orders=[2.0], delta=0.0), "delta must lie"),
        (
            lambda: pa.epsilon_from_rdp([1.0, 2.0], orders=[2.0], delta=1e-5),
            "same length",
        ),
        (
            lambda: pa.confident_gnmax_cost(np.zeros((0, 3)), answered=None, **RUN_PARAMS),
            "≥ 1 query",
        ),
        (
            lambda: pa.confident_gnmax_cost([[3, 1]], answered=[1], **RUN_PARAMS),
            "boolean array",
        ),
        (
            lambda: pa.rdp_smooth_sensitivity_gaussian(beta=0.1, sigma=1.0, order=10.0),
            "λ < 1/\\(2β\\)",
        ),
        (
            lambda: pa.local_sensitivity_threshold([40], num_teachers=30, threshold=5.0, sigma=1.0, order=2.0),
            "outside",
        ),
        (
            lambda: pa.local_sensitivity_gnmax([3, 1], num_teachers=0, sigma=1.0, order=2.0),
            "num_teachers",
        ),
    ],
)
def test_bad_input_is_refused_with_a_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()
