"""planner: storages, extents, packing into chunks, owner assignment."""
import pytest
import torch

from pyckpt import metaguard, planner
from pyckpt.errors import UnsupportedStateError

MB = 1 << 20


def test_ten_thousand_small_tensors_pack_into_few_chunks():
    ts = [torch.full((10,), float(i)) for i in range(10_000)]
    d = planner.describe(ts, [str(i) for i in range(10_000)])
    chunks = planner.pack(d.storages, 4 * MB)
    assert len(d.storages) == 10_000
    assert len(chunks) == 1  # 400 KB of data
    assert sum(c.raw_len for c in chunks) == 10_000 * 40


def test_large_storage_is_split_and_pieces_tile_it():
    big = torch.zeros(10 * MB // 4)  # 10 MiB of float32
    d = planner.describe([big], ["big"])
    chunks = planner.pack(d.storages, 4 * MB)
    assert [c.raw_len for c in chunks] == [4 * MB, 4 * MB, 2 * MB]
    pieces = d.storages[0].pieces
    assert [(p.storage_offset, p.nbytes) for p in pieces] == [(0, 4 * MB), (4 * MB, 4 * MB), (8 * MB, 2 * MB)]
    assert d.addr(0) + pieces[1].storage_offset == big.data_ptr() + 4 * MB and pieces[1].src_device == -1


def test_chunks_hold_one_element_size():
    ts = [torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int8), torch.zeros(3, dtype=torch.float16)]
    d = planner.describe(ts, ["a", "b", "c"])
    chunks = planner.pack(d.storages, MB)
    assert sorted(c.elem_size for c in chunks) == [1, 2, 8]
    for c in chunks:
        assert {d.storages[p.storage].elem_size for p in c.pieces} == {c.elem_size}


def test_views_of_one_storage_become_one_storage_with_its_used_extent():
    base = torch.arange(100, dtype=torch.float32)
    a, b = base[40:50], base[60:80:2]
    d = planner.describe([a, b], ["a", "b"])
    assert len(d.storages) == 1
    s = d.storages[0]
    # extent starts at byte 160 (aligned to 16) and ends after element 78
    assert s.nbytes == (79 - 40) * 4
    assert d.addr(s.id) == base.data_ptr() + 160
    assert d.entries[0]["storage_offset"] == 0 and d.entries[1]["storage_offset"] == 20
    assert d.entries[1]["stride"] == [2] and d.entries[1]["shape"] == [10]


def test_unaligned_view_extent_keeps_offsets_whole_elements():
    base = torch.arange(20, dtype=torch.float64)
    d = planner.describe([base[3:5]], ["v"])
    assert d.storages[0].nbytes % 8 == 0
    assert d.entries[0]["storage_offset"] * 8 + d.addr(0) == base[3:5].data_ptr()


def test_empty_and_scalar_tensors():
    d = planner.describe([torch.zeros(0, 3), torch.tensor(7), torch.zeros(0)], ["e", "s", "e2"])
    sizes = sorted(s.nbytes for s in d.storages)
    assert sizes == [0, 0, 8]
    assert d.entries[1]["shape"] == [] and d.entries[1]["nbytes"] == 8
    chunks = planner.pack(d.storages, MB)
    assert sum(len(c.pieces) for c in chunks) == 1


def test_requires_grad_is_recorded():
    p = torch.nn.Parameter(torch.ones(2))
    d = planner.describe([p, torch.ones(1)], ["p", "q"])
    assert d.entries[0]["requires_grad"] is True and d.entries[1]["requires_grad"] is False


