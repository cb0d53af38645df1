#!/usr/bin/env bash
# Checks the systemd files in this directory without installing them and without systemd
# running as PID 1 (CI containers):
#   1. `systemd-analyze verify` on both units (and the proxy with the low-port drop-in);
#      any diagnostic at all fails the check, since verify exits 0 on e.g. an unknown key.
#   2. `systemd-analyze security --offline=yes` rates each at 2.0 or below ("OK").
#   3. systemd-sysusers and systemd-tmpfiles create the user and the directories, with the
#      right owner and modes (needs root for the chown; skipped otherwise).
#   4. tally.env.example mentions every environment variable the services read (src/cli.rs,
#      src/proxy/config.rs).
# Everything happens in a throw-away root directory that holds the units, the distribution's
# own units (verify needs sysinit.target & co.) and the binary at the path ExecStart names:
# $TALLY_BIN if set (scripts/test.sh sets it to the freshly built binary), else an executable
# stand-in, since verify only checks that the path is executable.
#
# Usage: systemd/check.sh            (MAX_EXPOSURE=2.0 by default)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
max_exposure="${MAX_EXPOSURE:-2.0}"
units=(tally-proxy.service tally-shipper.service)

command -v systemd-analyze >/dev/null || {
  echo "systemd-analyze not found: install it with: apt-get install systemd" >&2
  exit 1
}

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
fail=0
bad() {
  echo "FAIL: $*" >&2
  fail=1
}

# --- a root to check in ----------------------------------------------------------------------
mkdir -p "$root/usr/lib/systemd" "$root/etc/systemd/system" "$root/usr/local/bin" \
  "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
exec_path="$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$here/tally-proxy.service")"
mkdir -p "$root$(dirname "$exec_path")"
if [[ -n "${TALLY_BIN:-}" ]]; then
  # A hard link where possible: a debug build is large.
  ln "$TALLY_BIN" "$root$exec_path" 2>/dev/null || cp "$TALLY_BIN" "$root$exec_path"
else
  printf '#!/bin/sh\nexit 0\n' >"$root$exec_path"
  chmod 0755 "$root$exec_path"
fi
cp "${units[@]/#/$here/}" "$root/etc/systemd/system/"

# --- 1. verify ---------------------------------------------------------------------------------
verify() {
  local what="$1" out
  shift
  if ! out="$(systemd-analyze verify --root="$root" "$@" 2>&1)" || [[ -n "$out" ]]; then
    bad "systemd-analyze verify $what:"
    printf '%s\n' "$out" >&2
  else
    echo "ok: verify $what"
  fi
}
verify "${units[*]}" "${units[@]}"

dropin="$root/etc/systemd/system/tally-proxy.service.d"
mkdir -p "$dropin"
cp "$here/tally-proxy-low-port.conf" "$dropin/low-port.conf"
verify "tally-proxy.service + low-port drop-in" tally-proxy.service

# --- 2. security -------------------------------------------------------------------------------
exposure() {
  local unit="$1" label="$2" out score
  out="$(systemd-analyze security --offline=yes --root="$root" --no-pager "$unit" 2>&1)" || true
  score="$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p')"
  if [[ -z "$score" ]]; then
    bad "security $label: no overall exposure level in the output:"
    printf '%s\n' "$out" >&2
  elif awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s > m) }'; then
    bad "security $label: exposure $score > $max_exposure; what it flags:"
    printf '%s\n' "$out" | grep '✗' >&2 || true
  else
    echo "ok: security $label: exposure $score (max $max_exposure)"
  fi
}
exposure tally-shipper.service tally-shipper.service
exposure tally-proxy.service "tally-proxy.service + low-port drop-in"
rm -r "$dropin"
exposure tally-proxy.service tally-proxy.service

# --- 3. sysusers + tmpfiles --------------------------------------------------------------------
if [[ $(id -u) -eq 0 ]]; then
  cp "$here/tally.sysusers.conf" "$root/usr/lib/sysusers.d/tally.conf"
  cp "$here/tally.tmpfiles.conf" "$root/usr/lib/tmpfiles.d/tally.conf"
  systemd-sysusers --root="$root" tally.conf
  systemd-tmpfiles --root="$root" --create tally.conf
  uid="$(awk -F: '$1 == "tally" { print $3 }' "$root/etc/passwd")"
  gid="$(awk -F: '$1 == "tally" { print $3 }' "$root/etc/group")"
  [[ -n "$uid" && -n "$gid" ]] || bad "sysusers did not create user and group tally"
  for dir in /var/lib/tally /var/log/tally; do
    got="$(stat -c '%a %u %g' "$root$dir" 2>/dev/null || echo missing)"
    if [[ "$got" == "750 $uid $gid" ]]; then
      echo "ok: tmpfiles $dir is 0750 tally:tally"
    else
      bad "tmpfiles $dir: want '750 $uid $gid' (mode uid gid), got '$got'"
    fi
  done
else
  echo "skip: sysusers/tmpfiles check (needs root to chown)"
fi

# --- 4. the env file documents every variable the CLI reads ----------------------------------
cli="$here/../src/cli.rs"
if [[ -f "$cli" ]]; then
  missing=()
  # The emulator's own settings are not read by either service.
  vars="$(awk '/^pub struct LagoEmulatorArgs/ { skip = 1 } skip && /^}/ { skip = 0; next } !skip' "$cli" |
    grep -o 'env = "[A-Z0-9_]*"' | cut -d'"' -f2 | sort -u)"
  # And the proxy config's TALLY_* overrides.
  if [[ -f "$here/../src/proxy/config.rs" ]]; then
    vars+=" $(grep -o 'env("[A-Z0-9_]*")' "$here/../src/proxy/config.rs" | cut -d'"' -f2 | sort -u)"
  fi
  for var in $vars; do
    grep -Eq "^#?$var=" "$here/tally.env.example" || missing+=("$var")
  done
  if ((${#missing[@]})); then
    bad "tally.env.example does not document: ${missing[*]}"
  else
    echo "ok: tally.env.example documents every variable the services read"
  fi
fi

exit "$fail"
