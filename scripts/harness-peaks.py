#!/usr/bin/env python3
"""Where a method's negative peaks and false positives are on a subtraction-harness case, and
what star is under each: the same normalisation and 7x7 peak rules as
../shared/bench/subtraction/evaluate.py, printed one line per peak with the nearest stars.

usage: scripts/harness-peaks.py CASE_DIR [METHOD]   (CASE_DIR holds data/ and results/, as
       run_case.sh writes them; METHOD defaults to blink; run it with the harness's venv)
Example: the bright-star residuals of the hard pairs (docs/detections.md) were traced with it.
"""
import sys, json
import numpy as np
from astropy.io import fits
from scipy import ndimage

case = sys.argv[1]
method = sys.argv[2] if len(sys.argv) > 2 else 'blink'
data, res = case + '/data', case + '/results'
meta = json.load(open(data + '/meta.json'))
N, B, f = meta['N'], meta['BORDER'], meta['PHOT_RATIO']
stars = np.loadtxt(data + '/stars.txt')
trans = np.loadtxt(data + '/transients.txt')
ms = np.load(data + '/sci_stars_model.npy')
mr = np.load(data + '/ref_stars_model.npy')
mt = np.load(data + '/sci_tr_model.npy')
S = fits.getdata('%s/%s_score.fits' % (res, method)).astype(float)
S[~np.isfinite(S)] = 0.0
valid = np.zeros((N, N), bool)
valid[B:N - B, B:N - B] = True
thr = 0.05 * np.sqrt(meta['SKY_SCI'])
free = ndimage.binary_erosion((ms < thr) & (mr / f < thr) & (mt < thr), iterations=3) & valid


def rstd(a):
    return 1.4826 * np.median(np.abs(a - np.median(a)))


sc = rstd(S[free])
Sn = (S - np.median(S[free])) / sc
Sn[~valid] = 0.0


def near(x, y):
    d = np.hypot(stars[:, 0] - x, stars[:, 1] - y)
    return ', '.join('star %.3g e- at %.1f px' % (stars[k, 2], d[k]) for k in np.argsort(d)[:2])


print('%s: raw score sigma on empty sky %.3f' % (case, sc))
mn, mx = ndimage.minimum_filter(Sn, size=7), ndimage.maximum_filter(Sn, size=7)
for y, x in zip(*np.nonzero((Sn == mn) & (Sn <= -5) & valid)):
    print('  negative %.2f at (%d, %d), star light %.0f e-/px: %s' % (Sn[y, x], x, y, ms[y, x], near(x, y)))
for y, x in zip(*np.nonzero((Sn == mx) & (Sn >= 5) & valid)):
    if np.hypot(trans[:, 0] - x, trans[:, 1] - y).min() > 2.0:
        print('  false positive %.2f at (%d, %d), star light %.0f e-/px: %s' % (Sn[y, x], x, y, ms[y, x], near(x, y)))
