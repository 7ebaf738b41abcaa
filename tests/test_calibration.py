"Calibration: ECE against hand arithmetic and a loop reference, temperature recovery on synthetic data, Learner integration."
import math, warnings
from types import SimpleNamespace

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
import pytest
import torch, torch.nn as nn, torch.nn.functional as F
from fastai.data.core import Datasets
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat
from fastai.torch_core import to_detach

from fastai_regularize.activations import BaseSoftmax, softmax_base, no_activation
from fastai_regularize.calibration import (expected_calibration_error, ECE, fit_temperature, plot_reliability,
                                           CalibrationResult, cross_fit_temperature)

# Six items, four classes (rows: probabilities; confidence = max, prediction = argmax)
PROBS = torch.tensor([[.90, .05, .03, .02],   # conf .9, pred 0, targ 0: right
                      [.10, .80, .05, .05],   # conf .8, pred 1, targ 1: right
                      [.20, .05, .70, .05],   # conf .7, pred 2, targ 0: wrong
                      [.60, .30, .05, .05],   # conf .6, pred 0, targ 1: wrong
                      [.30, .50, .10, .10],   # conf .5, pred 1, targ 1: right
                      [.30, .25, .25, .20]])  # conf .3, pred 0, targ 2: wrong
TARGS = torch.tensor([0, 1, 0, 1, 1, 2])

def test_ece_hand_computed_three_bins():
    # bins (0,1/3], (1/3,2/3], (2/3,1]
    # (0,1/3]:   item 6        acc 0,   conf .3              -> 1/6 * |0 - .3|    = .05
    # (1/3,2/3]: items 4, 5    acc 1/2, conf (.6+.5)/2 = .55 -> 2/6 * |.5 - .55| = .1/6
    # (2/3,1]:   items 1, 2, 3 acc 2/3, conf (.9+.8+.7)/3=.8 -> 3/6 * |2/3 - .8| = .4/6
    expected = 1/6*0.3 + 2/6*0.05 + 3/6*(0.8 - 2/3)
    assert expected == pytest.approx(2/15)
    assert expected_calibration_error(PROBS, TARGS, n_bins=3) == pytest.approx(expected, abs=1e-7)

def test_ece_hand_computed_two_bins_right_closed():
    # bins (0,.5], (.5,1]: item 5 (conf exactly .5) belongs to the first bin
    # (0,.5]: items 5, 6       acc 1/2, conf (.5+.3)/2 = .4        -> 2/6 * .1  = .2/6
    # (.5,1]: items 1, 2, 3, 4 acc 2/4, conf (.9+.8+.7+.6)/4 = .75 -> 4/6 * .25 = 1/6
    expected = 2/6*0.1 + 4/6*0.25
    assert expected_calibration_error(PROBS, TARGS, n_bins=2) == pytest.approx(expected, abs=1e-7)
    assert isinstance(expected_calibration_error(PROBS, TARGS, n_bins=2), float)

def _ece_loop(probs, targs, n_bins):
    "Reference ECE: one Python loop per bin over plain floats"
    conf = [max(row) for row in probs.tolist()]
    right = [row.index(max(row)) == t for row,t in zip(probs.tolist(), targs.tolist())]
    total = 0.
    for i in range(n_bins):
        lo,hi = i/n_bins,(i+1)/n_bins
        members = [j for j,c in enumerate(conf) if (lo < c <= hi) or (i == 0 and c == 0)]
        if not members: continue
        acc = sum(right[j] for j in members)/len(members)
        mean_conf = sum(conf[j] for j in members)/len(members)
        total += len(members)/len(conf)*abs(acc - mean_conf)
    return total

@pytest.mark.parametrize('n_bins', [1, 2, 7, 15, 100])
@pytest.mark.parametrize('scale', [0.5, 3.])
def test_ece_matches_loop_reference(n_bins, scale):
    g = torch.Generator().manual_seed(n_bins)
    probs = F.softmax(scale*torch.randn(500, 6, generator=g, dtype=torch.float64), -1)
    targs = torch.randint(0, 6, (500,), generator=g)
    assert expected_calibration_error(probs, targs, n_bins) == pytest.approx(_ece_loop(probs, targs, n_bins), abs=1e-12)

def test_ece_metric_accumulates_batches_and_follows_default_act():
    g = torch.Generator().manual_seed(0)
    logits,targs = 3*torch.randn(300, 4, generator=g),torch.randint(0, 4, (300,), generator=g)
    for act,probs in ((None, F.softmax(logits, -1)), (BaseSoftmax(1.5), softmax_base(logits, 1.5))):
        metric = ECE(n_bins=10)
        metric.reset()
        for i in range(0, 300, 64):
            learn = SimpleNamespace(pred=logits[i:i+64], y=targs[i:i+64], to_detach=to_detach)
            if act is not None: learn.default_act = act
            metric.accumulate(learn)
        assert metric.name == 'ece'
        assert metric.value == pytest.approx(_ece_loop(probs, targs, 10), abs=1e-6)

