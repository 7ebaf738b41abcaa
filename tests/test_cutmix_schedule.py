"CutMix, MixUp/CutMix switching (timm's prob/switch_prob/mode), schedules and the mixed-batch display."
import matplotlib; matplotlib.use('Agg')
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.schedule import SchedLin
from fastai.data.core import Datasets
from fastai.learner import Learner

from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat
from fastai_regularize.mixup import MixUp, CutMix, cutmix_boxes

def image_batch(n=8, H=6, W=5):
    "Item i is the constant image i, so every output pixel names the item it came from"
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 2, H, W).clone(), torch.arange(n)

def test_cutmix_lambda_is_kept_area():
    torch.manual_seed(0)
    for _ in range(20):
        x,y = image_batch()
        (xm,),(ym,),(y2,),lam = (lambda r: (r[0], r[1], r[2][0], r[2][1]))(CutMix(1.).mix((x,), (y,)))
        kept = (xm[:, 0] == x[:, 0]).float().mean((1, 2))
        assert torch.allclose(lam, kept)
        pasted = xm[:, 0][xm[:, 0] != x[:, 0]]
        # pasted pixels come from exactly the partner named in y2
        for i in range(len(x)):
            vals = xm[i, 0][xm[i, 0] != x[i, 0]]
            assert (vals == y2[i]).all()
        assert torch.equal(ym, y)

def test_boxes_clip_and_area():
    torch.manual_seed(1)
    lam = torch.rand(1000)
    mask,lam_area = cutmix_boxes(lam, 7, 9)
    assert torch.allclose(lam_area, 1 - mask.float().mean((1, 2)))
    assert (lam_area >= lam - 1e-6).all()  # clipping at the border only keeps more of the image

def test_elem_mode_mixes_per_item():
    torch.manual_seed(2)
    x,y = image_batch(64, 8, 8)
    cb = MixUp(0.4, cutmix_alpha=1., switch_prob=0.5, mode='elem')
    (xm,),_,(( y2,),lam) = cb.mix((x,), (y,))
    n_cut = n_mix = 0
    for i in range(64):
        img = xm[i, 0]
        is_cut = bool(((img == x[i, 0, 0, 0]) | (img == y2[i].float())).all()) and not torch.allclose(img, img.mean().expand_as(img))
        if is_cut:   # pixels are either own or partner's, lam = kept share
            n_cut += 1
            assert torch.isclose(lam[i], (img == x[i, 0, 0, 0]).float().mean())
        elif torch.allclose(img, img[0, 0].expand_as(img)):  # a uniform blend
            n_mix += 1
            assert torch.isclose(img[0, 0], lam[i] * i + (1 - lam[i]) * y2[i].float(), atol=1e-5)
            assert lam[i] >= 0.5
    assert n_cut + n_mix >= 60 and n_cut > 10 and n_mix > 10

def test_prob_and_batch_switch():
    torch.manual_seed(3)
    x,y = image_batch()
    assert MixUp(prob=0.).mix((x,), (y,))[2] is None
    kinds = set()
    for _ in range(40):
        (xm,),_,(_,lam) = MixUp(0.4, cutmix_alpha=1., switch_prob=0.5).mix((x,), (y,))
        uniform = all(torch.allclose(xm[i, 0], xm[i, 0, 0, 0].expand_as(xm[i, 0])) for i in range(len(x)))
        kinds.add('mix' if uniform and (lam >= 0.5).all() else 'cut')
    assert kinds == {'mix', 'cut'}
    (xm,),_,pending = MixUp(prob=1., mode='elem').mix((x,), (y,))
    assert pending is not None
    xb2,yb2 = image_batch(200)
    (xm,),_,(_,lam) = MixUp(prob=0.5, mode="elem").mix((xb2,), (yb2,))
    assert 0.3 < (lam == 1).float().mean() < 0.7  # about half the items are left alone

class Record(Callback):
    order = MixUp.order + 1
    def __init__(self): self.mixed,self.when = [],[]
    def before_batch(self):
        if not self.training: return
        cb = getattr(self.learn, 'mix_up', None) or self.learn.cut_mix
        self.mixed.append(cb._pending is not None)
        self.when.append((self.epoch, self.n_epoch))

def learner(cb):
    g = torch.Generator().manual_seed(0)
    xs,ys = torch.randn(40, 1, 6, 6, generator=g),torch.randint(0, 3, (40,), generator=g)
    dls = Datasets(range(40), [[xs.__getitem__], [ys.__getitem__]], splits=[range(32), range(32, 40)]).dataloaders(bs=8)
    return Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), loss_func=LabelSmoothingCrossEntropyFlat(), cbs=[cb, Record()])

def test_off_epochs_and_pct():
    learn = learner(MixUp(off_epochs=2)); learn.fit(4)
    assert learn.record.mixed == [True]*8 + [False]*8
    learn = learner(CutMix(off_pct=0.25)); learn.fit(2)
    assert learn.record.mixed == [True]*6 + [False]*2
    learn = learner(MixUp(SchedLin(0.4, -0.4))); learn.fit(2)   # alpha <= 0 in the second half
    assert learn.record.mixed == [True]*4 + [False]*4

def test_fine_tune_and_lr_find_with_schedule():
    learn = learner(MixUp(off_epochs=1))
    learn.model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(36, 8)), nn.Linear(8, 3))
    learn.lr_find(num_it=5, show_plot=False)
    learn.fine_tune(2, freeze_epochs=1)
    # each fit (lr_find's, fine_tune's frozen one, its unfrozen one) has its own last epoch off
    assert learn.record.mixed == [e < n - 1 for e,n in learn.record.when]
    assert {n for _,n in learn.record.when} == {1, 2} and sum(learn.record.mixed) >= 8

def test_show_batch_returns_figure():
    from fastai.vision.data import ImageDataLoaders
    from PIL import Image
    import numpy as np, tempfile, pathlib
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        for c in ('a', 'b'):
            (d/c).mkdir()
            for i in range(6): Image.fromarray((np.random.rand(8, 8, 3)*255).astype('uint8')).save(d/c/f'{i}.png')
        dls = ImageDataLoaders.from_folder(d, valid_pct=0.25, bs=4, num_workers=0)
        import matplotlib.figure
        for cb in (MixUp(), CutMix()):
            fig = cb.show_batch(dls, max_n=4)
            assert isinstance(fig, matplotlib.figure.Figure)
            titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
            assert len(titles) == 4 and all(('a ' in t or 'b ' in t) and '\n' in t for t in titles)
