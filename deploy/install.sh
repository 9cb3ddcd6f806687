#!/usr/bin/env bash
# Install (or update, or remove) the ganspect edge daemon on a Debian / Ubuntu mini PC.
#
#   sudo deploy/install.sh --site plant1 --line line3 --station cam1
#   sudo deploy/install.sh --uninstall [--purge]
#
# Idempotent: running it again updates the software and the unit, and keeps the config,
# the data (outbox, NG images, models) and the user. docs/deploy.md walks through a
# whole station; `deploy/install.sh --help` lists the options.
set -euo pipefail

usage() {
    cat <<'TXT'
Usage: install.sh [options]

  --site NAME --line NAME --station NAME
                    the station's identity, written into a new /etc/ganspect/edge.yaml
                    (required when there is no config yet; an existing config is kept)
  --opencv gui|headless
                    OpenCV wheel: gui (default) can show the operator window,
                    headless cannot; never both
  --camera-id VENDOR:PRODUCT[:SERIAL]
                    write a udev rule naming that USB camera /dev/ganspect-camera
                    (find the ids with: udevadm info --query=property /dev/video0)
  --source SPEC     what pip installs ganspect from (default: this checkout)
  --python PYTHON   interpreter for the virtual environment (default: python3)
  --root DIR        install under DIR instead of / (tests, image staging): creates the
                    user in DIR/etc/passwd and does not touch systemd or udev
  --no-enable       install the unit but do not enable or start it
  --uninstall       remove the software, unit and udev rule; keep config and data
  --purge           with --uninstall: also remove config, data and the user
  -h, --help        this text
TXT
}

die() { echo "install.sh: error: $*" >&2; exit 2; }
say() { echo "== $*"; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

root=/
site="" line="" station=""
opencv=gui
camera_id=""
source_spec="$repo"
python=python3
enable=yes
uninstall=no
purge=no

while [ $# -gt 0 ]; do
    case "$1" in
        --site) site=${2:?--site needs a value}; shift 2 ;;
        --line) line=${2:?--line needs a value}; shift 2 ;;
        --station) station=${2:?--station needs a value}; shift 2 ;;
        --opencv) opencv=${2:?--opencv needs gui or headless}; shift 2 ;;
        --camera-id) camera_id=${2:?--camera-id needs VENDOR:PRODUCT[:SERIAL]}; shift 2 ;;
        --source) source_spec=${2:?--source needs a value}; shift 2 ;;
        --python) python=${2:?--python needs a value}; shift 2 ;;
        --root|--prefix) root=${2:?--root needs a folder}; shift 2 ;;
        --no-enable) enable=no; shift ;;
        --uninstall) uninstall=yes; shift ;;
        --purge) purge=yes; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

case "$opencv" in
    gui) extra=edge; other_opencv="opencv-python-headless" ;;
    headless) extra=edge-headless; other_opencv="opencv-python" ;;
    *) die "--opencv must be gui or headless, not '$opencv'" ;;
esac
topic_level='^[A-Za-z0-9_.-]+$'
for pair in "site:$site" "line:$line" "station:$station"; do
    value=${pair#*:}
    if [ -n "$value" ] && ! [[ $value =~ $topic_level ]]; then
        die "--${pair%%:*} '$value': use letters, digits, _ . - only (it becomes an MQTT topic level)"
    fi
done
if [ -n "$camera_id" ] && ! [[ $camera_id =~ ^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}(:[A-Za-z0-9_.-]+)?$ ]]; then
    die "--camera-id '$camera_id': expected VENDOR:PRODUCT[:SERIAL], e.g. 046d:0825 (hex ids from udevadm info)"
fi
[ "$purge" = no ] || [ "$uninstall" = yes ] || die "--purge only goes with --uninstall"

root=${root%/}
on_host=no
[ -z "$root" ] && on_host=yes
if [ "$on_host" = yes ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo): it creates a system user, /etc/ganspect and /var/lib/ganspect"
fi
if [ "$on_host" = no ]; then
    [ -d "$root" ] || die "--root $root is not a folder"
    root=$(cd "$root" && pwd)
fi

user=ganspect
app_dir=$root/opt/ganspect
venv=$app_dir/venv
etc_dir=$root/etc/ganspect
config=$etc_dir/edge.yaml
data_dir=$root/var/lib/ganspect
unit=$root/etc/systemd/system/ganspect-edge.service
window_unit=$root/etc/systemd/user/ganspect-edge-window.service
udev_rule=$root/etc/udev/rules.d/70-ganspect-camera.rules
useradd_root=()
[ "$on_host" = yes ] || useradd_root=(--root "$root")

systemd_running() { [ "$on_host" = yes ] && [ -d /run/systemd/system ]; }
user_exists() { grep -q "^$user:" "$root/etc/passwd" 2>/dev/null; }

if [ "$uninstall" = yes ]; then
    if systemd_running; then
        systemctl disable --now ganspect-edge.service 2>/dev/null || true
    fi
    rm -f "$unit" "$window_unit" "$udev_rule"
    rm -rf "$app_dir"
    if systemd_running; then systemctl daemon-reload; fi
    if [ "$purge" = yes ]; then
        rm -rf "$etc_dir" "$data_dir"
        if user_exists; then userdel "${useradd_root[@]}" "$user"; fi
        say "removed ganspect, its config, data and user"
    else
        say "removed ganspect; kept $etc_dir and $data_dir (--purge removes them)"
    fi
    exit 0
