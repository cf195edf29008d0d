"""models/layers.py: the shared layers against plain numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models import layers


def test_conv1d_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 11, 3)).astype(np.float32)
    w = rng.normal(size=(4, 3, 5)).astype(np.float32)  # [K, Cin, Cout]
    got = np.asarray(layers.conv1d(jnp.asarray(x), jnp.asarray(w), stride=2))
    want = np.stack([np.einsum("bkc,kco->bo", x[:, t:t + 4], w) for t in range(0, 8, 2)], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attend_ignores_masked_keys_and_stays_finite():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 2, 2, 4)).astype(np.float32)) for _ in range(3))
    k2 = jnp.concatenate([k, 100 * k], 1)  # two extra keys, masked out below
    v2 = jnp.concatenate([v, 100 * v], 1)
    mask = jnp.asarray([[True, True, False, False]])
    np.testing.assert_allclose(layers.attend(q, k2, v2, mask),
                               layers.attend(q, k, v, mask[:, :2]), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(layers.attend(q, k, v, jnp.zeros((1, 2), bool)))).all()


def test_layer_norm_and_torch_names():
    x = jnp.asarray([[1.0, 2.0, 3.0, 6.0]])
    p = layers.norm_from_torch({"n.weight": np.full(4, 2.0), "n.bias": np.ones(4)}, "n")
    y = np.asarray(layers.layer_norm(p, x))
    np.testing.assert_allclose(y.mean(), 1.0, atol=1e-6)
    np.testing.assert_allclose(y.std(), 2.0, rtol=1e-4)
    t = {"d.weight": np.arange(6.0).reshape(3, 2), "d.bias": np.zeros(3)}  # torch [Out, In]
    assert layers.dense_from_torch(t, "d")["w"].shape == (2, 3)
    assert layers.conv_from_torch(np.zeros((5, 3, 7))).shape == (7, 3, 5)
