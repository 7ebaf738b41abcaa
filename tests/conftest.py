import pytest

def pytest_configure(config):
    # `slow` tests still run in `make test`; `-m "not slow"` skips them for a quick loop
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still run by `make test`)")
    config.addinivalue_line("markers", "gpu: needs CUDA, skipped without it; `make gpu-check` runs them")

@pytest.fixture(params=['native', 'torch'])
def backend(request):
    "Run a test through the fused CPU kernel and through the PyTorch-op path of the losses"
    from fastai_regularize.native import use_native, native_info
    if request.param == 'native' and not native_info()['available']:
        pytest.skip(f"native kernel unavailable here: {native_info().get('error')}")   # test_native checks it builds
    with use_native(request.param == 'native'): yield request.param

def pytest_collection_modifyitems(config, items):
    "Tests marked `gpu` need CUDA: skipped without it (`make gpu-check` runs them on a machine that has it)"
    import torch
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason='needs CUDA')
    for item in items:
        if item.get_closest_marker('gpu') is not None: item.add_marker(skip)

def flip_learner(scale=3., n_valid=400, seed=0, loss_func=None, warm=True):
    "A linear classifier of 6×6 images with a random flip (so TTA's passes differ), `scale` times too confident"
    import torch, torch.nn as nn, torch.nn.functional as F
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.vision.augment import Flip
    from fastai_regularize.data import tensor_image_dls
    g = torch.Generator().manual_seed(seed)
    n = 100 + n_valid
    x = (torch.rand(n, 6, 6, generator=g)*255).to(torch.uint8)
    W = torch.randn(36, 3, generator=g)/4
    y = torch.multinomial(F.softmax((x.float()/64 - 2).flatten(1) @ W, -1), 1, generator=g)[:, 0]
    dls = tensor_image_dls(x[:100], y[:100], x[100:], y[100:], ['a', 'b', 'c'], bs=64, batch_tfms=[Flip(p=0.5)])
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    with torch.no_grad(): model[1].weight.copy_(scale*W.T); model[1].bias.zero_()
    learn = Learner(dls, model, loss_func=loss_func or CrossEntropyLossFlat())
    if warm: learn.get_preds()   # fastai's first prediction draws random numbers (see tta_logits); later ones are as seeded
    return learn

def tiny_digits(tmp_path_factory):
    "48 training and 18 validation digits of three classes, in train/ and valid/ folders (the tiny `compare` data)"
    import shutil
    from fastai_regularize.data import digits_folder
    digits = digits_folder(tmp_path_factory.mktemp('digits')/'digits')
    root = tmp_path_factory.mktemp('tiny')
    for split,n in (('train', 16), ('valid', 6)):
        for c in ('1', '4', '7'):
            (root/split/c).mkdir(parents=True)
            for f in sorted((digits/split/c).glob('*.png'))[:n]: shutil.copy(f, root/split/c/f.name)
    return root
