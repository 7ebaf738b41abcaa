"Losses and activations against PyTorch's own functions, gradcheck and the seed numbers."
import math
from functools import partial

import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat

from fastai_regularize.core import NoneReduce, reduce_loss
from fastai_regularize.activations import softmax_base, log_softmax_base, BaseSoftmax, no_activation
from fastai_regularize.losses import (label_smoothing_cross_entropy, LabelSmoothingCrossEntropy,
    LabelSmoothingCrossEntropyFlat, LabelSmoothingBCEWithLogitsLossFlat, mixed_loss, _SmoothCE)

SEED_X = torch.tensor([
  [3.326171875,0.457275391,-2.796875000,0.537597656,0.363037109,0.821777344,1.685546875,-3.531250000,-1.796875000,-1.674804688],
  [-1.417968750,1.099609375,-2.019531250,3.640625000,0.524902344,1.203125000,1.619140625,-0.686035156,-2.474609375,-1.802734375]])
SEED_Y = torch.tensor([0, 3])

def test_seed_000_numbers(backend):
    "Seed 000 cells 309-313 printed these"
    assert torch.allclose(LabelSmoothingCrossEntropy(reduction='none')(SEED_X, SEED_Y), torch.tensor([0.7381, 0.6839]), atol=5e-5)
    assert torch.allclose(LabelSmoothingCrossEntropy()(SEED_X, SEED_Y), torch.tensor(0.7110), atol=5e-5)
    assert torch.allclose(F.cross_entropy(SEED_X, SEED_Y), torch.tensor(0.3480), atol=5e-5)

@pytest.mark.parametrize('eps', [0., 0.1, 0.3])
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('weighted', [False, True])
@pytest.mark.parametrize('ignore', [False, True])
@pytest.mark.parametrize('shape', [(16, 7), (3, 7, 4, 5)])
def test_equals_torch(eps, reduction, weighted, ignore, shape, backend):
    g = torch.Generator().manual_seed(hash((eps, reduction, weighted, ignore, shape)) % 2**31)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    if ignore: t.view(-1)[::5] = -100
    w = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.2 if weighted else None
    x1,x2 = x.clone().requires_grad_(),x.clone().requires_grad_()
    ours = LabelSmoothingCrossEntropy(eps, weight=w, reduction=reduction)(x1, t)
    ref = F.cross_entropy(x2, t, weight=w, reduction=reduction, label_smoothing=eps)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ours.backward(gout); ref.backward(gout)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6, rtol=0)

def test_functional_and_probability_targets():
    x = torch.randn(5, 4, dtype=torch.float64)
    p = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1)
    for red in ('mean', 'sum', 'none'):
        assert torch.allclose(label_smoothing_cross_entropy(x, p, 0.2, reduction=red),
                              F.cross_entropy(x, p, label_smoothing=0.2, reduction=red))

def test_unbatched(backend):
    x,t = torch.randn(6, dtype=torch.float64),torch.tensor(2)
    assert torch.allclose(label_smoothing_cross_entropy(x, t, 0.1), F.cross_entropy(x, t, label_smoothing=0.1))

@pytest.mark.parametrize('weighted', [False, True])
def test_gradcheck_mixed_kernel(weighted, backend):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ys = torch.randint(0, 6, (2, 7), generator=g); ys[0, 2] = -100
    lam = torch.rand(7, dtype=torch.float64, generator=g)
    w = torch.rand(6, dtype=torch.float64, generator=g) + .5 if weighted else None
    assert torch.autograd.gradcheck(lambda z: _SmoothCE.apply(z, ys, torch.stack([lam, 1-lam]), w, 0.3, -100), (z,))
    assert torch.autograd.gradcheck(lambda z: label_smoothing_cross_entropy(z, ys[1], 0.2, w), (z,))

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_logits_computed_in_float32(dtype, backend):
    x = (torch.randn(32, 10) * 4).to(dtype)
    t = torch.randint(0, 10, (32,))
    ours = LabelSmoothingCrossEntropy()(x, t)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, F.cross_entropy(x.float(), t, label_smoothing=0.1), atol=1e-6)
    xr = x.clone().requires_grad_()
    LabelSmoothingCrossEntropyFlat()(xr, t).backward()
    assert xr.grad.dtype == dtype

