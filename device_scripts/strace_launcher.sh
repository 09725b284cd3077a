#!/system/bin/sh
# Keeps strace attached to every process of one Android package, for as long as it runs.
#
# Usage: sh strace_launcher.sh PACKAGE OUTDIR STRACE [INTERVAL] [ROLE]
#   PACKAGE   the package, e.g. org.thoughtcrime.securesms
#   OUTDIR    directory for the logs (created)
#   STRACE    the strace binary (the static one pushed by the controller)
#   INTERVAL  seconds between scans for new processes (default 0.5)
#   ROLE      all (default): trace every process of the package;
#             secondary: skip the main process (argv[0] == PACKAGE), which frida traces
#             under --tracer both, so that no pid is traced by both
#
# The package's processes are the one `pidof PACKAGE` finds (toybox and busybox pidof
# match the basename of argv[0], which Android's zygote sets to the package name) and the
# secondary ones whose argv[0] is "PACKAGE:<name>" (found through /proc/<pid>/cmdline).
# Each candidate's argv[0] is re-checked before it is traced. Every process not yet
# traced gets its own
#     STRACE -f -ttt -yy -s 32 -A -e trace=%network,close,dup,dup2,dup3 -e signal=SIGSYS
#            -o OUTDIR/strace.<pid>.log -p <pid>   2>>OUTDIR/strace.<pid>.err
# Log names derive from the pid only: a process name may be longer than a file name may
# be, or hold a newline. strace's own stderr (attach failures, SELinux denials) goes to
# strace.<pid>.err; SIGSYS (a seccomp filter's kill) is the only signal logged. -A
# appends, so a re-attach never truncates an earlier log. When a traced process exits
# its strace exits too and the pid is forgotten; a restarted app's new pids are found
# by the next scan. Syscalls a new process makes before that scan (up to INTERVAL
# after it starts) are not seen. A strace that exits while its process lives is retried
# up to 3 times, then the pid is given up (logged).
#
# Files in OUTDIR besides the logs:
#   strace.exclude         pids never to trace, one per line (optional; re-read each scan)
#   strace_launcher.pids   "<pid> <strace pid> <procname>" for every traced process,
#                          rewritten when the set changes
#   strace_launcher.procs  "<pid> <procname>" for every process it ever tried to trace
#                          (appended; the controller names the pulled logs with it)
#   strace.<pid>.err       strace's own stderr for that process
# <procname> is argv[0] on one line, characters other than [A-Za-z0-9._:-] replaced by
# "_", cut to 100 characters.
#   strace_launcher.stop   create it to stop (a stale one is removed at start)
# Stopping (stop file, SIGTERM or SIGINT): every strace gets SIGTERM, on which it
# detaches and exits; one still running after 3 s gets SIGKILL (the kernel then detaches
# its tracees). Exit 0 after a stop; 2 on bad arguments.
# Start it detached (nohup/setsid) when the adb shell that starts it may close; never
# SIGKILL the launcher itself, or its stracers are left running.
# POSIX sh with toybox/busybox applets only (pidof grep xargs echo sed mkdir mv rm sleep
# kill readlink); every value is quoted.

set -u

log() { printf 'strace_launcher: %s\n' "$*" >&2; }

if [ "$#" -lt 3 ]; then
    echo "usage: strace_launcher.sh PACKAGE OUTDIR STRACE [INTERVAL] [ROLE]" >&2
    exit 2
fi
PKG=$1
OUTDIR=$2
STRACE=$3
INTERVAL=${4:-0.5}
ROLE=${5:-all}

case "$PKG" in
    ''|*[!A-Za-z0-9._]*) log "not a package name: $PKG"; exit 2 ;;
esac
case "$INTERVAL" in
    ''|*[!0-9.]*|*.*.*) log "INTERVAL must be seconds, e.g. 0.5: $INTERVAL"; exit 2 ;;
esac
case "$ROLE" in
    all|secondary) ;;
    *) log "ROLE must be all or secondary: $ROLE"; exit 2 ;;
esac
if [ ! -x "$STRACE" ]; then
    log "strace binary not executable: $STRACE"
    exit 2
fi
if ! mkdir -p "$OUTDIR" 2>/dev/null || [ ! -w "$OUTDIR" ]; then
    log "cannot write to $OUTDIR"
    exit 2
fi

STOPFILE="$OUTDIR/strace_launcher.stop"
EXCLUDEFILE="$OUTDIR/strace.exclude"
PIDSFILE="$OUTDIR/strace_launcher.pids"
PROCSFILE="$OUTDIR/strace_launcher.procs"
rm -f "$STOPFILE"

TRACED=""    # "<pid>:<strace pid>:<procname>" words
FAILS=""     # "<pid>:<count>" words
GIVENUP=" "  # " <pid> " words
STOPPING=0
trap 'STOPPING=1' TERM INT

