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
from dataclasses import dataclass
from pathlib import Path

from ganspect.edge.errors import BundleError, GanspectError
from ganspect.edge.manifest import MANIFEST_NAME, load_bundle, sha256_file

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


def verify_bundle(path: Path) -> str:
    """Everything the daemon checks at load, for each model file (FP32, INT8); the model's name, or BundleError."""
    from ganspect.edge.scorer import Scorer  # onnxruntime: only when verifying

    manifest = load_bundle(path).manifest
    for precision in sorted({f.precision for f in manifest.files}):
        Scorer.load(path, precision)
    return manifest.name


def version_name(path: Path) -> str:
    """`<model name>-<12 hex>`: the manifest's hash stands for the whole bundle (it holds every file's hash)."""
    return f"{load_bundle(path).manifest.name}-{sha256_file(path / MANIFEST_NAME)[:12]}"


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point(link: Path, target_name: str) -> None:
    """Make `link` -> `target_name` (relative, in the same folder) atomically, replacing what was there."""
    temporary = link.with_name(f"{_INCOMING}{link.name}-{os.getpid()}")
    if temporary.is_symlink():
        temporary.unlink()
    temporary.symlink_to(target_name)
    os.replace(temporary, link)
    _fsync_dir(link.parent)


class ModelStore:
    """The folder that holds a station's bundles; `current_link` is what `model.bundle` names."""

    def __init__(self, current_link: Path) -> None:
        self.current_link = current_link
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

    def install(self, source: Path) -> Installed:
        """Verify `source`, copy it in, verify the copy, swap `current`; BundleError leaves everything as it was."""
        source = source.resolve()
        if not (source / MANIFEST_NAME).is_file():
            raise BundleError(f"{source} is not a model bundle (no {MANIFEST_NAME}); give the folder "
                              "`ganspect export` wrote")
        name = verify_bundle(source)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_incoming()
        self._adopt_plain_folder()
        versioned = version_name(source)
        old = self.target(self.current_link)
        if old is not None and old.name == versioned and old.parent == self.root.resolve():
            verify_bundle(old)  # the same content: make sure the copy on disk is still intact
            return Installed(old, name, self.target(self.previous_link), unchanged=True)
        incoming = Path(tempfile.mkdtemp(prefix=_INCOMING, dir=self.root))
        try:
            shutil.copytree(source, incoming, dirs_exist_ok=True)
            os.chmod(incoming, 0o755)  # readable by the daemon's user whoever installs
            _fsync_tree(incoming)
            verify_bundle(incoming)  # the copy, as it lies on this disk
            destination = self._free_name(versioned) if (self.root / versioned).exists() else versioned
            os.rename(incoming, self.root / destination)
            _fsync_dir(self.root)
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
            if entry.is_dir() and not entry.is_symlink() and entry.name not in keep \
                    and not entry.name.startswith(_INCOMING) and (entry / MANIFEST_NAME).is_file():
                shutil.rmtree(entry, ignore_errors=True)
                log.info("model: removed the old bundle %s", entry.name)


def install_model(config_path: Path, bundle: Path) -> Installed:
    """`ganspect edge install-model BUNDLE --config FILE`: install into the folder of the config's model.bundle.

    A running daemon notices the new `current` between frames and swaps it in (or, should
    it fail there, restores the previous bundle and keeps scoring with it).
    """
    from ganspect.edge.config import load_config

    config = load_config(config_path)
    installed = ModelStore(config.model.bundle).install(bundle)
    return installed