def _calibrated_logits(n=20000, c=5, seed=0):
    "Logits `z` and targets sampled from `softmax(z)`: calibrated by construction"
    g = torch.Generator().manual_seed(seed)
    z = 2*torch.randn(n, c, generator=g)
    return z,torch.multinomial(F.softmax(z, -1), 1, generator=g)[:,0]

def test_fit_temperature_recovers_overconfidence():
    z,y = _calibrated_logits()
    over = 3*z
    T = fit_temperature(over, y)
    assert 1/T == pytest.approx(1/3, rel=0.05)
    assert math.exp(1/T) == pytest.approx(math.exp(1/3), rel=0.05)
    before,after = F.softmax(over, -1),softmax_base(over, math.exp(1/T))
    assert expected_calibration_error(after, y) < expected_calibration_error(before, y)
    assert torch.equal(after.argmax(1), before.argmax(1))

@pytest.mark.parametrize('scale', [0.25, 0.5, 1., 2., 4.])
def test_fit_temperature_minimises_nll_on_a_grid(scale):
    z,y = _calibrated_logits(n=5000, c=4, seed=int(scale*4))
    logits = scale*z
    T = fit_temperature(logits, y)
    assert T == pytest.approx(scale, rel=0.1)  # statistical: the data were made at temperature `scale`
    nll = lambda t: F.cross_entropy(logits.double()/t, y).item()
    grid = torch.logspace(math.log10(T) - 0.3, math.log10(T) + 0.3, 601, dtype=torch.float64).tolist()
    assert nll(T) <= min(nll(t) for t in grid) + 1e-12

def test_fit_temperature_bracket_ends_warn():
    logits = torch.tensor([[5., 0.], [0., 5.]])
    with pytest.warns(UserWarning, match='still falls'): T_sep = fit_temperature(logits, torch.tensor([0, 1]))
    with pytest.warns(UserWarning, match='no better than chance'): T_bad = fit_temperature(logits, torch.tensor([1, 0]))
    assert T_sep == 1. and T_bad > 100    # separable: no minimum, the temperature is left alone
    assert math.isfinite(BaseSoftmax.from_temperature(T_bad).base)

def test_separable_folds_do_not_blow_up_the_out_of_sample_nll():
    "A fold whose complement is all right must not get T -> 0: its own errors would cost an unbounded NLL"
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 4
    z = F.one_hot(y, 4).double()*6 + 0.3*torch.randn(40, 4, generator=g, dtype=torch.float64)
    z[0] = torch.tensor([0., 6., 0., 0.], dtype=torch.float64)        # the one error, confidently wrong
    with pytest.warns(UserWarning, match='every held-out item is classified right'):
        probs, temps, fold = cross_fit_temperature(z, y, n_folds=2, seed=0)
    k = fold[0].item()
    assert temps[k].item() == 1.                                      # fitted without the error (on the other fold): left at 1
    nll_cv = F.nll_loss(probs.log(), y).item()
    # T -> 0 on that fold would cost the error about 500 * 6 / 40 = 75 nats of mean NLL; left at 1, it stays small
    assert nll_cv < 2*F.cross_entropy(z, y).item() < 0.5

BAD = [
    (lambda: expected_calibration_error(PROBS, TARGS, n_bins=0), ValueError, '`n_bins` must be an int >= 1, got 0'),
    (lambda: expected_calibration_error(PROBS, TARGS, n_bins=2.5), TypeError, '`n_bins` must be an int'),
    (lambda: expected_calibration_error(PROBS, TARGS[:4]), ValueError, '`targs` has 4 items but `probs` has 6'),
    (lambda: expected_calibration_error(PROBS[0], TARGS), ValueError, '`probs` must be 2-D'),
    (lambda: expected_calibration_error(PROBS*5, TARGS), ValueError, '`probs` must be probabilities in [0, 1]'),
    (lambda: expected_calibration_error(PROBS, TARGS.float()), ValueError, '`targs` must be integer class indices'),
    (lambda: expected_calibration_error(PROBS, TARGS + 3), ValueError, '`targs` must be class indices in [0, 4)'),
    (lambda: expected_calibration_error('probs', TARGS), TypeError, '`probs` must be a tensor or array'),
    (lambda: fit_temperature(torch.randn(6), TARGS), ValueError, '`logits` must be 2-D'),
    (lambda: fit_temperature(torch.full((6, 4), math.inf), TARGS), ValueError, '`logits` must be finite'),
    (lambda: fit_temperature(torch.randn(5, 4), TARGS), ValueError, '`targs` has 6 items but `logits` has 5'),
    (lambda: ECE(n_bins=0), ValueError, '`n_bins`'),
    (lambda: plot_reliability(PROBS, TARGS, n_bins=-1), ValueError, '`n_bins`'),
]

@pytest.mark.parametrize('call,exc,msg', BAD)
def test_bad_inputs_name_the_argument(call, exc, msg):
    with pytest.raises(exc) as e: call()
    assert msg in str(e.value)

