"""Issue #6, "Never break a training run": bad inputs, faults at every training event, export/load in a fresh
process, half-precision inputs, segmentation. The table of bad inputs is `docs/bad_inputs.md`.

The calibration parts run once `fastai_regularize.calibration` exists (`pytest.importorskip` / `_calibration()`)."""
import json, math, os, subprocess, sys, textwrap
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image

from fastai.callback.core import Callback
from fastai.data.block import DataBlock, CategoryBlock
from fastai.data.transforms import RandomSplitter, parent_label, get_image_files
from fastai.learner import Learner
from fastai.layers import ConvLayer, Flatten
from fastai.torch_core import set_seed, TensorImage, TensorCategory
from fastai.data.core import DataLoaders
from fastai.callback.progress import ProgressCallback
from fastai.vision.data import ImageBlock, MaskBlock, ImageDataLoaders
from fastai.vision.augment import Flip
from fastai.data.transforms import Normalize
from fastai.vision.learner import vision_learner, unet_learner
from fastai.interpret import ClassificationInterpretation
from torchvision.models import resnet18

from fastai_regularize.activations import BaseSoftmax, softmax_base, log_softmax_base
from fastai_regularize.losses import (label_smoothing_cross_entropy, LabelSmoothingCrossEntropy,
    LabelSmoothingCrossEntropyFlat, LabelSmoothingBCEWithLogitsLossFlat, mixed_loss)
from fastai_regularize.mixup import MixUp, CutMix

torch.set_flush_denormal(True)
torch.set_num_threads(1)  # tiny models on a shared 2-core machine: more threads only add contention
ROOT = Path(__file__).resolve().parents[1]
N_CLS = 3

def _calibration():
    "The calibration module, or None while it is not on this branch"
    try:
        import fastai_regularize.calibration as cal
        return cal
    except ImportError: return None

# ---------------------------------------------------------------- data
def _write_images(root:Path, n_per_class:int=12, size:int=16, seed:int=0):
    "n_per_class RGB PNGs per class, class c brighter in channel c, in root/<class>/"
    rng = np.random.default_rng(seed)
    for c in range(N_CLS):
        (root/f'c{c}').mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            a = rng.integers(0, 120, (size, size, 3))
            a[..., c] += 120
            Image.fromarray(a.astype(np.uint8)).save(root/f'c{c}'/f'{i}.png')
    return root

@pytest.fixture(scope='module')
def img_path(tmp_path_factory): return _write_images(tmp_path_factory.mktemp('imgs'))

def _dls(path, bs=8, **kw):
    return ImageDataLoaders.from_folder(path, valid_pct=0.25, seed=0, bs=bs, num_workers=0,
                                        batch_tfms=[Normalize.from_stats([0.5]*3, [0.25]*3)], **kw)

def _tensor_dls(n_train=16, n_valid=8, bs=8):
    "In-memory images (no PNG decoding: the fault grid runs ~200 fits), with a Normalize in after_batch"
    g = torch.Generator().manual_seed(0)
    def items(n):
        x,y = torch.rand(n, 3, 16, 16, generator=g),torch.arange(n) % N_CLS
        x[torch.arange(n), y] += 0.5
        return [(TensorImage(x[i]), TensorCategory(y[i])) for i in range(n)]
    return DataLoaders.from_dsets(items(n_train), items(n_valid), bs=bs, device='cpu',
                                  after_batch=[Normalize.from_stats([0.5]*3, [0.25]*3)])

@pytest.fixture(scope='module')
def dls(): return _tensor_dls()

def _tiny_cnn(): return nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 8, stride=2), nn.AdaptiveAvgPool2d(1),
                                      Flatten(), nn.Linear(8, N_CLS))

class PerItemLoss(nn.Module):
    "A loss fastai_regularize knows nothing about: MixUp reaches its per-item values through `reduction`"
    def __init__(self, reduction='mean'): super().__init__(); self.reduction = reduction
    def forward(self, x, y):
        l = F.cross_entropy(x, y, reduction='none')
        return l if self.reduction == 'none' else l.mean() if self.reduction == 'mean' else l.sum()

