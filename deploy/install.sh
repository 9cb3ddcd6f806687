#!/usr/bin/env bash
# Install (or update, or remove) the ganspect edge daemon on a Debian / Ubuntu mini PC.
#
#   sudo deploy/install.sh --site plant1 --line line3 --station cam1
#   sudo deploy/install.sh --multi --site plant1 --line line3 --station top --camera-id 046d:0825:1A2B3C4D
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
  --multi           this station is one of several cameras on this PC, run once per
                    camera: its own unit ganspect-edge@STATION, config
                    /etc/ganspect/stations/STATION.yaml, data folder
                    /var/lib/ganspect/stations/STATION and camera name
                    /dev/ganspect-camera-STATION (--station is always needed)
  --opencv gui|headless
                    OpenCV wheel: gui (default) can show the operator window,
                    headless cannot; never both
  --camera-id VENDOR:PRODUCT[:SERIAL]
                    write a udev rule naming that USB camera /dev/ganspect-camera
                    (with --multi: /dev/ganspect-camera-STATION)
                    (find the ids with: udevadm info --query=property /dev/video0)
  --camera-port ID_PATH
                    the same by the USB port the camera is plugged into, for cameras
                    without serial numbers (udevadm info ... | grep ID_PATH=, or the
                    names in /dev/v4l/by-path/ without -video-index0)
  --source SPEC     what pip installs ganspect from (default: this checkout)
  --python PYTHON   interpreter for the virtual environment (default: python3)
  --root DIR        install under DIR instead of / (tests, image staging): creates the
                    user in DIR/etc/passwd and does not touch systemd or udev
  --no-enable       install the unit but do not enable or start it
  --uninstall       remove the software, units and udev rules; keep config and data
                    (with --multi --station NAME: only that station's unit and udev rule)
  --purge           with --uninstall: also remove config, data and the user
                    (with --multi --station NAME: that station's config and data)
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
camera_port=""
multi=no
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
        --camera-port) camera_port=${2:?--camera-port needs an ID_PATH}; shift 2 ;;
        --multi) multi=yes; shift ;;
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
if [ -n "$camera_port" ] && ! [[ $camera_port =~ ^[A-Za-z0-9_.:-]+$ ]]; then
    die "--camera-port '$camera_port': expected an ID_PATH such as pci-0000:00:14.0-usb-0:2:1.0 (udevadm info)"
fi
[ "$purge" = no ] || [ "$uninstall" = yes ] || die "--purge only goes with --uninstall"
if [ "$multi" = yes ] && [ -z "$station" ]; then
    die "--multi needs --station NAME: it names the station's unit ganspect-edge@NAME, config and data folder"
fi

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
data_dir=$root/var/lib/ganspect
unit=$root/etc/systemd/system/ganspect-edge.service
template_unit=$root/etc/systemd/system/ganspect-edge@.service
window_unit=$root/etc/systemd/user/ganspect-edge-window.service
rules_dir=$root/etc/udev/rules.d
# One station per PC (ganspect-edge.service), or one of several (ganspect-edge@NAME.service):
# the same software, each station its own config, data folder (outbox, images, models) and camera name.
# Paths without $root are what the config and the units name on the station itself.
if [ "$multi" = yes ]; then
    station_config=/etc/ganspect/stations/$station.yaml
    station_data=/var/lib/ganspect/stations/$station
    service=ganspect-edge@$station.service
    camera_link=ganspect-camera-$station
    # One onnxruntime thread per daemon: see "Several cameras" in docs/deploy.md for the figures.
    threads=1
else
    station_config=/etc/ganspect/edge.yaml
    station_data=/var/lib/ganspect
    service=ganspect-edge.service
    camera_link=ganspect-camera
    threads=0
fi
config=$root$station_config
udev_rule=$rules_dir/70-$camera_link.rules
useradd_root=()
[ "$on_host" = yes ] || useradd_root=(--root "$root")

systemd_running() { [ "$on_host" = yes ] && [ -d /run/systemd/system ]; }
user_exists() { grep -q "^$user:" "$root/etc/passwd" 2>/dev/null; }

if [ "$uninstall" = yes ] && [ "$multi" = yes ]; then
    if systemd_running; then
        systemctl disable --now "$service" 2>/dev/null || true
    fi
    rm -f "$udev_rule"
    if [ "$purge" = yes ]; then
        rm -rf "$config" "$root$station_data"
        say "removed station $station, its config and data; the software and the other stations stay"
    else
        say "removed station $station's unit and udev rule; kept $config and $root$station_data (--purge removes them)"
    fi
    exit 0
fi
if [ "$uninstall" = yes ]; then
    if systemd_running; then
        systemctl disable --now ganspect-edge.service 'ganspect-edge@*.service' 2>/dev/null || true
    fi
    rm -f "$unit" "$template_unit" "$window_unit" "$rules_dir"/70-ganspect-camera*.rules
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

stations() { find "$etc_dir/stations" -maxdepth 1 -name '*.yaml' 2>/dev/null | sort; }

# Fail before changing anything.
# A plain run on a PC that has only --multi stations updates the software and the units.
update_only=no
if [ "$multi" = no ] && [ ! -f "$config" ] && [ -z "$site$line$station" ] && [ -n "$(stations)" ]; then
    update_only=yes
    if [ -n "$camera_id$camera_port" ]; then
        die "this PC has --multi stations ($etc_dir/stations): name the camera's station, --multi --station NAME"
    fi
