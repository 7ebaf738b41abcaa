"""Calibration that follows TTA, and per-pixel (segmentation) calibration: every number against `combine_tta` applied by
hand to the passes (fastai's own combination), brute-force grids, known temperatures, and learners that augment."""
import math, os, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch, torch.nn as nn, torch.nn.functional as F
from fastai.data.core import Datasets
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat
from fastai.torch_core import set_seed
from fastai.vision.augment import Flip

from fastai_regularize.activations import BaseSoftmax, no_activation, tta_logits, combine_tta
from fastai_regularize.calibration import (fit_temperature, fit_scaler, cross_fit_scaler, fit_tta_scaler, cross_fit_tta_scaler,
                                           ClassAxis, SigmoidScaling, SCALERS, _min_beta, _BETA_LO, _BETA_HI)
from fastai_regularize.calibration_metrics import calibration_error
from fastai_regularize.data import tensor_image_dls
from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat

torch.set_num_threads(1)  # small tensors on a shared 2-core machine: more threads only add contention
ROOT = Path(__file__).resolve().parents[1]


def _passes(n_items, c=4, seed=0, scale=3., noise=0.8, beta=0.25):
    "Passes (5, N, C) whose TTA combination (`combine_tta`, `beta`) of `softmax(passes/scale)` the targets are drawn from"
    g = torch.Generator().manual_seed(seed)
    u = 2*torch.randn(n_items, c, generator=g, dtype=torch.float64)
    P = u + noise*torch.randn(5, n_items, c, generator=g, dtype=torch.float64)
    P[-1] = u
    y = torch.multinomial(combine_tta(F.softmax(P, -1), beta), 1, generator=g)[:, 0]
    return scale*P,y


def _tta_nll(act, P, y, beta=0.25):
    "NLL of TTA's output as `tta` makes it: `act` on every pass, `combine_tta` (the reference the fits are judged by)"
    return F.nll_loss(combine_tta(torch.stack([act(p) for p in P]), beta).log(), y).item()


@pytest.mark.parametrize('method', SCALERS)
def test_tta_fit_is_not_worse_in_sample_than_the_single_pass_map(method):
    P,y = _passes(1500, seed=SCALERS.index(method))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        m,m1 = fit_tta_scaler(P, y, method),fit_scaler(P[-1], y, method)
    assert type(m) is type(m1)
    assert _tta_nll(m, P, y) < _tta_nll(m1, P, y) - 5e-4   # the plain pass's map is not the optimum for TTA's average


def test_tta_temperature_is_the_minimum_of_a_brute_force_grid():
    "The fitted temperature's TTA NLL is the lowest of 1500 temperatures across the bracket, computed by `combine_tta`"
    P,y = _passes(1000, seed=3)
    m = fit_tta_scaler(P, y)
    grid = torch.logspace(math.log10(_BETA_LO), math.log10(_BETA_HI), 1500, dtype=torch.float64)
    nll = torch.tensor([_tta_nll(lambda z: F.softmax(b*z, -1), P, y) for b in grid], dtype=torch.float64)
    best = grid[nll.argmin()].item()
    assert _tta_nll(m, P, y) <= nll.min().item() + 1e-12
    assert math.log(m.base) == pytest.approx(best, rel=0.01)  # the grid's spacing is 0.9%


def test_min_beta_finds_the_global_minimum_of_two():
    "An NLL with a local minimum near b = 0.05 and the global one near b = 50: Newton from b = 1 would stop at the first"
    x1,x2,eps = math.log(0.05),math.log(50.),0.05
    F_ = lambda x: ((x - x1)*(x - x2))**2 + eps*(x2 - x)*(x - x1)**2
    def fgh(b):
        x = torch.tensor(math.log(b), dtype=torch.float64, requires_grad=True)
        f = F_(x)
        d1, = torch.autograd.grad(f, x, create_graph=True)
        d2, = torch.autograd.grad(d1, x)
        return f.item(),d1.item()/b,(d2.item() - d1.item())/b**2
    xs = torch.linspace(math.log(_BETA_LO), math.log(_BETA_HI), 200001, dtype=torch.float64)
    fx = F_(xs)
    best = math.exp(xs[fx.argmin()].item())                         # brute force
    local = math.exp(xs[(xs < 0) & (fx == fx[xs < 0].min())].item())  # the other minimum
    assert best > 40 and local < 0.1 and fgh(local)[0] > fgh(best)[0]
    assert _min_beta(fgh) == pytest.approx(best, rel=1e-4)


