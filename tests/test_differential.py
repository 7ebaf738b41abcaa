"""Differential tests: our cross-entropy against PyTorch's on inputs `hypothesis` draws from the whole input space.

Each property draws a case (shape with the class axis anywhere, N and C including 0, 1 and 2, dtype, eps in [0, 1],
class weights, an `ignore_index` inside or outside [0, C) with any share of ignored targets, reduction, probability
targets, logits of ±1e4, ±inf and NaN), runs it through the fused CPU kernel and through the PyTorch-op path
(`use_native`), and compares value, output shape and gradient with `F.cross_entropy(..., label_smoothing=eps)` on the
same numbers in the same precision (float64, or float32 for float32 and for half logits, which the losses compute in
float32): finite values to that precision's rounding, NaN and ±inf exactly where PyTorch has them. Profiles: 'ci' (`make test`, a few hundred examples each) and 'fuzz' (`make fuzz`,
HYPOTHESIS_PROFILE=fuzz). A failure prints the smallest case hypothesis shrank it to, and the tensors.
"""
import math, os
from functools import partial

import pytest, torch, torch.nn as nn, torch.nn.functional as F
from hypothesis import HealthCheck, event, given, note, settings, strategies as st
from fastai.losses import CrossEntropyLossFlat

from fastai_regularize.native import native_info, use_native
from fastai_regularize.losses import (label_smoothing_cross_entropy, LabelSmoothingCrossEntropy,
    LabelSmoothingCrossEntropyFlat, mixed_loss)

_common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile('ci', max_examples=int(os.environ.get('HYPOTHESIS_MAX_EXAMPLES', 400)), database=None, **_common)
settings.register_profile('fuzz', max_examples=int(os.environ.get('HYPOTHESIS_MAX_EXAMPLES', 20000)), **_common)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))

@pytest.fixture(scope='module', autouse=True)
def ieee_floats():
    "Other test modules turn on flushing subnormals to zero (for speed) at import; these tests need IEEE arithmetic"
    flushing = torch.tensor(1e-39).mul(1).item() == 0              # a float32 subnormal survives a multiplication?
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(flushing)

PATHS = [False] + ([True] if native_info()['available'] else [])    # use_native(...) values to run each case through
# the device our losses run on; PyTorch's reference always runs on the CPU. CUDA has no C kernel: its PyTorch-op path
DEVICES = pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)])

def _paths(device:str)->list: return PATHS if device == 'cpu' else [False]

def _on(t, device:str):
    "`t` (a tensor or None) on `device`"
    return t if t is None else t.to(device)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SPECIAL = [1e4, -1e4, math.inf, -math.inf, math.nan]
# float64 is compared almost exactly; float32 (and half logits, computed in float32) to its rounding
VALUE_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}

