"""Generative core: schema, codec, DP-SGD GAN and VAE, sampling, quality.

Knows nothing of Flower or HTTP; budgets and ledgers live in ``fedsynth.privacy``.
"""
