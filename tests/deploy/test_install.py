"""deploy/install.sh into a scratch root: the files, owners, modes and config it leaves, run twice, then removed.

The install is real: a virtual environment built by pip from this checkout with the edge
extra (wheels come from pip's cache or the package index), a system user created with
useradd in the scratch root's own /etc/passwd, the unit checked by systemd-analyze.
useradd and chown need root, as the install does on a station.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="install.sh creates a user and chowns files: needs root"),
]


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args], capture_output=True, text=True, timeout=600
    )


def _scratch_root(path: Path) -> Path:
    """A folder with the /etc files useradd needs: root and the video group, nothing else."""
    etc = path / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n", encoding="utf-8")
    (etc / "group").write_text("root:x:0:\nvideo:x:44:\n", encoding="utf-8")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n", encoding="utf-8")
    (etc / "gshadow").write_text("root:*::\nvideo:!::\n", encoding="utf-8")
    for name in ("shadow", "gshadow"):
        (etc / name).chmod(0o640)
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    root = _scratch_root(tmp_path_factory.mktemp("scratch-root"))
    result = _install(root, "--site", "plant1", "--line", "line3", "--station", "cam1", "--camera-id", "046d:0825")
    yield root, result
    shutil.rmtree(root, ignore_errors=True)


def _ids(root: Path) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text(encoding="utf-8").splitlines():
        fields = line.split(":")
        if fields[0] == "ganspect":
            return int(fields[2]), int(fields[3])
    raise AssertionError("no ganspect user in the scratch root's /etc/passwd")


def _owner_mode(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_install_creates_the_user_in_the_video_group(installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, result = installed
    assert result.returncode == 0, result.stdout + result.stderr
    uid, _ = _ids(root)
    assert uid < 1000  # a system user
    video = next(line for line in (root / "etc/group").read_text().splitlines() if line.startswith("video:"))
    assert video.split(":")[3].split(",") == ["ganspect"]
    passwd = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("ganspect:"))
    assert passwd.endswith(":/var/lib/ganspect:/usr/sbin/nologin")


def test_files_owners_and_modes(installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = installed
    uid, gid = _ids(root)
    # Config: readable by the daemon's group, not by everyone (it names credentials files).
    assert _owner_mode(root / "etc/ganspect") == (0, gid, 0o750)
    assert _owner_mode(root / "etc/ganspect/edge.yaml") == (0, gid, 0o640)
    # Data: the daemon's own.
    assert _owner_mode(root / "var/lib/ganspect") == (uid, gid, 0o750)
    assert _owner_mode(root / "var/lib/ganspect/models") == (uid, gid, 0o750)
    unit = root / "etc/systemd/system/ganspect-edge.service"
    assert _owner_mode(unit) == (0, 0, 0o644)
    assert unit.read_bytes() == (REPO / "deploy/ganspect-edge.service").read_bytes()
    assert (root / "etc/systemd/user/ganspect-edge-window.service").is_file()
    rule = (root / "etc/udev/rules.d/70-ganspect-camera.rules").read_text(encoding="utf-8")
    assert 'ATTRS{idVendor}=="046d", ATTRS{idProduct}=="0825"' in rule and 'SYMLINK+="ganspect-camera"' in rule
    assert (root / "opt/ganspect/docs/deploy.md").is_file()


def test_venv_has_the_edge_extra_and_no_torch(installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = installed
    python = root / "opt/ganspect/venv/bin/python"
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert {"ganspect", "onnxruntime", "paho-mqtt", "opencv-python"} <= names
    assert "torch" not in names and "opencv-python-headless" not in names
    help_text = subprocess.run(
        [str(root / "opt/ganspect/venv/bin/ganspect"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "doctor" in help_text and "edge" in help_text


def test_generated_config_names_the_station_and_validates(
    installed: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    root, _ = installed
    config_path = root / "etc/ganspect/edge.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    assert config["station"] == {"site": "plant1", "line": "line3", "station": "cam1"}
    assert config["model"]["bundle"] == "/var/lib/ganspect/models/current"
    assert config["data"]["dir"] == "/var/lib/ganspect"
    # The installed software validates it (`--check` would also load the model, which comes later).
    check = subprocess.run(
        [
            str(root / "opt/ganspect/venv/bin/python"),
            "-c",
            "import sys; from ganspect.edge.config import load_config; load_config(sys.argv[1])",
            str(config_path),
        ],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.needs_tools("systemd-analyze")
def test_unit_passes_systemd_analyze_verify(installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = installed
    # --root: ExecStart's /opt/ganspect/venv/bin/ganspect is looked up inside the scratch root.
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            f"--root={root}",
            "--recursive-errors=no",
            str(root / "etc/systemd/system/ganspect-edge.service"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_second_run_keeps_the_config_and_the_data(installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = installed
    config = root / "etc/ganspect/edge.yaml"
    edited = config.read_text(encoding="utf-8").replace("host: 127.0.0.1", "host: broker.plant1")
    config.write_text(edited, encoding="utf-8")
    outbox = root / "var/lib/ganspect/outbox.sqlite3"
    outbox.write_bytes(b"verdicts waiting for the broker")
    users_before = (root / "etc/passwd").read_text(encoding="utf-8")
    again = _install(root)  # no station flags needed: the config exists
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept the existing" in again.stdout
    assert config.read_text(encoding="utf-8") == edited
    assert outbox.read_bytes() == b"verdicts waiting for the broker"
    assert (root / "etc/passwd").read_text(encoding="utf-8") == users_before


def test_uninstall_keeps_data_unless_purged(installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, _ = installed
    removed = _install(root, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not (root / "opt/ganspect").exists()
    assert not (root / "etc/systemd/system/ganspect-edge.service").exists()
    assert (root / "etc/ganspect/edge.yaml").is_file() and (root / "var/lib/ganspect").is_dir()
    purged = _install(root, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not (root / "etc/ganspect").exists() and not (root / "var/lib/ganspect").exists()
    assert "ganspect:" not in (root / "etc/passwd").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give --site, --line and --station"),
        (("--site", "plant 1", "--line", "l", "--station", "s"), "letters, digits"),
        (("--site", "p", "--line", "l", "--station", "s", "--opencv", "both"), "gui or headless"),
        (("--site", "p", "--line", "l", "--station", "s", "--camera-id", "logitech"), "VENDOR:PRODUCT"),
    ],
)
def test_bad_arguments_change_nothing(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    root = _scratch_root(tmp_path / "root")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    result = _install(root, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


@pytest.mark.needs_tools("shellcheck")
def test_scripts_pass_shellcheck() -> None:
    scripts = [*sorted((REPO / "deploy").glob("*.sh")), REPO / ".ci" / "run"]
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------------------------
# Several cameras on one PC: install.sh --multi, once per camera


@pytest.fixture(scope="module")
def two_stations(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """A scratch root with two --multi stations: one camera told apart by serial, one by USB port."""
    root = _scratch_root(tmp_path_factory.mktemp("scratch-two-stations"))
    outputs = []
    for args in (
        ("--station", "top", "--camera-id", "046d:0825:1A2B3C4D"),
        ("--station", "side", "--camera-port", "pci-0000:00:14.0-usb-0:2:1.0"),
    ):
        result = _install(root, "--multi", "--site", "plant1", "--line", "line3", *args)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(result.stdout)
    yield root, outputs
    shutil.rmtree(root, ignore_errors=True)


def test_each_station_gets_its_own_config_data_folder_and_camera_name(two_stations: tuple[Path, list[str]]) -> None:
    root, _ = two_stations
    uid, gid = _ids(root)
    for name in ("top", "side"):
        config_path = root / f"etc/ganspect/stations/{name}.yaml"
        assert _owner_mode(config_path) == (0, gid, 0o640)
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        assert config["station"] == {"site": "plant1", "line": "line3", "station": name}
        assert config["data"]["dir"] == f"/var/lib/ganspect/stations/{name}"
        assert config["model"]["bundle"] == f"/var/lib/ganspect/stations/{name}/models/current"
        assert config["model"]["intra_op_threads"] == 1
        assert config["source"]["uri"] == f"/dev/ganspect-camera-{name}"
        assert f"--config /etc/ganspect/stations/{name}.yaml" in config_path.read_text(encoding="utf-8")
        assert f"systemctl restart ganspect-edge@{name}" in config_path.read_text(encoding="utf-8")
        assert _owner_mode(root / f"var/lib/ganspect/stations/{name}") == (uid, gid, 0o750)
        assert _owner_mode(root / f"var/lib/ganspect/stations/{name}/models") == (uid, gid, 0o750)
    # No single-station config appears beside them; both units are installed (one software for all).
    assert not (root / "etc/ganspect/edge.yaml").exists()
    template = root / "etc/systemd/system/ganspect-edge@.service"
    assert template.read_bytes() == (REPO / "deploy/ganspect-edge@.service").read_bytes()
    assert (root / "etc/systemd/system/ganspect-edge.service").is_file()
    rules = root / "etc/udev/rules.d"
    top = (rules / "70-ganspect-camera-top.rules").read_text(encoding="utf-8")
    assert 'ATTRS{idVendor}=="046d", ATTRS{idProduct}=="0825", ATTRS{serial}=="1A2B3C4D"' in top
    assert 'SYMLINK+="ganspect-camera-top"' in top
    side = (rules / "70-ganspect-camera-side.rules").read_text(encoding="utf-8")
    assert 'ENV{ID_PATH}=="pci-0000:00:14.0-usb-0:2:1.0"' in side and 'SYMLINK+="ganspect-camera-side"' in side
    assert "@" not in top.replace("ganspect-camera-top", "") + side  # no placeholder left


def test_installed_station_configs_validate(two_stations: tuple[Path, list[str]]) -> None:
    root, _ = two_stations
    for name in ("top", "side"):
        check = subprocess.run(
            [
                str(root / "opt/ganspect/venv/bin/python"),
                "-c",
                "import sys; from ganspect.edge.config import load_config; load_config(sys.argv[1])",
                str(root / f"etc/ganspect/stations/{name}.yaml"),
            ],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr


@pytest.mark.needs_tools("systemd-analyze")
def test_template_unit_passes_systemd_analyze_verify_for_both_stations(two_stations: tuple[Path, list[str]]) -> None:
    root, _ = two_stations
    # Instance names: systemd fills %i in from the template, as it will for ganspect-edge@top on the PC.
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            f"--root={root}",
            "--recursive-errors=no",
            "ganspect-edge@top.service",
            "ganspect-edge@side.service",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    unit = (root / "etc/systemd/system/ganspect-edge@.service").read_text(encoding="utf-8")
    assert "--config /etc/ganspect/stations/%i.yaml" in unit
    assert "ReadWritePaths=/var/lib/ganspect/stations/%i\n" in unit  # not the other stations' folders


def test_second_run_of_a_station_keeps_its_config(two_stations: tuple[Path, list[str]]) -> None:
    root, _ = two_stations
    config = root / "etc/ganspect/stations/top.yaml"
    edited = config.read_text(encoding="utf-8").replace("host: 127.0.0.1", "host: broker.plant1")
    config.write_text(edited, encoding="utf-8")
    again = _install(root, "--multi", "--station", "top")  # site and line come from the kept config
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept the existing" in again.stdout
    assert config.read_text(encoding="utf-8") == edited
    # A plain run (software update) on a PC with only --multi stations updates and creates nothing.
    update = _install(root)
    assert update.returncode == 0, update.stdout + update.stderr
    assert "updated the software and the units" in update.stdout
    assert not (root / "etc/ganspect/edge.yaml").exists()
    # A camera given without its station would become the single station's: refused.
    unnamed = _install(root, "--camera-id", "046d:0826")
    assert unnamed.returncode == 2 and "--multi --station NAME" in unnamed.stderr, unnamed.stderr
    assert not (root / "etc/udev/rules.d/70-ganspect-camera.rules").exists()


def test_a_camera_rule_that_would_match_another_stations_camera_is_refused(
    two_stations: tuple[Path, list[str]],
) -> None:
    root, _ = two_stations
    before = sorted(p.relative_to(root) for p in (root / "etc").rglob("*"))
    # 046d:0825 without a serial also matches top's camera (046d:0825:1A2B3C4D).
    result = _install(
        root, "--multi", "--site", "plant1", "--line", "line3", "--station", "end", "--camera-id", "046d:0825"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "70-ganspect-camera-top.rules" in result.stderr and "SERIAL" in result.stderr
    assert sorted(p.relative_to(root) for p in (root / "etc").rglob("*")) == before


def test_uninstalling_one_station_leaves_the_other(two_stations: tuple[Path, list[str]]) -> None:
    root, _ = two_stations
    removed = _install(root, "--uninstall", "--purge", "--multi", "--station", "side")
    assert removed.returncode == 0, removed.stderr
    assert not (root / "etc/ganspect/stations/side.yaml").exists()
    assert not (root / "var/lib/ganspect/stations/side").exists()
    assert not (root / "etc/udev/rules.d/70-ganspect-camera-side.rules").exists()
    assert (root / "etc/ganspect/stations/top.yaml").is_file()
    assert (root / "var/lib/ganspect/stations/top").is_dir()
    assert (root / "etc/udev/rules.d/70-ganspect-camera-top.rules").is_file()
    assert (root / "opt/ganspect/venv/bin/ganspect").is_file()
    assert (root / "etc/systemd/system/ganspect-edge@.service").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--multi", "--site", "p", "--line", "l"), "--multi needs --station"),
        (("--multi", "--station", "s"), "give --site, --line and --station"),
        (("--site", "p", "--line", "l", "--station", "s", "--camera-port", "usb port 2"), "ID_PATH"),
    ],
)
def test_bad_station_arguments_change_nothing(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    root = _scratch_root(tmp_path / "root")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    result = _install(root, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
