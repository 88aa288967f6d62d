#!/usr/bin/env python3
"""How many peaks at or beyond ±5σ pure noise leaves in a 1024² score image: the floor under the
subtraction harness's "negative peaks ≤ −5σ" and "false positives on empty sky", which no
subtraction can go below.

White Gaussian noise (a decorrelated difference's noise is white), correlated with the
difference's PSF, normalised as ../shared/bench/subtraction/evaluate.py normalises a score
(median and 1.4826 × MAD), then its 7×7 minima ≤ −5 and maxima ≥ 5 counted inside the 32-px
border, as evaluate.py counts them.

usage: scripts/noise-floor.py PSF.npy [IMAGES] [SEED]   (the harness's venv: numpy, scipy)
PSF.npy: a harness case's data/psf_ref.npy or data/psf_sci_center.npy, whichever is the
difference's PSF (the side not convolved: meta.json's CONV names the convolved one).
Example (docs/detections.md): the hard pairs' psf_ref.npy, 200 images: 0.135 negative peaks
and 0.110 positive peaks per image.
"""
import sys
import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve

psf = np.load(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
rng = np.random.default_rng(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
N, B = 1024, 32
neg = pos = 0
for _ in range(n):
    S = fftconvolve(rng.standard_normal((N, N)), psf[::-1, ::-1], mode='same') / np.sqrt((psf ** 2).sum())
    S = S[B:N - B, B:N - B]
    med = np.median(S)
    Sn = (S - med) / (1.4826 * np.median(np.abs(S - med)))
    neg += int(((Sn == ndimage.minimum_filter(Sn, size=7)) & (Sn <= -5)).sum())
    pos += int(((Sn == ndimage.maximum_filter(Sn, size=7)) & (Sn >= 5)).sum())
print(f"{sys.argv[1]}: {n} images of pure noise; peaks <= -5: {neg} ({neg / n:.3f} per image); >= +5: {pos} ({pos / n:.3f} per image)")
