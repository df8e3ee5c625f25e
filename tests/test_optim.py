"""Optimizers against hand-computed updates (and torch when it is installed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import traced_memory

import actorgrad as ag

P0 = np.array([1.0, -2.0, 0.5])
GRADS = [np.array([0.1, 0.2, -0.3]), np.array([-0.5, 0.0, 0.4]), np.array([0.3, -0.1, 0.2])]


def run(opt_cls, use_mapping, **opts):
    p = ag.tensor(P0.copy(), requires_grad=True)
    first = p.data
    opt = opt_cls([p], **opts)
    for g in GRADS:
        if use_mapping:
            opt.step({p: g})
        else:
            p.grad = g.copy()
            opt.step()
            opt.zero_grad()
            assert p.grad is None
    # a new array each step (graphs recorded before keep theirs), the same Tensor
    assert opt.params[0] is p and p.data is not first and first.tolist() == P0.tolist()
    return p.data


@pytest.mark.parametrize("use_mapping", [True, False])
def test_sgd_momentum_weight_decay_matches_hand_computed(use_mapping):
    lr, mom, wd = 0.1, 0.9, 0.01
    # step 1: buf = g1 + wd p0; p1 = p0 - lr buf
    b1 = GRADS[0] + wd * P0
    p1 = P0 - lr * b1
    b2 = mom * b1 + GRADS[1] + wd * p1
    p2 = p1 - lr * b2
    b3 = mom * b2 + GRADS[2] + wd * p2
    p3 = p2 - lr * b3
    got = run(ag.optim.SGD, use_mapping, lr=lr, momentum=mom, weight_decay=wd)
    np.testing.assert_allclose(got, p3, rtol=1e-12)


def test_plain_sgd():
    got = run(ag.optim.SGD, True, lr=0.5)
    np.testing.assert_allclose(got, P0 - 0.5 * sum(GRADS), rtol=1e-12)


def test_sgd_with_dampening_1_keeps_its_first_momentum_as_torchs_does():
    # buf = g1, then buf = momentum * buf + (1 - dampening) * g: the later gradients
    # add nothing (torch.optim.SGD's formula, dampening 1 too)
    got = run(ag.optim.SGD, True, lr=0.1, momentum=0.5, dampening=1.0)
    b1 = GRADS[0]
    p1 = P0 - 0.1 * b1
    p2 = p1 - 0.1 * (0.5 * b1)
    p3 = p2 - 0.1 * (0.25 * b1)
    np.testing.assert_allclose(got, p3, rtol=1e-12)


def test_a_wider_gradient_is_used_at_its_own_precision():
    # Only narrower gradients are cast to the parameter's dtype: a float64 gradient of
    # a float32 parameter steps it as the float64 arithmetic gives, rounded once into
    # float32 (not rounded to float32 first, which gives other last bits).
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(64).astype(np.float32)
    g = rng.standard_normal(64)
    w = ag.tensor(p0, requires_grad=True)
    ag.optim.SGD([w], lr=0.1).step({w: g})
    w64 = ag.tensor(p0.astype(np.float64), requires_grad=True)
    ag.optim.SGD([w64], lr=0.1).step({w64: g})
    assert w.data.dtype == np.float32
    np.testing.assert_array_equal(w.data, w64.data.astype(np.float32))


@pytest.mark.parametrize("use_mapping", [True, False])
def test_adam_matches_hand_computed(use_mapping):
    lr, (b1, b2), eps = 0.01, (0.8, 0.95), 1e-6
    p, m, v = P0.copy(), np.zeros(3), np.zeros(3)
    for t, g in enumerate(GRADS, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    got = run(ag.optim.Adam, use_mapping, lr=lr, betas=(b1, b2), eps=eps)
    # torch puts eps after dividing sqrt(v) by sqrt(bias2), as the textbook does here.
    np.testing.assert_allclose(got, p, rtol=1e-10)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_matches_torch_when_available(kind):
    torch = pytest.importorskip("torch")
    p = ag.tensor(P0.copy(), requires_grad=True)
    tp = torch.tensor(P0.copy(), requires_grad=True)
    if kind == "sgd":
        opt, topt = (
            ag.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1),
            torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=0.1),
        )
    else:
        opt, topt = ag.optim.Adam([p], lr=0.05), torch.optim.Adam([tp], lr=0.05)
    for g in GRADS:
        opt.step({p: g})
        tp.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-10)


#: torch.optim's options beyond the defaults, alone and together: (class name, options).
TORCH_OPTIONS = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05, "maximize": True}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "dampening": 0.5, "weight_decay": 0.1, "maximize": True}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True}),
    ("Adam", {"lr": 0.02, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.02, "amsgrad": True}),
    ("Adam", {"lr": 0.02, "maximize": True}),
    ("Adam", {"lr": 0.02, "amsgrad": True, "maximize": True}),
    (
        "Adam",
        {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True},
    ),
    ("AdamW", {"lr": 0.02}),
    ("AdamW", {"lr": 0.02, "weight_decay": 0.3, "amsgrad": True}),
    ("AdamW", {"lr": 0.02, "weight_decay": 0.0}),
    ("AdamW", {"lr": 0.02, "betas": (0.8, 0.95), "amsgrad": True, "maximize": True}),
]


class TorchFormulas:
    """torch.optim's update of one parameter, written out in numpy from its
    documented algorithm, in the same order of operations as torch's code (so that 50
    float64 steps agree to ~1e-15): the reference where torch is not installed (CI),
    itself checked against torch where it is."""

    def __init__(self, name: str, opts: dict, p0: np.ndarray) -> None:
        self.name, self.p, self.state = name, p0.copy(), {}
        defaults = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "maximize": False}
        defaults |= {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False}
        defaults["weight_decay"] = 1e-2 if name == "AdamW" else 0.0
        self.o = defaults | opts

    def step(self, g: np.ndarray) -> None:
        o, st, p = self.o, self.state, self.p
        lr, wd = o["lr"], o["weight_decay"]
        if o["maximize"]:
            g = -g
        if self.name == "SGD":
            if wd:
                g = g + wd * p
            if o["momentum"]:
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = g.copy()
                else:
                    buf = st["momentum_buffer"] * o["momentum"]
                    st["momentum_buffer"] = buf + (1 - o["dampening"]) * g
                buf = st["momentum_buffer"]
                g = g + o["momentum"] * buf if o["nesterov"] else buf
            self.p = p - lr * g
            return
        (b1, b2), eps = o["betas"], o["eps"]
        if self.name == "AdamW":
            p = p * (1 - lr * wd)
        elif wd:
            g = g + wd * p
        if "step" not in st:
            st.update(step=0, exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p))
            if o["amsgrad"]:
                st["max_exp_avg_sq"] = np.zeros_like(p)
        st["step"] += 1
        t = st["step"]
        st["exp_avg"] = st["exp_avg"] * b1 + (1 - b1) * g
        st["exp_avg_sq"] = st["exp_avg_sq"] * b2 + (1 - b2) * (g * g)
        v = st["exp_avg_sq"]
        if o["amsgrad"]:
            v = st["max_exp_avg_sq"] = np.maximum(st["max_exp_avg_sq"], v)
        denom = np.sqrt(v) / math.sqrt(1 - b2**t) + eps
        self.p = p - (lr / (1 - b1**t)) * (st["exp_avg"] / denom)


@pytest.mark.parametrize(
    ("name", "opts"), TORCH_OPTIONS, ids=[f"{n}-{'-'.join(o)}" for n, o in TORCH_OPTIONS]
)
def test_torchs_options_match_torchs_formulas_over_50_steps_in_float64(name, opts):
    # (against torch.optim too where torch is installed; its formulas written out in
    # numpy everywhere, so that CI, without torch, checks every option)
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal((4, 3))
    scale = rng.uniform(0.2, 1.0, (4, 3))
    p = ag.tensor(p0.copy(), requires_grad=True)
    opt = getattr(ag.optim, name)([p], **opts)
    ref = TorchFormulas(name, opts, p0)
    if torch is not None:
        tp = torch.tensor(p0.copy(), requires_grad=True)
        topt = getattr(torch.optim, name)([tp], **opts)
    for t in range(50):
        # (a gradient of the parameter, as a loss's, plus noise that shrinks: the second
        # moment falls below its largest, which amsgrad then keeps)
        noise = rng.standard_normal((4, 3)) * (2.0 if t < 10 else 0.1)
        opt.step({p: scale * p.data + noise})
        ref.step(scale * ref.p + noise)
        np.testing.assert_allclose(p.data, ref.p, rtol=1e-12, atol=1e-14)
        if torch is not None:
            tp.grad = torch.tensor(scale) * tp.detach() + torch.tensor(noise)
            topt.step()
            np.testing.assert_allclose(ref.p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert not np.allclose(p.data, p0)
    ours = opt.state.get(p, {})
    assert sorted(ours) == sorted(ref.state)
    for k, v in ours.items():
        if k == "step":
            assert v == ref.state[k] == 50
        else:
            np.testing.assert_allclose(v, ref.state[k], rtol=1e-12, atol=1e-14)
    if torch is not None:
        theirs = dict(topt.state.get(tp, {}))
        assert sorted(ours) == sorted(theirs)
        for k, v in ref.state.items():
            want = theirs[k].item() if k == "step" else theirs[k].numpy()
            np.testing.assert_allclose(v, want, rtol=1e-12, atol=1e-14)
    if opts.get("amsgrad"):  # (not vacuous: the largest second moment is not the last)
        top, last = ours["max_exp_avg_sq"], ours["exp_avg_sq"]
        assert (top >= last).all() and (top > last).any()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_the_options_have_torchs_names_and_defaults(name):
    import inspect

    torch = pytest.importorskip("torch")
    ours = list(inspect.signature(getattr(ag.optim, name)).parameters.values())
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    assert [p.name for p in ours[:1]] == ["params"]
    for p in ours[1:]:
        assert p.name in theirs, p.name
        if p.default is not p.empty:  # (our SGD's lr has none: the contract's)
            assert p.default == theirs[p.name].default, p.name
    # (our SGD's options after weight_decay are keyword-only: torch's positional order,
    # lr, momentum, dampening, weight_decay, nesterov, is not ours)
    if name == "SGD":
        w = ag.tensor([1.0], requires_grad=True)
        with pytest.raises(TypeError, match="positional arguments but 6 were given"):
            ag.optim.SGD([w], 0.1, 0.9, 0.0, 0.01)


def test_adamw_decays_the_parameter_and_adam_the_gradient():
    # (a zero gradient: Adam's L2 term goes through the moments, a step of about lr;
    # AdamW's decay scales the parameter by 1 - lr * weight_decay)
    for cls, want in ((ag.optim.AdamW, [0.95, -1.9]), (ag.optim.Adam, [0.9, -1.9])):
        w = ag.tensor([1.0, -2.0], requires_grad=True, dtype="float64")
        cls([w], lr=0.1, weight_decay=0.5).step({w: np.zeros(2)})
        np.testing.assert_allclose(w.data, want, rtol=1e-7)
    assert ag.optim.AdamW([w]).weight_decay == 1e-2 and ag.optim.Adam([w]).weight_decay == 0


@pytest.mark.parametrize(
    ("cls", "opts"),
    [
        (ag.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
        (ag.optim.SGD, {"momentum": 0.9, "dampening": 0.5, "maximize": True}),
        (ag.optim.Adam, {"weight_decay": 0.1, "amsgrad": True, "maximize": True}),
        (ag.optim.AdamW, {"weight_decay": 0.1, "amsgrad": True}),
    ],
)
@pytest.mark.parametrize(("shape", "order"), [((8, 2), "C"), ((1, 16), "C"), ((3, 16), "F")])
def test_the_options_step_in_blocks_as_whole(cls, opts, shape, order, monkeypatch):
    # (rows of a block's size, and rows bigger than a block: the flat views; a
    # Fortran-ordered parameter has no flat view, and its rows bigger than a block are
    # stepped a row at a time)
    from actorgrad import optim

    rng = np.random.default_rng(6)
    p0 = np.array(rng.standard_normal(shape), order=order)
    grads = [rng.standard_normal(shape) for _ in range(4)]
    grads[2] = np.asfortranarray(grads[2])
    results = []
    for block in (optim.UPDATE_BLOCK, 4):
        monkeypatch.setattr(optim, "UPDATE_BLOCK", block)
        p = ag.Tensor(p0.copy(order="K"), requires_grad=True)
        assert p.data.flags.c_contiguous == (order == "C")
        opt = cls([p], lr=0.1, **opts)
        for g in grads:
            opt.step({p: g})
        results.append((p.data, opt.state_dict()))
    (whole, sd_whole), (blocked, sd_blocked) = results
    np.testing.assert_array_equal(blocked, whole)
    for k, v in sd_whole["state"][0].items():
        np.testing.assert_array_equal(sd_blocked["state"][0][k], v)


def test_float32_params_stay_float32():
    p = ag.tensor([1.0, 2.0], requires_grad=True)
    for cls, opts in (
        (ag.optim.SGD, {}),
        (ag.optim.SGD, {"momentum": 0.9, "nesterov": True, "maximize": True}),
        (ag.optim.Adam, {}),
        (ag.optim.Adam, {"weight_decay": 0.1, "amsgrad": True}),
        (ag.optim.AdamW, {"amsgrad": True}),
    ):
        opt = cls([p], lr=0.1, **opts)
        opt.step({p: np.array([1.0, 1.0])})  # float64 grads
        opt.step({p: np.array([1.0, 1.0])})
        assert p.data.dtype == np.float32
        assert all(
            v.dtype == np.float32 for v in opt.state.get(p, {}).values() if hasattr(v, "dtype")
        )


def test_params_without_grad_are_skipped_and_mapping_may_be_partial():
    a = ag.tensor([1.0], requires_grad=True)
    b = ag.tensor([1.0], requires_grad=True)
    opt = ag.optim.SGD([a, b], lr=1.0)
    opt.step({a: np.array([0.5])})
    assert a.data[0] == 0.5 and b.data[0] == 1.0
    opt.step()  # no .grad anywhere: nothing happens
    assert a.data[0] == 0.5


def test_optimizer_errors():
    p = ag.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(ValueError, match="empty parameter list"):
        ag.optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        ag.optim.SGD([p], lr=-1)
    with pytest.raises(ValueError, match=r"shape \(3,\).*shape \(2,\)"):
        ag.optim.Adam([p]).step({p: np.ones(3)})
    # a parameter given twice would be stepped twice (PyTorch only warns)
    q = ag.tensor([3.0], requires_grad=True)
    for cls in (ag.optim.SGD, ag.optim.Adam):
        with pytest.raises(ValueError, match="parameter 2 is the same tensor as parameter 0"):
            cls([p, q, p], lr=0.1)
    # (the base class: a bare NotImplementedError)
    with pytest.raises(NotImplementedError, match="Optimizer does not implement _update"):
        ag.optim.Optimizer([p], lr=0.1).step({p: np.ones(2)})


def test_a_single_tensor_or_a_non_leaf_is_refused():
    # A bare tensor was iterated: its elements (0-d views, not leaves) were the
    # parameters and the tensor itself never changed. A non-leaf's data is an op's
    # output, so stepping it updates nothing the model uses.
    w = ag.tensor([1.0, 2.0], requires_grad=True)
    for cls in (ag.optim.SGD, ag.optim.Adam):
        with pytest.raises(TypeError, match="params must be an iterable of Tensors, got Tensor"):
            cls(w, lr=0.1)
        with pytest.raises(ValueError, match="parameter 1: cannot optimize a non-leaf tensor"):
            cls([w, w * 2], lr=0.1)
        # (a model itself: "'Linear' object is not iterable", torch's habit unnamed)
        with pytest.raises(
            TypeError,
            match=r"^optimizer params must be an iterable of Tensors, got Linear; pass "
            r"model.parameters\(\)$",
        ):
            cls(ag.nn.Linear(2, 1), lr=0.1)
        with pytest.raises(TypeError, match=r"got Sequential; pass model.parameters\(\)$"):
            cls(ag.nn.Sequential(ag.nn.Linear(2, 1), ag.nn.ReLU()), lr=0.1)


def test_step_refuses_grads_that_are_not_a_mapping_of_tensors():
    p = ag.tensor([1.0, 2.0], requires_grad=True)
    opt = ag.optim.SGD([p], lr=0.1)
    # (was "The truth value of an array with more than one element is ambiguous")
    with pytest.raises(
        TypeError, match=r"step: grads must be a \{Tensor: ndarray\} mapping .* got list"
    ):
        opt.step([np.ones(2)])
    with pytest.raises(
        TypeError, match="grads must be keyed by the parameter Tensors, got a key of type str"
    ):
        opt.step({"weight": np.ones(2)})
    # Other tensors are ignored: get_gradients returns every leaf of the worker.
    other = ag.tensor([5.0], requires_grad=True)
    opt.step({p: np.ones(2), other: np.ones(1)})
    assert p.data.tolist() == pytest.approx([0.9, 1.9]) and other.data.tolist() == [5.0]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        # (was "'<' not supported between instances of 'str' and 'int'")
        (lambda p: ag.optim.SGD(p, lr="a"), TypeError, "SGD: lr must be a number, got str 'a'"),
        (lambda p: ag.optim.Adam(p, lr=None), TypeError, "Adam: lr must be a number, got NoneType"),
        (lambda p: ag.optim.SGD(p, lr=float("nan")), ValueError, "invalid learning rate nan"),
        (
            lambda p: ag.optim.SGD(p, lr=0.1, momentum="0.9"),
            TypeError,
            "SGD: momentum must be a number",
        ),
        (
            lambda p: ag.optim.SGD(p, lr=0.1, weight_decay=[0.1]),
            TypeError,
            "SGD: weight_decay must",
        ),
        # (was "'float' object is not subscriptable")
        (
            lambda p: ag.optim.Adam(p, betas=0.9),
            TypeError,
            r"Adam: betas must be a pair \(beta1, beta2\), got 0.9",
        ),
        (
            lambda p: ag.optim.Adam(p, betas=("0.9", 0.999)),
            TypeError,
            r"Adam: betas\[0\] must be a number, got str '0.9'",
        ),
        (
            lambda p: ag.optim.Adam(p, betas=(0.9, "x")),
            TypeError,
            r"Adam: betas\[1\] must be a number",
        ),
        (lambda p: ag.optim.Adam(p, eps="1e-8"), TypeError, "Adam: eps must be a number"),
        (lambda p: ag.optim.Adam(p, betas=(0.9, 1.0)), ValueError, r"betas must be in \[0, 1\)"),
        (
            lambda p: ag.optim.SGD(p, lr=0.1, momentum=-0.5),
            ValueError,
            r"invalid momentum -0.5 or weight_decay 0.0: both must be >= 0",
        ),
        (lambda p: ag.optim.SGD(p, lr=0.1, weight_decay=float("nan")), ValueError, "nan: both"),
        (
            lambda p: ag.optim.SGD([*p, np.ones(2)], lr=0.1),
            TypeError,
            "optimizer parameters must be Tensors, got ndarray",
        ),
        # (torch's checks: "Nesterov momentum requires a momentum and zero dampening")
        (
            lambda p: ag.optim.SGD(p, lr=0.1, nesterov=True),
            ValueError,
            "SGD: nesterov requires a momentum > 0 and dampening 0, got momentum 0.0 and "
            "dampening 0.0",
        ),
        (
            lambda p: ag.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            ValueError,
            "got momentum 0.9 and dampening 0.1",
        ),
        (
            lambda p: ag.optim.SGD(p, lr=0.1, dampening="0"),
            TypeError,
            "SGD: dampening must be a number, got str '0'",
        ),
        # (a flag given as a string or a number: "no" would be taken as true)
        (
            lambda p: ag.optim.SGD(p, lr=0.1, momentum=0.9, nesterov="no"),
            TypeError,
            r"SGD: nesterov must be a bool \(True or False\), not 'no'",
        ),
        (lambda p: ag.optim.SGD(p, lr=0.1, maximize=1), TypeError, "SGD: maximize must be a bool"),
        (lambda p: ag.optim.Adam(p, amsgrad=None), TypeError, "Adam: amsgrad must be a bool"),
        (lambda p: ag.optim.AdamW(p, maximize="True"), TypeError, "AdamW: maximize must be a"),
        (
            lambda p: ag.optim.Adam(p, weight_decay=-0.1),
            ValueError,
            "invalid weight_decay -0.1: weight_decay must be >= 0",
        ),
        (lambda p: ag.optim.AdamW(p, weight_decay=float("nan")), ValueError, "weight_decay nan"),
        (lambda p: ag.optim.AdamW(p, weight_decay="0.1"), TypeError, "AdamW: weight_decay must"),
        (
            lambda p: ag.optim.AdamW(p, betas=0.9),
            TypeError,
            r"AdamW: betas must be a pair \(beta1, beta2\), got 0.9",
        ),
    ],
)
def test_optimizer_options_of_the_wrong_type_or_value_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make([ag.tensor([1.0], requires_grad=True)])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: ag.optim.SGD(p, lr=0.0, momentum=0.0, weight_decay=0.0, dampening=0.0),
        lambda p: ag.optim.SGD(p, lr=0.0, momentum=0.9, weight_decay=0.1),
        lambda p: ag.optim.Adam(p, lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0),
        lambda p: ag.optim.AdamW(p, lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0),
        lambda p: ag.optim.AdamW(p, lr=0.0, weight_decay=0.5),
    ],
)
def test_the_smallest_valid_options_are_taken_and_a_learning_rate_of_0_changes_nothing(make):
    # (torch's bounds: lr, momentum, weight_decay, eps >= 0 and betas in [0, 1); each
    # bound itself is valid: lr 0 freezes the parameters, a schedule's last value)
    p = ag.tensor([1.0, -2.0], requires_grad=True)
    opt = make([p])
    for _ in range(3):
        opt.step({p: np.array([0.5, 4.0])})
    np.testing.assert_array_equal(p.data, np.array([1.0, -2.0], np.float32))
    state = opt.state_dict()
    assert state["param_groups"][0]["lr"] == 0.0
    if isinstance(opt, ag.optim.Adam):
        assert state["state"][0]["step"] == 3  # (stepped: only its size was 0)


def test_integer_parameters_are_refused_and_frozen_ones_accepted():
    # (an int tensor was accepted; no gradient reaches it and an update fails to cast)
    for cls in (ag.optim.SGD, ag.optim.Adam):
        with pytest.raises(
            TypeError, match="parameter 1 has dtype int64; parameters must have a floating"
        ):
            cls([ag.tensor([1.0]), ag.tensor([1, 2])], lr=0.1)
    # A tensor that does not require grad is accepted, as torch does (a frozen
    # parameter): it has no .grad and is skipped, or is stepped with a given gradient.
    frozen = ag.tensor([1.0])
    opt = ag.optim.SGD([frozen], lr=0.5)
    opt.step()
    assert frozen.data.tolist() == [1.0]
    opt.step({frozen: np.ones(1)})
    assert frozen.data.tolist() == [0.5]


@pytest.mark.parametrize("cls", [ag.optim.SGD, ag.optim.Adam])
def test_a_bad_gradient_changes_no_parameter(cls):
    # The first parameter was stepped before the second one's gradient was found
    # wrong: the optimizer's state was half updated, and a retry stepped it twice.
    w = ag.tensor([1.0, 2.0], requires_grad=True)
    v = ag.tensor([3.0, 4.0, 5.0], requires_grad=True)
    opt = cls([w, v], lr=0.1)
    with pytest.raises(
        ValueError, match=r"gradient of shape \(2,\) for parameter 1, of shape \(3,\)"
    ):
        opt.step({w: np.ones(2), v: np.ones(2)})
    with pytest.raises(
        TypeError,
        match="the gradient of parameter 1 is a NoneType of dtype object, not an array of real",
    ):
        opt.step({w: np.ones(2), v: None})
    with pytest.raises(TypeError, match="parameter 0 is a ndarray of dtype <U1"):
        opt.step({w: np.array(["a", "b"]), v: np.ones(3)})
    assert w.data.tolist() == [1.0, 2.0] and v.data.tolist() == [3.0, 4.0, 5.0]
    assert opt.state == {}
    opt.step({w: np.ones(2), v: np.ones(3)})  # the retry steps once
    want = cls([ag.tensor([1.0, 2.0], requires_grad=True)], lr=0.1)
    want.step({want.params[0]: np.ones(2)})
    assert w.data.tolist() == want.params[0].data.tolist()


@pytest.mark.parametrize(
    ("cls", "opts"),
    [
        (ag.optim.SGD, {"momentum": 0.9, "maximize": True}),
        (ag.optim.Adam, {}),
        (ag.optim.Adam, {"amsgrad": True, "maximize": True}),
        (ag.optim.AdamW, {"maximize": True}),
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.bool_, np.float16])
def test_integer_bool_and_narrow_gradients_step_as_the_same_floats(cls, opts, dtype):
    # Their arithmetic ran in their dtype: Adam's g * g of a uint8 20 was 144 (not
    # 400), of a float16 300 inf (the parameter never moved again), maximize's -g of a
    # uint8 1 was 255, and -g of bools raised after the parameters before had stepped.
    big = 300 if dtype is np.float16 else 20
    grads = [np.array([[big, 1], [0, 1]]), np.array([[1, 0], [3, 1]])]
    if dtype is np.bool_:
        grads = [g > 0 for g in grads]
    floats = ag.tensor(np.ones((2, 2)), requires_grad=True)
    given = ag.tensor(np.ones((2, 2)), requires_grad=True)  # (stepped after floats)
    opt = cls([floats, given], lr=0.1, **opts)
    for g in grads:
        opt.step({floats: g.astype(np.float64), given: g.astype(dtype)})
    np.testing.assert_array_equal(given.data, floats.data)
    assert not np.array_equal(given.data, np.ones((2, 2)))


@pytest.mark.parametrize("cls", [ag.optim.SGD, ag.optim.Adam])
def test_a_graph_recorded_before_a_step_keeps_its_values(cls):
    # The step wrote into the parameter's array, which the graph had saved: a second
    # backward of a retained graph used the stepped values (a gradient of 0 here,
    # where the forward pass's loss was 5), silently.
    w = ag.tensor([1.0, 2.0], requires_grad=True, dtype="float64")
    x = ag.tensor([1.0, 1.0], requires_grad=True, dtype="float64")
    before = w.data
    loss = (w * w * x).sum()
    loss.backward(retain_graph=True)
    opt = cls([w], lr=1.0)
    opt.step({w: w.data.copy()})  # SGD: w becomes 0
    assert w.data is not before and before.tolist() == [1.0, 2.0]
    x.grad = None
    loss.backward()
    assert x.grad.tolist() == [1.0, 4.0]  # w * w of the forward pass
    assert w.data.flags.c_contiguous and w.data.dtype == np.float64


@pytest.mark.parametrize("cls", [ag.optim.SGD, ag.optim.Adam])
def test_the_parameter_shows_the_old_values_until_the_update_is_written(cls, monkeypatch):
    # The step gave the parameter its new array first and wrote the update into it
    # then: a reader meanwhile (a parameter server sending it while a large step runs
    # in a thread, numpy without the GIL) got a mix of old and new values.
    w = ag.tensor([1.0, 2.0], requires_grad=True, dtype="float64")
    seen = []
    real = cls._update

    def spy(self, p, g, data):
        real(self, p, g, data)
        seen.append((p.data.tolist(), data.tolist()))

    monkeypatch.setattr(cls, "_update", spy)
    cls([w], lr=0.5, **({"momentum": 0.9} if cls is ag.optim.SGD else {})).step(
        {w: np.array([1.0, 1.0])}
    )
    (during, written) = seen[0]
    assert during == [1.0, 2.0]  # all written, the parameter still the old values
    assert w.data.tolist() == written != during


def _whole_sgd(p, g, buf, lr, momentum, wd, first):
    """SGD's update as whole-array expressions (what the blocks must equal, bit for bit)."""
    if wd:
        g = g + wd * p
    if momentum:
        buf = np.array(g, dtype=p.dtype) if first else buf * momentum + g
        g = buf
    return p - lr * g, buf


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        ("sgd", (1 << 21,)),
        ("sgd_mom_wd", (2048, 1030)),
        ("adam", (8, 1 << 19)),
        ("adam", (5,)),
        # (one row of the whole parameter, a Linear's weight of one output: its blocks
        # were that row, whole-array temporaries again)
        ("sgd_mom_wd", (1, 1 << 21)),
        ("adam", (2, 1 << 21)),
    ],
)
def test_big_parameter_steps_in_blocks_without_whole_temporaries(kind, shape):
    """A step of a big parameter takes its new array and, beyond it, only temporaries of
    a block (``ag.optim.UPDATE_BLOCK`` elements): whole-array expressions (``lr * g``)
    took 2x the parameter's size on top of it for SGD, 4x for Adam. The values are
    those of the whole-array formulas, bit for bit, whatever the shape (rows bigger
    than a block, a gradient of another memory layout)."""
    import math

    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(shape).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    grads[1] = np.asfortranarray(grads[1])  # (a layout of its own)
    p = ag.Tensor(p0.copy(), requires_grad=True)
    if kind == "adam":
        opt = ag.optim.Adam([p], lr=0.01)
    else:
        mom, wd = (0.9, 0.01) if kind == "sgd_mom_wd" else (0.0, 0.0)
        opt = ag.optim.SGD([p], lr=0.1, momentum=mom, weight_decay=wd)
    want = p0.copy()
    buf = m = v = None
    for t, g in enumerate(grads, 1):
        with traced_memory() as mem:
            opt.step({p: g})
        if p0.size > 1000 and t > 1:  # (the first makes the state)
            assert mem.peak < 1.5 * p0.nbytes, (kind, t, mem.peak / p0.nbytes)
        if kind == "adam":
            b1, b2 = 0.9, 0.999
            m = (1 - b1) * g if m is None else m * b1 + (1 - b1) * g
            v = (1 - b2) * (g * g) if v is None else v * b2 + (1 - b2) * (g * g)
            denom = np.sqrt(v) / math.sqrt(1 - b2**t) + 1e-8
            want = want - (0.01 / (1 - b1**t)) * (m / denom)
        else:
            want, buf = _whole_sgd(want, g, buf, 0.1, opt.momentum, opt.weight_decay, t == 1)
        np.testing.assert_array_equal(p.data, want)


