"""Peak memory of the evaluation engine against a bare TransformerLens loop doing the same forward passes.

For each size (layers x width, vocabulary, sequence length), two fresh processes run on the same random
model and the same random token sequences (seeded):

  ours  ``illusions.analyses.faithfulness.analyze`` with an SVD proxy (rank 8) of one middle layer's
        queries and keys: the fit collects those activations on the fitting sequences, then every
        evaluated sequence runs clean (cached at the proxy's first layer and the patterns) and through
        the proxy, with argmax, KL and attention JSD at every position;
  bare  the same passes written plainly: ``model(tokens)`` over the fitting sequences in batches of 64,
        then per batch of evaluated sequences ``model(tokens)`` and ``model.run_with_hooks`` with an
        identity hook on the same queries and keys, keeping only the argmax.

Each process reports its peak resident set (``ru_maxrss``), which includes torch's own ~0.3-0.5 GB, so
the ratio is of whole processes, as a user sees them. The issue's target is <= 1.3x at every size.
Sizes default to what finishes in a few minutes on two shared cores; ``--lengths``, ``--layers``,
``--width``, ``--vocab``, ``--fit``, ``--eval`` reach the issue's (4 x 256, lengths 64-512, 500 fit and
200 evaluated; 12 x 768 at 1,024 tokens; vocabulary 50,257).

Usage: python benchmarks/bench_memory.py [--lengths 64,128] [--layers 4] [--width 256] [--vocab 4096]
       [--fit 200] [--eval 100] [--threads 1] [--no-bare]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time, warnings
import numpy as np
import torch
warnings.filterwarnings("ignore", category=DeprecationWarning)
from transformer_lens import HookedTransformer, HookedTransformerConfig

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=args["layers"], d_model=args["width"], n_heads=args["width"] // 64,
                              d_head=64, d_mlp=4 * args["width"], d_vocab=args["vocab"], n_ctx=args["length"],
                              act_fn="gelu", normalization_type="LN", device="cpu")
model = HookedTransformer(cfg).eval()
rng = np.random.default_rng(0)
L = args["length"]
fit_tokens = rng.integers(0, args["vocab"], size=(args["fit"], L))
eval_tokens = rng.integers(0, args["vocab"], size=(args["eval"], L))
layer = args["layers"] // 2
start = time.perf_counter()
if args["kind"] == "ours":
    from illusions.analyses.faithfulness import analyze
    from illusions.registry import make_simplifier
    from illusions.tasks.base import Scored, Split

    def split(name, tokens):
        n = tokens.shape[0]
        seq = np.repeat(np.arange(n), L - 1)
        pos = np.tile(np.arange(L - 1), n)
        return Split(name, tokens, np.full(n, L), Scored(seq, pos, tokens[seq, pos + 1], {}), name)

    splits = {"train": split("train", fit_tokens), "eval": split("eval", eval_tokens)}
    svd = make_simplifier("svd", rank=8, layers=(layer,))
    result = analyze(model, splits, [svd], candidates=None, fit_n=args["fit"], max_seqs=None)
    n = len(result.records[("eval", 0)].kl)
else:
    sys.path.insert(0, args["here"])
    from bench_memory import bare_loop

    n = bare_loop(model, fit_tokens, eval_tokens, (f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"))
seconds = time.perf_counter() - start
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds, "n": n}))
"""


def bare_loop(model, fit_tokens, eval_tokens, names, batch: int = 64) -> int:
    """The bare TransformerLens loop: ``model(tokens)`` over the fitting sequences in batches of ``batch``,
    then per batch of evaluated sequences ``model(tokens)`` and ``model.run_with_hooks`` with an identity
    hook on each of ``names``, keeping only the argmax. Returns the number of predictions compared."""
    import torch

    n = 0
    with torch.inference_mode():
        for i in range(0, len(fit_tokens), batch):
            model(torch.as_tensor(fit_tokens[i:i + batch]))
        for i in range(0, len(eval_tokens), batch):
            tokens = torch.as_tensor(eval_tokens[i:i + batch])
            clean = model(tokens).argmax(-1)
            proxy = model.run_with_hooks(tokens, fwd_hooks=[(h, lambda a, hook: a) for h in names]).argmax(-1)
            n += int((clean == proxy).numel())
    return n


def measure(kind: str, args: dict[str, int], child: str = CHILD) -> dict[str, float]:
    """Run ``child`` (``CHILD`` by default) in a fresh process with ``args`` and ``kind`` as its JSON argument;
    its last stdout line is a JSON object with ``peak_mb`` (its own ``ru_maxrss``) and ``seconds``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args["threads"])}
    args = {**args, "here": os.path.dirname(os.path.abspath(__file__))}
    out = subprocess.run([sys.executable, "-c", child, json.dumps({**args, "kind": kind})], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"peak_mb": float("nan"), "seconds": float("nan"), "error": last[:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# What the bare loop's columns hold under --no-bare.
NOT_RUN = "not run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="64,128")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--fit", type=int, default=200)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-bare", action="store_true",
                        help="run ours only (the 12 x 768 size at 1,024 tokens: its goal is a peak under 8 GB, and "
                             "the bare loop alone takes about an hour on two cores)")
    opts = parser.parse_args()
    print(f"{opts.layers} layers x {opts.width} wide, vocabulary {opts.vocab}, {opts.fit} fit + {opts.eval} "
          f"evaluated sequences, {opts.threads} thread(s); peak RSS of each whole process")
    print(f"{'length':>7} {'ours MB':>9} {'bare MB':>9} {'ratio':>6} {'ours s':>7} {'bare s':>7}")
    for length in (int(x) for x in opts.lengths.split(",")):
        args = {"layers": opts.layers, "width": opts.width, "vocab": opts.vocab, "length": length,
                "fit": opts.fit, "eval": opts.eval, "threads": opts.threads}
        t = time.perf_counter()
        ours = measure("ours", args)
        bare = None if opts.no_bare else measure("bare", args)
        if bare is None:  # --no-bare: its columns say so instead of holding a number
            bare_mb, bare_s, ratio_x = NOT_RUN, NOT_RUN, "-"
        else:
            bare_mb, bare_s = f"{bare['peak_mb']:.0f}", f"{bare['seconds']:.1f}"
            ratio_x = f"{ours['peak_mb'] / bare['peak_mb']:.2f}x"
        print(f"{length:>7} {ours['peak_mb']:>9.0f} {bare_mb:>9} {ratio_x:>6} {ours['seconds']:>7.1f} "
              f"{bare_s:>7}  ({time.perf_counter() - t:.0f} s)", flush=True)
        for kind, got in (("ours", ours), ("bare", bare)):
            if got is not None and "error" in got:
                print(f"        {kind} failed: {got['error']}")


if __name__ == "__main__":
    main()
