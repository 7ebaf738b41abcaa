"MixUp / CutMix in a Learner: each kind of loss, batch of one, restoration after errors, validation untouched."
import math
from functools import partial

import numpy as np

import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.data.core import Datasets
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat
from fastai.torch_core import set_seed
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)

from fastai_regularize.activations import BaseSoftmax, no_activation, softmax_base
from fastai_regularize.losses import LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat, LabelSmoothingBCEWithLogitsLossFlat
from fastai_regularize.mixup import MixUp, CutMix, RegMixUp

N_TRAIN, N_VALID, C = 48, 16, 3

def make_dls(bs=16, multi_hot=False, n_train=N_TRAIN, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_train + N_VALID
    xs = torch.randn(n, 4, generator=g)
    ys = torch.randint(0, C, (n,), generator=g)
    if multi_hot: ys = (torch.rand(n, C, generator=g) > 0.5).float()
    dsets = Datasets(range(n), [[xs.__getitem__], [ys.__getitem__]], splits=[range(n_train), range(n_train, n)])
    return dsets.dataloaders(bs=bs), xs, ys

class Spy(Callback):
    "Records, per training batch, the original targets, the mixed batch, MixUp's partner targets and λ, pred and loss"
    order = MixUp.order + 1
    def before_fit(self): self.rec = []
    def before_batch(self):
        if not self.training: return
        p = self.learn.mix_up._pending
        self.rec.append(dict(x=self.x.clone(), y=self.y.clone(), pending=None if p is None else (p[0][0].clone(), p[1].clone())))
    def after_loss(self):
        if self.training: self.rec[-1].update(pred=self.pred.detach().clone(), loss=self.loss.detach().clone())

def ce_ref(eps=0.):
    return lambda p, t: F.cross_entropy(p, t, reduction='none', label_smoothing=eps)

LOSSES = {
    'fastai CrossEntropyLossFlat': (CrossEntropyLossFlat, ce_ref()),
    'LabelSmoothingCrossEntropy': (LabelSmoothingCrossEntropy, ce_ref(0.1)),
    'LabelSmoothingCrossEntropyFlat': (lambda: LabelSmoothingCrossEntropyFlat(eps=0.2), ce_ref(0.2)),
    'F.cross_entropy': (lambda: F.cross_entropy, ce_ref()),
    'partial(F.cross_entropy, label_smoothing=0.1)': (lambda: partial(F.cross_entropy, label_smoothing=0.1), ce_ref(0.1)),
    'nn.CrossEntropyLoss': (nn.CrossEntropyLoss, ce_ref()),
    'custom function with reduction': (lambda: (lambda p, t, reduction='mean': F.nll_loss(F.log_softmax(p, 1), t, reduction=reduction)), ce_ref()),
}

@pytest.mark.parametrize('name', LOSSES)
def test_mixup_loss_equals_reference(name, backend):
    make, ref = LOSSES[name]
    torch.manual_seed(0)
    dls,_,_ = make_dls()
    lf = make()
    learn = Learner(dls, nn.Linear(4, C), loss_func=lf, cbs=[MixUp(0.4), Spy()])
    learn.fit(2)
    assert learn.loss_func is lf
    rec = learn.spy.rec
    assert len(rec) == 6 and all(r['pending'] is not None for r in rec)
    for r in rec:
        y2,lam = r['pending']
        assert (lam >= 0.5).all() and (lam <= 1).all() and not torch.equal(y2, r['y'])
        expected = (lam * ref(r['pred'], r['y']) + (1 - lam) * ref(r['pred'], y2)).mean()
        assert torch.allclose(r['loss'], expected, atol=1e-5), name

@pytest.mark.parametrize('lf', [BCEWithLogitsLossFlat(), LabelSmoothingBCEWithLogitsLossFlat(eps=0.1)])
def test_mixup_multi_hot_targets_are_mixed(lf):
    torch.manual_seed(0)
    dls,_,ys = make_dls(multi_hot=True)
    learn = Learner(dls, nn.Linear(4, C), loss_func=lf, cbs=[MixUp(0.4), Spy()])
    learn.fit(1)
    assert learn.loss_func is lf
    eps = getattr(lf, 'eps', 0.)
    for r in learn.spy.rec:
        assert r['pending'] is None
        y = r['y']
        assert ((y > 0) & (y < 1)).any(), 'targets were not mixed'
        assert ((y >= 0) & (y <= 1)).all()
        ref = F.binary_cross_entropy_with_logits(r['pred'], y * (1 - eps) + eps / 2)
        assert torch.allclose(r['loss'], ref, atol=1e-6)

def test_batch_of_one_is_unmixed():
    torch.manual_seed(0)
    dls,xs,ys = make_dls(bs=1, n_train=3)
    learn = Learner(dls, nn.Linear(4, C), loss_func=F.cross_entropy, cbs=[MixUp(), Spy()])
    learn.fit(1)
    assert len(learn.spy.rec) == 3
    for r in learn.spy.rec:
        assert r['pending'] is None
        assert any(torch.equal(r['x'][0], x) for x in xs[:3])
        assert torch.allclose(r['loss'], F.cross_entropy(r['pred'], r['y']))

def test_validation_get_preds_and_tta_see_unmixed_data():
    torch.manual_seed(0)
    dls,xs,ys = make_dls()
    learn = Learner(dls, nn.Linear(4, C), loss_func=LabelSmoothingCrossEntropyFlat(), cbs=MixUp())
    learn.fit(1)
    inp,logits,targs = learn.get_preds(with_input=True, act=no_activation)
    assert torch.equal(inp, xs[N_TRAIN:]) and torch.equal(targs, ys[N_TRAIN:])
    model_logits = learn.model.eval()(xs[N_TRAIN:]).detach()
    assert torch.allclose(logits, model_logits, atol=1e-6)
    probs,_ = learn.get_preds()
    assert torch.allclose(probs, F.softmax(model_logits, -1), atol=1e-6)
    p2,_ = learn.get_preds(act=BaseSoftmax(2))
    assert torch.allclose(p2, softmax_base(model_logits, 2), atol=1e-6)
    # no item transforms here, so every TTA pass equals the plain pass
    t_logits,_ = learn.tta(n=2, act=no_activation)
    assert torch.allclose(t_logits, model_logits, atol=1e-5)
    t2,_ = learn.tta(n=2, act=BaseSoftmax(2))
    assert torch.allclose(t2, softmax_base(model_logits, 2), atol=1e-5)
    (aug,plain),_ = learn.tta(n=2, beta=None)
    assert torch.allclose(plain, F.softmax(model_logits, -1), atol=1e-6)

class Fail(Callback):
    def __init__(self, event, exc, order): self.event,self.exc,self.order = event,exc,order
    def __getattr__(self, k):
        if k == self.event:
            def _raise():
                if self.training: raise self.exc('injected')
            return _raise
        return super().__getattr__(k)

@pytest.mark.parametrize('exc', [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize('event', ['before_batch', 'after_pred', 'after_loss', 'before_backward'])
@pytest.mark.parametrize('order', [-20, 20])
@pytest.mark.parametrize('cb', [MixUp, CutMix])
def test_loss_func_restored_after_any_error(exc, event, order, cb):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 40
    xs,ys = torch.randn(n, 1, 6, 6, generator=g),torch.randint(0, C, (n,), generator=g)
    dls = Datasets(range(n), [[xs.__getitem__], [ys.__getitem__]], splits=[range(32), range(32, n)]).dataloaders(bs=8)
    lf = LabelSmoothingCrossEntropyFlat()
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(36, C)), loss_func=lf, cbs=cb())
    with pytest.raises(exc):
        learn.fit(1, cbs=Fail(event, exc, order))
    assert learn.loss_func is lf and lf.reduction == 'mean'
    assert [type(c) for c in learn.cbs].count(cb) == 1 and not any(isinstance(c, Fail) for c in learn.cbs)
    learn.fit(1)
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][:2])).all()