def _overconfident_learner(n_valid=2000, scale=3.):
    "A linear classifier whose weights are `scale` times those of the model the targets were sampled from"
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 3, generator=g)
    n = 400 + n_valid
    xs = torch.randn(n, 4, generator=g)
    ys = torch.multinomial(F.softmax(xs@W, -1), 1, generator=g)[:,0]
    dls = Datasets(range(n), [[xs.__getitem__], [ys.__getitem__]], splits=[range(400), range(400, n)]).dataloaders(bs=500)
    model = nn.Linear(4, 3, bias=False)
    with torch.no_grad(): model.weight.copy_(scale*W.T)
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=[ECE()])

def test_learner_calibrate():
    learn = _overconfident_learner()
    logits,targs = learn.get_preds(act=no_activation)
    res = learn.calibrate()
    assert isinstance(res, CalibrationResult) and 'base=' in repr(res)
    for k in ('base', 'temperature', 'nll_before', 'nll_after', 'ece_before', 'ece_after'): assert isinstance(getattr(res, k), float)
    assert res.base == pytest.approx(math.exp(1/3), rel=0.05)
    assert res.temperature == pytest.approx(1/math.log(res.base))
    assert res.nll_after <= res.nll_before
    assert res.nll_before == pytest.approx(F.cross_entropy(logits, targs).item(), rel=1e-5)
    assert res.nll_after == pytest.approx(F.cross_entropy(logits/res.temperature, targs).item(), rel=1e-5)
    assert res.ece_before == pytest.approx(_ece_loop(F.softmax(logits, -1), targs, 15), abs=1e-6)
    assert res.ece_after == pytest.approx(_ece_loop(F.softmax(logits/res.temperature, -1), targs, 15), abs=1e-6)
    assert res.ece_after < res.ece_before
    probs,_ = learn.get_preds()
    torch.testing.assert_close(probs, softmax_base(logits, res.base))
    assert torch.equal(probs.argmax(1), logits.argmax(1))  # accuracy unchanged
    assert learn.validate()[1] == pytest.approx(res.ece_after, abs=1e-6)  # the metric scores the installed base
    assert learn.calibrate().base == pytest.approx(res.base, rel=1e-9)  # refits on raw logits: no stacking
    learn.reset_calibration()
    assert not hasattr(learn, 'default_act')
    torch.testing.assert_close(learn.get_preds()[0], F.softmax(logits, -1))
    learn.reset_calibration()  # not calibrated: no error

def test_calibrate_ignores_an_installed_default_act():
    learn = _overconfident_learner()
    base = learn.calibrate().base
    learn.default_act = BaseSoftmax(10.)
    assert learn.calibrate().base == pytest.approx(base, rel=1e-9)

def test_calibrate_on_a_given_dl():
    learn = _overconfident_learner()
    res_valid = learn.calibrate()
    res_train = learn.calibrate(dl=learn.dls.train.new(shuffle=False, drop_last=False))
    assert res_train.base == pytest.approx(math.exp(1/3), rel=0.15) and res_train.base != res_valid.base

