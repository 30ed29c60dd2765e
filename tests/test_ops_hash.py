"""fxrec::hash_bytes / hash_int64 (+ _multi) vs pyfarmhash and a pure-Python MurmurHash64A."""

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import oracles
from fxrec.ops import hash as hash_ops
from fxrec.ops.triton.hash import (
    hash_bytes_multi_triton,
    hash_bytes_triton,
    hash_int64_multi_triton,
    hash_int64_triton,
)

HAS_CUDA = torch.cuda.is_available()
# Launcher tests run the Triton kernels on CUDA when there is one, else under the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
HASH_TYPES = ("farm", "murmur")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

ORACLES = {"farm": oracles.farm64, "murmur": oracles.murmur64a}

# ---------------------------------------------------------------------------------------------
# inputs


def pack(strings: list[bytes], prefix: bytes = b"", suffix: bytes = b"", device="cpu"):
    """(values int8, offsets int64) of ``strings`` inside prefix + strings + suffix."""
    buf = prefix + b"".join(strings) + suffix
    values = torch.frombuffer(bytearray(buf), dtype=torch.int8) if buf else torch.empty(0, dtype=torch.int8)
    offsets = [len(prefix)]
    for s in strings:
        offsets.append(offsets[-1] + len(s))
    return values.to(device), torch.tensor(offsets, dtype=torch.int64, device=device)


def le_bytes(x: int) -> bytes:
    return x.to_bytes(8, "little", signed=True)


# Lengths at and around every farmhash class edge (0-16, 17-32, 33-64, > 64 with 64-byte chunks).
EDGE_LENGTHS = (0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 192, 193, 200)

byte_strings = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(EDGE_LENGTHS).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    # mostly high bytes: int8-negative values must hash as unsigned bytes
    st.lists(st.integers(128, 255), max_size=80).map(bytes),
)
string_batches = st.lists(byte_strings, max_size=24)
pads = st.binary(max_size=12)
int64s = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.sampled_from([INT64_MIN, INT64_MAX, 0, -1, 1]))


def random_strings(n: int, max_len: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(max_len + 1)) for _ in range(n)]


def every_length_strings() -> list[bytes]:
    rng = random.Random(0)
    return [rng.randbytes(n) for n in range(201)] + [bytes([0x80 | i for i in range(n)]) for n in range(0, 80, 3)]


# ---------------------------------------------------------------------------------------------
# values


PINNED = [  # SPEC §3.4: bytes -> (farm, murmur)
    ([0, 1, 2], -7736835464683084646, -4003751876240412087),
    ([1, 2, 3], -5546720800891377920, -1042754718167355375),
    ([0, 5, 5], -4442022684725028445, -5541886947548579749),
    ([5, 6, 7], -909183002746659612, 4434088491466393040),
]


@pytest.mark.parametrize("data, farm, murmur", PINNED)
def test_pinned_values(data, farm, murmur):
    values, offsets = pack([bytes(data)])
    assert torch.ops.fxrec.hash_bytes(values, offsets, "farm").tolist() == [farm]
    assert torch.ops.fxrec.hash_bytes(values, offsets, "murmur").tolist() == [murmur]
    assert (ORACLES["farm"](bytes(data)), ORACLES["murmur"](bytes(data))) == (farm, murmur)


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_hash_bytes_every_length(hash_type):
    strings = every_length_strings()
    values, offsets = pack(strings, prefix=b"\x07\xff", suffix=b"\x01")
    expected = [ORACLES[hash_type](s) for s in strings]
    assert torch.ops.fxrec.hash_bytes(values, offsets, hash_type).tolist() == expected