# --- state_dict / load_state_dict: checkpoint and resume ---------------------------------

XS = np.random.default_rng(1).standard_normal((5, 8, 3))  # (a batch per step)
YS = np.random.default_rng(2).standard_normal((5, 8, 2))
CHECKPOINTS = {
    "sgd": (ag.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    "adam": (ag.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6}),
    "sgd_nesterov": (
        ag.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
    ),
    "sgd_dampening_maximize": (
        ag.optim.SGD,
        {"lr": 0.02, "momentum": 0.9, "dampening": 0.3, "maximize": True},
    ),
    "adam_amsgrad_maximize": (
        ag.optim.Adam,
        {"lr": 0.05, "weight_decay": 0.01, "amsgrad": True, "maximize": True},
    ),
    "adamw": (ag.optim.AdamW, {"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    "adamw_amsgrad": (ag.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}),
}


def _model(seed: int) -> ag.nn.Module:
    return ag.nn.Sequential(
        ag.nn.Linear(3, 4, seed=seed, dtype="float64"),
        ag.nn.Tanh(),
        ag.nn.Linear(4, 2, seed=seed + 1, dtype="float64"),
    )


def _train(model, opt, steps) -> None:
    for x, y in zip(XS[steps], YS[steps], strict=True):
        opt.zero_grad()
        ag.nn.functional.mse_loss(model(ag.tensor(x)), ag.tensor(y)).backward()
        opt.step()


def _through_npz(state: dict, path) -> dict:
    """An optimizer state dict saved with np.savez (flat names) and read back."""
    flat = {"hyper": np.array(repr(state["param_groups"]))}  # (numbers and tuples only)
    for i, entry in state["state"].items():
        flat.update({f"state/{i}/{k}": np.asarray(v) for k, v in entry.items()})
    np.savez(path, **flat)
    out: dict = {"state": {}}
    with np.load(path) as f:
        for name in f.files:
            if name == "hyper":
                out["param_groups"] = eval(str(f[name]))  # (test data of our own)
            else:
                _, i, k = name.split("/")
                out["state"].setdefault(int(i), {})[k] = f[name][()] if k == "step" else f[name]
    return out


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(kind, tmp_path):
    cls, opts = CHECKPOINTS[kind]
    whole = _model(0)
    opt = cls(whole.parameters(), **opts)
    _train(whole, opt, slice(0, 5))

    first = _model(0)
    opt1 = cls(first.parameters(), **opts)
    _train(first, opt1, slice(0, 2))
    saved_model = first.state_dict()
    saved = _through_npz(opt1.state_dict(), tmp_path / "opt.npz")
    _train(first, opt1, slice(2, 3))  # (the saved copies do not follow)

    resumed = _model(7)  # (other weights, other hyperparameters: all come from the files)
    resumed.load_state_dict(saved_model)
    opt2 = cls(resumed.parameters(), lr=0.5)
    opt2.load_state_dict(saved)
    assert opt2.state_dict()["param_groups"] == opt1.state_dict()["param_groups"]
    _train(resumed, opt2, slice(2, 5))
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert a.data.dtype == b.data.dtype == np.float64
        assert np.array_equal(a.data, b.data)
    # (without the optimizer's state the run goes elsewhere)
    fresh = _model(7)
    fresh.load_state_dict(saved_model)
    _train(fresh, cls(fresh.parameters(), **opts), slice(2, 5))
    assert not np.allclose(fresh.parameters()[0].data, whole.parameters()[0].data, rtol=1e-6)


def _to_plain(a):  # (docs/limits.md, "Saving to a file": msgpack's default=)
    if isinstance(a, np.ndarray):
        return {"__ndarray__": [a.dtype.str, list(a.shape), a.tobytes()]}
    raise TypeError(f"cannot save a {type(a).__name__}")


def _from_plain(d):  # (its object_hook=)
    if "__ndarray__" in d:
        dtype, shape, data = d["__ndarray__"]
        return np.frombuffer(data, dtype).reshape(shape).copy()
    return d


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_the_documented_file_recipes_resume_bit_for_bit(kind, fmt, tmp_path):
    """limits.md's recipes for a checkpoint file (model and optimizer together) give
    back a run that goes on as if never stopped; the plain calls fail as it says."""

    import msgpack

    cls, opts = CHECKPOINTS[kind]
    whole = _model(0)
    _train(whole, cls(whole.parameters(), **opts), slice(0, 5))
    first = _model(0)
    opt1 = cls(first.parameters(), **opts)
    _train(first, opt1, slice(0, 2))
    ckpt = {"model": first.state_dict(), "opt": opt1.state_dict(), "step": 2}
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "msgpack":
        with pytest.raises(TypeError, match="ndarray"):
            msgpack.packb(ckpt)
        path.write_bytes(msgpack.packb(ckpt, default=_to_plain))
        back = msgpack.unpackb(path.read_bytes(), object_hook=_from_plain, strict_map_key=False)
    else:
        with pytest.raises(TypeError, match="ndarray"):
            json.dumps(ckpt)
        with open(path, "w") as f:
            json.dump(ckpt, f, default=lambda a: a.tolist())
        with open(path) as f:
            back = json.load(f)
    resumed = _model(7)
    resumed.load_state_dict(back["model"])
    opt2 = cls(resumed.parameters(), lr=0.5)
    opt2.load_state_dict(back["opt"])
    # (the hyperparameters as they were: Adam's betas a tuple again, not JSON's list)
    assert opt2.state_dict()["param_groups"] == opt1.state_dict()["param_groups"]
    _train(resumed, opt2, slice(back["step"], 5))
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert a.data.dtype == b.data.dtype == np.float64
        assert np.array_equal(a.data, b.data)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0, 3), (1, 0, 0)])
