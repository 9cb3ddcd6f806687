"""The station's model folder: verified bundles side by side, `current` and `previous` as links.

    /var/lib/ganspect/models/
        washers-3f2a9c01d4e5/      a bundle, named <manifest name>-<first 12 hex of its manifest's SHA-256>
        washers-81bb07c2aa10/
        current -> washers-81bb07c2aa10      what the daemon runs (model.bundle points here)
        previous -> washers-3f2a9c01d4e5     the last good one, restored when the new one fails

`install` verifies a bundle completely (hashes, manifest, graph interface, warm-up and the
bundle's own self-test: everything `Scorer.load` does) *before* anything the daemon reads
changes, copies it in under a temporary name, verifies the copy, and only then swaps the
`current` link with one `rename(2)`, which is atomic: a daemon (re)loading at any moment sees
either the old bundle or the new one, never half of each. A power cut mid-install leaves at
most a stray `.incoming-*` folder, which the next install removes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ganspect.edge.common import fsync_folder
from ganspect.edge.errors import BundleError, GanspectError
from ganspect.edge.manifest import MANIFEST_NAME, load_bundle, sha256_file

if TYPE_CHECKING:  # onnxruntime is imported only where a bundle is loaded
    from ganspect.edge.config import ModelConfig
    from ganspect.edge.live_model import LiveModel
    from ganspect.edge.scorer import Scorer

log = logging.getLogger(__name__)

CURRENT = "current"
PREVIOUS = "previous"
_INCOMING = ".incoming-"


@dataclass(frozen=True)
class Installed:
    path: Path  # the versioned folder `current` now points to
    name: str  # the manifest's model name
    previous: Path | None  # what `current` pointed to before, now `previous`
    unchanged: bool  # the same bundle was already current


def verify_bundle(path: Path, trusted_keys: Sequence[Path] = ()) -> str:
    """Everything the daemon checks at load, for each model file (FP32, INT8); the model's name, or BundleError."""
    from ganspect.edge.scorer import Scorer  # onnxruntime: only when verifying

    manifest = load_bundle(path, trusted_keys).manifest
    for precision in sorted({f.precision for f in manifest.files}):
        Scorer.load(path, precision, trusted_keys=trusted_keys)
    return manifest.name


def version_name(path: Path) -> str:
    """`<model name>-<12 hex>`: the manifest's hash stands for the whole bundle (it holds every file's hash)."""
    return f"{load_bundle(path).manifest.name}-{sha256_file(path / MANIFEST_NAME)[:12]}"


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_folder(Path(folder))


def _point(link: Path, target_name: str) -> None:
    """Make `link` -> `target_name` (relative, in the same folder) atomically, replacing what was there."""
    temporary = link.with_name(f"{_INCOMING}{link.name}-{os.getpid()}")
    if temporary.is_symlink():
        temporary.unlink()
    temporary.symlink_to(target_name)
    os.replace(temporary, link)
    fsync_folder(link.parent)


class ModelStore:
    """The folder that holds a station's bundles; `current_link` is what `model.bundle` names."""

    def __init__(self, current_link: Path, trusted_keys: Sequence[Path] = ()) -> None:
        self.current_link = current_link
        self.trusted_keys = tuple(trusted_keys)  # model.trusted_keys: what install takes
        self.root = current_link.parent
        self.previous_link = self.root / PREVIOUS

    def target(self, link: Path) -> Path | None:
        return link.resolve() if link.is_symlink() else None

    def _adopt_plain_folder(self) -> None:
        """A `current` that is a real folder (copied by hand) becomes a versioned folder plus a link."""
        current = self.current_link
        if current.is_symlink() or not current.is_dir():
            return
        try:
            name = version_name(current)
        except GanspectError:
            name = "adopted"
        destination = self._free_name(name)
        os.rename(current, self.root / destination)
        _point(current, destination)
        log.info("moved the hand-copied bundle %s to %s and linked it as %s", current, destination, CURRENT)

    def _free_name(self, name: str) -> str:
        candidate, n = name, 1
        while (self.root / candidate).exists() or (self.root / candidate).is_symlink():
            n += 1
            candidate = f"{name}.{n}"
        return candidate

    def _remove_incoming(self) -> None:
        for stray in self.root.glob(f"{_INCOMING}*"):
            if stray.is_symlink() or stray.is_file():
                stray.unlink()
            else:
                shutil.rmtree(stray, ignore_errors=True)

    def install(self, source: Path, suits: Callable[[Path], None] | None = None) -> Installed:
        """Verify `source`, copy it in, verify the copy, swap `current`; BundleError leaves everything as it was.

        `suits(path)` may refuse a sound bundle that does not fit this station (its precision,
        its inspection ROI) by raising GanspectError.
        """
        source = source.resolve()
        if not (source / MANIFEST_NAME).is_file():
            raise BundleError(
                f"{source} is not a model bundle (no {MANIFEST_NAME}); give the folder `ganspect export` wrote"
            )
        name = verify_bundle(source, self.trusted_keys)
        if suits is not None:
            suits(source)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_incoming()
        self._adopt_plain_folder()
        versioned = version_name(source)
        old = self.target(self.current_link)
        if old is not None and old.name == versioned and old.parent == self.root.resolve():
            verify_bundle(old, self.trusted_keys)  # the same content: make sure the copy on disk is still intact
            return Installed(old, name, self.target(self.previous_link), unchanged=True)
        incoming = Path(tempfile.mkdtemp(prefix=_INCOMING, dir=self.root))
        try:
            shutil.copytree(source, incoming, dirs_exist_ok=True)
            os.chmod(incoming, 0o755)  # readable by the daemon's user whoever installs
            _fsync_tree(incoming)
            verify_bundle(incoming, self.trusted_keys)  # the copy, as it lies on this disk
            destination = self._free_name(versioned) if (self.root / versioned).exists() else versioned
            os.rename(incoming, self.root / destination)
            fsync_folder(self.root)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        if old is not None:
            _point(self.previous_link, old.name)
        _point(self.current_link, destination)
        self._prune()
        return Installed(self.root / destination, name, old, unchanged=False)

    def restore_previous(self) -> Path:
        """Point `current` back at `previous` (the last good bundle); BundleError when there is none."""
        previous = self.target(self.previous_link)
        if previous is None or not previous.is_dir():
            raise BundleError(f"no previous bundle to restore in {self.root}")
        _point(self.current_link, previous.name)
        log.warning("model: %s restored to the last good bundle %s", self.current_link, previous.name)
        return previous

    def _prune(self) -> None:
        """Keep the bundles `current` and `previous` name; older ones go (a mini PC's disk is small)."""
        keep = {p.name for p in (self.target(self.current_link), self.target(self.previous_link)) if p}
        for entry in self.root.iterdir():
            if (
                entry.is_dir()
                and not entry.is_symlink()
                and entry.name not in keep
                and not entry.name.startswith(_INCOMING)
                and (entry / MANIFEST_NAME).is_file()
            ):
                shutil.rmtree(entry, ignore_errors=True)
                log.info("model: removed the old bundle %s", entry.name)