@pytest.mark.parametrize('eps', [-0.01, 1.01, float('nan'), '0.1'])
def test_bad_eps(eps):
    with pytest.raises((ValueError, TypeError), match='`eps`'): LabelSmoothingCrossEntropy(eps)
    with pytest.raises((ValueError, TypeError), match='`eps`'): LabelSmoothingCrossEntropyFlat(eps=eps)
    with pytest.raises((ValueError, TypeError), match='`eps`'): LabelSmoothingBCEWithLogitsLossFlat(eps=eps)

def test_bad_targets(backend):
    lf = LabelSmoothingCrossEntropy()
    with pytest.raises(ValueError, match='class index 10, outside'): lf(SEED_X, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match='class index -3'): lf(SEED_X, torch.tensor([-3, 1]))
    with pytest.raises(ValueError, match='does not match logits'): lf(SEED_X, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match='integer class indices'): lf(SEED_X, torch.tensor([True, False]))
    with pytest.raises(ValueError, match='`weight`'): LabelSmoothingCrossEntropy(weight=torch.ones(3))(SEED_X, SEED_Y)

def test_flat_axis_and_decodes(backend):
    "fastai 2.8's Flat loss ignores `axis` in activation/decodes; ours does not"
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    t = torch.randint(0, 5, (2, 3, 4))
    lf = LabelSmoothingCrossEntropyFlat(axis=1, eps=0.2)
    assert torch.allclose(lf(x, t), F.cross_entropy(x, t, label_smoothing=0.2))
    assert torch.equal(lf.decodes(x), x.argmax(1))
    assert torch.allclose(lf.activation(x), F.softmax(x, 1))
    with NoneReduce(lf) as f: per = f(x, t)
    assert per.shape == (2*3*4,) and lf.reduction == 'mean'
    assert torch.allclose(per.sort().values, F.cross_entropy(x, t, label_smoothing=0.2, reduction='none').flatten().sort().values)

def test_label_smoothing_bce():
    x = torch.randn(6, 4)  # fastai's BaseLoss makes targets float32, so logits are float32 as in training
    t = torch.randint(0, 2, (6, 4)).float()
    eps = 0.2
    s = t * (1 - eps) + eps / 2
    p = torch.sigmoid(x)
    ref = -(s * p.log() + (1 - s) * (1 - p).log())
    lf = LabelSmoothingBCEWithLogitsLossFlat(eps=eps)
    assert torch.allclose(lf(x, t), ref.mean(), atol=1e-6)
    with NoneReduce(lf) as f: assert torch.allclose(f(x, t), ref.flatten(), atol=1e-6)
    assert torch.equal(lf.decodes(x), x > 0.5)
    assert torch.allclose(lf.activation(x), p)
    assert not lf.y_int

# --- NoneReduce / reduce_loss

def test_none_reduce_restores_on_exception():
    lf = nn.CrossEntropyLoss(reduction='sum')
    with pytest.raises(RuntimeError):
        with NoneReduce(lf) as f:
            assert f is lf and lf.reduction == 'none'
            raise RuntimeError('boom')
    assert lf.reduction == 'sum'
    with pytest.raises(KeyboardInterrupt):
        with NoneReduce(CrossEntropyLossFlat()) as f: raise KeyboardInterrupt
    fl = CrossEntropyLossFlat()
    with NoneReduce(fl) as f: assert f(SEED_X, SEED_Y).shape == (2,)
    assert fl.reduction == 'mean'

def test_none_reduce_functions():
    with NoneReduce(F.cross_entropy) as f:
        assert torch.allclose(f(SEED_X, SEED_Y), torch.tensor([0.3794, 0.3167]), atol=5e-5)
    with NoneReduce(partial(F.cross_entropy, label_smoothing=0.1, reduction='sum')) as f:
        assert torch.allclose(f(SEED_X, SEED_Y), torch.tensor([0.7381, 0.6839]), atol=5e-5)
    def no_red(p, t): return F.cross_entropy(p, t)
    with pytest.raises(TypeError, match='cannot give per-item losses'):
        with NoneReduce(no_red) as f: pass
    with pytest.raises(TypeError, match='callable'): NoneReduce(3)

