import pytest

def pytest_configure(config):
    # `slow` tests still run in `make test`; `-m "not slow"` skips them for a quick loop
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still run by `make test`)")
