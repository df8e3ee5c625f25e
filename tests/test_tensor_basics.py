"""Tensor creation, dtypes, attributes, comparisons and error messages."""

from __future__ import annotations

import re

import numpy as np
import pytest

import actorgrad as ag
from actorgrad.tensor import Tensor


def test_python_floats_become_float32_and_numpy_arrays_keep_dtype():
    assert ag.tensor(1.5).dtype == np.float32
    assert ag.tensor([[1.0, 2], [3, 4]]).dtype == np.float32
    assert ag.tensor([1, 2]).dtype == np.int64
    assert ag.tensor([True]).dtype == np.bool_
    assert ag.tensor(np.ones(2, np.float64)).dtype == np.float64
    assert ag.tensor(np.ones(2, np.float16)).dtype == np.float16
    assert ag.tensor([1, 2], dtype="float64").dtype == np.float64


def test_float64_data_in_a_list_keeps_its_dtype_and_only_python_floats_become_float32():
    # Only Python floats take the float32 default (torch.tensor infers each element's
    # dtype: a numpy float64 scalar or array, or a float64 tensor, in a list gives
    # float64). The float64 of numpy arrays given in a list was cast to float32: a
    # batch built as ag.tensor([row1, row2]) of float64 rows lost its precision, where
    # ag.tensor(np.stack([row1, row2])) kept it.
    row = np.array([0.1, 1 / 3])
    for data in (
        [row, row],
        [np.float64(0.1), 1 / 3],
        [[np.float64(0.1)], [1 / 3]],
        ([0.1, 1 / 3], row),
        [ag.tensor(0.1, dtype="float64"), ag.tensor(1 / 3, dtype="float64")],
    ):
        t = ag.tensor(data)
        assert t.dtype == np.float64, data
        np.testing.assert_array_equal(t.data.ravel()[:2], [0.1, 1 / 3])
    assert ag.tensor([row], requires_grad=True).dtype == np.float64
    # (what numpy makes float64 of other data stays torch's float32)
    for data in (
        [np.float32(1), 2.5],
        [np.int64(1), 2.5],
        [[1.5, 2]],
        [],
        [np.ones(2, "f4"), [1.5, 2]],
    ):
        assert ag.tensor(data).dtype == np.float32, data


def test_tensor_copies_but_the_internal_constructor_does_not():
    a = np.zeros(3, np.float32)
    t = ag.tensor(a)
    a[0] = 1
    assert t.data[0] == 0
    u = Tensor(a, requires_grad=True)
    assert u.data is a and u.requires_grad and u.is_leaf and u.grad is None


def test_factories():
    assert ag.zeros(2, 3).shape == (2, 3) and ag.zeros((2, 3)).dtype == np.float32
    assert ag.ones(4, dtype="float64").dtype == np.float64
    np.testing.assert_array_equal(ag.ones(2).data, [1.0, 1.0])
    a, b = ag.randn(3, 2, seed=7), ag.randn(3, 2, seed=7)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.dtype == np.float32 and ag.randn(2, dtype="float64").dtype == np.float64
    assert ag.zeros(2, requires_grad=True).requires_grad


@pytest.mark.parametrize(
    "data, dtype",
    [
        (["a", "b"], "<U1"),
        ([object()], "object"),
        (np.array(["2026-12-02"], "M8[D]"), "datetime64"),
    ],
)
def test_data_that_is_not_numeric_is_refused_naming_its_dtype(data, dtype):
    with pytest.raises(TypeError, match=f"must be bool or numeric, got dtype {dtype}"):
        ag.tensor(data)
    # (the class too: it took an object or string array, which failed later in an op)
    with pytest.raises(TypeError, match=f"tensor data must be bool or numeric, got dtype {dtype}"):
        ag.Tensor(np.asarray(data))


