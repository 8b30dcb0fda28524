"""Tables from a stage pickle: per setting and σ_ss, each vote set's answered, label accuracy and claimed ε."""
import math, pickle, sys
import numpy as np
from replay import DELTA, RDP_ORDERS

ORDERS = np.array(RDP_ORDERS, dtype=float)


def gnss_vec(beta, sigma_ss, orders):
    return orders * math.exp(2 * beta) / sigma_ss**2 + (beta * orders - 0.5 * np.log(1 - 2 * orders * beta)) / (orders - 1)


def claims(rows, Q, s1, s2, order, sigma_ss, bf_index, beta_factor):
    """Claimed ε per draw (identical arithmetic to replay.claim, vectorized)."""
    beta = beta_factor / order
    answered, rdp, z, ss = rows[:, 0], rows[:, 2], rows[:, 5], rows[:, 6 + bf_index]
    o = ORDERS[ORDERS < 1 / (2 * beta)]
    released = rdp + ss * sigma_ss * z + math.log(1 / DELTA) / (order - 1) + gnss_vec(beta, sigma_ss, np.array([order]))[0]
    indep_rdp = Q * o[None] / (2 * s1**2) + answered[:, None] * o[None] / s2**2 + gnss_vec(beta, sigma_ss, o)[None]
    indep = (indep_rdp - math.log(DELTA) / (o[None] - 1)).min(1)
    return np.minimum(released, indep), released, indep


def summary(rows, Q, s1, s2, order, sigma_ss, bf_index, beta_factor):
    e, rel, ind = claims(rows, Q, s1, s2, order, sigma_ss, bf_index, beta_factor)
    ans = rows[:, 0]
    acc = rows[:, 1].sum() / max(ans.sum(), 1)
    return dict(ans=ans.mean(), acc=acc, mean=e.mean(), sd=e.std(), max=e.max(), p2=(e > 2).mean(),
                # Gaussian-tail estimate of P(ε > 2) (release noise is Gaussian; draws are few)
                q98=e.mean() + 2.054 * e.std(), indep_share=(ind < rel).mean(),
                thr=rows[:, 3].mean(), gn=rows[:, 4].mean(), noise_sd=(rows[:, 6 + bf_index] * sigma_ss).mean())


if __name__ == "__main__":
    data = pickle.load(open(sys.argv[1], "rb"))
    bfs, recs = data["beta_factors"], data["records"]
    sigmas = [float(a) for a in sys.argv[2].split(",")] if len(sys.argv) > 2 else [4, 6, 8, 10, 12, 16, 24]
    bsel = [float(a) for a in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0.4]
    settings = sorted({k[1:] for k in recs})
    rows_out = []
    for st in settings:
        Q, T, s1, s2, order = st
        for bf in bsel:
            bi = bfs.index(bf)
            for sss in sigmas:
                si = summary(recs[("iid",) + st], Q, s1, s2, order, sss, bi, bf)
                sd = summary(recs[("dir",) + st], Q, s1, s2, order, sss, bi, bf)
                rows_out.append((st, bf, sss, si, sd))
    pickle.dump(rows_out, open(sys.argv[1] + ".summary", "wb"))
    def fmt(st, bf, sss, si, sd):
        Q, T, s1, s2, order = st
        f = lambda s: (f"ans {s['ans']:6.1f} acc {s['acc']:.4f} eps {s['mean']:.3f}±{s['sd']:.3f} max {s['max']:.3f} "
                       f"P>2 {s['p2']:.2f} q98 {s['q98']:.3f} [thr {s['thr']:.3f} gn {s['gn']:.3f} noise {s['noise_sd']:.3f} ind {s['indep_share']:.1f}]")
        return f"Q={Q} T={T:g} s1={s1:g} s2={s2:g} lam={order:g} b={bf}/lam sss={sss:g} | IID {f(si)} | DIR {f(sd)}"
    ok = [r for r in rows_out if r[3]["q98"] <= 2 and r[4]["q98"] <= 2 and r[3]["p2"] <= 0.02 and r[4]["p2"] <= 0.02
          and r[3]["ans"] >= 300 and r[3]["acc"] >= 0.985]
    print(f"{len(ok)} of {len(rows_out)} rows meet the ε (q98 ≤ 2) and IID (≥300 at ≥0.985) targets; by DIR answered at acc ≥ 0.97:")
    for r in sorted(ok, key=lambda r: -(r[4]["ans"] if r[4]["acc"] >= 0.97 else 0))[:40]:
        print(fmt(*r))
    print("\nBest DIR rows meeting only the DIR ε target (q98 ≤ 2), acc ≥ 0.97:")
    okd = [r for r in rows_out if r[4]["q98"] <= 2 and r[4]["acc"] >= 0.97]
    for r in sorted(okd, key=lambda r: -r[4]["ans"])[:20]:
        print(fmt(*r))
    print("\nBest IID rows meeting only the IID ε target (q98 ≤ 2), acc ≥ 0.985:")
    oki = [r for r in rows_out if r[3]["q98"] <= 2 and r[3]["acc"] >= 0.985]
    for r in sorted(oki, key=lambda r: -r[3]["ans"])[:20]:
        print(fmt(*r))
