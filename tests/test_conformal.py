"""Conformal prediction sets: hand computations, MAPIE and crepes on the same probabilities, coverage over many
exchangeable splits against its exact distribution, nesting, bad input, and the Learner (conformalize, predict_sets,
metrics, TTA, export, plain-data state)."""
import json, math, warnings

import numpy as np
import pytest
import torch, torch.nn as nn, torch.nn.functional as F
from fastai.data.core import Datasets
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat
from fastai.torch_core import set_seed
from fastai.data.core import Transform  # fasttransform on fastai 2.8, fastcore.transform on 2.7

from fastai_regularize.activations import no_activation
from fastai_regularize.conformal import (SCORES, conformal_scores, conformal_threshold, conformal_sets, ConformalPredictor,
                                         Coverage, SetSize)


def _data(N, C=5, seed=0, scale=2., bias=None):
    "Probabilities softmax(scale * z + bias) of N items and classes drawn from them: exchangeable, calibrated by construction"
    g = torch.Generator().manual_seed(seed)
    z = scale*torch.randn(N, C, generator=g, dtype=torch.float64)
    if bias is not None: z = z + torch.tensor(bias, dtype=torch.float64)
    p = F.softmax(z, -1)
    return p,torch.multinomial(p, 1, generator=g)[:, 0]

def _cov(sets, y): return sets[torch.arange(len(y)), y].double().mean().item()

def _rank(n, alpha): return math.ceil(round((n + 1)*(1 - alpha), 9))


# ---------------------------------------------------------------- hand computations