elif [ ! -f "$config" ] && { [ -z "$site" ] || [ -z "$line" ] || [ -z "$station" ]; }; then
    die "there is no $config yet: give --site, --line and --station (the station's identity has no default)"
fi
match=""
if [ -n "$camera_id" ]; then
    IFS=: read -r vendor product serial <<<"$camera_id"
    match="ATTRS{idVendor}==\"${vendor,,}\", ATTRS{idProduct}==\"${product,,}\""
    [ -n "$serial" ] && match="$match, ATTRS{serial}==\"$serial\""
fi
if [ -n "$camera_port" ]; then
    # ID_PATH comes from 60-persistent-v4l.rules (path_id), which runs before this 70- rule.
    match="${match:+$match, }ENV{ID_PATH}==\"$camera_port\""
fi
if [ -n "$match" ]; then
    # Two rules that match the same camera would give two stations one camera, at random. The
    # clauses come in one order, so a rule whose match starts the other's matches its camera too.
    for other in "$rules_dir"/70-ganspect-camera*.rules; do
        if [ ! -f "$other" ] || [ "$other" = "$udev_rule" ]; then continue; fi
        theirs=$(sed -n 's/^SUBSYSTEM=="video4linux", KERNEL=="video\[0-9\]\*", \(.*\), ATTR{index}.*/\1/p' "$other")
        if [ -n "$theirs" ] && { [[ $match == "$theirs"* ]] || [[ $theirs == "$match"* ]]; }; then
            die "$other already names a camera that $match also matches: give each camera's SERIAL (--camera-id VENDOR:PRODUCT:SERIAL) or --camera-port"
        fi
    done
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

install -d -m 0750 -o 0 -g "$gid" "$etc_dir"
install -d -m 0750 -o "$uid" -g "$gid" "$data_dir" "$data_dir/models"
if [ "$update_only" = no ]; then
    say "config: $config"
    [ "$multi" = no ] || install -d -m 0750 -o 0 -g "$gid" "$etc_dir/stations"
    if [ -f "$config" ]; then
        echo "   kept the existing $config"
    else
        sed -e "s/@SITE@/$site/" -e "s/@LINE@/$line/" -e "s/@STATION@/$station/" -e "s/@THREADS@/$threads/" \
            -e "s|@CONFIG@|$station_config|" -e "s|@DATA@|$station_data|" -e "s|@CAMERA@|/dev/$camera_link|" \
            -e "s|@SERVICE@|${service%.service}|" "$here/edge.example.yaml" > "$config.new"
        chown 0:"$gid" "$config.new"
        chmod 0640 "$config.new"
        mv "$config.new" "$config"
    fi
    say "data: $root$station_data"
    [ "$multi" = no ] || install -d -m 0750 -o "$uid" -g "$gid" "$data_dir/stations"
    install -d -m 0750 -o "$uid" -g "$gid" "$root$station_data" "$root$station_data/models"
    if [ "$multi" = no ] && [ -n "$(stations)" ]; then
        echo "   note: this PC also has --multi stations ($etc_dir/stations); this one runs as ganspect-edge.service"
    fi
fi

# Both system units, always: one software install serves the single station and every --multi one.
say "systemd units: $unit, $template_unit"
install -d -m 0755 "$(dirname "$unit")" "$(dirname "$window_unit")"
install -m 0644 "$here/ganspect-edge.service" "$unit"
install -m 0644 "$here/ganspect-edge@.service" "$template_unit"
install -m 0644 "$here/ganspect-edge-window.service" "$window_unit"

if [ -n "$match" ]; then
    say "udev rule: $udev_rule (/dev/$camera_link)"
    install -d -m 0755 "$rules_dir"
    sed -e "s/@MATCH@/$match/" -e "s/@NAME@/$camera_link/g" "$here/70-ganspect-camera.rules" > "$udev_rule"
    chmod 0644 "$udev_rule"
    if [ "$on_host" = yes ] && command -v udevadm >/dev/null; then
        udevadm control --reload && udevadm trigger --subsystem-match=video4linux
    fi
fi

unit_name=${service%.service}
if ! systemd_running; then
    if [ "$update_only" = yes ]; then
        say "updated the software and the units (no systemd here, or --root): restart the stations"
    else
        say "not enabling the service (no systemd here, or --root): systemctl enable --now $unit_name"
    fi
else
    systemctl daemon-reload
    # Running daemons get the new software now, not at their next crash.
    systemctl try-restart ganspect-edge.service 'ganspect-edge@*.service'
    if [ "$update_only" = yes ]; then
        say "updated the software and the units; running stations restarted"
    elif [ "$enable" = no ]; then
        say "installed, not enabled (--no-enable): systemctl enable --now $unit_name"
    else
        systemctl enable "$service"
        if [ -f "$root$station_data/models/current/manifest.json" ]; then
            systemctl restart "$service"
            say "$unit_name started: journalctl -u $unit_name -f"
        else
            say "enabled; install a model, then start it: ganspect edge install-model BUNDLE --config $station_config && systemctl start $unit_name"
        fi
    fi
fi
if [ "$update_only" = yes ]; then
    say "check every station with: $venv/bin/ganspect doctor"
else
    say "check the station with: $venv/bin/ganspect doctor --config $config (every station: ganspect doctor)"
fi
