"""glmpool: serve ChatGLM-6B through a shared directory of files, as a supervised pool of workers."""

__version__ = "0.1.0"
