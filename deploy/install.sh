#!/usr/bin/env bash
# Install chrono-collectors on a systemd host (Debian 12+), idempotently. Run as root from a clone:
#   sudo deploy/install.sh [EXCHANGE...]        (default: coinbase binance binanceus kraken)
# Layout: /opt/chrono-collectors/venv (package), /etc/chrono-collectors (EXCHANGE.env, api_key 0400),
# /var/lib/chrono/EXCHANGE/spool/EXCHANGE (spool; systemd StateDirectory), units in /etc/systemd/system.
# The API key is read from $CHRONO_API_KEY_FILE (a file you provide) the first time; an existing
# /etc/chrono-collectors/api_key is kept. Re-running upgrades the package and restarts the units.
# CHRONO_LAYOUT=systemd (the default: one chrono-collector@EXCHANGE unit each, enabled and
# restarted here; the key stays root's, systemd hands it over) or supervisord
# (chrono-supervisord.service runs every program of /etc/chrono-collectors/supervisord.conf as
# system user chrono, created here if missing, which then owns the key; the per-exchange units
# are not enabled). Either way both units and both configs are installed; a supervisord.conf
# already there is kept (edited or not), a new one gets API_BASE_URL=$CHRONO_API_BASE_URL.
# Staging/checks: CHRONO_INSTALL_ROOT=/some/dir installs below that directory instead of /, and
# SYSTEMCTL=true (any command) replaces systemctl; with a root set, the final status is skipped.
# The user account is the host's (getent, useradd, chown from PATH; tests put stand-ins first).
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${CHRONO_INSTALL_ROOT:-}"
SYSTEMCTL="${SYSTEMCTL:-systemctl}"
PREFIX="$ROOT/opt/chrono-collectors"
ETC="$ROOT/etc/chrono-collectors"
UNITS="$ROOT/etc/systemd/system"
if [ $# -gt 0 ]; then EXCHANGES=("$@"); else EXCHANGES=(coinbase binance binanceus kraken); fi
PYTHON="${PYTHON:-python3}"
LAYOUT="${CHRONO_LAYOUT:-systemd}"
case "$LAYOUT" in
  systemd|supervisord) ;;
  *) echo "CHRONO_LAYOUT must be systemd or supervisord, not '$LAYOUT'" >&2; exit 2;;
esac

[ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 2; }

# Check the inputs before changing anything.
if [ ! -s "$ETC/api_key" ] && { [ -z "${CHRONO_API_KEY_FILE:-}" ] || [ ! -s "$CHRONO_API_KEY_FILE" ]; }; then
  echo "set CHRONO_API_KEY_FILE to a file holding the ingest API key" >&2; exit 2
fi
for ex in "${EXCHANGES[@]}"; do
  if [ ! -e "$ETC/$ex.env" ] && [ -z "${CHRONO_API_BASE_URL:-}" ]; then
    echo "set CHRONO_API_BASE_URL to the ingest API base URL (no $ETC/$ex.env yet)" >&2; exit 2
  fi
done
if [ ! -e "$ETC/supervisord.conf" ] && [ -z "${CHRONO_API_BASE_URL:-}" ]; then
  echo "set CHRONO_API_BASE_URL to the ingest API base URL (no $ETC/supervisord.conf yet)" >&2
  exit 2
fi