# ================================================================ 1. bad inputs
@pytest.mark.parametrize('make,name', [
    (lambda: MixUp(0.), 'alpha'), (lambda: MixUp(-1.), 'alpha'), (lambda: MixUp(float('nan')), 'alpha'),
    (lambda: MixUp(float('inf')), 'alpha'), (lambda: CutMix(0.), 'alpha'), (lambda: CutMix(-0.5), 'alpha'),
    (lambda: MixUp(cutmix_alpha=-1.), 'cutmix_alpha'),
    (lambda: MixUp(prob=-0.1), 'prob'), (lambda: MixUp(prob=1.5), 'prob'),
    (lambda: MixUp(switch_prob=-0.1), 'switch_prob'), (lambda: MixUp(switch_prob=1.01), 'switch_prob'),
    (lambda: CutMix(prob=2.), 'prob'), (lambda: MixUp(mode='pixel'), 'mode'), (lambda: CutMix(mode='Batch'), 'mode'),
    (lambda: MixUp(off_epochs=-1), 'off_epochs'), (lambda: MixUp(off_pct=1.), 'off_pct'),
])
def test_mixup_arguments_out_of_range(make, name):
    with pytest.raises(ValueError, match=f"`{name}`"): make()

@pytest.mark.parametrize('make', [lambda: MixUp('0.4'), lambda: MixUp(prob=None), lambda: MixUp(True)])
def test_mixup_arguments_wrong_type(make):
    with pytest.raises(TypeError, match='must be a number'): make()

_LS_CTORS = [LabelSmoothingCrossEntropy, LabelSmoothingCrossEntropyFlat, LabelSmoothingBCEWithLogitsLossFlat,
             lambda eps: label_smoothing_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), eps=eps)]

@pytest.mark.parametrize('ctor', _LS_CTORS, ids=['LSCE', 'LSCEFlat', 'LSBCEFlat', 'function'])
@pytest.mark.parametrize('eps', [-0.01, 1.01, float('nan'), float('inf')])
def test_label_smoothing_eps_out_of_range(ctor, eps):
    with pytest.raises(ValueError, match=r"`eps` must be in \[0, 1\]"): ctor(eps=eps)

@pytest.mark.parametrize('ctor', _LS_CTORS, ids=['LSCE', 'LSCEFlat', 'LSBCEFlat', 'function'])
@pytest.mark.parametrize('eps', [0., 1.])
def test_label_smoothing_eps_endpoints_allowed(ctor, eps): ctor(eps=eps)

def test_reduction_unknown():
    with pytest.raises(ValueError, match="`reduction`"): LabelSmoothingCrossEntropy(reduction='avg')

@pytest.mark.parametrize('base', [0, -1., 1, 1., float('nan'), float('inf'), -float('inf')])
@pytest.mark.parametrize('f', [BaseSoftmax, lambda b: softmax_base(torch.zeros(2, 3), b),
                               lambda b: log_softmax_base(torch.zeros(2, 3), b)], ids=['BaseSoftmax', 'softmax_base', 'log_softmax_base'])
def test_base_out_of_range(f, base):
    with pytest.raises(ValueError, match="`base`"): f(base)

def test_temperature_out_of_range():
    for t in (0., -1., float('inf')):
        with pytest.raises(ValueError, match="`temperature`"): BaseSoftmax.from_temperature(t)

_CE_LOSSES = [lambda: LabelSmoothingCrossEntropy(0.1), lambda: LabelSmoothingCrossEntropyFlat(eps=0.1)]

@pytest.mark.parametrize('mk', _CE_LOSSES, ids=['LSCE', 'LSCEFlat'])
@pytest.mark.parametrize('bad', [N_CLS, -1, 100])
def test_target_out_of_range(mk, bad):
    "PyTorch raises an IndexError (CPU) or a device-side assert (CUDA); ours a ValueError naming the value and [0, C)"
    x,y = torch.randn(4, N_CLS),torch.tensor([0, 1, bad, 2])
    with pytest.raises((IndexError, RuntimeError)): F.cross_entropy(x, y, label_smoothing=0.1)  # the reference raises too
    with pytest.raises(ValueError, match=rf"`target` holds class index {bad}, outside \[0, {N_CLS}\)"): mk()(x, y)

def test_target_out_of_range_through_mixed_loss():
    x,y1,y2 = torch.randn(4, N_CLS),torch.tensor([0, 1, 2, 2]),torch.tensor([0, N_CLS, 2, 2])
    for lf in (LabelSmoothingCrossEntropyFlat(), PerItemLoss()):
        with pytest.raises((ValueError, IndexError), match=f"{N_CLS}"): mixed_loss(lf, x, (y1,), (y2,), torch.full((4,), .7))

def test_ignore_index_is_not_out_of_range():
    x,y = torch.randn(4, N_CLS),torch.tensor([0, -100, 2, 1])
    torch.testing.assert_close(LabelSmoothingCrossEntropy(0.1)(x, y), F.cross_entropy(x, y, label_smoothing=0.1))