def test_lac_sets_by_hand():
    # 12 held-out items; true-class probabilities .99 .97 .95 .9 .85 .8 .7 .6 .5 .4 .3 .2 -> LAC scores
    # .01 .03 .05 .1 .15 .2 .3 .4 .5 .6 .7 .8; alpha = .25: rank ceil(13 * .75) = ceil(9.75) = 10 -> q = .6, so a class
    # is in a set iff its probability >= .4; alpha = .5: ceil(6.5) = 7 -> q = .3 (p >= .7); alpha = .05: 13 > 12 -> inf
    pt = torch.tensor([.99, .97, .95, .9, .85, .8, .7, .6, .5, .4, .3, .2], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    cal = torch.full((12, 3), 0., dtype=torch.float64)
    cal[torch.arange(12), y] = pt
    cal[torch.arange(12), (y + 1) % 3] = 1 - pt
    test = torch.tensor([[.45, .45, .10], [.75, .20, .05], [.30, .35, .35], [.39, .41, .20]], dtype=torch.float64)
    assert conformal_threshold(conformal_scores(cal, y), 0.25) == pytest.approx(0.6)
    assert conformal_sets(cal, y, test, alpha=0.25).tolist() == [[True, True, False], [True, False, False],
                                                                  [False, False, False], [False, True, False]]
    assert conformal_sets(cal, y, test, alpha=0.5).tolist() == [[False]*3, [True, False, False], [False]*3, [False]*3]
    assert conformal_sets(cal, y, test, alpha=0.5, allow_empty=False).tolist() == [
        [True, False, False], [True, False, False], [False, True, False], [False, True, False]]  # ties: the lower index
    with pytest.warns(UserWarning, match=r'12 held-out items are too few for alpha=0.05 \(it takes 19\)'):
        assert conformal_sets(cal, y, test, alpha=0.05).all()
    # class-conditional at alpha = .25: class c has 4 items, rank ceil(5 * .75) = 4 = its largest score:
    # class 0 scores .01 .1 .3 .6 -> q0 = .6; class 1 .03 .15 .4 .7 -> q1 = .7; class 2 .05 .2 .5 .8 -> q2 = .8
    q = conformal_threshold(conformal_scores(cal, y), 0.25, targs=y, n_classes=3)
    torch.testing.assert_close(q, torch.tensor([.6, .7, .8], dtype=torch.float64))
    # so class 0 needs p >= .4, class 1 p >= .3, class 2 p >= .2
    assert conformal_sets(cal, y, test, alpha=0.25, class_conditional=True).tolist() == [
        [True, True, False], [True, False, False], [False, True, True], [False, True, True]]


def test_aps_and_raps_scores_by_hand():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
    # ranks: item 0: class 1, 2, 0 (cumsums .6 .9 1); item 1: class 2, then 0 and 1 tied -> 0 first (stable): .5 .75 1
    torch.testing.assert_close(conformal_scores(p, score='aps'), torch.tensor([[1., .6, .9], [.75, 1., .5]], dtype=torch.float64))
    u = torch.tensor([0.5, 0.2], dtype=torch.float64)
    torch.testing.assert_close(conformal_scores(p, score='aps', u=u),
                               torch.tensor([[1 - .05, .6 - .3, .9 - .15], [.75 - .05, 1 - .05, .5 - .1]], dtype=torch.float64))
    # RAPS, k_reg = 1, lam = .1: + .1 * (rank - 1)
    torch.testing.assert_close(conformal_scores(p, score='raps', k_reg=1, lam=0.1),
                               torch.tensor([[1.2, .6, 1.], [.85, 1.2, .5]], dtype=torch.float64))
    torch.testing.assert_close(conformal_scores(p, torch.tensor([0, 1]), score='raps', k_reg=1, lam=0.1),
                               torch.tensor([1.2, 1.2], dtype=torch.float64))


def test_threshold_rank_is_exact_for_decimal_alpha():
    s = torch.arange(1, 10, dtype=torch.float64)
    assert conformal_threshold(s, 0.7) == 3.   # (9+1)(1-0.7) = 3 exactly; floating point gives 3.0000000000000004 -> 4
    for n in range(1, 60):
        for a in (0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                q = conformal_threshold(torch.arange(1, n + 1, dtype=torch.float64), a)
            k = _rank(n, a)
            assert q == (math.inf if k > n else float(k)), (n, a)


# ---------------------------------------------------------------- references: MAPIE, crepes

from sklearn.base import BaseEstimator, ClassifierMixin

class _Given(ClassifierMixin, BaseEstimator):
    "An already-fitted scikit-learn classifier whose `predict_proba(X)` is row `X[:, 0]` of the probabilities it holds"
    def __init__(self, probs=None): self.probs = probs
    def fit(self, X, y): return self
    def predict_proba(self, X): return self.probs[np.asarray(X)[:, 0].astype(int)]
    def predict(self, X): return self.predict_proba(X).argmax(1)

def _given(probs):
    est = _Given(probs)
    est.classes_ = np.arange(probs.shape[1])
    return est

def _mapie(P, y, n, alpha, score, include_last_label=None, random_state=7):
    "MAPIE's split-conformal sets (prefit) of items n: from items :n, and its threshold"
    from mapie.classification import SplitConformalClassifier
    X = np.arange(len(P))[:, None]
    m = SplitConformalClassifier(_given(P), confidence_level=1 - alpha, conformity_score=score, prefit=True, random_state=random_state)
    m.conformalize(X[:n], y[:n])
    params = None if include_last_label is None else {'include_last_label': include_last_label}
    sets = m.predict_set(X[n:], conformity_score_params=params)[1][:, :, 0]
    return sets,float(m._mapie_classifier.conformity_score_function_.quantiles_[0])

@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('alpha', [0.1, 0.05, 0.2])
def test_lac_equals_mapie(seed, alpha):
    P,y = _data(101 + 300, C=4 + seed, seed=seed)
    sets,q = _mapie(P.numpy(), y.numpy(), 101, alpha, 'lac')
    assert conformal_threshold(conformal_scores(P[:101], y[:101]), alpha) == pytest.approx(q, abs=0, rel=0)
    np.testing.assert_array_equal(conformal_sets(P[:101], y[:101], P[101:], alpha).numpy(), sets)

@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('alpha', [0.1, 0.05])
def test_randomized_aps_equals_mapie_given_the_same_uniforms(seed, alpha):
    "MAPIE draws U from `RandomState(random_state)`, afresh for the held-out and the predicted items; ours take those U"
    n,N = 121,300
    P,y = _data(n + N, C=6, seed=10 + seed)
    sets,q = _mapie(P.numpy(), y.numpy(), n, alpha, 'aps', 'randomized', random_state=seed)
    u_cal,u_test = (torch.tensor(np.random.RandomState(seed).uniform(size=k)) for k in (n, N))
    qo = conformal_threshold(conformal_scores(P[:n], y[:n], 'aps', u=u_cal), alpha)
    assert qo == pytest.approx(q, abs=1e-15)
    np.testing.assert_array_equal((conformal_scores(P[n:], score='aps', u=u_test) <= qo).numpy(), sets)

def test_deterministic_aps_and_raps_equal_mapies_building_blocks():
    """MAPIE's deterministic scores (cumulative probability up to the true class), its quantile, and its sets with
    include_last_label=False (the top class added to an empty set) equal ours with allow_empty=False; on confident
    probabilities (scale 4) some sets are empty without the top class, so that rule is exercised"""
    from mapie.conformity_scores import APSConformityScore, RAPSConformityScore
    from mapie.utils import _compute_classification_quantile
    n,N,C = 101,400,5
    empty = 0
    for scale in (1., 4.):
        P,y = _data(n + N, C, seed=3, scale=scale)
        Pc,yc,Pt = P[:n].numpy(),y[:n].numpy(),P[n:].numpy()
        cum,rank = APSConformityScore.get_true_label_cumsum_proba(yc, Pc, np.arange(C))
        for alpha in (0.1, 0.05):
            a = np.array([alpha])
            for score,k,lam in (('aps', None, None), ('raps', 2, 0.05), ('raps', 1, 0.3)):
                ref = cum if score == 'aps' else RAPSConformityScore._regularize_conformity_score(np.array([k]), lam, cum.copy(), rank)[:, :, 0]
                ours = conformal_scores(P[:n], y[:n], score, k_reg=k, lam=lam)
                np.testing.assert_allclose(ours.numpy(), ref[:, 0], rtol=0, atol=1e-15)
                qm = _compute_classification_quantile(ref, a)
                assert conformal_threshold(ours, alpha) == pytest.approx(qm[0], abs=1e-14)
                sc = APSConformityScore() if score == 'aps' else RAPSConformityScore()
                sc.quantiles_,sc.classes = qm,np.arange(C)
                if score == 'raps': sc.lambda_star,sc.k_star = lam,np.array([k])
                ref_sets = sc.get_prediction_sets(Pt[:, :, None].copy(), None, a, cv='prefit', include_last_label=False)[:, :, 0]
                got = conformal_sets(P[:n], y[:n], P[n:], alpha, score, k_reg=k, lam=lam, allow_empty=False)
                np.testing.assert_array_equal(got.numpy(), ref_sets, err_msg=f"{score} scale={scale} alpha={alpha}")
                empty += int((conformal_sets(P[:n], y[:n], P[n:], alpha, score, k_reg=k, lam=lam).sum(1) == 0).sum())
                if scale == 1: assert got.sum(1).float().mean() > 1.5   # sets of several classes: something to compare
    assert empty > 0

def test_randomized_raps_scores_equal_mapies():
    from mapie.conformity_scores import APSConformityScore, RAPSConformityScore
    n,C = 200,6
    P,y = _data(n, C, seed=4)
    u = np.random.RandomState(5).uniform(size=n)
    cum,rank = APSConformityScore.get_true_label_cumsum_proba(y.numpy(), P.numpy(), np.arange(C))
    cum = cum - u[:, None]*P.numpy()[np.arange(n), y.numpy()][:, None]
    ref = RAPSConformityScore._regularize_conformity_score(np.array([2]), 0.1, cum, rank)[:, 0, 0]
    np.testing.assert_allclose(conformal_scores(P, y, 'raps', u=torch.tensor(u), k_reg=2, lam=0.1).numpy(), ref, rtol=0, atol=1e-15)

def _torch_u(seed, n, N):
    "The documented randomization: one generator seeded with `seed`, the n held-out items' uniforms first, then the N new ones"
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64),torch.rand(N, generator=g, dtype=torch.float64)

@pytest.mark.parametrize('score,randomized', [('lac', False), ('aps', False), ('aps', True), ('raps', False), ('raps', True)])
@pytest.mark.parametrize('class_conditional', [False, True])
def test_sets_equal_crepes_p_values(score, randomized, class_conditional):
    """crepes' conformal classifier: the set is every class whose p-value (#{held-out scores >= s} + 1)/(n + 1) is >= alpha;
    the same sets as the threshold when (n + 1)(1 - alpha) is not an integer (n = 100 here)"""
    from crepes import ConformalClassifier
    n,N,C,seed = 100,300,5,9
    P,y = _data(n + N, C, seed=5, bias=[1., 0.5, 0., -0.5, -1.])
    u_cal,u_test = _torch_u(seed, n, N) if randomized else (None, None)
    kw = dict(k_reg=2, lam=0.05) if score == 'raps' else {}
    s_cal,s_test = conformal_scores(P[:n], y[:n], score, u_cal, **kw),conformal_scores(P[n:], None, score, u_test, **kw)
    for alpha in (0.1, 0.05, 0.3):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')                        # the rarest class is too small for alpha = 0.05
            got = conformal_sets(P[:n], y[:n], P[n:], alpha, score, randomized, class_conditional, seed, **kw)
        cc = ConformalClassifier()
        if not class_conditional:
            cc.fit(s_cal.numpy())
            ref,cols = cc.predict_set(s_test.numpy(), confidence=1 - alpha, smoothing=False),list(range(C))
        else:
            cc.fit(s_cal.numpy(), bins=y[:n].numpy())
            ref = np.stack([cc.predict_p(s_test[:, c].numpy(), bins=np.full(N, c), smoothing=False) >= alpha for c in range(C)], 1)
            nc = torch.bincount(y[:n], minlength=C).tolist()       # crepes' sets differ where (n_c + 1)(1 - alpha) is an integer
            # (n_c + 1)(1 - alpha) in floats: 10 * 0.9 is 9.000000000000002, an integer all the same
            cols = [c for c in range(C) if not math.isclose((nc[c] + 1)*(1 - alpha), round((nc[c] + 1)*(1 - alpha)), abs_tol=1e-9)]
            assert len(cols) >= C - 1
            # a test score within float rounding of its class's threshold is a tie that the two computations of the score may
            # round either way (the last class's APS score is a cumulative sum of 1 +- an ulp; torch 2.6 rounds it otherwise)
            thr = [torch.sort(s_cal[y[:n] == c]).values[_rank(nc[c], alpha) - 1].item() if _rank(nc[c], alpha) <= nc[c] else math.inf
                   for c in range(C)]
            near = torch.stack([(s_test[:, c] - thr[c]).abs() <= 1e-5 for c in range(C)], 1).numpy()
            assert near.mean() < 0.1
            got,ref = np.where(near, False, got.numpy()),np.where(near, False, ref)
        np.testing.assert_array_equal(np.asarray(got)[:, cols], np.asarray(ref)[:, cols].astype(bool), err_msg=f"alpha={alpha}")

def test_an_empty_class_is_in_every_set_as_crepes_gives():
    from crepes import ConformalClassifier
    P,y = _data(60, 3, seed=6)
    keep = y != 2                                                  # no held-out item of class 2
    with pytest.warns(UserWarning, match=r'class\(es\) \[2\] have fewer than 9'):
        got = conformal_sets(P[keep], y[keep], P, 0.1, class_conditional=True)
    assert got[:, 2].all()
    cc = ConformalClassifier()
    cc.fit(conformal_scores(P[keep], y[keep]).numpy(), bins=y[keep].numpy())
    ref = cc.predict_p(conformal_scores(P)[:, 2].numpy(), bins=np.full(60, 2), smoothing=False) >= 0.1
    np.testing.assert_array_equal(got[:, 2].numpy(), ref)


# ---------------------------------------------------------------- coverage over exchangeable splits

def _tolerance(mu, n, m, R):
    """Standard deviation of the mean over R splits of the coverage of m new items. Given the held-out set, each new
    item is covered with probability F(q), F the scores' CDF; with continuous scores F(q) ~ Beta(k, n + 1 - k) exactly,
    mean mu = k/(n + 1), variance v = mu(1 - mu)/(n + 2). One split's coverage is Binomial(m, F(q))/m, so its variance
    is v + (mu(1 - mu) - v)/m, and the mean of R independent splits has that over R."""
    v = mu*(1 - mu)/(n + 2)
    return math.sqrt((v + (mu*(1 - mu) - v)/m)/R)

@pytest.mark.parametrize('score,randomized', [('lac', False), ('aps', False), ('aps', True), ('raps', False), ('raps', True)])
def test_mean_coverage_over_exchangeable_splits(score, randomized):
    """Over R = 400 splits of fresh exchangeable data (n = 30 held out, m = 50 new, 5 classes), the mean coverage is
    within 4 standard deviations (above) of its exact expectation ceil(31 x 0.9)/31 = 28/31, so inside
    [1 - alpha, 1 - alpha + 1/(n + 1)] within that tolerance. 4 sd = 0.013, while a quantile one rank off moves the
    expectation by 1/31 = 0.032 (9.7 sd): it fails."""
    R,n,m,C,alpha = 400,30,50,5,0.1
    P,y = _data(R*(n + m), C, seed=2*SCORES.index(score) + randomized)
    P,y = P.view(R, n + m, C),y.view(R, n + m)
    kw = dict(k_reg=1, lam=0.1) if score == 'raps' else {}
    cov = torch.tensor([_cov(conformal_sets(P[r, :n], y[r, :n], P[r, n:], alpha, score, randomized, seed=r, **kw), y[r, n:])
                        for r in range(R)])
    mu = _rank(n, alpha)/(n + 1)
    tol = 4*_tolerance(mu, n, m, R)
    assert abs(cov.mean().item() - mu) <= tol, (cov.mean().item(), mu, tol)
    assert 1 - alpha - tol <= cov.mean().item() <= 1 - alpha + 1/(n + 1) + tol

@pytest.mark.parametrize('score,randomized', [('lac', False), ('aps', True)])
def test_class_conditional_coverage_holds_per_class(score, randomized):
    """Three classes of unequal frequency and difficulty: with one threshold per class every class's mean coverage is
    within 4 sd of its exact expectation (the mean over splits of min(k_c, n_c + 1)/(n_c + 1)) and so >= 1 - alpha
    within that; the marginal threshold leaves the hardest class below 1 - alpha by more than that (so the test can fail)."""
    R,n,m,C,alpha = 250,150,60,3,0.1
    P,y = _data(R*(n + m), C, seed=11, scale=1.5, bias=[1., 0., -1.])
    P,y = P.view(R, n + m, C),y.view(R, n + m)
    worst_marginal = 1.
    for cc in (True, False):
        got,mu,var = [[] for _ in range(C)],[[] for _ in range(C)],[[] for _ in range(C)]
        for r in range(R):
            sets = conformal_sets(P[r, :n], y[r, :n], P[r, n:], alpha, score, randomized, class_conditional=cc, seed=r)
            for c in range(C):
                t = y[r, n:] == c
                if not t.any(): continue
                got[c].append(_cov(sets[t], y[r, n:][t]))
                nc = int((y[r, :n] == c).sum())
                mc = min(_rank(nc, alpha), nc + 1)/(nc + 1)
                mu[c].append(mc); var[c].append(_tolerance(mc, nc, int(t.sum()), 1)**2)
        for c in range(C):
            mean,expect,sd = sum(got[c])/len(got[c]),sum(mu[c])/len(mu[c]),math.sqrt(sum(var[c]))/len(var[c])
            if cc:
                assert abs(mean - expect) <= 4*sd, (c, mean, expect, sd)
                assert mean >= 1 - alpha - 4*sd
            else: worst_marginal = min(worst_marginal, mean - (1 - alpha) + 4*sd)
    assert worst_marginal < 0


# ---------------------------------------------------------------- nesting, top-L sets

@pytest.mark.parametrize('score,randomized', [('lac', False), ('aps', False), ('aps', True), ('raps', False), ('raps', True)])
@pytest.mark.parametrize('class_conditional', [False, True])
@pytest.mark.filterwarnings('ignore:class-conditional')     # at alpha = 0.02 the smaller classes are in every set
def test_sets_are_nested_as_alpha_shrinks(score, randomized, class_conditional):
    P,y = _data(500, 6, seed=12, scale=1.)
    pred = ConformalPredictor.fit(P[:300], y[:300], score, randomized, class_conditional, seed=4)
    sets = [pred.sets(P[300:], a) for a in (0.6, 0.4, 0.2, 0.1, 0.05, 0.02)]
    for a,b in zip(sets, sets[1:]): assert (a <= b).all()              # a subset of b
    assert sets[0].sum() < sets[-1].sum()
    if score != 'lac':                                                # APS/RAPS sets are top-L sets of the ranking
        rank = torch.argsort(torch.argsort(P[300:], dim=1, descending=True, stable=True), dim=1)
        for s in sets:
            L = s.sum(1, keepdim=True)
            if not class_conditional: assert torch.equal(s, rank < L)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_probabilities_give_the_cpu_sets_on_the_gpu():
    P,y = _data(400, 5, seed=14)
    for kw in (dict(score='lac'), dict(score='aps', randomized=True, class_conditional=True), dict(score='raps', allow_empty=False)):
        cpu = conformal_sets(P[:200], y[:200], P[200:], 0.1, **kw)
        gpu = conformal_sets(P[:200].cuda(), y[:200].cuda(), P[200:].cuda(), 0.1, **kw)
        assert gpu.device.type == 'cuda' and torch.equal(gpu.cpu(), cpu), kw


# ---------------------------------------------------------------- bad input: one line each

P0,Y0 = _data(40, 3, seed=13)
BAD = [
    (lambda: conformal_sets(P0, Y0, P0, alpha=0), ValueError, '`alpha` must be in (0, 1), got 0'),
    (lambda: conformal_sets(P0, Y0, P0, alpha=1.5), ValueError, '`alpha` must be in (0, 1), got 1.5'),
    (lambda: conformal_sets(P0, Y0, P0, alpha=float('nan')), ValueError, '`alpha` must be in (0, 1)'),
    (lambda: conformal_sets(P0, Y0, P0, alpha='0.1'), TypeError, '`alpha` must be a number'),
    (lambda: conformal_sets(P0, Y0, P0, score='thr'), ValueError, "`score` must be one of ('lac', 'aps', 'raps'), got 'thr'"),
    (lambda: conformal_sets(P0[:, 0], Y0, P0), ValueError, '`cal_probs` must be 2-D'),
    (lambda: conformal_sets(torch.log(P0), Y0, P0), ValueError, '`cal_probs` must be probabilities in [0, 1]'),
    (lambda: conformal_sets(P0/2, Y0, P0), ValueError, '`cal_probs` rows must sum to 1'),
    (lambda: conformal_sets(torch.sigmoid(P0*4 - 1), Y0, P0), ValueError, '`cal_probs` rows must sum to 1'),
    (lambda: conformal_sets(P0, Y0, torch.log(P0)), ValueError, '`probs` must be probabilities in [0, 1]'),
    (lambda: conformal_sets(P0, Y0, P0[:, :2]/P0[:, :2].sum(1, keepdim=True)), ValueError, '`probs` has 2 classes but the predictor was fitted on 3'),
    (lambda: conformal_sets(P0.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float('nan'), dtype=torch.float64)), Y0, P0),
     ValueError, '`cal_probs` must be finite'),
    (lambda: conformal_sets(P0, Y0.float(), P0), ValueError, '`cal_targs` must be integer class indices of shape (N,)'),
    (lambda: conformal_sets(P0, Y0[:30], P0), ValueError, '`cal_targs` has 30 items but `cal_probs` has 40'),
    (lambda: conformal_sets(P0, Y0 + 3, P0), ValueError, '`cal_targs` must be class indices in [0, 3)'),
    (lambda: conformal_sets(P0, Y0, P0, randomized=True), ValueError, "`randomized` applies to 'aps' and 'raps'"),
    (lambda: conformal_sets(P0, Y0, P0, score='aps', randomized=1), TypeError, '`randomized` must be True or False, got int 1'),
    (lambda: conformal_sets(P0, Y0, P0, class_conditional='yes'), TypeError, '`class_conditional` must be True or False'),
    (lambda: conformal_sets(P0, Y0, P0, allow_empty=None), TypeError, '`allow_empty` must be True or False'),
    (lambda: conformal_sets(P0, Y0, P0, seed=-1), ValueError, '`seed` must be an int >= 0, got -1'),
    (lambda: conformal_sets(P0, Y0, P0, seed=1.), TypeError, '`seed` must be an int'),
    (lambda: conformal_sets(P0, Y0, P0, score='aps', k_reg=2), ValueError, "`k_reg` applies to score='raps' only"),
    (lambda: conformal_sets(P0, Y0, P0, score='raps', lam=-0.1), ValueError, '`lam` must be in [0, inf)'),
    (lambda: conformal_sets(P0, Y0, P0, score='raps', k_reg=1.5), TypeError, '`k_reg` must be an int'),
    (lambda: conformal_scores(P0, score='aps', u=torch.rand(3)), ValueError, '`u` has 3 values but `probs` has 40 items'),
    (lambda: conformal_scores(P0, score='aps', u=torch.rand(40) + 1), ValueError, '`u` must be uniforms in [0, 1]'),
    (lambda: conformal_threshold(torch.rand(10), 0.1, n_classes=3), ValueError, '`n_classes` goes with `targs`'),
    (lambda: conformal_threshold(torch.tensor([1., float('inf')]), 0.1), ValueError, '`scores` must be finite'),
    (lambda: ConformalPredictor.from_state({'scores': torch.zeros(2)}), ValueError, "`state` must be a dict with 'scores'"),
    (lambda: ConformalPredictor.from_state({**ConformalPredictor.fit(P0, Y0).state(), 'settings': {'version': 9}}),
     ValueError, '`state` has version 9'),
    (lambda: ConformalPredictor.fit(P0, Y0).sets(P0, alpha=-1), ValueError, '`alpha` must be in (0, 1), got -1'),
]

