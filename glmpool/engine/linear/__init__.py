"""How each weight matrix is multiplied: registry.py names every method and its fallbacks (torch-free),
base.py is the interface they implement and the modules that carry them in a model, and each scheme is
one file (reference, onednn, fp16, int8, int4, cuda, dequant; thudm.py is the stored quantized format).

This package's __init__ imports nothing, so that the supervisor can read the registry without torch.
"""