@pytest.mark.parametrize('mk', _CE_LOSSES, ids=['LSCE', 'LSCEFlat'])
@pytest.mark.parametrize('shape', [(5,), (4, 1), (2, 2), (4, N_CLS)])
def test_target_shape_mismatch(mk, shape):
    x = torch.randn(4, N_CLS)
    y = torch.zeros(shape, dtype=torch.long)
    if mk is _CE_LOSSES[1] and shape == (4, 1):
        # fastai's tabular targets: the Flat loss drops the size-one dim, as `CrossEntropyLossFlat` does
        torch.testing.assert_close(mk()(x, y), F.cross_entropy(x, y[:, 0], label_smoothing=0.1)); return
    with pytest.raises(ValueError, match=r"`target` shape .* does not match logits of shape \(4, 3\)"): mk()(x, y)

def test_flat_target_shape_mismatch_through_mixed_loss():
    "MixUp's loss path flattens targets as the Flat loss does: (4, 1) is taken, (2, 2) for 4 items is refused"
    x,lam = torch.randn(4, N_CLS),torch.full((4,), .7)
    with pytest.raises(ValueError, match=r"`target` shape \(2, 2\)"):
        mixed_loss(LabelSmoothingCrossEntropyFlat(), x, (torch.zeros(2, 2, dtype=torch.long),), (torch.zeros(2, 2, dtype=torch.long),), lam)
    y1,y2 = torch.tensor([0, 1, 2, 2]),torch.tensor([1, 1, 0, 2])
    torch.testing.assert_close(mixed_loss(LabelSmoothingCrossEntropyFlat(), x, (y1[:, None],), (y2[:, None],), lam),
                               .7*F.cross_entropy(x, y1, label_smoothing=0.1) + .3*F.cross_entropy(x, y2, label_smoothing=0.1))

def test_target_float_shape_mismatch():
    with pytest.raises(ValueError, match="`target` of class probabilities"):
        LabelSmoothingCrossEntropy()(torch.randn(4, N_CLS), torch.rand(4, N_CLS + 1))
    with pytest.raises(ValueError, match="`targ` must be multi-hot"):
        LabelSmoothingBCEWithLogitsLossFlat()(torch.randn(4, N_CLS), torch.rand(4, N_CLS + 1))

def test_target_bool_dtype():
    with pytest.raises(TypeError, match="`target` must hold integer class indices"):
        LabelSmoothingCrossEntropy()(torch.randn(4, N_CLS), torch.zeros(4, dtype=torch.bool))

def test_target_other_integer_dtypes():
    x,y = torch.randn(6, N_CLS),torch.tensor([0, 1, 2, 2, 1, 0])
    ref = F.cross_entropy(x, y, label_smoothing=0.1)
    for dt in (torch.int32, torch.uint8, torch.int16):
        torch.testing.assert_close(LabelSmoothingCrossEntropy(0.1)(x, y.to(dt)), ref)

def _nan_inf_logits():
    z = torch.randn(5, N_CLS)
    z[1, 0] = float('nan'); z[2, 1] = float('inf'); z[3, 2] = -float('inf'); z[4] = float('inf')
    return z, torch.tensor([0, 1, 2, 1, 0])

@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
def test_nan_inf_logits_propagate_like_pytorch(reduction):
    "Decision: no silent masking. NaN/inf logits give exactly what F.cross_entropy gives: NaN (or inf) for those items"
    z,y = _nan_inf_logits()
    z1,z2 = z.clone().requires_grad_(),z.clone().requires_grad_()
    ref = F.cross_entropy(z1, y, label_smoothing=0.1, reduction=reduction)
    out = LabelSmoothingCrossEntropy(0.1, reduction=reduction)(z2, y)
    torch.testing.assert_close(out, ref, equal_nan=True)
    ref.sum().backward(); out.sum().backward()
    torch.testing.assert_close(z2.grad, z1.grad, equal_nan=True)
    if reduction == 'none': assert torch.isfinite(out[0]) and out[1:3].isnan().all()

def test_nan_logits_through_mixed_loss_stay_in_their_item():
    z,y1 = _nan_inf_logits()
    y2,lam = y1.roll(-1),torch.tensor([.9, .8, .7, .6, .55])
    # the weighted sum, not torch.lerp: lerp(inf, inf, w) is nan, the mixed loss of two infinite losses is inf
    ref = (lam * F.cross_entropy(z, y1, label_smoothing=0.1, reduction='none')
           + (1 - lam) * F.cross_entropy(z, y2, label_smoothing=0.1, reduction='none'))
    out = mixed_loss(LabelSmoothingCrossEntropyFlat(eps=0.1, reduction='none'), z, (y1,), (y2,), lam)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.isfinite(out[0]) and out[3] == float('inf')

def _fit_learner(dls, lf, cbs, **kw):
    set_seed(0)
    learn = Learner(dls, _tiny_cnn(), loss_func=lf, cbs=cbs, **kw)
    learn.remove_cb(ProgressCallback)  # speed; the fault checks compare learn.cbs from here on
    return learn

