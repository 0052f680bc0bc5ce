"""star_jax: JAX/Flax training and inference for STAR (stacked autoregressive multimodal)."""

import setuptools

# The core stack. Versions are the ones the test suite is run against.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets",
    "array-record",
    "ml-collections",
    "clu",
    "absl-py",
    "numpy",
    "pillow",
    "scipy",  # connected components in ShapeEval, scaling-law fits
    "matplotlib",  # sweep reports (star_jax/scaling)
    "etils[epath]",  # workdirs on local disks and buckets (gs://)
    "tokenizers",
]

EXTRAS = {
    # Import / export / parity only. torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
    "torch": ["torch==2.13.0", "transformers", "safetensors"],
    "tensorboard": ["tensorflow-cpu", "tensorboard"],
    # Running on TPU VMs: jax's own TPU extra (it pins the libtpu matching jax).
    "tpu": ["jax[tpu]==0.10.2"],
    # `star-jax aot` on any machine: the libtpu wheel jax 0.10.2 was built against (jax[tpu]
    # pins the same), which gives compile-only TPU devices without a TPU.
    "aot": ["libtpu==0.0.42.*"],
    "test": ["pytest", "pytest-xdist", "pytest-timeout", "ruff"],
}
EXTRAS["dev"] = EXTRAS["torch"] + EXTRAS["test"]

setuptools.setup(
    name="star_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    # `configs/` and `projects/` live at the top level (big_vision style) and are importable as
    # star_jax.configs and star_jax.projects, so config files can `from star_jax.configs import common`
    # and name a project's modules in `config.imports`. The core (star_jax/) never imports a project.
    packages=setuptools.find_packages(include=["star_jax", "star_jax.*"])
    + ["star_jax.configs", "star_jax.configs.sweeps", "star_jax.projects", "star_jax.projects.shapes"],
    package_dir={
        "star_jax.configs": "configs",
        "star_jax.configs.sweeps": "configs/sweeps",
        "star_jax.projects": "projects",
        "star_jax.projects.shapes": "projects/shapes",
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["star-jax=star_jax.main:run"]},
)
