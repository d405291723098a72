"""PresentMap (ckpt/present.py) against a naive per-page set, on random histories."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.present import PresentMap

P = 4096
N = 160


def runs(pages: set[int]) -> list[tuple[int, int]]:
    return [(p * P, 1) for p in sorted(pages)]


def pages_of(rs: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for a, n in rs:
        out |= set(range(a // P, a // P + n))
    return out


page_sets = st.sets(st.integers(0, N - 1), max_size=60)
ranges = st.tuples(st.integers(0, N - 1), st.integers(1, N)).map(
    lambda t: (min(t), max(t[0] + 1, t[1]))
)
op = st.one_of(
    st.tuples(st.just("replace"), ranges, page_sets),
    st.tuples(st.just("update"), page_sets, page_sets),
)


@settings(max_examples=300, deadline=None)
@given(initial=page_sets, ops=st.lists(op, max_size=12), query=ranges)
def test_present_map_matches_naive_model(initial, ops, query):
    truth = set(initial)
    pm = PresentMap(runs(truth))
    for kind, a, b in ops:
        if kind == "replace":
            s, e = a
            new = {p for p in b if s <= p < e}
            truth = (truth - set(range(s, e))) | new
            pm.replace(s * P, e * P, runs(new))
        else:
            written, now = a, a & b
            truth = (truth - written) | now
            pm.update(runs(written), runs(now))
    s, e = query
    assert pages_of(pm.within(s * P, e * P)) == {p for p in truth if s <= p < e}
