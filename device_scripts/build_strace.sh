#!/bin/sh
# Cross-compile a pinned strace release as static binaries for Android phones.
#
# Usage: build_strace.sh [ABI...]      ABI: arm64-v8a (aarch64) and/or armeabi-v7a (armhf);
#                                      default: both.
#
# Runs on a Debian/Ubuntu host, not on the phone. For each ABI it:
#   1. reuses the cached binary when it exists, matches its .sha256 and runs under qemu-user;
#   2. otherwise fetches Debian's source package of strace $STRACE_DEBIAN_VERSION with
#      `apt-get source` through a private apt state (deb-src entries derived from the
#      host's own enabled `deb` entries, in a temporary directory: the host's apt
#      configuration is never modified), unpacks it with dpkg-source (Debian patches
#      applied), configures with --host=<triplet> LDFLAGS=-static, builds and strips it;
#   3. stores it as ${XDG_CACHE_HOME:-$HOME/.cache}/flowtruth/strace/<version>/<abi>/strace
#      with strace.sha256 beside it, checks that `qemu-<arch> strace -V` prints the
#      pinned version, and prints the binary's path on stdout (one line per ABI).
#
# The 32-bit personality decoder (mpers m32) is requested with --enable-mpers=check: it is
# built where the cross compiler can also produce the 32-bit ABI, and configure silently
# drops it otherwise. For aarch64, strace's configure uses arm-linux-gnueabihf-gcc as the
# 32-bit compiler (CC_FOR_M32) and needs gawk for mpers.sh; without them the aarch64
# binary traces 32-bit (arm) processes with the generic decoders only. The build says
# which case applied (BUILD_LOG lines on stderr).
#
# Needs: gcc-aarch64-linux-gnu / gcc-arm-linux-gnueabihf (with their libc6-dev-*-cross),
# make, dpkg-dev, xz-utils, qemu-user (or qemu-user-static). As root, missing ones are
# installed with apt-get; otherwise the script names them and exits 2.
# Environment: STRACE_DEBIAN_VERSION (default pinned below), FLOWTRUTH_STRACE_JOBS
# (parallel make jobs, default 2), FLOWTRUTH_STRACE_WORKDIR (build directory, default a
# fresh temporary one that is removed at exit), FLOWTRUTH_STRACE_FORCE=1 rebuilds.
# Exit: 0 all requested ABIs built or cached, 1 a build or verification failed,
# 2 bad usage or missing tools.
set -eu

# Debian bookworm's strace; the upstream version is the part before the Debian revision.
STRACE_DEBIAN_VERSION=${STRACE_DEBIAN_VERSION:-6.1-0.1}
STRACE_VERSION=${STRACE_DEBIAN_VERSION%-*}
JOBS=${FLOWTRUTH_STRACE_JOBS:-2}
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/flowtruth/strace/$STRACE_VERSION"

log() { printf 'build_strace: %s\n' "$*" >&2; }
die() { code="$1"; shift; log "error: $*"; exit "$code"; }

abi_triplet() {
    case "$1" in
        arm64-v8a|aarch64|arm64) echo aarch64-linux-gnu ;;
        armeabi-v7a|armhf|arm) echo arm-linux-gnueabihf ;;
        *) return 1 ;;
    esac
}
abi_name() {
    case "$1" in
        arm64-v8a|aarch64|arm64) echo arm64-v8a ;;
        armeabi-v7a|armhf|arm) echo armeabi-v7a ;;
        *) return 1 ;;
    esac
}
abi_qemu() {
    case "$1" in
        arm64-v8a) echo qemu-aarch64 ;;
        armeabi-v7a) echo qemu-arm ;;
    esac
}
abi_packages() {
    case "$1" in
        # The armhf compiler doubles as strace's CC_FOR_M32 for the 32-bit personality.
        arm64-v8a) echo gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross ;;
        armeabi-v7a) echo gcc-arm-linux-gnueabihf libc6-dev-armhf-cross ;;
    esac
}

# Prints a qemu binary for the ABI (qemu-user or qemu-user-static naming), or fails.
find_qemu() {
    q=$(abi_qemu "$1")
    for c in "$q" "$q-static"; do
        if command -v "$c" >/dev/null 2>&1; then command -v "$c"; return 0; fi
    done
    return 1
}

