"""ManifoldMixUp (issue 13): a tabular learner with categorical columns, a text classifier on token ids and a
vision learner train, and on every training batch the mixed layer passes on λ·h + (1-λ)·h[(i+k) % n] of what a
hand computation of the layer gives while every other layer passes on its plain output; hooks are gone and the
model computes what an unhooked copy computes after a KeyboardInterrupt at every training event and after
exceptions inside the forward pass; bad `modules`; float32 mixing of half activations; validation, batch of one."""
import math, warnings

import numpy as np, pandas as pd
import pytest
import torch, torch.nn as nn, torch.nn.functional as F

from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastai.data.core import Datasets, DataLoaders
from fastai.learner import Learner, CastToTensor
from fastai.callback.fp16 import MixedPrecision  # noqa: F401 (patches Learner.to_fp16)
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.tabular.data import TabularDataLoaders
from fastai.tabular.core import Categorify, Normalize
from fastai.tabular.learner import tabular_learner, tabular_config
from fastai.tabular.model import TabularModel
from fastai.text.models.core import SequentialRNN
from fastai.torch_core import set_seed, TensorImage, TensorCategory
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18

from fastai_regularize.manifold import ManifoldMixUp, manifold_layers, _mix_hidden, _ArmOnUnpack
from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat

torch.set_flush_denormal(True)
torch.set_num_threads(1)  # tiny models on a shared 2-core machine

# ---------------------------------------------------------------- data and models
def _table(n=320, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({'a': rng.integers(0, 4, n), 'b': rng.integers(0, 3, n), 'x1': rng.normal(size=n),
                       'x2': rng.normal(size=n), 'x3': rng.normal(size=n)})
    df['y'] = np.where(df.x1 > 0, df.a % 3, df.b).astype(str)
    return df

@pytest.fixture(scope='module')
def tab_dls():
    set_seed(0)
    return TabularDataLoaders.from_df(_table(), y_names='y', cat_names=['a', 'b'], cont_names=['x1', 'x2', 'x3'],
                                      procs=[Categorify, Normalize], bs=32, valid_idx=list(range(256, 320)))

def _tab_learner(dls, cbs, **kw):
    set_seed(0)
    learn = tabular_learner(dls, layers=[32, 16], cbs=cbs, **kw)
    learn.remove_cb(ProgressCallback)
    return learn

class GRUEncoder(nn.Module):
    "Embedding and GRU; the mean of the outputs"
    def __init__(self, vocab=20, emb=16, hid=32):
        super().__init__()
        self.emb,self.rnn = nn.Embedding(vocab, emb),nn.GRU(emb, hid, batch_first=True)
    def forward(self, x): return self.rnn(self.emb(x))[0].mean(1)

class LSTMEncoder(nn.Module):
    "Embedding and LSTM returning `(outputs, padding mask)`, as fastai's `SentenceEncoder` does"
    def __init__(self, vocab=20, emb=16, hid=32):
        super().__init__()
        self.emb,self.rnn = nn.Embedding(vocab, emb, padding_idx=0),nn.LSTM(emb, hid, batch_first=True)
    def forward(self, x): return self.rnn(self.emb(x))[0], x == 0

class MaskedMeanHead(nn.Module):
    def __init__(self, hid=32, n_out=2): super().__init__(); self.lin = nn.Linear(hid, n_out)
    def forward(self, o):
        out,mask = o
        keep = (~mask).float()[..., None]
        return self.lin((out * keep).sum(1) / keep.sum(1).clamp_min(1))

def _text_model(kind):
    if kind == 'gru': return SequentialRNN(GRUEncoder(), nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)))
    return SequentialRNN(LSTMEncoder(), MaskedMeanHead())

@pytest.fixture(scope='module')
def text_dls():
    "Token ids (0 pads the end of some items); the class says which of tokens 1 and 2 the item holds, twice"
    g = torch.Generator().manual_seed(0)
    n,L = 384,12
    toks = torch.randint(3, 20, (n, L), generator=g)
    ys = torch.randint(0, 2, (n,), generator=g)
    for j in range(2): toks[torch.arange(n), torch.randint(0, L - 2, (n,), generator=g)] = 1 + ys
    toks[::3, -2:] = 0
    set_seed(0)
    return Datasets(range(n), [[toks.__getitem__], [ys.__getitem__]], splits=[range(320), range(320, n)]).dataloaders(bs=32)

