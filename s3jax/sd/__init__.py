"""Stable Diffusion 1.x in Flax: UNet, VAE, CLIP, tokenizer, DDIM and TokenFlow-PnP (IP-FaceDiff)."""
