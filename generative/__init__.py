"""Generative models: DCGAN (dcgan.py) with its FID (fid.py), the autoencoder and VAE, neural style transfer."""