@pytest.mark.parametrize("dtype", ["int64", "int32", "bool", "uint8"])
def test_requires_grad_on_non_float_raises_type_error_naming_the_dtype(dtype):
    with pytest.raises(TypeError, match=f"floating point dtype, got {dtype}"):
        ag.tensor(np.zeros(2, dtype), requires_grad=True)
    with pytest.raises(TypeError, match=dtype):
        Tensor(np.zeros(2, dtype), requires_grad=True)
    with pytest.raises(TypeError, match=dtype):
        ag.zeros(2, dtype=dtype, requires_grad=True)
    t = ag.tensor(np.zeros(2, dtype))
    with pytest.raises(TypeError, match=dtype):
        t.requires_grad = True


def test_requires_grad_is_settable_on_leaves_only():
    t = ag.tensor([1.0, 2.0])
    t.requires_grad = True
    assert t.requires_grad and t.is_leaf
    (t * t).sum().backward()
    np.testing.assert_array_equal(t.grad, [2.0, 4.0])
    u = ag.tensor([3.0], requires_grad=True)
    u.requires_grad = False
    assert not u.requires_grad and not (u * 2).requires_grad
    y = t * 2
    with pytest.raises(RuntimeError, match="requires_grad can only be changed on leaf tensors"):
        y.requires_grad = False
    assert y.requires_grad


def test_requires_grad_on_python_ints_raises():
    with pytest.raises(TypeError, match="int64"):
        ag.tensor([1, 2], requires_grad=True)


def test_detach_in_place_cuts_a_hidden_state_off_the_graph_it_came_from():
    # (an RNN's h.detach_() between steps, as torch's tutorials write it)
    w = ag.tensor([2.0, 3.0], dtype="float64", requires_grad=True)
    h = ag.tensor([1.0, 1.0], dtype="float64")
    for _ in range(3):
        h = (h * w).tanh()
        old = h
        assert h.detach_() is h and h.is_leaf and not h.requires_grad and h.grad_fn is None
    loss = (h * w).sum()  # (only the last step's w reaches the loss)
    loss.backward()
    np.testing.assert_array_equal(w.grad, h.data)
    assert old.data is h.data and "grad_fn" not in repr(h)
    leaf = ag.tensor([1.0], requires_grad=True)
    leaf.register_hook(lambda g: g * 0)
    leaf.detach_()
    leaf.requires_grad = True  # (a leaf again, without the hooks of before)
    (leaf * 2).sum().backward()
    np.testing.assert_array_equal(leaf.grad, [2.0])


@pytest.mark.parametrize("how", ["detach_", "requires_grad"])
def test_a_leaf_that_stopped_requiring_grad_gets_no_grad_from_an_older_graph(how):
    # (as torch's AccumulateGrad: w.grad was [2, 2] from a graph recorded before)
    w, v = ag.ones(2, requires_grad=True), ag.ones(2, requires_grad=True)
    y = (w * 2 + v).sum()
    if how == "detach_":
        w.detach_()
    else:
        w.requires_grad = False
    y.backward()
    assert w.grad is None
    np.testing.assert_array_equal(v.grad, [1.0, 1.0])  # (the others' as before)


def test_attributes_and_conversions():
    t = ag.tensor([[1.0, 2.0]], requires_grad=True)
    assert t.shape == (1, 2) and t.ndim == 2 and t.numel() == 2
    assert t.numpy() is t.data
    d = t.detach()
    assert d.data is t.data and not d.requires_grad
    assert ag.tensor([3.0]).item() == 3.0
    assert float(ag.tensor(2.0)) == 2.0
    with pytest.raises(ValueError, match="one-element"):
        t.item()
    assert np.asarray(t).dtype == np.float32
    assert "requires_grad=True" in repr(t)
    assert "grad_fn=<Mul>" in repr(t * 2)
    assert [x.item() for x in ag.tensor([1.0, 2.0])] == [1.0, 2.0]
    with pytest.raises(TypeError, match="0-d"):
        list(ag.tensor(1.0))