def _no_reduction_loss(pred, targ): return F.cross_entropy(pred, targ)

class ScalarOnlyLoss(nn.Module):
    "Has a `reduction` attribute but ignores it: cannot give per-item values"
    reduction = 'mean'
    def forward(self, x, y): return F.cross_entropy(x, y)

@pytest.mark.parametrize('mk', [lambda: _no_reduction_loss, ScalarOnlyLoss], ids=['no_reduction_kw', 'ignores_reduction'])
def test_loss_without_per_item_values_with_mixup(dls, mk):
    lf = mk()
    learn = _fit_learner(dls, lf, [MixUp(0.4)])
    with pytest.raises(TypeError, match="per-item"): learn.fit(1)
    assert learn.loss_func is lf
    if isinstance(lf, nn.Module): assert lf.reduction == 'mean'

def test_integer_inputs_rejected_by_mixup():
    x,y = torch.randint(0, 100, (4, 10)),torch.tensor([0, 1, 2, 0])
    with pytest.raises(TypeError, match=r"`xb\[0\]` is torch.int64"): MixUp(0.4).mix((x,), (y,))
    with pytest.raises(TypeError, match=r"`xb\[1\]`"): MixUp(0.4).mix((x.float(), x), (y,))

def test_cutmix_needs_images():
    with pytest.raises(TypeError, match=r"`xb\[0\]` has shape \(4, 10\)"): CutMix(1.).mix((torch.randn(4, 10),), (torch.tensor([0, 1, 2, 0]),))

def test_cutmix_accepts_integer_images():
    "CutMix only copies pixels, so uint8 images are fine"
    torch.manual_seed(0)
    x = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)
    (xo,),_,_ = CutMix(1.).mix((x,), (torch.tensor([0, 1, 2, 0]),))
    assert xo.dtype == torch.uint8 and set(xo.unique().tolist()) <= set(x.unique().tolist())

def test_mixed_target_dtypes_rejected():
    with pytest.raises(TypeError, match="partly class indices and partly float"):
        MixUp(0.4).mix((torch.randn(4, 3),), (torch.tensor([0, 1, 2, 0]), torch.rand(4)))

@pytest.mark.parametrize('n', [0, 1])
def test_empty_and_single_item_batches_pass_through(n):
    x,y = torch.randn(n, 3, 8, 8),torch.randint(0, N_CLS, (n,))
    for mu in (MixUp(0.4), CutMix(1.), MixUp(0.4, cutmix_alpha=1., mode='elem')):
        xb,yb,pending = mu.mix((x,), (y,))
        assert xb[0] is x and yb[0] is y and pending is None
    z = torch.randn(n, N_CLS)
    for red in ('mean', 'sum', 'none'):  # the unmixed loss equals PyTorch's on these batches (mean of nothing: nan)
        torch.testing.assert_close(LabelSmoothingCrossEntropyFlat(eps=0.1, reduction=red)(z, y),
                                   F.cross_entropy(z, y, label_smoothing=0.1, reduction=red), equal_nan=True)

class Grab(Callback):
    "Record the batch before mixing (order -10) and the loss the learner used (after_loss, order 0)"
    order = 0
    def __init__(self): self.raw,self.seen = [],[]
    def before_batch(self):
        if self.training: self.raw.append((self.xb[0].clone(), self.yb[0].clone()))
    def after_loss(self):
        if self.training: self.seen.append((self.xb[0].clone(), self.pred.detach().clone(), self.loss.detach().clone()))

def test_batch_of_one_in_a_learner_gives_the_unmixed_loss():
    dls1 = _tensor_dls(n_train=4, n_valid=2, bs=1)
    lf = LabelSmoothingCrossEntropyFlat(eps=0.1)
    grab = Grab(); grab_pre = Grab(); grab_pre.order = -10
    learn = _fit_learner(dls1, lf, [MixUp(1.), CutMix(1.), grab, grab_pre])
    learn.fit(1, lr=1e-3)
    assert len(grab.seen) == len(dls1.train)
    for (x0,y0),(x,pred,loss) in zip(grab_pre.raw, grab.seen):
        assert torch.equal(x, x0)
        torch.testing.assert_close(loss, F.cross_entropy(pred, y0, label_smoothing=0.1))

def test_targets_on_the_inputs_device_after_mixing():
    "CPU part of 'targets on another device': λ, partners and targets stay on the device they came on"
    x,y = torch.randn(4, 3, 8, 8),torch.tensor([0, 1, 2, 0])
    _,yb,(yb2,lam) = MixUp(0.4).mix((x,), (y,))
    assert yb[0].device == yb2[0].device == lam.device == x.device

