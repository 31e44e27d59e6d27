"""Deliberately naive, loop-based implementations written straight from the paper's equations.

They are slow on purpose: one Python loop per sum of the equations, no vectorisation, no
shared code with ``torch_dacl``. The reference tests compare the library against them.
"""

from __future__ import annotations

import math
from collections import deque

import torch


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    b = b.double()
    return float(a @ b / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12)))


def naive_masked_average_pool(features, probs, threshold):
    """Eq. 2 with loops over images, classes and pixels."""
    n, d = features.shape[:2]
    c = probs.shape[1]
    f = features.reshape(n, d, -1).double()
    pr = probs.reshape(n, c, -1)
    protos = torch.zeros(n, c, d, dtype=torch.float64)
    valid = torch.zeros(n, c, dtype=torch.bool)
    for i in range(n):
        for k in range(c):
            total = torch.zeros(d, dtype=torch.float64)
            count = 0
            for x in range(f.shape[-1]):
                if pr[i, k, x] > threshold:
                    total += f[i, :, x]
                    count += 1
            if count:
                protos[i, k] = total / count
                valid[i, k] = True
    return protos, valid


def naive_knn_density(features, labels, ks, bank=None, bank_valid=None):
    """Eq. 3-5: for every query, sort its neighbours' cosine similarities, average top-k."""
    q = features.shape[0]
    out = torch.zeros(q, dtype=torch.float64)
    for i in range(q):
        sims = []
        for j in range(q):
            if j != i and int(labels[j]) == int(labels[i]):
                sims.append(cos(features[i], features[j]))
        if bank is not None:
            c = int(labels[i])
            for l in range(bank.shape[1]):
                if bank_valid is None or bool(bank_valid[c, l]):
                    sims.append(cos(features[i], bank[c, l]))
        if not sims:
            out[i] = -1.0
            continue
        sims.sort(reverse=True)
        per_scale = []
        for k in ks:
            kk = min(k, len(sims))
            per_scale.append(sum(sims[:kk]) / kk)
        out[i] = sum(per_scale) / len(per_scale)
    return out


def naive_sdcl(anchors, labels, centers, negatives, negatives_valid=None, temperature=0.4,
               weighting="paper", gamma=None, include_positive=False, reduction="mean"):
    """Eq. 9-10 with a loop over anchors; w_i from a loop over the anchors of the class."""
    a = anchors.shape[0]
    terms = []
    contributing = []
    for i in range(a):
        n = int(labels[i])
        negs = [negatives[n, p] for p in range(negatives.shape[1])
                if negatives_valid is None or bool(negatives_valid[n, p])]
        if not negs:
            terms.append(0.0)
            contributing.append(False)
            continue
        s_i = cos(anchors[i], centers[n]) / temperature
        denom = sum(math.exp(cos(anchors[i], p) / temperature) for p in negs)
        if include_positive:
            denom += math.exp(s_i)
        same = [j for j in range(a) if int(labels[j]) == n]
        z = sum(math.exp(cos(anchors[j], centers[n])) for j in same)
        g = (1.0 / len(same)) if gamma is None else gamma
        w_i = (1.0 / g) * math.exp(cos(anchors[i], centers[n])) / z
        if weighting == "none":
            w_i = 1.0
        if weighting == "scale":
            t = -w_i * math.log(math.exp(s_i) / denom)
        else:
            t = -math.log(w_i * math.exp(s_i) / denom)
        terms.append(t)
        contributing.append(True)
    terms_t = torch.tensor(terms, dtype=torch.float64)
    if reduction == "none":
        return terms_t
    if reduction == "sum":
        return terms_t.sum()
    k = sum(contributing)
    return terms_t.sum() / max(k, 1)


def naive_rampup(step, total, max_weight=0.1, warmup=1000):
    if step < warmup:
        return 0.0
    return max_weight * math.exp(-5 * (1 - min(step / total, 1.0)) ** 2)


class NaiveFifo:
    """One ``deque(maxlen=size)`` per class."""

    def __init__(self, num_classes, size):
        self.q = [deque(maxlen=size) for _ in range(num_classes)]

    def push(self, feats, labels, density=None, valid=None):
        for i in range(feats.shape[0]):
            if valid is not None and not bool(valid[i]):
                continue
            c = int(labels[i])
            if 0 <= c < len(self.q):
                d = 0.0 if density is None else float(density[i])
                self.q[c].append((feats[i].clone(), d))