@pytest.mark.parametrize('alpha', [0, -1., float('nan')])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match='`alpha`'): MixUp(alpha)
    with pytest.raises(ValueError, match='`alpha`'): CutMix(alpha)

def test_bad_options():
    with pytest.raises(ValueError, match='`mode`'): MixUp(mode='pair')
    with pytest.raises(ValueError, match='`prob`'): MixUp(prob=1.5)
    with pytest.raises(ValueError, match='`switch_prob`'): MixUp(switch_prob=-0.1)
    with pytest.raises(ValueError, match='`off_epochs`'): MixUp(off_epochs=-1)
    with pytest.raises(ValueError, match='`off_pct`'): MixUp(off_pct=1.)
    with pytest.raises(ValueError, match='`cutmix_alpha`'): MixUp(cutmix_alpha=-1)

def test_no_reduction_loss_gets_clear_error_and_learner_untouched():
    dls,_,_ = make_dls()
    def mean_only(p, t): return F.cross_entropy(p, t)
    learn = Learner(dls, nn.Linear(4, C), loss_func=mean_only, cbs=MixUp())
    with pytest.raises(TypeError, match='cannot give per-item losses'): learn.fit(1)
    assert learn.loss_func is mean_only
    learn.remove_cb(learn.mix_up)
    learn.fit(1)