def test_tta_temperature_recovered_and_the_single_pass_one_is_not():
    P,y = _passes(8000, c=5, seed=1)
    m = fit_tta_scaler(P, y)
    assert m.temperature == pytest.approx(3., rel=0.05)
    assert fit_temperature(P[-1], y) > 3.25              # fitted for one softmax, not for TTA's softer average
    p_cv,maps,fold = cross_fit_tta_scaler(P, y)
    p_cv1,maps1,_ = cross_fit_tta_scaler(P, y, single_pass=True)
    for k in range(2):
        assert maps1[k].temperature == pytest.approx(fit_temperature(P[-1][fold != k], y[fold != k]), rel=1e-9)
        ref = combine_tta(torch.stack([maps1[k](p) for p in P[:, fold == k]]))
        torch.testing.assert_close(p_cv1[fold == k], ref, rtol=0, atol=1e-12)
    assert F.nll_loss(p_cv.log(), y) < F.nll_loss(p_cv1.log(), y)


@pytest.mark.parametrize('beta', [0., 0.5, 1.])
def test_tta_temperature_other_betas(beta):
    P,y = _passes(6000, seed=2, beta=beta)
    m = fit_tta_scaler(P, y, beta=beta)
    assert m.temperature == pytest.approx(3., rel=0.06)
    if beta == 1.: assert m.temperature == pytest.approx(fit_temperature(P[-1], y), rel=1e-9)   # the plain pass alone
    if beta == 0.: assert m.temperature == pytest.approx(fit_tta_scaler(P[:-1], y, beta=0.).temperature, rel=0.1)


def test_tta_sigmoid_temperatures_recovered():
    "Multi-label: targets drawn from TTA's average of sigmoids; each label's temperature (0.5, 2, 4) found for the average"
    g = torch.Generator().manual_seed(5)
    u = 2*torch.randn(8000, 3, generator=g, dtype=torch.float64)
    P = u + 0.7*torch.randn(5, 8000, 3, generator=g, dtype=torch.float64)
    P[-1] = u
    t = torch.bernoulli(combine_tta(torch.sigmoid(P)), generator=g)
    T = torch.tensor([0.5, 2., 4.], dtype=torch.float64)
    m = fit_tta_scaler(P*T, t, multilabel=True)
    assert isinstance(m, SigmoidScaling)
    torch.testing.assert_close(m.temperatures, T, rtol=0.08, atol=0)
    p = fit_tta_scaler(P*T, t, 'platt', multilabel=True)
    nll = lambda act: F.binary_cross_entropy(combine_tta(torch.stack([act(q) for q in P*T])), t).item()
    assert nll(p) <= nll(fit_scaler((P*T)[-1], t, 'platt', multilabel=True)) + 1e-12


BAD = [(dict(beta=None), ValueError, '`beta` is None'), (dict(beta=-0.1), ValueError, '`beta` must be in [0, 1]'),
       (dict(method='platt'), ValueError, '`method` must be one of'), (dict(n_folds=1), ValueError, '`n_folds` must be an int >= 2')]

@pytest.mark.parametrize('kw,exc,msg', BAD)
def test_tta_scaler_bad_arguments(kw, exc, msg):
    P,y = _passes(50)
    with pytest.raises(exc) as e: cross_fit_tta_scaler(P, y, **kw)
    assert msg in str(e.value) and '\n' not in str(e.value)


def test_tta_scaler_bad_passes():
    P,y = _passes(50)
    for bad,msg in ((P[0], '`passes` must be 3-D'), (P[:1], 'n >= 1 augmented passes'), (F.softmax(P, -1), 'look like probabilities'),
                    (P[:, :40], '`targs` has 50 items but `logits` has 40')):
        with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace('[', r'\[')): fit_tta_scaler(bad, y)


from conftest import flip_learner as _flip_learner