def test_export_keeps_calibration(tmp_path):
    learn = _overconfident_learner()
    res = learn.calibrate()
    learn.path = tmp_path
    learn.export('calibrated.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = load_learner(tmp_path/'calibrated.pkl')
    assert loaded.default_act.base == res.base
    dl = learn.dls.valid
    torch.testing.assert_close(loaded.get_preds(dl=dl)[0], learn.get_preds(dl=dl)[0])
    torch.testing.assert_close(loaded.get_preds(dl=dl)[0], softmax_base(learn.get_preds(dl=dl, act=no_activation)[0], res.base))

def test_calibrate_refuses_multi_hot_targets_for_a_softmax_loss():
    "A softmax loss with multi-hot targets is neither a single-label nor a sigmoid model: a clear error, nothing installed"
    g = torch.Generator().manual_seed(2)
    xs,ys = torch.randn(64, 4, generator=g),(torch.rand(64, 3, generator=g) > 0.5).float()
    dls = Datasets(range(64), [[xs.__getitem__], [ys.__getitem__]], splits=[range(48), range(48, 64)]).dataloaders(bs=16)
    learn = Learner(dls, nn.Linear(4, 3), loss_func=nn.CrossEntropyLoss())   # takes soft targets
    with pytest.raises(ValueError, match='single-label'): learn.calibrate()
    assert not hasattr(learn, 'default_act')

def test_calibrate_needs_held_out_data():
    xs,ys = torch.randn(32, 4),torch.randint(0, 3, (32,))
    dls = Datasets(range(32), [[xs.__getitem__], [ys.__getitem__]], splits=[range(32), []]).dataloaders(bs=16)
    learn = Learner(dls, nn.Linear(4, 3), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match='no validation set'): learn.calibrate()

def test_plots_return_figures():
    z,y = _calibrated_logits(n=2000)
    fig = plot_reliability(F.softmax(3*z, -1), y, n_bins=10, title='over-confident')
    assert isinstance(fig, Figure) and 'ECE' in fig.axes[0].get_title()
    f2,ax = plt.subplots()
    assert plot_reliability(F.softmax(z, -1), y, ax=ax) is f2
    learn = _overconfident_learner(n_valid=500)
    learn.calibrate()
    f3,f4 = learn.show_reliability(),learn.show_reliability(calibrated=False, n_bins=5)
    assert isinstance(f3, Figure) and isinstance(f4, Figure)
    assert f'base {learn.default_act.base:.4g}' in f3.axes[0].get_title() and 'softmax' in f4.axes[0].get_title()
    plt.close('all')


@pytest.mark.parametrize('n_folds', [2, 3, 5])
def test_cross_fit_temperature_fits_each_fold_on_its_complement(n_folds):
    g = torch.Generator().manual_seed(3)
    z = 2*torch.randn(600, 4, generator=g, dtype=torch.float64)
    y = torch.multinomial(F.softmax(z, -1), 1, generator=g)[:, 0]
    z = z*torch.linspace(0.5, 4, 600, dtype=torch.float64)[:, None]   # over-confident, more so later in the list
    probs, temps, fold = cross_fit_temperature(z, y, n_folds=n_folds, seed=7)
    assert fold.shape == (600,) and set(fold.tolist()) == set(range(n_folds)) and temps.shape == (n_folds,)
    sizes = torch.bincount(fold)
    assert sizes.max() - sizes.min() <= y.bincount().numel()          # near-equal folds
    for k in range(n_folds):
        rest = fold != k
        assert temps[k].item() == pytest.approx(fit_temperature(z[rest], y[rest]), rel=1e-10)
        # each item scaled by the temperature that never saw it: softmax(z / T_k), by hand
        ez = torch.exp(z[~rest]/temps[k] - (z[~rest]/temps[k]).max(1, keepdim=True).values)
        torch.testing.assert_close(probs[~rest], ez/ez.sum(1, keepdim=True), rtol=1e-12, atol=1e-15)
    assert torch.equal(cross_fit_temperature(z, y, n_folds=n_folds, seed=7)[2], fold)

def test_cross_fit_temperature_bad_arguments():
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match='`n_folds` must be at most the number of items'): cross_fit_temperature(z, y, n_folds=5)
    with pytest.raises(ValueError, match='`n_folds` must be an int >= 2'): cross_fit_temperature(z, y, n_folds=1)
    with pytest.raises(TypeError, match='`seed` must be an int'): cross_fit_temperature(z, y, seed=0.5)
    with pytest.raises(ValueError, match='`logits` must be 2-D'): cross_fit_temperature(z[0], y)


# ====================================================================== scalers (issue 12)
import subprocess, sys, os, textwrap
from pathlib import Path
from hypothesis import given, settings, strategies as st
from fastai_regularize.calibration import (fit_scaler, cross_fit_scaler, VectorScaling, MatrixScaling, DirichletCalibration,
                                           SigmoidScaling, SCALERS, SIGMOID_SCALERS, DIRICHLET_REGS)
from fastai_regularize.calibration_metrics import calibration_error, brier_score
from fastai_regularize.losses import LabelSmoothingBCEWithLogitsLossFlat

torch.set_num_threads(1)  # small tensors on a shared 2-core machine: more threads only add contention
ROOT = Path(__file__).resolve().parents[1]

def _truth(n, c, seed):
    "Logits `z` in float64 and targets drawn from `softmax(z)`"
    g = torch.Generator().manual_seed(seed)
    z = 2*torch.randn(n, c, generator=g, dtype=torch.float64)
    return z,torch.multinomial(F.softmax(z, -1), 1, generator=g)[:, 0],g

def _distortions(c, g):
    "Miscalibration each method can represent (and the simpler ones cannot)"
    s,b = torch.linspace(0.5, 3, c, dtype=torch.float64),torch.linspace(-1, 1, c, dtype=torch.float64)
    R = 0.4*torch.randn(c, c, generator=g, dtype=torch.float64)
    A = torch.eye(c, dtype=torch.float64) + R
    A0 = torch.eye(c, dtype=torch.float64) + R - R.mean(1, keepdim=True)   # rows summing to 1: W log q undoes it exactly
    return {'temperature': lambda z: 3*z,
            'vector': lambda z: z*s + b,
            'matrix': lambda z: z @ A.T + b,
            'dirichlet': lambda z: F.log_softmax(z, -1) @ A0.T + b}

