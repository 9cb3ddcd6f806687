"""Property-based fuzzing of the image readers: the edge's image-folder source and the trainer's loader.

Corrupt files are made from real encodings (OpenCV's own PNG and JPEG of a test image),
truncated or with bytes flipped, plus empty files, random bytes and a PNG whose header
claims a 60000 x 60000 image. The edge skips what it cannot decode (naming the file) and
goes on with the next image; the trainer names the file in one GanspectError.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ganspect.edge.config import SourceConfig
from ganspect.edge.errors import GanspectError
from ganspect.edge.source import open_source

EXAMPLES = int(os.environ.get("GANSPECT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_rng = np.random.default_rng(7)
_IMAGE = _rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
ENCODED = {ext: cv2.imencode(ext, _IMAGE)[1].tobytes() for ext in (".png", ".jpg")}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# A well-formed PNG header for 60000 x 60000 RGB, with one tiny IDAT: decoding it must be refused, not attempted.
HUGE_PNG = (
    b"\x89PNG\r\n\x1a\n"
    + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
    + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
    + _png_chunk(b"IEND", b"")
)


@st.composite
def broken_files(draw: st.DrawFn) -> tuple[str, bytes]:
    ext = draw(st.sampled_from([".png", ".jpg"]))
    data = bytearray(ENCODED[ext])
    how = draw(st.sampled_from(["truncate", "flip", "empty", "random", "huge"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 20))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif how == "empty":
        data = bytearray()
    elif how == "random":
        data = bytearray(draw(st.binary(max_size=2000)))
    else:
        ext, data = ".png", bytearray(HUGE_PNG)
    return ext, bytes(data)


@FUZZ
@given(broken=broken_files())
def test_the_edge_folder_source_skips_what_it_cannot_decode(tmp_path: Path, broken: tuple[str, bytes]) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    ext, data = broken
    (folder / f"a-broken{ext}").write_bytes(data)
    cv2.imwrite(str(folder / "b-good.png"), _IMAGE)
    source = open_source(SourceConfig(uri=str(folder)))
    try:
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
    finally:
        source.close()
    # The good image always comes through; a flipped byte may still decode (JPEG is forgiving) as a 3-channel frame.
    assert frames and frames[-1].image.shape == _IMAGE.shape
    assert all(f.image.ndim == 3 and f.image.shape[2] == 3 and f.image.dtype == np.uint8 for f in frames)


@FUZZ
@given(broken=broken_files(), channels=st.sampled_from([1, 3]))
def test_the_trainer_names_an_undecodable_file(tmp_path: Path, broken: tuple[str, bytes], channels: int) -> None:
    from ganspect.train.data import read_image

    ext, data = broken
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / f"part{ext}"
    path.write_bytes(data)
    try:
        image = read_image(path, 32, channels)
    except GanspectError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert image.shape == (32, 32, channels) and image.dtype == np.uint8


def test_a_huge_png_header_is_refused_without_allocating_it(tmp_path: Path) -> None:
    from ganspect.train.data import read_image

    path = tmp_path / "huge.png"
    path.write_bytes(HUGE_PNG)
    with pytest.raises(GanspectError, match=re.escape("huge.png")):
        read_image(path, 32, 3)
