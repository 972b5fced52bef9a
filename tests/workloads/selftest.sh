#!/usr/bin/env bash
# selftest.sh - builds every workload and checks that it PASSes on its own,
# without ferry: (1) plain run, (2) with WORKLOAD_SECS=0.5, (3) frozen with
# SIGSTOP for 1 s in the middle of its working phase and then SIGCONT'd
# (a crude stand-in for being frozen by a checkpoint; for workloads that fork,
# the whole process tree is stopped and continued).
#
# usage: tests/workloads/selftest.sh [NAME...]     (default: all)
# Output of each run is appended to a log file, as under the harness.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d "${TMPDIR:-/tmp}/ferry-wl-selftest.XXXXXX")
trap 'rm -rf "$out"' EXIT

all=(mem avx signals files blocked counter socket threads omp tree shm)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${all[@]}")

args_of() { case "$1" in mem) echo 16 ;; *) echo ;; esac; }

failed=0
pass=0

# tree_pids PID: PID and all its descendants, from the ppid field of
# /proc/*/stat (one pass, no forks; comm may contain spaces, so the fields
# are taken after the last ')').
tree_pids() {
    local -A kids=()
    local f st rest p
    for f in /proc/[0-9]*/stat; do
        st=$(<"$f") 2>/dev/null || continue
        rest=${st##*) }
        rest=${rest#* }        # drop the state letter
        p=${rest%% *}          # ppid
        kids[$p]+=" ${st%% *}"
    done
    local todo=("$1")
    while [ ${#todo[@]} -gt 0 ]; do
        p=${todo[0]}
        todo=("${todo[@]:1}")
        echo "$p"
        # shellcheck disable=SC2206
        todo+=(${kids[$p]:-})
    done
}

# run NAME LABEL SECS STOP: runs NAME with stdout/stderr appended to a log,
# optionally SIGSTOPs it and all its descendants for 1 s 300 ms after READY,
# and checks the verdict.
run() {
    local name=$1 label=$2 secs=$3 stop=$4
    local log="$out/$name.$label.log" tmp="$out/$name.$label.tmp"
    mkdir -p "$tmp"
    : >"$log"
    # shellcheck disable=SC2046
    FERRY_TEST_TMP=$tmp WORKLOAD_SECS=$secs "$out/$name" $(args_of "$name") \
        </dev/null >>"$log" 2>&1 &
    local pid=$!
    if [ "$stop" = 1 ]; then
        for _ in $(seq 200); do grep -qx READY "$log" && break; sleep 0.05; done
        sleep 0.3
        local pids
        pids=$(tree_pids "$pid")
        # shellcheck disable=SC2086
        kill -STOP $pids 2>/dev/null
        sleep 1
        # shellcheck disable=SC2086
        kill -CONT $pids 2>/dev/null
    fi
    # bounded wait: 60 s
    local waited=0
    while kill -0 "$pid" 2>/dev/null && [ $waited -lt 600 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid"
        echo "TIMEOUT $name ($label)"
    fi
    wait "$pid"
    local rc=$?
    if [ $rc -eq 0 ] && grep -qx "PASS $name" "$log" && ! grep -q '^FAIL' "$log" &&
        [ "$(grep -c '^PASS' "$log")" -eq 1 ]; then
        pass=$((pass + 1))
        echo "ok   $name ($label)"
    else
        failed=$((failed + 1))
        echo "FAIL $name ($label): exit $rc"
        sed 's/^/    | /' "$log"
    fi
}

for n in "${names[@]}"; do
    extra=()
    [ "$n" = avx ] && extra=(-mavx2)
    # Extra flags a workload asks for with a "ferry-cflags: ..." line
    # (omp.c: -fopenmp); the test harness reads the same line.
    # shellcheck disable=SC2207
    extra+=($(sed -n 's/.*ferry-cflags:[[:space:]]*\([^*]*\).*/\1/p' "$here/$n.c" | head -1))
    if ! gcc -O2 -g -pthread -Wall -Wextra "${extra[@]}" -o "$out/$n" "$here/$n.c"; then
        echo "FAIL $n: build"
        failed=$((failed + 1))
        continue
    fi
    run "$n" default "${WORKLOAD_SECS:-2}" 0
    run "$n" short 0.5 0
    run "$n" sigstop 1.5 1
done

echo "$pass passed, $failed failed"
[ $failed -eq 0 ]