def test_reduce_loss():
    l = torch.tensor([1., 2., 6.])
    assert reduce_loss(l) == 3. and reduce_loss(l, 'sum') == 9. and reduce_loss(l, 'none') is l
    with pytest.raises(ValueError, match='`reduction`'): reduce_loss(l, 'max')

# --- activations

def test_softmax_base_matches_power_definition():
    x = SEED_X.double()
    for b in (2., math.e, 10., 0.5):
        ref = b**x / (b**x).sum(-1, keepdim=True)
        assert torch.allclose(softmax_base(x, b), ref)
        assert torch.allclose(log_softmax_base(x, b), ref.log())
        assert torch.allclose(BaseSoftmax(b)(x), ref)
    assert torch.allclose(softmax_base(SEED_X, 2)[0, :3], torch.tensor([0.5026, 0.0688, 0.0072]), atol=5e-5)

def test_softmax_base_stable_and_dims():
    x = torch.tensor([[1e4, 0., -1e4], [-1e4, -1e4, 1e4]])
    for b in (2, 10, 1.01):
        p = softmax_base(x, b)
        assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(2))
        assert torch.isfinite(log_softmax_base(x, b)).all()
    y = torch.randn(3, 4, 5)
    assert torch.allclose(BaseSoftmax(3., dim=1)(y), F.softmax(y * math.log(3), dim=1))
    h = softmax_base(torch.tensor([[60000., 0.]], dtype=torch.float16), 10)
    assert torch.isfinite(h).all()

@pytest.mark.parametrize('base', [1, 1.0, 0, -2, float('nan'), float('inf')])
def test_bad_base(base):
    with pytest.raises(ValueError, match='`base`'): softmax_base(SEED_X, base)
    with pytest.raises(ValueError, match='`base`'): BaseSoftmax(base)

def test_temperature_and_pickle():
    import pickle
    sm = BaseSoftmax.from_temperature(2.)
    assert math.isclose(sm.temperature, 2.) and math.isclose(sm.base, math.exp(0.5))
    sm2 = pickle.loads(pickle.dumps(sm))
    assert torch.allclose(sm2(SEED_X), F.softmax(SEED_X / 2, -1))
    assert no_activation(SEED_X) is SEED_X

# --- mixed loss

@pytest.mark.parametrize('make', [
    lambda: LabelSmoothingCrossEntropy(0.1), lambda: LabelSmoothingCrossEntropyFlat(eps=0.3),
    lambda: nn.CrossEntropyLoss(label_smoothing=0.2), lambda: CrossEntropyLossFlat(),
    lambda: F.cross_entropy, lambda: partial(F.cross_entropy, label_smoothing=0.1, weight=torch.rand(6, dtype=torch.float64)),
    lambda: LabelSmoothingCrossEntropy(0.1, reduction='sum'), lambda: LabelSmoothingCrossEntropy(0.1, ignore_index=2)])
def test_mixed_loss_fast_path_equals_two_pass_reference(make, backend):
    "One-pass mixed loss == lam*L(y1) + (1-lam)*L(y2), per item then reduced as the loss reduces"
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(9, 6, dtype=torch.float64, generator=g)
    y1,y2 = torch.randint(0, 6, (9,), generator=g),torch.randint(0, 6, (9,), generator=g)
    lam = torch.rand(9, dtype=torch.float64, generator=g)
    lf = make()
    with NoneReduce(lf) as f: ref = lam * f(pred, y1) + (1 - lam) * f(pred, y2)
    red = getattr(lf, 'reduction', None) or getattr(lf, 'keywords', {}).get('reduction', 'mean')
    ref = reduce_loss(ref, red)
    assert torch.allclose(mixed_loss(lf, pred, (y1,), (y2,), lam), ref, atol=1e-10)

