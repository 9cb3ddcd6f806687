"""The model and the decision threshold in force: what the scoring loop judges each frame by.

Commands change them between frames: cmd/reload swaps in a verified bundle, cmd/threshold
sets or clears an override that is saved in the data folder and survives restarts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from ganspect.edge.common import fsync_folder, utc_iso
from ganspect.edge.config import EdgeConfig
from ganspect.edge.errors import GanspectError
from ganspect.edge.payloads import RejectCode, ThresholdState
from ganspect.edge.scorer import Scorer

log = logging.getLogger(__name__)

THRESHOLD_FILE = "threshold-override.json"


@dataclass(frozen=True)
class InForce:
    """The model and the decision threshold for one frame (NG when score > threshold)."""

    scorer: Scorer
    threshold: float
    threshold_source: Literal["bundle", "override"]


@dataclass(frozen=True)
class _Override:
    value: float
    model_sha256: str  # an override belongs to the model it was set for
    set_at: str
    command_id: str | None


class LiveModel:
    """The scorer and the threshold the loop judges by; commands change them between frames.

    The threshold override is saved in `<data.dir>/threshold-override.json` (written
    atomically before it takes effect) so a restart or power cut does not change how
    parts are judged; every verdict says `threshold.source: override` while it holds.
    It is tied to the model's SHA-256: a reload that brings another model clears it, as
    does a start with another model (a new model has its own score scale).
    """

    def __init__(self, scorer: Scorer, config: EdgeConfig, check_model: Callable[[Scorer], None] | None = None) -> None:
        """`check_model(scorer)` may refuse a reloaded model by raising GanspectError (e.g. its input
        size does not suit the configured inspection); the running model then keeps scoring."""
        self._config = config
        self._check_model = check_model
        self._lock = threading.Lock()
        self._scorer = scorer
        self._override: _Override | None = None
        self._state_file = config.data.dir / THRESHOLD_FILE
        # Held briefly (a file write) to change the model or the override; never while a bundle loads.
        self._change_lock = threading.Lock()
        self._reloading = threading.Lock()
        self._restore_override()

    @property
    def bundle_path(self) -> Path:
        """The configured bundle: the only one a reload reads."""
        return self._config.model.bundle

    @property
    def scorer(self) -> Scorer:
        with self._lock:
            return self._scorer

    def in_force(self) -> InForce:
        """The model and threshold to judge the next frame by: take it once per frame."""
        with self._lock:  # one consistent (model, threshold) pair
            scorer, override = self._scorer, self._override
        if override is None:
            return InForce(scorer, scorer.threshold, "bundle")
        return InForce(scorer, override.value, "override")

    def threshold_state(self) -> ThresholdState:
        with self._lock:
            return self._threshold_state(self._scorer, self._override)

    @staticmethod
    def _threshold_state(scorer: Scorer, override: _Override | None) -> ThresholdState:
        bundle = scorer.threshold
        if override is None:
            return ThresholdState(value=bundle, source="bundle", bundle_value=bundle)
        return ThresholdState(value=override.value, source="override", bundle_value=bundle)

    def bounds(self, scorer: Scorer | None = None) -> tuple[float, float]:
        commands = self._config.mqtt.commands
        bundle = (scorer or self.scorer).threshold
        ends = (bundle * commands.threshold_min_ratio, bundle * commands.threshold_max_ratio)
        return min(ends), max(ends)

    def set_threshold(self, value: float | None, command_id: str | None) -> tuple[RejectCode, str] | None:
        """Set (or clear, None) the override; None when done, else (code, why not): nothing changed then."""
        with self._change_lock:  # the bounds refer to the model in force: no swap meanwhile
            scorer = self.scorer
            if value is not None:
                low, high = self.bounds(scorer)
                if not low <= value <= high:
                    commands = self._config.mqtt.commands
                    return "out_of_bounds", (
                        f"{_outside(value, low, high)} ({commands.threshold_min_ratio:g} .. "
                        f"{commands.threshold_max_ratio:g} x the bundle's threshold "
                        f"{scorer.threshold:g}; mqtt.commands.threshold_min_ratio/max_ratio)"
                    )
                override: _Override | None = _Override(
                    value, scorer.model_file.sha256, utc_iso(datetime.now(timezone.utc)), command_id
                )
            else:
                override = None
            problem = self._save(override)
            if problem:
                return "internal_error", f"{problem}; the threshold is unchanged"
            with self._lock:
                self._override = override
        if override is None:
            log.warning(
                "threshold override cleared by cmd/threshold: judging by the bundle's threshold %.6g again",
                scorer.threshold,
            )
        else:
            log.warning(
                "threshold override %.6g set by cmd/threshold (bundle %.6g); kept across restarts until cleared",
                override.value,
                scorer.threshold,
            )
        return None

    def reload(self) -> tuple[str | None, bool]:
        """Load and verify the configured bundle, then swap it in; (why not or None, override cleared)."""
        model = self._config.model
        if not self._reloading.acquire(blocking=False):
            return "a reload is under way", False
        try:
            try:
                # Verified and warmed up here, on the caller's thread, while the loop scores with the old one.
                new = Scorer.load(model.bundle, model.precision, model.intra_op_threads, model.trusted_keys)
                if self._check_model is not None:
                    self._check_model(new)
            except GanspectError as exc:
                return str(exc), False
            except Exception as exc:
                return f"{model.bundle} could not be loaded: {type(exc).__name__}: {exc}", False
            with self._change_lock:
                cleared = False
                with self._lock:
                    old, override = self._scorer, self._override
                if override is not None and override.model_sha256 != new.model_file.sha256:
                    problem = self._save(None)
                    if problem:
                        return f"{problem}; the running model keeps scoring", False
                    cleared = True
                with self._lock:  # the next frame scores with the new model
                    self._scorer = new
                    if cleared:
                        self._override = None
        finally:
            self._reloading.release()
        log.warning(
            "model reloaded by cmd/reload: %s %s (%s) replaces %s %s%s",
            new.manifest.name,
            new.model_file.sha256[:12],
            new.model_file.precision,
            old.manifest.name,
            old.model_file.sha256[:12],
            "; the threshold override is cleared (it was set for the previous model)" if cleared else "",
        )
        return None, cleared

    # -- the saved override ----------------------------------------------------------------
    def _save(self, override: _Override | None) -> str | None:
        """Write (or remove) the override file durably; a message when that failed."""
        path = self._state_file
        try:
            if override is None:
                if not path.exists():
                    return None  # nothing saved: nothing to remove or make durable
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_suffix(".tmp")
                with open(temporary, "w", encoding="utf-8") as handle:
                    json.dump(dataclasses.asdict(override), handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, path)
            fsync_folder(path.parent)
        except OSError as exc:
            return f"cannot save the threshold override in {path}: {exc.strerror or exc}"
        return None

    def _restore_override(self) -> None:
        path = self._state_file
        if not path.exists():
            return
        scorer = self._scorer
        try:
            saved = _Override(**json.loads(path.read_text(encoding="utf-8")))
            value = float(saved.value)
        except (OSError, ValueError, TypeError) as exc:
            log.error("threshold override %s is unreadable (%s): ignored; judging by the bundle's threshold", path, exc)
            return
        low, high = self.bounds(scorer)
        if saved.model_sha256 != scorer.model_file.sha256:
            why = "it was set for another model"
        elif not low <= value <= high:
            why = f"{_outside(value, low, high)} (mqtt.commands.threshold_min_ratio/max_ratio)"
        else:
            self._override = dataclasses.replace(saved, value=value)
            log.warning(
                "threshold override %.6g (bundle %.6g) set by cmd/threshold at %s is in force; "
                'cmd/threshold {"value": null} clears it',
                value,
                scorer.threshold,
                saved.set_at,
            )
            return
        log.warning("threshold override %.6g from %s is dropped: %s", value, path, why)
        self._save(None)


def _outside(value: float, low: float, high: float) -> str:
    """'value is outside low .. high' with as many digits as it takes to see which bound it crosses."""
    crossed = low if value < low else high
    digits = next((n for n in range(6, 17) if f"{value:.{n}g}" != f"{crossed:.{n}g}"), None)
    if digits is None:  # neighbouring doubles: the shortest text that reads back as each
        return f"{value!r} is outside {low!r} .. {high!r}"
    return f"{value:.{digits}g} is outside {low:.{digits}g} .. {high:.{digits}g}"
