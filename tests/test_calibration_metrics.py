"Calibration metrics against torchmetrics, relplot, hand computations and a loop reference; edge cases; fastai metrics; report; diagram."
import math
from types import SimpleNamespace

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
import numpy as np
import pytest
import torch, torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
from fastai.torch_core import to_detach

from fastai_regularize.activations import BaseSoftmax, softmax_base
from fastai_regularize.calibration_metrics import (calibration_error, expected_calibration_error, smooth_ece, brier_score,
    calibration_report, ECE, SmoothECE, Brier, plot_reliability)

torch.set_num_threads(1)  # small tensors on a shared 2-core machine: more threads only add contention
relplot = pytest.importorskip('relplot')
tm_cal = pytest.importorskip('torchmetrics.functional.classification')

def _probs(seed, n, c, scale, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = scale*torch.randn(n, c, generator=g, dtype=torch.float64)
    return F.softmax(z, -1).to(dtype),torch.randint(0, c, (n,), generator=g)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ against peer libraries
@FAST
@given(seed=st.integers(0, 10**6), n=st.integers(1, 400), c=st.integers(2, 12), scale=st.floats(0.1, 4.),
       n_bins=st.integers(1, 25), norm=st.sampled_from(['l1', 'l2', 'max']))
def test_matches_torchmetrics(seed, n, c, scale, n_bins, norm):
    "torchmetrics' MulticlassCalibrationError (equal-width bins, no debiasing) on float32 probabilities below 1"
    p,y = _probs(seed, n, c, scale, torch.float32)
    conf = p.max(1).values
    # torchmetrics puts confidence 1.0 in a bin of its own (#3510) and closes bins on the left: stay off both
    edges = torch.linspace(0, 1, n_bins + 1)
    if (conf >= 1).any() or ((conf[:, None] - edges).abs() < 1e-6).any(): return
    ref = tm_cal.multiclass_calibration_error(p, y, num_classes=c, n_bins=n_bins, norm=norm).item()
    assert calibration_error(p, y, n_bins, norm=norm) == pytest.approx(ref, abs=1e-6)

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 3000), c=st.integers(2, 10), scale=st.floats(0.1, 6.))
def test_smooth_ece_matches_relplot(seed, n, c, scale):
    "relplot's smECE (its automatic bandwidth) on the top-label confidence: within 1e-6 (the goal was 1e-3)"
    p,y = _probs(seed, n, c, scale)
    conf,pred = p.max(1)
    ref = relplot.smECE(conf.numpy(), (pred == y).double().numpy())
    assert smooth_ece(p, y) == pytest.approx(ref, abs=1e-6)

def test_smooth_ece_matches_relplot_on_a_model_like_set():
    "Many confidences near 1, a few mistakes: the case where the bandwidth gets small"
    g = torch.Generator().manual_seed(1)
    conf = 1 - torch.rand(5000, generator=g, dtype=torch.float64)**3*0.5
    hit = (torch.rand(5000, generator=g, dtype=torch.float64) < conf - 0.02).double()
    p = torch.stack([conf, 1 - conf], 1)
    y = torch.where(hit.bool(), 0, 1)
    assert smooth_ece(p, y) == pytest.approx(relplot.smECE(conf.numpy(), hit.numpy()), abs=1e-6)

def _adaptive_reference(p, y, n_bins):
    "Equal-mass ECE as torch-uncertainty computes it: sort by confidence, `tensor_split` into `n_bins` runs"
    conf,pred = p.max(1)
    order = torch.argsort(conf)
    total = 0.
    for idx in order.tensor_split(n_bins):
        if len(idx): total += len(idx)/len(p)*abs((pred[idx] == y[idx]).double().mean() - conf[idx].mean()).item()
    return total