@pytest.mark.parametrize('method', SCALERS)
def test_each_scaler_lowers_held_out_nll_on_what_it_can_represent(method):
    "Fitted on one half, scored on the other: the map gets close to the true logits' NLL, and beats the simpler maps"
    z,y,g = _truth(8000, 4, seed=SCALERS.index(method))
    zd = _distortions(4, g)[method](z)
    fit,test = slice(0, 4000),slice(4000, None)
    m = fit_scaler(zd[fit], y[fit], method)
    nll = lambda p: F.nll_loss(p.clamp_min(1e-300).log(), y[test]).item()
    before,after,truth = F.cross_entropy(zd[test], y[test]).item(),nll(m(zd[test])),F.cross_entropy(z[test], y[test]).item()
    assert after < before - 0.02 and after < truth + 0.01, (before, after, truth)
    simpler = SCALERS[:SCALERS.index(method)]
    if method == 'dirichlet': simpler = ('temperature', 'vector')   # matrix scaling is as rich, on other features
    for s in simpler: assert after < nll(fit_scaler(zd[fit], y[fit], s)(zd[test])) - 0.005, s

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 300), c=st.integers(2, 8), scale=st.floats(0.05, 20.))
def test_temperature_keeps_the_argmax(seed, n, c, scale):
    g = torch.Generator().manual_seed(seed)
    z,y = scale*torch.randn(n, c, generator=g),torch.randint(0, c, (n,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        act = fit_scaler(z, y)
        probs,_,_ = cross_fit_scaler(z, y, n_folds=2)
    assert isinstance(act, BaseSoftmax)
    assert torch.equal(act(z).argmax(1), z.argmax(1)) and torch.equal(probs.argmax(1), z.argmax(1))

def _linear_learner(scales=None, bias=None, n_valid=3000, seed=1, loss_func=None, multilabel=False, n_out=3):
    "A linear model whose logits are the true ones times `scales` plus `bias`; targets drawn from the truth"
    g = torch.Generator().manual_seed(seed)
    W = 1.5*torch.randn(4, n_out, generator=g)
    n = 400 + n_valid
    xs = torch.randn(n, 4, generator=g)
    ys = (torch.bernoulli(torch.sigmoid(xs@W), generator=g) if multilabel
          else torch.multinomial(F.softmax(xs@W, -1), 1, generator=g)[:,0])
    dls = Datasets(range(n), [[xs.__getitem__], [ys.__getitem__]], splits=[range(400), range(400, n)]).dataloaders(bs=1000)
    model = nn.Linear(4, n_out)
    with torch.no_grad():
        model.weight.copy_((W*(1 if scales is None else torch.tensor(scales))).T)
        model.bias.copy_(torch.zeros(n_out) if bias is None else torch.tensor(bias))
    lf = loss_func or (BCEWithLogitsLossFlat() if multilabel else CrossEntropyLossFlat())
    return Learner(dls, model, loss_func=lf, metrics=[ECE(classwise=multilabel)])

@pytest.mark.parametrize('scales,bias', [(3., None), ([0.5, 1., 3.], [1., 0., -1.])], ids=['temperature-like', 'vector-like'])
def test_auto_picks_the_lowest_cross_fitted_nll(scales, bias):
    learn = _linear_learner(scales, bias, n_valid=2000)
    logits,targs = learn.get_preds(act=no_activation)
    ref = {m: F.nll_loss(cross_fit_scaler(logits, targs, m, n_folds=3, seed=5)[0].log(), targs).item() for m in SCALERS}
    res = learn.calibrate('auto', n_folds=3, seed=5)
    assert res.method == min(ref, key=ref.get)
    assert res.cv_nll == pytest.approx(ref, abs=1e-9)
    assert type(learn.default_act) is {'temperature': BaseSoftmax, 'vector': VectorScaling, 'matrix': MatrixScaling,
                                       'dirichlet': DirichletCalibration}[res.method]
    if bias is not None: assert res.method != 'temperature'
    # the out-of-sample numbers of 'auto' choose the method inside each fold: not the winner's own cross-fitted NLL
    assert res.nll_after_cv >= min(ref.values()) - 0.01 and res.nll_after_cv < res.nll_before

@pytest.mark.parametrize('method', ['vector', 'matrix', 'dirichlet'])
def test_calibrate_installs_each_scaler(method):
    learn = _linear_learner([0.5, 1., 3.], [1., 0., -1.], n_valid=1500)
    logits,targs = learn.get_preds(act=no_activation)
    res = learn.calibrate(method)
    act = learn.default_act
    assert res.method == method and res.act is act and math.isnan(res.base) and math.isnan(res.temperature)
    torch.testing.assert_close(learn.get_preds()[0], act(logits))
    p = act(logits.double())
    assert res.nll_after == pytest.approx(F.nll_loss(p.log(), targs).item(), rel=1e-6)
    assert res.ece_after == pytest.approx(calibration_error(p, targs), abs=1e-6)
    assert res.brier_after == pytest.approx(brier_score(p, targs), abs=1e-6)
    assert res.error_after == pytest.approx((p.argmax(1) != targs).double().mean().item())
    assert res.error_before == pytest.approx((logits.argmax(1) != targs).double().mean().item())
    assert res.nll_after < res.nll_before and res.nll_after_cv < res.nll_before
    assert learn.validate()[1] == pytest.approx(res.ece_after, abs=1e-5)     # the ECE metric follows the module
    assert (res.reg in DIRICHLET_REGS) if method == 'dirichlet' else res.reg is None
    assert f"method={method!r}" in repr(res)
    # the out-of-sample numbers are those of cross_fit_scaler with the same folds
    p_cv = cross_fit_scaler(logits, targs, method)[0]
    assert res.nll_after_cv == pytest.approx(F.nll_loss(p_cv.log(), targs).item(), rel=1e-9)
    learn.reset_calibration()
    torch.testing.assert_close(learn.get_preds()[0], F.softmax(logits, -1))

def test_dirichlet_reg_is_the_cross_fitted_best_of_the_grid():
    z,y,g = _truth(1500, 4, seed=9)
    zd = _distortions(4, g)['dirichlet'](z)
    from fastai_regularize.calibration import _folds, _fit_dirichlet_at
    fold = _folds(y, 2, 0)
    nll = {}
    for r in DIRICHLET_REGS:                                     # cold starts: the warm-started search must agree
        tot = 0.
        for k in range(2):
            m = _fit_dirichlet_at(zd[fold != k], y[fold != k], r)
            tot += F.cross_entropy(m.calibrated_logits(zd[fold == k]), y[fold == k], reduction='sum').item()
        nll[r] = tot
    assert fit_scaler(zd, y, 'dirichlet').reg == min(nll, key=nll.get)
    assert fit_scaler(zd, y, 'dirichlet', reg=0.5).reg == 0.5

@pytest.mark.parametrize('lf', [BCEWithLogitsLossFlat, LabelSmoothingBCEWithLogitsLossFlat], ids=['BCE', 'LS-BCE'])
def test_multilabel_temperatures_recovered(lf):
    "Per-label logits off by temperatures 0.5, 2 and 4: found within 5%, installed as calibrated sigmoids"
    T = [0.5, 2., 4.]
    learn = _linear_learner(T, multilabel=True, n_valid=40000, loss_func=lf())
    thresh = learn.loss_func.thresh
    logits,targs = learn.get_preds(act=no_activation)
    res = learn.calibrate()
    assert res.multilabel and res.method == 'temperature' and isinstance(learn.default_act, SigmoidScaling)
    assert (res.temperatures/torch.tensor(T, dtype=torch.float64) - 1).abs().max() < 0.05, res.temperatures
    probs,_,dec = learn.get_preds(with_decoded=True)
    torch.testing.assert_close(probs, torch.sigmoid(logits/res.temperatures.float()))
    assert learn.loss_func.thresh == thresh and torch.equal(dec, probs > thresh)   # decodes: same threshold
    assert torch.equal(dec, torch.sigmoid(logits) > thresh)                      # a temperature moves no decision
    assert res.ece_after < res.ece_before and res.brier_after < res.brier_before and res.nll_after < res.nll_before
    assert res.ece_before == pytest.approx(calibration_error(torch.sigmoid(logits), targs, classwise=True), abs=1e-6)
    assert res.error_after == res.error_before
    assert learn.validate()[1] == pytest.approx(res.ece_after, abs=1e-5)

def test_multilabel_predict_returns_calibrated_sigmoids():
    "`predict` on one item goes through the installed per-label temperatures; its decision keeps the loss's threshold"
    learn = _linear_learner([0.5, 2., 4.], multilabel=True, n_valid=4000)
    res = learn.calibrate()
    logits,_ = learn.get_preds(act=no_activation)
    _,dec,probs = learn.predict(400)  # the first validation item
    torch.testing.assert_close(probs, torch.sigmoid(logits[0]/res.temperatures.float()))
    assert torch.equal(dec, probs > learn.loss_func.thresh)
    assert not torch.allclose(probs, torch.sigmoid(logits[0]), atol=1e-3)  # the temperatures did change them

def test_multilabel_platt_recovers_scale_and_bias():
    learn = _linear_learner([0.5, 2., 1.], [1., -1., 0.5], multilabel=True, n_valid=20000)
    res = learn.calibrate('platt')
    act = learn.default_act
    # calibrated logits a*z + b equal the truth: a = 1/scale, b = -bias/scale
    torch.testing.assert_close(act.weight, torch.tensor([2., 0.5, 1.], dtype=torch.float64), rtol=0.06, atol=0.)
    torch.testing.assert_close(act.bias, torch.tensor([-2., 0.5, -0.5], dtype=torch.float64), rtol=0., atol=0.12)
    assert res.method == 'platt' and res.nll_after < res.nll_before and res.error_after <= res.error_before
    auto = learn.calibrate('auto')
    assert auto.method == 'platt' and set(auto.cv_nll) == set(SIGMOID_SCALERS)

def test_binary_classifier_with_one_sigmoid_output():
    learn = _linear_learner([3.], multilabel=True, n_out=1, n_valid=5000)
    res = learn.calibrate()
    assert res.temperatures.shape == (1,) and res.temperatures[0] == pytest.approx(3., rel=0.1)
    assert learn.get_preds()[0].shape == learn.get_preds(act=no_activation)[0].shape

def test_scalers_refuse_probabilities_and_unfit_targets():
    z,y,_ = _truth(100, 3, seed=0)
    for m in SCALERS + ('auto',):
        with pytest.raises(ValueError, match='look like probabilities'): fit_scaler(F.softmax(z, -1), y, m)
    with pytest.raises(ValueError, match='look like probabilities'): cross_fit_scaler(F.softmax(z, -1), y, 'vector')
    with pytest.raises(ValueError, match='look like probabilities'): fit_temperature(F.softmax(z, -1), y)
    with pytest.raises(ValueError, match='sigmoid probabilities'): fit_scaler(torch.sigmoid(z), (z > 0).float(), multilabel=True)
    with pytest.raises(ValueError, match='class indices in \\[0, 3\\)'): fit_scaler(z, y + 3, 'vector')
    with pytest.raises(ValueError, match='must be integer class indices'): fit_scaler(z, F.one_hot(y).float(), 'matrix')
    with pytest.raises(ValueError, match="`method` must be one of \\('temperature', 'platt', 'auto'\\)"):
        fit_scaler(z, (z > 0).float(), 'vector', multilabel=True)
    with pytest.raises(ValueError, match='`reg` must be'): fit_scaler(z, y, 'dirichlet', reg=-1.)
    # a model whose outputs are already probabilities: calibrate says so and installs nothing
    learn = _linear_learner(n_valid=200)
    learn.model = nn.Sequential(learn.model, nn.Softmax(-1))
    with pytest.raises(ValueError, match='look like probabilities'): learn.calibrate('vector')
    assert not hasattr(learn, 'default_act')

def test_calibrate_bad_arguments():
    learn = _linear_learner(n_valid=200)
    with pytest.raises(TypeError, match='pass a DataLoader as `dl=`'): learn.calibrate(learn.dls.valid)
    with pytest.raises(ValueError, match="got 'platt'"): learn.calibrate('platt')
    with pytest.raises(ValueError, match='`n_folds` must be an int >= 2'): learn.calibrate('auto', n_folds=1)

def test_scalers_with_a_single_class_present():
    "Every held-out item of one class: the maps drive that class up, stay finite and keep it the prediction"
    z,_,_ = _truth(200, 3, seed=4)
    y = torch.zeros(200, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for m in SCALERS:
            p = fit_scaler(z, y, m)(z)
            assert torch.isfinite(p).all() and (p.argmax(1) == 0).float().mean() >= (z.argmax(1) == 0).float().mean(), m

_CHILD = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    from fastai.learner import load_learner
    import fastai_regularize.all  # noqa: F401
    out = Path(sys.argv[1])
    res = {}
    for f in sorted(out.glob('*.pkl')):
        learn = load_learner(f)
        res[f.stem] = (type(learn.default_act).__name__, learn.get_preds(dl=learn.dls.test_dl(torch.load(out/'x.pt'))))
    torch.save(res, out/'child.pt')
''')

def test_export_load_in_a_fresh_process_keeps_every_scaler(tmp_path):
    xs = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    torch.save(xs, tmp_path/'x.pt')
    ref = {}
    for name,method,ml in (('vector', 'vector', False), ('matrix', 'matrix', False), ('dirichlet', 'dirichlet', False),
                           ('temperature', 'temperature', False), ('sigmoid', 'platt', True)):
        learn = _linear_learner([0.5, 1., 3.], [1., 0., -1.], n_valid=600, multilabel=ml)
        learn.calibrate(method)
        learn.path = tmp_path
        learn.export(f'{name}.pkl')
        ref[name] = (type(learn.default_act).__name__, learn.get_preds(dl=learn.dls.test_dl(xs))[0])
        plain = learn.get_preds(dl=learn.dls.test_dl(xs), act=learn.loss_func.activation)[0]
        assert not torch.allclose(ref[name][1], plain, atol=1e-3)   # so a lost calibration would show
    (tmp_path/'child.py').write_text(_CHILD)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(tmp_path/'child.py'), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    got = torch.load(tmp_path/'child.pt', weights_only=False)
    assert set(got) == set(ref)
    for k,(kind,preds) in ref.items():
        assert got[k][0] == kind
        torch.testing.assert_close(got[k][1][0], preds)

def test_a_separable_held_out_set_warns():
    "Every item right with a margin: vector scaling's NLL keeps falling as its parameters grow; the user is told"
    z,_,_ = _truth(300, 3, seed=6)
    y = z.argmax(1)
    z = z + 3*F.one_hot(y, 3)                                      # a clear margin: separable by a larger scale
    with pytest.warns(UserWarning, match='nearly\\) separable'): fit_scaler(z, y, 'vector')
    z2,y2,_ = _truth(3000, 3, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter('error')                             # an ordinary set fits without a word
        fit_scaler(3*z2, y2, 'vector'); fit_scaler(3*z2, y2, 'matrix'); fit_scaler(3*z2, y2, 'dirichlet')

def test_dirichlet_minimises_the_odir_objective():
    "At a fixed strength, our Newton fit reaches the minimum of ODIR's objective as written in Kull et al., found by L-BFGS"
    z,y,g = _truth(1000, 4, seed=11)
    zd = _distortions(4, g)['dirichlet'](z)
    lp,C,lam = F.log_softmax(zd, -1),4,1.
    off = 1 - torch.eye(C, dtype=torch.float64)
    objective = lambda W, b: (F.cross_entropy(lp @ W.T + b, y) + lam/(C*(C - 1))*((W*off)**2).sum() + lam/C*(b**2).sum())
    W,b = torch.eye(C, dtype=torch.float64, requires_grad=True),torch.zeros(C, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=2000, tolerance_grad=1e-11, tolerance_change=1e-15, line_search_fn='strong_wolfe')
    def closure():
        opt.zero_grad(); l = objective(W, b); l.backward(); return l
    opt.step(closure)
    m = fit_scaler(zd, y, 'dirichlet', reg=lam)
    assert objective(m.weight, m.bias).item() == pytest.approx(objective(W, b).item(), abs=1e-9)
    torch.testing.assert_close(m.weight, W.detach(), atol=1e-4, rtol=0)

def test_calibratability_script(tmp_path):
    "The benchmark reads saved predictions, scores every method out of sample, and pairs each config with the baseline"
    import importlib.util, csv
    spec = importlib.util.spec_from_file_location('calibratability', ROOT/'benchmarks'/'calibratability.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    (tmp_path/'preds').mkdir()
    z,y,_ = _truth(300, 3, seed=0)
    for seed in range(3):
        noise = 0.3*torch.randn(300, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for config,scale in (('baseline', 2.), ('mixup', 0.5)):
            torch.save({'logits': (scale*z + noise).float(), 'targs': y}, tmp_path/'preds'/f'{config}__s{seed}.pt')
    mod.main([str(tmp_path/'preds'), '--name', 't', '--methods', 'temperature', '--out', str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path/'calibratability-t.csv')))
    assert len(rows) == 2*3*2 and {r['method'] for r in rows} == {'before', 'temperature'}
    r0 = next(r for r in rows if (r['config'], r['seed'], r['method']) == ('mixup', '1', 'temperature'))
    d = torch.load(tmp_path/'preds'/'mixup__s1.pt')
    p = cross_fit_scaler(d['logits'], d['targs'], 'temperature')[0]
    assert float(r0['nll']) == pytest.approx(F.nll_loss(p.log(), d['targs']).item(), rel=1e-5)
    assert float(r0['ece']) == pytest.approx(calibration_error(p, d['targs']), rel=1e-5)
    summ = {(s['config'], s['method'], s['metric']): s for s in csv.DictReader(open(tmp_path/'calibratability-t-summary.csv'))}
    get = lambda c, s, k: float(next(r[k] for r in rows if (r['config'], r['seed'], r['method']) == (c, str(s), 'before')))
    diffs = [get('mixup', s, 'nll') - get('baseline', s, 'nll') for s in range(3)]
    m = sum(diffs)/3
    h = 4.302653*math.sqrt(sum((x - m)**2 for x in diffs)/2)/math.sqrt(3)   # t(0.975, 2 d.f.)
    s = summ[('mixup', 'before', 'nll')]
    assert float(s['diff']) == pytest.approx(m, rel=1e-6) and float(s['diff_hi']) - float(s['diff']) == pytest.approx(h, rel=1e-5)
    assert '## Methods × metrics' in (tmp_path/'calibratability-t.md').read_text()
    n = len(rows)   # a second run resumes: nothing is scored again
    mod.main([str(tmp_path/'preds'), '--name', 't', '--methods', 'temperature', '--out', str(tmp_path)])
    assert len(list(csv.DictReader(open(tmp_path/'calibratability-t.csv')))) == n


@pytest.mark.slow
def test_tabular_learner_targets_of_shape_n_by_1():
    "fastai's tabular DataLoaders give (N, 1) class indices: calibrate, show_reliability and the metrics take them"
    from fastai.tabular.learner import tabular_learner
    from fastai_regularize.calibration_metrics import Brier, ECE as ECEMetric
    from fastai_regularize.data import digits_tabular_dls
    torch.manual_seed(0)
    dls = digits_tabular_dls(bs=128)
    learn = tabular_learner(dls, layers=[32], metrics=[ECEMetric(), Brier()])
    learn.fit(1, 1e-2)
    logits, targs = learn.get_preds(act=no_activation)
    assert targs.shape == (len(dls.valid_ds), 1)
    y = targs[:, 0].long()
    res = learn.calibrate()
    assert res.temperature == pytest.approx(fit_temperature(logits, y), rel=1e-9)
    assert res.nll_before == pytest.approx(F.cross_entropy(logits.double(), y).item(), rel=1e-9)
    ece, brier = learn.validate()[1:]
    probs = softmax_base(logits, res.base)
    assert ece == pytest.approx(expected_calibration_error(probs, y), abs=1e-6)
    assert brier == pytest.approx(((probs.double() - F.one_hot(y, 10))**2).sum(1).mean().item(), abs=1e-6)
    assert isinstance(learn.show_reliability(), Figure)
    plt.close('all')