def test_the_json_recipe_keeps_an_empty_parameter(shape):
    # JSON's nested lists end at an empty array's first zero ((0, 3) comes back as [],
    # (2, 0, 3) as [[], []]): the model's and the optimizer's load refused such a
    # checkpoint ("has shape (0,), the parameter (0, 3)"). They take it now, as the
    # empty array of the parameter's shape; an empty array of another shape is still
    # refused.
    class Net(ag.nn.Module):
        def __init__(self):
            super().__init__()
            self.empty = ag.zeros(*shape, requires_grad=True)
            self.w = ag.tensor([1.0, 2.0], requires_grad=True)

    net = Net()
    opts = [ag.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), ag.optim.Adam(net.parameters())]
    for opt in opts:
        (net.empty.sum() + (net.w * net.w).sum()).backward()
        opt.step()
    ckpt = {"model": net.state_dict(), "opts": [opt.state_dict() for opt in opts]}
    back = json.loads(json.dumps(ckpt, default=lambda a: a.tolist()))
    assert np.asarray(back["model"]["empty"]).shape != shape  # (the case)
    again = Net()
    again.load_state_dict(back["model"])
    assert again.empty.data.shape == shape and again.w.data.tolist() == net.w.data.tolist()
    for opt, saved in zip(opts, back["opts"], strict=True):
        fresh = type(opt)(again.parameters(), lr=0.5)
        fresh.load_state_dict(saved)
        for key, value in fresh.state_dict()["state"][0].items():
            if isinstance(value, np.ndarray):
                assert value.shape == shape, key
        as_json = [json.dumps(o.state_dict(), default=lambda a: a.tolist()) for o in (fresh, opt)]
        assert as_json[0] == as_json[1]  # (JSON makes Adam's betas a list: they stay so)
    wrong = dict(back["model"], empty=np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"empty has shape \(0, 4\), the parameter"):
        again.load_state_dict(wrong)


