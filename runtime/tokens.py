"""Runtime stage: IR → token layout; values ↔ tokens.

Input: a checked `ModelIR`. Output: a `TokenLayout`, the static structure the transformer is built
on, which encodes `{IR name: array}` into fixed-shape `Tokens` and decodes them back.

Every scalar of a model variable is one token. Global tokens come from the `global` variables;
site tokens from the `local`, `input` and `observation` variables, with the same layout at every
site. Deterministic variables are not tokenised. Order is the IR's variable order, row-major within
a variable. Each token carries static metadata (its variable's label id, its flat position within the
variable, its role) and, for elements of a function-valued variable (`Variable.coords`), its
functional coordinates, read at encode time from the same site's coordinate inputs.

Sites are padded to `max_sites` and masked, so one network serves any site count up to it. A
`TokenSplit` says which variables are targets (the flow's state), which are conditioning, and which
are left out (masked from attention, e.g. locals marginalised out of a global posterior).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from hierdsl.compiler.errors import did_you_mean
from hierdsl.compiler.ir import ModelIR

__all__ = ["TokenLayout", "TokenSplit", "Tokens", "VariableSlot", "target_mask"]

SITE_ROLES = ("local", "input", "observation")


class Tokens(eqx.Module):
    """One example's tokens (vmap for a batch: every field gains a leading batch axis).

    Fields:
        global_values: one value per global token.
        site_values: one value per site token, at every (padded) site; zero at padded sites.
        site_coords: each site token's functional coordinates; zero where it has none
            (`TokenLayout.site_coord_mask` says which entries are real).
        site_mask: 1 for real sites, 0 for padding.
    """

    global_values: Float[Array, " globals"]
    site_values: Float[Array, "max_sites tokens"]
    site_coords: Float[Array, "max_sites tokens coords"]
    site_mask: Float[Array, " max_sites"]


@dataclass(frozen=True)
class VariableSlot:
    """Where one tokenised variable lives in the token arrays.

    label: its id in the layout's label vocabulary. offset: its first token on the global axis
    (global variables) or the per-site token axis (site variables). coords: the inputs holding its
    functional coordinates along axis 0 (see `Variable.coords`).
    """

    name: str
    role: str
    shape: tuple[int, ...]
    label: int
    offset: int
    coords: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def per_site(self) -> bool:
        return self.role in SITE_ROLES

    @property
    def tokens(self) -> slice:
        return slice(self.offset, self.offset + self.size)


@dataclass(frozen=True)
class TokenLayout:
    """The static token structure of one model, derived from its IR by `TokenLayout.from_ir`.

    Hashable and free of arrays, so it can be a static field of a network or a static argument to
    `jit`. The per-token metadata properties return NumPy arrays (constants under `jit`).
    """

    max_sites: int
    slots: tuple[VariableSlot, ...]
    untokenised: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_sites < 1:
            raise ValueError(f"max_sites must be at least 1, got {self.max_sites}")

    @staticmethod
    def from_ir(ir: ModelIR, *, max_sites: int) -> TokenLayout:
        """Lay out the tokens of `ir` for up to `max_sites` sites.

        Arguments:
            ir: the checked model.
            max_sites: the largest number of sites the layout (and a network built on it) serves.
        """
        tokenised = [v for v in ir.variables if v.role == "global" or v.role in SITE_ROLES]
        untokenised = tuple(v.name for v in ir.variables if v.role in ("global_det", "site_det"))
        slots = []
        global_offset = site_offset = 0
        for label, var in enumerate(tokenised):
            per_site = var.role in SITE_ROLES
            slots.append(VariableSlot(var.name, var.role, tuple(var.shape), label,
                                      site_offset if per_site else global_offset, tuple(var.coords)))
            if per_site:
                site_offset += var.size
            else:
                global_offset += var.size
        layout = TokenLayout(max_sites, tuple(slots), untokenised)
        layout._check_coords()
        return layout

    def _check_coords(self) -> None:
        for slot in self.site_slots:
            for name in slot.coords:
                source = self.slot(name)
                if source.role != "input" or not slot.shape or not source.shape \
                        or source.shape[0] != slot.shape[0]:
                    raise ValueError(
                        f"{slot.name!r} takes its functional coordinates from {name!r}, which must be an "
                        f"input whose axis 0 matches {slot.name!r}'s axis 0; {name!r} is a {source.role} "
                        f"of shape {source.shape} and {slot.name!r} has shape {slot.shape}"
                    )

    # -- structure ------------------------------------------------------------
    @property
    def labels(self) -> tuple[str, ...]:
        """The label vocabulary: tokenised variable names in IR order (a token's label id indexes it)."""
        return tuple(s.name for s in self.slots)

    @property
    def global_slots(self) -> tuple[VariableSlot, ...]:
        return tuple(s for s in self.slots if not s.per_site)

    @property
    def site_slots(self) -> tuple[VariableSlot, ...]:
        return tuple(s for s in self.slots if s.per_site)

    @property
    def num_global_tokens(self) -> int:
        return sum(s.size for s in self.global_slots)

    @property
    def tokens_per_site(self) -> int:
        return sum(s.size for s in self.site_slots)

    @property
    def num_tokens(self) -> int:
        """Tokens in one example with every site present: the globals, then `max_sites` sites."""
        return self.num_global_tokens + self.max_sites * self.tokens_per_site

    @property
    def max_position(self) -> int:
        """One more than the largest position within a variable (the position vocabulary size)."""
        return max(s.size for s in self.slots)

    @property
    def coord_dims(self) -> int:
        """The width of the coordinate axis of `Tokens.site_coords`."""
        return max((self._coord_width(s) for s in self.site_slots), default=0)

    def slot(self, name: str) -> VariableSlot:
        for s in self.slots:
            if s.name == name:
                return s
        hint = did_you_mean(name, self.labels)
        raise KeyError(
            f"{name!r} is not a tokenised variable of this model"
            + (f"; did you mean {hint!r}?" if hint else f" (tokenised: {', '.join(self.labels)})")
        )

    # -- per-token metadata -----------------------------------------------------
    @property
    def global_label(self) -> np.ndarray:
        """Label id of each global token, shape (globals,)."""
        return _per_token(self.global_slots, lambda s: np.full(s.size, s.label), np.int32)

    @property
    def global_position(self) -> np.ndarray:
        """Flat position of each global token within its variable, shape (globals,)."""
        return _per_token(self.global_slots, lambda s: np.arange(s.size), np.int32)

    @property
    def site_label(self) -> np.ndarray:
        """Label id of each site token, shape (tokens,)."""
        return _per_token(self.site_slots, lambda s: np.full(s.size, s.label), np.int32)

    @property
    def site_position(self) -> np.ndarray:
        """Flat position of each site token within its variable, shape (tokens,)."""
        return _per_token(self.site_slots, lambda s: np.arange(s.size), np.int32)

    @property
    def site_role(self) -> tuple[str, ...]:
        """Role of each site token (local, input or observation)."""
        return tuple(s.role for s in self.site_slots for _ in range(s.size))

    @property
    def site_coord_source(self) -> np.ndarray:
        """For each site token and coordinate, the site token holding its value (0 where none).

        Shape (tokens, coord_dims). Element k of a variable with coords ("t",) takes t's element k
        (for an input t of shape (n, m), its m elements t[k, :]).
        """
        source = np.zeros((self.tokens_per_site, self.coord_dims), np.int32)
        for slot in (v for v in self.site_slots if v.coords):
            rows = np.arange(slot.size) // (slot.size // slot.shape[0])
            column = 0
            for name in slot.coords:
                input_slot = self.slot(name)
                width = input_slot.size // input_slot.shape[0]
                source[slot.tokens, column:column + width] = (
                    input_slot.offset + rows[:, None] * width + np.arange(width)[None, :]
                )
                column += width
        return source

    @property
    def site_coord_mask(self) -> np.ndarray:
        """Whether each (site token, coordinate) entry is a real coordinate, shape (tokens, coord_dims)."""
        mask = np.zeros((self.tokens_per_site, self.coord_dims), bool)
        for slot in self.site_slots:
            mask[slot.tokens, :self._coord_width(slot)] = True
        return mask

    @property
    def site_has_coord(self) -> np.ndarray:
        """Whether each site token has a functional coordinate, shape (tokens,)."""
        return self.site_coord_mask.any(axis=1)

    def _coord_width(self, slot: VariableSlot) -> int:
        return sum(self.slot(n).size // self.slot(n).shape[0] for n in slot.coords)

    # -- values ↔ tokens --------------------------------------------------------
    def encode(self, values: Mapping[str, ArrayLike], num_sites: int, *, absent: tuple[str, ...] = ()) -> Tokens:
        """Values → tokens for one example (jittable for a fixed `num_sites`; vmap for a batch).

        Arguments:
            values: `{IR name: array}`; site variables carry a leading site axis, `(num_sites,
                *shape)`, globals their own shape. Deterministic variables are ignored.
            num_sites: the number of real sites, at most `max_sites`.
            absent: tokenised variables not supplied (e.g. the parameters at inference time); their
                tokens are zero, to be overwritten with `TokenSplit.scatter`.
        """
        if not 0 <= num_sites <= self.max_sites:
            raise ValueError(f"num_sites must be between 0 and max_sites={self.max_sites}, got {num_sites}")
        for name in values:
            if name not in self.labels and name not in self.untokenised:
                hint = did_you_mean(name, self.labels)
                raise KeyError(f"{name!r} is not a variable of this model"
                               + (f"; did you mean {hint!r}?" if hint else ""))
        for name in absent:
            self.slot(name)
        global_values = _concat([self._flat(values, s, absent, ()) for s in self.global_slots], (0,))
        real = _concat([self._flat(values, s, absent, (num_sites,)) for s in self.site_slots], (num_sites, 0))
        site_values = jnp.zeros((self.max_sites, self.tokens_per_site), real.dtype).at[:num_sites].set(real)
        coords = site_values[:, self.site_coord_source]
        site_coords = jnp.where(self.site_coord_mask, coords, 0.0)
        site_mask = (jnp.arange(self.max_sites) < num_sites).astype(site_values.dtype)
        return Tokens(global_values, site_values, site_coords, site_mask)

    def _flat(self, values: Mapping[str, ArrayLike], slot: VariableSlot, absent: tuple[str, ...],
              lead: tuple[int, ...]) -> Array:
        if slot.name in absent:
            return jnp.zeros((*lead, slot.size), _float())
        if slot.name not in values:
            raise KeyError(f"no value for {slot.name!r}; supply it, or name it in `absent=` to leave its "
                           f"tokens zero")
        value = jnp.asarray(values[slot.name], dtype=_float())
        if value.shape != (*lead, *slot.shape):
            where = "(num_sites, *shape)" if lead else "its shape"
            raise ValueError(f"{slot.name!r} has shape {value.shape}; expected {(*lead, *slot.shape)} "
                             f"{where}")
        return value.reshape(*lead, slot.size)

    def decode(self, tokens: Tokens, num_sites: int) -> dict[str, Float[Array, "*shape"]]:
        """Tokens → `{IR name: array}` for the first `num_sites` (real) sites; inverts `encode`."""
        out = {}
        for slot in self.slots:
            if slot.per_site:
                out[slot.name] = tokens.site_values[:num_sites, slot.tokens].reshape(num_sites, *slot.shape)
            else:
                out[slot.name] = tokens.global_values[slot.tokens].reshape(slot.shape)
        return out

    def split(self, target: tuple[str, ...], conditioning: tuple[str, ...] | None = None) -> TokenSplit:
        """Say which variables the flow transports (targets) and which it conditions on.

        Arguments:
            target: the variables whose tokens form the flow's state.
            conditioning: the variables the network sees; default all the others. Variables in
                neither are left out: masked from attention, as if marginalised.
        """
        target = tuple(target)
        conditioning = tuple(n for n in self.labels if n not in target) if conditioning is None else tuple(conditioning)
        for name in (*target, *conditioning):
            self.slot(name)
        if not target:
            raise ValueError("a split needs at least one target variable")
        both = sorted(set(target) & set(conditioning))
        if both:
            raise ValueError(f"{', '.join(map(repr, both))} cannot be both target and conditioning")
        return TokenSplit(self, target, conditioning)


@dataclass(frozen=True)
class TokenSplit:
    """Targets, conditioning and left-out tokens of one `TokenLayout` (build with `layout.split`).

    The flow's state is the flat vector `x = concat(global target values, site target values of all
    `max_sites` sites, row-major)`, of length `num_targets`.
    """

    layout: TokenLayout
    target: tuple[str, ...]
    conditioning: tuple[str, ...]

    def _flags(self, names: tuple[str, ...], per_site: bool) -> np.ndarray:
        slots = self.layout.site_slots if per_site else self.layout.global_slots
        return _per_token(slots, lambda s: np.full(s.size, s.name in names), bool)

    @property
    def global_target(self) -> np.ndarray:
        return self._flags(self.target, per_site=False)

    @property
    def site_target(self) -> np.ndarray:
        return self._flags(self.target, per_site=True)

    @property
    def global_visible(self) -> np.ndarray:
        """Global tokens the network attends to (targets and conditioning), shape (globals,)."""
        return self._flags(self.target + self.conditioning, per_site=False)

    @property
    def site_visible(self) -> np.ndarray:
        """Site tokens the network attends to (at real sites), shape (tokens,)."""
        return self._flags(self.target + self.conditioning, per_site=True)

    @property
    def num_targets(self) -> int:
        return int(self.global_target.sum()) + self.layout.max_sites * int(self.site_target.sum())

    def gather(self, global_values: Float[Array, " globals"],
               site_values: Float[Array, "max_sites tokens"]) -> Float[Array, " targets"]:
        """Token-shaped arrays (values or velocities) → the flat target vector."""
        return jnp.concatenate([global_values[np.flatnonzero(self.global_target)],
                                site_values[:, np.flatnonzero(self.site_target)].reshape(-1)])

    def scatter(self, tokens: Tokens, x: Float[Array, " targets"]) -> Tokens:
        """Write the flat target vector `x` into the target positions of `tokens`."""
        global_index, site_index = np.flatnonzero(self.global_target), np.flatnonzero(self.site_target)
        x_global, x_site = x[:global_index.size], x[global_index.size:]
        return dataclasses.replace(
            tokens,
            global_values=tokens.global_values.at[global_index].set(x_global),
            site_values=tokens.site_values.at[:, site_index].set(
                x_site.reshape(self.layout.max_sites, site_index.size)),
        )

    def decode(self, x: Float[Array, " targets"], num_sites: int) -> dict[str, Float[Array, "*shape"]]:
        """The flat target vector → `{target name: array}` for the first `num_sites` sites."""
        layout = self.layout
        empty = layout.encode({}, 0, absent=layout.labels)
        decoded = layout.decode(self.scatter(empty, x), num_sites)
        return {name: decoded[name] for name in self.target}


def target_mask(
    layout: TokenLayout, split: TokenSplit, site_mask: Float[Array, " max_sites"]
) -> Float[Array, " targets"]:
    """1 for each real target entry of the flat state, 0 for targets at padded sites."""
    if split.layout != layout:
        raise ValueError("the split was made from a different layout; build it with `layout.split(...)`")
    num_site_targets = int(split.site_target.sum())
    return jnp.concatenate([jnp.ones(int(split.global_target.sum()), site_mask.dtype),
                            jnp.repeat(site_mask, num_site_targets)])


def _per_token(slots: tuple[VariableSlot, ...], per_slot, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(per_slot(s), dtype) for s in slots] or [np.zeros(0, dtype)])


def _concat(parts: list[Array], empty_shape: tuple[int, ...]) -> Array:
    return jnp.concatenate(parts, axis=-1) if parts else jnp.zeros(empty_shape, _float())


def _float():
    return jnp.result_type(float)
