#!/usr/bin/env bash
# Launch the team MLflow tracking server for deploypipe runs.
#
#   PostgreSQL backend store + S3-compatible (or local-disk) artifact store,
#   proxied by the server + MLflow's built-in basic-auth app + MLflow 3
#   security middleware.
#
# Usage:
#   MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=... mlflow/launch.sh [--dry-run]
#
# Every setting comes from the environment; see mlflow/README.md for the table.
#
#   DEPLOYPIPE_MLFLOW_DB_URI          tracking DB   (default postgresql://mlflow@localhost:5432/mlflow)
#   DEPLOYPIPE_MLFLOW_AUTH_DB_URI     users/perm DB (default postgresql://mlflow@localhost:5432/mlflow_auth)
#   DEPLOYPIPE_MLFLOW_ARTIFACTS       artifacts     (default s3://mlflow/deploypipe; or /abs/dir, file:///abs/dir)
#   DEPLOYPIPE_MLFLOW_HOST            bind address  (default 127.0.0.1)
#   DEPLOYPIPE_MLFLOW_PORT            port          (default 5000)
#   DEPLOYPIPE_MLFLOW_WORKERS         workers       (default 4)
#   DEPLOYPIPE_MLFLOW_ALLOWED_HOSTS   Host headers  (default localhost,localhost:*,127.0.0.1,127.0.0.1:*)
#   DEPLOYPIPE_MLFLOW_CORS_ORIGINS    CORS origins  (default http://localhost:PORT,http://127.0.0.1:PORT)
#   DEPLOYPIPE_MLFLOW_ADMIN_USER      admin name    (default admin)
#   DEPLOYPIPE_MLFLOW_DEFAULT_PERMISSION  READ|EDIT|MANAGE|NO_PERMISSIONS (default READ)
#   DEPLOYPIPE_MLFLOW_PYTHON          interpreter used for the dependency check (default python3)
#   MLFLOW_AUTH_ADMIN_PASSWORD        required, >= 12 characters
#   MLFLOW_FLASK_SERVER_SECRET_KEY    required (same value on every server instance)
#   MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: read by boto3 inside MLflow (s3:// only).
#
# Database passwords: prefer leaving them out of the URIs and using libpq's
# PGPASSWORD or ~/.pgpass, so they do not show up in `ps` output.
set -euo pipefail

die() { echo "launch.sh: $*" >&2; exit 1; }

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg' (only --dry-run and --help are accepted)" ;;
  esac
done

DB_URI="${DEPLOYPIPE_MLFLOW_DB_URI:-postgresql://mlflow@localhost:5432/mlflow}"
AUTH_DB_URI="${DEPLOYPIPE_MLFLOW_AUTH_DB_URI:-postgresql://mlflow@localhost:5432/mlflow_auth}"
ARTIFACTS="${DEPLOYPIPE_MLFLOW_ARTIFACTS:-s3://mlflow/deploypipe}"
# WARNING: the default binds to loopback only. Setting DEPLOYPIPE_MLFLOW_HOST=0.0.0.0
# (or any non-loopback address) exposes a plain-HTTP server that receives basic-auth
# passwords in clear text: only do that behind a reverse proxy that terminates TLS,
# and set DEPLOYPIPE_MLFLOW_ALLOWED_HOSTS / DEPLOYPIPE_MLFLOW_CORS_ORIGINS to its public name.
HOST="${DEPLOYPIPE_MLFLOW_HOST:-127.0.0.1}"
PORT="${DEPLOYPIPE_MLFLOW_PORT:-5000}"
WORKERS="${DEPLOYPIPE_MLFLOW_WORKERS:-4}"
DEFAULT_ALLOWED_HOSTS="localhost,localhost:*,127.0.0.1,127.0.0.1:*"
ALLOWED_HOSTS="${DEPLOYPIPE_MLFLOW_ALLOWED_HOSTS:-$DEFAULT_ALLOWED_HOSTS}"
CORS_ORIGINS="${DEPLOYPIPE_MLFLOW_CORS_ORIGINS:-http://localhost:${PORT},http://127.0.0.1:${PORT}}"
ADMIN_USER="${DEPLOYPIPE_MLFLOW_ADMIN_USER:-admin}"
DEFAULT_PERMISSION="${DEPLOYPIPE_MLFLOW_DEFAULT_PERMISSION:-READ}"
PYTHON="${DEPLOYPIPE_MLFLOW_PYTHON:-python3}"