# True while the process exists and is not a zombie (a dead child this shell has not
# reaped yet still answers kill -0).
alive() {
    st=""
    { read -r st <"/proc/$1/stat"; } 2>/dev/null || return 1
    st=${st##*) }
    st=${st%% *}
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# argv[0] of a process (empty if it is gone). xargs -0 rather than tr, which some toybox
# builds lack; a package's argv[0] has no blanks.
argv0() {
    a=$(xargs -0 echo 2>/dev/null <"/proc/$1/cmdline")
    printf '%s\n' "${a%% *}"
}

# Candidate pids: the main process and the "PACKAGE:*" ones, unverified.
candidates() {
    pidof "$PKG" 2>/dev/null
    grep -l -s -F -e "$PKG:" /proc/[0-9]*/cmdline 2>/dev/null | while IFS= read -r f; do
        f=${f#/proc/}
        printf '%s\n' "${f%/cmdline}"
    done
}

# True when the process lives in another network namespace than this script: on a phone
# every app shares one, so nothing is skipped there; where phones are namespaces of one
# host (the virtual lab), another phone's processes are not this phone's.
OWNNS=$(readlink "/proc/$$/ns/net" 2>/dev/null)
other_netns() {
    [ -n "$OWNNS" ] || return 1
    ns=$(readlink "/proc/$1/ns/net" 2>/dev/null)
    [ -n "$ns" ] && [ "$ns" != "$OWNNS" ]
}

is_traced() {
    for e in $TRACED; do
        [ "${e%%:*}" = "$1" ] && return 0
    done
    return 1
}

fail_count() {
    for e in $FAILS; do
        if [ "${e%%:*}" = "$1" ]; then
            echo "${e#*:}"
            return 0
        fi
    done
    echo 0
}

set_fail_count() {
    rest=""
    for e in $FAILS; do
        [ "${e%%:*}" = "$1" ] || rest="$rest $e"
    done
    FAILS="$rest $1:$2"
}

write_pidsfile() {
    {
        for e in $TRACED; do
            p=${e%%:*}
            r=${e#*:}
            printf '%s %s %s\n' "$p" "${r%%:*}" "${r#*:}"
        done
    } >"$PIDSFILE.tmp" && mv -f "$PIDSFILE.tmp" "$PIDSFILE"
}

NL='
'
# A process name as one safe word: lines joined with "_", [A-Za-z0-9._:-] only, at most
# 100 characters.
safe_name() {
    n=$1
    while :; do
        case "$n" in
            *"$NL"*) n="${n%%"$NL"*}_${n#*"$NL"}" ;;
            *) break ;;
        esac
    done
    n=$(printf '%s\n' "$n" | sed -e 's/[^A-Za-z0-9._:-]/_/g' -e 's/^\(.\{100\}\).*/\1/')
    printf '%s\n' "${n:-unnamed}"
}

start_trace() {
    pid=$1
    name=$(safe_name "$2")
    out="$OUTDIR/strace.$pid.log"
    grep -q -s "^$pid " "$PROCSFILE" || printf '%s %s\n' "$pid" "$name" >>"$PROCSFILE"
    "$STRACE" -f -ttt -yy -s 32 -A -e trace=%network,close,dup,dup2,dup3 -e signal=SIGSYS \
        -o "$out" -p "$pid" </dev/null 2>>"$OUTDIR/strace.$pid.err" &
    spid=$!
    TRACED="$TRACED $pid:$spid:$name"
    log "tracing $pid ($name) with strace $spid into $out"
}

# Forget stracers that exited: their process exited (app restart) or attaching failed.
reap() {
    keep=""
    changed=1
    for e in $TRACED; do
        p=${e%%:*}
        r=${e#*:}
        s=${r%%:*}
        if alive "$s"; then
            keep="$keep $e"
            continue
        fi
        wait "$s" 2>/dev/null
        changed=0
        if alive "$p"; then
            n=$(( $(fail_count "$p") + 1 ))
            set_fail_count "$p" "$n"
            if [ "$n" -ge 3 ]; then
                GIVENUP="$GIVENUP$p "
                log "strace for $p exited $n times while the process lives; giving up on it"
            else
                log "strace for $p exited while the process lives; retrying"
            fi
        else
            log "process $p exited"
        fi
    done
    TRACED=$keep
    return "$changed"
}

scan() {
    changed=1
    excluded=" "
    if [ -r "$EXCLUDEFILE" ]; then
        while read -r x _rest; do
            excluded="$excluded$x "
        done <"$EXCLUDEFILE"
    fi
    for p in $(candidates); do
        case "$p" in ''|*[!0-9]*) continue ;; esac
        is_traced "$p" && continue
        case "$excluded$GIVENUP" in *" $p "*) continue ;; esac
        other_netns "$p" && continue
        a0=$(argv0 "$p")
        case "$a0" in
            "$PKG") [ "$ROLE" = all ] || continue ;;
            "$PKG":*) ;;
            *) continue ;;
        esac
        [ "$STOPPING" = 0 ] || return 1
        start_trace "$p" "$a0"
        changed=0
    done
    return "$changed"
}

stop_all() {
    for e in $TRACED; do
        r=${e#*:}
        kill -TERM "${r%%:*}" 2>/dev/null
    done
    i=0
    while [ "$i" -lt 30 ]; do
        left=0
        for e in $TRACED; do
            r=${e#*:}
            alive "${r%%:*}" && left=1
        done
        [ "$left" = 0 ] && break
        sleep 0.1
        i=$((i + 1))
    done
    for e in $TRACED; do
        r=${e#*:}
        if alive "${r%%:*}"; then
            log "strace ${r%%:*} ignored SIGTERM; killing it"
            kill -KILL "${r%%:*}" 2>/dev/null
        fi
    done
    wait
    TRACED=""
    write_pidsfile
}

log "watching $PKG (role $ROLE) every ${INTERVAL}s; logs in $OUTDIR"
write_pidsfile
while [ "$STOPPING" = 0 ] && [ ! -e "$STOPFILE" ]; do
    dirty=1
    reap && dirty=0
    scan && dirty=0
    [ "$dirty" = 0 ] && write_pidsfile
    [ "$STOPPING" = 0 ] || break
    sleep "$INTERVAL"
done
log "stopping"
stop_all
log "stopped"
exit 0