@pytest.mark.gpu
def test_targets_on_another_device_cuda():
    "Logits on CUDA, targets on CPU: the plain loss raises like F.cross_entropy; MixUp's mixed loss moves them"
    z = torch.randn(6, N_CLS, device='cuda')
    y1,y2 = torch.tensor([0, 1, 2, 2, 1, 0]),torch.tensor([1, 1, 0, 2, 0, 0])
    lam = torch.rand(6, device='cuda')
    with pytest.raises(RuntimeError): F.cross_entropy(z, y1)
    with pytest.raises(RuntimeError): LabelSmoothingCrossEntropy(0.1)(z, y1)
    ref = mixed_loss(LabelSmoothingCrossEntropyFlat(eps=0.1), z, (y1.cuda(),), (y2.cuda(),), lam)
    torch.testing.assert_close(mixed_loss(LabelSmoothingCrossEntropyFlat(eps=0.1), z, (y1,), (y2,), lam), ref)
    torch.testing.assert_close(mixed_loss(LabelSmoothingCrossEntropyFlat(eps=0.1), z, (y1.cuda(),), (y2,), lam), ref)

# ================================================================ 2. fault injection
class Boom(Callback):
    "Raise `exc` the first time `event` fires in the chosen phase (train / valid / either)"
    def __init__(self, event:str, exc:type, order:int):
        self.ev = 'before_batch' if event == 'valid_before_batch' else event
        self.phase = None if event == 'after_epoch' else (event != 'valid_before_batch')
        self.exc,self.order,self.fired = exc,order,False
        setattr(self, self.ev, self._boom)
    def _boom(self):
        if self.fired or (self.phase is not None and self.learn.training != self.phase): return
        self.fired = True
        raise self.exc(f'injected at {self.ev}')

EVENTS = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_step', 'after_epoch', 'valid_before_batch']
_REF_MODE = {}

def _reference_mode(dls, event, exc):
    "The model mode plain fastai (no callbacks of ours) ends in after the same fault"
    if (event, exc) not in _REF_MODE:
        learn = _fit_learner(dls, nn.CrossEntropyLoss(), [Boom(event, exc, 0)])
        with pytest.raises(exc): learn.fit(1)
        _REF_MODE[(event, exc)] = learn.model.training
    return _REF_MODE[(event, exc)]

def _snapshot(learn):
    return dict(lf=learn.loss_func, red=learn.loss_func.reduction, cbs=list(learn.cbs), loaders=list(learn.dls.loaders),
                tfms=[[id(f) for f in getattr(dl, k).fs] for dl in learn.dls.loaders for k in ('after_item', 'before_batch', 'after_batch')],
                act=getattr(learn, 'default_act', None), model=learn.model)

def _check_restored(learn, snap, mode):
    assert learn.loss_func is snap['lf'] and learn.loss_func.reduction == snap['red']
    assert list(learn.cbs) == snap['cbs'] and all(a is b for a,b in zip(learn.cbs, snap['cbs']))
    assert all(a is b for a,b in zip(learn.dls.loaders, snap['loaders']))
    assert _snapshot(learn)['tfms'] == snap['tfms']
    assert getattr(learn, 'default_act', None) is snap['act'] and learn.model is snap['model']
    assert learn.model.training == mode

def _second_fit_finite(learn):
    learn.fit(1, lr=1e-3)
    assert learn.recorder.losses and all(math.isfinite(float(l)) for l in learn.recorder.losses)
    assert all(math.isfinite(v) for v in learn.recorder.values[-1][:2])

MIXERS = {'MixUp': (lambda: MixUp(0.4), lambda: LabelSmoothingCrossEntropyFlat(eps=0.1)),   # one-pass CE path
          'CutMix': (lambda: CutMix(1.), PerItemLoss),                                     # NoneReduce path
          'both_elem': (lambda: MixUp(0.4, cutmix_alpha=1., mode='elem'), lambda: LabelSmoothingCrossEntropy(0.1))}

# the full grid for MixUp and CutMix; the per-item MixUp/CutMix switch with one exception type and order
_GRID = ([(e, x, o, m) for e in EVENTS for x in (RuntimeError, KeyboardInterrupt) for o in (-6, 0) for m in ('MixUp', 'CutMix')]
         + [(e, RuntimeError, 0, 'both_elem') for e in EVENTS])

@pytest.mark.parametrize('event,exc,order,mixer', _GRID,
                         ids=[f"{e}-{x.__name__}-{'before' if o < -5 else 'after'}_mixup-{m}" for e,x,o,m in _GRID])
