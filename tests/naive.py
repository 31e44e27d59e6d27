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


# ----------------------------------------------------------------------------- autograd references
def _cos_t(a, b):
    """Cosine similarity of two float64 vectors, with autograd."""
    return (a @ b) / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12))


def naive_sdcl_autograd(anchors, labels, centers, negatives, negatives_valid=None, temperature=0.4,
                        weighting="paper", gamma=None, include_positive=False, reduction="mean",
                        centers_valid=None):
    """Eq. 9-10 in float64 torch ops, one anchor at a time, so that autograd gives the gradient.

    ``anchors (A, D)`` may require grad; ``centers (C, D)``, ``negatives (C, P, D)`` are constants.
    A class without a valid center (``centers_valid``) or without a valid negative contributes
    nothing. Returns ``(loss, number of contributing anchors)``.
    """
    terms = []
    for i in range(anchors.shape[0]):
        n = int(labels[i])
        if centers_valid is not None and not bool(centers_valid[n]):
            continue
        negs = [negatives[n, p] for p in range(negatives.shape[1])
                if negatives_valid is None or bool(negatives_valid[n, p])]
        if not negs:
            continue
        cpos = _cos_t(anchors[i], centers[n])
        s_i = cpos / temperature
        denom = sum(torch.exp(_cos_t(anchors[i], p) / temperature) for p in negs)
        if include_positive:
            denom = denom + torch.exp(s_i)
        same = [j for j in range(anchors.shape[0]) if int(labels[j]) == n]
        z = sum(torch.exp(_cos_t(anchors[j], centers[n])) for j in same)
        g = (1.0 / len(same)) if gamma is None else gamma
        w_i = (1.0 / g) * torch.exp(cpos) / z
        if weighting == "none":
            terms.append(-torch.log(torch.exp(s_i) / denom))
        elif weighting == "scale":
            terms.append(-w_i.detach() * torch.log(torch.exp(s_i) / denom))
        else:
            terms.append(-torch.log(w_i * torch.exp(s_i) / denom))
    if not terms:
        return anchors.sum() * 0.0, 0
    total = sum(terms)
    return (total if reduction == "sum" else total / len(terms)), len(terms)


def naive_cps(logits_a, logits_b, mask=None):
    """Cross pseudo supervision with a loop over pixels: the masked mean of the two CEs."""
    n, c = logits_a.shape[:2]
    la = logits_a.reshape(n, c, -1)
    lb = logits_b.reshape(n, c, -1)
    m = None if mask is None else mask.reshape(n, -1)
    total, count = 0.0, 0
    for i in range(n):
        for x in range(la.shape[-1]):
            if m is not None and not bool(m[i, x]):
                continue
            ya = int(torch.argmax(la[i, :, x].detach()))
            yb = int(torch.argmax(lb[i, :, x].detach()))
            total = total - torch.log_softmax(la[i, :, x], 0)[yb] - torch.log_softmax(lb[i, :, x], 0)[ya]
            count += 1
    if count == 0:
        return (logits_a.sum() + logits_b.sum()) * 0.0
    return total / count


# ----------------------------------------------------------------------------- the whole module
class AmbiguousCut(Exception):
    """A top-k cut falls between two different candidates whose scores (nearly) tie."""


def _density_of(v, others, ks):
    """Eq. 3-5 for one vector against a list of neighbour vectors; -1 without a neighbour."""
    sims = sorted((cos(v, o) for o in others), reverse=True)
    if not sims:
        return -1.0
    return sum(sum(sims[:min(k, len(sims))]) / min(k, len(sims)) for k in ks) / len(ks)