def test_mixed_loss_per_pixel(backend):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=g)
    m1,m2 = torch.randint(0, 4, (3, 5, 5), generator=g),torch.randint(0, 4, (3, 5, 5), generator=g)
    lam = torch.rand(3, dtype=torch.float64, generator=g)
    ref = (lam[:, None, None] * F.cross_entropy(pred, m1, reduction='none', label_smoothing=0.1)
           + (1 - lam[:, None, None]) * F.cross_entropy(pred, m2, reduction='none', label_smoothing=0.1)).mean()
    for lf in (LabelSmoothingCrossEntropyFlat(axis=1), partial(F.cross_entropy, label_smoothing=0.1)):
        assert torch.allclose(mixed_loss(lf, pred, (m1,), (m2,), lam), ref, atol=1e-10)

# --- PyTorch's answer where it is subtle (issue 10's reproducers; tests/test_differential.py searches for more)

def test_ignore_index_inside_the_class_range(backend):
    x = torch.tensor([[.3, .4, .1], [1., 2., .5], [.2, -1., 3.]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    for red in ('mean', 'sum', 'none'):
        ref = F.cross_entropy(x, y, label_smoothing=0.1, ignore_index=0, reduction=red)
        assert torch.allclose(label_smoothing_cross_entropy(x, y, eps=0.1, ignore_index=0, reduction=red), ref, atol=1e-12)
    assert abs(label_smoothing_cross_entropy(x, y, eps=0.1, ignore_index=0).item() - 0.425260) < 1e-6
    g = torch.Generator().manual_seed(0)
    seg, t = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4, 5, 6), generator=g)
    assert torch.allclose(LabelSmoothingCrossEntropyFlat(axis=1, ignore_index=0)(seg, t),
                          F.cross_entropy(seg, t, label_smoothing=0.1, ignore_index=0), atol=1e-12)
    assert torch.isnan(label_smoothing_cross_entropy(x, torch.full((3,), 2), ignore_index=2))   # all of them ignored

@pytest.mark.parametrize('weighted', [False, True])
def test_all_ignored_mean_is_nan_with_zero_gradient(weighted, backend):
    "PyTorch's 0/0: the loss is NaN, but the gradient is 0, so one such batch does not turn the model into NaN"
    w = torch.rand(4) + .5 if weighted else None
    for ignore in (-100, 1):
        x, xr = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
        out = label_smoothing_cross_entropy(x, torch.full((3,), ignore), 0.1, w, ignore_index=ignore)
        ref = F.cross_entropy(xr, torch.full((3,), ignore), w, ignore_index=ignore, label_smoothing=0.1)
        assert out.isnan() and ref.isnan()
        out.backward(); ref.backward()
        assert torch.equal(x.grad, torch.zeros(3, 4)) and torch.equal(xr.grad, torch.zeros(3, 4))

def test_zero_weight_targets_mean_is_nan_as_pytorch(backend):
    "Valid targets whose class weights sum to 0: NaN, and PyTorch's gradient (NaN in their rows, 0 in ignored ones)"
    w = torch.tensor([0., 1, 1, 1], dtype=torch.float64)
    y = torch.tensor([0, 0, -100])
    x1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    out, ref = label_smoothing_cross_entropy(x1, y, 0.1, w), F.cross_entropy(x2, y, w, label_smoothing=0.1)
    assert out.isnan() and ref.isnan()
    out.backward(); ref.backward()
    assert torch.equal(x1.grad.isnan(), x2.grad.isnan()) and torch.equal(x1.grad[2], x2.grad[2])

def test_unbatched_none_is_0_dim(backend):
    x = torch.randn(6, dtype=torch.float64)
    for t in (torch.tensor(2), torch.softmax(torch.randn(6, dtype=torch.float64), 0)):
        for red in ('mean', 'sum', 'none'):
            ours, ref = label_smoothing_cross_entropy(x, t, 0.1, reduction=red), F.cross_entropy(x, t, label_smoothing=0.1, reduction=red)
            assert ours.shape == ref.shape == () and torch.allclose(ours, ref)
        assert LabelSmoothingCrossEntropy(reduction='none')(x, t).shape == ()

def test_probability_targets_refuse_a_non_negative_ignore_index():
    "PyTorch raises there (nothing can be ignored in a probability target); so do we, naming the argument"
    x, p = torch.randn(3, 4), torch.rand(3, 4)
    with pytest.raises(RuntimeError, match='ignore_index'): F.cross_entropy(x, p, ignore_index=0)
    with pytest.raises(ValueError, match='`ignore_index` must be negative'): label_smoothing_cross_entropy(x, p, ignore_index=0)

