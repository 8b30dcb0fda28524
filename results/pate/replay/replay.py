"""Fast, exact offline replay of privacy=pate (Confident-GNMax + pate_epsilon) on saved votes.

Uses the project's own functions for every per-query quantity (data-dependent RDP at the release
order, local sensitivities) and caches them per histogram; composition, smooth sensitivity, GNSS
noise and the data-independent bound are then summed exactly as strategies.pate_release.pate_epsilon
does. check_against_project() verifies the claim equals pate_epsilon's for the same rng stream.
"""
import math, sys
from dataclasses import dataclass
import numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from fedkd.privacy.accountant import RDP_ORDERS
from fedkd.privacy.mechanisms import confident_gnmax
from fedkd.privacy import pate_analysis as pa

DELTA = 1e-5
N_TEACHERS = 250


class VoteSet:
    def __init__(self, name):
        d = np.load(str(__import__("pathlib").Path(__file__).resolve().parent / f"votes-{name}.npz"))
        self.name, self.counts, self.truth = name, d["counts"].astype(np.int64), d["truth"]
        self.top = self.counts.max(1)
        keys = [tuple(r) for r in -np.sort(-self.counts, 1)]
        uniq = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        self.key_index = np.array([uniq[k] for k in keys])
        self.unique = np.array(list(uniq.keys()))
        self._gn = {}  # (sigma2, order) -> (rdp[n_unique], ls[n_unique, 250], done mask)

    def gnmax(self, idx, sigma2, order):
        """Data-dependent GNMax RDP at `order` and its local-sensitivity vectors for queries idx."""
        key = (sigma2, order)
        if key not in self._gn:
            n = len(self.unique)
            self._gn[key] = (np.zeros(n), np.zeros((n, N_TEACHERS)), np.zeros(n, bool))
        rdp, ls, done = self._gn[key]
        u = self.key_index[idx]
        for k in np.unique(u[~done[u]]):
            h = self.unique[k]
            rdp[k] = pa.rdp_gnmax_data_dependent(pa.compute_logq_gnmax(h, sigma=sigma2), sigma=sigma2, orders=[order])[0]
            ls[k] = pa.local_sensitivity_gnmax(h, num_teachers=N_TEACHERS, sigma=sigma2, order=order)
            done[k] = True
        return rdp[u], ls[u]


_thr_cache = {}
def threshold_tables(T, sigma1, order):
    """Threshold check's data-dependent RDP and LS vector for every max vote 0..250."""
    key = (T, sigma1, order)
    if key not in _thr_cache:
        rdp = np.array([pa.rdp_threshold_data_dependent(pa.compute_logpr_answered([v], threshold=T, sigma=sigma1),
                        sigma=sigma1, orders=[order])[0] for v in range(N_TEACHERS + 1)])
        const = pa.threshold_always_data_independent(num_teachers=N_TEACHERS, threshold=T, sigma=sigma1, orders=[order])
        ls = np.zeros((N_TEACHERS + 1, N_TEACHERS))
        if not const:
            for v in range(N_TEACHERS + 1):
                ls[v] = pa.local_sensitivity_threshold(np.array([v, N_TEACHERS - v]), num_teachers=N_TEACHERS,
                                                       threshold=T, sigma=sigma1, order=order)
        _thr_cache[key] = (rdp, ls)
    return _thr_cache[key]


@dataclass
class Draw:
    answered: int
    correct: int
    rdp: float          # data-dependent RDP at the release order
    rdp_threshold: float
    rdp_gnmax: float
    ls: np.ndarray      # run's local sensitivity by distance
    z: float            # the release's standard normal draw


def replay(vs, Q, T, s1, s2, order, draw):
    """One run: query subset and noise from default_rng(draw), as release_analysis.py does."""
    rng = np.random.default_rng(draw)
    sub = rng.permutation(len(vs.counts))[:Q]
    c = vs.counts[sub]
    ans, lab = confident_gnmax(c, threshold=T, sigma_threshold=s1, sigma_gnmax=s2, rng=rng)
    trdp, tls = threshold_tables(T, s1, order)
    top = c.max(1)
    r_thr = trdp[top].sum()
    ls = tls[top].sum(0)
    r_gn = 0.0
    if ans.any():
        grdp, gls = vs.gnmax(sub[ans], s2, order)
        gconst = bool(pa.gnmax_always_data_independent(num_teachers=N_TEACHERS, num_classes=c.shape[1], sigma=s2, orders=[order])[0])
        r_gn = grdp.sum()
        if not gconst:
            ls = ls + gls.sum(0)
    z = float(rng.standard_normal())
    return Draw(int(ans.sum()), int((lab == vs.truth[sub][ans]).sum()), r_thr + r_gn, r_thr, r_gn, ls, z)


def gnss(beta, sigma_ss, order):
    return pa.rdp_smooth_sensitivity_gaussian(beta=beta, sigma=sigma_ss, order=order)


def claim(d, Q, s1, s2, order, sigma_ss, beta_factor=0.4, releases=1):
    """(claimed, released, data_independent) exactly as pate_epsilon, for beta = beta_factor / order."""
    beta = beta_factor / order
    ss = pa.smooth_sensitivity(d.ls, beta=beta)
    released = d.rdp + ss * sigma_ss * d.z + math.log(1 / DELTA) / (order - 1) + releases * gnss(beta, sigma_ss, order)
    orders = np.array([o for o in RDP_ORDERS if o < 1 / (2 * beta)], dtype=float)
    indep_rdp = Q * orders / (2 * s1**2) + d.answered * orders / s2**2
    indep_rdp = indep_rdp + releases * np.array([gnss(beta, sigma_ss, o) for o in orders])
    indep, _ = pa.epsilon_from_rdp(indep_rdp, orders=orders, delta=DELTA)
    return min(released, indep), released, indep


def check_against_project(vs, Q, T, s1, s2, order, sigma_ss, draws=3):
    """The claim from replay() must equal pate_epsilon's on the same rng stream."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
    from fedkd.privacy.config import PrivacyConfig
    from strategies.pate_release import pate_epsilon
    for k in range(draws):
        rng = np.random.default_rng(k)
        sub = rng.permutation(len(vs.counts))[:Q]
        c = vs.counts[sub]
        ans, _ = confident_gnmax(c, threshold=T, sigma_threshold=s1, sigma_gnmax=s2, rng=rng)
        pc = PrivacyConfig(mechanism="pate", threshold=T, sigma_threshold=s1, sigma_gnmax=s2, queries=Q,
                           release_order=order, release_sigma=sigma_ss)
        ref = pate_epsilon(c, ans, config=pc, num_teachers=N_TEACHERS, releases=1, rng=rng)
        mine = claim(replay(vs, Q, T, s1, s2, order, k), Q, s1, s2, order, sigma_ss)
        assert np.allclose([ref.epsilon, ref.released, ref.data_independent], mine, rtol=1e-9, atol=1e-9), (ref, mine)
        print(f"  check {vs.name} draw {k}: project {ref.epsilon:.6f}/{ref.released:.6f}/{ref.data_independent:.6f}"
              f" replay {mine[0]:.6f}/{mine[1]:.6f}/{mine[2]:.6f}", flush=True)