def test_python_protocols_act_on_the_data_as_numpy_does():
    t = ag.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    assert len(t) == 2 and len(ag.tensor([])) == 0
    with pytest.raises(TypeError):  # (numpy: "len() of unsized object")
        len(ag.tensor(1.0))
    assert bool(ag.tensor(1.0)) is True and bool(ag.tensor([0.0])) is False
    with pytest.raises(ValueError, match="ambiguous"):
        bool(t)
    assert int(ag.tensor(2.7)) == 2 and type(int(ag.tensor([5.0]))) is int
    assert +t is t
    a = np.asarray(t, dtype=np.float64)
    assert a.dtype == np.float64 and a.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    a[0, 0] = 9.0  # (a converted copy: the tensor keeps its data)
    assert t.data[0, 0] == 1.0
    assert np.asarray(t, dtype=np.float32) is t.data
    # transpose's axes as one tuple or list, as numpy's
    for axes in ((1, 0), [1, 0]):
        np.testing.assert_array_equal(t.transpose(axes).data, t.data.T)
    t.transpose((1, 0)).sum().backward()
    np.testing.assert_array_equal(t.grad, np.ones((2, 2)))


def test_a_0d_tensor_formats_as_its_number_as_numpy_and_torch_do():
    # (f"{loss:.4f}" raised "unsupported format string passed to Tensor.__format__")
    loss = (ag.tensor([1.0, 2.0], requires_grad=True) * 0.61725).sum()
    assert f"{loss:.4f}" == "1.8518" == f"{np.asarray(loss.data):.4f}"
    assert f"{ag.tensor(3, dtype='int64'):>4d}" == "   3"
    # (no spec: the number too, as numpy and torch print it)
    assert f"{loss}" == "1.851750135421753" == f"{np.asarray(loss.data)}" != str(loss)
    assert f"loss {ag.tensor(2.5, dtype='float64')}" == "loss 2.5"
    assert f"{ag.tensor(True)}" == "True" and f"{ag.tensor(7, dtype='int32')}" == "7"
    assert f"{ag.tensor([1.0, 2.0])}" == str(ag.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="unsupported format string"):
        f"{ag.tensor([1.0, 2.0]):.2f}"  # (as numpy and torch: dimensions refuse a spec)


def test_comparisons_return_boolean_tensors_without_grad():
    x = ag.tensor([1.0, 2.0, 3.0], requires_grad=True)
    for res, expected in [
        (x < 2, [True, False, False]),
        (x <= 2, [True, True, False]),
        (x > 2, [False, False, True]),
        (x >= 2, [False, True, True]),
        (x == 2, [False, True, False]),
        (x != 2, [True, False, True]),
        (x == ag.tensor([1.0, 0.0, 3.0]), [True, False, True]),
    ]:
        assert isinstance(res, Tensor) and res.dtype == np.bool_
        assert not res.requires_grad and res.grad_fn is None
        np.testing.assert_array_equal(res.data, expected)


def test_tensors_hash_by_identity():
    a = ag.tensor([1.0])
    b = ag.tensor([1.0])
    d = {a: 1, b: 2}
    assert d[a] == 1 and d[b] == 2 and len({a, b, a}) == 2


def test_numpy_array_on_the_left_defers_to_the_tensor():
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = np.array([3.0, 4.0], np.float32) * x
    assert isinstance(y, Tensor) and y.requires_grad
    z = np.ones((2, 2), np.float32) @ x
    assert isinstance(z, Tensor)
    (y.sum() + z.sum()).backward()
    np.testing.assert_array_equal(x.grad, [5.0, 6.0])


def test_ops_without_grad_record_nothing():
    x = ag.tensor([1.0, 2.0])
    y = (x * 2).exp().sum()
    assert y.grad_fn is None and not y.requires_grad
    w = ag.tensor([1.0], requires_grad=True)
    with ag.no_grad():
        assert (w * 2).grad_fn is None