@pytest.fixture(scope='module')
def img_dls():
    "In-memory 3×16×16 images, class c brighter in channel c"
    g = torch.Generator().manual_seed(0)
    def items(n):
        x,y = torch.rand(n, 3, 16, 16, generator=g),torch.arange(n) % 3
        x[torch.arange(n), y] += 0.5
        return [(TensorImage(x[i]), TensorCategory(y[i])) for i in range(n)]
    set_seed(0)
    return DataLoaders.from_dsets(items(48), items(12), bs=8, device='cpu')

# ---------------------------------------------------------------- the hand check
class Check(Callback):
    """Runs before ManifoldMixUp. In each training forward pass, every candidate layer's hook (registered before ours,
    so it runs after the mixing hook, as the next layer sees it) records what the layer passed on and the layer's plain
    output computed again by `ref(module, args, raw_xb)`; after the pass, the plan's layer must hold the hand-mixed
    value and every other layer its plain value"""
    order = ManifoldMixUp.order - 1
    def __init__(self, refs:dict, eps:float=0.): self.refs,self.eps,self.checked = refs,eps,[]
    def before_fit(self):
        model = self.learn.model
        self.hooks = []
        for name,(where,ref) in self.refs.items():
            m = model.get_submodule(name)
            if where == 'output': hook = m.register_forward_hook(self._rec_out(name, ref))
            else: hook = m.register_forward_pre_hook(self._rec_in(name, ref))
            self.hooks.append(hook)
    def _rec_out(self, name, ref):
        def f(m, args, out):
            if not self.training: return
            with torch.no_grad(): self.seen[name] = (_first(out).detach().clone(), _first(ref(m, args, self.raw)).detach())
        return f
    def _rec_in(self, name, ref):
        def f(m, args):
            if not self.training: return
            with torch.no_grad(): self.seen[name] = (args[0].detach().clone(), ref(m, args, self.raw).detach())
        return f
    def before_batch(self):
        if self.training: self.raw,self.raw_y,self.seen = tuple(t.clone() for t in self.xb),self.yb[0].clone(),{}
    def after_pred(self):
        if not self.training: return
        plan = self.learn.manifold_mix_up._plan
        assert plan is not None
        point,lam,k = plan
        lam64 = lam.double()
        def hand(h):
            w = lam64.view(-1, *[1]*(h.ndim - 1))
            return w * h.double() + (1 - w) * h.double().roll(-k, 0)
        if point == 'input':
            for t,r in zip(self.xb, self.raw): torch.testing.assert_close(t.double(), hand(r), atol=1e-5, rtol=1e-5)
        else: assert point[0] in self.seen, f"{point[0]} did not run"
        for name,(got,ref) in self.seen.items():
            if point != 'input' and name == point[0]: torch.testing.assert_close(got.double(), hand(ref), atol=1e-5, rtol=1e-5)
            else: torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        self.checked.append('input' if point == 'input' else point[0])
        self.plan = plan
    def after_batch(self):
        "The loss is MixUp's: λ·CE(pred, y) + (1-λ)·CE(pred, y[(i+k) % n]), by hand"
        if not self.training: return
        _,lam,k = self.plan
        y = self.raw_y.view(-1).long()
        ce = lambda t: F.cross_entropy(self.pred.float(), t, label_smoothing=self.eps, reduction='none')
        torch.testing.assert_close(self.loss, (lam * ce(y) + (1 - lam) * ce(y.roll(-k, 0))).mean(), atol=1e-5, rtol=1e-5)
    def after_fit(self):
        for h in self.hooks: h.remove()

def _first(o): return o[0] if isinstance(o, (tuple, list)) else o
def _again(m, args, raw): return m.forward(*args)  # the layer's plain output on what it received

