"Whole vision learners on the digits folder: MixUp + label smoothing with to_fp16, lr_find, fine_tune and TTA."
import warnings
import pytest, torch, torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import fine_tune, lr_find  # noqa: F401 (patches Learner)
from fastai.metrics import error_rate
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18

from fastai_regularize.activations import BaseSoftmax, no_activation, softmax_base
from fastai_regularize.data import digits_folder, image_folder_dls
from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat
from fastai_regularize.mixup import MixUp

@pytest.fixture(scope='module')
def dls():
    torch.set_flush_denormal(True)
    return image_folder_dls(digits_folder(), bs=64, size=32)

class PredDtype(Callback):
    "Dtype of the model output inside autocast (MixUp's after_pred runs before MixedPrecision's casts it back)"
    order = MixUp.order + 1
    def before_fit(self): self.dtypes = set()
    def after_pred(self):
        if self.training: self.dtypes.add(self.pred.dtype)

def check_learner(learn, dls, lf):
    n_valid = len(dls.valid_ds)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # to_fp16 warns that it has no GPU here
        learn.lr_find(num_it=8, show_plot=False)
        learn.fine_tune(1, 2e-3, freeze_epochs=1)
    assert learn.loss_func is lf and lf.reduction == 'mean'
    assert any(isinstance(cb, MixedPrecision) for cb in learn.cbs)
    set_seed(0); probs,targs = learn.tta(n=2)
    assert probs.shape == (n_valid, 10) and torch.allclose(probs.sum(1), torch.ones(n_valid), atol=1e-4)
    err = error_rate(probs, targs).item()
    set_seed(0); logits,_ = learn.tta(n=2, act=no_activation)
    set_seed(0); p2,_ = learn.tta(n=2, act=BaseSoftmax(2))
    plain_logits,_ = learn.get_preds(act=no_activation)
    plain_probs,_ = learn.get_preds()
    assert torch.allclose(plain_probs, F.softmax(plain_logits, -1), atol=1e-5)
    assert torch.allclose(learn.get_preds(act=BaseSoftmax(2))[0], softmax_base(plain_logits, 2), atol=1e-5)
    assert torch.allclose(p2.sum(1), torch.ones(n_valid), atol=1e-4) and not torch.allclose(p2, probs)
    assert (logits < 0).any()  # logits, not probabilities
    return err

def test_resnet18_fp16_mixup_ls_tta(dls):
    set_seed(42, reproducible=True)
    lf = LabelSmoothingCrossEntropyFlat()
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=error_rate, loss_func=lf,
                           cbs=[MixUp(), PredDtype()]).to_fp16()
    err = check_learner(learn, dls, lf)
    assert err < 0.5, f'error rate {err:.3f}: not learning (chance is 0.9)'
    if torch.cuda.is_available(): assert torch.float16 in learn.pred_dtype.dtypes

def test_timm_arch(dls):
    pytest.importorskip('timm')
    set_seed(42, reproducible=True)
    lf = LabelSmoothingCrossEntropyFlat()
    learn = vision_learner(dls, 'resnet10t', pretrained=False, metrics=error_rate, loss_func=lf, cbs=MixUp()).to_fp16()
    err = check_learner(learn, dls, lf)
    assert err < 0.8, f'error rate {err:.3f}: not learning (chance is 0.9)'

@pytest.mark.gpu  # half precision is real only on a GPU
def test_fp16_is_real_on_gpu(dls):
    set_seed(42, reproducible=True)
    learn = vision_learner(dls, resnet18, pretrained=False, loss_func=LabelSmoothingCrossEntropyFlat(),
                           cbs=[MixUp(), PredDtype()]).to_fp16()
    learn.fit(1)
    assert learn.pred_dtype.dtypes == {torch.float16}