def test_op_results_are_always_ndarrays_even_for_0d():
    x = ag.tensor(2.0, requires_grad=True)
    y = x * x
    assert type(y.data) is np.ndarray and y.shape == ()
    assert type(ag.tensor([1.0, 2.0]).sum().data) is np.ndarray


# --- errors -----------------------------------------------------------------------


def test_matmul_shape_mismatch_names_the_shapes():
    a, b = ag.ones(2, 3), ag.ones(4, 5)
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(4, 5\) do not fit"):
        a @ b
    with pytest.raises(ValueError, match=r"shapes \(\) and \(3,\)"):
        ag.matmul(ag.tensor(1.0), ag.ones(3))


def test_broadcast_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"\+: operands of shapes \(2, 3\) and \(4,\)"):
        ag.ones(2, 3) + ag.ones(4)


def test_reshape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*into shape \(4,\)"):
        ag.ones(2, 3).reshape(4)


def test_cat_mismatch_names_the_shapes():
    with pytest.raises(
        ValueError,
        match=r"cat: tensors\[1\] of shape \(2, 4\) does not fit tensors\[0\] of shape \(2, 3\)",
    ):
        ag.cat([ag.ones(2, 3), ag.ones(2, 4)])


@pytest.mark.parametrize("fn", [ag.cat, ag.stack])
def test_cat_and_stack_refuse_an_empty_sequence(fn):
    for empty in ([], ()):
        with pytest.raises(ValueError, match="expected a non-empty sequence of tensors"):
            fn(empty)


@pytest.mark.parametrize("fn", [ag.cat, ag.stack])
def test_cat_and_stack_refuse_a_single_tensor(fn):
    # it was iterated as the sequence: cat(ones(2, 3)) gave its rows joined, shape (6,)
    name = fn.__name__
    with pytest.raises(TypeError, match=f"{name}: expected a sequence of tensors, got Tensor"):
        fn(ag.ones(2, 3))


def test_reduction_axis_out_of_range():
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        ag.ones(2, 3).sum(axis=2)
    for axis in (1, -2):  # a 0-d tensor takes 0 and -1 only
        with pytest.raises(ValueError, match=f"axis {axis} is out of range .* 0 dimensions"):
            ag.tensor(3.0).max(axis=axis)


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@pytest.mark.parametrize(
    "shape, axis, repeated", [((2, 3), (0, 0), 0), ((2, 3), (1, -1), 1), ((), (0, -1), 0)]
)
def test_reduction_over_an_axis_given_twice_is_refused(op, shape, axis, repeated):
    # (it was merged silently: sum(axis=(1, -1)) summed axis 1 once)
    with pytest.raises(ValueError, match=rf"axis {repeated} appears more than once in axis="):
        getattr(ag.ones(*shape), op)(axis=axis)


def test_split_of_a_0d_tensor_names_the_problem():
    with pytest.raises(ValueError, match="split: a 0-d tensor has no axis"):
        ag.split(ag.tensor(3.0), 1)


def test_where_needs_a_boolean_condition():
    with pytest.raises(TypeError, match="boolean"):
        ag.where(np.array([1, 0]), ag.ones(2), ag.zeros(2))


@pytest.mark.parametrize(
    "axes, match",
    [
        ((0, 0, 1), r"transpose: axes \(0, 0, 1\) name axis 0 twice"),
        ((0, -3, 1), r"transpose: axes \(0, -3, 1\) name axis 0 twice"),
        ((0, 1, 3), r"axes \(0, 1, 3\): axis 3 is out of range for a tensor with 3 dim"),
        ((0, 1), r"axes \(0, 1\) must be 3 integers"),
    ],
    ids=["repeated", "repeated_negative", "out_of_range", "too_few"],
)
def test_transpose_refuses_axes_that_are_no_permutation(axes, match):
    with pytest.raises(ValueError, match=match):
        ag.ones(2, 3, 4).transpose(*axes)


