#!/usr/bin/env bash
# Issue 6: prove the torch-free device runner trains a bundle on aarch64, under qemu-user
# emulation in a Debian bookworm arm64 chroot. Run as root on Debian/Ubuntu:
#
#   sudo scripts/arm64_check.sh            # everything; the rootfs and wheels are reused
#   sudo scripts/arm64_check.sh --setup    # phases 1-5 only (emulator, rootfs, wheels, smoke test)
#   sudo scripts/arm64_check.sh --int8     # phases 1-5, 6a and 7 (the int8 frozen prefix) only
#
# Environment: ARM64_ROOT (rootfs, default /var/tmp/spfde-arm64-root),
#              ARM64_WHEELS (aarch64 wheel cache, default /var/tmp/spfde-arm64-wheels),
#              ARM64_WORK (bundle, data and runs, default /var/tmp/spfde-arm64-work),
#              PYTHON (host Python with spfde_edge installed, default python3),
#              EPOCHS (device epochs of the compared runs, default 2),
#              INT8_K (phase 7: the int8 prefix is blocks [0, INT8_K), default 8),
#              BUNDLE_FORMAT (2: one weight store + per-block programs, the block chain, default,
#              as the exporter's; 1: per-stage step.onnx),
#              LR (device learning rate of the compared runs, default 0.005 for format 2, 0.05
#              for format 1; docs/device.md says why).
#
# Phases: 1 emulator + binfmt, 2 rootfs (debootstrap, 3-13 min; reused), 3 aarch64 wheels
# downloaded on the host (pip inside the chroot cannot verify this network's TLS), 4 offline
# install into a venv in the rootfs, 5 smoke test (device_runner imports without torch, plain
# onnxruntime runs a tiny model), 6 the same short training run on x86-64 and under emulation,
# compared step by step (scripts/arm64/compare_runs.py), 7 the int8 frozen prefix built and run on
# both (scripts/arm64/int8_features.py), each within the documented error of float32
# (scripts/arm64/compare_int8.py).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${ARM64_ROOT:-/var/tmp/spfde-arm64-root}"
WHEELS="${ARM64_WHEELS:-/var/tmp/spfde-arm64-wheels}"
WORK="${ARM64_WORK:-/var/tmp/spfde-arm64-work}"
PYTHON="${PYTHON:-python3}"
EPOCHS="${EPOCHS:-2}"
BUNDLE_FORMAT="${BUNDLE_FORMAT:-2}"
# Format 2 trains all 17 blocks of the 0.25-wide resnet32 first, then 9: at LR 0.05 some
# 4-channel BatchNorms of this tiny 90 %-sparse net see almost no variance after a few steps and
# amplify last-bit differences (measured: step 9's BatchNorm gradients 2 % apart while its loss
# agrees to 1.6e-8, then the losses separate, 9e-5 at step 10). At 0.005 the same run agrees to
# 7e-8 per step and 4e-6 on every array, which is what this check is for: the arithmetic.
[[ $BUNDLE_FORMAT == 2 ]] && LR="${LR:-0.005}"
LR="${LR:-0.05}"
SUITE=bookworm
DEVICE_DIR=/opt/spfde           # where the repo's device side lives inside the rootfs
VENV=$DEVICE_DIR/venv
PLATFORMS=(--platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
           --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64)
SETUP_ONLY=0
INT8_ONLY=0
case "${1:-}" in
    "") ;;
    --setup) SETUP_ONLY=1 ;;
    --int8) INT8_ONLY=1 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (use --setup, --int8, --help or nothing)" >&2; exit 2 ;;
esac