install -d -m 0755 "$PREFIX" "$UNITS"
[ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$SRC/constraints.txt" "$SRC"
install -m 0644 "$SRC/README.md" "$PREFIX/README.md"

install -d -m 0755 "$ETC"
if [ ! -s "$ETC/api_key" ]; then
  install -m 0400 "$CHRONO_API_KEY_FILE" "$ETC/api_key"
fi
chmod 0400 "$ETC/api_key"
if [ "$LAYOUT" = supervisord ]; then
  # chrono-supervisord.service runs as user chrono (group chrono), which reads the key itself.
  # (The systemd layout keeps it root's: systemd hands it to the dynamic user, LoadCredential=.)
  getent passwd chrono >/dev/null ||
    useradd --system --user-group --home-dir /var/lib/chrono --shell /usr/sbin/nologin chrono
  chown chrono:chrono "$ETC/api_key"
fi
for ex in "${EXCHANGES[@]}"; do
  if [ ! -e "$ETC/$ex.env" ]; then
    umask 077
    printf '%s\n' "# chrono-collector@$ex settings (see README, Collector configuration)" \
      "API_BASE_URL=$CHRONO_API_BASE_URL" > "$ETC/$ex.env"
  fi
done
if [ ! -e "$ETC/supervisord.conf" ]; then
  # The template points at the local reference API; a new install points at the one given.
  # supervisord reads % as the start of an expansion: a literal one is written %%.
  conf=$(<"$SRC/deploy/supervisord.production.conf")
  url=${CHRONO_API_BASE_URL//%/%%}
  printf '%s\n' "${conf//'API_BASE_URL="http://127.0.0.1:3000"'/"API_BASE_URL=\"$url\""}" \
    > "$ETC/supervisord.conf"
  chmod 0644 "$ETC/supervisord.conf"
fi

install -m 0644 "$SRC/systemd/chrono-collector@.service" "$UNITS/chrono-collector@.service"
install -m 0644 "$SRC/systemd/chrono-supervisord.service" "$UNITS/chrono-supervisord.service"
"$SYSTEMCTL" daemon-reload
# One layout at a time (they share the metrics ports): switching stops the other one.
if [ "$LAYOUT" = systemd ]; then
  "$SYSTEMCTL" disable --now chrono-supervisord.service 2>/dev/null || true
  for ex in "${EXCHANGES[@]}"; do
    "$SYSTEMCTL" enable "chrono-collector@$ex.service"
    "$SYSTEMCTL" restart "chrono-collector@$ex.service"
  done
else
  for ex in coinbase binance binanceus kraken; do
    "$SYSTEMCTL" disable --now "chrono-collector@$ex.service" 2>/dev/null || true
  done
  "$SYSTEMCTL" enable chrono-supervisord.service
  "$SYSTEMCTL" restart chrono-supervisord.service
fi
# A switch leaves the other layout's spools where they are, and this layout reads its own:
# records that were waiting there (an ingest API unreachable at the switch) are not sent. Say
# where, once per spool found.
if [ "$LAYOUT" = systemd ]; then
  for ex in "${EXCHANGES[@]}"; do
    old="$ROOT/var/lib/chrono/spool/$ex"
    if [ -e "$old/spool.db" ]; then
      echo "warning: $old is the supervisord layout's spool for $ex: records still waiting" \
        "there are not sent by chrono-collector@$ex. Deliver them first (CHRONO_LAYOUT=supervisord" \
        "until chrono_collector_spool_records{exchange=\"$ex\"} reads 0), then remove it." >&2
    fi
  done
else
  for ex in coinbase binance binanceus kraken; do
    # (with DynamicUser=yes the first is systemd's link to the second: one spool, said once)
    for old in "$ROOT/var/lib/chrono/$ex/spool/$ex" "$ROOT/var/lib/private/chrono/$ex/spool/$ex"; do
      if [ -e "$old/spool.db" ]; then
        echo "warning: $old is the systemd layout's spool for $ex: records still waiting" \
          "there are not sent by chrono-supervisord. Deliver them first (CHRONO_LAYOUT=systemd" \
          "until chrono_collector_spool_records{exchange=\"$ex\"} reads 0), then remove it." >&2
        break
      fi
    done
  done
fi
[ -z "$ROOT" ] || { echo "installed below $ROOT (status skipped)"; exit 0; }
if [ "$LAYOUT" = supervisord ]; then
  exec "$PREFIX/venv/bin/chrono-collector" status -c "$ETC/supervisord.conf" --wait 30
fi

endpoints=()
for ex in "${EXCHANGES[@]}"; do
  case "$ex" in coinbase) p=9101;; binance) p=9102;; binanceus) p=9103;; kraken) p=9104;; *) continue;; esac
  endpoints+=(--endpoint "$ex=http://127.0.0.1:$p")
done
"$PREFIX/venv/bin/chrono-collector" status --no-supervisor "${endpoints[@]}" --wait 30
