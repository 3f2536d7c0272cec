#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ with coverage instrumentation (libFuzzer on the stable
# toolchain) and runs each for FUZZ_SECONDS, printing the executions per target.
#
#   scripts/fuzz.sh [TARGET...]        (all targets when none is named)
#
# Coverage guidance on stable: rustc's SanitizerCoverage pass (-Cpasses=sancov-module) with
# the inline 8-bit counters, PC table and comparison tracing that libFuzzer reads; no
# AddressSanitizer (that needs nightly's -Zsanitizer). Rust's own bounds and overflow checks
# (debug assertions on) turn memory and arithmetic errors into panics, which libFuzzer
# reports as crashes.
#
# Environment: FUZZ_SECONDS (default 60), FUZZ_JOBS (parallel targets, default 1),
# FUZZ_RSS_MB (default 2048). Crashes land in fuzz/artifacts/TARGET/; the corpus grows in
# fuzz/corpus-run/TARGET/ (not checked in), seeded from fuzz/corpus/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${FUZZ_SECONDS:-60}
rss=${FUZZ_RSS_MB:-2048}
jobs=${FUZZ_JOBS:-1}
triple=x86_64-unknown-linux-gnu
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^gpucell-fuzz$')
fi

export RUSTFLAGS="${RUSTFLAGS:-} --cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cdebug-assertions -Coverflow-checks"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo build --release --target "$triple" "${bins[@]}"

scratch=$(mktemp -d /tmp/gpucell-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
export FUZZ_SCRATCH=$scratch

run_one() {
  local t=$1 log
  log=$scratch/$t.log
  mkdir -p "corpus-run/$t" "artifacts/$t"
  local seeds=()
  [ -d "corpus/$t" ] && seeds=("corpus/$t")
  local rc=0
  "target/$triple/release/$t" "corpus-run/$t" "${seeds[@]}" \
    -max_total_time="$seconds" -rss_limit_mb="$rss" -max_len=262144 -timeout=20 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  local execs cov corp
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  corp=$(find "corpus-run/$t" -type f | wc -l)
  if [ "$rc" -eq 0 ]; then
    printf '%-18s ok     execs=%-10s cov=%-6s corpus=%s\n' "$t" "${execs:-?}" "${cov:-?}" "$corp"
  else
    printf '%-18s CRASH  execs=%-10s cov=%-6s (rc %s, artifacts/%s/)\n' "$t" "${execs:-?}" "${cov:-?}" "$rc" "$t"
    grep -m1 -A12 -E "panicked|ERROR: libFuzzer" "$log" | sed 's/^/    /'
    return 1
  fi
}

status=0
if [ "$jobs" -le 1 ]; then
  for t in "${targets[@]}"; do run_one "$t" || status=1; done
else
  export -f run_one
  export seconds rss triple scratch
  printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {} || status=1
fi
exit $status