@pytest.mark.parametrize('method', ['temperature', 'vector'])
def test_calibrate_tta_installs_what_tta_returns(method):
    learn = _flip_learner()
    learn.calibrate()                                              # a single-pass map first: the TTA fit must leave it alone
    single = learn.default_act
    probs_before = learn.get_preds()[0]
    res = learn.calibrate(method, tta=True, seed=3)
    assert learn.default_act is single
    assert torch.equal(learn.get_preds()[0], probs_before)
    assert learn.tta_params == {'n': 4, 'beta': 0.25} and res.tta == learn.tta_params and res.act is learn.tta_act
    P,y = tta_logits(learn, seed=3)
    assert P.shape == (5, 400, 3) and not torch.equal(P[0], P[-1])
    set_seed(3, reproducible=True)
    got = learn.tta()[0]
    assert torch.equal(got, combine_tta(torch.stack([learn.tta_act(p) for p in P])))       # exactly the map's combination
    # every number of the result, against combine_tta by hand
    y = y.long()
    assert res.nll_before == pytest.approx(_tta_nll(lambda z: F.softmax(z.double(), -1), P, y), rel=1e-9)
    assert res.nll_after == pytest.approx(_tta_nll(lambda z: learn.tta_act(z.double()), P, y), rel=1e-9)
    q = combine_tta(torch.stack([learn.tta_act(p.double()) for p in P]))
    assert res.ece_after == pytest.approx(calibration_error(q, y), abs=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        m1 = fit_scaler(P[-1], y, method)
    assert res.nll_single_pass == pytest.approx(_tta_nll(lambda z: m1(z.double()), P, y), rel=1e-9)
    assert res.nll_after <= res.nll_single_pass + 1e-12
    p_cv = cross_fit_tta_scaler(P, y, method, seed=3)[0]
    p_cv1 = cross_fit_tta_scaler(P, y, method, seed=3, single_pass=True)[0]
    assert res.nll_after_cv == pytest.approx(F.nll_loss(p_cv.log(), y).item(), rel=1e-9)
    assert res.ece_single_pass_cv == pytest.approx(calibration_error(p_cv1, y), abs=1e-9)
    assert 'single-pass map on TTA' in repr(res)


def test_tta_other_settings_warn_and_reset():
    learn = _flip_learner()
    learn.calibrate(tta=dict(n=2, beta=0.5))
    assert learn.tta_params == {'n': 2, 'beta': 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.tta(n=2, beta=0.5)                                  # the settings it was fitted for: no warning
    for kw in (dict(), dict(n=2, beta=0.25), dict(n=2, beta=0.5, use_max=True)):
        with pytest.warns(UserWarning, match='only approximately calibrated'): learn.tta(**kw)
    learn.calibrate()
    learn.reset_calibration('tta')
    assert not hasattr(learn, 'tta_act') and hasattr(learn, 'default_act')
    learn.calibrate(tta=True)
    learn.reset_calibration()
    assert not hasattr(learn, 'tta_act') and not hasattr(learn, 'default_act') and not hasattr(learn, 'tta_params')
    with pytest.raises(ValueError, match="`which` must be one of"): learn.reset_calibration('both')


BAD_CALIBRATE = [(dict(tta='yes'), TypeError, '`tta` must be a bool or a dict'),
                 (dict(tta=dict(use_max=True)), ValueError, 'a maximum of probabilities is not a probability'),
                 (dict(tta=dict(beta=None)), ValueError, "`tta['beta']` is None"),
                 (dict(tta=dict(beta=2)), ValueError, "`tta['beta']` must be in [0, 1]"),
                 (dict(tta=dict(n=0)), ValueError, "`tta['n']` must be an int >= 1"),
                 (dict(tta=dict(n=2.5)), TypeError, "`tta['n']` must be an int"),
                 (dict(tta=dict(seed=1)), ValueError, "`tta` takes the keys 'n', 'beta' and 'use_max'"),
                 (dict(max_items=1), ValueError, '`max_items` must be an int >= 2')]

@pytest.mark.parametrize('kw,exc,msg', BAD_CALIBRATE)
def test_calibrate_tta_bad_arguments_are_one_line(kw, exc, msg):
    learn = _flip_learner(n_valid=64)
    with pytest.raises(exc) as e: learn.calibrate(**kw)
    assert msg in str(e.value) and '\n' not in str(e.value)
    assert not hasattr(learn, 'tta_act') and not hasattr(learn, 'default_act')


def test_calibrate_tta_sigmoid_learner():
    "A multi-label learner whose TTA output is 2x too confident: `calibrate(tta=True)` finds each label's temperature"
    from fastai.data.core import DataLoaders
    from fastai.data.transforms import IntToFloatTensor
    from fastai.torch_core import TensorImageBW, TensorMultiCategory
    from fastai_regularize.data import _TensorImageDataset, _TensorImageDL
    class MultiHot(_TensorImageDataset):
        def __getitem__(self, i): return TensorImageBW(self.x[i][None]),TensorMultiCategory(self.y[i])
    class MultiHotDL(_TensorImageDL):                            # whole batches from the tensors: fast
        def do_batch(self, b):
            idx = torch.as_tensor(list(b), dtype=torch.long)
            return TensorImageBW(self.dataset.x[idx][:, None]),TensorMultiCategory(self.dataset.y[idx])
    g = torch.Generator().manual_seed(2)
    x,t = (torch.rand(3100, 6, 6, generator=g)*255).to(torch.uint8),torch.zeros(3100, 3)
    tfms = [IntToFloatTensor(), Flip(p=0.5)]
    dls = DataLoaders(*[MultiHotDL(MultiHot(x[s], t[s], ['a', 'b', 'c'], i), bs=1000, shuffle=i == 0, after_batch=tfms)
                        for i,s in enumerate((slice(0, 100), slice(100, None)))])
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    with torch.no_grad(): model[1].weight.normal_(0, 3., generator=g); model[1].bias.fill_(-model[1].weight.sum(1).mean()/2)
    learn = Learner(dls, model, loss_func=BCEWithLogitsLossFlat())
    learn.get_preds()
    P,_ = tta_logits(learn, seed=4)
    assert not torch.equal(P[0], P[-1])
    t[100:] = torch.bernoulli(combine_tta(torch.sigmoid(P.double()/2)), generator=g).float()   # drawn from TTA's output at T=1
    res = learn.calibrate(tta=True, seed=4)
    assert res.multilabel and isinstance(learn.tta_act, SigmoidScaling)
    torch.testing.assert_close(res.temperatures, torch.full((3,), 2., dtype=torch.float64), rtol=0.2, atol=0)
    set_seed(4, reproducible=True)
    torch.testing.assert_close(learn.tta()[0], combine_tta(torch.stack([learn.tta_act(p) for p in P])), rtol=0, atol=0)


def _seg_learner(scale=3., n=120, loss=None, seed=4):
    "Per-pixel logits of 4 classes on 12×12 images, `scale` times those the masks were drawn from; the first row unlabelled (255)"
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 3, 12, 12, generator=g)
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 3, 1, 1, generator=g)); conv.bias.zero_()
        ms = torch.multinomial(F.softmax(conv(xs), 1).movedim(1, -1).reshape(-1, 4), 1, generator=g).view(n, 12, 12)
        conv.weight.mul_(scale)
    ms[:, 0] = 255
    dls = Datasets(range(n), [[xs.__getitem__], [ms.__getitem__]], splits=[range(20), range(20, n)]).dataloaders(bs=50)
    return Learner(dls, conv, loss_func=loss or CrossEntropyLossFlat(axis=1, ignore_index=255))


