"""Compatibility kept true (issue 18): each mixing callback (MixUp, CutMix, ManifoldMixUp, RegMixUp) with fastai's
lr_find then fine_tune, ClassificationInterpretation, predict, export/load_learner, GradientAccumulation,
channels_last and to_bf16, on a tiny vision_learner; and real mixed precision on the CPU (autocast and a GradScaler
on the CPU, float16 and bfloat16): half activations occur, losses stay finite, an injected inf gradient skips the
optimizer step and training recovers. The same checks run on CUDA where there is one (`make gpu-check`)."""
import copy, math, warnings
from pathlib import Path

import numpy as np
import pytest
import torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image

from fastai.callback.core import Callback
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.callback.channelslast import ChannelsLast  # noqa: F401 (patches Learner.to_channelslast)
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import fine_tune, lr_find  # noqa: F401 (patches Learner)
from fastai.callback.training import GradientAccumulation
from fastai.data.transforms import Normalize, get_image_files
from fastai.interpret import ClassificationInterpretation
from fastai.layers import ConvLayer, Flatten
from fastai.learner import load_learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.data import ImageDataLoaders
from fastai.vision.learner import vision_learner

from fastai_regularize.activations import no_activation
from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat
from fastai_regularize.mixup import MixUp, CutMix, RegMixUp
from fastai_regularize.manifold import ManifoldMixUp

torch.set_flush_denormal(True)
torch.set_num_threads(1)  # tiny models on a shared 2-core machine
N_CLS,EPS = 3,0.1
CALLBACKS = {'MixUp': MixUp, 'CutMix': CutMix, 'ManifoldMixUp': ManifoldMixUp, 'RegMixUp': RegMixUp}
CUDA = torch.cuda.is_available()

# ---------------------------------------------------------------- data, model, learner
def tiny_resnet(pretrained=False):
    "A ResNet-shaped network small enough for a few CPU batches: a stem, three stages (plain `nn.Sequential`s), pooling, a head"
    return nn.Sequential(ConvLayer(3, 8, stride=2), nn.Sequential(ConvLayer(8, 8), ConvLayer(8, 8)),
                         nn.Sequential(ConvLayer(8, 16, stride=2)), nn.Sequential(ConvLayer(16, 16, stride=2)),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(16, 10))

@pytest.fixture(scope='module')
def img_path(tmp_path_factory):
    "12 RGB 16×16 PNGs per class, class c brighter in channel c, in <root>/c<c>/"
    root,rng = tmp_path_factory.mktemp('compat'),np.random.default_rng(0)
    for c in range(N_CLS):
        (root/f'c{c}').mkdir()
        for i in range(12):
            a = rng.integers(0, 120, (16, 16, 3))
            a[..., c] += 120
            Image.fromarray(a.astype(np.uint8)).save(root/f'c{c}'/f'{i}.png')
    return root

def _dls(path, device=None):
    "27 training images (3 batches of 8, the last item dropped) and 9 validation images"
    return ImageDataLoaders.from_folder(path, valid_pct=0.25, seed=0, bs=8, num_workers=0, device=device,
                                        batch_tfms=[Normalize.from_stats([0.5]*3, [0.25]*3)])

@pytest.fixture(scope='module')
def dls(img_path): return _dls(img_path)   # on CUDA where there is one

@pytest.fixture(scope='module')
def cpu_dls(img_path): return _dls(img_path, device='cpu')

def _learner(dls, name, **kw):
    set_seed(0)
    learn = vision_learner(dls, tiny_resnet, pretrained=False, loss_func=LabelSmoothingCrossEntropyFlat(eps=EPS),
                           metrics=accuracy, cbs=CALLBACKS[name](), **kw)
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a: None  # no progress bar, no printed table
    return learn

def _mixer(learn): return next(c for c in learn.cbs if isinstance(c, tuple(CALLBACKS.values())))

class Mixed(Callback):
    "Counts training batches over its fits, and those the mixing callback mixed (it runs at -5; this sees its plan right after)"
    order = -4
    def __init__(self): self.n = self.n_mixed = 0
    def before_batch(self):
        if not self.training: return
        m = _mixer(self.learn)
        self.n += 1
        self.n_mixed += any(getattr(m, a, None) is not None for a in ('_pending', '_reg', '_plan'))

def _no_hooks(model):
    return not any(getattr(m, d, None) for m in model.modules() for d in ('_forward_hooks', '_forward_pre_hooks',
                   '_forward_hooks_always_called', '_backward_hooks', '_backward_pre_hooks'))

