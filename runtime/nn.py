"""Runtime stage: tokens → velocities (the TFMPE transformer vector field, in Equinox).

Input: a `TokenLayout` (static structure) and, per call, one example's `Tokens`, a flow time and a
`TokenSplit`. Output: one velocity per target token; `TokenVectorField` adapts this to the flow's
flat interface `vf(t, x, context) -> dx/dt`.

Each token is embedded as the sum of its value (linear), variable label, position within the
variable, target/conditioning type, flow time (sinusoidal features) and, where it has one, its
functional coordinate (fixed random Fourier features). The tokens then pass as one array (the
globals, then every site's tokens row-major) through pre-LN transformer blocks, with attention
structured by the hierarchy: a site token attends to its own site's tokens and the global
tokens; a global token attends to every global token and every real site token. Sites have no
index embedding, so permuting sites permutes site outputs and leaves global outputs unchanged.

`attention="blockwise"` computes that pattern without materialising it: site queries `(S, T)` meet
keys `[own site's T, G globals]`, batched over sites, O(S·T·(T+G)); global queries meet keys
`[G globals, S·T site tokens]`, O(G·(G+S·T)). `attention="dense"` builds the full (G+S·T)² masked
attention; it gives the same numbers and is faster while there are few tokens (`lf.NetworkConfig`
picks it up to `lf.DENSE_ATTENTION_MAX_TOKENS`).
"""

from __future__ import annotations

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox import field
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .tokens import TokenLayout, Tokens, TokenSplit, target_mask

# `target_mask` lives with the split it describes; it is re-exported here next to the vector field.
__all__ = ["Affine", "HierarchicalAttention", "LayerNorm", "TokenTransformer", "TokenVectorField",
           "TransformerBlock", "target_mask"]

ATTENTION_MODES = ("blockwise", "dense")
AttentionMode = Literal["blockwise", "dense"]


class Affine(eqx.Module):
    """`x @ weight + bias` over the last axis, for any leading axes."""

    weight: Float[Array, "fan_in fan_out"]
    bias: Float[Array, " fan_out"]

    def __init__(self, fan_in: int, fan_out: int, *, key: PRNGKeyArray):
        bound = 1.0 / math.sqrt(fan_in)
        weight_key, bias_key = jax.random.split(key)
        self.weight = jax.random.uniform(weight_key, (fan_in, fan_out), minval=-bound, maxval=bound)
        self.bias = jax.random.uniform(bias_key, (fan_out,), minval=-bound, maxval=bound)

    def __call__(self, x: Float[Array, "*batch fan_in"]) -> Float[Array, "*batch fan_out"]:
        return x @ self.weight + self.bias


class LayerNorm(eqx.Module):
    """Layer normalisation over the last axis, for any leading axes."""

    scale: Float[Array, " width"]
    offset: Float[Array, " width"]
    eps: float = field(static=True)

    def __init__(self, width: int, eps: float = 1e-5):
        self.scale = jnp.ones(width)
        self.offset = jnp.zeros(width)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch width"]) -> Float[Array, "*batch width"]:
        mean = x.mean(axis=-1, keepdims=True)
        variance = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(variance + self.eps) * self.scale + self.offset


def _masked_softmax(logits: Float[Array, "*rows keys"], mask: Bool[Array, "*rows keys"]) -> Float[Array, "*rows keys"]:
    """Softmax over the allowed keys; a row with none allowed gives zeros (not NaN), also in gradients."""
    # Mask before `exp`: a `where` after it would route NaN gradients from overflowed masked entries.
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    shifted = logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    weights = jnp.where(mask, jnp.exp(shifted), 0.0)
    return weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), jnp.finfo(logits.dtype).tiny)


