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
    frame = encode(Step(sid=3, pos=11, tensor=tensor_meta(t)), t)
    msg, got = decode(frame)
    assert isinstance(msg, Step) and msg.sid == 3 and msg.pos == 11
    assert got.dtype == dtype and torch.equal(got, t)
    # The frame is the header plus exactly the tensor's bytes: nothing else rides along.
    (n,) = struct.unpack_from(">I", frame)
    assert len(frame) == 4 + n + t.numel() * t.element_size()


def test_header_only_message_round_trip():
    msg, tensor = decode(encode(Hello(num_layers=30, hidden_size=576, layers=(2, 28), dtype="float16")))
    assert isinstance(msg, Hello) and msg.layers == (2, 28) and tensor is None


def raw(header: dict, payload: bytes = b"") -> bytes:
    h = orjson.dumps(header)
    return struct.pack(">I", len(h)) + h + payload


STEP = {"type": "step", "sid": 1, "pos": 0, "tensor": {"dtype": "float32", "shape": [1, 4]}}


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
        (raw({**STEP, "tensor": {"dtype": "float32", "shape": [-1, 4]}}), ErrorCode.BAD_FRAME),
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


def test_error_keeps_the_session_id_when_it_can():
    with pytest.raises(ProtocolError) as info:
        decode(raw(STEP, b"\x00"))
    assert info.value.sid == 1


def test_close_needs_no_tensor():
    msg, tensor = decode(encode(Close(sid=5)))
    assert msg.sid == 5 and tensor is None