@pytest.mark.gpu  # host-device syncs exist only with a GPU
def test_no_host_device_sync_per_batch():
    "MixUp's batch work and the one-pass mixed loss run with CUDA's sync debug mode set to raise"
    from fastai_regularize.losses import mixed_loss
    x,y = torch.randn(32, 3, 16, 16, device='cuda'),torch.randint(0, 10, (32,), device='cuda')
    pred = torch.randn(32, 10, device='cuda', requires_grad=True)
    torch.cuda.set_sync_debug_mode('error')
    try:
        for cb in (MixUp(), CutMix(), MixUp(cutmix_alpha=1., mode='elem', prob=0.8)):
            _,_,(y2,lam) = cb.mix((x,), (y,))
            mixed_loss(LabelSmoothingCrossEntropyFlat(), pred, (y,), y2, lam).backward()
    finally: torch.cuda.set_sync_debug_mode('default')

# ---------------------------------------------------------------- a table with continuous columns only
@pytest.fixture(scope='module')
def cont_table():
    "The digits as 64 pixel columns, without `digits_table()`'s categorical columns, and the same rows with them"
    from fastai.data.block import CategoryBlock
    from fastai.tabular.core import Categorify, Normalize
    from fastai.tabular.data import TabularDataLoaders
    from fastai_regularize.data import digits_table, DIGITS_CAT_NAMES
    df = digits_table()
    pixels = [c for c in df.columns if c.startswith('pixel_')]
    valid_idx = np.random.default_rng(0).permutation(len(df))[:360].tolist()
    kw = dict(cont_names=pixels, y_names='label', y_block=CategoryBlock(), valid_idx=valid_idx, bs=64, device='cpu')
    set_seed(0)
    cont = TabularDataLoaders.from_df(df.drop(columns=list(DIGITS_CAT_NAMES)), procs=[Normalize], **kw)
    with_cats = TabularDataLoaders.from_df(df, procs=[Categorify, Normalize], cat_names=list(DIGITS_CAT_NAMES), **kw)
    return cont, with_cats

def _match_shift(out, x, lam):
    "The shift k with out[i] = λ[i]·x[i] + (1-λ[i])·x[(i+k) % n] for every item, found by trying each; None if none fits"
    w = lam.double().view(-1, 1)
    for k in range(1, x.shape[0]):
        if torch.allclose(out.double(), w * x.double() + (1 - w) * x.double().roll(-k, 0), atol=1e-5): return k
    return None