def _snapshot(learn): return dict(cbs=list(learn.cbs), lf=learn.loss_func, model=learn.model)

def _as_found(learn, snap):
    "The learner holds the same callbacks, loss (reducing by its mean) and model as before, and no hook"
    assert list(learn.cbs) == snap['cbs'] and all(a is b for a,b in zip(learn.cbs, snap['cbs']))
    assert learn.loss_func is snap['lf'] and learn.loss_func.reduction == 'mean'
    assert learn.model is snap['model'] and _no_hooks(learn.model)

def _finite(learn):
    return learn.recorder.losses and all(math.isfinite(float(l)) for l in learn.recorder.losses)

def _params(model): return [p.detach().clone() for p in model.parameters()]

# ---------------------------------------------------------------- lr_find then fine_tune, shared by what follows
@pytest.fixture(scope='module', params=list(CALLBACKS))
def tuned(request, dls):
    "A learner of each mixing callback after `lr_find` then `fine_tune(1, freeze_epochs=1)`, with what was seen on the way"
    learn = _learner(dls, request.param)
    snap,before = _snapshot(learn),_params(learn.model)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        sug = learn.lr_find(num_it=6, show_plot=False)
        after_lr_find = _params(learn.model)
        spy = Mixed()
        learn.fine_tune(1, 2e-3, freeze_epochs=1, cbs=spy)
    return learn, dict(name=request.param, snap=snap, before=before, after_lr_find=after_lr_find, sug=sug, spy=spy)

def test_lr_find_then_fine_tune(tuned):
    learn,seen = tuned
    assert all(math.isfinite(v) and v > 0 for v in seen['sug'])
    assert all(torch.equal(a, b) for a,b in zip(seen['before'], seen['after_lr_find'])), 'lr_find did not restore the weights'
    assert seen['spy'].n == 2 * 3 and seen["spy"].n_mixed == seen["spy"].n   # frozen epoch, then unfrozen, every batch mixed
    assert all(p.requires_grad for p in learn.model.parameters())           # unfrozen at the end
    assert _finite(learn) and all(math.isfinite(v) for v in learn.recorder.values[-1])
    _as_found(learn, seen['snap'])

def test_classification_interpretation(tuned):
    "Per-item losses are label-smoothed cross-entropy of the unmixed logits by F.cross_entropy, the matrix counts by hand"
    learn,seen = tuned
    logits,targs = learn.get_preds(act=no_activation)
    interp = ClassificationInterpretation.from_learner(learn)
    ref = F.cross_entropy(logits.float(), targs, label_smoothing=EPS, reduction='none')
    torch.testing.assert_close(interp.losses.float(), ref, atol=1e-4, rtol=1e-4)
    _,preds,targs2,decoded,losses = interp[list(range(len(ref)))]
    torch.testing.assert_close(preds.float(), F.softmax(logits.float(), 1), atol=1e-5, rtol=1e-4)
    assert torch.equal(targs2, targs) and torch.equal(decoded, logits.argmax(1))
    cm = np.zeros((N_CLS, N_CLS), dtype=int)
    np.add.at(cm, (targs.numpy(), logits.argmax(1).numpy()), 1)
    np.testing.assert_array_equal(interp.confusion_matrix(), cm)
    losses,idx = interp.top_losses(3)
    torch.testing.assert_close(losses.float(), ref.sort(descending=True).values[:3], atol=1e-4, rtol=1e-4)
    _as_found(learn, seen['snap'])

def test_predict(tuned, img_path):
    "predict gives the softmax of the model's logits on the item, unmixed, and its decoded label"
    learn,seen = tuned
    for f in sorted(get_image_files(img_path))[::9]:
        dec,idx,probs = learn.predict(f)
        x = learn.dls.test_dl([f]).one_batch()[0]
        learn.model.eval()
        with torch.no_grad(): ref = F.softmax(learn.model(x).float(), 1)[0].cpu()
        torch.testing.assert_close(probs.float(), ref, atol=1e-5, rtol=1e-4)
        assert int(idx) == int(ref.argmax()) and dec == learn.dls.vocab[int(idx)]
    _as_found(learn, seen['snap'])

