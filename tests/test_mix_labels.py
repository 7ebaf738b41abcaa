"""Issue 13's changes to the input mixers: CutMix boxes by timm 1.0.31's rule (checked against `timm.data.mixup.
rand_bbox` on the same draws), `correct_lam=False` keeping the sampled λ, `label='dominant'` giving the larger
share's label, and RegMixUp's loss = clean + weight × mixed by hand."""
import math
from functools import partial
from unittest import mock

import numpy as np
import pytest
import torch, torch.nn as nn, torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.data.core import Datasets, DataLoaders
from fastai.learner import Learner, Recorder
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import TensorImage, TensorCategory, set_seed

from fastai_regularize import mixup as mixup_mod
from fastai_regularize.mixup import MixUp, CutMix, RegMixUp, cutmix_boxes, _box_bounds
from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat

timm_mixup = pytest.importorskip('timm.data.mixup')
torch.set_num_threads(1)

# ================================================================ 1. the box rule against timm
@settings(max_examples=400, deadline=None)
@given(H=st.integers(1, 40), W=st.integers(1, 40), lam=st.floats(0, 1, width=32, allow_subnormal=False), data=st.data())
def test_box_matches_timm_rand_bbox(H, W, lam, data):
    "The same λ and centre give timm's box exactly, odd sides and clipping included"
    cy,cx = data.draw(st.integers(0, H - 1)),data.draw(st.integers(0, W - 1))
    with mock.patch.object(timm_mixup.np.random, 'randint', side_effect=[cy, cx]) as ri:
        ref = timm_mixup.rand_bbox((3, H, W), lam)
    assert [c.args for c in ri.call_args_list] == [(0, H), (0, W)]   # timm draws the centre uniformly, row first
    got = _box_bounds(torch.tensor([lam]), torch.tensor([cy]), torch.tensor([cx]), H, W)
    assert tuple(int(v) for v in got) == tuple(int(v) for v in ref)

def test_kept_area_distribution_matches_timm():
    "Centres and boxes drawn by `cutmix_boxes` keep, on average, the share of the image timm's keep (16×16, λ ~ U(0, 1))"
    n,H = 40_000,16
    rng = np.random.default_rng(0)
    lam = rng.random(n).astype(np.float32)
    np.random.seed(0)
    ref = np.empty(n)
    for i,l in enumerate(lam):
        yl,yh,xl,xh = timm_mixup.rand_bbox((3, H, H), float(l))
        ref[i] = 1 - (yh - yl) * (xh - xl) / H**2
    torch.manual_seed(0)
    mask,kept = cutmix_boxes(torch.from_numpy(lam), H, H)
    torch.testing.assert_close(kept, 1 - mask.float().mean((1, 2)))
    se = math.sqrt(ref.var() / n + kept.double().var().item() / n)
    assert abs(kept.double().mean().item() - ref.mean()) < 4 * se, (kept.mean().item(), ref.mean(), se)
    assert abs(ref.mean() - 0.7011) < 0.01   # the number for timm (ours was 0.7235 with boxes ending at c + cut // 2)

# ================================================================ 2. correct_lam=False keeps the sampled λ
def _const_images(n=8, H=8, W=8):
    "Item i is the constant image i: every output pixel tells which item it came from"
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, H, W).clone(), torch.arange(n)

DRAWS = torch.tensor([0.05, 0.3, 0.45, 0.5, 0.55, 0.7, 0.95, 0.2])

@pytest.fixture
def fixed_draws(monkeypatch):
    "Every Beta draw returns DRAWS (truncated to the batch): the λ the callbacks sample is known"
    monkeypatch.setattr(mixup_mod, '_beta', lambda alpha, n, device: DRAWS[:n].to(device).clone())