@pytest.mark.parametrize('make', [MixUp, lambda: MixUp(label='dominant'), RegMixUp, lambda: RegMixUp(label='dominant')],
                         ids=['MixUp', 'MixUp-dominant', 'RegMixUp', 'RegMixUp-dominant'])
def test_continuous_only_table_trains(cont_table, make):
    "fastai's empty (N, 0) int64 category codes pass through; the pixel columns are λ·x + (1-λ)·x[(i+k) % n], by hand"
    from fastai.tabular.learner import tabular_learner
    from fastai.metrics import accuracy
    from fastai.callback.progress import ProgressCallback
    dls,_ = cont_table
    cb = make()
    class Look(Callback):
        "Runs after the mixing callback: the batch the model gets, against the one the loader gave"
        order = cb.order + 1
        def before_fit(self): self.n = 0
        def before_batch(self):
            if not self.training: return
            cats,conts = self.xb
            assert cats.shape[1] == 0 and cats.dtype == torch.int64
            raw_cats,raw_conts = self.look_raw.raw
            n = raw_conts.shape[0]
            assert cats.shape[0] == conts.shape[0] == (2 * n if isinstance(cb, RegMixUp) else n)
            if isinstance(cb, RegMixUp): assert torch.equal(conts[:n], raw_conts); conts = conts[n:]
            p = cb._pending if not isinstance(cb, RegMixUp) else cb._reg[2]
            if cb.label == 'mixed':
                lam = p[1]
            else:  # no λ is kept in the dominant mode: the item's own target is the label (λ >= 1/2)
                assert p is None
                lam = None
            if lam is not None: assert _match_shift(conts, raw_conts, lam) is not None, 'pixels not mixed as λ·x + (1-λ)·x[(i+k) % n]'
            else: assert not torch.equal(conts, raw_conts)
            self.n += 1
    class LookRaw(Callback):
        order = cb.order - 1
        def before_batch(self):
            if self.training: self.raw = tuple(t.clone() for t in self.xb)
    set_seed(0)
    learn = tabular_learner(dls, layers=[64], metrics=accuracy, cbs=[cb, Look(), LookRaw()])
    learn.remove_cb(ProgressCallback)
    learn.fit_one_cycle(3, 1e-2)
    assert learn.look.n == 3 * len(dls.train)
    assert all(math.isfinite(float(l)) for l in learn.recorder.losses)
    acc = learn.recorder.values[-1][2]
    assert acc > 0.85, f'accuracy {acc:.3f} (chance 0.1)'

def test_nonempty_codes_still_refused(cont_table):
    "A table with categorical columns, and token ids: refused with a pointer to ManifoldMixUp, whatever the empty inputs"
    _,dls = cont_table
    cats,conts,y = dls.one_batch()
    assert cats.shape[1] == 2 and cats.dtype == torch.int64
    for cb in (MixUp(), RegMixUp(), MixUp(label='dominant')):
        with pytest.raises(TypeError, match=r"`xb\[0\]` is torch.int64.*ManifoldMixUp"): cb.mix((cats, conts), (y,))
    toks,empty = torch.randint(0, 50, (8, 12)),torch.zeros(8, 0)
    with pytest.raises(TypeError, match=r"`xb\[1\]` is torch.int64"): MixUp().mix((empty, toks), (torch.arange(8),))

def test_empty_inputs_pass_through_unchanged():
    "Empty inputs of any dtype are returned as they are; the float ones beside them are mixed"
    torch.manual_seed(0)
    x,y = torch.randn(8, 5),torch.arange(8)
    for empty in (torch.zeros(8, 0, dtype=torch.int64), torch.zeros(8, 0)):
        (e2,x2),_,(y2,lam) = MixUp().mix((empty, x), (y,))
        assert e2 is empty and _match_shift(x2, x, lam) is not None
    with pytest.raises(TypeError, match=r"CutMix pastes boxes into images.*`xb\[1\]` has shape \(8, 5\)"):
        CutMix().mix((torch.zeros(8, 0, dtype=torch.int64), x), (y,))
