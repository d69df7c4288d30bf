# All metadata lives in pyproject.toml; this shim keeps `python setup.py ...`
# and tools that still look for setup.py working.
from setuptools import setup

setup()