# --- secrets and settings validation ---------------------------------------
ADMIN_PASSWORD="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
[[ ${#ADMIN_PASSWORD} -ge 12 ]] \
  || die "MLFLOW_AUTH_ADMIN_PASSWORD must be set to at least 12 characters"
[[ "$ADMIN_PASSWORD" != "password1234" ]] \
  || die "MLFLOW_AUTH_ADMIN_PASSWORD must not be MLflow's old published default"
if [[ "$ADMIN_PASSWORD" =~ ^[[:space:]]|[[:space:]]$ ]]; then
  die "MLFLOW_AUTH_ADMIN_PASSWORD must not start or end with whitespace"
fi
[[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] \
  || die "MLFLOW_FLASK_SERVER_SECRET_KEY must be set (use the same value on every server instance)"

[[ "$DB_URI" == postgresql://* || "$DB_URI" == postgresql+*://* ]] \
  || die "DEPLOYPIPE_MLFLOW_DB_URI must be a postgresql:// URI"
# s3://bucket/prefix, or a folder on the server's disk: /absolute/path or file:///absolute/path
case "$ARTIFACTS" in
  s3://?*) ARTIFACTS_KIND=s3 ;;
  /?*|file:///?*) ARTIFACTS_KIND=local ;;
  *) die "DEPLOYPIPE_MLFLOW_ARTIFACTS must be an s3://bucket/prefix URI, an absolute path or a file:///absolute/path URI" ;;
esac
[[ "$PORT" =~ ^[0-9]{1,5}$ ]] && (( 10#$PORT >= 1 && 10#$PORT <= 65535 )) \
  || die "DEPLOYPIPE_MLFLOW_PORT must be a port number (1-65535)"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] \
  || die "DEPLOYPIPE_MLFLOW_WORKERS must be a positive integer"
case "$DEFAULT_PERMISSION" in
  READ|EDIT|MANAGE|NO_PERMISSIONS) ;;
  *) die "DEPLOYPIPE_MLFLOW_DEFAULT_PERMISSION must be READ, EDIT, MANAGE or NO_PERMISSIONS" ;;
esac
# Values go into an ini file: refuse line breaks (they would inject extra keys).
for name in AUTH_DB_URI ADMIN_USER ADMIN_PASSWORD; do
  [[ "${!name}" != *$'\n'* && "${!name}" != *$'\r'* ]] \
    || die "the value for $name must not contain line breaks"
done
[[ -n "$ADMIN_USER" ]] || die "DEPLOYPIPE_MLFLOW_ADMIN_USER must not be empty"

case "$HOST" in
  127.*|localhost|::1) ;;
  *)
    echo "launch.sh: WARNING: binding to $HOST exposes plain HTTP; put a TLS reverse proxy in front." >&2
    if [[ "$ALLOWED_HOSTS" == "$DEFAULT_ALLOWED_HOSTS" ]]; then
      echo "launch.sh: WARNING: DEPLOYPIPE_MLFLOW_ALLOWED_HOSTS is the localhost default; remote clients will get 403 until you add the server's name." >&2
    fi
    ;;
esac

# Hide the password part of user:password@ in URIs we print.
mask_uri() { sed -E 's#(://[^:/@]*):[^@]*@#\1:****@#' <<<"$1"; }

# --- dependency check -------------------------------------------------------
# postgresql+psycopg2:// uses psycopg2 and postgresql+psycopg:// psycopg 3; a plain postgresql:// uses
# SQLAlchemy's default driver: psycopg 3 from SQLAlchemy 2.1 on, psycopg2 before. The check below asks the
# installed SQLAlchemy and prints its own fix line; this one is for when Python cannot be asked.
PG_PKG='"psycopg[binary]"'
if [[ "$DB_URI" == postgresql+psycopg2://* && "$AUTH_DB_URI" != postgresql://* && "$AUTH_DB_URI" != postgresql+psycopg://* ]]; then
  PG_PKG=psycopg2-binary
elif [[ "$DB_URI$AUTH_DB_URI" == *postgresql+psycopg2://* ]]; then
  PG_PKG+=' psycopg2-binary'
fi
FIX="pip install \"mlflow[auth]>=3.5\" $PG_PKG"
[[ "$ARTIFACTS_KIND" == s3 ]] && FIX+=" boto3"
dep_error=""
if ! command -v mlflow >/dev/null 2>&1; then
  dep_error="the 'mlflow' command is not on PATH"
elif ! command -v "$PYTHON" >/dev/null 2>&1; then
  dep_error="'$PYTHON' not found (set DEPLOYPIPE_MLFLOW_PYTHON to MLflow's interpreter)"
else
  dep_error="$("$PYTHON" - "$ARTIFACTS_KIND" "$DB_URI" "$AUTH_DB_URI" <<'PY' 2>&1 || true
import importlib.util as u, sys
from importlib.metadata import PackageNotFoundError, version
missing = []
try:
    major, minor = (int(x) for x in version("mlflow").split(".")[:2])
    if (major, minor) < (3, 5):
        missing.append(f"mlflow>=3.5 (found {major}.{minor})")
except (PackageNotFoundError, ValueError):
    missing.append("mlflow")
if u.find_spec("flask_wtf") is None:
    missing.append("Flask-WTF (mlflow[auth])")
pip = {"psycopg2": "psycopg2-binary", "psycopg": '"psycopg[binary]"'}
drivers = set()
for uri in sys.argv[2:]:
    if not uri.startswith(("postgresql:", "postgresql+")):
        continue
    try:  # the driver the installed SQLAlchemy picks for this URI
        from sqlalchemy.engine import make_url
        drivers.add(make_url(uri).get_dialect().driver)
    except Exception:  # no SQLAlchemy (no MLflow): what SQLAlchemy >= 2.1 picks
        drivers.add("psycopg2" if uri.startswith("postgresql+psycopg2:") else "psycopg")
modules = sorted(drivers) + (["boto3"] if sys.argv[1] == "s3" else [])
for mod in modules:
    if u.find_spec(mod) is None:
        missing.append(mod)
if missing:
    print("missing or too old: " + ", ".join(missing) + '; fix: pip install "mlflow[auth]>=3.5" '
          + " ".join(pip.get(m, m) for m in modules))
PY
)"
fi
[[ -z "$dep_error" || "$dep_error" == *"; fix: "* ]] || dep_error+="; fix: $FIX"
if [[ -n "$dep_error" ]]; then
  if (( DRY_RUN )); then
    echo "launch.sh: WARNING: $dep_error" >&2
  else
    die "$dep_error"
  fi
fi

# --- command ----------------------------------------------------------------
CMD=(mlflow server
  --backend-store-uri "$DB_URI"
  --serve-artifacts
  --artifacts-destination "$ARTIFACTS"
  --app-name basic-auth
  --host "$HOST"
  --port "$PORT"
  --workers "$WORKERS"
  --allowed-hosts "$ALLOWED_HOSTS"
  --cors-allowed-origins "$CORS_ORIGINS"
)

# configparser treats % as interpolation: escape it.
ini_value() { printf '%s' "${1//%/%%}"; }
write_ini() {  # $1 = password to write (real or masked)
  printf '[mlflow]\n'
  printf 'default_permission = %s\n' "$DEFAULT_PERMISSION"
  printf 'database_uri = %s\n' "$(ini_value "$2")"
  printf 'admin_username = %s\n' "$(ini_value "$ADMIN_USER")"
  printf 'admin_password = %s\n' "$(ini_value "$1")"
  printf 'authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n'
}

if (( DRY_RUN )); then
  echo "# auth config (written to a private 0600 temp file at launch):"
  write_ini '****' "$(mask_uri "$AUTH_DB_URI")" | sed 's/^/#   /'
  if [[ "$ARTIFACTS_KIND" == s3 ]]; then
    echo "# S3 endpoint: ${MLFLOW_S3_ENDPOINT_URL:-<AWS default>}"
  else
    echo "# artifacts on the server's disk: $ARTIFACTS"
  fi
  printed=()
  for word in "${CMD[@]}"; do printed+=("$(mask_uri "$word")"); done
  printf 'MLFLOW_AUTH_CONFIG_PATH=<temp>/basic_auth.ini MLFLOW_AUTH_ADMIN_PASSWORD=**** MLFLOW_FLASK_SERVER_SECRET_KEY=****'
  for word in "${printed[@]}"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then printf ' %s' "$word"
    else printf " '%s'" "${word//\'/\'\\\'\'}"; fi
  done
  printf '\n'
  exit 0
fi

# The ini lives as long as the server (uvicorn may re-read it when it restarts a
# worker) and is removed when this script exits.
AUTH_DIR="$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/deploypipe-mlflow-auth.XXXXXX")"
cleanup() { rm -rf -- "$AUTH_DIR"; }
trap cleanup EXIT
AUTH_INI="$AUTH_DIR/basic_auth.ini"
( umask 077 && write_ini "$ADMIN_PASSWORD" "$AUTH_DB_URI" >"$AUTH_INI" )
chmod 600 "$AUTH_INI"
export MLFLOW_AUTH_CONFIG_PATH="$AUTH_INI"
export MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY

echo "launch.sh: starting MLflow on http://$HOST:$PORT (artifacts: $ARTIFACTS)" >&2
"${CMD[@]}" &
child=$!
# Forward INT/TERM as TERM (a background job ignores SIGINT), then wait for the
# server to exit so the EXIT trap can remove the auth config.
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM
status=0
while :; do
  if wait "$child"; then status=0; else status=$?; fi
  kill -0 "$child" 2>/dev/null || break   # >128 can mean only "a trap interrupted wait"
done
# If the server exited while the trap was running, ask bash for its saved exit status.
if (( status > 128 )); then
  if wait "$child" 2>/dev/null; then status=0; else status=$?; fi
fi
exit "$status"