def _tab_layers_input(m, args, raw):
    "The input of `TabularModel.layers` by hand: embeddings of the category codes, then the normalised continuous columns"
    tab = m_tab[0]
    cats,conts = raw
    emb = torch.cat([e(cats[:, i]) for i,e in enumerate(tab.embeds)], 1)
    return torch.cat([emb, tab.bn_cont(conts)], 1)
m_tab = [None]

def _no_hooks(model):
    "Every module's hook dicts are empty"
    for name,m in model.named_modules():
        for d in ('_forward_hooks', '_forward_pre_hooks', '_forward_hooks_always_called', '_forward_hooks_with_kwargs',
                  '_forward_pre_hooks_with_kwargs', '_backward_hooks', '_backward_pre_hooks'):
            if getattr(m, d, None): return False
    return True

def _finite(learn):
    return learn.recorder.losses and all(math.isfinite(float(l)) for l in learn.recorder.losses)

# ================================================================ 1. three kinds of learner
def test_tabular_learner_with_categorical_columns(tab_dls):
    set_seed(0)
    lf = CrossEntropyLossFlat()
    learn = _tab_learner(tab_dls, [ManifoldMixUp()], metrics=accuracy, loss_func=lf)
    m_tab[0] = learn.model
    assert manifold_layers(learn.model) == [('layers', 'input'), ('layers.0', 'output'), ('layers.1', 'output')]
    check = Check({'layers': ('input', _tab_layers_input), 'layers.0': ('output', _again), 'layers.1': ('output', _again)})
    learn.fit_one_cycle(8, 3e-2, cbs=check)
    assert set(check.checked) == {'layers', 'layers.0', 'layers.1'} and len(check.checked) == 8 * 8
    assert learn.loss_func is lf and _finite(learn) and _no_hooks(learn.model)
    assert learn.recorder.values[-1][2] > 0.6, f"accuracy {learn.recorder.values[-1][2]:.2f} (chance 0.33)"

@pytest.mark.parametrize('kind', ['gru', 'lstm_tuple'])
def test_text_classifier_on_token_ids(text_dls, kind):
    set_seed(0)
    model = _text_model(kind)
    assert manifold_layers(model) == [('0', 'output')]
    learn = Learner(text_dls, model, loss_func=F.cross_entropy, metrics=accuracy, cbs=ManifoldMixUp())
    learn.remove_cb(ProgressCallback)
    check = Check({'0': ('output', _again)})
    learn.fit_one_cycle(6, 1e-2, cbs=check)
    assert check.checked == ['0'] * 60 and _finite(learn) and _no_hooks(learn.model)
    assert learn.recorder.values[-1][2] > 0.8, f"accuracy {learn.recorder.values[-1][2]:.2f} (chance 0.5)"

def test_vision_learner_resnet18(img_dls):
    set_seed(0)
    lf = LabelSmoothingCrossEntropyFlat(eps=0.1)
    learn = vision_learner(img_dls, resnet18, pretrained=False, n_out=3, loss_func=lf, cbs=ManifoldMixUp())
    learn.remove_cb(ProgressCallback)
    layers = manifold_layers(learn.model)
    assert layers == [('0.4', 'output'), ('0.5', 'output'), ('0.6', 'output')]  # layer1..layer3 of the body
    check = Check({n: ('output', _again) for n,_ in layers}, eps=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # to_fp16 warns that it has no GPU here
        learn.to_fp16()
        learn.fit(3, 1e-3, cbs=check)
    assert set(check.checked) == {'input', '0.4', '0.5', '0.6'}   # the input is a choice: images are floats
    assert learn.loss_func is lf and _finite(learn) and _no_hooks(learn.model)
    preds,targs = learn.get_preds()
    assert preds.shape == (12, 3)

def test_xresnet_and_torchvision_resnet_defaults():
    from fastai.vision.models.xresnet import xresnet18
    assert manifold_layers(xresnet18(n_out=3)) == [('4', 'output'), ('5', 'output'), ('6', 'output')]
    assert manifold_layers(resnet18()) == [('layer1', 'output'), ('layer2', 'output'), ('layer3', 'output')]
    ddp_like = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp_like); ddp_like.module = resnet18()
    assert manifold_layers(ddp_like)[0] == ('module.layer1', 'output')