@pytest.mark.parametrize(
    "index, match",
    [
        (np.array([False, True]), r"mask of shape \(2,\) does not fit the dimensions \(3,\)"),
        ([True, False, True, True], r"mask of shape \(4,\) does not fit the dimensions \(3,\)"),
        ((slice(None), np.ones(3, bool)), r"\(3,\) does not fit the dimensions \(4,\) .*axis 1"),
        ((..., np.ones((3, 3), bool)), r"\(3, 3\) does not fit the dimensions \(3, 4\)"),
        ((None, np.ones(2, bool)), r"\(2,\) does not fit the dimensions \(3,\) .*axis 0"),
    ],
    ids=["short", "long_list", "after_slice", "after_ellipsis", "after_none"],
)
def test_boolean_mask_of_the_wrong_shape_raises_index_error_as_in_numpy(index, match):
    # Turned into indices by nonzero() before numpy saw it, a short mask picked from the
    # first elements: tensor([10, 20, 30])[[False, True]] gave [20].
    x = ag.tensor(np.arange(12.0).reshape(3, 4))
    with pytest.raises(IndexError, match=match):
        x[index]
    with pytest.raises(IndexError):
        x.data[index]  # (numpy's own check agrees)
    np.testing.assert_array_equal(x[np.array([False, True, True])].data, x.data[1:])


def test_randn_refuses_a_dtype_that_is_not_floating_point():
    # (randn(3, dtype="int32") gave normal samples truncated to int32: mostly zeros)
    for dtype in ("int32", "bool", "complex64"):
        with pytest.raises(
            TypeError, match=f"randn: dtype must be a floating point dtype, got {dtype}"
        ):
            ag.randn(3, dtype=dtype)
    assert ag.randn(3, dtype="float16", seed=0).dtype == np.float16


def test_factories_take_dtype_none_as_the_default_float32():
    # (np.zeros(dtype=None) made it float64, unlike dtype omitted)
    for make in (ag.zeros, ag.ones, ag.randn):
        assert make(2, dtype=None).dtype == np.float32
        assert make(2).dtype == np.float32


def test_factories_name_a_size_that_is_not_one():
    # (numpy's "negative dimensions are not allowed" named neither the call nor the size)
    for make in (ag.zeros, ag.ones, ag.randn):
        name = make.__name__
        with pytest.raises(
            ValueError, match=rf"{name}: sizes must not be negative, got -3 in \(2, -3\)"
        ):
            make(2, -3)
        with pytest.raises(ValueError, match=rf"{name}: sizes must not be negative, got -1"):
            make((-1,))
        with pytest.raises(
            TypeError, match=rf"{name}: sizes must be integers, got 2.5 in \(2.5,\)"
        ):
            make(2.5)
        with pytest.raises(TypeError, match=rf"{name}: sizes must be integers, got None"):
            make([2, None])
        assert make(np.int64(2), 0).shape == (2, 0)
        assert make(()).shape == ()


def test_flags_are_bools_and_containers_are_named():
    # ("no" and 1 were taken as true; the others failed inside numpy or Python)
    for bad in ("yes", "no", 1, None):
        with pytest.raises(TypeError, match="requires_grad must be a bool"):
            ag.tensor([1.0], requires_grad=bad)
        with pytest.raises(TypeError, match="requires_grad must be a bool"):
            ag.tensor([1.0]).requires_grad = bad  # (the setter took "no" as true)
        x = ag.tensor([1.0], requires_grad=True)
        if bad is not None:
            with pytest.raises(TypeError, match="retain_graph must be a bool"):
                (x * 2).sum().backward(retain_graph=bad)
    assert ag.tensor([1.0], requires_grad=np.bool_(True)).requires_grad
    # (retain_graph=None, torch's default, means False)
    x = ag.tensor([1.0], requires_grad=True)
    y = (x * 2).sum()
    y.backward(retain_graph=None)
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()
    with pytest.raises(TypeError, match="no_grad.. takes no arguments, or decorates a function"):
        ag.no_grad(5)
    for join in (ag.cat, ag.stack):
        with pytest.raises(TypeError, match="expected a sequence of tensors, got int"):
            join(5)
    with pytest.raises(TypeError, match="load_state_dict: expected a mapping .* got int"):
        ag.nn.Linear(2, 2).load_state_dict(5)


