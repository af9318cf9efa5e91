"""RSA: neuroguide.evaluation.analyses.rsa.core against rsatoolbox, same data, one process.

Part 1 (one pair): two stimulus sets of 2000 stimuli x 512 features (a "model" and a "region" whose
patterns share a low-rank component). Each side computes both RDMs and compares them by Spearman,
Kendall tau-a and cosine; the script checks that both sides agree (1e-6) and prints each side's time
per stage and the ratios.

Part 2 (model-vs-model, ``--models M``): M pattern sets of the same size; each side computes the M
RDMs and the M x M similarity matrices for the three comparisons (rsatoolbox:
``compare(rdms, rdms, method)``; ours: :func:`rsa.compare_all`, which ranks each RDM once and
computes each unordered pair once).

rsatoolbox is the peer (``rsatoolbox.rdm.calc_rdm`` + ``rsatoolbox.rdm.compare``).

    python benchmarks/rsa.py [--stimuli 2000] [--features 512] [--method correlation] [--repeats 3] [--models 4]
                             [--threads 1]

Times are the best of ``--repeats`` runs in part 1 and one run in part 2 (the machine may be shared); both
sides run with ``--threads`` torch and BLAS threads (threadpoolctl; 1: a shared CPU is less noisy). Values
are compared twice: each side on its own RDMs (the RDMs agree to ~1e-15, which can swap the ranks of
entries closer than that, ~1e-13 in Spearman per swap) and both comparisons on the same (rsatoolbox's) RDMs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from neuroguide.evaluation.analyses.rsa import core as rsa

COMPARISONS = ("spearman", "tau-a", "cosine")


def best_time(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stimuli", type=int, default=2000)
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--method", default="correlation", choices=rsa.METHODS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", type=int, default=4, help="part 2: number of models (0 skips it)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both sides")
    ap.add_argument("--write-numbers", action="store_true", help="write docs/numbers/rsa.json (the Benchmarks page)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(args.threads):
        rows = run(args)
    if args.write_numbers:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "numbers"))
        from _common import write_numbers

        write_numbers("rsa", {"table": {"columns": ["stage", "ours (s)", "rsatoolbox (s)", "speed-up"], "rows": rows},
                              "stimuli": args.stimuli, "features": args.features, "method": args.method,
                              "threads": args.threads, "models": args.models, "repeats": args.repeats})


def run(args) -> list[list]:
    """Prints each stage; returns the rows ``[stage, ours s, rsatoolbox s, ratio]``."""
    rows = []

    from rsatoolbox.data import Dataset
    from rsatoolbox.rdm import calc_rdm, compare

    rng = np.random.default_rng(0)
    n, k = args.stimuli, args.features
    shared = rng.standard_normal((n, 8))
    a = shared @ rng.standard_normal((8, k)) + rng.standard_normal((n, k))
    b = shared @ rng.standard_normal((8, k)) + 2 * rng.standard_normal((n, k))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def ours_rdms():
        return rsa.rdm(ta, args.method), rsa.rdm(tb, args.method)

    def ours_compare(va, vb):
        pa, pb = rsa.prepare(va), rsa.prepare(vb)
        return {c: rsa.compare(pa, pb, c) for c in COMPARISONS}

    def peer_rdms():
        return calc_rdm(Dataset(a), method=args.method), calc_rdm(Dataset(b), method=args.method)

    def peer_compare(ra, rb):
        return {c: float(compare(ra, rb, method=c)[0, 0]) for c in COMPARISONS}

    print(f"{n} stimuli x {k} features, {args.method} RDMs ({rsa.n_pairs(n)} pairs), best of {args.repeats}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    (va, vb), t_ours_rdm = best_time(ours_rdms, args.repeats)
    (ra, rb), t_peer_rdm = best_time(peer_rdms, args.repeats)
    err = max(float(np.abs(ra.get_vectors()[0] - va.numpy()).max()), float(np.abs(rb.get_vectors()[0] - vb.numpy()).max()))
    print(f"RDMs (2)          ours {t_ours_rdm:7.3f} s   rsatoolbox {t_peer_rdm:7.3f} s   ratio {t_peer_rdm / t_ours_rdm:6.1f}x"
          f"   max |diff| {err:.1e}")
    rows.append(["2 RDMs", t_ours_rdm, t_peer_rdm, t_peer_rdm / t_ours_rdm])
    ours, t_ours_cmp = best_time(lambda: ours_compare(va, vb), args.repeats)
    peer, t_peer_cmp = best_time(lambda: peer_compare(ra, rb), args.repeats)
    print(f"compare (3 ways)  ours {t_ours_cmp:7.3f} s   rsatoolbox {t_peer_cmp:7.3f} s   ratio {t_peer_cmp / t_ours_cmp:6.1f}x")
    for c in COMPARISONS:
        same = rsa.compare(ra.get_vectors()[0], rb.get_vectors()[0], c)  # ours on rsatoolbox's RDMs
        print(f"  {c:9s} ours {ours[c]: .8f}  rsatoolbox {peer[c]: .8f}  diff {abs(ours[c] - peer[c]):.1e}"
              f"  (on the same RDMs: {abs(same - peer[c]):.1e})")
        assert abs(ours[c] - peer[c]) < 1e-6 and abs(same - peer[c]) < 1e-12, c
    # per method, each side on its own (ours ranks each RDM inside the call: no sharing across methods)
    for c in COMPARISONS:
        _, t_o = best_time(lambda: rsa.compare(va, vb, c), args.repeats)  # noqa: B023
        _, t_p = best_time(lambda: compare(ra, rb, method=c), args.repeats)  # noqa: B023
        print(f"  {c:9s} alone: ours {t_o:7.3f} s   rsatoolbox {t_p:7.3f} s   ratio {t_p / t_o:6.1f}x")
        rows.append([f"{c} (one pair)", t_o, t_p, t_p / t_o])
    t_ours, t_peer = t_ours_rdm + t_ours_cmp, t_peer_rdm + t_peer_cmp
    print(f"PART 1 total (2 RDMs + 3 comparisons): ours {t_ours:.3f} s, rsatoolbox {t_peer:.3f} s, "
          f"speed-up {t_peer / t_ours:.1f}x", flush=True)
    rows.append(["one pair: 2 RDMs + 3 comparisons", t_ours, t_peer, t_peer / t_ours])
    if args.models >= 2:
        from rsatoolbox.rdm import concat

        sets = [shared @ rng.standard_normal((8, k)) + rng.standard_normal((n, k)) for _ in range(args.models)]

        def ours_matrix():
            vecs = {f"m{i}": rsa.rdm(torch.from_numpy(x), args.method) for i, x in enumerate(sets)}
            return rsa.compare_all(vecs, COMPARISONS)

        def peer_matrix():
            rdms = concat([calc_rdm(Dataset(x), method=args.method) for x in sets])
            return {c: compare(rdms, rdms, method=c) for c in COMPARISONS}

        mo, t_o = best_time(ours_matrix, 1)
        mp, t_p = best_time(peer_matrix, 1)
        err = max(float(np.abs(mo[c] - mp[c]).max()) for c in COMPARISONS)
        # on the same RDMs, against rsatoolbox pair by pair: its matrix call sums the M x M dot products in one
        # einsum whose float error is ~2e-12 in Spearman here (its pairwise values are within 1e-15 of the exact
        # 1 - 6 sum d^2 / (n^3 - n)); tau-a is an integer count on both sides, compared in the matrix
        peer_rdms = concat([calc_rdm(Dataset(x), method=args.method) for x in sets])
        same = rsa.compare_all({f"m{i}": v for i, v in enumerate(peer_rdms.get_vectors())}, COMPARISONS)
        err_same = float(np.abs(same["tau-a"] - mp["tau-a"]).max())
        for c in ("spearman", "cosine"):
            for i in range(args.models):
                for j in range(i + 1, args.models):
                    ref = float(compare(peer_rdms[i], peer_rdms[j], method=c)[0, 0])
                    err_same = max(err_same, abs(same[c][i, j] - ref))
        assert err < 1e-6 and err_same < 1e-12, (err, err_same)
        print(f"PART 2 model-vs-model, {args.models} models ({args.models} RDMs + {args.models}x{args.models} matrices, "
              f"3 comparisons): ours {t_o:.3f} s, rsatoolbox {t_p:.3f} s, speed-up {t_p / t_o:.1f}x, "
              f"max |diff| {err:.1e} (on the same RDMs, pair by pair: {err_same:.1e})")
        rows.append([f"{args.models} models: {args.models} RDMs + {args.models}x{args.models} matrices, 3 comparisons",
                     t_o, t_p, t_p / t_o])
    return rows


if __name__ == "__main__":
    main()