def test_as_state_dict_records_parameters_as_state_dict_gives_them_and_is_not_reused_across():
    """The transparent layer passes parameters undetached and records them as ``state_dict()`` would;
    a description made with the other setting records other flags, so it is never reused for this one."""
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3), requires_grad=False)
    d = planner.describe([p, q, torch.ones(1)], ["p", "q", "r"], as_state_dict=True)
    assert [e["requires_grad"] for e in d.entries] == [False, False, False] and d.keeps[0] is p
    again = planner.describe([p, q, torch.ones(1)], ["p", "q", "r"], reuse=d, as_state_dict=True)
    assert again.entries is d.entries and again.as_state_dict
    other = planner.describe([p, q, torch.ones(1)], ["p", "q", "r"], reuse=d)
    assert other.entries is not d.entries and [e["requires_grad"] for e in other.entries] == [True, False, False]
    back = planner.describe([p, q, torch.ones(1)], ["p", "q", "r"], reuse=other, as_state_dict=True)
    assert back.entries is not other.entries and not any(e["requires_grad"] for e in back.entries)


def test_conjugate_view_is_materialized():
    import ctypes

    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex128)
    d = planner.describe([z.conj()], ["z"])
    s = d.storages[0]
    raw = torch.frombuffer(bytearray(ctypes.string_at(d.addr(s.id), s.nbytes)), dtype=torch.complex128)
    assert torch.equal(raw, torch.tensor([1 - 2j, 3 + 1j], dtype=torch.complex128))


def test_owners_balance_bytes_and_are_deterministic():
    ts = [torch.zeros(n) for n in (1000, 10, 10, 500, 490, 3, 3)]
    d = planner.describe(ts, [str(i) for i in range(len(ts))])
    owners = planner.assign_owners(d.storages, 2)
    assert owners == planner.assign_owners(planner.describe(ts, [""] * len(ts)).storages, 2)
    load = [sum(s.nbytes for s in d.storages if owners[s.id] == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= 40 * 4
    assert planner.assign_owners(d.storages, 1) == [0] * len(ts)


def test_unsupported_tensor_kinds_name_the_key():
    import pytest
    from pyckpt.errors import UnsupportedStateError

    with pytest.raises(UnsupportedStateError) as ei:
        planner.describe([torch.zeros(2, 2).to_sparse()], ["m/sparse"])
    assert ei.value.key == "m/sparse"


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized and nested tensors warn that they are beta
@pytest.mark.parametrize("kind", ["sparse", "quantized", "meta", "nested"])
def test_an_unsupported_tensor_is_refused_saying_what_it_is_and_what_to_save_instead(kind):
    """A quantized or nested tensor has a strided layout: its refusal must not say the layout is the trouble."""
    t = {"sparse": lambda: torch.eye(3).to_sparse(),
         "quantized": lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8),
         "meta": lambda: torch.empty(3, device="meta"),
         "nested": lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])}[kind]()
    advice = {"sparse": ".to_dense()", "quantized": ".dequantize()", "meta": "no data", "nested": ".unbind()"}
    with pytest.raises(UnsupportedStateError) as ei:
        planner.describe([t], ["m/x"])
    msg = str(ei.value)
    assert ei.value.key == "m/x" and "'m/x'" in msg
    assert kind in msg and advice[kind] in msg
    assert "layout torch.strided" not in msg


# -- reuse of an earlier description (a training job saves the same tensors every time) -----------
def _layout(d):
    return [(s.id, s.nbytes, s.elem_size, d.addr(s.id), [(p.storage_offset, p.nbytes) for p in s.pieces])
            for s in d.storages]


def test_same_layout_reuses_the_description_with_this_calls_addresses_and_tensors():
    base = torch.arange(64, dtype=torch.float32)
    ts = [base[:16], base[16:48].view(4, 8), torch.ones(3, dtype=torch.int64)]
    first = planner.describe(ts, ["a", "b", "c"])
    moved = torch.arange(64, dtype=torch.float32) * 2  # the same layout in other memory (a buffer copied anew)
    again = [moved[:16], moved[16:48].view(4, 8), ts[2]]
    second = planner.describe(again, ["a", "b", "c"], reuse=first)
    assert second.entries is first.entries and second.storages is first.storages
    assert [second.addr(0), second.addr(1)] == [moved.data_ptr(), ts[2].data_ptr()]
    assert [first.addr(0), first.addr(1)] == [base.data_ptr(), ts[2].data_ptr()]  # the first save's own
    assert second.keeps[1] is ts[2]  # the caller's tensor keeps its memory alive: nothing copied
    assert second.keeps[0].untyped_storage().data_ptr() == moved.data_ptr()