class HierarchicalAttention(eqx.Module):
    """Multi-head attention restricted to the hierarchy (see the module docstring)."""

    query: Affine
    key: Affine
    value: Affine
    output: Affine
    num_heads: int = field(static=True)

    def __init__(self, width: int, num_heads: int, *, key: PRNGKeyArray):
        keys = jax.random.split(key, 4)
        self.query, self.key, self.value, self.output = (Affine(width, width, key=k) for k in keys)
        self.num_heads = num_heads

    def __check_init__(self):
        width = self.query.weight.shape[0]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}; "
                             f"choose a width that is a multiple of the number of heads")

    def __call__(self, x: Float[Array, "tokens width"], keys: "_AttentionKeys") -> Float[Array, "tokens width"]:
        """Attend over one example's token array (globals first, then the sites' tokens row-major)."""
        # The three projections as one product (fewer operations to compile; the same numbers).
        weight = jnp.concatenate([self.query.weight, self.key.weight, self.value.weight], axis=1)
        bias = jnp.concatenate([self.query.bias, self.key.bias, self.value.bias])
        q, k, v = jnp.split((x @ weight + bias).reshape(x.shape[0], 3 * self.num_heads, -1), 3, axis=1)
        attend = _dense if keys.mode == "dense" else _blockwise
        return self.output(_merge_heads(attend(q, k, v, keys)))


def _merge_heads(y: Float[Array, "*tokens heads head_dim"]) -> Float[Array, "*tokens width"]:
    return y.reshape(*y.shape[:-2], -1)


class _AttentionKeys(eqx.Module):
    """Which tokens each token may attend to, made once per forward pass and shared by the blocks.

    `global_keys` / `site_keys` say which tokens may be attended to at all (left-out tokens and
    padded sites may not); `dense_mask` is the full (G+S·T)² pattern, built only in dense mode.
    """

    global_keys: Bool[Array, " globals"]
    site_keys: Bool[Array, "sites tokens"]
    dense_mask: Bool[Array, "tokens tokens"] | None
    mode: AttentionMode = field(static=True)

    @staticmethod
    def make(global_keys, site_keys, mode: AttentionMode) -> "_AttentionKeys":
        if mode != "dense":
            return _AttentionKeys(global_keys, site_keys, None, mode)
        num_sites, tokens = site_keys.shape
        # Group −1 is global; a query sees keys of its own group, and any global sees / is seen by all.
        group = np.concatenate([np.full(global_keys.shape[0], -1), np.repeat(np.arange(num_sites), tokens)])
        is_global = group < 0
        allowed = (group[:, None] == group[None, :]) | is_global[:, None] | is_global[None, :]
        mask = allowed & jnp.concatenate([global_keys, site_keys.reshape(-1)])[None, :]
        return _AttentionKeys(global_keys, site_keys, mask, mode)


def _blockwise(q, k, v, keys: _AttentionKeys):
    """Hierarchical attention in O(S·T·(T+G) + G·(G+S·T)): no site × site logits are formed."""
    num_sites, tokens = keys.site_keys.shape
    num_globals = keys.global_keys.shape[0]
    _, num_heads, head_dim = q.shape
    q_g, k_g, v_g = q[:num_globals], k[:num_globals], v[:num_globals]
    q_s, k_s, v_s = (y[num_globals:].reshape(num_sites, tokens, num_heads, head_dim) for y in (q, k, v))
    k_flat, v_flat = k[num_globals:], v[num_globals:]
    scale = 1.0 / math.sqrt(head_dim)
    # Site queries: keys are the own site's tokens, then the globals (broadcast, not copied).
    logits = jnp.concatenate([jnp.einsum("sqhc,skhc->shqk", q_s, k_s),
                              jnp.einsum("sqhc,khc->shqk", q_s, k_g)], axis=-1) * scale
    mask = jnp.concatenate([keys.site_keys[:, None, None, :],
                            jnp.broadcast_to(keys.global_keys, (num_sites, 1, 1, num_globals))], axis=-1)
    weights = _masked_softmax(logits, mask)
    out_s = (jnp.einsum("shqk,skhc->sqhc", weights[..., :tokens], v_s)
             + jnp.einsum("shqk,khc->sqhc", weights[..., tokens:], v_g))
    # Global queries: keys are all globals, then every site token (padding masked).
    logits = jnp.concatenate([jnp.einsum("qhc,khc->hqk", q_g, k_g),
                              jnp.einsum("qhc,khc->hqk", q_g, k_flat)], axis=-1) * scale
    mask = jnp.concatenate([keys.global_keys, keys.site_keys.reshape(-1)])
    weights = _masked_softmax(logits, jnp.broadcast_to(mask, logits.shape))
    out_g = (jnp.einsum("hqk,khc->qhc", weights[..., :num_globals], v_g)
             + jnp.einsum("hqk,khc->qhc", weights[..., num_globals:], v_flat))
    return jnp.concatenate([out_g, out_s.reshape(num_sites * tokens, num_heads, head_dim)])