@pytest.mark.parametrize(
    "call, error, match",
    [
        # (cat's forward took None, numpy flattening, and its backward failed far away:
        # "tuple indices must be integers or slices, not NoneType")
        (lambda x: ag.cat([x, x], axis=None), TypeError, "cat: axis must be an int, got None"),
        (lambda x: ag.stack([x, x], axis=None), TypeError, "stack: axis must be an int, got None"),
        (lambda x: ag.split(x, 1, axis=None), TypeError, "split: axis must be an int, got None"),
        (lambda x: ag.cat([x, x], axis=1.0), TypeError, "cat: axis must be an int, got 1.0"),
        (lambda x: ag.cat([x, x], axis=True), TypeError, "cat: axis must be an int, got True"),
        (lambda x: ag.split(x, 1, axis=(0,)), TypeError, r"split: axis must be an int, got \(0,\)"),
        (
            lambda x: ag.cat([x, x], axis=2),
            ValueError,
            "cat: axis 2 is out of range for a tensor with 2 dimensions",
        ),
        (
            lambda x: ag.stack([x, x], axis=-4),
            ValueError,
            "stack: axis -4 is out of range for the result with 3 dimensions",
        ),
        (
            lambda x: ag.split(x, 1, axis=-3),
            ValueError,
            "split: axis -3 is out of range for a tensor with 2 dimensions",
        ),
    ],
)
def test_cat_stack_and_split_check_their_axis_up_front(call, error, match):
    x = ag.ones(2, 2, requires_grad=True)
    with pytest.raises(error, match=match):
        call(x)