@pytest.mark.parametrize('i', range(len(BAD)))
def test_bad_input_is_a_one_line_error(i):
    f,exc,msg = BAD[i]
    with pytest.raises(exc) as e: f()
    assert msg in str(e.value) and '\n' not in str(e.value), str(e.value)


# ---------------------------------------------------------------- the Learner

class _Jitter(Transform):
    "Noise on the inputs of the training split only: what TTA's augmented passes see"
    split_idx = 0
    def encodes(self, x:torch.Tensor): return x + 0.5*torch.randn_like(x)

def _learner(n_train=100, n_valid=400, n_test=300, seed=0, loss_func=None, jitter=False, metrics=()):
    "A linear model over tensors three times too confident, with a test split as `dls[2]`"
    g = torch.Generator().manual_seed(seed)
    N = n_train + n_valid + n_test
    W,xs = torch.randn(4, 4, generator=g),torch.randn(N, 4, generator=g)
    ys = torch.multinomial(F.softmax(xs@W, -1), 1, generator=g)[:, 0]
    tfms = [[xs.__getitem__] + ([_Jitter()] if jitter else []), [ys.__getitem__]]
    dls = Datasets(range(N), tfms, splits=[range(n_train), range(n_train, n_train + n_valid),
                                           range(n_train + n_valid, N)]).dataloaders(bs=128)
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad(): model.weight.copy_(3*W.T)
    return Learner(dls, model, loss_func=loss_func or CrossEntropyLossFlat(), metrics=list(metrics)),ys[n_train:n_train + n_valid],ys[n_train + n_valid:]

