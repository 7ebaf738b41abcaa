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