def test_export_and_load_learner(tuned, img_path, tmp_path):
    "The loaded learner predicts what the exported one does, holds the same callback and loss, and trains on new data"
    import fastai
    from packaging.version import Version
    if Version(fastai.__version__) < Version('2.8'):
        pytest.skip("fastai 2.7's export of the learner this grid has been through fails in torch.save ('Cannot save multiple "
                    "tensors or storages that view the same data as different types'); a fresh learner with MixUp, after "
                    "lr_find and fine_tune, exports there")
    learn,seen = tuned
    files = sorted(get_image_files(img_path))[::4]
    learn.export(tmp_path/'export.pkl')
    _as_found(learn, seen['snap'])
    loaded = load_learner(tmp_path/'export.pkl')
    ours,_ = learn.get_preds(dl=learn.dls.test_dl(files))
    theirs,_ = loaded.get_preds(dl=loaded.dls.test_dl(files))
    torch.testing.assert_close(theirs.cpu(), ours.cpu(), atol=1e-5, rtol=1e-4)
    assert type(_mixer(loaded)) is type(_mixer(learn)) and _mixer(loaded).alpha == _mixer(learn).alpha
    assert type(loaded.loss_func) is LabelSmoothingCrossEntropyFlat and loaded.loss_func.eps == EPS
    loaded.dls = learn.dls
    spy = Mixed()
    loaded.fit(1, 1e-3, cbs=spy)
    assert spy.n_mixed == spy.n == 3 and _finite(loaded) and _no_hooks(loaded.model)

# ---------------------------------------------------------------- the training options, each on a fresh learner
class Steps(Callback):
    "Per training batch: did the weights change?"
    order = 100
    def before_fit(self): self.changed = []
    def before_batch(self):
        if self.training: self.w = _params(self.learn.model)
    def after_batch(self):
        if self.training: self.changed.append(any(not torch.equal(a, b) for a,b in zip(self.w, self.learn.model.parameters())))

@pytest.mark.parametrize('name', list(CALLBACKS))
def test_gradient_accumulation(dls, name):
    "With 8 items a batch and n_acc=16 the optimizer steps on every second batch only, over epochs too"
    learn = _learner(dls, name)
    snap = _snapshot(learn)
    steps,spy = Steps(),Mixed()
    learn.fit(2, 1e-3, cbs=[GradientAccumulation(n_acc=16), steps, spy])
    assert steps.changed == [False, True] * 3
    assert spy.n_mixed == spy.n == 6 and _finite(learn)
    _as_found(learn, snap)