@pytest.mark.parametrize("cls", [ag.optim.SGD, ag.optim.Adam])
def test_numpy_scalar_hyperparameters_are_saved_as_python_numbers(cls):
    # (an lr of np.float32, or betas of np.float64, stayed numpy scalars in the state
    # dict: json.dumps and limits.md's msgpack recipe refused them)
    model = _model(0)
    opts = {"lr": np.float32(0.5), "weight_decay": np.float64(0.01)}
    if cls is ag.optim.Adam:
        opts["betas"] = (np.float64(0.8), np.float32(0.9))
    opt = cls(model.parameters(), **opts)
    _train(model, opt, slice(0, 1))
    group = opt.state_dict()["param_groups"][0]
    assert json.loads(json.dumps(group))["lr"] == 0.5  # (TypeError: not serializable)
    assert type(group["lr"]) is float and group["lr"] == np.float32(0.5)
    if cls is ag.optim.Adam:
        assert type(group["betas"]) is tuple and group["betas"] == (0.8, float(np.float32(0.9)))
    again = cls(_model(1).parameters(), lr=0.1)
    again.load_state_dict(opt.state_dict())
    assert again.lr == 0.5 and type(again.lr) is float


def test_an_adamw_state_whose_flag_came_back_as_a_numpy_bool_loads_into_adamw_only():
    # (np.savez gives group values back as numpy scalars: np.bool_(True) was refused as
    # "another optimizer class's")
    w = ag.ones(3, requires_grad=True)
    opt = ag.optim.AdamW([w], lr=0.1)
    opt.step({w: np.ones(3)})
    sd = opt.state_dict()
    sd["param_groups"][0]["decoupled_weight_decay"] = np.bool_(True)
    again = ag.optim.AdamW([ag.ones(3, requires_grad=True)])
    again.load_state_dict(sd)
    assert again.lr == 0.1
    with pytest.raises(ValueError, match="decoupled_weight_decay True, Adam's is False"):
        ag.optim.Adam([ag.ones(3, requires_grad=True)]).load_state_dict(sd)