@pytest.mark.parametrize('seed', range(5))
def test_correct_lam_false_keeps_the_sampled_lambda(fixed_draws, seed):
    x,y = _const_images()
    torch.manual_seed(seed)
    (xk,),_,(_,lam_kept) = CutMix(1.).mix((x,), (y,))
    torch.manual_seed(seed)
    (xs,),_,(_,lam_drawn) = CutMix(1., correct_lam=False).mix((x,), (y,))
    kept = (xs[:, 0] == x[:, 0]).float().mean((1, 2))
    assert torch.equal(xs, xk)                      # the same boxes
    torch.testing.assert_close(lam_kept, kept)      # default: the share kept
    torch.testing.assert_close(lam_drawn, DRAWS)    # correct_lam=False: the draw, clipped box or not

def test_correct_lam_false_in_elem_mode(fixed_draws):
    "Per item: cut items keep their CutMix draw, MixUp items their max(λ, 1-λ)"
    x,y = _const_images()
    torch.manual_seed(0)
    (xm,),_,(_,lam) = MixUp(0.4, cutmix_alpha=1., mode='elem', correct_lam=False).mix((x,), (y,))
    lerped = torch.tensor([bool((xm[i, 0] == xm[i, 0, 0, 0]).all()) and float(xm[i, 0, 0, 0]) != i for i in range(8)])
    assert 0 < lerped.sum() < 8
    torch.testing.assert_close(lam[~lerped], DRAWS[~lerped])
    torch.testing.assert_close(lam[lerped], torch.maximum(DRAWS, 1 - DRAWS)[lerped])

@pytest.mark.parametrize('bad', [0, 1, 'no', None])
def test_correct_lam_must_be_bool(bad):
    with pytest.raises(TypeError, match='`correct_lam`'): CutMix(correct_lam=bad)

# ================================================================ 3. label='dominant'
@pytest.mark.parametrize('correct_lam', [True, False])
@pytest.mark.parametrize('seed', range(5))
def test_dominant_label_is_the_larger_share(fixed_draws, seed, correct_lam):
    "CutMix: the label of the item most pixels came from (by the sampled λ with correct_lam=False); one-hot targets alike"
    x,y = _const_images()
    torch.manual_seed(seed)
    (xd,),(yd,),pending = CutMix(1., label='dominant', correct_lam=correct_lam).mix((x,), (y + 10,))
    assert pending is None
    src = xd[:, 0].flatten(1).long()
    partner = torch.tensor([int(s[s != i][0]) if (s != i).any() else i for i,s in enumerate(src)])
    own_share = (src == torch.arange(8)[:, None]).float().mean(1) if correct_lam else DRAWS
    torch.testing.assert_close(yd, torch.where(own_share >= 0.5, y, partner) + 10)
    torch.manual_seed(seed)
    _,(yo,),pending = CutMix(1., label='dominant', correct_lam=correct_lam).mix((x,), (F.one_hot(y, 8).float(),))
    assert pending is None and torch.equal(yo.argmax(1), yd - 10) and torch.equal(yo.sum(1), torch.ones(8))

def test_dominant_label_under_mixup_is_the_items_own():
    torch.manual_seed(0)
    x,y = torch.randn(16, 5),torch.randint(0, 3, (16,))
    for mu in (MixUp(0.4, label='dominant'), MixUp(1., label='dominant', mode='elem', prob=0.5)):
        (xm,),(ym,),pending = mu.mix((x,), (y,))
        assert pending is None and torch.equal(ym, y) and not torch.equal(xm, x)

def test_dominant_label_segmentation_mask_is_cut():
    "A cut mask already labels each pixel by the item it came from"
    x,_ = _const_images()
    m = torch.arange(8)[:, None, None].expand(8, 8, 8).clone()
    torch.manual_seed(1)
    (xd,),(md,),pending = CutMix(1., label='dominant').mix((x,), (m,))
    assert pending is None and torch.equal(md, xd[:, 0].long())

