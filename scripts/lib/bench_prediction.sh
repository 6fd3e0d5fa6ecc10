# shellcheck shell=bash
# Sourced by scripts/bench: `run_prediction`, next-place prediction on held-out real days
# (issue 17). One fresh local stack (release, rate limits off); `trackctl eval` per split,
# each under its own device prefix so the splits do not share models:
#   - the New York harbor week (data/ais-ny-harbor-2020-12-01..07.csv): train on every day
#     before the test day, test Dec 7 (the headline split), then the same protocol on Dec 6,
#     Dec 5 and Dec 4 (the later-day checks: tuned for the model, not for one day);
#   - the Virginia Beach sample (data/ais-virginia-beach-2020-06-04..06.csv): Jun 4-5 / Jun 6.
# Prints each report and one summary table; the JSON reports stay in the run's folder.
# Figures only, never asserted. PREDICTION_SPLITS overrides the splits ("ny:2020-12-07 vb:2020-06-06").

run_prediction() {
    section "prediction: next-place accuracy on held-out days (trackctl eval)"
    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/trackmesh-bench.XXXXXX")"
    export TM_STACK_DIR="$dir/stack" TM_REDIS_PORT=26390 TM_CLICKHOUSE_HTTP_PORT=28190 TM_CLICKHOUSE_TCP_PORT=29190 \
        TM_KAFKA_PORT=29290 TM_GATEWAY_PORT=25050 TM_REFINEMENT_PORT=25051 TM_LEARNING_PORT=25052 TM_STORAGE_PORT=25053
    export RATE_LIMIT_FIXES_PER_SEC=0 RATE_LIMIT_REQUESTS_PER_SEC=0 RUST_LOG=warn
    # cleanup reads the exit status from $?: keep the script's, not stack down's.
    # shellcheck disable=SC2154 # rc is assigned by the trap itself
    trap 'rc=$?; set +e; scripts/stack down --purge >/dev/null 2>&1; (exit $rc); cleanup' EXIT
    # TM_PROFILE=debug (as scripts/stack reads it) runs debug builds, for a quick look.
    local profile="${TM_PROFILE:-release}" build=(cargo build --locked -p trackctl)
    [[ $profile == release ]] && build+=(--release)
    "${build[@]}"
    scripts/stack up >"$dir/stack.txt" 2>&1 || {
        cat "$dir/stack.txt"
        return 1
    }
    local trackctl=("${CARGO_TARGET_DIR:-target}/$profile/trackctl" --addr "http://127.0.0.1:$TM_GATEWAY_PORT" --api-key demo-key)
    local -a splits
    read -r -a splits <<<"${PREDICTION_SPLITS:-ny:2020-12-07 ny:2020-12-06 ny:2020-12-05 ny:2020-12-04 vb:2020-06-06}"
    local split data day file
    for split in "${splits[@]}"; do
        data="${split%%:*}" day="${split#*:}"
        case "$data" in
        ny) file=data/ais-ny-harbor-2020-12-01..07.csv ;;
        vb) file=data/ais-virginia-beach-2020-06-04..06.csv ;;
        *)
            echo "PREDICTION_SPLITS: unknown data set $data (ny or vb)" >&2
            return 2
            ;;
        esac
        echo "-- $data, test day $day"
        "${trackctl[@]}" eval "$file" --cut "$day" --prefix "bench-$data-$day-" --json >"$dir/$data-$day.json"
    done
    scripts/stack down --purge >/dev/null

    python3 - "$dir" "${splits[@]}" <<'PY'
import json, sys
folder, splits = sys.argv[1], sys.argv[2:]
names = ["model", "most_visited_other", "markov", "markov_time_of_day"]
short = ["model", "most visited other", "Markov", "Markov + time of day"]
print()
print("top-1 / top-3 over transitions to known places (all transitions in brackets); Brier of the model")
print(f"{'split':<16} {'transitions':>12}  " + "  ".join(f"{s:>22}" for s in short) + f"  {'Brier':>6}")
for split in splits:
    data, day = split.split(":")
    r = json.load(open(f"{folder}/{data}-{day}.json"))
    p = {x["name"]: x for x in r["predictors"]}
    cells = [f"{p[n]['top1_known']:.2f}/{p[n]['top3_known']:.2f} ({p[n]['top1']:.2f}/{p[n]['top3']:.2f})" for n in names]
    print(f"{data + ' ' + day:<16} {r['transitions_known']:>5} of {r['transitions']:<4}  "
          + "  ".join(f"{c:>22}" for c in cells) + f"  {p['model']['brier']:>6.3f}")
print(f"\nreports: {folder}/*.json")
PY
}
