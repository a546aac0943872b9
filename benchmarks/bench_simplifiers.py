"""Speed of the simplifiers, as ratios and seconds measured in one run.

1. Forward pass of a model the size of the planned Dyck model (2 layers, d_model 128, 4 heads x
   d_head 32, d_mlp 512, n_ctx 128) on 64 x 128 tokens, with a full-rank (identity) svd proxy on
   every head's queries and keys of the last layer vs no hook (target: <= 1.10x), plus the other
   methods for reference.
2. Fit time on 10^6 vectors of dimension 32 (queries of that model on random tokens): svd
   (target <= 5 s) and kmeans with k = 64 (target <= 60 s).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_simplifiers.py [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes per variant")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="vectors for the fit timings")
    args = parser.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    from illusions.activations import collect
    from illusions.models import ModelConfig, build_model
    from illusions.simplifiers import SVD, KMeans, OneHot, WeightSVD, fit_proxy
    from illusions.simplifiers.kmeans import fit_centroids
    from illusions.simplifiers.svd import pca

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, n_ctx=128, d_vocab=43)
    model = build_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.d_vocab, (64, cfg.n_ctx), generator=gen)
    lengths = torch.full((64,), cfg.n_ctx)
    print(f"threads={args.threads}  model: 2L d_model=128 4x32 heads d_mlp=512  batch 64 x 128 tokens")

    proxies = {
        "svd rank 32 (identity)": fit_proxy(model, SVD(rank=cfg.d_head), tokens, lengths),
        "svd rank 4": fit_proxy(model, SVD(rank=4), tokens, lengths),
        "kmeans k=64": fit_proxy(model, KMeans(k=64), tokens, lengths),
        "onehot": OneHot().fit(model),
        "weight-svd rank 4": WeightSVD(rank=4).fit(model),
    }
    variants = {"no hook": []} | {name: p.fwd_hooks for name, p in proxies.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for hooks in variants.values():  # warm-up
            model.run_with_hooks(tokens, fwd_hooks=hooks)
        # Interleave the variants so that load from other processes hits them all alike.
        for _ in range(args.repeats):
            for name, hooks in variants.items():
                times[name] += timed(lambda h=hooks: model.run_with_hooks(tokens, fwd_hooks=h), 1)
    print(f"\nforward pass, {args.repeats} interleaved repeats (ratio: median of per-repeat ratios to no hook):")
    ratios = {}
    for name, values in times.items():
        ratios[name] = statistics.median(v / b for v, b in zip(values, times["no hook"], strict=True))
        print(f"  {name:<24} median {statistics.median(values) * 1e3:7.1f} ms  min {min(values) * 1e3:7.1f} ms"
              f"   {ratios[name]:5.3f}x")
    ratio = ratios["svd rank 32 (identity)"]
    print(f"  identity svd overhead {ratio:.3f}x (target <= 1.10x): {'ok' if ratio <= 1.10 else 'MISSED'}")

    per_seq = cfg.n_ctx * cfg.n_heads
    n_seq = -(-args.vectors // per_seq)
    fit_tokens = torch.randint(0, cfg.d_vocab, (n_seq, cfg.n_ctx), generator=gen)
    start = time.perf_counter()
    acts = collect(model, fit_tokens, ["blocks.1.attn.hook_q"], torch.full((n_seq,), cfg.n_ctx))
    collect_s = time.perf_counter() - start
    x = acts["blocks.1.attn.hook_q"].reshape(-1, cfg.d_head)[: args.vectors].contiguous()  # [n d_head]
    print(f"\nfit data: {x.shape[0]:,} vectors of dimension {x.shape[1]} "
          f"(layer-1 queries of {n_seq:,} random sequences, collected in {collect_s:.1f} s)")

    start = time.perf_counter()
    fit = pca(x)
    svd_s = time.perf_counter() - start
    print(f"  svd (full decomposition, all ranks)  {svd_s:6.2f} s (target <= 5 s): "
          f"{'ok' if svd_s <= 5 else 'MISSED'}; rank 4 keeps {fit.explained(4):.1%} of the variance")
    with threadpool_limits(args.threads):
        start = time.perf_counter()
        km = fit_centroids(x, 64, seed=0)
        km_s = time.perf_counter() - start
    print(f"  kmeans k=64 ({km.algorithm})         {km_s:6.2f} s (target <= 60 s): "
          f"{'ok' if km_s <= 60 else 'MISSED'}; inertia per vector {km.inertia / km.n:.3f}")


if __name__ == "__main__":
    main()
