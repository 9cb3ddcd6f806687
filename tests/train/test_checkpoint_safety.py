"""A checkpoint carrying a pickled payload is refused without running it (weights_only loading)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from ganspect.edge.errors import GanspectError
from ganspect.train.loop import load_checkpoint


class _Planted:
    """Unpickling this calls Path.touch: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_code_in_it_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "last.pt"
    torch.save({"format": "anything", "model": _Planted(marker)}, checkpoint, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(GanspectError, match="not a readable ganspect checkpoint") as err:
        load_checkpoint(checkpoint)
    assert not marker.exists()
    assert "\n" not in str(err.value) and "could run code" in str(err.value)
    # The same file through plain pickle would have run it: the test plants real code.
    torch.load(checkpoint, weights_only=False)
    assert marker.exists()
