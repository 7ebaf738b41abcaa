# setuptools shim: all metadata lives in pyproject.toml ([project] + [tool.nbdev]).
from setuptools import setup
setup()
