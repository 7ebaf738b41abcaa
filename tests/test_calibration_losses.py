"AdaptiveFocalLoss and ConfidencePenalty against their formulas written out item by item, in a Learner with MixUp, on GPU."
import math

import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastai.learner import Learner

from fastai_regularize.core import NoneReduce
from fastai_regularize.calibration_losses import AdaptiveFocalLoss, ConfidencePenalty
from fastai_regularize.mixup import MixUp
from test_mixup import C, Spy, make_dls

FLSD53 = ((0.2, 5.), (1., 3.))
MUKHOTI = ((0.2, 5.), (0.5, 3.), (1., 3.))   # torrvision/focal_calibration's gamma_dic with gamma=3: the same as FLSD53

def _gamma(gammas, p:float)->float:
    "gamma of the first threshold above p; a number is itself"
    if isinstance(gammas, (int, float)): return float(gammas)
    for th, g in gammas:
        if p < th: return g
    return gammas[-1][1]

def ref_rows(kind, z, y, param, w, ii):
    "(per-item losses, item weights), one item at a time: w[y] (1-p_y)^gamma (-log p_y) or w[y] (-log p_y - beta H(p)); 0 if ignored"
    losses, weights = [], []
    for i in range(len(z)):
        if y[i] == ii:
            losses.append(z[i].sum() * 0); weights.append(0.); continue
        logp = torch.log_softmax(z[i], 0)
        c = int(y[i]); wi = 1. if w is None else float(w[c])
        if kind == 'focal':
            g = _gamma(param, math.exp(logp[c].item()))            # chosen from the value: not differentiated
            l = (1 - logp[c].exp())**g * -logp[c]
        else:
            l = -logp[c] + param * (logp.exp() * logp).sum()
        losses.append(wi * l); weights.append(wi)
    return torch.stack(losses), torch.tensor(weights, dtype=z.dtype)

def reduce(rows, weights, red):
    if red == 'none': return rows
    if red == 'sum': return rows.sum()
    return rows.sum() / weights.sum() if weights.sum() else rows.sum() * float('nan')

def make(kind, param, w, red, ii):
    return AdaptiveFocalLoss(param, w, red, ii) if kind == 'focal' else ConfidencePenalty(param, w, red, ii)

PARAMS = [('focal', FLSD53), ('focal', MUKHOTI), ('focal', 2.), ('focal', ((0.5, 1.), (1., 0.))), ('penalty', 0.1), ('penalty', 1.)]

@pytest.mark.parametrize('kind,param', PARAMS)
@pytest.mark.parametrize('red', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('weighted', [False, True])
@pytest.mark.parametrize('ignore', [False, True])
def test_equals_the_formula(kind, param, red, weighted, ignore):
    "Value and gradient of the loss against the item-by-item formula, in float64"
    g = torch.Generator().manual_seed(hash((kind, str(param), red, weighted, ignore)) % 2**31)
    z = torch.randn(40, 6, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 6, (40,), generator=g)
    ii = 2 if ignore else -100                                      # an ignore_index inside [0, C): class 2 is ignored
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.2 if weighted else None
    p = torch.softmax(z, 1).gather(1, y[:, None])
    assert ((p - 0.2).abs() > 1e-9).all() and ((p - 0.5).abs() > 1e-9).all()
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours = make(kind, param, w, red, ii)(z1, y)
    ref = reduce(*ref_rows(kind, z2, y, param, w, ii), red)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ours.backward(gout); ref.backward(gout)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-10, atol=1e-12)

def test_gamma_at_the_thresholds():
    "FLSD-53: gamma 5 below p = 0.2, 3 from 0.2 on, 3 at p = 1"
    fl = AdaptiveFocalLoss()
    p = torch.tensor([0., 0.1999, 0.2, 0.5, 0.9999, 1.], dtype=torch.float64)
    assert fl.gamma(p).tolist() == [5., 5., 3., 3., 3., 3.]
    assert AdaptiveFocalLoss(2.5).gamma(p).tolist() == [2.5] * 6

def test_confident_items_keep_finite_gradients():
    "p_y = 1 in float32 (a margin of 200): 1 - p_y = 0, and 0**gamma has a finite gradient, gamma = 0 included"
    z = torch.tensor([[200., 0, 0], [0, 1, 0]], requires_grad=True)
    for gammas in (FLSD53, 0., 1., 2.):
        AdaptiveFocalLoss(gammas)(z, torch.tensor([0, 1])).backward()
        assert torch.isfinite(z.grad).all(), gammas
        z.grad = None