phase() { printf '\n== %s\n' "$*"; PHASE_START=$SECONDS; }
done_phase() { printf '   done in %ds\n' "$((SECONDS - PHASE_START))"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

[[ $(id -u) == 0 ]] || die "needs root (apt-get, binfmt_misc, chroot): run it with sudo"
command -v apt-get >/dev/null || die "needs a Debian/Ubuntu host with apt-get"

# ---------------------------------------------------------------- 1. emulator and binfmt
phase "1. qemu-user-static, debootstrap and the binfmt entry for qemu-aarch64"
missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    echo "   apt-get install ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null \
        || die "could not install ${missing[*]}: check apt sources and network, or install them by hand"
fi
QEMU="$(command -v qemu-aarch64-static)"
BINFMT=/proc/sys/fs/binfmt_misc
if [[ ! -e $BINFMT/register ]]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" \
        || die "could not mount binfmt_misc at $BINFMT: load the module (modprobe binfmt_misc) or run on a host that allows it"
fi
if [[ -e $BINFMT/qemu-aarch64 ]]; then
    grep -q '^enabled' "$BINFMT/qemu-aarch64" || echo 1 > "$BINFMT/qemu-aarch64"
    echo "   qemu-aarch64 already registered ($(sed -n 's/^interpreter //p' "$BINFMT/qemu-aarch64"))"
else
    # The standard aarch64 ELF magic/mask (as in qemu's scripts/qemu-binfmt-conf.sh). Flag F
    # opens the interpreter now, so it works inside the chroot without copying it there.
    magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    echo ":qemu-aarch64:M::${magic}:${mask}:${QEMU}:F" > "$BINFMT/register" \
        || die "could not register qemu-aarch64 in $BINFMT/register: is another aarch64 handler registered? (ls $BINFMT)"
    echo "   registered qemu-aarch64 -> $QEMU (flag F)"
fi
done_phase

# ---------------------------------------------------------------- 2. arm64 rootfs
phase "2. arm64 $SUITE rootfs at $ROOT"
if [[ -x $ROOT/usr/bin/python3 ]] && in_root python3 -c 'import platform, venv; assert platform.machine() == "aarch64"' 2>/dev/null; then
    echo "   reusing it ($(in_root python3 -c 'import platform; print(platform.python_version(), platform.machine())'))"
else
    [[ -e $ROOT && -n "$(ls -A "$ROOT" 2>/dev/null)" ]] && die "$ROOT exists but has no working aarch64 python3: remove it (umount $ROOT/proc; rm -rf $ROOT) or set ARM64_ROOT"
    echo "   debootstrap --arch=arm64 --variant=minbase (a few minutes)"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip \
        "$SUITE" "$ROOT" http://deb.debian.org/debian >"$ROOT.debootstrap.log" 2>&1 \
        || die "debootstrap failed (log: $ROOT.debootstrap.log; the rootfs debootstrap.log is in $ROOT/debootstrap/): fix the mirror/network, remove $ROOT and rerun"
    in_root python3 -c 'import platform; assert platform.machine() == "aarch64"' \
        || die "the new rootfs's python3 does not run under emulation: check $BINFMT/qemu-aarch64"
fi
done_phase

# Everything mounted below is unmounted on exit, also after a failure.
MOUNTS=()
cleanup() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null \
            || echo "warning: could not unmount ${MOUNTS[i]}; unmount it before deleting $ROOT" >&2
    done
}
trap cleanup EXIT
mount_in_root() {  # mount_in_root TARGET mount-args...
    local target=$1; shift
    mkdir -p "$target"
    mountpoint -q "$target" && return 0
    mount "$@" "$target" || die "could not mount $target"
    MOUNTS+=("$target")
}

# ---------------------------------------------------------------- 3. aarch64 wheels
phase "3. aarch64 wheels for requirements-device.txt into $WHEELS (host pip)"
PY_MM="$(in_root python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
mkdir -p "$WHEELS" "$WORK"
if ! "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: "${PLATFORMS[@]}" \
        --python-version "$PY_MM" --implementation cp -d "$WHEELS" \
        -r "$REPO/requirements-device.txt" -c "$REPO/scripts/arm64/constraints.txt" >"$WORK/pip-download.log" 2>&1; then
    grep -v 'is ignored' "$WORK/pip-download.log" | tail -5 >&2
    die "pip download of aarch64 wheels failed (log: $WORK/pip-download.log): check the package index, or put the wheels in $WHEELS by hand"
fi
echo "   $(ls "$WHEELS"/*.whl | wc -l) wheels ($(du -sh "$WHEELS" | cut -f1)) for cp${PY_MM/./} aarch64"
done_phase

# ---------------------------------------------------------------- 4. offline install
phase "4. install the device side into $ROOT$DEVICE_DIR (venv, no network)"
mount_in_root "$ROOT/proc" -t proc proc   # /proc only: the host's /sys makes onnxruntime crash under qemu
mount_in_root "$ROOT/wheels" --bind "$WHEELS"
# Without /sys, ONNX Runtime's cpuinfo cannot list the CPUs and ORT 1.19 aborts before its
# logger exists ("Attempt to use DefaultLogger but none has been registered"); the host's /sys
# describes x86 CPUs and crashes it too. Two plain files, as on a board, are enough.
if ! mountpoint -q "$ROOT/sys"; then
    mkdir -p "$ROOT/sys/devices/system/cpu"
    for list in possible present; do echo "0-$(($(nproc) - 1))" > "$ROOT/sys/devices/system/cpu/$list"; done