# ---------------------------------------------------------------------------------------------------- drawing cases
@st.composite
def logits_and_targets(draw, any_axis:bool=True, batched:bool=False, probs:bool=True, finite:bool=False):
    "A case: logits `x` with classes on `axis` (anywhere, or dim 1 as `F.cross_entropy`), targets `t`, the loss's arguments"
    C = draw(st.one_of(st.integers(1, 6), st.sampled_from([17, 40])))
    layout = draw(st.sampled_from(['batched', 'spatial'] if batched else ['unbatched', 'batched', 'spatial']))
    # a size of 0 about one time in ten (none with `finite`, which also keeps the logits finite)
    size = lambda hi: st.integers(0 if not finite else 1, 3 * hi).map(lambda n: 0 if n == 0 else 1 + n % hi)
    N = draw(size(5))
    spatial = draw(st.lists(size(3), min_size=1, max_size=2)) if layout == 'spatial' else []
    item_shape = [] if layout == 'unbatched' else [N, *spatial]
    axis = draw(st.integers(0, len(item_shape))) if any_axis else min(1, len(item_shape))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1., 0., 5., 30.]))               # 0: every logit of a row equal
    x = torch.randn(*item_shape[:axis], C, *item_shape[axis:], generator=g, dtype=torch.float64) * scale
    if x.numel() and draw(st.integers(0, 2)) == 0:                # a few extreme or non-finite logits
        special = st.sampled_from(SPECIAL[:2] if finite else SPECIAL)
        for i, v in draw(st.lists(st.tuples(st.integers(0, x.numel() - 1), special), min_size=1, max_size=4)):
            x.view(-1)[i] = v
    x = x.to(dtype)
    eps = draw(st.floats(0, 1))
    weights = draw(st.sampled_from([None, 'positive', 'some zero']))
    w = None if weights is None else (torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.05).to(x.dtype if dtype in DTYPES[:2] else torch.float32)
    if weights == 'some zero': w[torch.rand(C, generator=g) < 0.5] = 0
    reduction = draw(st.sampled_from(['mean', 'sum', 'none']))
    if probs and draw(st.integers(0, 7)) == 0:                     # class probabilities (any non-negative numbers)
        t = torch.rand(x.shape, generator=g, dtype=torch.float64).to(x.dtype if dtype in DTYPES[:2] else torch.float32)
        ignore_index = draw(st.sampled_from([-100, -1, 0]))
        return dict(x=x, t=t, axis=axis, C=C, eps=eps, w=w, reduction=reduction, ignore_index=ignore_index)
    t, ignore_index = _targets(draw, g, item_shape, C)
    return dict(x=x, t=t, axis=axis, C=C, eps=eps, w=w, reduction=reduction, ignore_index=ignore_index)

def _targets(draw, g, item_shape, C, share=None):
    "Class indices of `item_shape`, an ignore_index inside or outside [0, C), and none, some or all of them ignored"
    ignore_index = draw(st.sampled_from([-100, -1, C, 'inside']))
    if ignore_index == 'inside': ignore_index = draw(st.integers(0, C - 1))
    t = torch.randint(0, C, item_shape, generator=g)
    share = draw(st.sampled_from(['none', 'some', 'all'])) if share is None else share
    if share != 'none': t[torch.rand(item_shape, generator=g) < (0.4 if share == 'some' else 2)] = ignore_index
    return t, ignore_index

# ---------------------------------------------------------------------------------------------------- comparing
def _scale(x:torch.Tensor, w)->float:
    "Size of one row's loss terms: spread of the finite logits plus log C, times the largest class weight"
    f = x[torch.isfinite(x)].double()
    spread = (f.max() - f.min()).item() if f.numel() else 0.
    return (1 + spread + math.log(max(x.shape[-1] if x.ndim else 1, 2))) * (1 + (0 if w is None else w.max().item()))

