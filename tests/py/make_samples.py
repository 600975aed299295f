"""Make input samples from a model's npz bundle, for calibration and held-out checks.

    make_samples.py BUNDLE.npz OUTDIR N SEED --inputs NAME[,NAME..] [--batch]

Reads the graph inputs named by --inputs NAME,NAME from BUNDLE.npz (the bundle also holds
reference outputs, which are not inputs) and writes N perturbed copies:
  float arrays: x * (1 + 0.1 * u) + 0.05 * n, u uniform in [-1, 1] per sample, n normal noise,
                clipped to the bundle's own [min, max] range;
  integer arrays: values drawn uniformly from the bundle's own [min, max] range (random bytes
                for magika, a constant stays constant, e.g. a sample rate).
Without --batch, OUTDIR/sample_000.npz ... one sample each. With --batch, one file
OUTDIR/batch.npz whose arrays stack the N samples on axis 0 (their first dim must be 1).
"""

import argparse
import os

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("outdir")
    p.add_argument("n", type=int)
    p.add_argument("seed", type=int)
    p.add_argument("--inputs", required=True, help="comma-separated graph input names")
    p.add_argument("--batch", action="store_true")
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    z = np.load(a.bundle)
    names = a.inputs.split(",")
    os.makedirs(a.outdir, exist_ok=True)
    samples = []
    for _ in range(a.n):
        s = {}
        for k in names:
            x = z[k]
            if np.issubdtype(x.dtype, np.floating):
                lo, hi = float(x.min()), float(x.max())
                y = x * (1 + 0.1 * rng.uniform(-1, 1)) + 0.05 * rng.standard_normal(x.shape)
                if hi > lo:
                    y = np.clip(y, lo, hi)
                s[k] = y.astype(x.dtype)
            else:
                lo, hi = int(x.min()), int(x.max())
                s[k] = rng.integers(lo, hi + 1, size=x.shape).astype(x.dtype)
        samples.append(s)
    if a.batch:
        out = {k: np.concatenate([s[k] for s in samples], axis=0) for k in names}
        np.savez(os.path.join(a.outdir, "batch.npz"), **out)
    else:
        for i, s in enumerate(samples):
            np.savez(os.path.join(a.outdir, f"sample_{i:03d}.npz"), **s)


if __name__ == "__main__":
    main()
