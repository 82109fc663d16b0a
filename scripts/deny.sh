#!/usr/bin/env bash
# Runs cargo-deny (policy in deny.toml) on the workspace: licences, bans and sources always,
# advisories only when a local copy of the RustSec advisory database exists, since the
# database is fetched from GitHub, which this project's machines cannot reach. Says on
# stdout what it checked and what it did not; never skips silently. Exit status is non-zero
# when a check that ran failed.
#
#   CARGO_DENY                     cargo-deny binary to use (default: scripts/install-cargo-deny.sh)
#   INFERGATE_ADVISORY_DBS         folder that holds advisory databases, i.e. cargo-deny's
#                                  `db-path` (default: $CARGO_HOME/advisory-dbs, cargo-deny's own
#                                  default); it must contain cargo-deny's clone of
#                                  https://github.com/rustsec/advisory-db (`advisory-db-<hash>/`),
#                                  as `cargo deny fetch db` leaves it
#   INFERGATE_DENY_FETCH_DB=1      first try to fetch/update the database (needs GitHub)
#   INFERGATE_REQUIRE_ADVISORIES=1 fail instead of skipping when there is no database
#   INFERGATE_DENY_GRAPHS=1        show the inclusion graph of each finding (long)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

deny="${CARGO_DENY:-$(bash scripts/install-cargo-deny.sh)}"
echo "deny: $("$deny" --version) ($deny), policy $repo/deny.toml"

check_args=()
if [ "${INFERGATE_DENY_GRAPHS:-0}" != 1 ]; then
    check_args+=(--hide-inclusion-graph)
fi

# Licences, bans (duplicates, wildcards) and sources need only `cargo metadata` and the crate
# sources, which come from crates.io.
echo "deny: checking licenses bans sources"
status=0
"$deny" --locked check --show-stats "${check_args[@]}" licenses bans sources || status=$?
if [ "$status" -eq 0 ]; then
    echo "deny: licenses bans sources: passed"
else
    echo "deny: licenses bans sources: FAILED (exit $status)"
fi

# Advisories. cargo-deny keeps its clone of each advisory database under db-path, in a folder
# named after the database's URL (advisory-db-<hash>); with --offline it uses that clone as
# it is and fetches nothing.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
db_root="${INFERGATE_ADVISORY_DBS:-$cargo_home/advisory-dbs}"
config=(--config "$repo/deny.toml")
if [ -n "${INFERGATE_ADVISORY_DBS:-}" ]; then
    # deny.toml leaves db-path at its default; point a copy of it at the given folder.
    mkdir -p "$repo/target"
    tmp_config="$repo/target/deny-advisories.toml"
    db_root_toml="${db_root//\\/\\\\}"
    db_root_toml="${db_root_toml//\"/\\\"}"
    awk -v line="db-path = \"$db_root_toml\"" '{ print } /^\[advisories\]$/ { print line }' \
        "$repo/deny.toml" >"$tmp_config"
    config=(--config "$tmp_config")
fi

if [ "${INFERGATE_DENY_FETCH_DB:-0}" = 1 ]; then
    echo "deny: fetching the advisory database into $db_root (INFERGATE_DENY_FETCH_DB=1)"
    "$deny" "${config[@]}" fetch db || echo "deny: fetching the advisory database failed; using what is local"
fi

db=""
for d in "$db_root"/advisory-db-*; do
    if [ -d "$d/crates" ]; then
        db="$d"
        break
    fi
done

if [ -n "$db" ]; then
    when="$(git -C "$db" log -1 --format=%cs 2>/dev/null || echo "unknown date")"
    echo "deny: checking advisories against the local database $db (last commit $when), offline"
    commit_time="$(git -C "$db" log -1 --format=%ct 2>/dev/null || echo 0)"
    if [ $(( $(date +%s) - commit_time )) -gt $((90 * 86400)) ]; then
        echo "deny: WARNING: the advisory database is more than 90 days old; advisories published since are not checked"
    fi
    adv=0
    "$deny" --locked --offline "${config[@]}" check --show-stats "${check_args[@]}" advisories || adv=$?
    if [ "$adv" -eq 0 ]; then
        echo "deny: advisories: passed (database as of $when)"
    else
        echo "deny: advisories: FAILED (exit $adv)"
        [ "$status" -ne 0 ] || status=$adv
    fi
else
    echo "deny: advisories: SKIPPED: no local RustSec advisory database under $db_root;" \
        "cargo-deny fetches it only from GitHub (github.com/rustsec/advisory-db), which this" \
        "project's machines cannot reach (INFERGATE_DENY_FETCH_DB=1 fetches it where GitHub is" \
        "reachable). Known vulnerabilities, unmaintained and yanked crates were NOT checked."
    if [ "${INFERGATE_REQUIRE_ADVISORIES:-0}" = 1 ]; then
        echo "deny: INFERGATE_REQUIRE_ADVISORIES=1, so a skipped advisory check is a failure"
        [ "$status" -ne 0 ] || status=1
    fi
fi

if [ "$status" -eq 0 ]; then
    echo "deny: done: licenses bans sources passed; advisories $([ -n "$db" ] && echo passed || echo skipped)"
else
    echo "deny: done: FAILED"
fi
exit "$status"