def test_np_savez_of_a_nested_state_dict_pickles_it_as_limits_md_says(tmp_path):
    model = _model(0)
    opt = ag.optim.Adam(model.parameters(), lr=0.1)
    _train(model, opt, slice(0, 1))
    np.savez(tmp_path / "opt.npz", **opt.state_dict())  # (no error here...)
    with np.load(tmp_path / "opt.npz") as f, pytest.raises(ValueError, match="allow_pickle"):
        f["state"]  # (...but here)


def test_a_changed_number_in_an_npz_checkpoint_fails_at_its_read_as_limits_md_says(tmp_path):
    """An npz's arrays carry zip's CRC-32 (limits.md said nothing was checksummed)."""
    import zipfile

    model = _model(0)
    opt = ag.optim.Adam(model.parameters(), lr=0.1)
    _train(model, opt, slice(0, 1))
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    path = tmp_path / "opt.npz"
    np.savez(path, **{"opt/0/exp_avg": exp_avg})
    data = bytearray(path.read_bytes())
    at = data.find(exp_avg.tobytes())
    assert at > 0
    data[at] ^= 1  # (one bit of the first number)
    path.write_bytes(bytes(data))
    with np.load(path) as f, pytest.raises(zipfile.BadZipFile, match="Bad CRC-32 for file"):
        f["opt/0/exp_avg"]


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_a_resumed_run_matches_torch_and_the_state_dicts_mirror_torchs(kind):
    torch = pytest.importorskip("torch")
    cls, opts = CHECKPOINTS[kind]
    model = _model(0)
    tmodel = torch.nn.Sequential(
        torch.nn.Linear(3, 4, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 2, dtype=torch.float64),
    )
    tmodel.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    tcls = getattr(torch.optim, cls.__name__)
    opt, topt = cls(model.parameters(), **opts), tcls(tmodel.parameters(), **opts)

    def torch_steps(steps):
        for x, y in zip(XS[steps], YS[steps], strict=True):
            topt.zero_grad()
            loss = torch.nn.functional.mse_loss(tmodel(torch.tensor(x)), torch.tensor(y))
            loss.backward()
            topt.step()

    _train(model, opt, slice(0, 2))
    torch_steps(slice(0, 2))
    ours, theirs = opt.state_dict(), topt.state_dict()
    assert sorted(ours) == sorted(theirs) == ["param_groups", "state"]
    assert sorted(ours["state"]) == sorted(theirs["state"]) == [0, 1, 2, 3]
    assert ours["param_groups"][0]["params"] == theirs["param_groups"][0]["params"]
    # (torch's groups hold more options: foreach, fused, capturable...; ours are a subset,
    # with every option of the update)
    assert set(ours["param_groups"][0]) <= set(theirs["param_groups"][0])
    assert set(theirs["param_groups"][0]) - set(ours["param_groups"][0]) <= {
        "foreach",
        "fused",
        "capturable",
        "differentiable",
    }
    for k, v in ours["param_groups"][0].items():
        assert v == theirs["param_groups"][0][k], k
    for i, entry in ours["state"].items():
        assert sorted(entry) == sorted(theirs["state"][i])
        for k, v in entry.items():
            t = theirs["state"][i][k]
            if k == "step":  # (torch keeps it as a 0-d float tensor, ours an int)
                assert type(v) is int and v == t.item() == 2
            else:
                np.testing.assert_allclose(v, t.numpy(), rtol=1e-12, atol=1e-15)

    resumed = _model(5)
    resumed.load_state_dict(model.state_dict())
    opt2 = cls(resumed.parameters(), lr=1.0)
    opt2.load_state_dict(ours)
    _train(resumed, opt2, slice(2, 5))
    torch_steps(slice(2, 5))
    for p, tp in zip(resumed.parameters(), tmodel.parameters(), strict=True):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-15)


def test_a_state_dict_loads_into_an_optimizer_of_float32_parameters():
    # (torch's step as a float, arrays of another float dtype: cast to the parameter's)
    w = ag.tensor(np.ones(2, dtype=np.float32), requires_grad=True)
    opt = ag.optim.Adam([w])
    state = {
        "state": {"0": {"step": 3.0, "exp_avg": np.ones(2), "exp_avg_sq": np.ones(2)}},
        "param_groups": [{"lr": 0.1, "betas": [0.9, 0.99], "eps": 1e-8, "params": [0]}],
    }
    opt.load_state_dict(state)
    assert opt.state[w]["step"] == 4 - 1 and type(opt.state[w]["step"]) is int
    assert opt.state[w]["exp_avg"].dtype == np.float32
    assert opt.lr == 0.1 and list(opt.betas) == [0.9, 0.99]
    opt.step({w: np.ones(2)})
    assert w.data.dtype == np.float32 and opt.state[w]["step"] == 4


def test_a_state_adopted_is_kept_unless_it_must_be_copied():
    # A DistributedOptimizer's owner checks the arrays it decoded from the message with
    # adopt=True: nobody else holds them, and a copy doubled its memory during a load.
    # What it cannot keep as is (read-only memory, another dtype) is still copied.
    w = ag.tensor(np.zeros(3), requires_grad=True)  # (float64)
    opt = ag.optim.Adam([w], lr=0.1)
    fresh = np.arange(3.0)
    frozen = np.arange(3.0)
    frozen.flags.writeable = False
    narrow = np.arange(3, dtype=np.float32)
    for given, kept in ((fresh, True), (frozen, False), (narrow, False)):
        state = {
            "state": {0: {"step": 2, "exp_avg": given, "exp_avg_sq": given}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0]}],
        }
        _, adopted = opt._loadable(state, adopt=True)
        _, copied = opt._loadable(state)
        for loaded, same in ((adopted, kept), (copied, False)):
            got = loaded[w]["exp_avg"]
            assert (got is given) is same, (given.dtype, given.flags.writeable)
            assert got.dtype == np.float64 and got.flags.writeable
            assert got.tolist() == [0.0, 1.0, 2.0]


def test_a_subclass_keeping_its_own_state_arrays_has_them_adopted_too():
    # (a subclass with STATE_KEYS None: its arrays are loaded as they were saved, and
    # an owner adopting a state keeps each writable one as is, not a copy)
    class Averaged(ag.optim.SGD):
        STATE_KEYS = None

    w = ag.tensor(np.zeros(3), requires_grad=True)
    opt = Averaged([w], lr=0.1)
    fresh = np.arange(3.0)
    frozen = np.arange(3.0)
    frozen.flags.writeable = False
    group = {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "params": [0]}
    for given, kept in ((fresh, True), (frozen, False)):
        state = {"state": {0: {"average": given}}, "param_groups": [group]}
        _, adopted = opt._loadable(state, adopt=True)
        got = adopted[w]["average"]
        assert (got is given) is kept
        assert got.flags.writeable and got.tolist() == [0.0, 1.0, 2.0]


def test_a_state_adopted_is_kept_whole_or_copied_whole():
    # The arrays an owner decodes from one message are views into one buffer: kept
    # beside one cast, they held its bytes too, for as long as the state lived.
    w64 = ag.tensor(np.zeros(4), requires_grad=True)
    w32 = ag.tensor(np.zeros(6, np.float32), requires_grad=True)
    opt = ag.optim.SGD([w64, w32], lr=0.1, momentum=0.9)
    message = np.arange(10.0)  # (the one buffer both arrays came in)
    state = {
        "state": {0: {"momentum_buffer": message[:4]}, 1: {"momentum_buffer": message[4:]}},
        "param_groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "params": [0, 1]}],
    }
    _, loaded = opt._loadable(state, adopt=True)
    got = [loaded[w64]["momentum_buffer"], loaded[w32]["momentum_buffer"]]
    assert [np.shares_memory(g, message) for g in got] == [False, False]
    assert [g.dtype for g in got] == [np.float64, np.float32]
    assert [g.tolist() for g in got] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]]
    # (both of the parameters' dtype: both kept, no copy)
    state["state"][1]["momentum_buffer"] = np.arange(6, dtype=np.float32)
    _, loaded = opt._loadable(state, adopt=True)
    assert loaded[w64]["momentum_buffer"].base is message
    assert loaded[w32]["momentum_buffer"] is state["state"][1]["momentum_buffer"]


