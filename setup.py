"""Packaging beyond what pyproject.toml can say: the top-level ``pages/`` folder is installed as
``lance_app.pages`` (``find_packages`` alone cannot map a folder to a subpackage)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["engine", "engine.*", "lance_app", "lance_app.*"]) + ["lance_app.pages"],
    package_dir={"lance_app.pages": "pages"},
)
