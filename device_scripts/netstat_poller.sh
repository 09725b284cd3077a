#!/system/bin/sh
# Timestamped snapshots of the kernel's socket tables, for labelling flows by uid/inode.
#
# Usage: sh netstat_poller.sh OUTFILE [INTERVAL] [MAX_BYTES] [STOPFILE]
#   OUTFILE    log to write (truncated at start)
#   INTERVAL   seconds to sleep between rounds (default 0.1; fractions need a sleep that
#              takes them, as toybox's and busybox's do)
#   MAX_BYTES  size bound of OUTFILE (default 67108864). A block that would cross it is
#              not written: the poller stops instead (exit 3), so the file never exceeds
#              MAX_BYTES and never ends in a partial block. There is no rotation.
#   STOPFILE   path whose appearance ends the poller (default OUTFILE.stop; a stale one
#              is removed at start)
#
# Output: one block per table and round, each a header line
#     === <epoch seconds with fraction> <tcp|tcp6|udp|udp6>
# followed by the raw content of /proc/net/<table> (its header line included, so the uid
# and inode columns are kept). A table that cannot be read (no IPv6) is skipped.
#
# Time source, best first (chosen once at start, named on stderr):
#   $EPOCHREALTIME   mksh (Android's /system/bin/sh) and bash 5: microseconds, no fork;
#   date +%s.%N      toybox date: nanoseconds;
#   adjtimex         busybox builds whose date lacks %N (it prints "%N"): microseconds;
#   date +%s         anything else: whole seconds, printed as "<seconds>.0".
#
# Stops cleanly after the current block on SIGTERM or SIGINT or when STOPFILE exists;
# exit 0. Exit 2: bad arguments or OUTFILE not writable (at start, or a block could not be
# written: the log ends there); 3: MAX_BYTES reached.
# Start it detached (nohup/setsid) when the adb shell that starts it may close.
# POSIX sh with toybox/busybox applets only (date cat sleep rm, adjtimex if present,
# printf where the shell has no print or printf builtin).

set -u

if [ "$#" -lt 1 ] || [ -z "$1" ]; then
    echo "usage: netstat_poller.sh OUTFILE [INTERVAL] [MAX_BYTES] [STOPFILE]" >&2
    exit 2
fi
OUT=$1
INTERVAL=${2:-0.1}
MAX_BYTES=${3:-67108864}
STOPFILE=${4:-"$OUT.stop"}
TABLES="tcp tcp6 udp udp6"

case "$MAX_BYTES" in
    ''|*[!0-9]*) echo "netstat_poller: MAX_BYTES must be a whole number: $MAX_BYTES" >&2; exit 2 ;;
esac
case "$INTERVAL" in
    ''|*[!0-9.]*|*.*.*) echo "netstat_poller: INTERVAL must be seconds, e.g. 0.1: $INTERVAL" >&2; exit 2 ;;
esac

# --- time source ------------------------------------------------------------------------
TS=""
now_epochrealtime() { TS=$EPOCHREALTIME; }
now_date_ns() { TS=$(date +%s.%N); }
now_adjtimex() {
    TS=$(adjtimex 2>/dev/null | {
        s=""; u=0
        while read -r key val _rest; do
            case "$key" in
                time.tv_sec:) s=$val ;;
                time.tv_usec:) u=$val ;;
            esac
        done
        # Leading zeros would read as octal in printf's %d.
        u=${u#"${u%%[!0]*}"}
        printf '%s.%06d\n' "$s" "${u:-0}"
    })
}
now_seconds() { TS="$(date +%s).0"; }

is_epoch() {
    case "$1" in
        [0-9]*.[0-9]*) case "$1" in *[!0-9.]*) return 1 ;; esac; return 0 ;;
        *) return 1 ;;
    esac
}

NOW=now_seconds
CLOCK="date +%s (whole seconds)"
if is_epoch "${EPOCHREALTIME:-}"; then
    NOW=now_epochrealtime; CLOCK="EPOCHREALTIME (microseconds)"
elif is_epoch "$(date +%s.%N 2>/dev/null)"; then
    NOW=now_date_ns; CLOCK="date +%s.%N (nanoseconds)"
else
    now_adjtimex
    case "$TS" in
        .*|*.) ;;
        *) if is_epoch "$TS"; then NOW=now_adjtimex; CLOCK="adjtimex (microseconds)"; fi ;;
    esac
fi

# --- output -----------------------------------------------------------------------------
# A block is written by a shell builtin: as one argument of an exec'd printf, a table over
# 128 KiB (MAX_ARG_STRLEN; a phone or host with many sockets) is refused with E2BIG and
# the block is lost. mksh (Android's sh) has print but no printf builtin; dash, ash and
# bash have printf.
if [ "$(command -v print 2>/dev/null)" = print ]; then
    put() { print -rn -- "$1"; }
else
    put() { printf '%s' "$1"; }
fi

rm -f "$STOPFILE"
# (true, not ":": a failed redirection on a special builtin ends a POSIX shell)
if ! true 2>/dev/null >"$OUT"; then
    echo "netstat_poller: cannot write $OUT" >&2
    exit 2
fi
exec 3>>"$OUT"
SIZE=0
STOPPING=0
trap 'STOPPING=1' TERM INT
echo "netstat_poller: writing $OUT every ${INTERVAL}s, clock: $CLOCK" >&2

status=0
while [ "$STOPPING" = 0 ] && [ ! -e "$STOPFILE" ]; do
    for t in $TABLES; do
        [ -r "/proc/net/$t" ] || continue
        "$NOW"
        data=$(cat "/proc/net/$t" 2>/dev/null) || continue
        # A signal that arrived while cat ran may have cut it short: drop this block.
        [ "$STOPPING" = 0 ] || break
        block="=== $TS $t
$data
"
        n=${#block}
        if [ $((SIZE + n)) -gt "$MAX_BYTES" ]; then
            echo "netstat_poller: size limit of $MAX_BYTES bytes reached; stopping" >&2
            status=3
            STOPPING=1
            break
        fi
        if ! put "$block" >&3; then
            echo "netstat_poller: writing a $t block to $OUT failed; stopping" >&2
            status=2
            STOPPING=1
            break
        fi
        SIZE=$((SIZE + n))
    done
    [ "$STOPPING" = 0 ] || break
    sleep "$INTERVAL"
done
exec 3>&-
echo "netstat_poller: stopped after $SIZE bytes" >&2
exit "$status"