@pytest.mark.parametrize('kind,param', [('focal', FLSD53), ('penalty', 0.3)])
def test_probability_targets(kind, param):
    "One-hot probabilities give the class index's loss; soft targets weigh sum_c t_c w_c and mix the per-class terms"
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 4, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 4, (10,), generator=g)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    lf = make(kind, param, w, 'mean', -100)
    torch.testing.assert_close(lf(z, F.one_hot(y, 4).double()), lf(z, y))
    t = torch.rand(10, 4, generator=g, dtype=torch.float64).softmax(1)
    logp = z.log_softmax(1)
    if kind == 'focal':
        gam = torch.tensor([[_gamma(param, v) for v in row] for row in logp.exp().tolist()], dtype=torch.float64)
        per = (t * (1 - logp.exp())**gam * -logp).sum(1)
    else: per = -(t * logp).sum(1) + param * (logp.exp() * logp).sum(1)
    u = t @ w
    torch.testing.assert_close(lf(z, t), (u * per).sum() / u.sum())
    with pytest.raises(ValueError, match='`ignore_index` must be negative'): make(kind, param, None, 'mean', 0)(z, t)

@pytest.mark.parametrize('cls', [AdaptiveFocalLoss, ConfidencePenalty])
def test_all_ignored_mean_is_nan_with_zero_gradient(cls):
    z = torch.randn(3, 4, requires_grad=True)
    out = cls(weight=torch.rand(4) + .5)(z, torch.full((3,), -100))
    assert out.isnan()
    out.backward()
    assert torch.equal(z.grad, torch.zeros(3, 4))

@pytest.mark.parametrize('cls', [AdaptiveFocalLoss, ConfidencePenalty])
def test_half_logits_and_tabular_targets(cls):
    "Half logits are computed in float32 (the gradient keeps their dtype); (N, 1) targets are flattened as fastai's Flat losses do"
    z = (torch.randn(8, 3) * 3).half().requires_grad_()
    y = torch.randint(0, 3, (8,))
    out = cls()(z, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cls()(z.float(), y))
    out.backward()
    assert z.grad.dtype == torch.float16
    torch.testing.assert_close(cls()(z.float(), y[:, None]), cls()(z.float(), y))

@pytest.mark.parametrize('make_lf', [lambda w: AdaptiveFocalLoss(weight=w), lambda w: ConfidencePenalty(0.5, weight=w)])
def test_mixup_in_a_learner(make_lf):
    "MixUp's loss is the mean over items of lam l(y1) + (1 - lam) l(y2), l with the class weights; the loss is restored"
    torch.manual_seed(0)
    dls, _, _ = make_dls()
    w = torch.tensor([3., 0.5, 1.])
    lf = make_lf(w)
    learn = Learner(dls, nn.Linear(4, C), loss_func=lf, cbs=[MixUp(0.4), Spy()])
    learn.fit(2)
    assert learn.loss_func is lf and lf.reduction == 'mean'
    ref_lf = make_lf(w)
    for r in learn.spy.rec:
        y2, lam = r['pending']
        with NoneReduce(ref_lf) as f: per = lam * f(r['pred'], r['y']) + (1 - lam) * f(r['pred'], y2)
        torch.testing.assert_close(r['loss'], per.mean(), atol=1e-6, rtol=1e-6)
    probs, targs = learn.get_preds()
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)))      # `activation`: softmax

def test_bad_arguments():
    with pytest.raises(TypeError, match='`gammas` must be a number or'): AdaptiveFocalLoss([0.2, 5.])
    with pytest.raises(ValueError, match=r'`gammas\[0\]\[0\]` must be in \(0, 1\]'): AdaptiveFocalLoss(((1.5, 5.), (1., 3.)))
    with pytest.raises(ValueError, match='must increase and end at 1'): AdaptiveFocalLoss(((0.2, 5.),))
    with pytest.raises(ValueError, match='`beta` must be in'): ConfidencePenalty(float('nan'))
    with pytest.raises(TypeError, match='`weight` must be a tensor'): ConfidencePenalty(weight=[1., 2.])
    with pytest.raises(TypeError, match='`ignore_index` must be an int'): AdaptiveFocalLoss(ignore_index=1.5)
    with pytest.raises(ValueError, match='`weight` must be a tensor of 3 class weights'): AdaptiveFocalLoss(weight=torch.ones(4))(torch.randn(2, 3), torch.tensor([0, 1]))

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('cls', [AdaptiveFocalLoss, ConfidencePenalty])
def test_cuda_equals_cpu(cls):
    g = torch.Generator().manual_seed(0)
    z, y, w = torch.randn(64, 7, generator=g), torch.randint(0, 7, (64,), generator=g), torch.rand(7, generator=g) + .5
    y[::9] = -100
    lf = cls(weight=w)                                              # CPU weights: moved to the logits' device
    zc = z.cuda().requires_grad_(); zz = z.clone().requires_grad_()
    a, b = lf(zc, y.cuda()), lf(zz, y)
    torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
    a.backward(); b.backward()
    torch.testing.assert_close(zc.grad.cpu(), zz.grad, rtol=1e-5, atol=1e-6)