def test_conformalize_then_predict_sets_equals_conformal_sets():
    learn,yv,yt = _learner()
    learn.calibrate()                                              # installed first: the sets use calibrated probabilities
    pv,tv = learn.get_preds()
    assert torch.equal(tv, yv)
    raw = F.softmax(learn.get_preds(act=no_activation)[0], -1)
    assert not torch.allclose(pv, raw, atol=1e-3)                  # so a missed calibration would show
    pt = learn.get_preds(dl=learn.dls[2])[0]
    for kw in (dict(score='lac'), dict(score='aps', randomized=True, class_conditional=True, seed=3),
               dict(score='raps', k_reg=2, lam=0.05, allow_empty=False)):
        pred = learn.conformalize(alpha=0.2, **kw)
        assert learn.conformal is pred and pred.n == 400
        sets,p = learn.predict_sets(learn.dls[2])
        torch.testing.assert_close(p, pt)
        assert torch.equal(sets, conformal_sets(pv, yv, pt, 0.2, **kw))
        assert torch.equal(pred.sets(pt, 0.05), conformal_sets(pv, yv, pt, 0.05, **kw))
    assert learn.predict_sets(alpha=0.05)[0].shape == (400, 4)     # the validation set by default

def test_conformalize_with_tta_fits_and_predicts_on_seeded_tta():
    learn,yv,_ = _learner(jitter=True)
    pred = learn.conformalize(score='lac', tta=dict(n=2), seed=5)
    assert pred.tta == dict(n=2, beta=0.25, use_max=False)
    set_seed(5, reproducible=True)
    pv = learn.tta(n=2)[0]
    torch.testing.assert_close(pred.scores, conformal_scores(pv, yv))
    assert not torch.allclose(pred.scores, conformal_scores(learn.get_preds()[0], yv))   # TTA differs from one pass here
    sets,pt = learn.predict_sets(learn.dls[2])
    set_seed(5, reproducible=True)
    torch.testing.assert_close(pt, learn.tta(dl=learn.dls[2], n=2)[0])
    assert torch.equal(sets, conformal_sets(pv, yv, pt, 0.1, 'lac'))
    with pytest.raises(ValueError, match='fitted on TTA probabilities'):
        learn.metrics = [Coverage()]
        learn.validate(dl=learn.dls[2])

