"""Wire format: round trips and the typed refusal of every kind of malformed frame."""

from __future__ import annotations

import struct

import orjson
import pytest
import torch

from fedsea_shared.protocol import (
    Close,
    ErrorCode,
    Hello,
    ProtocolError,
    Step,
    decode,
    encode,
    tensor_meta,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_step_round_trip_is_bit_exact(dtype):
    t = torch.randn(7, 64).to(dtype)
    frame = encode(Step(rows=[(3, 11, 5), (9, 40, 2)], tensor=tensor_meta(t)), t)
    msg, got = decode(frame)
    assert isinstance(msg, Step) and msg.rows == [(3, 11, 5), (9, 40, 2)] and msg.sids == [3, 9]
    assert got.dtype == dtype and torch.equal(got, t)
    assert [x.shape[0] for x in msg.split(got)] == [5, 2] and torch.equal(msg.split(got)[1], t[5:])
    # The frame is the header plus exactly the tensor's bytes: nothing else rides along.
    (n,) = struct.unpack_from(">I", frame)
    assert len(frame) == 4 + n + t.numel() * t.element_size()


def test_header_only_message_round_trip():
    msg, tensor = decode(encode(Hello(num_layers=30, hidden_size=576, layers=(2, 28), dtype="float16")))
    assert isinstance(msg, Hello) and msg.layers == (2, 28) and tensor is None


def raw(header: dict, payload: bytes = b"") -> bytes:
    h = orjson.dumps(header)
    return struct.pack(">I", len(h)) + h + payload


STEP = {"type": "step", "rows": [[1, 0, 1]], "tensor": {"dtype": "float32", "shape": [1, 4]}}


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"", ErrorCode.BAD_FRAME),
        (b"\x00\x00", ErrorCode.BAD_FRAME),
        (struct.pack(">I", 1000) + b"{}", ErrorCode.BAD_FRAME),  # header longer than frame
        (struct.pack(">I", 3) + b"{x}", ErrorCode.BAD_FRAME),  # not JSON
        (raw([1, 2]), ErrorCode.BAD_FRAME),  # not an object
        (raw({"type": "nope"}), ErrorCode.BAD_FRAME),
        (raw({"type": "close"}), ErrorCode.BAD_FRAME),  # missing sid
        (raw({"type": "close", "sid": 1, "extra": 1}), ErrorCode.BAD_FRAME),
        (raw({"type": "close", "sid": 1}, b"xx"), ErrorCode.BAD_FRAME),  # stray payload
        (raw(STEP, b"\x00" * 15), ErrorCode.BAD_TENSOR),  # payload one byte short
        (raw({**STEP, "tensor": {"dtype": "int64", "shape": [1, 4]}}, b"\x00" * 32), ErrorCode.BAD_FRAME),
        (raw({**STEP, "tensor": {"dtype": "float32", "shape": [0, 4]}}), ErrorCode.BAD_TENSOR),
        (raw({**STEP, "tensor": {"dtype": "float32", "shape": [2, 4]}}, b"\x00" * 32), ErrorCode.BAD_TENSOR),  # rows != tensor
        (raw({**STEP, "tensor": {"dtype": "float32", "shape": [-1, 4]}}), ErrorCode.BAD_FRAME),
        (raw({**STEP, "rows": [[1, 0, 1], [1, 1, 1]], "tensor": {"dtype": "float32", "shape": [2, 4]}}, b"\x00" * 32),
         ErrorCode.BAD_FRAME),  # one session twice
        (raw({**STEP, "rows": [[1, 0, 0]]}, b"\x00" * 16), ErrorCode.BAD_FRAME),  # an empty run
        (raw({**STEP, "rows": []}, b"\x00" * 16), ErrorCode.BAD_FRAME),
        (raw({**STEP, "rows": [[i, 0, 1] for i in range(257)], "tensor": {"dtype": "float32", "shape": [257, 1]}},
             b"\x00" * 4 * 257), ErrorCode.BAD_FRAME),  # more sessions than a frame may carry
        (raw({**STEP, "tensor": {"dtype": "float32", "shape": [1, 4, 1]}}, b"\x00" * 16), ErrorCode.BAD_TENSOR),
    ],
)
def test_malformed_frames_raise_typed_errors(frame, code):
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert info.value.code == code and info.value.message


def test_text_frames_are_refused():
    with pytest.raises(ProtocolError) as info:
        decode('{"type": "close", "sid": 1}')
    assert info.value.code == ErrorCode.BAD_FRAME


def test_error_keeps_the_session_ids_when_it_can():
    with pytest.raises(ProtocolError) as info:
        decode(raw({"type": "close", "sid": 1, "extra": 0}))
    assert info.value.sid == 1
    with pytest.raises(ProtocolError) as info:
        decode(raw({**STEP, "rows": [[4, 0, 1], [2, 7, 1]], "tensor": {"dtype": "float32", "shape": [2, 4]}}, b"\x00"))
    assert info.value.code == ErrorCode.BAD_TENSOR
    assert info.value.sid == [2, 4]  # each session of a frame is told
    assert [m.sid for m in info.value.to_messages()] == [2, 4]


def test_close_needs_no_tensor():
    msg, tensor = decode(encode(Close(sid=5)))
    assert msg.sid == 5 and tensor is None