fi

# Fail before changing anything.
if [ ! -f "$config" ] && { [ -z "$site" ] || [ -z "$line" ] || [ -z "$station" ]; }; then
    die "there is no $config yet: give --site, --line and --station (the station's identity has no default)"
fi
[ -f "$root/etc/passwd" ] || die "$root/etc/passwd does not exist: --root must hold a system's /etc"
command -v "$python" >/dev/null || die "$python not found (apt-get install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$python is older than Python 3.10"
"$python" -c 'import ensurepip, venv' 2>/dev/null || die "$python cannot create virtual environments (apt-get install python3-venv)"

say "user $user (groups: $user, video)"
if ! grep -q "^video:" "$root/etc/group"; then
    groupadd "${useradd_root[@]}" --system video
fi
if user_exists; then
    usermod "${useradd_root[@]}" --append --groups video "$user"
else
    useradd "${useradd_root[@]}" --system --user-group --groups video --home-dir /var/lib/ganspect \
        --no-create-home --shell /usr/sbin/nologin --comment "ganspect edge daemon" "$user"
fi
# Numeric ids from the target's own /etc/passwd: under --root the user does not exist on this host.
uid=$(awk -F: -v u="$user" '$1 == u { print $3 }' "$root/etc/passwd")
gid=$(awk -F: -v u="$user" '$1 == u { print $4 }' "$root/etc/passwd")

say "software: $venv (ganspect[$extra], no torch)"
install -d -m 0755 "$app_dir" "$app_dir/docs"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# Switching between the gui and headless wheels: the two OpenCV packages share files.
if "$venv/bin/python" -m pip show --quiet "$other_opencv" >/dev/null 2>&1; then
    "$venv/bin/python" -m pip uninstall --quiet --yes "$other_opencv"
fi
if [ -d "$source_spec" ]; then
    spec="ganspect[$extra] @ file://$(cd "$source_spec" && pwd)"
elif [ -f "$source_spec" ]; then
    spec="ganspect[$extra] @ file://$(cd "$(dirname "$source_spec")" && pwd)/$(basename "$source_spec")"
else
    die "--source $source_spec: expected a ganspect checkout or a wheel file"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$spec"
if "$venv/bin/python" -m pip show --quiet torch >/dev/null 2>&1; then
    die "torch was installed into $venv: the edge needs no torch (check --source)"
fi
install -m 0644 "$repo/docs/deploy.md" "$app_dir/docs/deploy.md"

say "config: $config"
install -d -m 0750 -o 0 -g "$gid" "$etc_dir"
if [ -f "$config" ]; then
    echo "   kept the existing $config"
else
    sed -e "s/@SITE@/$site/" -e "s/@LINE@/$line/" -e "s/@STATION@/$station/" \
        "$here/edge.example.yaml" > "$config.new"
    chown 0:"$gid" "$config.new"
    chmod 0640 "$config.new"
    mv "$config.new" "$config"
fi

say "data: $data_dir"
install -d -m 0750 -o "$uid" -g "$gid" "$data_dir" "$data_dir/models"

say "systemd unit: $unit"
install -d -m 0755 "$(dirname "$unit")" "$(dirname "$window_unit")"
install -m 0644 "$here/ganspect-edge.service" "$unit"
install -m 0644 "$here/ganspect-edge-window.service" "$window_unit"

if [ -n "$camera_id" ]; then
    IFS=: read -r vendor product serial <<<"$camera_id"
    match="ATTRS{idVendor}==\"${vendor,,}\", ATTRS{idProduct}==\"${product,,}\""
    [ -n "$serial" ] && match="$match, ATTRS{serial}==\"$serial\""
    say "udev rule: $udev_rule (/dev/ganspect-camera)"
    install -d -m 0755 "$(dirname "$udev_rule")"
    sed -e "s/@MATCH@/$match/" "$here/70-ganspect-camera.rules" > "$udev_rule"
    chmod 0644 "$udev_rule"
    if [ "$on_host" = yes ] && command -v udevadm >/dev/null; then
        udevadm control --reload && udevadm trigger --subsystem-match=video4linux
    fi
fi

if ! systemd_running; then
    say "not enabling the service (no systemd here, or --root): systemctl enable --now ganspect-edge"
elif [ "$enable" = no ]; then
    systemctl daemon-reload
    say "installed, not enabled (--no-enable): systemctl enable --now ganspect-edge"
else
    systemctl daemon-reload
    systemctl enable ganspect-edge.service
    if [ -f "$data_dir/models/current/manifest.json" ]; then
        systemctl restart ganspect-edge.service
        say "ganspect-edge started: journalctl -u ganspect-edge -f"
    else
        say "enabled; install a model, then start it: ganspect edge install-model BUNDLE && systemctl start ganspect-edge"
    fi
fi
say "check the station with: $venv/bin/ganspect doctor --config $config"
