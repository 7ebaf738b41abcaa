import pytest

def pytest_configure(config):
    # `slow` tests still run in `make test`; `-m "not slow"` skips them for a quick loop
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still run by `make test`)")

@pytest.fixture(params=['native', 'torch'])
def backend(request):
    "Run a test through the fused CPU kernel and through the PyTorch-op path of the losses"
    from fastai_regularize.native import use_native, native_info
    if request.param == 'native' and not native_info()['available']:
        pytest.skip(f"native kernel unavailable here: {native_info().get('error')}")   # test_native checks it builds
    with use_native(request.param == 'native'): yield request.param