fi
mkdir -p "$ROOT$DEVICE_DIR/scripts"
rm -rf "$ROOT$DEVICE_DIR/device_runner" "$ROOT$DEVICE_DIR/profiles" "$ROOT$DEVICE_DIR/scripts/arm64"
cp -r "$REPO/device_runner" "$REPO/profiles" "$REPO/requirements-device.txt" "$ROOT$DEVICE_DIR/"
cp -r "$REPO/scripts/arm64" "$ROOT$DEVICE_DIR/scripts/"
find "$ROOT$DEVICE_DIR" -name __pycache__ -prune -exec rm -rf {} +
if [[ ! -x $ROOT$VENV/bin/python ]]; then
    echo "   python3 -m venv $VENV"
    in_root python3 -m venv "$VENV" || die "could not create the venv in the rootfs: is python3-venv installed there? (chroot $ROOT apt-get install python3-venv)"
fi
in_root "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-index --find-links /wheels \
    -r "$DEVICE_DIR/requirements-device.txt" -c "$DEVICE_DIR/scripts/arm64/constraints.txt" \
    || die "offline pip install in the rootfs failed (see above): a wheel is missing from $WHEELS; rerun phase 3 or add it"
in_root "$VENV/bin/python" -m pip list --disable-pip-version-check --format=freeze 2>/dev/null \
    | grep -iE '^(onnxruntime|onnx|numpy|protobuf|psutil|pyyaml|pillow)==' | tr '\n' ' ' | sed 's/^/   installed: /; s/$/\n/'
done_phase

# ---------------------------------------------------------------- 5. smoke test
phase "5. smoke test under emulation: import device_runner without torch, run a tiny ONNX model"
(cd / && in_root /usr/bin/env PYTHONPATH="$DEVICE_DIR" PYTHONDONTWRITEBYTECODE=1 \
    "$VENV/bin/python" "$DEVICE_DIR/scripts/arm64/smoke.py") \
    || die "the device side does not work in the rootfs (see above)"
done_phase

if ((SETUP_ONLY)); then
    echo; echo "setup done (phases 1-5); run without --setup for the x86-64 vs arm64 training compare"
    exit 0
fi

# ---------------------------------------------------------------- 6. x86-64 vs arm64 training
phase "6a. bundle, images and profiles on the host (x86-64)"
grep -q suffix_backend "$REPO/profiles/schema.json" \
    || die "this checkout's device_runner has no 'suffix_backend' profile field, so plain onnxruntime cannot train on aarch64 yet; phases 1-5 passed (rerun with --setup to stop there)"
"$PYTHON" -c 'import spfde_edge.export' 2>/dev/null \
    || die "$PYTHON cannot import spfde_edge.export: pip install -e \".[dev]\" in $REPO, or set PYTHON"
BUNDLE="$WORK/bundle"
has_plain_ort_suffix() {  # a bundle of BUNDLE_FORMAT this device_runner reads, plain-ORT trainable everywhere
    [[ -f $BUNDLE/manifest.json ]] && (cd "$REPO" && "$PYTHON" - "$BUNDLE" "$BUNDLE_FORMAT" <<'PY'
import sys
from device_runner.bundle import load_bundle
from device_runner.errors import BundleError
try:
    bundle = load_bundle(sys.argv[1], verify=False)
except BundleError:
    sys.exit(1)
stages = bundle.stages
ok = bundle.format_version == int(sys.argv[2]) and stages and all("onnxruntime" in s.backends for s in stages)
sys.exit(0 if ok else 1)
PY
)
}
if [[ $BUNDLE_FORMAT == 2 ]]; then
    EXPORT_SHAPE=(--bundle-format 2)
else
    EXPORT_SHAPE=(--bundle-format 1 --stages 14-15 --parity-steps 2)
fi
if has_plain_ort_suffix; then
    echo "   reusing $BUNDLE (delete it to export again)"
else
    echo "   python -m spfde_edge.export: resnet32 width 0.25, 16x16, format $BUNDLE_FORMAT, batch 8 (a few minutes)"
    (cd "$REPO" && "$PYTHON" -m spfde_edge.export --model resnet32 --width 0.25 --input-size 16 \
        "${EXPORT_SHAPE[@]}" --batch-size 8 --epochs 30 --delta-tau 2 --freeze-flops 0.2 --force \
        --out "$BUNDLE") >"$WORK/export.log" 2>&1 \
        || { tail -5 "$WORK/export.log" >&2; die "export failed (log: $WORK/export.log)"; }
    has_plain_ort_suffix || die "the exported manifest lists no 'onnxruntime' suffix backend for every stage: the exporter does not write the standard-ONNX training step yet"