class Record(Callback):
    "Inputs and targets before mixing (order below the mixers'), the model's inputs and output, and the targets and loss of the step"
    order = MixUp.order - 1
    def before_fit(self): self.rec = []
    def before_batch(self):
        if self.training: self.rec.append(dict(x=self.xb[0].clone(), y=self.yb[0].clone()))
    def after_pred(self):
        if self.training: self.rec[-1].update(xb=self.xb[0].clone(), pred=self.pred.detach().clone())
    def after_batch(self):  # after every callback's after_loss
        if self.training: self.rec[-1].update(yb=self.yb[0].clone(), loss=self.loss.detach().clone(), pred_after=self.pred.shape)

def _img_dls(n_train=32, bs=8):
    g = torch.Generator().manual_seed(0)
    def items(n):
        x,y = torch.rand(n, 3, 8, 8, generator=g),torch.arange(n) % 3
        x[torch.arange(n), y] += 0.5
        return [(TensorImage(x[i]), TensorCategory(y[i])) for i in range(n)]
    return DataLoaders.from_dsets(items(n_train), items(8), bs=bs, device='cpu')

def _cnn(): return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

def test_dominant_label_in_a_learner_with_a_loss_without_reduction():
    "Hard targets: fastai calls the user's loss as usual, even one that cannot give per-item values"
    set_seed(0)
    lf = lambda p, t: F.cross_entropy(p, t)
    learn = Learner(_img_dls(), _cnn(), loss_func=lf, cbs=[CutMix(1., label='dominant'), Record()])
    learn.remove_cb(ProgressCallback)
    learn.fit(1)
    assert len(learn.record.rec) == 4
    for r in learn.record.rec:
        torch.testing.assert_close(r['loss'], F.cross_entropy(r['pred'], r['yb']))
        assert not torch.equal(r['xb'], r['x'])

# ================================================================ 4. RegMixUp by hand
class PerItemLoss(nn.Module):
    "A loss fastai_regularize knows nothing about: reached through `reduction`"
    def __init__(self, reduction='mean'): super().__init__(); self.reduction = reduction
    def forward(self, x, y):
        l = F.cross_entropy(x, y, reduction='none')
        return l if self.reduction == 'none' else l.mean() if self.reduction == 'mean' else l.sum()

LOSSES = {'F.cross_entropy': (lambda: F.cross_entropy, 0., 'mean'),
          'CrossEntropyLossFlat': (CrossEntropyLossFlat, 0., 'mean'),
          'LabelSmoothingCrossEntropyFlat': (lambda: LabelSmoothingCrossEntropyFlat(eps=0.1), 0.1, 'mean'),
          'nn.CrossEntropyLoss(sum)': (lambda: nn.CrossEntropyLoss(reduction='sum'), 0., 'sum'),
          'generic per-item loss': (PerItemLoss, 0., 'mean')}

def _hand_partner(x, xm, lam):
    "The shift k with xm = λ·x + (1-λ)·x[(i+k) % n] for every item, found by trying them all"
    n = x.shape[0]
    w = lam.double().view(n, *[1]*(x.ndim - 1))
    for k in range(1, n):
        if torch.allclose(xm.double(), w * x.double() + (1 - w) * x.double().roll(-k, 0), atol=1e-5): return k
    raise AssertionError('the second half is no λ-mix of the first')

@pytest.mark.parametrize('weight', [0.5, 2.])
@pytest.mark.parametrize('name', LOSSES)
def test_regmixup_loss_is_clean_plus_weight_times_mixed(name, weight):
    make,eps,red = LOSSES[name]
    set_seed(0)
    lf = make()
    reg = RegMixUp(weight=weight)
    class Peek(Callback):
        order = MixUp.order + 1
        def after_pred(self):
            if self.training: self.learn.record.rec[-1]['pending'] = reg._reg[2]
    learn = Learner(_img_dls(), _cnn(), loss_func=lf, cbs=[reg, Record(), Peek()])
    learn.remove_cb(ProgressCallback)
    learn.fit(1)
    assert learn.loss_func is lf and len(learn.record.rec) == 4
    for r in learn.record.rec:
        x,y,xb,pred = r['x'],r['y'],r['xb'],r['pred']
        n = x.shape[0]
        (y2,),lam = r['pending']
        assert xb.shape[0] == 2 * n and torch.equal(xb[:n], x) and r['pred_after'][0] == n
        k = _hand_partner(x, xb[n:], lam)
        assert torch.equal(y2, y.roll(-k, 0))
        ce = lambda p, t: F.cross_entropy(p, t, label_smoothing=eps, reduction='none')
        reduce = torch.sum if red == 'sum' else torch.mean
        ref = reduce(ce(pred[:n], y)) + weight * reduce(lam * ce(pred[n:], y) + (1 - lam) * ce(pred[n:], y2))
        torch.testing.assert_close(r['loss'], ref, atol=1e-5, rtol=1e-5)