@given(strings=string_batches, prefix=pads, suffix=pads, hash_type=st.sampled_from(HASH_TYPES))
def test_hash_bytes_matches_oracle(strings, prefix, suffix, hash_type):
    values, offsets = pack(strings, prefix, suffix)
    values_before, offsets_before = values.clone(), offsets.clone()
    out = torch.ops.fxrec.hash_bytes(values, offsets, hash_type)
    assert out.dtype == torch.int64 and out.shape == (len(strings),)
    assert out.tolist() == [ORACLES[hash_type](s) for s in strings]
    assert torch.equal(values, values_before) and torch.equal(offsets, offsets_before)


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_hash_bytes_mixed_lengths_batch(hash_type):
    # Lanes finish their chunk loops at different rounds (CPU working-set compaction).
    strings = random_strings(3000, 700, seed=1) + [b"x" * 5000]
    values, offsets = pack(strings, prefix=b"abc")
    expected = [ORACLES[hash_type](s) for s in strings]
    assert torch.ops.fxrec.hash_bytes(values, offsets, hash_type).tolist() == expected


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_hash_bytes_in_cpu_steps(hash_type, monkeypatch):
    # The CPU kernel hashes big batches in steps of _CPU_STEP strings: make steps tiny.
    monkeypatch.setattr(hash_ops, "_CPU_STEP", 7)
    strings = every_length_strings()
    values, offsets = pack(strings, prefix=b"\x00")
    assert torch.ops.fxrec.hash_bytes(values, offsets, hash_type).tolist() == [ORACLES[hash_type](s) for s in strings]
    ids = torch.tensor([INT64_MIN, INT64_MAX, 0, -1] * 5).view(4, 5)
    expected = [ORACLES[hash_type](le_bytes(x)) for x in ids.flatten().tolist()]
    assert torch.ops.fxrec.hash_int64(ids, hash_type).flatten().tolist() == expected


@pytest.mark.parametrize("hash_type", HASH_TYPES)
@pytest.mark.parametrize("offset_start", [0, 5])
def test_hash_bytes_empty_batch(hash_type, offset_start):
    values = torch.arange(offset_start, dtype=torch.int8)
    offsets = torch.tensor([offset_start])
    out = torch.ops.fxrec.hash_bytes(values, offsets, hash_type)
    assert out.dtype == torch.int64 and out.shape == (0,)


@given(ids=st.lists(int64s, max_size=40), hash_type=st.sampled_from(HASH_TYPES))
def test_hash_int64_matches_oracle_and_hash_bytes(ids, hash_type):
    values = torch.tensor(ids, dtype=torch.int64)
    out = torch.ops.fxrec.hash_int64(values, hash_type)
    assert out.tolist() == [ORACLES[hash_type](le_bytes(x)) for x in ids]
    as_bytes = torch.ops.fxrec.hash_bytes(*pack([le_bytes(x) for x in ids]), hash_type)
    assert torch.equal(out, as_bytes)


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_hash_int64_keeps_shape(hash_type):
    ids = torch.tensor([[INT64_MIN, INT64_MAX, 0], [-1, 1, 12345]])
    out = torch.ops.fxrec.hash_int64(ids.t(), hash_type)  # non-contiguous input
    assert out.shape == (3, 2)
    assert out.t().flatten().tolist() == [ORACLES[hash_type](le_bytes(x)) for x in ids.flatten().tolist()]
    assert torch.ops.fxrec.hash_int64(torch.tensor(7), hash_type).shape == ()
    assert torch.ops.fxrec.hash_int64(torch.empty(0, 3, dtype=torch.int64), hash_type).shape == (0, 3)


features = st.lists(st.tuples(string_batches, pads, st.sampled_from(HASH_TYPES)), max_size=4)


@given(feats=features)
def test_hash_bytes_multi_equals_singles(feats):
    packed = [pack(strings, prefix) for strings, prefix, _ in feats]
    hash_types = [t for _, _, t in feats]
    outs = torch.ops.fxrec.hash_bytes_multi([v for v, _ in packed], [o for _, o in packed], hash_types)
    assert len(outs) == len(feats)
    for out, (values, offsets), hash_type in zip(outs, packed, hash_types):
        assert torch.equal(out, torch.ops.fxrec.hash_bytes(values, offsets, hash_type))


@given(feats=st.lists(st.tuples(st.lists(int64s, max_size=20), st.sampled_from(HASH_TYPES)), max_size=4))
def test_hash_int64_multi_equals_singles(feats):
    values = [torch.tensor(ids, dtype=torch.int64) for ids, _ in feats]
    hash_types = [t for _, t in feats]
    outs = torch.ops.fxrec.hash_int64_multi(values, hash_types)
    assert len(outs) == len(feats)
    for out, v, t in zip(outs, values, hash_types):
        assert torch.equal(out, torch.ops.fxrec.hash_int64(v, t))


# ---------------------------------------------------------------------------------------------
# validation