def test_state_dict_and_load_state_dict_copy():
    w = ag.tensor([1.0, 2.0], requires_grad=True)
    opt = ag.optim.Adam([w], lr=0.1)
    opt.step({w: np.array([1.0, -1.0])})
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"][:] = 99
    sd["state"][0]["step"] = 50
    sd["param_groups"][0]["lr"] = 7.0
    assert opt.state[w]["exp_avg"].tolist() != [99, 99] and opt.state[w]["step"] == 1
    assert opt.lr == 0.1
    mine = ag.optim.Adam([ag.tensor([0.0, 0.0], requires_grad=True)])
    mine.load_state_dict(sd)
    sd["state"][0]["exp_avg"][:] = 5  # (the loaded optimizer holds its own copy)
    assert mine.state_dict()["state"][0]["exp_avg"].tolist() == [99, 99]
    assert mine.lr == 7.0
    # SGD without momentum keeps no state; loading a state dict drops the state it had
    plain = ag.optim.SGD([w], lr=0.1)
    assert plain.state_dict() == {
        "state": {},
        "param_groups": [
            {
                "lr": 0.1,
                "momentum": 0.0,
                "weight_decay": 0.0,
                "dampening": 0.0,
                "nesterov": False,
                "maximize": False,
                "params": [0],
            }
        ],
    }
    mom = ag.optim.SGD([w], lr=0.1, momentum=0.9)
    mom.step({w: np.ones(2)})
    mom.load_state_dict(plain.state_dict())
    assert mom.state == {} and mom.momentum == 0.0


def _adam_sd(**change):
    w = ag.tensor(np.zeros((2, 3)), requires_grad=True)
    b = ag.tensor(np.zeros(3), requires_grad=True)
    opt = ag.optim.Adam([w, b], lr=0.1)
    opt.step({w: np.ones((2, 3)), b: np.ones(3)})
    return opt.state_dict()


def _changed(edit):
    sd = _adam_sd()
    edit(sd)
    return sd


LOAD_ERRORS = [
    ("not a dict", lambda: [1, 2], TypeError, "expected an optimizer state dict"),
    (
        "a module's",
        lambda: ag.nn.Linear(3, 2).state_dict(),
        ValueError,
        r"missing keys \['state', 'param_groups'\], unexpected keys \['weight', 'bias'\]",
    ),
    (
        "one parameter more",
        lambda: _changed(lambda sd: sd["param_groups"][0]["params"].append(2)),
        ValueError,
        "the state dict is of 3 parameters, this Adam has 2",
    ),
    (
        "an int key of another type",
        lambda: _changed(lambda sd: sd["param_groups"][0].update(params=[0.0, 1])),
        TypeError,
        r"'params'\] must be a list of parameter indexes \(ints\), got \[0.0, 1\]",
    ),
    (
        "two groups",
        lambda: _changed(lambda sd: sd["param_groups"].append(sd["param_groups"][0])),
        ValueError,
        "has 2 parameter groups",
    ),
    (
        "SGD's into Adam",
        lambda: ag.optim.SGD([ag.ones(3, requires_grad=True)], lr=0.1).state_dict(),
        ValueError,
        r"hyperparameters \['dampening', 'lr', 'maximize', 'momentum', 'nesterov', "
        r"'weight_decay'\], Adam takes \['amsgrad', 'betas', 'eps', 'lr', 'maximize', "
        r"'weight_decay'\] \(a state dict of another optimizer class\?\)",
    ),
    (
        "another class's state",
        lambda: _changed(lambda sd: sd["state"][0].pop("exp_avg_sq")),
        ValueError,
        r"state\[0\] has the keys \['exp_avg', 'step'\], Adam keeps",
    ),
    (
        "a shape",
        lambda: _changed(lambda sd: sd["state"][1].update(exp_avg=np.zeros(4))),
        ValueError,
        r"state\[1\]\['exp_avg'\] has shape \(4,\), its parameter \(3,\)",
    ),
    (
        "an integer array",
        lambda: _changed(lambda sd: sd["state"][1].update(exp_avg=np.zeros(3, dtype=int))),
        TypeError,
        r"state\[1\]\['exp_avg'\] has dtype int64; it must be floating point",
    ),
    (
        "strings",
        lambda: _changed(lambda sd: sd["state"][0].update(exp_avg_sq="zeros")),
        TypeError,
        r"state\[0\]\['exp_avg_sq'\] is a str of dtype <U5, not an array of real numbers",
    ),
    (
        "a fractional step",
        lambda: _changed(lambda sd: sd["state"][0].update(step=2.5)),
        ValueError,
        r"state\[0\]\['step'\] must be a whole number >= 0, got 2.5",
    ),
    (
        "a negative step",
        lambda: _changed(lambda sd: sd["state"][0].update(step=-1)),
        ValueError,
        r"state\[0\]\['step'\] must be a whole number >= 0, got -1",
    ),
    (
        "a bad hyperparameter",
        lambda: _changed(lambda sd: sd["param_groups"][0].update(lr=-1.0)),
        ValueError,
        r"param_groups\[0\]: invalid learning rate -1.0",
    ),
    (
        "a parameter that is not there",
        lambda: _changed(lambda sd: sd["state"].update({5: sd["state"][0]})),
        ValueError,
        "'state' has an entry for 5, not one of the parameters",
    ),
    (
        "groups that are no dicts",
        lambda: _changed(lambda sd: sd.update(param_groups=[[0, 1]])),
        TypeError,
        r"'param_groups' must be a list of dicts, got list \[\[0, 1\]\]",
    ),
    (
        "a group without params",
        lambda: _changed(lambda sd: sd["param_groups"][0].pop("params")),
        ValueError,
        r"param_groups\[0\] has no 'params' list",
    ),
    (
        "a parameter twice",
        lambda: _changed(lambda sd: sd["param_groups"][0].update(params=[1, 1])),
        ValueError,
        r"param_groups\[0\]\['params'\] names a parameter twice: \[1, 1\]",
    ),
    (
        "a state that is no dict",
        lambda: _changed(lambda sd: sd.update(state=[sd["state"][0]])),
        TypeError,
        "'state' must be a dict of parameter index to that parameter's state, got list",
    ),
    (
        "an entry that is no dict",
        lambda: _changed(lambda sd: sd["state"].update({0: [1.0]})),
        TypeError,
        r"state\[0\] must be a dict of str keys, got list \[1.0\]",
    ),
    (
        # (the same hyperparameters as Adam's: told apart by torch's decoupled_weight_decay)
        "AdamW's into Adam",
        lambda: ag.optim.AdamW([ag.ones(3, requires_grad=True)]).state_dict(),
        ValueError,
        r"param_groups\[0\] has decoupled_weight_decay True, Adam's is False \(a state dict "
        r"of another optimizer class\?\)",
    ),
    (
        "SGD's options",
        lambda: _changed(lambda sd: sd["param_groups"][0].update(nesterov=False)),
        ValueError,
        r"param_groups\[0\] has the hyperparameters \['amsgrad', 'betas', 'eps', 'lr', "
        r"'maximize', 'nesterov', 'weight_decay'\], Adam takes",
    ),
    # (amsgrad's state without amsgrad, and amsgrad without its state, load: the state
    # dict of an optimizer whose amsgrad param_groups switched, see
    # test_a_state_dict_taken_after_amsgrad_was_switched_loads)
    (
        "a flag that is no bool",
        lambda: _changed(lambda sd: sd["param_groups"][0].update(amsgrad="no")),
        TypeError,
        r"param_groups\[0\]: Adam: amsgrad must be a bool \(True or False\), not 'no'",
    ),
    (
        "a step that is no number",
        lambda: _changed(lambda sd: sd["state"][0].update(step="3")),
        TypeError,
        r"state\[0\]\['step'\] must be an int, got str '3'",
    ),
]


@pytest.mark.parametrize(
    ("state", "error", "match"), [c[1:] for c in LOAD_ERRORS], ids=[c[0] for c in LOAD_ERRORS]
)
def test_load_state_dict_names_what_does_not_fit_and_changes_nothing(state, error, match):
    w = ag.tensor(np.ones((2, 3)), requires_grad=True)
    b = ag.tensor(np.ones(3), requires_grad=True)
    opt = ag.optim.Adam([w, b], lr=0.3)
    opt.step({w: np.full((2, 3), 0.5)})  # (b has no state yet)
    before = opt.state_dict()
    with pytest.raises(error, match=match):
        opt.load_state_dict(state())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and sorted(after["state"]) == [0]
    assert np.array_equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_state_dict_saved_before_the_new_options_loads_with_their_defaults(kind):
    # (saved before SGD had dampening, nesterov, maximize and Adam weight_decay, amsgrad,
    # maximize: its group has none of them; the run goes on as it would have)
    cls, opts = CHECKPOINTS[kind]
    whole = _model(0)
    _train(whole, cls(whole.parameters(), **opts), slice(0, 5))
    first = _model(0)
    opt1 = cls(first.parameters(), **opts)
    _train(first, opt1, slice(0, 2))
    old = opt1.state_dict()
    added = {
        "sgd": ["dampening", "nesterov", "maximize"],
        "adam": ["weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"],
    }[kind]
    old["param_groups"] = [{k: v for k, v in old["param_groups"][0].items() if k not in added}]
    assert sorted(old["param_groups"][0]) == sorted([*opts, "params"])
    resumed = _model(7)
    resumed.load_state_dict(first.state_dict())
    made_with = {"momentum": 0.5, "nesterov": True} if kind == "sgd" else {"amsgrad": True}
    opt2 = cls(resumed.parameters(), lr=0.5, **made_with, maximize=True)
    opt2.load_state_dict(old)
    assert opt2.state_dict()["param_groups"] == opt1.state_dict()["param_groups"]
    assert opt2.maximize is False and getattr(opt2, "nesterov", False) is False
    _train(resumed, opt2, slice(2, 5))
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert np.array_equal(a.data, b.data)


