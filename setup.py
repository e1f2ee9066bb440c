"""Thin shim so `python3 setup.py install` still works; metadata is in pyproject.toml."""

from setuptools import setup

setup()
