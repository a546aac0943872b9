"""Speed of the sparse dictionary proxies (``sae``, ``transcoder``), measured in one run.

1. Fit time with SAELens' trainer at the defaults (1,000 steps of 1,024 vectors) on as many
   residual-stream vectors as the main job fits on (about 29,000 from 1,000 Dyck training strings):
   a TopK SAE of width 256 (the done-criterion run), the standard and JumpReLU architectures, a TopK
   SAE of width 1,024 (the widest of the recipes), and a TopK transcoder of width 256.
2. Forward pass of a model the size of the bundled Dyck model on 64 x 128 tokens with the SAE hook
   (residual stream entering layer 1), the attention-output SAE and the transcoder, vs no hook, as
   medians of per-repeat ratios of interleaved repeats.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sae.py [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes per variant")
    parser.add_argument("--vectors", type=int, default=28_838, help="fitting vectors (default: the main job's)")
    parser.add_argument("--steps", type=int, default=1000, help="SAE training steps")
    args = parser.parse_args()

    import torch

    from illusions.activations import collect
    from illusions.models import ModelConfig, build_model
    from illusions.simplifiers import SAE, Targets, Transcoder

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, n_ctx=128, d_vocab=43)
    model = build_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    n_seq = -(-args.vectors // cfg.n_ctx)
    fit_tokens = torch.randint(0, cfg.d_vocab, (n_seq, cfg.n_ctx), generator=gen)
    names = ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    acts = collect(model, fit_tokens, names, torch.full((n_seq,), cfg.n_ctx))
    acts = {k: v[: args.vectors] for k, v in acts.items()}
    print(f"threads={args.threads}  model: 2L d_model=128 4x32 heads d_mlp=512; fit on {args.vectors:,} vectors, "
          f"{args.steps} steps of 1,024")

    layer1 = Targets(layers=(1,))
    variants = {
        "sae topk width 256": SAE(width=256, sae_steps=args.steps, targets=layer1),
        "sae standard width 256": SAE(width=256, architecture="standard", sae_steps=args.steps, targets=layer1),
        "sae jumprelu width 256": SAE(width=256, architecture="jumprelu", sae_steps=args.steps, targets=layer1),
        "sae topk width 1024": SAE(width=1024, sae_steps=args.steps, targets=layer1),
        "sae z topk width 256": SAE(width=256, site="z", sae_steps=args.steps, targets=layer1),
        "transcoder topk width 256": Transcoder(width=256, sae_steps=args.steps, targets=layer1),
    }
    proxies = {}
    print("\nfit (SAELens SAETrainer):")
    for name, simplifier in variants.items():
        start = time.perf_counter()
        proxies[name] = simplifier.fit(model, acts)
        seconds = time.perf_counter() - start
        fit = next(iter(proxies[name].info["fit"].values()))
        print(f"  {name:<26} {seconds:6.1f} s  ({seconds / args.steps * 1e3:5.1f} ms/step); on its fitting data "
              f"explained variance {fit['explained_variance']:.3f}, L0 {fit['l0']:.1f}")

    tokens = torch.randint(0, cfg.d_vocab, (64, cfg.n_ctx), generator=gen)
    hooks = {"no hook": []} | {name: proxies[name].fwd_hooks for name in
                               ("sae topk width 256", "sae topk width 1024", "sae z topk width 256",
                                "transcoder topk width 256")}
    times: dict[str, list[float]] = {name: [] for name in hooks}
    with torch.no_grad():
        for fwd in hooks.values():  # warm-up
            model.run_with_hooks(tokens, fwd_hooks=fwd)
        # Interleaved, so that load from other processes hits every variant alike.
        for _ in range(args.repeats):
            for name, fwd in hooks.items():
                start = time.perf_counter()
                model.run_with_hooks(tokens, fwd_hooks=fwd)
                times[name].append(time.perf_counter() - start)
    print(f"\nforward pass on 64 x 128 tokens, {args.repeats} interleaved repeats (ratio: median of per-repeat "
          "ratios to no hook):")
    for name, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, times["no hook"], strict=True))
        print(f"  {name:<26} median {statistics.median(values) * 1e3:7.1f} ms  min {min(values) * 1e3:7.1f} ms"
              f"   {ratio:5.3f}x")


if __name__ == "__main__":
    main()