def test_coverage_and_set_size_metrics():
    learn,yv,yt = _learner()
    learn.metrics = [Coverage(), SetSize()]
    learn.calibrate()                                              # the metrics stand aside inside get_preds: no error
    with pytest.raises(ValueError, match='`Coverage` needs the conformal predictor `learn.conformalize\\(\\)` installs'):
        learn.validate(dl=learn.dls[2])
    learn.conformalize(score='aps', randomized=True, seed=2)
    learn.metrics = [Coverage(), SetSize(), Coverage(alpha=0.3), SetSize(alpha=0.3)]
    res = learn.validate(dl=learn.dls[2])
    for a,(c,s) in ((None, res[1:3]), (0.3, res[3:5])):
        sets,_ = learn.predict_sets(learn.dls[2], alpha=a)
        assert c == pytest.approx(_cov(sets, yt), abs=1e-12) and s == pytest.approx(sets.sum(1).double().mean().item(), abs=1e-12)
    assert res[3] < res[1] and res[4] < res[2]
    learn.calibrate('vector')
    for f in (lambda: learn.predict_sets(), lambda: learn.validate(dl=learn.dls[2])):
        with pytest.raises(ValueError, match='changed since `conformalize\\(\\)`'): f()
    learn.conformalize()                                           # refits with the metrics in place
    learn.validate()