@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('weighted', [False, True])
def test_gradgradcheck(reduction, weighted, backend):
    "The gradient is itself differentiable (create_graph=True), with weights and ignored rows, on both paths"
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y, y2 = torch.tensor([0, 4, -100, 2, 2, 1]), torch.tensor([1, -100, 3, 0, 2, -100])
    w = torch.rand(5, generator=g, dtype=torch.float64) + .3 if weighted else None
    lam = torch.rand(6, generator=g, dtype=torch.float64)
    f = lambda x: label_smoothing_cross_entropy(x, y, 0.2, w, reduction)
    assert torch.autograd.gradcheck(f, (x,)) and torch.autograd.gradgradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(lambda x: label_smoothing_cross_entropy(x, y.clamp(0), 0.2, w, reduction), (x,))
    lf = LabelSmoothingCrossEntropy(0.2, w, reduction)
    assert torch.autograd.gradgradcheck(lambda x: mixed_loss(lf, x, (y,), (y2,), lam), (x,))

def test_gradient_penalty_equals_pytorch(backend):
    "loss + |d loss/dx|^2, differentiated: the penalty's gradient is not silently dropped"
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (8,), generator=g)
    def step(loss):
        x = x0.clone().requires_grad_()
        l = loss(x, y)
        gx, = torch.autograd.grad(l, x, create_graph=True)
        return torch.autograd.grad(l + 0.5 * (gx**2).sum(), x)[0]
    assert torch.allclose(step(LabelSmoothingCrossEntropy(0.1)), step(lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1)), atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.int64, torch.int8])
def test_flat_takes_tabular_n_by_1_targets(dtype, backend):
    "fastai's tabular DataLoaders give (N, 1) class indices; `CrossEntropyLossFlat` flattens them, and so must we"
    from fastai.losses import CrossEntropyLossFlat
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (6, 1), generator=g).to(dtype)
    ref = F.cross_entropy(x, y.view(-1).long(), label_smoothing=0.1)
    torch.testing.assert_close(LabelSmoothingCrossEntropyFlat(eps=0.1)(x, y), ref)
    torch.testing.assert_close(CrossEntropyLossFlat(label_smoothing=0.1)(x, y).double(), ref, rtol=1e-6, atol=1e-6)  # fastai: float32
    with pytest.raises(ValueError, match='does not match logits'): LabelSmoothingCrossEntropyFlat()(x, y[:5])

# --- class_weighting='target' (issue 19; tests/test_differential.py compares it with its formula over the input space)

def test_target_weighting_without_weights_is_pytorchs_loss(backend):
    "Without class weights the two weightings are one loss: F.cross_entropy's"
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (9,), generator=g)
    y[3] = -100
    for red in ('mean', 'sum', 'none'):
        torch.testing.assert_close(label_smoothing_cross_entropy(x, y, 0.3, reduction=red, class_weighting='target'),
                                   F.cross_entropy(x, y, label_smoothing=0.3, reduction=red))

def test_target_weighting_reaches_the_one_pass_mixed_loss(backend):
    "mixed_loss's one pass keeps class_weighting (ours, Flat, partial): equal to the two calls of the generic path"
    g = torch.Generator().manual_seed(7)
    pred = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y1, y2 = torch.randint(0, 5, (8,), generator=g), torch.randint(0, 5, (8,), generator=g)
    lam, w = torch.rand(8, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) + .1
    def generic(p, t, reduction='mean'): return label_smoothing_cross_entropy(p, t, 0.2, w, reduction, class_weighting='target')
    ref = mixed_loss(generic, pred, (y1,), (y2,), lam)
    for lf in (LabelSmoothingCrossEntropy(0.2, w, class_weighting='target'),
               LabelSmoothingCrossEntropyFlat(eps=0.2, weight=w, class_weighting='target'),
               partial(label_smoothing_cross_entropy, eps=0.2, weight=w, class_weighting='target')):
        torch.testing.assert_close(mixed_loss(lf, pred, (y1,), (y2,), lam), ref)
    # and the default stays PyTorch's, which differs here
    assert not torch.allclose(mixed_loss(LabelSmoothingCrossEntropy(0.2, w), pred, (y1,), (y2,), lam), ref)