TIMM = {'resnet10t': ({}, ['layer1', 'layer2', 'layer3']),
        'convnext_atto': ({}, ['stages.0', 'stages.1', 'stages.2']),
        'efficientnet_b0': ({}, ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.4']),
        'vit_tiny_patch16_224': ({'img_size': 32}, [f'blocks.{i}' for i in range(11)])}

@pytest.fixture(scope='module')
def img32_dls():
    "16 training and 8 validation 3×32×32 images (a ConvNeXt's stride 32 needs 32 pixels), class c brighter in channel c"
    g = torch.Generator().manual_seed(1)
    def items(n):
        x,y = torch.rand(n, 3, 32, 32, generator=g),torch.arange(n) % 3
        x[torch.arange(n), y] += 0.5
        return [(TensorImage(x[i]), TensorCategory(y[i])) for i in range(n)]
    set_seed(0)
    return DataLoaders.from_dsets(items(16), items(8), bs=8, device='cpu')

@pytest.mark.parametrize('arch', list(TIMM))
def test_timm_bodies(img32_dls, arch):
    "vision_learner on a timm name: the stages timm names in `feature_info` but the last are mixed, each as a hand computation gives"
    pytest.importorskip('timm')
    kw,stages = TIMM[arch]
    set_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # timm's deprecation notices
        learn = vision_learner(img32_dls, arch, pretrained=False, n_out=3, loss_func=CrossEntropyLossFlat(),
                               cbs=ManifoldMixUp(), **kw)
    learn.remove_cb(ProgressCallback)
    layers = manifold_layers(learn.model)
    assert layers == [(f'0.model.{n}', 'output') for n in stages]
    check = Check({n: ('output', _again) for n,_ in layers})
    learn.fit(1, 1e-3, cbs=check)
    assert len(check.checked) == 2 and _finite(learn) and _no_hooks(learn.model)
    assert manifold_layers(learn.model[0].model) == [(n, 'output') for n in stages]   # the timm model alone

def test_transformer_without_feature_info():
    "A timm model that names no stages: its transformer `blocks` but the last"
    timm = pytest.importorskip('timm')
    m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, depth=3)
    del m.feature_info
    assert manifold_layers(m) == [('blocks.0', 'output'), ('blocks.1', 'output')]

# ================================================================ 2. faults leave the model exactly as it was
class Boom(Callback):
    "Raise `exc` the first time `event` fires (in training for the batch events, in validation for 'valid_before_batch')"
    def __init__(self, event, exc, order):
        self.ev = 'before_batch' if event == 'valid_before_batch' else event
        self.valid_only = event == 'valid_before_batch'
        self.exc,self.order,self.fired = exc,order,False
        setattr(self, self.ev, self._boom)
    def _boom(self):
        if self.fired: return
        if self.ev in ('before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step',
                       'after_step', 'after_batch') and self.learn.training == self.valid_only: return
        self.fired = True
        raise self.exc(f'injected at {self.ev}')

EVENTS = ['before_fit', 'before_epoch', 'before_train', 'before_batch', 'after_pred', 'after_loss', 'before_backward',
          'after_backward', 'before_step', 'after_step', 'after_batch', 'after_train', 'before_validate',
          'valid_before_batch', 'after_validate', 'after_epoch', 'after_fit']

def _same_as_unhooked_copy(learn, dls):
    "The model computes exactly what a fresh copy with its weights and no hooks computes"
    fresh = TabularModel(*_tab_args(learn.model))
    fresh.load_state_dict(learn.model.state_dict())
    cats,conts,_ = dls.valid.one_batch()
    learn.model.eval(); fresh.eval()
    with torch.no_grad(): return torch.equal(learn.model(cats, conts), fresh(cats, conts))

def _tab_args(m):
    return ([(e.num_embeddings, e.embedding_dim) for e in m.embeds], m.n_cont, m.layers[-1][0].out_features, [32, 16])