@FAST
@given(seed=st.integers(0, 10**6), n=st.integers(1, 300), c=st.integers(2, 8), n_bins=st.integers(1, 20))
def test_adaptive_ece_matches_sort_and_split(seed, n, c, n_bins):
    p,y = _probs(seed, n, c, 2.)
    if len(p.max(1).values.unique()) < n: return                 # ties: checked separately
    assert calibration_error(p, y, n_bins, binning='quantile') == pytest.approx(_adaptive_reference(p, y, n_bins), abs=1e-12)

def _classwise_reference(p, y, n_bins):
    "Classwise ECE by plain loops: per class, equal-width right-closed bins of p[:, c] against [y == c]"
    N,C = p.shape
    total = 0.
    for c in range(C):
        pc,tc = p[:, c].tolist(),(y == c).double().tolist()
        for b in range(n_bins):
            lo,hi = b/n_bins,(b+1)/n_bins
            m = [i for i in range(N) if (lo < pc[i] <= hi) or (b == 0 and pc[i] == 0)]
            if m: total += len(m)/N*abs(sum(tc[i] for i in m)/len(m) - sum(pc[i] for i in m)/len(m))
    return total/C

@FAST
@given(seed=st.integers(0, 10**6), n=st.integers(1, 100), c=st.integers(2, 6), n_bins=st.integers(1, 12))
def test_classwise_matches_loops(seed, n, c, n_bins):
    p,y = _probs(seed, n, c, 3.)
    assert calibration_error(p, y, n_bins, classwise=True) == pytest.approx(_classwise_reference(p, y, n_bins), abs=1e-12)

# ------------------------------------------------------------------ hand-computed
P6 = torch.tensor([[.90, .05, .03, .02], [.10, .80, .05, .05], [.20, .05, .70, .05],
                   [.60, .30, .05, .05], [.30, .50, .10, .10], [.30, .25, .25, .20]], dtype=torch.float64)
Y6 = torch.tensor([0, 1, 0, 1, 1, 2])

def test_quantile_bins_by_hand_uneven():
    "Seven items in three equal-mass bins: sizes 3, 2, 2, as tensor_split deals them"
    conf = torch.tensor([.35, .4, .5, .6, .7, .8, .9], dtype=torch.float64)
    hit = torch.tensor([0, 1, 0, 1, 1, 1, 0])
    p = torch.stack([conf, (1 - conf)/2, (1 - conf)/2], 1)           # class 0 always the top label
    y = torch.where(hit.bool(), 0, 1)
    # {.35 w, .4 r, .5 w}: acc 1/3, conf 1.25/3; {.6 r, .7 r}: 1, .65; {.8 r, .9 w}: .5, .85
    expected = 3/7*abs(1/3 - 1.25/3) + 2/7*abs(1 - .65) + 2/7*abs(.5 - .85)
    assert calibration_error(p, y, 3, binning='quantile') == pytest.approx(expected, abs=1e-12)
    assert calibration_error(p, y, 3, binning='quantile', norm='max') == pytest.approx(.35, abs=1e-12)

def test_classwise_and_brier_by_hand():
    cw = [.1, .175, 5/6*.104 + 1/6*.7, .47/6]   # worked out in the notebook, class by class
    assert calibration_error(P6, Y6, 2, classwise=True) == pytest.approx(sum(cw)/4, abs=1e-12)
    rows = [.1**2 + .05**2 + .03**2 + .02**2, .1**2 + .2**2 + .05**2 + .05**2, .8**2 + .05**2 + .7**2 + .05**2,
            .6**2 + .7**2 + .05**2 + .05**2, .3**2 + .5**2 + .1**2 + .1**2, .3**2 + .25**2 + .75**2 + .2**2]
    assert brier_score(P6, Y6) == pytest.approx(sum(rows)/6, abs=1e-12)
    assert brier_score(P6, F.one_hot(Y6, 4)) == pytest.approx(sum(rows)/6, abs=1e-12)