def test_learner_errors_and_a_failed_conformalize_keeps_the_old_predictor():
    learn,_,_ = _learner()
    with pytest.raises(ValueError, match='`predict_sets` needs the conformal predictor'): learn.predict_sets()
    old = learn.conformalize()
    for kw,msg in ((dict(tta={'m': 3}), "`tta` takes the keys ('n', 'beta', 'use_max'), got 'm'"),
                   (dict(tta='yes'), '`tta` must be True, False or a dict'), (dict(alpha=2), '`alpha` must be in (0, 1)'),
                   (dict(score='lac', randomized=True), "'lac' has no randomized form"),
                   (dict(dl=learn.dls.test_dl(range(5))), '`dl` has no targets')):
        with pytest.raises((ValueError, TypeError)) as e: learn.conformalize(**kw)
        assert msg in str(e.value) and '\n' not in str(e.value)
        assert learn.conformal is old
    with pytest.raises(ValueError, match='`alpha` must be in'): learn.predict_sets(alpha=0)
    logit_learn,_,_ = _learner(loss_func=nn.CrossEntropyLoss())     # no softmax activation: get_preds gives logits
    with pytest.raises(ValueError, match='`cal_probs` .*does the loss have a softmax `activation`'): logit_learn.conformalize()
    ml,_,_ = _learner(loss_func=BCEWithLogitsLossFlat())
    with pytest.raises(ValueError, match='single-label \\(softmax\\) classifiers'): ml.conformalize()