# Runs the binary's -V under qemu and checks it names the pinned version.
verify_binary() {
    bin="$1"; abi="$2"
    qemu=$(find_qemu "$abi") || { log "no qemu for $abi"; return 1; }
    out=$("$qemu" "$bin" -V 2>&1) || { log "$qemu $bin -V failed: $out"; return 1; }
    first=$(printf '%s\n' "$out" | head -n 1)
    case "$first" in
        *"version $STRACE_VERSION"*) log "verified $abi: $first" ;;
        *) log "unexpected -V output for $abi: $first"; return 1 ;;
    esac
}

sha_ok() {
    bin="$1"
    [ -f "$bin" ] && [ -f "$bin.sha256" ] || return 1
    want=$(cut -d' ' -f1 <"$bin.sha256")
    have=$(sha256sum "$bin" | cut -d' ' -f1)
    [ -n "$want" ] && [ "$want" = "$have" ]
}

ensure_tools() {
    need=""
    for abi in "$@"; do
        t=$(abi_triplet "$abi")
        for c in arm-linux-gnueabihf "$t"; do
            command -v "$c-gcc" >/dev/null 2>&1 || need="$need $(abi_packages "$abi")"
            [ -d "/usr/$c/include" ] || need="$need $(abi_packages "$abi")"
        done
        find_qemu "$abi" >/dev/null || need="$need qemu-user"
    done
    command -v make >/dev/null 2>&1 || need="$need make"
    # strace's mpers.sh (the m32 decoder generator) is written for gawk.
    command -v gawk >/dev/null 2>&1 || need="$need gawk"
    command -v dpkg-source >/dev/null 2>&1 || need="$need dpkg-dev"
    command -v xz >/dev/null 2>&1 || need="$need xz-utils"
    command -v apt-get >/dev/null 2>&1 || die 2 "apt-get not found: this script needs a Debian/Ubuntu host"
    [ -z "$need" ] && return 0
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    need=$(printf '%s\n' $need | sort -u | tr '\n' ' ')
    if [ "$(id -u)" -ne 0 ]; then
        die 2 "missing build tools; install them with: sudo apt-get install $need"
    fi
    log "installing: $need"
    apt-get update -qq >&2 || die 2 "apt-get update failed"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >&2 \
        || die 2 "apt-get install $need failed"
}

# Fetches and unpacks Debian's strace source into "$WORK/src"; uses a private apt state so
# that the host's configuration is untouched.
fetch_source() {
    apt_dir="$WORK/apt"
    mkdir -p "$apt_dir/parts" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$WORK/dl"
    n=0
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        n=$((n + 1))
        sed 's/^Types:.*/Types: deb-src/' "$f" >"$apt_dir/parts/src$n.sources"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        n=$((n + 1))
        sed -n 's/^[[:space:]]*deb[[:space:]]/deb-src /p' "$f" >"$apt_dir/parts/src$n.list"
    done
    [ "$n" -gt 0 ] || die 1 "no apt sources found to derive deb-src entries from"
    set -- -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir/parts" \
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" \
        -o "Dir::State::status=/var/lib/dpkg/status" -o "APT::Sandbox::User=root"
    log "fetching source index (private apt state in $apt_dir)"
    apt-get "$@" update -qq >&2 || die 1 "apt-get update for deb-src entries failed"
    (cd "$WORK/dl" && apt-get "$@" source --download-only -qq "strace=$STRACE_DEBIAN_VERSION" >&2) \
        || die 1 "apt-get source strace=$STRACE_DEBIAN_VERSION failed"
    dsc="$WORK/dl/strace_$STRACE_DEBIAN_VERSION.dsc"
    [ -f "$dsc" ] || die 1 "source package did not provide $dsc"
    # apt checked every file against the signed Sources index; dpkg-source re-checks the
    # .dsc checksums and applies Debian's patches.
    dpkg-source --no-check -x "$dsc" "$WORK/src" >&2 || die 1 "dpkg-source -x failed"
}