def test_bad_class_weighting():
    for bad in ('Target', 'balanced', None, 1):
        with pytest.raises(ValueError, match='`class_weighting` must be one of'): LabelSmoothingCrossEntropy(class_weighting=bad)
        with pytest.raises(ValueError, match='`class_weighting` must be one of'):
            label_smoothing_cross_entropy(SEED_X, SEED_Y, class_weighting=bad)
    with pytest.raises(ValueError, match='`class_weighting`'): LabelSmoothingCrossEntropyFlat(class_weighting='x')

def _toy_104776(class_weighting:str, steps:int=400):
    "pytorch/pytorch#104776's toy problem: a 2-layer net told its input's class as a one-hot vector, 4 classes, the last one rare"
    counts = torch.tensor([100, 100, 100, 1])
    y = torch.repeat_interleave(torch.arange(4), counts)
    x = F.one_hot(y, 4).float()
    w = counts.sum() / (4 * counts.float())                        # scikit-learn's 'balanced' class weights: the rare class x100
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 4))
    lf = LabelSmoothingCrossEntropy(0.1, weight=w, class_weighting=class_weighting)
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    for _ in range(steps):                                         # full batch, to convergence
        opt.zero_grad(); lf(net(x), y).backward(); opt.step()
    with torch.no_grad(): p = net(x).softmax(1)
    return (p.argmax(1) == y).float().mean().item(), p, y

def test_pytorch_104776_toy_problem(backend):
    "'pytorch' weighting predicts the rare class for every item; 'target' keeps 100% and predicts the smoothed targets"
    acc, p, y = _toy_104776('pytorch')
    assert acc == pytest.approx(1 / 301) and (p.argmax(1) == 3).all()
    # its optimum: p ∝ (1 - eps) w_y [c = y] + eps w_c / C, here (0.694, 0.019, 0.019, 1.881) / 2.61 for a common class
    w = torch.tensor([301 / 400] * 3 + [301 / 4])
    q = 0.025 * w[None] + 0.9 * w[y][:, None] * F.one_hot(y, 4)
    torch.testing.assert_close(p, q / q.sum(1, keepdim=True), atol=5e-3, rtol=0)
    acc, p, y = _toy_104776('target')
    assert acc == 1.
    torch.testing.assert_close(p, 0.9 * F.one_hot(y, 4) + 0.025, atol=5e-3, rtol=0)

# --- LabelSmoothingBCEWithLogitsLossFlat(smoothing='mass')

def test_label_smoothing_bce_mass_by_hand():
    "'mass': t' = (1 - eps) t + eps * mean_k t, so each item keeps its expected number of positive labels"
    x = torch.randn(4, 5)
    t = torch.tensor([[1., 0, 0, 0, 0], [1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    hand = torch.tensor([[.84, .04, .04, .04, .04], [.92, .92, .12, .12, .92], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    lf = LabelSmoothingBCEWithLogitsLossFlat(eps=0.2, smoothing='mass')
    torch.testing.assert_close(lf(x, t), F.binary_cross_entropy_with_logits(x, hand))
    with NoneReduce(lf) as f: torch.testing.assert_close(f(x, t), F.binary_cross_entropy_with_logits(x, hand, reduction='none').flatten())
    assert lf.reduction == 'mean' and not lf.y_int
    # labels on axis 1 of (N, K, L): the mean is taken over that axis
    x3, t3 = torch.randn(2, 5, 3), t[:2, :, None].expand(2, 5, 3)
    torch.testing.assert_close(LabelSmoothingBCEWithLogitsLossFlat(eps=0.2, smoothing='mass', axis=1)(x3, t3),
                               F.binary_cross_entropy_with_logits(x3, hand[:2, :, None].expand(2, 5, 3)))
    # the default is still timm's per-label smoothing, towards 1/2
    torch.testing.assert_close(LabelSmoothingBCEWithLogitsLossFlat(eps=0.2)(x, t), F.binary_cross_entropy_with_logits(x, t * .8 + .1))
    with pytest.raises(ValueError, match="`smoothing` must be one of"): LabelSmoothingBCEWithLogitsLossFlat(smoothing='uniform')