def test_cat_stack_and_split_take_negative_and_numpy_int_axes():
    x = ag.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    y = ag.cat([x, x * 2], axis=-1)
    assert y.shape == (2, 4)
    (y * ag.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    np.testing.assert_array_equal(x.grad, [[7.0, 10.0], [7.0, 10.0]])
    assert ag.stack([x, x], axis=np.int64(-1)).shape == (2, 2, 2)
    assert [c.shape for c in ag.split(x, 1, axis=-1)] == [(2, 1), (2, 1)]


def test_a_reduction_takes_a_0d_integer_array_as_its_axis():
    # (was numpy's "iteration over a 0-d array")
    x = ag.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert x.sum(axis=np.array(1)).data.tolist() == [3.0, 7.0]
    assert x.mean(axis=np.array(-2)).data.tolist() == [2.0, 3.0]
    with pytest.raises(TypeError, match="axis must be an int, a tuple of ints or None, got 1.0"):
        x.sum(axis=np.array(1.0))


# --- in-place operators -------------------------------------------------------------


def test_an_in_place_update_under_no_grad_gives_the_parameter_a_new_array():
    # (`w -= lr * w.grad` rebound w to a new tensor: the parameter never changed)
    lin = ag.nn.Linear(2, 1, seed=0)
    w = lin.weight
    old = w.data
    before = old.copy()
    lin(ag.ones(1, 2)).sum().backward()
    with ag.no_grad():
        w -= 0.5 * w.grad
        w *= 2
        w /= 4
        w += 1
        w **= 1
    assert w is lin.weight and w.requires_grad and w.is_leaf
    np.testing.assert_allclose(w.data, (before - 0.5 * 1.0) * 2 / 4 + 1, rtol=1e-6)
    assert w.data is not old and np.array_equal(old, before)  # (the old array untouched)
    assert w.dtype == np.float32 and w.grad is not None


def test_an_in_place_op_on_a_leaf_that_requires_grad_is_refused_under_grad_mode():
    x = ag.tensor([1.0], requires_grad=True)
    for op in ("+", "-", "*", "/", "**", "@"):
        with pytest.raises(
            RuntimeError,
            match=rf"in-place {re.escape(op)}= on a leaf tensor that requires grad, while "
            r"grad mode is on; update it under `with ag.no_grad\(\):`",
        ):
            exec(f"x {op}= ag.tensor([1.0])", {"x": x, "ag": ag})
    assert x.data.tolist() == [1.0] and x.is_leaf


def test_an_in_place_op_keeps_the_tensors_dtype_and_shape():
    i = ag.tensor([1, 2])
    old = i.data
    i += 3
    i *= np.int8(2)
    assert i.dtype == np.int64 and i.data.tolist() == [8, 10] and old.tolist() == [1, 2]
    f = ag.tensor([1.0, 2.0])
    f += np.array([0.5, 0.5])  # (float64 result, cast back: same_kind)
    assert f.dtype == np.float32 and f.data.tolist() == [1.5, 2.5]
    with pytest.raises(
        TypeError,
        match="in-place \\+=: the result's dtype float32 cannot be cast to the tensor's dtype int64",
    ):
        i += 1.5
    with pytest.raises(TypeError, match="in-place /=: the result's dtype float32 cannot be cast"):
        i /= 2
    with pytest.raises(
        ValueError,
        match=r"in-place \+=: the result's shape \(3, 2\) differs from the tensor's \(2,\)",
    ):
        f += ag.ones(3, 2)
    assert i.data.tolist() == [8, 10] and f.data.tolist() == [1.5, 2.5]
    m = ag.ones(2, 2)
    m @= ag.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert m.data.tolist() == [[4.0, 6.0], [4.0, 6.0]]


def test_an_in_place_op_on_a_non_leaf_or_with_an_operand_needing_grad_records_the_graph():
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    total = ag.tensor(0.0)
    start = total
    total += (x * x).sum()  # (a leaf without grad + a loss: the out-of-place op)
    assert total is not start and total.grad_fn is not None and start.item() == 0.0
    y = x * 3
    before = y
    y += x  # (a non-leaf: out of place, the graph goes on)
    assert y is not before
    (total + y.sum()).backward()
    np.testing.assert_array_equal(x.grad, [2.0 + 4.0, 4.0 + 4.0])


def test_assigning_data_takes_an_array_and_keeps_a_grad_tensor_floating_point():
    # (a list was taken, and failed later in an op or a send, far from the assignment)
    w = ag.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError, match=r"^Tensor.data must be a numpy array, not list"):
        w.data = [3.0, 4.0]  # type: ignore[assignment]
    with pytest.raises(TypeError, match="int64"):
        w.data = np.array([3, 4])
    np.testing.assert_array_equal(w.data, [1.0, 2.0])  # (unchanged by the refusals)
    w.data = np.zeros((2, 2), dtype=np.float32)  # (another shape and dtype: as torch)
    assert w.shape == (2, 2) and w.dtype == np.float32
    (w * 2).sum().backward()
    np.testing.assert_array_equal(w.grad, np.full((2, 2), 2.0))
    counts = ag.tensor([1.0])
    counts.data = np.array([7])  # (no grad: any numeric array)
    assert counts.item() == 7
    with pytest.raises(TypeError, match="must be bool or numeric, got dtype <U1"):
        counts.data = np.array(["a"])
    # a 0-d tensor's update is a numpy scalar; an array subclass (a masked array, a
    # matrix) would change what the ops compute: plain arrays, as Tensor() takes
    b = ag.tensor(1.0, requires_grad=True)
    (b * 3).backward()
    b.data = b.data - 0.1 * b.grad
    assert type(b.data) is np.ndarray and b.item() == pytest.approx(0.7)
    m = ag.tensor([1.0, 2.0])
    m.data = np.ma.array([1.0, 2.0], mask=[False, True])
    assert type(m.data) is np.ndarray and m.sum().item() == 3.0