# where the interrupting callback runs among the callbacks of a learner with `to_fp16()`: before ManifoldMixUp (-5),
# between it and fastai's CastToTensor (9, which rebuilds `learn.xb` in before_batch), between CastToTensor and
# MixedPrecision (10, which enters autocast in before_batch and leaves it in after_loss), after MixedPrecision
ORDERS = {'before_ours': -6, 'before_CastToTensor': 0, 'after_CastToTensor': 9.5, 'after_MixedPrecision': 11}

def _close_autocast(learn, event, order):
    "Leave the autocast fastai's MixedPrecision entered in before_batch and an interrupt kept it from leaving (its own leak)"
    mp = learn.mixed_precision
    left_open = (event == 'before_batch' and order > mp.order) or event == 'after_pred' or (event == 'after_loss' and order < mp.order)
    if left_open and mp.autocast is not None: mp.autocast.__exit__(None, None, None)

@pytest.mark.parametrize('order', list(ORDERS.values()), ids=list(ORDERS))
@pytest.mark.parametrize('event', EVENTS)
def test_keyboard_interrupt_at_every_event(tab_dls, event, order):
    "No hook of ours stays on the model after a KeyboardInterrupt at any training event, from a callback of any order"
    lf = CrossEntropyLossFlat()
    mm = ManifoldMixUp()
    learn = _tab_learner(tab_dls, [mm, Boom(event, KeyboardInterrupt, order)], loss_func=lf)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # to_fp16 warns that it has no GPU here
        learn.to_fp16()
    assert any(isinstance(c, CastToTensor) for c in learn.cbs)
    model,cbs = learn.model,list(learn.cbs)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(KeyboardInterrupt, match='injected'): learn.fit(1)
        _close_autocast(learn, event, order)
        assert learn.boom.fired
        assert _no_hooks(model) and learn.model is model and _same_as_unhooked_copy(learn, tab_dls)
        assert learn.loss_func is lf and list(learn.cbs) == cbs
        learn.fit(1)
    assert _finite(learn) and _no_hooks(model) and _same_as_unhooked_copy(learn, tab_dls)

class Raiser(nn.Module):
    "Identity that raises `exc` on its `at`-th call in training"
    def __init__(self, exc, at=1): super().__init__(); self.exc,self.at,self.calls = exc,at,0
    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at: raise self.exc('injected in forward')
        return x

@pytest.mark.parametrize('where', ['before', 'after'], ids=['before_mixed_layer', 'after_mixed_layer'])
def test_exception_inside_the_forward_pass(tab_dls, where):
    "PyTorch runs the `always_call` hook for an Exception: everything is removed at once"
    learn = _tab_learner(tab_dls, [ManifoldMixUp(modules=['layers.1'])])
    r = Raiser(RuntimeError)
    if where == 'before': learn.model.layers[0].insert(0, r)
    else: learn.model.layers[2].insert(0, r)
    with pytest.raises(RuntimeError, match='injected in forward'): learn.fit(1)
    assert _no_hooks(learn.model)
    learn.fit(1)
    assert _finite(learn) and _no_hooks(learn.model)

