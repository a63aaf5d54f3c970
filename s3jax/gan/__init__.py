"""StyleGAN-based video editing (STIT): stitching tuning and pivotal tuning of a StyleGAN2."""