def _pixels(logits, masks):
    "Reference flattening, by hand: classes last, the unlabelled row dropped"
    return logits.movedim(1, -1)[:, 1:].reshape(-1, logits.shape[1]),masks[:, 1:].reshape(-1)


@pytest.mark.parametrize('loss', ['ce', 'ls'])
def test_segmentation_temperature_recovered_per_pixel(loss):
    lf = CrossEntropyLossFlat(axis=1, ignore_index=255) if loss == 'ce' else LabelSmoothingCrossEntropyFlat(axis=1, ignore_index=255)
    learn = _seg_learner(loss=lf)
    logits,masks = learn.get_preds(act=no_activation)
    assert logits.shape == (100, 4, 12, 12) and masks.shape == (100, 12, 12)
    res = learn.calibrate()
    z,y = _pixels(logits, masks)
    assert res.n_items == res.n_total == 100*11*12
    assert res.temperature == pytest.approx(3., rel=0.05)
    assert res.temperature == pytest.approx(fit_temperature(z, y), rel=1e-9)
    assert res.nll_before == pytest.approx(F.cross_entropy(z.double(), y).item(), rel=1e-9)
    assert res.ece_after == pytest.approx(calibration_error(F.softmax(z.double()/res.temperature, -1), y), abs=1e-9)
    probs = learn.get_preds()[0]
    assert probs.shape == (100, 4, 12, 12)
    torch.testing.assert_close(probs, F.softmax(logits/res.temperature, 1))
    torch.testing.assert_close(probs.sum(1), torch.ones(100, 12, 12))