def test_bins_are_closed_on_the_right():
    "Probabilities exactly on inner edges (multiples of 1/4) belong to the bin below, as the loop reference says"
    p = torch.tensor([[.5, .25, .25], [.25, .75, 0.], [.5, .5, 0.], [1., 0., 0.], [.25, .25, .5], [.75, .25, 0.]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 2, 1])
    for n_bins in (2, 4):
        assert calibration_error(p, y, n_bins, classwise=True) == pytest.approx(_classwise_reference(p, y, n_bins), abs=1e-12)
        assert calibration_error(p, y, n_bins) == pytest.approx(_classwise_reference(p.max(1, keepdim=True).values,
                                                                torch.zeros(6, dtype=torch.long) - (p.argmax(1) != y).long(), n_bins), abs=1e-12)

def test_l2_and_mce_by_hand():
    assert calibration_error(P6, Y6, 3, norm='max') == pytest.approx(.3)
    assert calibration_error(P6, Y6, 3, norm='l2') == pytest.approx(math.sqrt((.3**2 + 2*.05**2 + 3*(.8 - 2/3)**2)/6))

# ------------------------------------------------------------------ edge cases
def test_confidence_exactly_zero_and_one_land_in_the_end_bins():
    "One-hot probabilities: p = 1 in the last bin, p = 0 in the first, whatever the number of bins"
    for n_bins in (1, 2, 15, 100):
        assert calibration_error(torch.eye(3), torch.arange(3), n_bins, classwise=True) == 0.
        assert calibration_error(torch.eye(3), torch.arange(3), n_bins) == 0.
        # confidence 1 and wrong: gap 1 in the last bin (torchmetrics #1646 would drop or misplace it)
        assert calibration_error(torch.tensor([[1., 0.]]), torch.tensor([1]), n_bins) == 1.
        assert calibration_error(torch.tensor([[1., 0.]]), torch.tensor([1]), n_bins, norm='max') == 1.
        assert calibration_error(torch.tensor([[1., 0.]]), torch.tensor([1]), n_bins, classwise=True) == 1.
    # the same set with exact 0s and 1s equals the loop reference that puts 0 in bin 0
    p = torch.tensor([[1., 0., 0.], [0., .5, .5], [.2, .8, 0.], [0., 0., 1.]], dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    assert calibration_error(p, y, 5, classwise=True) == pytest.approx(_classwise_reference(p, y, 5), abs=1e-12)

def test_a_single_class_present():
    p,_ = _probs(3, 50, 4, 2.)
    y = torch.zeros(50, dtype=torch.long)
    rep = calibration_report(p, y)
    assert all(math.isfinite(v) for v in rep.values())
    assert rep['accuracy'] == (p.argmax(1) == 0).double().mean().item()
    assert calibration_error(p, y, 10, classwise=True) == pytest.approx(_classwise_reference(p, y, 10), abs=1e-12)

def test_one_item():
    p,y = torch.tensor([[.7, .2, .1]]),torch.tensor([1])
    assert calibration_error(p, y) == pytest.approx(.7)
    assert calibration_error(p, y, binning='quantile') == pytest.approx(.7)
    assert brier_score(p, y) == pytest.approx(.7**2 + .8**2 + .1**2)
    assert 0 <= smooth_ece(p, y) <= 1
    rep = calibration_report(p, y, bootstrap=20)
    assert rep['n'] == 1 and rep['ece_lo'] == pytest.approx(.7) and rep['ece_hi'] == pytest.approx(.7)

def test_ties_share_a_bin_whatever_the_order():
    "Equal confidences always fall in one equal-mass bin, so shuffling the items changes nothing"
    conf = torch.tensor([.6]*5 + [.8]*3 + [.9]*2, dtype=torch.float64)
    hit = torch.tensor([1, 0, 1, 0, 1, 1, 1, 0, 1, 1])
    p,y = torch.stack([conf, 1 - conf], 1),torch.where(hit.bool(), 0, 1)
    # 3 bins of 4, 3, 3 by rank: the five .6s all go to the first, the .8s to the second, the .9s to the third
    expected = .5*abs(.6 - .6) + .3*abs(2/3 - .8) + .2*abs(1 - .9)
    assert calibration_error(p, y, 3, binning='quantile') == pytest.approx(expected, abs=1e-12)
    for s in range(5):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(s))
        assert calibration_error(p[perm], y[perm], 3, binning='quantile') == pytest.approx(expected, abs=1e-12)
    # all tied: one bin
    assert calibration_error(torch.full((6, 2), .5), torch.tensor([0, 0, 0, 1, 1, 1]), 4, binning='quantile') == pytest.approx(0.)

