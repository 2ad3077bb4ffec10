#!/bin/sh
# One-shot broker setup for docker compose, through the management API: the queue-leader policy
# for the namespace and one least-privilege user per service. Idempotent: it runs on every
# `docker compose up`, and a changed stage password in .env takes effect at the next run.
#
# Passwords may hold any character but a newline: they are JSON-escaped here, and never appear in
# a command line (curl reads the credentials and bodies from files in a private directory).
# Exit codes: 0 done; 1 the API did not answer in time or refused a change; 3 the admin
# credentials were refused (nothing is retried: waiting cannot fix a wrong password).
set -eu
API="${RABBITMQ_API:-http://rabbitmq:15672/api}"
NS="${ORDERFLOW_NS:-orderflow}"
WAIT_SECS="${SETUP_WAIT_SECS:-120}"
: "${RABBITMQ_USER:?}" "${RABBITMQ_PASSWORD:?}" "${FETCHER_AMQP_PASSWORD:?}" \
  "${TRANSFORMER_AMQP_PASSWORD:?}" "${WRITER_AMQP_PASSWORD:?}"

umask 077
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# A value as the inside of a JSON (or curl config) string: backslash and double quote escaped.
escape() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }

printf 'user = "%s:%s"\n' "$(escape "$RABBITMQ_USER")" "$(escape "$RABBITMQ_PASSWORD")" >"$TMP/auth"

# call METHOD PATH [BODY_FILE]: sets CODE (000 when the broker did not answer); the answer is in $TMP/out.
call() {
  set -- "$1" "$2" "${3:-}"
  if [ -n "$3" ]; then
    CODE=$(curl -s -K "$TMP/auth" -o "$TMP/out" -w '%{http_code}' -X "$1" \
      -H 'content-type: application/json' --data-binary "@$3" "$API/$2") || CODE=000
  else
    CODE=$(curl -s -K "$TMP/auth" -o "$TMP/out" -w '%{http_code}' -X "$1" "$API/$2") || CODE=000
  fi
}

refused() {
  cat >&2 <<EOF
rabbitmq-setup: the broker refused the admin user "$RABBITMQ_USER" with RABBITMQ_PASSWORD (HTTP $CODE).
The broker keeps the admin user and password it was first started with (in the rabbitmq-data
volume): RABBITMQ_USER/RABBITMQ_PASSWORD only create them when that volume is new, so changing
them in .env later does not change the broker. Do one of:
  - put the previous RABBITMQ_PASSWORD back in .env;
  - set the new one in the broker too, then start again:
      docker compose exec rabbitmq rabbitmqctl change_password $RABBITMQ_USER '<the new password>'
  - start the broker from scratch, which DELETES every queued message and checkpoint:
      docker compose down -v
EOF
  exit 3
}

# Wait for the management API; a refused password stops at once.
deadline=$(($(date +%s) + WAIT_SECS))
while :; do
  call GET overview
  case "$CODE" in
    200) break ;;
    401 | 403) refused ;;
  esac
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "rabbitmq-setup: the management API at $API did not answer within ${WAIT_SECS}s (last: HTTP $CODE)" >&2
    exit 1
  fi
  sleep 2
done

# ok WHAT: fails naming WHAT unless the last call succeeded.
ok() {
  case "$CODE" in
    2??) ;;
    401 | 403) refused ;;
    *)
      echo "rabbitmq-setup: $1 failed (HTTP $CODE): $(head -c 500 "$TMP/out")" >&2
      exit 1
      ;;
  esac
}

# The namespace, as a regex inside a JSON string: "a.b" -> a\\.b (JSON) -> a\.b (regex).
N=$(printf '%s' "$NS" | sed 's/\./\\\\./g')

# Quorum queue leaders spread over the cluster's nodes (one node: no effect). Named after the namespace,
# so stacks with different ORDERFLOW_NS on one broker each have their own.
printf '{"pattern":"^%s\\\\.","apply-to":"queues","priority":0,"definition":{"queue-leader-locator":"balanced"}}' \
  "$N" >"$TMP/body"
call PUT "policies/%2F/$NS-quorum-leaders" "$TMP/body"
ok "policy $NS-quorum-leaders"

# user NAME PASSWORD CONFIGURE WRITE READ (permission regexes, already JSON-escaped)
user() {
  printf '{"password":"%s","tags":""}' "$(escape "$2")" >"$TMP/body"
  call PUT "users/$1" "$TMP/body"
  ok "user $1"
  printf '{"configure":"%s","write":"%s","read":"%s"}' "$3" "$4" "$5" >"$TMP/body"
  call PUT "permissions/%2F/$1" "$TMP/body"
  ok "permissions of $1"
}
# fetcher: its own job/presence/status queues; publishes pages, ledger batches and their index
# entries and (via the default exchange) jobs, status and audit answers; reads the ledger (the
# scheduled audit).
user fetcher "$FETCHER_AMQP_PASSWORD" "^${N}\\\\.fetch\\\\..*" "^(${N}\\\\.pages|${N}\\\\.ledger|${N}\\\\.ledger\\\\.index|${N}\\\\.fetch\\\\..*|amq\\\\.default)$" "^(${N}\\\\.fetch\\\\..*|${N}\\\\.ledger)$"
# transformer: reads pages; publishes records, dead letters and ledger batches (and index entries).
user transformer "$TRANSFORMER_AMQP_PASSWORD" "^$" "^${N}\\\\.(records|dead|ledger|ledger\\\\.index)$" "^${N}\\\\.pages$"
# writer: reads records; publishes retries, dead letters and ledger batches (and index entries).
user writer "$WRITER_AMQP_PASSWORD" "^$" "^${N}\\\\.(retry|dead|ledger|ledger\\\\.index)$" "^${N}\\\\.records$"
echo "rabbitmq-setup: done (policy $NS-quorum-leaders; users fetcher, transformer, writer)"