class NaiveDACL:
    """DACL end to end (Eq. 2-10) with loops and its own FIFO bank, written from the paper.

    Shares no code with ``torch_dacl``. Per call, for each class ``n``:

    * candidates: every labelled pixel of the class (the test sets the module's
      ``max_samples_per_class`` at or above every class's count, so the module's random
      subsample is the whole class; this is asserted by ``max_samples``);
    * density of each candidate (Eq. 3-5) against the other candidates of its class and the
      class's bank entries;
    * ``anchor_mode="pixel"``: the candidates ranked once by density, ascending; with
      ``S_n`` candidates, ``Q = num_anchors`` and ``H = num_positives // 2``, the ``Q``
      lowest are anchors and the ``H`` highest batch positives when ``S_n >= Q + H``, else
      the ``q = min(Q, S_n // 2)`` lowest and the ``min(H, S_n - q)`` highest (disjoint);
    * ``anchor_mode="class"``: anchors are the ``Q`` lowest-density per-image prototypes
      (Eq. 2; density against the class's other prototypes and bank), positives the ``H``
      highest-density pixels;
    * bank positives: the ``num_positives - H`` entries of highest stored density (Eq. 7);
    * center: mean of the unit positive vectors (Eq. 8); none without a positive;
    * negatives: every pixel of the other classes, or the vectors given in ``negatives``;
    * the loss of Eq. 9-10 (:func:`naive_sdcl_autograd`, gradient through the anchors);
    * bank update: per-image prototypes (with their density) or the class's pixels.

    Every top-k cut must be strict: a cut between two candidates whose scores differ by less
    than ``tol`` raises :class:`AmbiguousCut`, unless the tied candidates are identical vectors
    (then the choice cannot change the loss value; ``self.tie_at_cut`` is set, since the
    gradient may land on either copy).
    """

    def __init__(self, num_classes, ks, temperature, num_anchors, num_positives, bank_size, max_samples,
                 bank_source="prototype", anchor_mode="pixel", use_bank=True, weighting="paper", gamma=None,
                 include_positive=False, reduction="mean", threshold=0.5, ignore_index=-100,
                 bank_push_per_class=None, tol=1e-4):
        self.c = num_classes
        self.ks = tuple(ks)
        self.tau = temperature
        self.q = num_anchors
        self.h = max(1, num_positives // 2)
        self.hb = num_positives - self.h
        self.bank_size = bank_size
        self.max_samples = max_samples
        self.bank_source = bank_source
        self.anchor_mode = anchor_mode
        self.use_bank = use_bank
        self.weighting = weighting
        self.gamma = gamma
        self.include_positive = include_positive
        self.reduction = reduction
        self.threshold = threshold
        self.ignore_index = ignore_index
        self.push = bank_push_per_class
        self.tol = tol
        self.bank = [deque(maxlen=bank_size) for _ in range(num_classes)]  # (vector, density)
        self.tie_at_cut = False

    def _cut(self, items, k, largest):
        """The ``k`` items with the smallest (or largest) score; ``items`` = [(score, vector, ...)]."""
        order = sorted(items, key=lambda t: t[0], reverse=largest)
        if 0 < k < len(order):
            inside, outside = order[k - 1], order[k]
            if abs(inside[0] - outside[0]) <= self.tol:
                tied = [t for t in order if abs(t[0] - inside[0]) <= self.tol]
                if any(not torch.equal(t[1], tied[0][1]) for t in tied):
                    raise AmbiguousCut(f"scores {inside[0]} and {outside[0]} at a cut of {k}")
                self.tie_at_cut = True
        return order[:k]

    def __call__(self, emb, labels, probs=None, negatives=None):
        """``emb (N, D, *S)`` float64 (may require grad), ``labels (N, *S)``; ``negatives``
        optional: ``negatives[n]`` the list of negative vectors of class ``n``.

        Returns ``(loss, num_contributing)``.
        """
        n_img, d = emb.shape[:2]
        e = emb.reshape(n_img, d, -1)
        lab = labels.reshape(n_img, -1)
        self.tie_at_cut = False
        # candidates: (image, position) of every labelled pixel, by class
        pix = [[] for _ in range(self.c)]
        for i in range(n_img):
            for x in range(e.shape[-1]):
                y = int(lab[i, x])
                if y == self.ignore_index or not 0 <= y < self.c:
                    continue
                pix[y].append(e[i, :, x])
        for n in range(self.c):
            assert len(pix[n]) <= self.max_samples, "the module would subsample this class"
        bank = self.bank if self.use_bank else [[] for _ in range(self.c)]
        dens = []
        for n in range(self.c):
            keys = [v.detach() for v in pix[n]]
            nb_bank = [b for b, _ in bank[n]]
            dens.append([_density_of(keys[i], keys[:i] + keys[i + 1:] + nb_bank, self.ks)
                         for i in range(len(keys))])
        # per-image prototypes (Eq. 2), needed for class anchors and for the prototype bank
        protos = [[] for _ in range(self.c)]  # (prototype with graph, density), image order
        if self.anchor_mode == "class" or (self.use_bank and self.bank_source == "prototype"):
            maps = probs.reshape(n_img, self.c, -1) if probs is not None else None
            for n in range(self.c):
                vecs = []
                for i in range(n_img):
                    members = [e[i, :, x] for x in range(e.shape[-1])
                               if (float(maps[i, n, x]) > self.threshold if maps is not None
                                   else int(lab[i, x]) == n)]
                    if members:
                        vecs.append(sum(members) / len(members))
                for j, v in enumerate(vecs):
                    others = [o.detach() for k, o in enumerate(vecs) if k != j] + [b for b, _ in bank[n]]
                    protos[n].append((v, _density_of(v.detach(), others, self.ks)))
        anchors, anchor_labels, centers, centers_valid = [], [], [], []
        for n in range(self.c):
            ranked = [(dens[n][i], pix[n][i].detach(), i) for i in range(len(pix[n]))]
            s_n = len(ranked)
            if self.anchor_mode == "pixel":
                q = self.q if s_n >= self.q + self.h else min(self.q, s_n // 2)
                h = self.h if s_n >= self.q + self.h else min(self.h, s_n - q)
                chosen = [pix[n][t[2]] for t in self._cut(ranked, q, largest=False)]
            else:
                h = min(self.h, s_n)
                cand = [(p[1], p[0].detach(), j) for j, p in enumerate(protos[n])]
                chosen = [protos[n][t[2]][0] for t in self._cut(cand, self.q, largest=False)]
            anchors += chosen
            anchor_labels += [n] * len(chosen)
            pos = [t[1] for t in self._cut(ranked, h, largest=True)]
            if self.use_bank:
                stored = [(dv, b) for b, dv in bank[n]]
                pos += [t[1] for t in self._cut(stored, self.hb, largest=True)]
            if pos:
                centers.append(sum(p.double() / p.double().norm() for p in pos) / len(pos))
                centers_valid.append(True)
            else:
                centers.append(torch.zeros(emb.shape[1], dtype=torch.float64))
                centers_valid.append(False)
        if negatives is None:
            negatives = [[v.detach() for m in range(self.c) if m != n for v in pix[m]] for n in range(self.c)]
        width = max([1] + [len(v) for v in negatives])
        neg = torch.zeros(self.c, width, d, dtype=torch.float64)
        neg_valid = torch.zeros(self.c, width, dtype=torch.bool)
        for n in range(self.c):
            for p, v in enumerate(negatives[n]):
                neg[n, p] = v.double()
                neg_valid[n, p] = True
        a = torch.stack(anchors) if anchors else emb.new_zeros(0, d)
        loss, k = naive_sdcl_autograd(a, torch.tensor(anchor_labels, dtype=torch.long), torch.stack(centers), neg,
                                      neg_valid, self.tau, self.weighting, self.gamma, self.include_positive,
                                      self.reduction, centers_valid)
        if not anchors:
            loss = emb.sum() * 0.0
        # bank update (FIFO), after the loss
        if self.use_bank:
            for n in range(self.c):
                if self.bank_source == "prototype":
                    new = [(v.detach().clone(), dv) for v, dv in protos[n]]
                else:
                    assert self.push is not None and len(pix[n]) <= self.push, "the module would push a random subset"
                    new = [(pix[n][i].detach().clone(), dens[n][i]) for i in range(len(pix[n]))]
                    assert len(self.bank[n]) + len(new) <= self.bank_size, \
                        "the module pushes pixels in random order: an overflow would drop a random subset"
                self.bank[n].extend(new)
        return loss, k


def naive_mix(*values: int) -> int:
    """The random stream's seed of ``values``: splitmix64's finaliser folded over them, as a
    non-negative 63-bit int (``torch_dacl.stages._mix``), one value at a time."""
    def finaliser(z: int) -> int:
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
        return z ^ (z >> 31)

    h = 0x9E3779B97F4A7C15
    for v in values:
        h = finaliser(h ^ (v % 2**64))
    return h // 2
