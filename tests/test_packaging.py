"""pyproject ships every subpackage, and kernels/ only as batchllm_hf.kernels (never a top-level `kernels`)."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_shipped_and_kernels_is_not_top_level():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    packages, package_dir = set(setuptools["packages"]), setuptools["package-dir"]
    on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(ROOT, "batchllm_hf")) if "__init__.py" in files}
    on_disk.add("batchllm_hf.kernels")
    assert on_disk <= packages, f"not shipped: {sorted(on_disk - packages)}"
    assert package_dir["batchllm_hf.kernels"] == "kernels"
    assert not any(p == "kernels" or p.startswith("kernels.") for p in packages)