def test_segmentation_subsample_is_seeded_and_capped():
    learn = _seg_learner()
    logits,masks = learn.get_preds(act=no_activation)
    z,y = _pixels(logits, masks)
    a,b,c = learn.calibrate(max_items=3000, seed=5),learn.calibrate(max_items=3000, seed=5),learn.calibrate(max_items=3000, seed=6)
    assert (a.n_items, a.n_total) == (3000, len(y)) and 'items=3000 of 13200' in repr(a)
    assert a.temperature == b.temperature != c.temperature
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(5))[:3000].sort().values   # the documented draw
    assert a.temperature == pytest.approx(fit_temperature(z[idx], y[idx]), rel=1e-9)
    assert a.temperature == pytest.approx(3., rel=0.1)


def test_segmentation_scalers_keep_the_class_axis_and_survive_export(tmp_path):
    learn = _seg_learner()
    logits,_ = learn.get_preds(act=no_activation)
    res = learn.calibrate('vector')
    act = learn.default_act
    assert isinstance(act, ClassAxis) and act.axis == 1 and res.act is act
    probs = learn.get_preds()[0]
    assert probs.shape == (100, 4, 12, 12)
    torch.testing.assert_close(probs, act.scaler(logits.movedim(1, -1)).movedim(-1, 1))
    learn.path = tmp_path
    learn.export('seg.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = load_learner(tmp_path/'seg.pkl')
    torch.testing.assert_close(loaded.get_preds(dl=learn.dls.valid)[0], probs)
    with pytest.raises(ValueError, match='cannot be calibrated per pixel'): learn.calibrate(tta=True)
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = learn.show_reliability(calibrated=False)                   # every labelled pixel an item, as calibrate scores them
    z,y = _pixels(logits, learn.get_preds(act=no_activation)[1])
    assert f"ECE {calibration_error(F.softmax(z.double(), -1), y):.4f}" in fig.axes[0].get_title()
    plt.close('all')


def test_export_load_keeps_tta_calibration_in_a_fresh_process(tmp_path):
    "A fresh process that imports nothing of ours: load_learner brings the TTA map, its settings and our `tta` (which uses it)"
    learn = _flip_learner()
    learn.calibrate('vector', tta=True)
    learn.path = tmp_path
    learn.export('tta.pkl')
    P,_ = tta_logits(learn, seed=1)
    torch.save(P, tmp_path/'passes.pt')
    child = """
import sys, warnings, torch
warnings.simplefilter('ignore')
from fastai.learner import Learner, load_learner
learn = load_learner(sys.argv[1] + '/tta.pkl')
P = torch.load(sys.argv[1] + '/passes.pt')
torch.save(dict(params=learn.tta_params, kind=type(learn.tta_act).__name__, tta=Learner.tta.__module__,
                probs=torch.stack([learn.tta_act(p) for p in P])), sys.argv[1] + '/child.pt')
"""
    (tmp_path/'child.py').write_text(child)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(tmp_path/'child.py'), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path/'child.pt', weights_only=False)
    assert got['params'] == {'n': 4, 'beta': 0.25} and got['kind'] == 'VectorScaling'
    assert got['tta'] == 'fastai_regularize.activations'               # unpickling the map imported our `tta`
    assert torch.equal(got['probs'], torch.stack([learn.tta_act(p) for p in P]))