def test_argmax_ties_take_the_first_class():
    "A tied maximum predicts the first of the tied classes, as `torch.max` and torchmetrics do"
    p = torch.tensor([[.4, .4, .2], [.4, .4, .2]])
    assert calibration_error(p, torch.tensor([0, 0]), 5) == pytest.approx(.6)
    assert calibration_error(p, torch.tensor([1, 1]), 5) == pytest.approx(.4)

# ------------------------------------------------------------------ report
def test_report_equals_the_functions_and_bootstrap_brackets_them():
    p,y = _probs(5, 800, 5, 2.5)
    rep = calibration_report(p, y, n_bins=10, bootstrap=100, seed=3)
    assert rep['ece'] == pytest.approx(calibration_error(p, y, 10))
    assert rep['mce'] == pytest.approx(calibration_error(p, y, 10, norm='max'))
    assert rep['adaptive_ece'] == pytest.approx(calibration_error(p, y, 10, binning='quantile'))
    assert rep['classwise_ece'] == pytest.approx(calibration_error(p, y, 10, classwise=True))
    assert rep['smooth_ece'] == pytest.approx(smooth_ece(p, y))
    assert rep['brier'] == pytest.approx(brier_score(p, y))
    assert rep['nll'] == pytest.approx(F.nll_loss(p.log(), y).item())
    assert rep['accuracy'] == pytest.approx((p.argmax(1) == y).double().mean().item())
    for k in ('accuracy', 'nll', 'brier', 'ece', 'mce', 'adaptive_ece', 'classwise_ece', 'smooth_ece'):
        assert rep[f'{k}_lo'] < rep[f'{k}_hi'], k
    for k in ('accuracy', 'nll', 'brier'): assert rep[f'{k}_lo'] < rep[k] < rep[f'{k}_hi'], k   # (binned ECEs are biased)
    # an independent percentile bootstrap of the accuracy with the same resamples
    g = torch.Generator().manual_seed(3)
    accs = [((p[i].argmax(1) == y[i]).double().mean().item()) for i in (torch.randint(0, 800, (800,), generator=g) for _ in range(100))]
    assert rep['accuracy_lo'] == pytest.approx(np.percentile(accs, 2.5)) and rep['accuracy_hi'] == pytest.approx(np.percentile(accs, 97.5))
    assert calibration_report(p, y, n_bins=10, bootstrap=100, seed=3) == rep
    assert calibration_report(p, y, n_bins=10, bootstrap=100, seed=4) != rep

def test_report_multilabel():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(200, 3, generator=g, dtype=torch.float64)
    t = torch.bernoulli(p, generator=g)
    rep = calibration_report(p, t)
    assert set(rep) == {'n', 'accuracy', 'nll', 'brier', 'classwise_ece'}
    assert rep['nll'] == pytest.approx(F.binary_cross_entropy(p, t).item())
    assert rep['classwise_ece'] == pytest.approx(calibration_error(p, t, classwise=True))
    assert rep['accuracy'] == pytest.approx(((p > .5).double() == t).double().mean().item())

# ------------------------------------------------------------------ fastai metrics
@pytest.mark.parametrize('metric,func', [(ECE(n_bins=10), lambda p, y: calibration_error(p, y, 10)),
                                         (ECE(binning='quantile', norm='max'), lambda p, y: calibration_error(p, y, binning='quantile', norm='max')),
                                         (ECE(classwise=True), lambda p, y: calibration_error(p, y, classwise=True)),
                                         (SmoothECE(), smooth_ece), (Brier(), brier_score)])