class BundleWatch:
    """Notices a new `current` (from `install-model`) between frames and swaps it into the running daemon.

    `poll()` is called by the scoring loop and costs one `realpath` per interval. The load
    and self-test run on a worker thread through `LiveModel.reload`, so the loop keeps
    scoring with the old model meanwhile. When the new bundle fails *here* (this CPU, this
    ROI), `current` is pointed back at the bundle that keeps running, so a restart does not
    pick the failed one up either.
    """

    def __init__(self, live: LiveModel, link: Path, interval_s: float = 2.0) -> None:
        self._live = live
        self._store = ModelStore(link)
        self._interval_s = interval_s
        self._loaded = os.path.realpath(link)
        self._next_check = time.monotonic() + interval_s
        self._worker: threading.Thread | None = None

    def poll(self) -> None:
        now = time.monotonic()
        if now < self._next_check or (self._worker is not None and self._worker.is_alive()):
            return
        self._next_check = now + self._interval_s
        target = os.path.realpath(self._store.current_link)
        if target != self._loaded:
            self._worker = threading.Thread(target=self._swap, args=(target,), name="ganspect-model-swap", daemon=True)
            self._worker.start()

    def _swap(self, target: str) -> None:
        try:
            problem, _ = self._live.reload()
            if problem is None:
                log.warning(
                    "model: %s now points to %s; swapped in between frames", self._store.current_link, Path(target).name
                )
                self._loaded = target
                return
            log.error(
                "model: the new bundle %s failed in the daemon (%s); the running one keeps scoring",
                Path(target).name,
                problem,
            )
            previous = self._store.target(self._store.previous_link)
            if previous is not None and str(previous) == self._loaded:
                self._store.restore_previous()
        except Exception:
            log.exception("model swap failed; the running model keeps scoring")

    def close(self) -> None:
        if self._worker is not None:
            self._worker.join(timeout=60)


def load_current_or_previous(model: ModelConfig) -> Scorer:
    """The configured bundle; if it cannot be used and the store keeps a previous one, that one (restored)."""
    from ganspect.edge.scorer import Scorer

    try:
        return Scorer.load(model.bundle, model.precision, model.intra_op_threads, model.trusted_keys)
    except BundleError as exc:
        store = ModelStore(model.bundle)
        previous = store.target(store.previous_link)
        if previous is None or str(previous) == os.path.realpath(model.bundle):
            raise
        log.error("model: %s cannot be used (%s); restoring the last good bundle %s", model.bundle, exc, previous.name)
        # Verified (and its signature checked) before pointing at it.
        Scorer.load(previous, model.precision, model.intra_op_threads, model.trusted_keys)
        store.restore_previous()
        return Scorer.load(model.bundle, model.precision, model.intra_op_threads, model.trusted_keys)


def install_model(config_path: Path, bundle: Path) -> Installed:
    """`ganspect edge install-model BUNDLE --config FILE`: install into the folder of the config's model.bundle.

    A running daemon notices the new `current` between frames and swaps it in (or, should
    it fail there, restores the previous bundle and keeps scoring with it).
    """
    from ganspect.edge.config import load_config
    from ganspect.edge.inspector import Inspector
    from ganspect.edge.scorer import Scorer

    config = load_config(config_path)

    def suits_the_station(path: Path) -> None:
        # What the daemon will run: the configured precision, cut into the configured ROI and tiles.
        scorer = Scorer.load(path, config.model.precision, config.model.intra_op_threads, config.model.trusted_keys)
        Inspector(config.inspection).check(scorer.manifest)

    return ModelStore(config.model.bundle, config.model.trusted_keys).install(bundle, suits=suits_the_station)
