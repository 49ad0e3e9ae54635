"""Super-resolution (SwinIR): MATLAB bicubic, PSNR/SSIM as the SR papers, test sets and calibration
patches, the spandrel model adapter (window-attention wrapping, sites, units) and the demo SwinIR."""