fi
rm -rf "$WORK/images" && "$PYTHON" "$REPO/scripts/arm64/make_images.py" "$WORK/images" 8
make_profile() {  # make_profile SOURCE.yaml DEST.yaml: standard-ONNX suffix, one thread
    "$PYTHON" - "$1" "$2" <<'PY'
import sys, yaml
profile = yaml.safe_load(open(sys.argv[1]))
profile["name"] += "-onnxruntime"
profile["suffix_backend"] = "onnxruntime"
profile["budgets"]["threads"] = 1
yaml.safe_dump(profile, open(sys.argv[2], "w"), sort_keys=False)
PY
}
make_profile "$REPO/profiles/generic-x86.yaml" "$WORK/x86-onnxruntime.yaml"
make_profile "$REPO/profiles/raspberry-pi-5.yaml" "$WORK/raspberry-pi-5-onnxruntime.yaml"
DEV_WORK=$DEVICE_DIR/work
rm -rf "$ROOT$DEV_WORK" && mkdir -p "$ROOT$DEV_WORK"
cp -r "$BUNDLE" "$WORK/images" "$WORK/raspberry-pi-5-onnxruntime.yaml" "$ROOT$DEV_WORK/"
# Same seed, data, batch, LR, Δτ and stage schedule on both; one thread so reductions run in one order.
# Format 1 moves to its one later stage at epoch 1; format 2 follows the bundle's freezing plan.
# The feature cache keeps float32: rounding to float16 turns the two machines' last-bit
# differences in a frozen block's output into whole float16 steps now and then (measured:
# 6e-6 on the loss one step after the first cached stage), and prune-and-grow then picks
# other positions; the check compares arithmetic, not that amplification.
FREEZE_AT=(); [[ $BUNDLE_FORMAT == 1 ]] && FREEZE_AT=(--freeze-at 1)
run_args() {  # run_args WORKDIR PROFILE OUT
    echo --bundle "$1/bundle" --profile "$2" --data "imagefolder:$1/images" --epochs "$EPOCHS" \
        "${FREEZE_AT[@]}" --batch-size 8 --delta-tau 1 --lr "$LR" --seed 0 --threads 1 --cache-dtype float32 --out "$3"
}
done_phase

if ((! INT8_ONLY)); then
phase "6b. device_runner on the host (x86-64), $EPOCHS epochs"
rm -rf "$WORK/run-x86"
(cd "$REPO" && "$PYTHON" scripts/arm64/steplog.py $(run_args "$WORK" "$WORK/x86-onnxruntime.yaml" "$WORK/run-x86")) \
    >"$WORK/run-x86.log" 2>&1 || { tail -5 "$WORK/run-x86.log" >&2; die "the x86-64 run failed (log: $WORK/run-x86.log)"; }
done_phase

phase "6c. device_runner in the arm64 rootfs under qemu emulation, $EPOCHS epochs"
in_root /bin/sh -c "cd $DEVICE_DIR && exec $VENV/bin/python scripts/arm64/steplog.py $(run_args "$DEV_WORK" \
    "$DEV_WORK/raspberry-pi-5-onnxruntime.yaml" "$DEV_WORK/run-arm64")" >"$WORK/run-arm64.log" 2>&1 \
    || { tail -5 "$WORK/run-arm64.log" >&2; die "the arm64 run failed under emulation (log: $WORK/run-arm64.log)"; }
cp "$WORK/run-arm64.log" "$ROOT$DEV_WORK/run-arm64/stdout.log"
done_phase

phase "6d. compare (tolerance: relative 1e-4 on losses and weights)"
"$PYTHON" "$REPO/scripts/arm64/compare_runs.py" "$WORK/run-x86" "$ROOT$DEV_WORK/run-arm64" \
    --names x86-64 "arm64 under qemu emulation" \
    || die "x86-64 and arm64 runs differ (tables above; runs in $WORK/run-x86 and $ROOT$DEV_WORK/run-arm64)"
echo "   (arm64 times and peak RSS are under qemu emulation, including the emulator's own memory: not a board's)"
done_phase
fi

# ---------------------------------------------------------------- 7. int8 frozen prefix
# The same bundle's first half quantized on each machine from the same digits (the device
# calibrates on its own samples), float32 and int8 features of unseen digits compared.
INT8_K="${INT8_K:-8}"
phase "7. int8 frozen prefix (blocks 0..$((INT8_K - 1))) on x86-64 and under emulation"
(cd "$REPO" && PYTHONPATH="$REPO" "$PYTHON" scripts/arm64/int8_features.py "$BUNDLE" "$INT8_K" "$WORK/int8-x86.npz") \
    || die "the int8 prefix on x86-64 failed (above)"
in_root /bin/sh -c "cd $DEVICE_DIR && PYTHONPATH=$DEVICE_DIR exec $VENV/bin/python scripts/arm64/int8_features.py \
    $DEV_WORK/bundle $INT8_K $DEV_WORK/int8-arm64.npz" || die "the int8 prefix failed under emulation (above)"
(cd "$REPO" && PYTHONPATH="$REPO" "$PYTHON" scripts/arm64/compare_int8.py "$WORK/int8-x86.npz" "$ROOT$DEV_WORK/int8-arm64.npz") \
    || die "the int8 prefix is outside its documented error on one machine (table above)"
done_phase