def test_fault_at_every_event_leaves_learner_intact(dls, event, exc, order, mixer):
    mk_cb,mk_lf = MIXERS[mixer]
    learn = _fit_learner(dls, mk_lf(), [mk_cb(), Boom(event, exc, order)])
    learn.model.eval()  # what the user left; fastai's TrainEvalCallback switches it in fit anyway
    snap = _snapshot(learn)
    with pytest.raises(exc, match='injected'): learn.fit(1)
    assert learn.cbs.filter(lambda c: isinstance(c, Boom))[0].fired
    _check_restored(learn, snap, _reference_mode(dls, event, exc))
    _second_fit_finite(learn)
    _check_restored(learn, snap, False)

@pytest.mark.parametrize('order', [-6, 0], ids=['before_mixup', 'after_mixup'])
@pytest.mark.parametrize('exc', [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize('event', ['after_pred', 'after_loss', 'valid_before_batch'])
def test_fault_with_calibrated_learner(dls, event, exc, order):
    "A calibrated learner keeps its `default_act` through a fault in fit, and through a fault inside `calibrate`"
    cal = _calibration()
    if cal is None: pytest.skip('fastai_regularize.calibration is not on this branch yet')
    learn = _fit_learner(dls, LabelSmoothingCrossEntropyFlat(eps=0.1), [MixUp(0.4)])
    learn.fit(1)
    learn.calibrate()
    learn.add_cb(Boom(event, exc, order))
    snap = _snapshot(learn)
    assert snap['act'] is not None
    with pytest.raises(exc, match='injected'): learn.fit(1)
    _check_restored(learn, snap, _reference_mode(dls, event, exc))
    _second_fit_finite(learn)
    # now a fault inside calibrate's own validation pass
    boom = Boom('valid_before_batch', exc, order)
    learn.add_cb(boom)
    snap = _snapshot(learn)
    with pytest.raises(exc, match='injected'): learn.calibrate()
    assert boom.fired
    _check_restored(learn, snap, False)
    learn.calibrate()
    assert getattr(learn, 'default_act', None) is not None

def test_fault_inside_the_users_loss_restores_its_reduction(dls):
    "An exception inside the loss while MixUp has it at reduction='none' still puts 'mean' back"
    class Flaky(PerItemLoss):
        calls = 0
        def forward(self, x, y):
            if self.reduction == 'none':
                Flaky.calls += 1
                if Flaky.calls == 2: raise RuntimeError('loss failed')
            return super().forward(x, y)
    lf = Flaky()
    learn = _fit_learner(dls, lf, [MixUp(0.4)])
    with pytest.raises(RuntimeError, match='loss failed'): learn.fit(1)
    assert learn.loss_func is lf and lf.reduction == 'mean'
    _second_fit_finite(learn)

# ================================================================ 3. export, load in a fresh process
_CHILD = textwrap.dedent('''
    import json, sys, torch
    torch.set_flush_denormal(True)
    from pathlib import Path
    from fastai.learner import load_learner
    from fastai.torch_core import set_seed
    from fastai.interpret import ClassificationInterpretation
    import fastai_regularize.all  # noqa: F401  the exported learner's loss and callbacks live here
    out = Path(sys.argv[1])
    files = [Path(f) for f in json.loads((out/'files.json').read_text())]
    learn = load_learner(out/'export.pkl')
    tdl = learn.dls.test_dl(files, with_labels=True)
    res = {}
    dec,idx,probs = learn.predict(files[0])
    res['predict'] = (str(dec), int(idx), probs)
    res['get_preds'] = learn.get_preds(dl=tdl)
    set_seed(0); res['tta'] = learn.tta(dl=tdl, n=2)
    res['confusion'] = ClassificationInterpretation.from_learner(learn, dl=tdl).confusion_matrix()
    res['loss_func'] = type(learn.loss_func).__name__, learn.loss_func.func.eps, learn.loss_func.reduction
    res['cbs'] = sorted(type(c).__name__ for c in learn.cbs)
    res['base'] = getattr(getattr(learn, 'default_act', None), 'base', None)
    torch.save(res, out/'child.pt')
''')

def _export_results(learn, files):
    tdl = learn.dls.test_dl(files, with_labels=True)
    dec,idx,probs = learn.predict(files[0])
    res = {'predict': (str(dec), int(idx), probs), 'get_preds': learn.get_preds(dl=tdl)}
    set_seed(0); res['tta'] = learn.tta(dl=tdl, n=2)
    res['confusion'] = ClassificationInterpretation.from_learner(learn, dl=tdl).confusion_matrix()
    return res

@pytest.mark.slow
def test_export_and_load_in_a_fresh_process(img_path, tmp_path):
    set_seed(0)
    dls = ImageDataLoaders.from_folder(img_path, valid_pct=0.25, seed=0, bs=8, num_workers=0,
                                       batch_tfms=[Flip(p=0.5), Normalize.from_stats([0.5]*3, [0.25]*3)])
    lf = LabelSmoothingCrossEntropyFlat(eps=0.1)
    learn = vision_learner(dls, resnet18, pretrained=False, loss_func=lf, cbs=MixUp(0.4))
    learn.fit(1, lr=1e-3)
    cal = _calibration()
    if cal is not None: learn.calibrate()
    files = sorted(get_image_files(img_path))[::4]
    (tmp_path/'files.json').write_text(json.dumps([str(f) for f in files]))
    learn.export(tmp_path/'export.pkl')
    assert learn.loss_func is lf and lf.reduction == 'mean'
    ref = _export_results(learn, files)
    (tmp_path/'child.py').write_text(_CHILD)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    r = subprocess.run([sys.executable, str(tmp_path/'child.py'), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-4000:]
    got = torch.load(tmp_path/'child.pt', weights_only=False)
    assert got['predict'][:2] == ref['predict'][:2]
    torch.testing.assert_close(got['predict'][2], ref['predict'][2])
    for k in ('get_preds', 'tta'):
        for a,b in zip(got[k], ref[k]): torch.testing.assert_close(a, b)
    np.testing.assert_array_equal(got['confusion'], ref['confusion'])
    assert got['confusion'].sum() == len(files)
    assert got['loss_func'] == ('LabelSmoothingCrossEntropyFlat', 0.1, 'mean')
    assert 'MixUp' in got['cbs']
    if cal is not None: assert got['base'] == learn.default_act.base

# ================================================================ 4. half-precision inputs
@pytest.mark.parametrize('dt', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('seed', range(3))
def test_mixup_on_half_inputs_matches_float64(dt, seed):
    "λ is applied in float32 at least: the only error left is rounding the result to the output dtype"
    torch.manual_seed(seed)
    n = 32
    x = (torch.randn(n, 3, 4, 4) * 1000).to(dt)  # large values of both signs: a λ rounded to half would show
    y = torch.arange(n)
    (xo,),_,(yb2,lam) = MixUp(0.4).mix((x,), (y,))
    k = int(yb2[0][0])
    assert xo.dtype == dt and torch.equal(yb2[0], y.roll(-k))
    x64,lam64 = x.double(),lam.double().view(n, 1, 1, 1)
    ref = lam64 * x64 + (1 - lam64) * x64.roll(-k, 0)
    u = torch.finfo(dt).eps / 2                      # unit roundoff of the output dtype
    bound = u * ref.abs() + 4 * 2.**-24 * (x64.abs() + x64.roll(-k, 0).abs()) + torch.finfo(dt).tiny
    err = (xo.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"

@pytest.mark.parametrize('dt', [torch.float16, torch.bfloat16])
def test_cutmix_on_half_inputs_copies_exactly(dt):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8).to(dt)
    (xo,),_,_ = CutMix(1.).mix((x,), (torch.arange(8),))
    assert xo.dtype == dt
    for i in range(8):  # every pixel is an exact copy of the item's or another item's pixel
        assert ((xo[i][None] == x).all(1)).any(0).all()

@pytest.mark.parametrize('dt', [torch.float16, torch.bfloat16])
def test_soft_targets_mixed_in_float32(dt):
    torch.manual_seed(0)
    y = F.one_hot(torch.arange(8) % N_CLS, N_CLS).to(dt)
    _,(yo,),pending = MixUp(0.4).mix((torch.randn(8, 5).to(dt),), (y,))
    assert pending is None and yo.dtype == dt
    torch.testing.assert_close(yo.double().sum(1), torch.ones(8, dtype=torch.float64), atol=torch.finfo(dt).eps, rtol=0)

# ================================================================ 5. segmentation
def _seg_batch(n=8, C=N_CLS, H=8, W=8):
    "Images whose item i has values in (i, i+0.5): every pixel tells which item it came from"
    g = torch.Generator().manual_seed(1)
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) + 0.5 * torch.rand(n, 3, H, W, generator=g)
    m = torch.randint(0, C, (n, H, W), generator=g)
    return x, m

@pytest.mark.parametrize('seed', range(4))
def test_cutmix_cuts_mask_with_the_image_box(seed):
    torch.manual_seed(seed)
    x,m = _seg_batch()
    (xo,),(mo,),(yb2,lam) = CutMix(1.).mix((x,), (m,))
    src = xo.floor().long()[:, 0]                    # which item each output pixel came from
    n = x.shape[0]
    for i in range(n):
        inside = src[i] != i
        assert (xo.floor().long()[i] == src[i][None]).all()  # all 3 channels from the same item
        if inside.any():
            rows,cols = inside.any(1).nonzero()[:, 0],inside.any(0).nonzero()[:, 0]
            assert inside[rows.min():rows.max()+1, cols.min():cols.max()+1].all()   # a box
            j = int(src[i][inside][0]); assert (src[i][inside] == j).all()
            assert torch.equal(xo[i][:, inside], x[j][:, inside])
        expected = torch.where(inside, m[src[i].clamp(0, n-1), torch.arange(8)[:, None], torch.arange(8)], m[i])
        assert torch.equal(mo[i], expected)
    # the loss is the per-pixel loss on the cut mask: the partner term carries no weight
    z = torch.randn(n, N_CLS, 8, 8)
    torch.testing.assert_close(mixed_loss(LabelSmoothingCrossEntropyFlat(axis=1, eps=0.1), z, (mo,), yb2, lam),
                               F.cross_entropy(z, mo, label_smoothing=0.1))

@pytest.mark.parametrize('lf', [lambda: LabelSmoothingCrossEntropyFlat(axis=1, eps=0.1),
                                lambda: LabelSmoothingCrossEntropy(0.1), PerItemLoss], ids=['LSCEFlat', 'LSCE', 'generic'])
def test_mixup_segmentation_mixes_per_pixel_losses(lf):
    torch.manual_seed(0)
    x,m = _seg_batch()
    (xo,),(mo,),((m2,),lam) = MixUp(0.4).mix((x,), (m,))
    assert torch.equal(mo, m)                        # MixUp leaves masks alone; the loss mixes
    n = x.shape[0]
    # the partner of item i is the item whose mask is m2[i]
    partner = [next(j for j in range(n) if torch.equal(m2[i], m[j])) for i in range(n)]
    ref_x = lam.view(n, 1, 1, 1).double() * x.double() + (1 - lam.view(n, 1, 1, 1).double()) * x.double()[partner]
    torch.testing.assert_close(xo.double(), ref_x, atol=1e-5, rtol=1e-6)
    z = torch.randn(n, N_CLS, 8, 8)
    eps = 0.1 if not isinstance(lf(), PerItemLoss) else 0.
    l1 = F.cross_entropy(z, m, label_smoothing=eps, reduction='none')     # (n, H, W)
    l2 = F.cross_entropy(z, m2, label_smoothing=eps, reduction='none')
    lv = lam.view(n, 1, 1)
    ref = (lv * l1 + (1 - lv) * l2).mean()
    torch.testing.assert_close(mixed_loss(lf(), z, (m,), (m2,), lam), ref)

def _write_seg(root:Path, n=12, size=32):
    rng = np.random.default_rng(0)
    (root/'img').mkdir(parents=True); (root/'lbl').mkdir()
    for i in range(n):
        msk = np.zeros((size, size), np.uint8)
        c = i % N_CLS
        msk[size//4:3*size//4, size//4:3*size//4] = c
        msk[:, :size//8] = (c + 1) % N_CLS
        img = rng.integers(0, 60, (size, size, 3)); img[..., 0] += msk * 60
        Image.fromarray(img.astype(np.uint8)).save(root/'img'/f'{i}.png')
        Image.fromarray(msk).save(root/'lbl'/f'{i}.png')
    return root

@pytest.mark.slow
def test_unet_trains_with_mixup_then_cutmix(tmp_path):
    "One unet: an epoch with MixUp, then one with CutMix (one learner for both: building a unet is the slow part)"
    path = _write_seg(tmp_path, n=8)
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(codes=[f'c{i}' for i in range(N_CLS)])), get_items=get_image_files,
                       get_y=lambda f: f.parent.parent/'lbl'/f.name, splitter=RandomSplitter(0.25, seed=0))
    dls = dblock.dataloaders(path/'img', bs=4, num_workers=0)
    set_seed(0)
    lf = LabelSmoothingCrossEntropyFlat(axis=1, eps=0.1)
    grab = Grab()
    learn = unet_learner(dls, resnet18, pretrained=False, n_out=N_CLS, loss_func=lf, cbs=[grab])
    learn.remove_cb(ProgressCallback)
    for cb in (MixUp(0.4), CutMix(1.)):
        grab.seen = []
        learn.fit(1, lr=1e-3, cbs=cb)
        assert learn.loss_func is lf and lf.reduction == 'mean' and cb not in learn.cbs
        assert all(math.isfinite(float(l)) for l in learn.recorder.losses)
        assert all(math.isfinite(v) for v in learn.recorder.values[-1][:2])
        assert grab.seen and grab.seen[0][1].shape[1:] == (N_CLS, 32, 32)
    preds,targs = learn.get_preds()
    assert preds.shape == (len(dls.valid_ds), N_CLS, 32, 32) and targs.shape == (len(dls.valid_ds), 32, 32)