def test_adams_and_adamws_state_dicts_do_not_load_into_each_other():
    w = ag.tensor(np.zeros(3), requires_grad=True)
    adam = ag.optim.Adam([w], lr=0.1, weight_decay=0.1)
    adam.step({w: np.ones(3)})
    adamw = ag.optim.AdamW([w], lr=0.2)
    adamw.step({w: np.ones(3)})
    before = adamw.state_dict()
    with pytest.raises(
        ValueError,
        match=r"param_groups\[0\] has decoupled_weight_decay False, AdamW's is True \(a state "
        r"dict of another optimizer class\?\)",
    ):
        adamw.load_state_dict(adam.state_dict())
    # (Adam's saved before it had weight_decay: not AdamW's either, whose decay it lacks)
    old = adam.state_dict()
    old["param_groups"] = [{"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0]}]
    with pytest.raises(
        ValueError,
        match=r"has the hyperparameters \['betas', 'eps', 'lr'\], AdamW takes \['amsgrad', "
        r"'betas', 'eps', 'lr', 'maximize', 'weight_decay'\]",
    ):
        adamw.load_state_dict(old)
    after = adamw.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert np.array_equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    adam.load_state_dict(old)  # (into Adam: its own, older)
    assert adam.weight_decay == 0.0


def test_a_first_momentum_step_cut_short_keeps_no_half_written_buffer(monkeypatch):
    """SGD's first step with momentum writes its buffer block by block: one cut short
    (a MemoryError in a block's ``lr * g``, a KeyboardInterrupt) kept a buffer made by
    ``np.empty_like``, its blocks not reached yet holding whatever memory it got, and
    the next step went on from those values."""
    from actorgrad import optim

    monkeypatch.setattr(optim, "UPDATE_BLOCK", 4)
    real = optim._blocks

    def cut_short(*arrays):
        for i, block in enumerate(real(*arrays)):
            if i == 1:
                raise MemoryError("no memory for the second block")
            yield block

    p0 = np.arange(16, dtype=np.float64).reshape(8, 2)
    g = np.ones((8, 2))
    p = ag.Tensor(p0.copy(), requires_grad=True)
    opt = ag.optim.SGD([p], lr=0.1, momentum=0.9)
    monkeypatch.setattr(optim, "_blocks", cut_short)
    with pytest.raises(MemoryError):
        opt.step({p: g})
    monkeypatch.setattr(optim, "_blocks", real)
    np.testing.assert_array_equal(p.data, p0)  # (the step did not happen)
    opt.step({p: g})
    opt.step({p: g})
    fresh = ag.Tensor(p0.copy(), requires_grad=True)
    ref = ag.optim.SGD([fresh], lr=0.1, momentum=0.9)
    ref.step({fresh: g})
    ref.step({fresh: g})
    np.testing.assert_array_equal(
        opt.state[p]["momentum_buffer"], ref.state[fresh]["momentum_buffer"]
    )
    np.testing.assert_array_equal(p.data, fresh.data)


def test_a_subclass_needing_more_than_its_hyperparameters_loads_its_own_state_dict():
    # (its constructor, called with the hyperparameters alone to check them, refused
    # every state dict of its class: "missing 1 required positional argument")
    class Clipped(ag.optim.SGD):
        def __init__(self, params, lr, clip_to):
            super().__init__(params, lr)
            self._clip = clip_to

    w = ag.tensor([1.0, 2.0], requires_grad=True)
    sd = Clipped([w], lr=0.1, clip_to=1.0).state_dict()
    opt = Clipped([w], lr=0.2, clip_to=3.0)
    opt.load_state_dict(sd)
    assert (opt.lr, opt._clip) == (0.1, 3.0)


def test_a_subclass_whose_update_or_step_is_async_is_refused():
    # Called as a plain method, its coroutine was dropped unrun: every step changed
    # nothing (a RuntimeWarning "never awaited" at most). An async _update always (the
    # base class's step calls it); an async step by a DistributedOptimizer, whose
    # owners call it plainly, at its construction: awaited by its user, it works (it
    # was refused at construction, local use too).
    import asyncio

    class AsyncUpdate(ag.optim.SGD):
        async def _update(self, p, g, data):
            data -= self.lr * g

    w = ag.tensor(np.array([1.0, 2.0]), requires_grad=True)
    with pytest.raises(
        TypeError,
        match=r"^AsyncUpdate\._update is a coroutine function \(async def\): an "
        "optimizer's step and _update are plain methods, called without an await",
    ):
        AsyncUpdate([w], lr=0.1)
    opt = AsyncStepSGD([w], lr=0.5)
    asyncio.run(opt.step({w: np.ones(2)}))
    assert w.data.tolist() == [0.5, 1.5]
    with pytest.raises(
        TypeError,
        match=r"^optimizer_class AsyncStepSGD's step is a coroutine function \(async def\): "
        "the owners of a DistributedOptimizer's parameters call it without an await",
    ):
        ag.dist.DistributedOptimizer(AsyncStepSGD, [], lr=0.1)


class AsyncStepSGD(ag.optim.SGD):
    """SGD whose step is async (awaited by its user)."""

    async def step(self, grads=None):
        super().step(grads)


def test_a_subclass_passing_its_options_on_as_kwargs_saves_and_loads_them():
    # Its hyperparameters were its own constructor's parameters only: one written
    # (params, **options) had none, its state dict kept neither lr nor momentum, and
    # loading it failed ("SGD.__init__() missing 1 required positional argument:
    # 'lr'"), its own state dict included; one taking lr and passing the rest on kept
    # lr alone (betas, amsgrad lost).
    class Passing(ag.optim.SGD):
        def __init__(self, params, **options):
            super().__init__(params, **options)

    class Some(ag.optim.Adam):
        def __init__(self, params, lr=1e-3, *args, **kwargs):
            super().__init__(params, lr, *args, **kwargs)

    w = ag.tensor([1.0, 2.0], requires_grad=True)
    opt = Passing([w], lr=0.1, momentum=0.9, nesterov=True)
    opt.step({w: np.ones(2)})
    sd = opt.state_dict()
    assert sd["param_groups"] == [
        {
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "dampening": 0.0,
            "nesterov": True,
            "maximize": False,
            "params": [0],
        }
    ]
    again = Passing([w], lr=0.5)
    again.load_state_dict(sd)
    assert (again.lr, again.momentum, again.nesterov) == (0.1, 0.9, True)
    assert again.state[w]["momentum_buffer"].tolist() == [1.0, 1.0]
    adam = Some([w], lr=0.1, betas=(0.5, 0.6), amsgrad=True)
    adam.step({w: np.ones(2)})
    group = adam.state_dict()["param_groups"][0]
    assert (group["lr"], group["betas"], group["amsgrad"]) == (0.1, (0.5, 0.6), True)
    other = Some([w])
    other.load_state_dict(adam.state_dict())
    assert (other.lr, other.betas, other.amsgrad) == (0.1, (0.5, 0.6), True)
    assert other.state[w]["step"] == 1


def test_a_subclass_fixing_some_of_the_options_it_passes_on_loads_its_state_dicts():
    # One that passes the others on (**kwargs) but fixes some itself: given them again
    # (they are its base class's hyperparameters, saved), the constructor's check
    # failed, "got multiple values for keyword argument 'momentum'"; a state dict saved
    # when only its own constructor's parameters were (lr alone) loads, the others
    # kept as they are.
    class Nesterov(ag.optim.SGD):
        def __init__(self, params, lr, **options):
            super().__init__(params, lr, momentum=0.9, nesterov=True, **options)

    w = ag.tensor([1.0, 2.0], requires_grad=True)
    opt = Nesterov([w], lr=0.1, weight_decay=0.01)
    opt.step({w: np.ones(2)})
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 0.01)
    again = Nesterov([w], lr=0.5)
    again.load_state_dict(sd)
    assert (again.lr, again.weight_decay, again.momentum, again.nesterov) == (0.1, 0.01, 0.9, True)
    np.testing.assert_allclose(again.state[w]["momentum_buffer"], [1.01, 1.02], rtol=1e-6)
    older = {"state": sd["state"], "param_groups": [{"lr": 0.2, "params": [0]}]}
    kept = Nesterov([w], lr=0.5, weight_decay=0.03)
    kept.load_state_dict(older)
    assert (kept.lr, kept.weight_decay, kept.momentum) == (0.2, 0.03, 0.9)
    with pytest.raises(ValueError, match="invalid momentum 0.9 or weight_decay -1"):
        again.load_state_dict({**sd, "param_groups": [{**group, "weight_decay": -1}]})
    # (one it sets itself is loaded as saved: the constructor, given it twice, cannot
    # check it; a value other than the class's is one set after construction)
    again.load_state_dict({**sd, "param_groups": [{**group, "momentum": 0.5}]})
    assert again.momentum == 0.5


def test_a_subclass_whose_constructor_is_a_partialmethod_saves_and_loads():
    # (its __init__ looked up in the class's __dict__ is the descriptor, no callable:
    # state_dict raised "functools.partialmethod(...) is not a callable object")
    import functools

    class Heavy(ag.optim.SGD):
        __init__ = functools.partialmethod(ag.optim.SGD.__init__, momentum=0.9)

    w = ag.tensor(np.array([1.0, 2.0]), requires_grad=True)
    opt = Heavy([w], lr=0.1)
    opt.step({w: np.ones(2)})
    sd = opt.state_dict()
    assert sd["param_groups"][0] == {
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "dampening": 0.0,
        "nesterov": False,
        "maximize": False,
        "params": [0],
    }
    again = Heavy([w], lr=0.5, momentum=0.5)
    again.load_state_dict(sd)
    assert (again.lr, again.momentum) == (0.1, 0.9)
    assert again.state[w]["momentum_buffer"].tolist() == [1.0, 1.0]


def test_a_hyperparameter_a_subclass_sets_itself_then_changed_loads_as_saved():
    # A class that sets lr itself (super().__init__(params, lr=0.1, **options)) and
    # whose lr a schedule then changed (opt.lr = lr, docs/porting.md's way): its state
    # dict saved the changed lr, and loading it dropped it silently (the constructor's
    # check could not be given it twice), so a resumed run, or the porting recipe's
    # DistributedOptimizer load with another lr, went on with the class's 0.1.
    class Fixed(ag.optim.SGD):
        def __init__(self, params, **options):
            super().__init__(params, lr=0.1, **options)

    w = ag.tensor(np.array([1.0, 2.0]), requires_grad=True)  # (float64)
    opt = Fixed([w], momentum=0.5)
    opt.lr = 0.01
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == 0.01
    resumed = Fixed([w])
    resumed.load_state_dict(sd)
    assert (resumed.lr, resumed.momentum) == (0.01, 0.5)
    resumed.step({w: np.ones(2)})
    np.testing.assert_allclose(w.data, [0.99, 1.99], rtol=1e-12)
    # (the others are still checked by the constructor)
    with pytest.raises(ValueError, match="invalid momentum -1 or weight_decay 0.0"):
        resumed.load_state_dict({**sd, "param_groups": [{**sd["param_groups"][0], "momentum": -1}]})
    assert (resumed.lr, resumed.momentum) == (0.01, 0.5)


def test_a_subclass_passing_its_options_on_refuses_an_older_class_s_state_dict():
    # A state dict giving some of the hyperparameters a subclass passes on to its base
    # class (**options) is one saved since they are: it must give them all, as the base
    # class's own must. Else Adam's of before its weight_decay ({lr, betas, eps}), which
    # AdamW refuses, loaded into a subclass of AdamW as its own (weight_decay kept). One
    # giving none of them (saved before they were) loads, the others kept.
    class Passing(ag.optim.AdamW):
        def __init__(self, params, **options):
            super().__init__(params, **options)

    w = ag.tensor([1.0, 2.0], requires_grad=True)
    older_adam = {
        "state": {},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0]}],
    }
    for cls in (ag.optim.AdamW, Passing):
        opt = cls([w], lr=0.5, weight_decay=0.1)
        with pytest.raises(ValueError) as ei:
            opt.load_state_dict(older_adam)
        assert str(ei.value) == (
            "load_state_dict: param_groups[0] has the hyperparameters ['betas', 'eps', "
            f"'lr'], {cls.__name__} takes ['amsgrad', 'betas', 'eps', 'lr', 'maximize', "
            "'weight_decay'] (a state dict of another optimizer class?)"
        )
        assert (opt.lr, opt.weight_decay) == (0.5, 0.1)
    saved_before = {"state": {}, "param_groups": [{"decoupled_weight_decay": True, "params": [0]}]}
    opt = Passing([w], lr=0.5, weight_decay=0.1)
    opt.load_state_dict(saved_before)
    assert (opt.lr, opt.weight_decay) == (0.5, 0.1)
    again = Passing([w])
    again.load_state_dict(opt.state_dict())
    assert (again.lr, again.weight_decay, again.betas) == (0.5, 0.1, (0.9, 0.999))


