"""LCM Dreamshaper v7 inference engine: loading, sampling, images, safety, command line.

Nothing in this package imports Cog; predict.py adapts it to Cog.
"""

__version__ = "0.1.0"
MODEL_NAME = "SimianLuo/LCM_Dreamshaper_v7"
