"""Measured quality: FID/KID, reconstruction, text alignment, text sensitivity, memorisation, the
guidance curve and sample grids.

One concept per file: ``inception`` (the TF-FID feature network), ``fid`` (FID and KID),
``fid_all`` (the few-shot GAN protocol: many sprites against every real one), ``memorisation``
(nearest training neighbours, the calibrated near-copy threshold), ``guidance_curve`` (KID and
R-precision against the guidance scale), ``image_metrics`` (PSNR, SSIM), ``retrieval`` (R-precision,
top-1 retrieval of a similarity matrix), ``scorer`` (the independent
image-text scorer), ``sensitivity``, ``grid``, ``drawing`` (how sprites are drawn for evaluation);
``evaluate`` puts them together for the evaluate stage.
"""