def test_metrics_accumulate_and_follow_default_act(metric, func):
    g = torch.Generator().manual_seed(0)
    logits,targs = 3*torch.randn(300, 4, generator=g),torch.randint(0, 4, (300,), generator=g)
    for act,probs in ((None, F.softmax(logits, -1)), (BaseSoftmax(1.5), softmax_base(logits, 1.5))):
        metric.reset()
        for i in range(0, 300, 64):
            learn = SimpleNamespace(pred=logits[i:i+64], y=targs[i:i+64], to_detach=to_detach, loss_func=None)
            if act is not None: learn.default_act = act
            metric.accumulate(learn)
        assert metric.value == pytest.approx(func(probs, targs), abs=1e-6)

def test_metric_uses_the_loss_activation_of_a_sigmoid_learner():
    from fastai.losses import BCEWithLogitsLossFlat
    g = torch.Generator().manual_seed(0)
    logits,t = torch.randn(100, 3, generator=g),(torch.rand(100, 3, generator=g) > .5).float()
    m = ECE(classwise=True)
    m.reset()
    m.accumulate(SimpleNamespace(pred=logits, y=t, to_detach=to_detach, loss_func=BCEWithLogitsLossFlat()))
    assert m.value == pytest.approx(calibration_error(torch.sigmoid(logits), t, classwise=True), abs=1e-6)

# ------------------------------------------------------------------ diagram
def test_reliability_diagram_parts():
    p,y = _probs(1, 600, 4, 3.)
    fig = plot_reliability(p, y, n_bins=8, binning='quantile', bootstrap=30)
    ax,hax = fig.axes
    assert 'adaptive ECE' in ax.get_title() and '[' in ax.get_title()
    counts = [b.get_height() for b in hax.patches]
    assert sum(counts) == 600 and max(counts) - min(counts) <= 1         # equal mass
    widths = [b.get_width() for b in hax.patches]
    assert sum(widths) == pytest.approx(1.)                              # the bars tile [0, 1]
    assert len([b for b in ax.patches if b.get_label() == '95% bootstrap' or b.get_facecolor()[:3] == (0., 0., 0.)]) >= 8
    f2 = plot_reliability(p, y, hist=False)
    assert len(f2.axes) == 1
    t = F.one_hot(y, 4).float()
    f3 = plot_reliability(p, t)                                           # multi-hot: every label pooled
    assert sum(b.get_height() for b in f3.axes[1].patches) == 600*4
    plt.close('all')

BAD = [
    (lambda: calibration_error(P6, Y6, binning='equal'), ValueError, "`binning` must be one of ('uniform', 'quantile'), got 'equal'"),
    (lambda: calibration_error(P6, Y6, norm=1), ValueError, "`norm` must be one of ('l1', 'l2', 'max'), got 1"),
    (lambda: calibration_error(P6, F.one_hot(Y6, 4)), ValueError, 'pass `classwise=True`'),
    (lambda: calibration_error(P6, torch.full((6, 4), .5), classwise=True), ValueError, '`targs` must hold 0 or 1'),
    (lambda: calibration_report(P6, Y6, bootstrap=-1), ValueError, '`bootstrap` must be an int >= 0'),
    (lambda: calibration_report(P6, Y6, seed=1.5), TypeError, '`seed` must be an int'),
    (lambda: smooth_ece(P6, F.one_hot(Y6, 4)), ValueError, '`targs` must be integer class indices'),
    (lambda: brier_score(P6 - 1, Y6), ValueError, '`probs` must be probabilities in [0, 1]'),
    (lambda: plot_reliability(P6, Y6, binning='adaptive'), ValueError, '`binning`'),
    (lambda: ECE(norm='L2'), ValueError, '`norm`'),
]

@pytest.mark.parametrize('call,exc,msg', BAD)
def test_bad_inputs_name_the_argument(call, exc, msg):
    with pytest.raises(exc) as e: call()
    assert msg in str(e.value)
