from setuptools import Extension, setup

# glmpool's CPU kernels (glmpool/engine/row_kernel.c, decode_attention.c, gelu.c, int_dot.c, greedy.c; loaded
# with ctypes, so they need no Python headers). Optional: without a C compiler glmpool installs and runs on
# torch's kernels alone. -ffp-contract=off: only explicit fused multiply-adds fuse (see decode_attention.c).
kernels = Extension("glmpool.engine._kernels", ["glmpool/engine/row_kernel.c", "glmpool/engine/decode_attention.c",
                                                "glmpool/engine/gelu.c", "glmpool/engine/int_dot.c",
                                                "glmpool/engine/greedy.c"],
                    extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"], extra_link_args=["-fopenmp"],
                    libraries=["m"], optional=True)

setup(ext_modules=[kernels])