def _dense(q, k, v, keys: _AttentionKeys):
    """Hierarchical attention as one (G+S·T)² masked attention."""
    logits = jnp.einsum("qhc,khc->hqk", q, k) / math.sqrt(q.shape[-1])
    weights = _masked_softmax(logits, jnp.broadcast_to(keys.dense_mask, logits.shape))
    return jnp.einsum("hqk,khc->qhc", weights, v)


class TransformerBlock(eqx.Module):
    """Pre-LN transformer block: `x + attention(norm(x))`, then `x + mlp(norm(x))`."""

    attention_norm: LayerNorm
    attention: HierarchicalAttention
    mlp_norm: LayerNorm
    mlp_in: Affine
    mlp_out: Affine

    def __init__(self, width: int, num_heads: int, mlp_width: int, *, key: PRNGKeyArray):
        attention_key, in_key, out_key = jax.random.split(key, 3)
        self.attention_norm = LayerNorm(width)
        self.attention = HierarchicalAttention(width, num_heads, key=attention_key)
        self.mlp_norm = LayerNorm(width)
        self.mlp_in = Affine(width, mlp_width, key=in_key)
        self.mlp_out = Affine(mlp_width, width, key=out_key)

    def __call__(self, x: Float[Array, "tokens width"], keys: _AttentionKeys) -> Float[Array, "tokens width"]:
        x = x + self.attention(self.attention_norm(x), keys)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class TokenTransformer(eqx.Module):
    """The TFMPE network: a transformer over a layout's tokens, giving one velocity per target token."""

    value_embedding: Affine
    label_embedding: Float[Array, "labels width"]
    position_embedding: Float[Array, "positions width"]
    type_embedding: Float[Array, "2 width"]
    time_embedding: Affine
    coordinate_embedding: Affine | None
    blocks: tuple[TransformerBlock, ...]
    final_norm: LayerNorm
    head: Affine
    layout: TokenLayout = field(static=True)
    attention: AttentionMode = field(static=True)
    time_features: int = field(static=True)
    coordinate_features: int = field(static=True)
    coordinate_scale: float = field(static=True)
    coordinate_seed: int = field(static=True)

    def __init__(
        self,
        layout: TokenLayout,
        *,
        width: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: int = 4,
        attention: AttentionMode = "blockwise",
        time_features: int = 16,
        coordinate_features: int = 16,
        coordinate_scale: float = 1.0,
        coordinate_seed: int = 0,
        key: PRNGKeyArray,
    ):
        """Arguments:
            layout: the token layout the network reads.
            width, depth, num_heads, mlp_ratio: model width, number of blocks, attention heads, and
                the MLP's hidden width as a multiple of `width`.
            attention: "blockwise" (linear in the number of sites) or "dense" (one masked product;
                faster for few tokens).
            time_features, coordinate_features: sinusoidal frequencies for the flow time; random
                Fourier frequencies for functional coordinates.
            coordinate_scale: the coordinates' length scale (the random frequencies are N(0, 1/scale²)).
            coordinate_seed: seed of the random Fourier frequencies. They are fixed, not trained, so
                they are drawn from this seed inside `__call__` rather than stored as a parameter.
            key: PRNG key for the initial weights.
        """
        keys = iter(jax.random.split(key, 7 + depth))
        self.value_embedding = Affine(1, width, key=next(keys))
        self.label_embedding = jax.random.normal(next(keys), (len(layout.labels), width))
        self.position_embedding = jax.random.normal(next(keys), (layout.max_position, width))
        self.type_embedding = jax.random.normal(next(keys), (2, width))
        self.time_embedding = Affine(2 * time_features, width, key=next(keys))
        has_coords = layout.coord_dims > 0
        self.coordinate_embedding = Affine(2 * coordinate_features, width, key=next(keys)) if has_coords else None
        self.blocks = tuple(TransformerBlock(width, num_heads, mlp_ratio * width, key=next(keys)) for _ in range(depth))
        self.final_norm = LayerNorm(width)
        self.head = Affine(width, 1, key=next(keys))
        self.layout = layout
        self.attention = attention
        self.time_features = time_features
        self.coordinate_features = coordinate_features
        self.coordinate_scale = coordinate_scale
        self.coordinate_seed = coordinate_seed

    def __check_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.coordinate_scale <= 0:
            raise ValueError(f"coordinate_scale must be positive, got {self.coordinate_scale}")

    def __call__(
        self, t: Float[Array, ""], tokens: Tokens, split: TokenSplit
    ) -> tuple[Float[Array, " globals"], Float[Array, "max_sites tokens"]]:
        """Velocities of one example's target tokens; zero at conditioning, left-out and padded tokens.

        Arguments:
            t: the flow time, in [0, 1].
            tokens: one example's tokens (the targets holding the flow's current state).
            split: which tokens are targets, conditioning or left out; made from this network's layout.
        """
        layout = self.layout
        if split.layout != layout:
            raise ValueError("the split was made from a different layout than the network's; "
                             "build it with `network.layout.split(...)`")
        global_target, site_target = split.global_target, split.site_target
        time = self.time_embedding(_sinusoidal_features(jnp.asarray(t), self.time_features))
        global_x = (self.value_embedding(tokens.global_values[:, None])
                    + self.label_embedding[layout.global_label] + self.position_embedding[layout.global_position]
                    + self.type_embedding[global_target.astype(np.int32)] + time)
        site_static = (self.label_embedding[layout.site_label] + self.position_embedding[layout.site_position]
                       + self.type_embedding[site_target.astype(np.int32)])
        site_x = self.value_embedding(tokens.site_values[..., None]) + site_static + time
        if self.coordinate_embedding is not None:
            features = self.coordinate_embedding(self._coordinate_features(tokens.site_coords))
            site_x = site_x + jnp.where(layout.site_has_coord[:, None], features, 0.0)
        real_sites = tokens.site_mask > 0
        keys = _AttentionKeys.make(jnp.asarray(split.global_visible), real_sites[:, None] & split.site_visible[None, :],
                                   self.attention)
        # One token array through the blocks (globals, then the sites' tokens row-major): every
        # per-token layer is one product over all tokens rather than one for globals and one for sites.
        num_globals, (num_sites, site_tokens) = global_x.shape[0], site_x.shape[:2]
        x = jnp.concatenate([global_x, site_x.reshape(num_sites * site_tokens, -1)])
        for block in self.blocks:
            x = block(x, keys)
        velocity = self.head(self.final_norm(x))[:, 0]
        global_v, site_v = velocity[:num_globals], velocity[num_globals:].reshape(num_sites, site_tokens)
        return (jnp.where(global_target, global_v, 0.0),
                jnp.where(real_sites[:, None] & site_target[None, :], site_v, 0.0))

    def _coordinate_features(self, coords: Float[Array, "*batch coords"]) -> Float[Array, "*batch features"]:
        frequencies = jax.random.normal(jax.random.key(self.coordinate_seed),
                                        (self.layout.coord_dims, self.coordinate_features))
        angles = 2 * jnp.pi * coords @ (frequencies / self.coordinate_scale)
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _sinusoidal_features(t: Float[Array, ""], num: int) -> Float[Array, " features"]:
    """sin/cos of t at `num` geometric frequencies from 1 to 1000 (radians per unit time)."""
    angles = t * jnp.geomspace(1.0, 1000.0, num)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])


class TokenVectorField(eqx.Module):
    """The flow's vector field over the flat target vector: `vf(t, x, context) -> dx/dt`.

    `x` is `split.gather(...)` of the target tokens (global targets first, then site targets of all
    `max_sites` sites, row-major); `context` is the example's `Tokens` (target values are ignored
    and overwritten by `x`). Entries at padded sites are zero; `target_mask` marks the real ones.
    """

    network: TokenTransformer
    split: TokenSplit = field(static=True)

    def __check_init__(self):
        if self.split.layout != self.network.layout:
            raise ValueError("the split was made from a different layout than the network's; "
                             "build it with `network.layout.split(...)`")

    def __call__(self, t: Float[Array, ""], x: Float[Array, " targets"], context: Tokens) -> Float[Array, " targets"]:
        global_v, site_v = self.network(t, self.split.scatter(context, x), self.split)
        return self.split.gather(global_v, site_v)
