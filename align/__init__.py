"""align: preference alignment for text-to-image diffusion models
(Diffusion-DPO, Diffusion-KTO, LongAlign)."""

__version__ = "0.1.0"