@pytest.mark.parametrize('name', list(CALLBACKS))
def test_channels_last(dls, name):
    "to_channelslast (with its MixedPrecision: inert on a CPU, float16 on CUDA): trains mixed, the model stays channels-last"
    learn = _learner(dls, name)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # no CUDA: fastai's autocast and GradScaler warn that they are disabled
        learn.to_channelslast()
        snap,spy = _snapshot(learn),Mixed()
        learn.fit(1, 1e-3, cbs=spy)
        assert _finite(learn)
        probs,_ = learn.get_preds()
    convs = [m for m in learn.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert spy.n_mixed == spy.n == 3
    assert torch.isfinite(probs).all() and torch.allclose(probs.float().sum(1), torch.ones(len(probs)), atol=1e-3)
    _as_found(learn, snap)

class PredDtype(Callback):
    "The model output's dtype in training, before MixedPrecision (order 10) casts it to float32 in after_pred"
    order = 5
    def before_fit(self): self.dtypes = set()
    def after_pred(self):
        if self.training: self.dtypes.add(self.pred.dtype)

@pytest.mark.parametrize('name', list(CALLBACKS))
def test_to_bf16(dls, name):
    "to_bf16 (autocast on CUDA; fastai's is inert on a CPU): trains mixed with finite losses; bfloat16 outputs on CUDA"
    learn = _learner(dls, name)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.to_bf16()
        snap,spy,dt = _snapshot(learn),Mixed(),PredDtype()
        learn.fit(1, 1e-3, cbs=[spy, dt])
        assert _finite(learn)   # before get_preds, which empties the recorder
        probs,_ = learn.get_preds()
    assert learn.mixed_precision.amp_mode == AMPMode.BF16
    if CUDA: assert dt.dtypes == {torch.bfloat16}
    assert spy.n_mixed == spy.n == 3 and torch.isfinite(probs).all()
    _as_found(learn, snap)

# ---------------------------------------------------------------- real mixed precision on the CPU
class CPUMixedPrecision(MixedPrecision):
    """fastai's `MixedPrecision` with autocast and the GradScaler on the CPU (fastai's own asks for CUDA's, which a CPU
    only warns about). A test helper: on CPUs without bfloat16 or float16 arithmetic (this machine's AMD EPYC) CPU
    autocast trains many times slower than float32, so it serves to check code under autocast, not to speed it up."""
    def before_fit(self):
        dtype = torch.bfloat16 if self.amp_mode == AMPMode.BF16 else torch.float16
        self.kwargs.setdefault('enabled', dtype == torch.float16)  # as fastai: bfloat16 has float32's range, no scaling
        self.autocast = torch.amp.autocast('cpu', dtype=dtype)
        self.learn.scaler,self.scales = torch.amp.GradScaler('cpu', **self.kwargs),[]

class ActDtypes(Callback):
    "Dtypes of every Conv2d's and Linear's output in training forward passes"
    def before_fit(self):
        self.dtypes = set()
        def rec(m, a, o):
            if m.training: self.dtypes.add(o.dtype)
        self.hooks = [m.register_forward_hook(rec) for m in self.learn.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    def after_fit(self): [h.remove() for h in self.hooks]

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['float16', 'bfloat16'])
@pytest.mark.parametrize('name', list(CALLBACKS))
def test_cpu_autocast_trains(cpu_dls, name, dtype):
    "Each mixing callback and the LS loss under CPU autocast: half activations, float32 outputs after it, finite losses"
    learn = _learner(cpu_dls, name)
    learn.add_cb(CPUMixedPrecision(amp_mode=AMPMode.BF16 if dtype == torch.bfloat16 else AMPMode.FP16))
    snap,spy,acts,pd = _snapshot(learn),Mixed(),ActDtypes(),PredDtype()
    learn.fit(1, 1e-3, cbs=[spy, acts, pd])
    assert dtype in acts.dtypes and pd.dtypes == {dtype}
    assert spy.n_mixed == spy.n == 3 and _finite(learn)
    assert not torch.is_autocast_enabled('cpu')   # left when each batch's loss was computed
    probs,_ = learn.get_preds()
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    _as_found(learn, snap)

class InjectInf(Callback):
    "Sets one gradient to inf after the `at`-th backward pass; records per batch: injected?, weights changed?, scale before, scale after"
    order = 100
    def __init__(self, at:int): self.at = at
    def before_fit(self): self.i,self.log = 0,[]
    def after_backward(self):
        self.i += 1
        self.w,self.scale = _params(self.learn.model),self.learn.scaler.get_scale()
        if self.i == self.at: next(p for p in self.learn.model.parameters() if p.grad is not None).grad.view(-1)[0] = math.inf
    def after_batch(self):
        if not self.training: return
        changed = any(not torch.equal(a, b) for a,b in zip(self.w, self.learn.model.parameters()))
        self.log.append((self.i == self.at, changed, self.scale, self.learn.scaler.get_scale()))

@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)])
@pytest.mark.parametrize('name', ['MixUp', 'ManifoldMixUp'])
def test_grad_scaler_skips_an_inf_step(img_path, device, name):
    "float16 with a GradScaler (the CPU's, or fastai's own on CUDA): an inf gradient skips the step and halves the scale; training goes on"
    dls = _dls(img_path, device=device)
    learn = _learner(dls, name)
    mp = CPUMixedPrecision(init_scale=2.**8) if device == 'cpu' else MixedPrecision(init_scale=2.**8)
    learn.add_cb(mp)
    inj = InjectInf(at=2)
    learn.fit(2, 1e-3, cbs=inj)
    assert len(inj.log) == 6
    for injected,changed,before,after in inj.log:
        if injected: assert not changed and after == before / 2, (changed, before, after)   # skipped, scale backed off
        else: assert changed and after == before                                             # a step, scale kept
    assert [i for i,(injected,*_) in enumerate(inj.log) if injected] == [1]
    assert _finite(learn) and all(torch.isfinite(p).all() for p in learn.model.parameters())

# ---------------------------------------------------------------- fastai's own mixed precision, real on CUDA
@pytest.mark.gpu
@pytest.mark.parametrize('name', list(CALLBACKS))
def test_to_fp16_on_cuda(dls, name):
    "fastai's to_fp16 on CUDA: float16 activations and outputs with each mixing callback and the LS loss, finite losses"
    learn = _learner(dls, name)
    learn.to_fp16()
    snap,spy,acts,pd = _snapshot(learn),Mixed(),ActDtypes(),PredDtype()
    learn.fit(1, 1e-3, cbs=[spy, acts, pd])
    assert next(learn.model.parameters()).device.type == 'cuda'
    assert torch.float16 in acts.dtypes and pd.dtypes == {torch.float16}
    assert spy.n_mixed == spy.n == 3 and _finite(learn) and not torch.is_autocast_enabled('cuda')
    probs,_ = learn.get_preds()
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    _as_found(learn, snap)