def test_a_subclass_of_adam_taking_fewer_options_loads_its_own_state_dict():
    # (its hyperparameters are its constructor's: amsgrad and weight_decay are not, and
    # its state is kept as its instance's amsgrad says)
    class Fixed(ag.optim.Adam):
        def __init__(self, params, lr):
            super().__init__(params, lr, weight_decay=0.1, amsgrad=True)

    class Required(ag.optim.Adam):  # (an added option it requires: not taken as missing)
        def __init__(self, params, lr, amsgrad):
            super().__init__(params, lr, amsgrad=amsgrad)

    w = ag.tensor([1.0, 2.0], requires_grad=True)
    opt = Fixed([w], lr=0.1)
    opt.step({w: np.ones(2)})
    sd = opt.state_dict()
    assert sorted(sd["param_groups"][0]) == ["decoupled_weight_decay", "lr", "params"]
    assert sorted(sd["state"][0]) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
    again = Fixed([w], lr=0.5)
    again.load_state_dict(sd)
    assert again.lr == 0.1 and again.state[w]["step"] == 1
    sd = Required([w], lr=0.1, amsgrad=False).state_dict()
    del sd["param_groups"][0]["amsgrad"]
    with pytest.raises(ValueError, match=r"has the hyperparameters \['lr'\], Required takes"):
        Required([w], lr=0.1, amsgrad=False).load_state_dict(sd)


def test_a_loaded_state_array_is_kept_in_c_order():
    # A Fortran-ordered momentum buffer, loaded as it was, made the blocked step of a
    # parameter with rows bigger than UPDATE_BLOCK build whole-size temporaries again.
    w = ag.tensor(np.zeros((3, 4)), requires_grad=True)
    opt = ag.optim.SGD([w], lr=0.1, momentum=0.9)
    opt.step({w: np.ones((3, 4))})
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"] = np.asfortranarray(sd["state"][0]["momentum_buffer"])
    opt2 = ag.optim.SGD([ag.tensor(np.zeros((3, 4)), requires_grad=True)], lr=0.1)
    opt2.load_state_dict(sd)
    (buf,) = (e["momentum_buffer"] for e in opt2.state.values())
    assert buf.flags.c_contiguous and np.array_equal(buf, np.ones((3, 4)))


def test_zero_grad_set_to_none_false_leaves_zeros_as_torchs_does():
    # (a port from torch passing set_to_none got a TypeError)
    a = ag.tensor([1.0, 2.0], requires_grad=True)
    b = ag.tensor(np.ones((2, 2)), requires_grad=True)
    unused = ag.tensor([3.0], requires_grad=True)
    net = ag.nn.Linear(2, 1, seed=0)
    for zero_grad, params in (
        (ag.optim.SGD([a, b, unused], lr=0.1).zero_grad, [a, b]),
        (net.zero_grad, net.parameters()),
    ):
        loss = (a * 2).sum() + b.sum() + net(ag.ones(1, 2)).sum()
        loss.backward()
        zero_grad(set_to_none=False)
        for p in params:
            assert p.grad.dtype == p.data.dtype and p.grad.shape == p.data.shape
            assert not p.grad.any()
        assert unused.grad is None  # (no gradient: none made up)
        zero_grad()
        assert all(p.grad is None for p in params)
        with pytest.raises(TypeError, match=r"set_to_none must be a bool \(True or False\), not 0"):
            zero_grad(set_to_none=0)


def test_param_groups_reads_and_writes_the_optimizers_hyperparameters():
    # torch's way of a learning-rate schedule, `for g in opt.param_groups: g["lr"] =
    # lr`, works on ours: the group is a view of the optimizer's attributes.
    p = ag.tensor(np.ones(2), requires_grad=True)
    q = ag.tensor(np.ones(2), requires_grad=True)
    opt, ref = ag.optim.Adam([p], lr=0.1), ag.optim.Adam([q], lr=0.1)
    (group,) = opt.param_groups
    assert group["params"][0] is p and group["lr"] == 0.1 and group["betas"] == (0.9, 0.999)
    assert sorted(group) == sorted(["params", *ag.optim.Adam([q], lr=1.0)._hyperparameters()])
    for lr in (0.1, 0.05, 0.01):
        for g in opt.param_groups:
            g["lr"] = lr
        ref.lr = lr
        opt.step(grads={p: np.array([1.0, -2.0])})
        ref.step(grads={q: np.array([1.0, -2.0])})
    np.testing.assert_array_equal(p.data, q.data)
    assert opt.lr == 0.01 and opt.state_dict()["param_groups"][0]["lr"] == 0.01
    with pytest.raises(KeyError, match=r"\['learning_rate'\] of Adam: not a hyperparameter"):
        group["learning_rate"] = 0.1
    with pytest.raises(KeyError, match=r"\['params'\] of Adam: fixed"):
        group["params"] = []
    with pytest.raises(TypeError, match="keeps every key"):
        del group["lr"]
    with pytest.raises(KeyError):
        group["learning_rate"]


@pytest.mark.parametrize("first", [True, False])
def test_a_state_dict_taken_after_amsgrad_was_switched_loads(first: bool) -> None:
    # param_groups makes switching amsgrad a documented move (torch allows it: its
    # state keeps max_exp_avg_sq, unused, and loads whatever keys it is given). Ours
    # checked the keys of each entry against amsgrad: switched off after steps with
    # it, the entries keep max_exp_avg_sq; switched on, they lack it until the next
    # step. Either way the optimizer's own state dict was refused, by itself too:
    # "state[0] has the keys [...], Adam keeps [...]". Loaded, the run goes on as the
    # original's.
    w = ag.tensor([1.0, 2.0], requires_grad=True)
    opt = ag.optim.Adam([w], lr=0.1, amsgrad=first)
    opt.step({w: np.array([1.0, -3.0])})
    opt.param_groups[0]["amsgrad"] = not first
    opt.load_state_dict(opt.state_dict())
    w2 = ag.tensor(w.data.copy(), requires_grad=True)
    opt2 = ag.optim.Adam([w2], lr=0.5)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.amsgrad is (not first)
    for g in (np.array([0.5, 2.0]), np.array([-1.0, 1.0])):
        opt.step({w: g})
        opt2.step({w2: g})
    np.testing.assert_array_equal(w2.data, w.data)
    # (another class's state still is refused: SGD's momentum buffer)
    sgd = ag.optim.SGD([w], lr=0.1, momentum=0.9)
    sgd.step({w: np.ones(2)})
    with pytest.raises(ValueError, match=r"state\[0\] has the keys \['momentum_buffer'\]"):
        opt2.load_state_dict(sgd.state_dict() | {"param_groups": opt.state_dict()["param_groups"]})