def test_export_and_load_learner_keep_it(tmp_path):
    learn,_,_ = _learner()
    learn.calibrate()
    learn.conformalize(score='raps', randomized=True, class_conditional=True, seed=7, k_reg=2, lam=0.02)
    ref = learn.predict_sets(learn.dls[2], alpha=0.05)
    learn.path = tmp_path
    learn.export('conformal.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = load_learner(tmp_path/'conformal.pkl')
    assert type(loaded.conformal) is ConformalPredictor and repr(loaded.conformal) == repr(learn.conformal)
    got = loaded.predict_sets(learn.dls[2], alpha=0.05)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])

def test_state_is_plain_data_that_rebuilds_the_predictor(tmp_path):
    "Tensors and JSON: what a pickle-free format (safetensors + JSON) can hold"
    from safetensors.torch import save_file, load_file
    learn,_,_ = _learner()
    learn.calibrate()
    pred = learn.conformalize(score='raps', randomized=True, class_conditional=True, tta=dict(n=1), seed=4)
    st = pred.state()
    assert set(st) == {'scores', 'targs', 'settings'} and st['scores'].dtype == torch.float64 and st['targs'].dtype == torch.int64
    save_file({'scores': st['scores'], 'targs': st['targs']}, tmp_path/'c.safetensors')
    (tmp_path/'c.json').write_text(json.dumps(st['settings']))
    back = ConformalPredictor.from_state({**load_file(tmp_path/'c.safetensors'), 'settings': json.loads((tmp_path/'c.json').read_text())})
    P,_ = _data(50, 4, seed=8)
    for a in (0.1, 0.3): assert torch.equal(back.sets(P, a), pred.sets(P, a))
    assert (back.tta, back.calibration, back.k_reg, back.lam) == (pred.tta, pred.calibration, 1, 0.01)
    learn.conformal = back
    learn.predict_sets()                                            # the calibration digest survived