def test_regmixup_dominant_label_and_train_metrics():
    "label='dominant' scores the copy on each item's own label (λ >= 1/2); train metrics see the clean half"
    set_seed(0)
    learn = Learner(_img_dls(), _cnn(), loss_func=F.cross_entropy, metrics=accuracy,
                    cbs=[RegMixUp(label='dominant'), Record()])
    learn.remove_cb(ProgressCallback)
    learn.recorder.train_metrics = True
    learn.fit(1)
    for r in learn.record.rec:
        n = r['x'].shape[0]
        ref = F.cross_entropy(r['pred'][:n], r['y']) + F.cross_entropy(r['pred'][n:], r['y'])
        torch.testing.assert_close(r['loss'], ref)
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])

def test_regmixup_batch_of_one_is_the_clean_loss():
    set_seed(0)
    learn = Learner(_img_dls(n_train=3, bs=1), nn.Sequential(nn.Flatten(), nn.Linear(192, 3)), loss_func=F.cross_entropy,
                    cbs=[RegMixUp(), Record()])
    learn.remove_cb(ProgressCallback)
    learn.fit(1)
    assert len(learn.record.rec) == 3
    for r in learn.record.rec:
        assert r['xb'].shape[0] == 1
        torch.testing.assert_close(r['loss'], F.cross_entropy(r['pred'], r['y']))

@pytest.mark.parametrize('exc', [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize('event', ['before_batch', 'after_pred', 'after_loss', 'before_backward'])
@pytest.mark.parametrize('order', [-6, 0], ids=['before', 'after'])
def test_regmixup_fault_leaves_learner_intact(event, exc, order):
    class Boom(Callback):
        def __init__(self): self.order = order; setattr(self, event, self._boom)
        def _boom(self):
            if self.training: raise exc('injected')
    set_seed(0)
    lf = LabelSmoothingCrossEntropyFlat(eps=0.1)
    learn = Learner(_img_dls(), _cnn(), loss_func=lf, cbs=RegMixUp())
    learn.remove_cb(ProgressCallback)
    cbs = list(learn.cbs)
    with pytest.raises(exc, match='injected'): learn.fit(1, cbs=Boom())
    assert learn.loss_func is lf and lf.reduction == 'mean' and list(learn.cbs) == cbs
    learn.fit(1)
    assert all(math.isfinite(float(l)) for l in learn.recorder.losses)

@pytest.mark.parametrize('make,exc,name', [(lambda: RegMixUp(weight=-1.), ValueError, 'weight'),
    (lambda: RegMixUp(weight=float('inf')), ValueError, 'weight'), (lambda: RegMixUp(weight='1'), TypeError, 'weight'),
    (lambda: RegMixUp(0.), ValueError, 'alpha'), (lambda: RegMixUp(label='soft'), ValueError, 'label')])
def test_regmixup_bad_arguments(make, exc, name):
    with pytest.raises(exc, match=f'`{name}`'): make()

def test_regmixup_refuses_token_ids():
    with pytest.raises(TypeError, match='ManifoldMixUp'): RegMixUp().mix((torch.randint(0, 9, (4, 5)),), (torch.arange(4),))
