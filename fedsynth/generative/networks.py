"""Neural networks of the GAN and the VAE, and the output activations they share.

Nothing here uses BatchNorm: under DP-SGD a batch statistic mixes rows, which breaks
per-sample gradients. Networks that see real rows (critic, VAE) use plain Linear layers
and LayerNorm, both of which Opacus computes per-sample gradients for. The generator never
sees real rows, so it may use anything; it uses the same residual blocks as CTGAN with
LayerNorm instead of BatchNorm, so that it can be federated like the other weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedsynth.generative.codec import Codec


class Residual(nn.Module):
    """CTGAN's residual block: the input is concatenated to the block's output."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(self.norm(self.fc(x))), x], dim=-1)


def _residual_mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    dim = in_dim
    for width in hidden:
        layers.append(Residual(dim, width))
        dim += width
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """(noise, condition) -> raw output; :func:`activate` turns it into an encoded row."""

    def __init__(self, latent_dim: int, cond_dim: int, hidden: list[int], out_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = _residual_mlp(latent_dim + cond_dim, hidden, out_dim)

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, cond], dim=-1))

    @torch.inference_mode()
    def generate(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Same output as ``forward``, without materialising the residual concatenations.

        A Linear layer on cat([h_k, ..., h_1, x]) equals the sum of Linear layers on each
        part with the matching slice of its weight; at sampling time on hundreds of
        thousands of rows the copies cost as much as the matrix products (profiled here).
        """
        parts = [z, cond]
        for layer in self.net:
            linear: nn.Linear = layer.fc if isinstance(layer, Residual) else layer  # type: ignore[assignment]
            start = parts[0].shape[-1]
            out = F.linear(parts[0], linear.weight[:, :start], linear.bias)
            for part in parts[1:]:
                width = part.shape[-1]
                out.add_(F.linear(part, linear.weight[:, start : start + width]))
                start += width
            if not isinstance(layer, Residual):
                return out
            parts.insert(0, F.relu(layer.norm(out), inplace=True))
        raise AssertionError("the network ends with a Linear layer")


class Critic(nn.Module):
    """GAN discriminator on (row, condition). Works on any leading dimensions.

    The GAN feeds it pairs shaped (batch, 2, features) -- a real row and a fake row made
    for the same condition -- so that Opacus computes one per-sample gradient per *real
    row*, covering both halves of that row's loss (see gan.py).
    """

    def __init__(self, in_dim: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for width in hidden:
            layers += [nn.Linear(dim, width), nn.LeakyReLU(0.2), nn.Dropout(0.25)]
            dim = width
        layers.append(nn.Linear(dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class VAE(nn.Module):
    """Conditional tabular VAE in the spirit of TVAE; the whole model sees real rows."""

    def __init__(
        self,
        data_dim: int,
        cond_dim: int,
        encoder_hidden: list[int],
        decoder_hidden: list[int],
        latent_dim: int,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        layers: list[nn.Module] = []
        dim = data_dim + cond_dim
        for width in encoder_hidden:
            layers += [nn.Linear(dim, width), nn.ReLU()]
            dim = width
        self.encoder = nn.Sequential(*layers)
        self.to_mu = nn.Linear(dim, latent_dim)
        self.to_logvar = nn.Linear(dim, latent_dim)
        self.decoder = Generator(latent_dim, cond_dim, decoder_hidden, data_dim)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(torch.cat([x, cond], dim=-1))
        mu, logvar = self.to_mu(h), self.to_logvar(h).clamp(-10.0, 10.0)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decoder(z, cond), mu, logvar


def activate(raw: torch.Tensor, codec: Codec, tau: float = 0.2) -> torch.Tensor:
    """Differentiable encoded row: Gumbel-softmax per block, tanh per offset (training)."""
    parts = []
    for c in codec.columns:
        logits = raw[:, c.start : c.start + c.block_size]
        parts.append(F.gumbel_softmax(logits, tau=tau, hard=False))
        if c.has_offset:
            parts.append(torch.tanh(raw[:, c.offset_index : c.offset_index + 1]))
    return torch.cat(parts, dim=-1)


def condition_loss(raw: torch.Tensor, cond: torch.Tensor, codec: Codec) -> torch.Tensor:
    """Cross-entropy that makes the generator produce the category it was asked for."""
    total = raw.new_zeros(())
    for j, c in enumerate(codec.discrete):
        lo, hi = int(codec.cond_offsets[j]), int(codec.cond_offsets[j + 1])
        target = cond[:, lo:hi]
        asked = target.sum(dim=1) > 0
        if not bool(asked.any()):
            continue
        logits = raw[asked, c.start : c.start + c.n_bins]
        total = total + F.cross_entropy(logits, target[asked].argmax(dim=1), reduction="sum")
    return total / max(raw.shape[0], 1)


def reconstruction_loss(
    raw: torch.Tensor, x: torch.Tensor, codec: Codec, sigma: float = 0.1
) -> torch.Tensor:
    """Per-row VAE reconstruction loss: cross-entropy per block, Gaussian per offset."""
    per_row = raw.new_zeros(raw.shape[0])
    for c in codec.columns:
        block = slice(c.start, c.start + c.block_size)
        per_row = per_row + F.cross_entropy(
            raw[:, block], x[:, block].argmax(dim=1), reduction="none"
        )
        if c.has_offset:
            k = c.offset_index
            observed = x[:, c.start + c.n_bins] == 0 if c.nullable else torch.ones_like(x[:, k])
            err = (torch.tanh(raw[:, k]) - x[:, k]) ** 2 / (2 * sigma**2)
            per_row = per_row + err * observed.float()
    return per_row