def test_bad_hash_type_raises_value_error():
    values, offsets = pack([b"abc"])
    ids = torch.tensor([1])
    calls = [
        lambda: torch.ops.fxrec.hash_bytes(values, offsets, "city"),
        lambda: torch.ops.fxrec.hash_int64(ids, "FARM"),
        lambda: torch.ops.fxrec.hash_bytes_multi([values], [offsets], ["md5"]),
        lambda: torch.ops.fxrec.hash_int64_multi([ids, ids], ["farm", "xx"]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"farm.*murmur"):
            call()


def test_wrong_dtypes_raise_type_error():
    values, offsets = pack([b"abc"])
    with pytest.raises(TypeError, match="values"):
        torch.ops.fxrec.hash_bytes(values.to(torch.uint8), offsets, "farm")
    with pytest.raises(TypeError, match="offsets"):
        torch.ops.fxrec.hash_bytes(values, offsets.int(), "farm")
    with pytest.raises(TypeError, match="values"):
        torch.ops.fxrec.hash_int64(torch.tensor([1], dtype=torch.int32), "murmur")
    with pytest.raises(TypeError, match=r"values\[1\]"):
        torch.ops.fxrec.hash_int64_multi([torch.tensor([1]), torch.tensor([1.0])], ["farm", "farm"])


def test_bad_offsets_and_lists_raise_value_error():
    values, _ = pack([b"abcdef"])
    for offsets in ([0, 4, 2], [0, 7], [-1, 2], []):
        with pytest.raises(ValueError, match="offsets"):
            torch.ops.fxrec.hash_bytes(values, torch.tensor(offsets, dtype=torch.int64), "farm")
    with pytest.raises(ValueError, match="one entry per feature"):
        torch.ops.fxrec.hash_bytes_multi([values], [], ["farm"])
    with pytest.raises(ValueError, match="one entry per feature"):
        torch.ops.fxrec.hash_int64_multi([torch.tensor([1])], ["farm", "murmur"])


# ---------------------------------------------------------------------------------------------
# torch.library contract


def _opcheck_cases():
    v, o = pack([b"", b"ab", b"hello world", bytes(range(70)), b"\xff" * 20], prefix=b"zz")
    ev, eo = pack([])
    ids = torch.tensor([[INT64_MIN, -1], [0, INT64_MAX]])
    return [
        (torch.ops.fxrec.hash_bytes.default, (v, o, "farm")),
        (torch.ops.fxrec.hash_bytes.default, (v, o, "murmur")),
        (torch.ops.fxrec.hash_bytes.default, (ev, eo, "farm")),
        (torch.ops.fxrec.hash_int64.default, (ids, "farm")),
        (torch.ops.fxrec.hash_int64.default, (torch.empty(0, dtype=torch.int64), "murmur")),
        (torch.ops.fxrec.hash_bytes_multi.default, ([v, ev], [o, eo], ["murmur", "farm"])),
        (torch.ops.fxrec.hash_bytes_multi.default, ([], [], [])),
        (torch.ops.fxrec.hash_int64_multi.default, ([ids, ids[0]], ["farm", "murmur"])),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU without a GPU): tiny inputs, bit-identical to the CPU kernel

TINY_STRINGS = [bytes([(7 * i + n) % 256 for i in range(n)]) for n in (0, 1, 3, 4, 7, 8, 16, 17, 32, 33, 64, 65, 129)]


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_triton_hash_bytes_equals_cpu(hash_type):
    values, offsets = pack(TINY_STRINGS, prefix=b"\x80\x81\x82")
    expected = torch.ops.fxrec.hash_bytes(values, offsets, hash_type)
    out = hash_bytes_triton(values.to(TRITON_DEVICE), offsets.to(TRITON_DEVICE), hash_type)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_triton_hash_bytes_one_length_class_per_block(hash_type):
    # Blocks whose strings all fall in one farmhash length class skip the other classes' code.
    for string in TINY_STRINGS:
        values, offsets = pack([string, string[::-1], bytes(len(string))])
        out = hash_bytes_triton(values.to(TRITON_DEVICE), offsets.to(TRITON_DEVICE), hash_type)
        assert torch.equal(out.cpu(), torch.ops.fxrec.hash_bytes(values, offsets, hash_type)), len(string)


def test_triton_hash_bytes_multi_equals_cpu():
    feats = [pack(TINY_STRINGS[::2]), pack([]), pack(TINY_STRINGS[1::2], prefix=b"q"), pack([b"\xfe" * 9])]
    hash_types = ["farm", "murmur", "murmur", "farm"]
    outs = hash_bytes_multi_triton(
        [v.to(TRITON_DEVICE) for v, _ in feats], [o.to(TRITON_DEVICE) for _, o in feats], hash_types
    )
    for out, (v, o), t in zip(outs, feats, hash_types):
        assert torch.equal(out.cpu(), torch.ops.fxrec.hash_bytes(v, o, t))


@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_triton_hash_int64_equals_cpu(hash_type):
    ids = torch.tensor([[INT64_MIN, INT64_MAX, 0], [-1, 1, 98765432123]])
    out = hash_int64_triton(ids.to(TRITON_DEVICE), hash_type)
    assert torch.equal(out.cpu(), torch.ops.fxrec.hash_int64(ids, hash_type))


def test_triton_hash_int64_multi_equals_cpu():
    values = [torch.tensor([INT64_MIN, -1, 0]), torch.empty(0, dtype=torch.int64), torch.tensor([[5, INT64_MAX]])]
    hash_types = ["murmur", "farm", "farm"]
    outs = hash_int64_multi_triton([v.to(TRITON_DEVICE) for v in values], hash_types)
    for out, v, t in zip(outs, values, hash_types):
        assert torch.equal(out.cpu(), torch.ops.fxrec.hash_int64(v, t))


# ---------------------------------------------------------------------------------------------
# CUDA == CPU


@pytest.mark.gpu
@given(feats=features)
def test_cuda_hash_bytes_equals_cpu(feats):
    for strings, prefix, hash_type in feats:
        values, offsets = pack(strings, prefix)
        out = torch.ops.fxrec.hash_bytes(values.cuda(), offsets.cuda(), hash_type)
        assert torch.equal(out.cpu(), torch.ops.fxrec.hash_bytes(values, offsets, hash_type))
    packed = [pack(strings, prefix) for strings, prefix, _ in feats]
    hash_types = [t for _, _, t in feats]
    outs = torch.ops.fxrec.hash_bytes_multi([v.cuda() for v, _ in packed], [o.cuda() for _, o in packed], hash_types)
    for out, (v, o), t in zip(outs, packed, hash_types):
        assert torch.equal(out.cpu(), torch.ops.fxrec.hash_bytes(v, o, t))


@pytest.mark.gpu
@given(feats=st.lists(st.tuples(st.lists(int64s, max_size=20), st.sampled_from(HASH_TYPES)), max_size=4))
def test_cuda_hash_int64_equals_cpu(feats):
    values = [torch.tensor(ids, dtype=torch.int64) for ids, _ in feats]
    hash_types = [t for _, t in feats]
    for v, t in zip(values, hash_types):
        assert torch.equal(torch.ops.fxrec.hash_int64(v.cuda(), t).cpu(), torch.ops.fxrec.hash_int64(v, t))
    outs = torch.ops.fxrec.hash_int64_multi([v.cuda() for v in values], hash_types)
    for out, v, t in zip(outs, values, hash_types):
        assert torch.equal(out.cpu(), torch.ops.fxrec.hash_int64(v, t))


@pytest.mark.gpu
@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_cuda_one_million_strings_equal_cpu(hash_type):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 201, (1_000_000,), generator=g)
    lengths[::1000] = torch.randint(0, 3000, (1000,), generator=g)  # some long strings
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = 3 + lengths.cumsum(0)
    offsets[0] = 3
    values = torch.randint(-128, 128, (int(offsets[-1]) + 2,), dtype=torch.int8, generator=g)
    expected = torch.ops.fxrec.hash_bytes(values, offsets, hash_type)
    assert torch.equal(torch.ops.fxrec.hash_bytes(values.cuda(), offsets.cuda(), hash_type).cpu(), expected)
    halves = [offsets[: 500_001], offsets[500_000:]]
    outs = torch.ops.fxrec.hash_bytes_multi([values.cuda()] * 2, [h.cuda() for h in halves], [hash_type, "farm"])
    assert torch.equal(outs[0].cpu(), expected[:500_000])
    assert torch.equal(outs[1].cpu(), torch.ops.fxrec.hash_bytes(values, halves[1], "farm"))


@pytest.mark.gpu
@pytest.mark.parametrize("hash_type", HASH_TYPES)
def test_cuda_one_million_ids_equal_cpu(hash_type):
    ids = torch.randint(INT64_MIN, INT64_MAX, (1000, 1000), generator=torch.Generator().manual_seed(0))
    ids[0, :4] = torch.tensor([INT64_MIN, INT64_MAX, 0, -1])
    expected = torch.ops.fxrec.hash_int64(ids, hash_type)
    assert torch.equal(torch.ops.fxrec.hash_int64(ids.cuda(), hash_type).cpu(), expected)
    outs = torch.ops.fxrec.hash_int64_multi([ids.cuda(), ids[:10].cuda()], [hash_type, hash_type])
    assert torch.equal(outs[0].cpu(), expected) and torch.equal(outs[1].cpu(), expected[:10])
