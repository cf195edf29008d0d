"""Layers shared by the model families: pure functions of a params dict and arrays.

Params are nested dicts of arrays: a linear layer is `{"w": [In, Out], "b": [Out]}`, a
norm `{"scale": [D], "bias": [D]}`, a conv weight `[K, Cin/groups, Cout]`. The
`*_from_torch` helpers turn PyTorch state-dict entries into these (numpy leaves).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
NEG = -1e30  # finite "minus infinity": a query with every key masked stays finite

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation a Hugging Face config names (`hidden_act`, `activation_function`)."""
    return _ACTIVATIONS[name]


def dense(p: Params, x: jax.Array) -> jax.Array:
    """x [..., In] -> [..., Out]; the bias is optional."""
    y = x @ p["w"]
    return y + p["b"] if "b" in p else y


def layer_norm(p: Params, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Normalizes over the last axis, then scales and shifts."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def conv1d(x: jax.Array, w: jax.Array, stride: int = 1, padding: tuple[int, int] = (0, 0),
           groups: int = 1) -> jax.Array:
    """x [B, T, Cin], w [K, Cin/groups, Cout] -> [B, T', Cout]."""
    return jax.lax.conv_general_dilated(
        x, w, (stride,), [padding], dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=groups)


def heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, H * Dh] -> [B, T, H, Dh]."""
    return x.reshape(*x.shape[:2], num_heads, -1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array,
           bias: jax.Array | None = None) -> jax.Array:
    """q [B, Tq, H, Dh], k/v [B, Tk, H, Dh], key_mask [B, Tk] -> [B, Tq, H * Dh]."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(key_mask[:, None, None, :], scores, NEG)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(*out.shape[:2], -1)


def feed_forward(p_in: Params, p_out: Params, x: jax.Array, act: str) -> jax.Array:
    """dense -> activation -> dense."""
    return dense(p_out, activation(act)(dense(p_in, x)))


# ----------------------------------------------------------------------------- PyTorch names


def dense_from_torch(t: Mapping[str, np.ndarray], name: str, bias: bool = True) -> Params:
    """`{name}.weight` [Out, In] (and `{name}.bias`) -> a dense layer's params."""
    p = {"w": t[f"{name}.weight"].T}
    if bias:
        p["b"] = t[f"{name}.bias"]
    return p


def norm_from_torch(t: Mapping[str, np.ndarray], name: str) -> Params:
    """`{name}.weight` and `{name}.bias` -> a norm's params."""
    return {"scale": t[f"{name}.weight"], "bias": t[f"{name}.bias"]}


def conv_from_torch(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv1d weight [O, I/groups, K] -> [K, I/groups, O]."""
    return np.transpose(w, (2, 1, 0))