def _changed_layouts():
    """(name, tensors before, tensors after): each differs from the first in one thing a saved
    entry or storage depends on."""
    base = torch.arange(64, dtype=torch.float32)
    other = torch.arange(64, dtype=torch.float32)
    p = torch.nn.Parameter(torch.ones(4))
    return [
        ("two storages, then one", [base[:8], other[8:16]], [base[:8], base[8:16]]),
        ("shape", [base[:16]], [base[:16].view(4, 4)]),
        ("shape only", [base.as_strided((4, 1), (1, 1))], [base.as_strided((1, 4), (1, 1))]),  # same bytes, strides
        ("stride", [base[:16].view(4, 4)], [base[:16].view(4, 4).t()]),
        ("offset", [base[:16]], [base[8:24]]),
        ("dtype", [base[:16]], [base[:16].view(torch.int32)]),
        ("requires_grad", [p], [p.detach()]),
        ("one storage shared, then two", [base[:8], base[8:16]], [base[:8], other[8:16]]),
        ("one tensor more", [base[:16]], [base[:16], other[:4]]),
        ("order", [base[:16], other[:8]], [other[:8], base[:16]]),
    ]


def test_any_change_of_layout_describes_afresh():
    for name, before, after in _changed_layouts():
        first = planner.describe(before, [str(i) for i in range(len(before))])
        second = planner.describe(after, [str(i) for i in range(len(after))], reuse=first)
        fresh = planner.describe(after, [str(i) for i in range(len(after))])
        assert second.storages is not first.storages, name
        assert second.entries == fresh.entries, name
        assert _layout(second) == _layout(fresh), name


def test_reuse_keeps_what_a_fresh_description_would_save():
    """A reused layout must still save the bytes the long path saves: a conjugate or negative view
    materialized, a tensor in an autograd graph detached (the short check hands those to it)."""
    c = torch.randn(8, dtype=torch.complex64)
    p = torch.nn.Parameter(torch.randn(8))
    x = torch.randn(8, dtype=torch.complex64)
    cases = [("conjugate", [c], [c.conj()]),
             ("negative view", [x.imag.clone()], [x.conj().imag]),
             ("graph", [p * 3], [p * 2])]
    for name, before, after in cases:
        first = planner.describe(before, ["a"])
        second = planner.describe(after, ["a"], reuse=first)
        fresh = planner.describe(after, ["a"])
        assert second.entries == fresh.entries, name
        k = second.keeps[0]
        assert k.grad_fn is None and not k.is_conj() and not k.is_neg(), name
        assert torch.equal(k, fresh.keeps[0]), name


def test_reuse_never_hides_an_unsupported_tensor():
    dense = torch.ones(4, 4)
    first = planner.describe([dense], ["w"])
    for later in (dense.to_sparse(), torch.ones(4, 4, device="meta")):
        with pytest.raises(UnsupportedStateError, match="'w'"):
            planner.describe([later], ["w"], reuse=first)


def test_reuse_with_empty_tensors_keeps_them_apart():
    """Zero-byte storages all sit at address 0 and are never merged, reused or not."""
    ts = [torch.empty(0), torch.empty(0), torch.ones(2)]
    first = planner.describe(ts, ["a", "b", "c"])
    again = [torch.empty(0), torch.empty(0), torch.ones(2)]
    second = planner.describe(again, ["a", "b", "c"], reuse=first)
    assert len(second.storages) == 3
    assert [e["storage"] for e in second.entries] == [0, 1, 2]
    assert second.keeps[2] is again[2]


def test_reuse_of_a_section_without_tensors():
    first = planner.describe([], [])
    second = planner.describe([], [], reuse=first)
    assert second.storages is first.storages and second.storages == [] and second.keeps == []


def _views(storages, picks):
    return [storages[s][o:o + n].view(-1) for s, o, n in picks]