build_one() {
    abi="$1"
    t=$(abi_triplet "$abi")
    bdir="$WORK/build-$abi"
    blog="$WORK/build-$abi.log"
    rm -rf "$bdir"; mkdir -p "$bdir"
    log "configuring for $abi ($t); log in $blog"
    m32cc=""
    if [ "$abi" = arm64-v8a ] && command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1; then
        m32cc=arm-linux-gnueabihf-gcc
    fi
    (cd "$bdir" && "$WORK/src/configure" --host="$t" --enable-mpers=check \
        ${m32cc:+"CC_FOR_M32=$m32cc"} \
        --disable-gcc-Werror --without-libdw --without-libunwind --without-libiberty \
        --disable-dependency-tracking --disable-silent-rules \
        LDFLAGS=-static >"$blog" 2>&1) || { tail -n 30 "$blog" >&2; return 1; }
    m32=$(sed -n 's/^#define HAVE_M32_MPERS \(.*\)/\1/p' "$bdir/src/config.h" 2>/dev/null || :)
    if [ "$abi" = arm64-v8a ]; then
        if [ "$m32" = "1" ]; then
            log "BUILD_LOG $abi: 32-bit personality decoder (m32 mpers) enabled"
        else
            log "BUILD_LOG $abi: m32 mpers unavailable (see 'm32' in $blog); generic 32-bit decoding only"
        fi
    fi
    log "building $abi with $JOBS jobs"
    (cd "$bdir" && make -j"$JOBS" >>"$blog" 2>&1) || { tail -n 30 "$blog" >&2; return 1; }
    bin="$bdir/src/strace"
    [ -f "$bin" ] || bin="$bdir/strace"
    [ -f "$bin" ] || { log "no strace binary after make for $abi"; return 1; }
    "$t-strip" "$bin" || return 1
    if command -v file >/dev/null 2>&1; then
        log "$abi: $(file -b "$bin")"
    fi
    dest="$CACHE_ROOT/$abi"
    mkdir -p "$dest"
    cp "$bin" "$dest/strace.tmp"
    mv "$dest/strace.tmp" "$dest/strace"
    chmod 0755 "$dest/strace"
    (cd "$dest" && sha256sum strace >strace.sha256)
}

# --- arguments -------------------------------------------------------------------------
[ "$#" -gt 0 ] || set -- arm64-v8a armeabi-v7a
abis=""
for a in "$@"; do
    case "$a" in
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    esac
    n=$(abi_name "$a") || die 2 "unknown ABI '$a' (use arm64-v8a or armeabi-v7a)"
    abis="$abis $n"
done

# Reuse what is cached and still verifies.
todo=""
for abi in $abis; do
    bin="$CACHE_ROOT/$abi/strace"
    if [ "${FLOWTRUTH_STRACE_FORCE:-0}" != 1 ] && sha_ok "$bin" && find_qemu "$abi" >/dev/null \
        && verify_binary "$bin" "$abi"; then
        log "cached: $bin"
    else
        todo="$todo $abi"
    fi
done

if [ -n "$todo" ]; then
    # shellcheck disable=SC2086  # ABI names contain no blanks
    ensure_tools $todo
    if [ -n "${FLOWTRUTH_STRACE_WORKDIR:-}" ]; then
        WORK="$FLOWTRUTH_STRACE_WORKDIR"
        mkdir -p "$WORK"
    else
        WORK=$(mktemp -d "${TMPDIR:-/tmp}/flowtruth-strace.XXXXXX")
        trap 'rm -rf "$WORK"' EXIT
        trap 'exit 130' INT TERM
    fi
    [ -x "$WORK/src/configure" ] || { rm -rf "$WORK/src"; fetch_source; }
    failed=0
    for abi in $todo; do
        if build_one "$abi" && sha_ok "$CACHE_ROOT/$abi/strace" \
            && verify_binary "$CACHE_ROOT/$abi/strace" "$abi"; then
            :
        else
            log "build of $abi failed"
            failed=1
        fi
    done
    [ "$failed" -eq 0 ] || exit 1
fi

for abi in $abis; do
    printf '%s\n' "$CACHE_ROOT/$abi/strace"
done
