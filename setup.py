"""Build step of the one compiled part: the integer engine's kernels and the NIR interpreter's neuron step
(sdt_deploy/run/_engine_kernels.c).

Everything else about the package is in pyproject.toml. The extension is plain C over Python buffers
(no numpy headers); it needs a C compiler at install time (gcc on the project's machines). Should it
fail to build, the install goes on and the engine uses its numpy kernels (same results, slower):
`python -c "import sdt_deploy.run._engine_kernels"` tells, and tests/test_engine_kernels.py fails loudly.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("sdt_deploy.run._engine_kernels", ["sdt_deploy/run/_engine_kernels.c"],
                             # -ffp-contract=off: the NIR neuron's float64 step rounds every operation
                             # as numpy does (no fused multiply-add)
                             extra_compile_args=["-O3", "-std=c99", "-fno-strict-aliasing", "-ffp-contract=off",
                                                 "-Wno-psabi", "-pthread"],
                             # the kernels' worker threads (pthreads; part of libc on glibc >= 2.34)
                             extra_link_args=["-pthread"],
                             optional=True)])