def test_calibratability_script_scores_tta_output(tmp_path):
    "`--tta`: raw TTA output, each scaler cross-fitted for TTA's combination, and the single-pass scaler on it, from tta_logits"
    import importlib.util, csv
    spec = importlib.util.spec_from_file_location('calibratability', ROOT/'benchmarks'/'calibratability.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    (tmp_path/'preds').mkdir()
    P0,y = _passes(300, c=3, scale=1.)                                  # the same items and targets for every run
    for seed in range(2):
        for config,scale in (('baseline', 2.), ('mixup', 0.5)):
            P = scale*P0 + 0.3*torch.randn(P0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            torch.save({'logits': P[-1].float(), 'targs': y, 'tta_logits': P.float(), 'tta_beta': 0.25},
                       tmp_path/'preds'/f'{config}__s{seed}.pt')
    mod.main([str(tmp_path/'preds'), '--name', 't', '--methods', 'temperature', '--out', str(tmp_path), '--tta'])
    rows = list(csv.DictReader(open(tmp_path/'calibratability-t-tta.csv')))
    assert len(rows) == 2*2*3 and {r['method'] for r in rows} == {'before', 'temperature', 'single-pass-temperature'}
    d = torch.load(tmp_path/'preds'/'mixup__s1.pt')
    get = lambda m: next(r for r in rows if (r['config'], r['seed'], r['method']) == ('mixup', '1', m))
    refs = {'before': combine_tta(F.softmax(d['tta_logits'].double(), -1)),
            'temperature': cross_fit_tta_scaler(d['tta_logits'], d['targs'])[0],
            'single-pass-temperature': cross_fit_tta_scaler(d['tta_logits'], d['targs'], single_pass=True)[0]}
    for m,p in refs.items():
        assert float(get(m)['nll']) == pytest.approx(F.nll_loss(p.log(), d['targs']).item(), rel=1e-5)
        assert float(get(m)['ece']) == pytest.approx(calibration_error(p, d['targs']), rel=1e-5)
    assert 'Calibratability of TTA' in (tmp_path/'calibratability-t-tta.md').read_text()
    torch.save({'logits': d['logits'], 'targs': d['targs']}, tmp_path/'preds'/'cutmix__s0.pt')
    with pytest.raises(SystemExit, match='has no tta_logits'):
        mod.main([str(tmp_path/'preds'), '--name', 't', '--methods', 'temperature', '--out', str(tmp_path), '--tta'])


def test_a_fault_inside_calibrate_tta_loses_nothing():
    "An exception in the middle of the TTA passes: the maps installed before stay, the learner predicts as before"
    from fastai.callback.core import Callback
    class Boom(Callback):
        order,n = 0,0
        def before_batch(self):
            Boom.n += 1
            if Boom.n == 9: raise RuntimeError('injected')
    learn = _flip_learner()
    learn.calibrate(); learn.calibrate(tta=True)
    single,tta_act,params = learn.default_act,learn.tta_act,dict(learn.tta_params)
    set_seed(1, reproducible=True); before = learn.tta()[0]
    learn.add_cb(Boom())
    with pytest.raises(RuntimeError, match='injected'): learn.calibrate('vector', tta=dict(n=2))
    learn.remove_cbs([c for c in learn.cbs if isinstance(c, Boom)])
    assert learn.default_act is single and learn.tta_act is tta_act and learn.tta_params == params
    set_seed(1, reproducible=True)
    assert torch.equal(learn.tta()[0], before)
    import fastai_regularize.calibration as cal                      # and Ctrl-C in the middle of the fit itself
    def interrupted(*a, **k): raise KeyboardInterrupt
    mp = pytest.MonkeyPatch()
    mp.setattr(cal, '_lbfgs', interrupted)
    try:
        with pytest.raises(KeyboardInterrupt): learn.calibrate('vector', tta=dict(n=2))
    finally: mp.undo()
    assert learn.default_act is single and learn.tta_act is tta_act and learn.tta_params == params


def test_tta_logits_is_seeded_from_a_learners_first_prediction():
    """fastai finds `dls.n_inp` on a learner's first batch by running the training transforms (drawing random numbers):
    `tta_logits` does it before seeding, so its first call gives what later seeded calls and `tta()` give"""
    learn = _flip_learner(warm=False)
    a,_ = tta_logits(learn, n=2, seed=5)
    b,_ = tta_logits(learn, n=2, seed=5)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    set_seed(5, reproducible=True)
    assert torch.equal(learn.tta(n=2, act=no_activation)[0], combine_tta(a))
