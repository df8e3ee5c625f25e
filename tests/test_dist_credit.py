"""The credit arithmetic of the completion protocol: shares always add up exactly."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actorgrad import wire
from actorgrad.dist.backward import (
    MAX_CREDIT_EXP,
    InitiatorRun,
    _check_credit,
    _credit_out,
    split_credit,
)
from actorgrad.errors import ProtocolError


def value(c: tuple[int, int]) -> Fraction:
    return Fraction(c[0], 1 << c[1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12))
def test_repeated_splits_add_up_to_one_and_no_share_is_zero(fanouts):
    """Split the credit along a random path of fan-outs; the total stays exactly 1."""
    shares = [(1, 0)]
    for k in fanouts:
        first, *rest = shares
        parts = split_credit(first, k)
        assert len(parts) == k
        assert all(num > 0 for num, _ in parts)
        assert sum(map(value, parts)) == value(first)
        shares = parts + rest
    assert sum(map(value, shares)) == 1


def test_a_single_message_keeps_the_whole_credit():
    assert split_credit((3, 5), 1) == [(3, 5)]
    assert split_credit((1, 0), 2) == [(1, 1), (1, 1)]


async def test_initiator_completes_exactly_when_every_share_is_back():
    run = InitiatorRun(1, 1)
    shares = split_credit((1, 0), 3)
    shares = split_credit(shares[0], 5) + shares[1:]
    for share in shares[:-1]:
        run.add_credit(share)
        assert not run.done.done()
    run.add_credit(shares[-1])
    assert run.done.done()


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=3000), st.data())
def test_a_credit_travels_exactly_whatever_its_size(exp, data):
    # (a numerator past 63 bits did not fit msgpack's ints: the message carrying it
    # could not be encoded; it travels as its bytes now)
    num = data.draw(st.integers(min_value=1, max_value=1 << exp))
    body = wire.encode_frame([0], list(_credit_out((num, exp))))
    got_num, got_exp = wire.decode_frame(wire.join_chunks(body)).body()
    assert got_exp == exp and _check_credit(got_num, got_exp) == num


def test_the_largest_credit_a_message_may_carry_is_taken():
    # All of the credit at the largest exponent: 2**MAX_CREDIT_EXP, as its bytes (one
    # more than MAX_CREDIT_EXP // 8 of them), is in range.
    whole = 1 << MAX_CREDIT_EXP
    num, exp = _credit_out((whole, MAX_CREDIT_EXP))
    assert len(num) == MAX_CREDIT_EXP // 8 + 1
    assert _check_credit(num, exp) == whole


def test_split_shares_are_in_lowest_terms():
    # (an even numerator halves with its exponent: each split adds only the bits it
    # needs, and a credit gathered from shares splits as the fraction it is)
    assert split_credit((2, 1), 2) == [(1, 1), (1, 1)]
    assert split_credit((6, 3), 3) == [(3, 3), (3, 4), (3, 4)]
    assert split_credit((4, 2), 4) == [(1, 2)] * 4


def test_a_credit_out_of_range_or_too_long_is_malformed():
    assert _check_credit(8, 3) == 8 and _check_credit(1, 0) == 1  # (all of it: in range)
    too_long = b"\x01" * (MAX_CREDIT_EXP // 8 + 2)
    for num, exp in [(0, 3), (9, 3), (-1, 3), (too_long, MAX_CREDIT_EXP), (1, MAX_CREDIT_EXP + 1)]:
        with pytest.raises(ProtocolError, match="malformed credit"):
            _check_credit(num, exp)
