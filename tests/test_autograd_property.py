"""Property tests: random expression graphs of the supported ops vs finite differences."""

from __future__ import annotations

import numpy as np
from gradcheck import gradcheck
from hypothesis import given, settings
from hypothesis import strategies as st

import actorgrad as ag

# Every value in a program has one of these shapes; all of them broadcast to (2, 3),
# so any binary op on any two values is valid.
SHAPES = [(), (3,), (1, 3), (2, 1), (2, 3)]
MASK = np.array([[True, False, True], [False, True, True]])


def to23(x: ag.Tensor) -> ag.Tensor:
    return x + np.zeros((2, 3), x.dtype)


def last_axis(f):
    return lambda x: f(x) if x.ndim else x


# Each op takes three values (it uses what it needs) and returns one of SHAPES.
# Only smooth ops: kinks (relu, abs, max) make finite differences meaningless near 0/ties.
OPS = [
    ("add", lambda a, b, c: a + b),
    ("sub", lambda a, b, c: a - b),
    ("mul", lambda a, b, c: a * b),
    ("div", lambda a, b, c: a / (b * b + 1.0)),
    ("pow", lambda a, b, c: (a * a + 0.5) ** 1.5),
    ("pow_tensor", lambda a, b, c: (a * a + 0.5) ** b),
    ("neg", lambda a, b, c: -a),
    ("tanh", lambda a, b, c: a.tanh()),
    ("sigmoid", lambda a, b, c: a.sigmoid()),
    ("exp", lambda a, b, c: a.tanh().exp()),
    ("log", lambda a, b, c: (a * a + 1.0).log()),
    ("sqrt", lambda a, b, c: (a * a + 1.0).sqrt()),
    ("softmax", lambda a, b, c: last_axis(lambda x: x.softmax())(a)),
    ("log_softmax", lambda a, b, c: last_axis(lambda x: x.log_softmax())(a)),
    ("sum0", lambda a, b, c: to23(a).sum(axis=0)),
    ("sum1k", lambda a, b, c: to23(a).sum(axis=1, keepdims=True)),
    ("mean", lambda a, b, c: a.mean()),
    ("transpose", lambda a, b, c: to23(a).T.reshape(2, 3)),
    ("index", lambda a, b, c: to23(a)[[1, 1]] * to23(b)[:, [2, 0, 2]]),
    ("cat", lambda a, b, c: ag.cat([to23(a), to23(b)], axis=0)[1:3]),
    ("stack", lambda a, b, c: ag.stack([to23(a), to23(b)], axis=-1).sum(axis=-1)),
    ("split", lambda a, b, c: ag.split(to23(a), [1, 2], axis=1)[0]),
    ("where", lambda a, b, c: ag.where(MASK, a, b)),
    ("matmul", lambda a, b, c: (to23(a) @ to23(b).T) @ to23(c)),
]

program = st.lists(
    st.tuples(
        st.integers(0, len(OPS) - 1), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)
    ),
    min_size=1,
    max_size=6,
)


def run_program(steps, *leaves):
    values = list(leaves)
    for op, i, j, k in steps:
        n = len(values)
        values.append(OPS[op][1](values[i % n], values[j % n], values[k % n]))
    return values[-1]


@settings(max_examples=60, deadline=None)
@given(
    steps=program,
    shapes=st.lists(st.sampled_from(SHAPES), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_random_graphs_match_finite_differences(steps, shapes, seed):
    rng = np.random.default_rng(seed)
    inputs = [rng.uniform(-1, 1, s) for s in shapes]
    assert gradcheck(lambda *xs: run_program(steps, *xs), inputs, atol=1e-5, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(steps=program, seed=st.integers(0, 2**16))
def test_float32_graphs_keep_float32_and_match_float64(steps, seed):
    rng = np.random.default_rng(seed)
    inputs = [rng.uniform(-1, 1, (2, 3)) for _ in range(3)]
    grads = {}
    for dtype in (np.float32, np.float64):
        leaves = [ag.tensor(x.astype(dtype), requires_grad=True) for x in inputs]
        out = run_program(steps, *leaves)
        assert out.dtype == dtype
        if out.requires_grad:
            out.sum().backward()
        grads[dtype] = [leaf.grad for leaf in leaves]
    for g32, g64 in zip(grads[np.float32], grads[np.float64], strict=True):
        assert (g32 is None) == (g64 is None)
        if g32 is not None:
            assert g32.dtype == np.float32
            np.testing.assert_allclose(g32, g64, rtol=2e-3, atol=2e-4)
