"""ReactDiff: latent diffusion for multiple appropriate facial reaction generation.

The model library (PyTorch + numpy only): the stage-1 Multi-Modality Transformer
auto-encoder, the stage-2 latent diffusion (denoiser, schedule, DDIM sampler), the
``ReactDiffGenerator`` that ties them together, named presets and the REACT metrics.
"""

__version__ = "0.1.0"
