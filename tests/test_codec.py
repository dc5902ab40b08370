"""Control-plane codec: typed round trips of @message dataclasses and clear errors.

Tags are class names shared by the whole process, hence the Demo prefix."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

import msgpack
import pytest

from transport.codec import CodecError, decode, encode, message


@message
class DemoPhase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@message
class DemoPriority(enum.IntEnum):
    LOW = 0
    HIGH = 1


@message
@dataclass(frozen=True)
class DemoSeqPlan:
    seq_id: int
    token_ids: list[int]
    block_table: tuple[int, ...]
    phase: DemoPhase
    priority: DemoPriority = DemoPriority.LOW


@message
@dataclass
class DemoStepPlan:
    step: int
    seqs: list[DemoSeqPlan]
    tokens_per_rank: dict[int, list[int]]
    by_name: dict[str, tuple[int, str]]
    finished: list[int] = field(default_factory=list)
    note: str | None = None
    temperature: float = 0.7
    greedy: bool = False
    blob: bytes = b""
    nested: list[tuple[DemoSeqPlan, ...]] = field(default_factory=list)


@message
@dataclass
class DemoDerived:
    rows: list[int]
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = sum(self.rows)


@message
@dataclass
class DemoBox:
    value: object


def example_plan() -> DemoStepPlan:
    seqs = [
        DemoSeqPlan(i, [1, 2, i], (i, i + 1), DemoPhase.DECODE, DemoPriority.HIGH) for i in range(3)
    ]
    return DemoStepPlan(
        step=7,
        seqs=seqs,
        tokens_per_rank={0: [3, 3, 2], 1: []},
        by_name={"a0": (0, "x"), "": (-1, "")},
        finished=[4, 5],
        note=None,
        temperature=-1.25e-3,
        greedy=True,
        blob=b"\x00\xff\x80",
        nested=[(seqs[0],), ()],
    )


def test_round_trip_keeps_types() -> None:
    plan = example_plan()
    got = decode(encode(plan), DemoStepPlan)
    assert got == plan
    assert type(got.seqs[0].block_table) is tuple
    assert type(got.seqs[0].priority) is DemoPriority  # IntEnum must not decay to int
    assert got.seqs[0].phase is DemoPhase.DECODE
    assert type(got.nested[0]) is tuple and got.nested[1] == ()
    assert list(got.tokens_per_rank) == [0, 1]  # int keys stay ints
    assert isinstance(got.blob, bytes) and got.greedy is True


def test_derived_fields_are_recomputed() -> None:
    got = decode(encode(DemoDerived([1, 2, 3])), DemoDerived)
    assert got.rows == [1, 2, 3] and got.total == 6


def test_duplicate_name_is_an_error() -> None:
    with pytest.raises(CodecError, match="DemoSeqPlan"):

        @message
        @dataclass
        class DemoSeqPlan:  # same tag as the module-level DemoSeqPlan
            x: int


def test_message_needs_a_dataclass() -> None:
    with pytest.raises(TypeError, match="dataclass"):
        message(int)


def test_unregistered_values_are_refused() -> None:
    @dataclass
    class Plain:
        x: int

    class Color(enum.Enum):
        RED = 1

    with pytest.raises(CodecError, match="@message"):
        encode(Plain(1))
    with pytest.raises(CodecError, match="Plain.*@message"):
        encode(DemoBox([Plain(1)]))
    with pytest.raises(CodecError, match="Color.*not registered"):
        encode(DemoSeqPlan(0, [], (), Color.RED))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="set"):
        encode(DemoBox({1, 2}))
    with pytest.raises(CodecError, match="DemoBox"):
        encode(DemoBox(2**70))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x93\x01", b"\xff" * 9, b"\x92\xd4\x07\x00\x01"],
    ids=["empty", "reserved-byte", "truncated-array", "garbage", "unknown-ext-code"],
)
def test_malformed_bytes(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


def test_plain_values_round_trip() -> None:
    values = [None, True, 0, -(2**63), 2**64 - 1, 1.5, "ü", b"", [], {}, {1: {"k": [()]}}]
    for value in values:
        assert decode(encode(DemoBox(value)), DemoBox).value == value


def test_truncated_and_trailing_bytes() -> None:
    data = encode(example_plan())
    with pytest.raises(CodecError, match="malformed"):
        decode(data[:-4])
    with pytest.raises(CodecError, match="malformed"):
        decode(data + b"\x00")


def test_unknown_tag_names_the_type() -> None:
    unknown = msgpack.packb([msgpack.ExtType(1, b"NoSuchMessage"), 1, 2])
    with pytest.raises(CodecError, match="NoSuchMessage"):
        decode(unknown)


def test_field_count_mismatch_reports_versions() -> None:
    stale = msgpack.packb([msgpack.ExtType(1, b"DemoDerived"), [1], "extra"])
    with pytest.raises(CodecError, match="different versions"):
        decode(stale)


def test_top_level_must_be_a_message() -> None:
    with pytest.raises(CodecError, match="not a @message"):
        decode(msgpack.packb([1, 2, 3]))
    with pytest.raises(CodecError, match="expected a DemoStepPlan"):
        decode(encode(DemoDerived([])), DemoStepPlan)


def test_registry_is_by_class_name() -> None:
    assert dataclasses.is_dataclass(message(DemoSeqPlan))  # re-registering the same class is fine
