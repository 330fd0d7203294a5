"""Package discovery for the one `dexserve` namespace split over the product's folders.

proto/ holds `dexserve.v1`, service/ the root package and the torch-free
layer, worker/ the engine layer. Every package under those folders is found
here (nothing is listed by hand), and a folder that is absent is skipped: the
gateway image builds from proto/ and service/ alone, so it carries no engine
code. Everything else about the distribution is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOTS = ("proto", "service", "worker")
here = Path(__file__).parent
package_dir: dict[str, str] = {}
for root in ROOTS:
    if (here / root / "dexserve").is_dir():
        for pkg in find_namespace_packages(str(here / root), include=["dexserve", "dexserve.*"]):
            if (here / root / pkg.replace(".", "/") / "__init__.py").is_file():
                package_dir[pkg] = f"{root}/{pkg.replace('.', '/')}"

setup(packages=sorted(package_dir), package_dir=package_dir)