def test_reuse_proves_the_grouping_of_many_views_from_addresses():
    """200 views of 40 storages in shuffled order: the same views of new memory reuse the layout with
    the new addresses; the same shapes and offsets with two views' storages exchanged (or two storages
    made one) are described afresh, equal to a fresh description."""
    import random

    rng = random.Random(3)
    picks = [(rng.randrange(40), 8 * rng.randrange(8), 8) for _ in range(200)]
    picks += [(s, 0, 8) for s in range(40)]  # every storage has a view at offset 0
    rng.shuffle(picks)
    paths = [str(i) for i in range(len(picks))]
    old = [torch.randn(72) for _ in range(40)]
    first = planner.describe(_views(old, picks), paths)
    new = [t.clone() for t in old]
    second = planner.describe(_views(new, picks), paths, reuse=first)
    assert second.storages is first.storages
    assert sorted(second.bases) == sorted(t.data_ptr() for t in new)
    assert [second.keeps[e["storage"]].untyped_storage().data_ptr() for e in second.entries] == \
        [new[s].data_ptr() for s, _, _ in picks]
    a = next(i for i, p in enumerate(picks) if p[0] != picks[0][0] and p[1:] == picks[0][1:])
    swapped = list(picks)
    swapped[0], swapped[a] = (picks[a][0],) + picks[0][1:], (picks[0][0],) + picks[a][1:]
    merged = [(0 if s == 1 else s, o, n) for s, o, n in picks]
    for name, changed in (("two views exchanged storages", swapped), ("two storages made one", merged)):
        again = planner.describe(_views(new, changed), paths, reuse=first)
        fresh = planner.describe(_views(new, changed), paths)
        assert again.storages is not first.storages, name
        assert again.entries == fresh.entries and _layout(again) == _layout(fresh), name


# -- from the second reuse on, metadata is compared by the guard made at the first (metaguard.py) -----
def _reused_once(before):
    """``before`` described, then reused with the same tensors (its guard is made then)."""
    paths = [str(i) for i in range(len(before))]
    first = planner.describe(before, paths)
    second = planner.describe(before, paths, reuse=first)
    assert second.storages is first.storages
    return second


@pytest.mark.parametrize("guarded", [True, False], ids=["guard", "attributes"])
def test_any_change_of_layout_describes_afresh_at_later_reuses(guarded, monkeypatch):
    if not guarded:  # a torch without usable guards: the attributes are read from Python
        monkeypatch.setattr(metaguard, "_USABLE", False)
    c = torch.randn(8, dtype=torch.complex64)
    x = torch.randn(8, dtype=torch.complex64)
    materialized = [("conjugate", [c], [c.conj()]), ("negative view", [x.imag.clone()], [x.conj().imag])]
    for name, before, after in _changed_layouts() + materialized:
        second = _reused_once(before)
        assert bool(second.columns.guard) is guarded, name
        paths = [str(i) for i in range(len(after))]
        third = planner.describe(after, paths, reuse=second)
        fresh = planner.describe(after, paths)
        if (name, before, after) not in materialized:  # (a materialized copy may keep the layout, in new memory)
            assert third.storages is not second.storages, name
            assert _layout(third) == _layout(fresh), name
        assert third.entries == fresh.entries, name
        assert all(not k.is_conj() and not k.is_neg() for k in third.keeps), name
        assert [torch.equal(k, f) for k, f in zip(third.keeps, fresh.keeps)] == [True] * len(fresh.keeps), name
        unchanged = planner.describe(before, [str(i) for i in range(len(before))], reuse=second)
        assert unchanged.storages is second.storages, name  # and the same tensors still reuse it


def test_a_guard_that_refuses_matching_tensors_is_dropped_and_the_layout_still_reused():
    """The guard refuses a list naming one tensor object twice; its refusal is checked from Python,
    not trusted, and the guard is not asked again."""
    a = torch.ones(4)
    first = planner.describe([a, a], ["x", "y"])
    second = planner.describe([a, a], ["x", "y"], reuse=first)
    assert second.columns.guard  # made from these tensors at the first reuse
    third = planner.describe([a, a], ["x", "y"], reuse=second)
    assert third.storages is first.storages and third.bases == [a.data_ptr()]
    assert first.columns.guard is False