def assert_same(ours, ref, atol, rtol, what, strict=True):
    "Shapes equal; finite values close; non-finite values at the same places (`strict`: the same NaN and ±inf, as PyTorch)"
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)}, PyTorch {tuple(ref.shape)}"
    o, r = ours.detach().double(), ref.detach().double()
    if strict: torch.testing.assert_close(o, r, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        fin = torch.isfinite(r)
        assert torch.equal(torch.isfinite(o), fin), f"{what}: non-finite at other places:\nours {o}\nPyTorch {r}"
        torch.testing.assert_close(o[fin], r[fin], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")

def _ran_kernel(t)->bool:
    "Did the fused C kernel compute `t` (its node anywhere in the graph)?"
    todo, seen = [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen: continue
        if f.name() == '_SmoothCENativeBackward': return True
        seen.add(f); todo += [n for n, _ in f.next_functions]
    return False

def _flat_ref(x, t, axis, **kw):
    "PyTorch's loss of the ...Flat losses: classes moved last, everything else flattened"
    C = x.shape[axis]
    t = t.movedim(axis, -1).reshape(-1, C) if t.is_floating_point() else t.reshape(-1)
    return F.cross_entropy(x.movedim(axis, -1).reshape(-1, C), t, **kw)

# ---------------------------------------------------------------------------------------------------- properties
@DEVICES
@given(api=st.sampled_from(['function', 'module', 'flat']), data=st.data())
def test_cross_entropy_equals_pytorch(device, api, data):
    "label_smoothing_cross_entropy, LabelSmoothingCrossEntropy(Flat): value, shape and gradient of F.cross_entropy's"
    case = data.draw(logits_and_targets(any_axis=api == 'flat'), label='case')
    x, t, axis, eps, w, red, ii = (case[k] for k in ('x', 't', 'axis', 'eps', 'w', 'reduction', 'ignore_index'))
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32      # the precision the loss computes in
    kw = dict(weight=None if w is None else w.to(cdt), reduction=red, ignore_index=ii, label_smoothing=eps)
    note(f"x={x!r}\nt={t!r}\nw={w!r}")
    xd = x.to(cdt).requires_grad_()
    tr = t.to(cdt) if t.is_floating_point() else t
    try: ref = _flat_ref(xd, tr, axis, **kw) if api == 'flat' else F.cross_entropy(xd, tr, **kw)
    except RuntimeError as e:                                      # ignore_index >= 0 with probabilities: both refuse
        assert 'ignore_index' in str(e)
        for native in _paths(device):
            with use_native(native), pytest.raises(ValueError, match='ignore_index'):
                _ours(api, _on(x, device), _on(t, device), axis, eps, _on(w, device), red, ii)
        return
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=cdt)
    gref, = torch.autograd.grad(ref, xd, gout) if x.numel() else (torch.zeros_like(xd),)
    dt = x.dtype
    M = max(1, t.numel() if not t.is_floating_point() else t.numel() // x.shape[axis])
    vscale = _scale(x.movedim(axis, -1) if x.ndim else x, w) * (M if red == 'sum' else 1)
    den = 1.
    if red == 'mean' and not t.is_floating_point():
        tt = t.reshape(-1); v = tt != ii
        den = (v.sum() if w is None else (w.double()[torch.where(v, tt, 0)] * v).sum()).item() or 1.
    gscale = 2 * (1 + (0 if w is None else w.max().item())) * gout.abs().max().item() / den if gout.numel() else 1.
    for native in _paths(device):
        with use_native(native):
            xo = x.to(device, copy=True).requires_grad_()
            ours = _ours(api, xo, _on(t, device), axis, eps, _on(w, device), red, ii)
            what = f"{'kernel' if native else 'PyTorch-op path'} on {device}, {api}"
            if native: event(f"kernel path: {'the C kernel ran' if _ran_kernel(ours) else 'fell back to PyTorch ops'}")
            assert ours.device.type == device, f"{what}: result on {ours.device}"
            assert_same(ours.cpu(), ref, VALUE_TOL[dt] * vscale, VALUE_TOL[dt], f"{what}: value")
            go, = torch.autograd.grad(ours, xo, gout.to(device, ours.dtype)) if x.numel() else (torch.zeros_like(xo),)
            go = go.cpu()
            assert go.dtype == x.dtype, f"{what}: gradient dtype {go.dtype}"
            assert_same(go, gref, VALUE_TOL[dt] * gscale, GRAD_RTOL[dt], f"{what}: gradient")

def _ours(api, x, t, axis, eps, w, red, ii, cw='pytorch'):
    if api == 'function': return label_smoothing_cross_entropy(x, t, eps, w, red, ii, cw)
    if api == 'module': return LabelSmoothingCrossEntropy(eps, w, red, ii, cw)(x, t)
    return LabelSmoothingCrossEntropyFlat(axis=axis, eps=eps, weight=w, reduction=red, ignore_index=ii, class_weighting=cw)(x, t)

# ---------------------------------------------------------------------------------------------------- class_weighting='target'
# The reference is the formula, written here with log_softmax and nothing of ours: per item (class index y)
#   w[y] ((1 - eps)(-log p_y) + eps / C sum_j -log p_j),   0 for an ignored item,
# 'mean' = sum / (sum of w[y] over the non-ignored items), NaN when that is 0; for class-probability targets t the item
# weighs u = sum_c t_c w_c, its loss is u (-sum_c ((1 - eps) t_c + eps / C) log p_c), and 'mean' divides by sum u.
# Without class weights every item weighs 1: the loss is PyTorch's.
def _target_rows(z, y, eps, w, ii):
    "(per-row losses, per-row weights) of logits z (M, C) against class indices y (M,) or probabilities y (M, C)"
    C = z.shape[1]
    logp = torch.log_softmax(z, 1)
    smooth = -logp.sum(1)
    if y.is_floating_point():
        u = torch.ones(len(z), dtype=z.dtype) if w is None else y @ w
        q = y * (1 - eps) + eps / C
        return u * -(q * logp).sum(1), u
    valid = y != ii
    y0 = torch.where(valid, y, 0)
    u = torch.ones(len(z), dtype=z.dtype) if w is None else w[y0]
    nll = -logp.gather(1, y0[:, None])[:, 0]
    per = u * ((1 - eps) * nll + (eps / C * smooth if eps else 0))
    return torch.where(valid, per, 0), torch.where(valid, u, 0)

def _target_ref(x, t, axis, eps, w, red, ii, flat):
    "The formula's loss of logits `x` (classes on `axis`) against `t`, reduced as `red`; per-item shape as ours (`flat`: flattened)"
    if x.ndim == 1: x, t, axis = x[None], t[None], 1                         # unbatched: one item
    C = x.shape[axis]
    z = x.movedim(axis, -1).reshape(-1, C)
    y = t.movedim(axis, -1).reshape(-1, C) if t.is_floating_point() else t.reshape(-1)
    per, u = _target_rows(z, y, eps, w, ii)
    if red == 'sum': return per.sum()
    if red == 'mean':
        den = u.sum()
        return per.sum() / torch.where(den != 0, den, float('nan'))
    if flat: return per
    return per.reshape(x.movedim(axis, -1).shape[:-1])

@given(api=st.sampled_from(['function', 'module', 'flat']), data=st.data())
def test_target_weighting_equals_its_formula(api, data):
    "class_weighting='target': value, shape and gradient of the formula above, on both paths, over the same input space"
    case = data.draw(logits_and_targets(any_axis=api == 'flat'), label='case')
    x, t, axis, eps, w, red, ii = (case[k] for k in ('x', 't', 'axis', 'eps', 'w', 'reduction', 'ignore_index'))
    if t.is_floating_point() and ii >= 0: ii = -100                 # refused with probabilities, as tested above
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    wc = None if w is None else w.to(cdt)
    note(f"x={x!r}\nt={t!r}\nw={w!r}")
    xd = x.to(cdt).requires_grad_()
    tr = t.to(cdt) if t.is_floating_point() else t
    unbatched = x.ndim == 1
    ref = _target_ref(xd, tr, axis, eps, wc, red, ii, flat=api == 'flat')
    if unbatched and red == 'none' and api != 'flat': ref = ref.reshape(())           # as F.cross_entropy's
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=cdt)
    gref, = torch.autograd.grad(ref, xd, gout) if x.numel() else (torch.zeros_like(xd),)
    dt = x.dtype
    M = max(1, t.numel() if not t.is_floating_point() else t.numel() // x.shape[axis])
    vscale = _scale(x.movedim(axis, -1) if x.ndim else x, w) * (1 + (0 if w is None else w.max().item())) * (M if red == 'sum' else 1)
    den = 1.
    if red == 'mean':
        if t.is_floating_point(): den = (tr.movedim(axis, -1).reshape(-1, x.shape[axis]).double() @ wc.double()).sum().item() if w is not None else M
        else:
            tt = t.reshape(-1); v = tt != ii
            den = (v.sum() if w is None else (w.double()[torch.where(v, tt, 0)] * v).sum()).item()
        den = den if den > 1e-3 else 1.
    wmax = 1 + (0 if w is None else w.max().item())
    gscale = 2 * wmax * wmax * gout.abs().max().item() / den if gout.numel() else 1.
    for native in PATHS:
        with use_native(native):
            xo = x.clone().requires_grad_()
            ours = _ours(api, xo, t, axis, eps, w, red, ii, 'target')
            what = f"{'kernel' if native else 'PyTorch-op path'}, {api}, class_weighting='target'"
            if native: event(f"target weighting, kernel path: {'the C kernel ran' if _ran_kernel(ours) else 'fell back to PyTorch ops'}")
            assert_same(ours, ref, VALUE_TOL[dt] * vscale, VALUE_TOL[dt], f"{what}: value")
            go, = torch.autograd.grad(ours, xo, gout.to(ours.dtype)) if x.numel() else (torch.zeros_like(xo),)
            assert go.dtype == x.dtype, f"{what}: gradient dtype {go.dtype}"
            assert_same(go, gref, VALUE_TOL[dt] * gscale, GRAD_RTOL[dt], f"{what}: gradient")

TARGET_MIXED_LOSSES = {
    'LabelSmoothingCrossEntropy': lambda eps, w, red, ii: LabelSmoothingCrossEntropy(eps, w, red, ii, 'target'),
    'LabelSmoothingCrossEntropyFlat': lambda eps, w, red, ii: LabelSmoothingCrossEntropyFlat(
        axis=1, eps=eps, weight=w, reduction=red, ignore_index=ii, class_weighting='target'),
    'partial(label_smoothing_cross_entropy)': lambda eps, w, red, ii: partial(
        label_smoothing_cross_entropy, eps=eps, weight=w, reduction=red, ignore_index=ii, class_weighting='target'),
}

@given(kind=st.sampled_from(list(TARGET_MIXED_LOSSES)), data=st.data())
def test_mixed_loss_target_weighting_equals_its_formula(kind, data):
    "mixed_loss with class_weighting='target': lam * l(y1) + (1 - lam) * l(y2) per item with the formula's l, mean over items"
    case = data.draw(logits_and_targets(any_axis=False, batched=True, probs=False), label='case')
    x, t1, eps, w, red, ii, C = (case[k] for k in ('x', 't', 'eps', 'w', 'reduction', 'ignore_index', 'C'))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label='seed'))
    t2, _ = _targets(data.draw, g, list(t1.shape), C)
    t2[t2 == _] = ii
    n = x.shape[0]
    lam = torch.rand(n, generator=g, dtype=torch.float64)
    note(f"x={x!r}\nt1={t1!r}\nt2={t2!r}\nlam={lam!r}\nw={w!r}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    wc = None if w is None else w.to(cdt)
    xd = x.to(cdt).requires_grad_()
    lb = lam.to(cdt).view(n, *[1] * (x.ndim - 2))
    per = lb * _target_ref(xd, t1, 1, eps, wc, 'none', ii, False) + (1 - lb) * _target_ref(xd, t2, 1, eps, wc, 'none', ii, False)
    per = per.reshape(n, math.prod(per.shape[1:]))
    ref = per.mean() if red == 'mean' else per.sum() if red == 'sum' else per.squeeze(1)
    gout = torch.randn(ref.shape, generator=g, dtype=cdt)
    gref, = torch.autograd.grad(ref, xd, gout) if x.numel() else (torch.zeros_like(xd),)
    dt, k = x.dtype, per.shape[1]
    wmax = 1 + (0 if w is None else w.max().item())
    vscale = _scale(x.movedim(1, -1), w) * wmax * (max(1, n * k) if red == 'sum' else 1)
    gscale = 2 * wmax * wmax * gout.abs().max().item() / (max(1, n * k) if red == 'mean' else 1) if gout.numel() else 1.
    for native in PATHS:
        with use_native(native):
            xo = x.clone().requires_grad_()
            ours = mixed_loss(TARGET_MIXED_LOSSES[kind](eps, w, red, ii), xo, (t1,), (t2,), lam.to(cdt))
            what = f"{'kernel' if native else 'PyTorch-op path'}, {kind}, class_weighting='target'"
            if native: event(f"target weighting, mixed, kernel path: {'the C kernel ran' if _ran_kernel(ours) else 'fell back to PyTorch ops'}")
            assert_same(ours, ref, VALUE_TOL[dt] * vscale, VALUE_TOL[dt], f"{what}: value", strict=False)
            go, = torch.autograd.grad(ours, xo, gout.to(ours.dtype)) if x.numel() else (torch.zeros_like(xo),)
            assert_same(go, gref, VALUE_TOL[dt] * gscale, GRAD_RTOL[dt], f"{what}: gradient", strict=False)

MIXED_LOSSES = {
    'LabelSmoothingCrossEntropy': lambda eps, w, red, ii: LabelSmoothingCrossEntropy(eps, w, red, ii),
    'LabelSmoothingCrossEntropyFlat': lambda eps, w, red, ii: LabelSmoothingCrossEntropyFlat(axis=1, eps=eps, weight=w, reduction=red, ignore_index=ii),
    'nn.CrossEntropyLoss': lambda eps, w, red, ii: nn.CrossEntropyLoss(w, ignore_index=ii, reduction=red, label_smoothing=eps),
    'CrossEntropyLossFlat': lambda eps, w, red, ii: CrossEntropyLossFlat(axis=1, weight=w, ignore_index=ii, reduction=red, label_smoothing=eps),
    'partial(F.cross_entropy)': lambda eps, w, red, ii: partial(F.cross_entropy, weight=w, ignore_index=ii, reduction=red, label_smoothing=eps),
}

@DEVICES
@given(kind=st.sampled_from(list(MIXED_LOSSES)), data=st.data())
def test_mixed_loss_equals_pytorch(device, kind, data):
    "mixed_loss: lam*CE(y1) + (1-lam)*CE(y2) per item with F.cross_entropy, reduced as the loss reduces (mean over items)"
    case = data.draw(logits_and_targets(any_axis=False, batched=True, probs=False), label='case')
    x, t1, eps, w, red, ii, C = (case[k] for k in ('x', 't', 'eps', 'w', 'reduction', 'ignore_index', 'C'))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label='seed'))
    t2, _ = _targets(data.draw, g, list(t1.shape), C)
    t2[t2 == _] = ii                                               # the second targets' ignored share, with the same index
    n = x.shape[0]
    lam = data.draw(st.sampled_from(['random', 'zero or one']), label='lam')
    lam = torch.rand(n, generator=g, dtype=torch.float64) if lam == 'random' else torch.randint(0, 2, (n,), generator=g).double()
    note(f"x={x!r}\nt1={t1!r}\nt2={t2!r}\nlam={lam!r}\nw={w!r}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xd = x.to(cdt).requires_grad_()
    kw = dict(weight=None if w is None else w.to(cdt), ignore_index=ii, label_smoothing=eps, reduction='none')
    lb = lam.to(cdt).view(n, *[1] * (x.ndim - 2))
    per = lb * F.cross_entropy(xd, t1, **kw) + (1 - lb) * F.cross_entropy(xd, t2, **kw)
    per = per.reshape(n, math.prod(per.shape[1:]))                  # (items, pixels)
    ref = per.mean() if red == 'mean' else per.sum() if red == 'sum' else per.squeeze(1)
    gout = torch.randn(ref.shape, generator=g, dtype=cdt)
    gref, = torch.autograd.grad(ref, xd, gout) if x.numel() else (torch.zeros_like(xd),)
    dt = x.dtype
    k = per.shape[1]
    vscale = _scale(x.movedim(1, -1), w) * (max(1, n * k) if red == 'sum' else 1)
    gscale = 2 * (1 + (0 if w is None else w.max().item())) * gout.abs().max().item() / (max(1, n * k) if red == 'mean' else 1) if gout.numel() else 1.
    for native in _paths(device):
        with use_native(native):
            xo = x.to(device, copy=True).requires_grad_()
            ours = mixed_loss(MIXED_LOSSES[kind](eps, _on(w, device), red, ii), xo, (t1.to(device),), (t2.to(device),),
                              lam.to(device, cdt))
            what = f"{'kernel' if native else 'PyTorch-op path'} on {device}, {kind}"
            if native: event(f"kernel path: {'the C kernel ran' if _ran_kernel(ours) else 'fell back to PyTorch ops'}")
            assert ours.device.type == device, f"{what}: result on {ours.device}"
            # 0 * inf: lam * CE(y1) + (1 - lam) * CE(y2) with one CE infinite is NaN when lam is 0 or 1 and inf otherwise,
            # while one pass gives inf; what must agree is where the loss is finite
            assert_same(ours.cpu(), ref, VALUE_TOL[dt] * vscale, VALUE_TOL[dt], f"{what}: value", strict=False)
            go, = torch.autograd.grad(ours, xo, gout.to(device, ours.dtype)) if x.numel() else (torch.zeros_like(xo),)
            assert_same(go.cpu(), gref, VALUE_TOL[dt] * gscale, GRAD_RTOL[dt], f"{what}: gradient", strict=False)

@DEVICES
@settings(max_examples=max(20, settings.default.max_examples // 2))
@given(api=st.sampled_from(['function', 'flat', 'mixed']), cw=st.sampled_from(['pytorch', 'target']), data=st.data())
def test_second_derivatives_equal_pytorch(device, api, cw, data):
    "The gradient under create_graph=True and Hessian-vector products, in float64, equal F.cross_entropy's (or the 'target' formula's) on both paths"
    case = data.draw(logits_and_targets(any_axis=api == 'flat', batched=api == 'mixed', probs=False, finite=True), label='case')
    x, t, axis, eps, w, red, ii = (case[k] for k in ('x', 't', 'axis', 'eps', 'w', 'reduction', 'ignore_index'))
    x = x.double()                                                 # second derivatives of non-finite logits: not compared
    w = None if w is None else w.double()
    g = torch.Generator().manual_seed(1)
    lam = torch.rand(x.shape[0], generator=g, dtype=torch.float64) if api == 'mixed' else None
    kw = dict(weight=w, ignore_index=ii, label_smoothing=eps)
    def ce(x, t, red, axis=1, flat=False):
        if cw == 'target': return _target_ref(x, t, axis, eps, w, red, ii, flat)
        return _flat_ref(x, t, axis, reduction=red, **kw) if flat else F.cross_entropy(x, t, reduction=red, **kw)
    def ref_loss(x):
        if api == 'flat': return ce(x, t, red, axis, flat=True)
        if api == 'function': return ce(x, t, red)
        lb = lam.view(-1, *[1] * (x.ndim - 2))
        per = lb * ce(x, t, 'none') + (1 - lb) * ce(x, t.flip(0), 'none')
        per = per.reshape(x.shape[0], math.prod(per.shape[1:]))
        return per.mean() if red == 'mean' else per.sum() if red == 'sum' else per.squeeze(1)
    def our_loss(x):
        td,wd = t.to(x.device),_on(w, x.device)
        if api == 'flat': return LabelSmoothingCrossEntropyFlat(axis=axis, eps=eps, weight=wd, reduction=red, ignore_index=ii,
                                                                 class_weighting=cw)(x, td)
        if api == 'function': return label_smoothing_cross_entropy(x, td, eps, wd, red, ii, cw)
        return mixed_loss(LabelSmoothingCrossEntropy(eps, wd, red, ii, cw), x, (td,), (td.flip(0),), lam.to(x.device))
    def hvp(f, dev='cpu'):
        "The gradient computed with create_graph=True, and the Hessian times a fixed vector (on the CPU)"
        xr = x.to(dev, copy=True).requires_grad_()
        out = f(xr)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dev)
        gr, = torch.autograd.grad(out, xr, gout, create_graph=True)
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dev)
        h = torch.autograd.grad((gr * v).sum(), xr, allow_unused=True)[0] if gr.requires_grad else None
        return gr.detach().cpu(), torch.zeros_like(x) if h is None else h.cpu()
    refs = hvp(ref_loss)
    for native in _paths(device):
        with use_native(native):
            for ours, ref, what in zip(hvp(our_loss, device), refs, ('gradient under create_graph', 'Hessian-vector product')):
                big = ref[torch.isfinite(ref)].abs().max().item() if torch.isfinite(ref).any() else 0.
                assert_same(ours, ref, 1e-9 * (1 + big), 1e-9, f"{'kernel' if native else 'PyTorch-op path'} on {device}, {api}, {cw}: {what}")
