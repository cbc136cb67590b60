from setuptools import Extension, setup

# glmpool's CPU row kernel (glmpool/engine/row_kernel.c, loaded with ctypes, so it needs no Python
# headers). Optional: without a C compiler glmpool installs and runs on torch's kernels alone.
row_kernel = Extension("glmpool.engine._row_kernel", ["glmpool/engine/row_kernel.c"],
                       extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"], optional=True)

setup(ext_modules=[row_kernel])
