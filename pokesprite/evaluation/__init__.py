"""Measured quality: FID/KID, reconstruction, text alignment, text sensitivity and sample grids.

One concept per file: ``inception`` (the TF-FID feature network), ``fid`` (FID and KID),
``image_metrics`` (PSNR, SSIM), ``scorer`` (the independent image-text scorer), ``sensitivity``,
``grid``; ``evaluate`` puts them together for the evaluate stage.
"""