# ---------------------------------------------------------------- TTA: one path with the CLI, tied to the TTA calibration

def _flip_learner():
    "A linear classifier of 6x6 images with a random flip (TTA's passes differ), three times too confident, never predicted with"
    from conftest import flip_learner
    return flip_learner(n_valid=300, warm=False)

def test_a_learners_first_tta_conformalize_is_seeded_as_tta_logits():
    """fastai's lazy `dls.n_inp` draws random numbers on a learner's first batch: `conformalize(tta=...)` as the first
    prediction must give the scores of the seeded passes `tta_logits` gives (through the TTA map, combined as `tta` does)"""
    from fastai_regularize.activations import tta_logits, combine_tta
    learn = _flip_learner()
    pred = learn.conformalize(score='lac', tta=dict(n=2), seed=5)
    P,y = tta_logits(learn, n=2, seed=5)
    assert not torch.equal(P[0], P[1])                                              # the passes differ: the seed matters
    assert torch.equal(pred.scores, conformal_scores(combine_tta(F.softmax(P, -1), 0.25).double(), y))
    learn.calibrate(tta=dict(n=2), seed=5)                                         # through the installed TTA map too
    pred = learn.conformalize(score='lac', tta=dict(n=2), seed=5)
    assert torch.equal(pred.scores, conformal_scores(combine_tta(torch.stack([learn.tta_act(z) for z in P]), 0.25).double(), y))

def test_a_later_tta_calibration_invalidates_tta_scores():
    "Scores are tied to the calibration their probabilities went through: TTA scores to `tta_act`/`tta_params`, single-pass ones to `default_act`"
    learn = _flip_learner()
    learn.calibrate(); learn.calibrate(tta=dict(n=2))
    learn.conformalize(tta=dict(n=2))
    sets,probs = learn.predict_sets(learn.dls.valid)
    learn.calibrate(tta=dict(n=2, beta=0.5))                                      # another TTA map: refused
    msg = r'calibration of TTA \(`tta_act` and `tta_params`, else `default_act`\) changed since `conformalize\(\)`'
    with pytest.raises(ValueError, match=msg): learn.predict_sets()
    with pytest.warns(UserWarning, match='only approximately calibrated'): learn.conformalize(tta=dict(n=2))
    learn.tta_params = {'n': 3, 'beta': 0.25}                                      # the same map, fitted for other settings
    with pytest.raises(ValueError, match=msg): learn.predict_sets()
    learn.calibrate(tta=dict(n=2))
    learn.conformalize(tta=dict(n=2))
    assert torch.equal(learn.predict_sets(learn.dls.valid)[0], sets)             # refitted as before: the same sets
    learn.calibrate('vector')                                                     # `tta` applies `tta_act`, not `default_act`
    assert torch.equal(learn.predict_sets(learn.dls.valid)[0], sets)
    learn.reset_calibration('tta')                                                # `tta` now applies `default_act`: refused
    with pytest.raises(ValueError, match=msg): learn.predict_sets()
    learn.conformalize()                                                          # single pass: a TTA map does not matter
    learn.calibrate(tta=dict(n=2))
    learn.predict_sets()
    learn.calibrate('temperature')
    with pytest.raises(ValueError, match=r'calibration \(`default_act`\) changed'): learn.predict_sets()
