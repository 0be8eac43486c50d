"""clmae: Curriculum-Learned Masked Autoencoders (CL-MAE) for Vision Transformers."""
__version__ = "0.1.0"
