"""On CUDA only (`make gpu-check`; skipped elsewhere): the label-smoothing losses' CUDA path, which is PyTorch ops (the C
kernel is CPU-only), against `F.cross_entropy(..., label_smoothing=)` on the same device, value and gradient, in float32
and half logits, with class weights and ignored targets, every reduction; and `mixed_loss` against its two-term
definition. `tests/test_differential.py` draws many more cases on CUDA too; these are the named ones a failure there
reads against. The mixing callbacks under fastai's `to_fp16()` on CUDA are in `tests/test_compat.py`."""
import pytest, torch, torch.nn.functional as F

from fastai_regularize.losses import label_smoothing_cross_entropy, LabelSmoothingCrossEntropyFlat, mixed_loss

pytestmark = pytest.mark.gpu
DEV = 'cuda'
# our half logits are computed in float32: the values match float32's; the gradient is rounded to the logits' dtype
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}

def _nodes(t)->set:
    "Names of the autograd nodes behind `t`"
    todo,seen = [t.grad_fn],set()
    while todo:
        f = todo.pop()
        if f is None or f in seen: continue
        seen.add(f); todo += [n for n,_ in f.next_functions]
    return {f.name() for f in seen}

def _case(dtype, weighted:bool, ignored:bool, N=64, C=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g) * 3).to(DEV, dtype)
    y = torch.randint(0, C, (N,), generator=g)
    if ignored: y[::5] = -100
    w = torch.rand(C, generator=g) + 0.5 if weighted else None
    return x, y.to(DEV), None if w is None else w.to(DEV)

@pytest.mark.parametrize('ignored', [False, True], ids=['all', 'some_ignored'])
@pytest.mark.parametrize('weighted', [False, True], ids=['unweighted', 'weighted'])
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=['float32', 'float16', 'bfloat16'])
def test_label_smoothing_on_cuda_equals_pytorch(dtype, reduction, weighted, ignored):
    x,y,w = _case(dtype, weighted, ignored)
    xo,xr = x.clone().requires_grad_(),x.float().requires_grad_()
    ours = label_smoothing_cross_entropy(xo, y, 0.1, w, reduction)
    ref = F.cross_entropy(xr, y, weight=w, reduction=reduction, label_smoothing=0.1)
    assert ours.device.type == DEV and '_SmoothCENativeBackward' not in _nodes(ours)
    torch.testing.assert_close(ours.float(), ref, atol=1e-5, rtol=1e-5)
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    go, = torch.autograd.grad(ours, xo, gout.to(ours.dtype))
    gr, = torch.autograd.grad(ref, xr, gout)
    assert go.dtype == dtype
    torch.testing.assert_close(go.float(), gr, atol=GRAD_TOL[dtype] * gr.abs().max().item(), rtol=GRAD_TOL[dtype])

@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['float32', 'float16'])
def test_mixed_loss_on_cuda_equals_its_definition(dtype):
    "λ·CE(z, y1) + (1-λ)·CE(z, y2) per item, averaged, by F.cross_entropy: what MixUp trains on, here on CUDA in one pass"
    x,y1,_ = _case(dtype, False, False)
    y2 = y1.roll(1)
    lam = torch.rand(len(y1), generator=torch.Generator().manual_seed(2)).to(DEV)
    xo,xr = x.clone().requires_grad_(),x.float().requires_grad_()
    ours = mixed_loss(LabelSmoothingCrossEntropyFlat(eps=0.1), xo, (y1,), (y2,), lam)
    ce = lambda t: F.cross_entropy(xr, t, reduction='none', label_smoothing=0.1)
    ref = (lam * ce(y1) + (1 - lam) * ce(y2)).mean()
    assert ours.device.type == DEV
    torch.testing.assert_close(ours.float(), ref, atol=1e-5, rtol=1e-5)
    go, = torch.autograd.grad(ours, xo)
    gr, = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(go.float(), gr, atol=GRAD_TOL[dtype] * gr.abs().max().item(), rtol=GRAD_TOL[dtype])
