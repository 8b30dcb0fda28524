"""Validation: candidate group defaults replayed DRAWS times on both vote sets (new subsets and noise
per draw, common random numbers across settings). For each: answered, label accuracy, claimed ε
mean/sd/max and P(ε > 2) for
  A) the project's code as is (β = 0.4/λ),
  B) β from the reference's range (0.3/λ or 0.45/λ; a config field would be needed),
  C) B plus 'release only if needed': the data-dependent ε is released only when the data-independent
     ε of the already-public outputs (Q checks, the number answered; no GNSS) exceeds the target;
     otherwise that data-independent ε is claimed and no release (no GNSS cost) happens."""
import math, sys
import numpy as np
from replay import VoteSet, replay, pa, DELTA, RDP_ORDERS
from analyse import gnss_vec

ORD = np.array(RDP_ORDERS, dtype=float)
DRAWS = int(sys.argv[1])
CANDIDATES = [  # Q, T, σ1, σ2, λ, σ_ss, β factor for B/C
    (640, 230, 100, 30, 14, 8, 0.45),   # today's defaults
    (250, 230, 150, 40, 14, 8, 0.3),    # the measured non-IID override
    (300, 230, 100, 40, 14, 8, 0.3),
    (400, 230, 100, 30, 14, 8, 0.45),
    (500, 270, 100, 30, 14, 8, 0.45),
]
_UNUSED = [
    (400, 230, 130, 30, 14, 8, 0.45),
    (500, 230, 130, 30, 14, 8, 0.35),
    (500, 260, 100, 20, 12, 8, 0.45),
    (400, 260, 70, 30, 12, 10, 0.45),
    (300, 200, 70, 30, 14, 8, 0.4),
]

def eps(rows, Q, s1, s2, lam, sss, bf, release_if_needed=False, target=2.0):
    ans, rdp, z, ss = rows[:, 0], rows[:, 2], rows[:, 3], rows[:, 4]
    beta = bf / lam
    o = ORD[ORD < 1 / (2 * beta)]
    gap = lambda l: np.log(l) / (l - 1) - np.log((l - 1) / l)  # Balle et al. 2020 vs Mironov 2017
    released = rdp + ss * sss * z + math.log(1 / DELTA) / (lam - 1) - gap(lam) + gnss_vec(beta, sss, np.array([lam]))[0]
    indep = (Q * o[None] / (2 * s1**2) + ans[:, None] * o[None] / s2**2 + gnss_vec(beta, sss, o)[None]
             - math.log(DELTA) / (o[None] - 1) - gap(o)[None]).min(1)
    claim = np.minimum(released, indep)
    if release_if_needed:
        public = (Q * ORD[None] / (2 * s1**2) + ans[:, None] * ORD[None] / s2**2 - math.log(DELTA) / (ORD[None] - 1)).min(1)
        claim = np.where(public <= target, public, claim)
    return claim

sets = {n: VoteSet(n) for n in ("iid", "dir")}
print(f"{DRAWS} draws per setting and vote set; eps as mean±sd [max] P(>2)")
for Q, T, s1, s2, lam, sss, bf in CANDIDATES:
    line = [f"Q={Q} T={T} s1={s1} s2={s2} lam={lam} sss={sss} (B/C: beta={bf}/lam)"]
    for name, vs in sets.items():
        rows = []
        for k in range(1000, 1000 + DRAWS):  # draws not used by the search
            d = replay(vs, Q, float(T), float(s1), float(s2), float(lam), k)
            rows.append((d.answered, d.correct, d.rdp, d.z, pa.smooth_sensitivity(d.ls, beta=0.4 / lam),
                         pa.smooth_sensitivity(d.ls, beta=bf / lam)))
        r = np.array(rows)
        a = eps(r[:, [0, 1, 2, 3, 4]], Q, s1, s2, lam, sss, 0.4)
        b = eps(r[:, [0, 1, 2, 3, 5]], Q, s1, s2, lam, sss, bf)
        c = eps(r[:, [0, 1, 2, 3, 5]], Q, s1, s2, lam, sss, bf, release_if_needed=True)
        f = lambda e: f"{e.mean():.3f}±{e.std():.3f} [{e.max():.3f}] P>2={np.mean(e > 2):.2f}"
        line.append(f"  {name.upper()}: answered {r[:, 0].mean():.1f} (min {r[:, 0].min():.0f}) label-acc {r[:, 1].sum() / r[:, 0].sum():.4f} | "
                    f"A {f(a)} | B {f(b)} | C {f(c)}")
    print("\n".join(line), flush=True)