def test_keyboard_interrupt_inside_the_forward_pass_leaves_inert_hooks(tab_dls):
    "The one case that leaves hooks on the model: they mix nothing, and the next forward pass removes them"
    learn = _tab_learner(tab_dls, [ManifoldMixUp(modules=['layers.1'])])
    learn.model.layers[0].insert(0, Raiser(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt): learn.fit(1)
    model = learn.model.train()   # BatchNorm as in training, when a stale mixing hook would fire
    assert not _no_hooks(model)   # PyTorch skips always_call hooks for a KeyboardInterrupt
    cats,conts,_ = tab_dls.train.one_batch()
    with torch.no_grad():
        h = torch.cat([torch.cat([e(cats[:, i]) for i,e in enumerate(model.embeds)], 1), model.bn_cont(conts)], 1)
        ref = h
        for l in model.layers: ref = l.forward(ref)   # by hand, past any hook
        torch.testing.assert_close(model.layers(h), ref)      # the hooked layer called alone: not mixed
        torch.testing.assert_close(model(cats, conts), ref)   # the whole model: not mixed, and the hooks go
    assert _no_hooks(model)

def test_only_the_learners_model_call_arms():
    "Looping over, copying or unpacking the wrapped inputs anywhere but in a method of the learner registers nothing"
    calls = []
    class Owner:
        def __init__(self, xb): self.xb = xb
        def forward(self): return (lambda *a: a)(*self.xb)
        def read(self):
            out = []
            for x in self.xb: out.append(x)
            return out, tuple(self.xb), [*self.xb]
    a,b = torch.zeros(2),torch.ones(2)
    owner = Owner(None)
    w = _ArmOnUnpack((a, b), lambda: calls.append(1), owner)
    for _ in w: pass
    assert list(w) == [a, b] and tuple(w) == (a, b) and [*w] == [a, b] and (*w,) == (a, b)
    assert (lambda *t: t)(*w) == (a, b)                      # unpacked into a call, but not by the learner
    assert Owner(w).forward() == (a, b) and calls == []      # by another object's method
    owner.xb = w
    assert owner.read() == ([a, b], (a, b), [a, b]) and calls == []   # the learner looping over or copying them
    assert owner.forward() == (a, b) and calls == [1]        # the learner's own call: armed, once
    assert owner.forward() == (a, b) and calls == [1]

class Loop(Callback):
    "Loops over and copies `learn.xb` in before_batch, as a logging callback might, without replacing it"
    order = 9.5
    def before_batch(self):
        if self.training: self.shapes = [x.shape for x in self.xb] + [t.shape for t in list(self.xb)]

def test_callback_looping_over_the_inputs_arms_nothing(tab_dls):
    "After CastToTensor, a callback reads the inputs and a later one interrupts: no hook; without the interrupt, every batch is mixed"
    learn = _tab_learner(tab_dls, [ManifoldMixUp(), Loop(), Boom('before_batch', KeyboardInterrupt, 11)])
    with pytest.raises(KeyboardInterrupt, match='injected'): learn.fit(1)
    assert _no_hooks(learn.model)
    learn.remove_cb(learn.boom)
    layers = manifold_layers(learn.model)
    check = Check({'layers': ('input', _tab_layers_input), 'layers.0': ('output', _again), 'layers.1': ('output', _again)})
    m_tab[0] = learn.model
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no "did not mix a batch"
        learn.fit(1, cbs=check)
    assert len(check.checked) == len(tab_dls.train) and set(check.checked) <= {n for n,_ in layers}
    assert _no_hooks(learn.model) and type(learn.xb) is tuple

def test_the_model_gets_the_inputs_castToTensor_gives_it(img_dls):
    "The wrapper stands in for fastai's CastToTensor: the model and later events get plain tensors, as without ManifoldMixUp"
    class Types(Callback):
        order = 50
        def before_fit(self):
            self.seen,self.after = [],[]
            self.h = self.learn.model.register_forward_pre_hook(lambda m, args: self.seen.append(type(args[0])))
        def after_pred(self):
            if self.training: self.after.append(type(self.xb[0]))
        def after_fit(self): self.h.remove()
    set_seed(0)
    learn = vision_learner(img_dls, resnet18, pretrained=False, n_out=3, loss_func=CrossEntropyLossFlat(),
                           cbs=[ManifoldMixUp(mix_input=False), Types()])
    learn.remove_cb(ProgressCallback)
    assert type(img_dls.one_batch()[0]) is TensorImage
    learn.fit(1)
    assert learn.types.seen and set(learn.types.seen) == {torch.Tensor} and set(learn.types.after) == {torch.Tensor}
    assert _no_hooks(learn.model)

# ================================================================ 3. arguments and models it cannot mix
def test_module_not_in_model(tab_dls):
    other = nn.Linear(3, 3)
    for mods,msg in (([other], r'`modules\[0\]` \(Linear\) is not a submodule'), (['layers.0', 'nope'], r"`modules\[1\]` is 'nope'")):
        learn = _tab_learner(tab_dls, [ManifoldMixUp(modules=mods)])
        with pytest.raises(ValueError, match=msg): learn.fit(1)
        assert _no_hooks(learn.model)

def test_unknown_model_needs_modules():
    dls = Datasets(range(16), [[lambda i: torch.randn(4)], [lambda i: i % 2]], splits=[range(12), range(12, 16)]).dataloaders(bs=4)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    learn = Learner(dls, model, loss_func=F.cross_entropy, cbs=ManifoldMixUp())
    with pytest.raises(ValueError, match=r'pass `modules=`'): learn.fit(1)
    learn = Learner(dls, model, loss_func=F.cross_entropy, cbs=ManifoldMixUp(modules=[model[1]]))
    learn.fit(1)
    assert _no_hooks(model)

@pytest.mark.parametrize('kw,exc,name', [({'modules': []}, ValueError, 'modules'), ({'modules': 3}, TypeError, 'modules'),
    ({'modules': [nn.Linear(2, 2), 1.5]}, TypeError, 'modules'), ({'mix_input': 'yes'}, TypeError, 'mix_input'),
    ({'alpha': 0.}, ValueError, 'alpha'), ({'label': 'hard'}, ValueError, 'label'), ({'prob': 2.}, ValueError, 'prob')])
def test_bad_arguments(kw, exc, name):
    with pytest.raises(exc, match=f'`{name}`'): ManifoldMixUp(**kw)

def test_mix_input_true_with_token_ids(text_dls):
    learn = Learner(text_dls, _text_model('gru'), loss_func=F.cross_entropy, cbs=ManifoldMixUp(mix_input=True))
    with pytest.raises(TypeError, match='`mix_input=True`'): learn.fit(1)
    assert _no_hooks(learn.model)

def test_layer_the_forward_pass_skips(text_dls):
    model = _text_model('gru')
    unused = nn.Linear(32, 32)
    model[1].add_module('unused', unused)
    model[1].forward = lambda x, s=model[1]: s[2](s[1](s[0](x)))  # the head never calls `unused`
    learn = Learner(text_dls, model, loss_func=F.cross_entropy, cbs=ManifoldMixUp(modules=[unused]))
    with pytest.raises(ValueError, match=r'`1.unused` did not run'): learn.fit(1)
    assert _no_hooks(model)

class TimeMajor(nn.Module):
    def forward(self, x): return x.transpose(0, 1)

def test_layer_whose_output_is_not_batch_first(text_dls):
    "A layer whose output has the batch on dim 1 (an RNN without batch_first) gets an error naming it, not a wrong mix"
    model = SequentialRNN(nn.Sequential(nn.Embedding(20, 8), TimeMajor()), nn.Sequential(TimeMajor(), nn.Flatten(), nn.Linear(96, 2)))
    learn = Learner(text_dls, model, loss_func=F.cross_entropy, cbs=ManifoldMixUp(modules=['0.1']))
    with pytest.raises(TypeError, match=r'output of `0.1`.*32 items on dim 0'): learn.fit(1)
    assert _no_hooks(model)

# ================================================================ 4. validation, batch of one, half precision, dominant label
def test_validation_and_get_preds_see_no_mixing(tab_dls):
    learn = _tab_learner(tab_dls, [ManifoldMixUp()])
    learn.fit(1)
    preds,_ = learn.get_preds(act=lambda x: x)
    learn.model.eval()
    ref = torch.cat([learn.model(*b[:2]).detach() for b in tab_dls.valid.new(shuffle=False)])
    torch.testing.assert_close(preds, ref)
    assert _no_hooks(learn.model)

def test_batch_of_one_passes_through(tab_dls):
    set_seed(0)
    dls1 = TabularDataLoaders.from_df(_table(9), y_names='y', cat_names=['a', 'b'], cont_names=['x1', 'x2', 'x3'],
                                      procs=[Categorify, Normalize], bs=1, valid_idx=[5, 6, 7, 8])
    class Rec(Callback):
        order = ManifoldMixUp.order + 1
        def before_fit(self): self.plans = []
        def after_loss(self):
            if self.training:
                self.plans.append(self.learn.manifold_mix_up._plan)
                torch.testing.assert_close(self.loss, F.cross_entropy(self.pred, self.yb[0].view(-1).long()))
    learn = _tab_learner(dls1, [ManifoldMixUp(), Rec()], config=tabular_config(use_bn=False, bn_cont=False))  # BatchNorm needs 2 items
    learn.fit(1)
    assert len(learn.rec.plans) == 5
    assert learn.rec.plans and all(p is None for p in learn.rec.plans)

@pytest.mark.parametrize('dt', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('seed', range(3))
def test_half_activations_are_mixed_in_float32(dt, seed):
    "λ is applied in float32 at least: the only error left is rounding the result to the activation's dtype"
    torch.manual_seed(seed)
    n,k = 32,5
    h = (torch.randn(n, 6, 7) * 1000).to(dt)
    lam = torch.distributions.Beta(2., 2.).sample((n,))
    lam = torch.maximum(lam, 1 - lam)
    out = _mix_hidden(h, lam, k, 'output of `x`')
    assert out.dtype == dt
    h64,l64 = h.double(),lam.double().view(n, 1, 1)
    ref = l64 * h64 + (1 - l64) * h64.roll(-k, 0)
    bound = torch.finfo(dt).eps / 2 * ref.abs() + 4 * 2.**-24 * (h64.abs() + h64.roll(-k, 0).abs()) + torch.finfo(dt).tiny
    assert ((out.double() - ref).abs() <= bound).all()

def test_half_model_in_a_learner(text_dls):
    "A bfloat16 model on the CPU (as `to_fp16` runs layers in half on a GPU): the mixed layer stays bfloat16"
    set_seed(0)
    model = _text_model('gru').to(torch.bfloat16)
    class Dt(Callback):
        def before_fit(self): self.h = model[0].register_forward_hook(lambda m, a, o: self.dts.add(o.dtype)); self.dts = set()
        def after_fit(self): self.h.remove()
    learn = Learner(text_dls, model, loss_func=F.cross_entropy, cbs=[ManifoldMixUp(), Dt()])
    learn.remove_cb(ProgressCallback)
    learn.fit(1, 1e-3)
    assert learn.dt.dts == {torch.bfloat16} and _finite(learn) and _no_hooks(model)

def test_dominant_label_is_the_items_own(tab_dls):
    "λ >= 1/2 after max(λ, 1-λ): the larger share is the item itself, so the loss is the plain loss on the mixed layer"
    class Rec(Callback):
        order = ManifoldMixUp.order - 1  # sees the targets before ManifoldMixUp replaces them
        def before_fit(self): self.n = 0
        def before_batch(self):
            if self.training: self.y = self.yb[0].clone()
        def after_loss(self):
            if not self.training: return
            assert self.learn.manifold_mix_up._plan is not None
            torch.testing.assert_close(self.loss, F.cross_entropy(self.pred, self.y.view(-1).long()))
            self.n += 1
    learn = _tab_learner(tab_dls, [ManifoldMixUp(label='dominant'), Rec()], loss_func=CrossEntropyLossFlat())
    learn.fit(1)
    assert learn.rec.n == 8

def test_callback_replacing_the_inputs_after_ours(tab_dls):
    "The layer is mixed when fastai unpacks the inputs; a callback that swaps them for a new tuple first gets a warning, and the batch its plain loss"
    class Swap(Callback):
        order = ManifoldMixUp.order + 1
        def before_batch(self):
            if self.training: self.learn.xb = (self.xb[0], self.xb[1])
        def after_loss(self):
            if self.training: torch.testing.assert_close(self.loss, F.cross_entropy(self.pred, self.yb[0].view(-1).long()))
    learn = _tab_learner(tab_dls, [ManifoldMixUp(mix_input=False), Swap()])
    with pytest.warns(UserWarning, match='replaced `learn.xb`'): learn.fit(1)
    assert _finite(learn) and _no_hooks(learn.model)
