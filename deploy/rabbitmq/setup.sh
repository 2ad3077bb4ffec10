#!/bin/sh
# One-shot broker setup for docker compose: loads the definitions (policies) and creates one user
# per service with least-privilege permissions, through the management API. Passwords come from the
# environment (see .env.example). Idempotent: safe to run on every `docker compose up`.
set -eu
API="http://rabbitmq:15672/api"
AUTH="${RABBITMQ_USER}:${RABBITMQ_PASSWORD}"
NS="${ORDERFLOW_NS:-orderflow}"
N=$(printf '%s' "$NS" | sed 's/\./\\\\./g')

put() { curl -fsS -u "$AUTH" -H 'content-type: application/json' -X PUT "$API/$1" -d "$2" >/dev/null; }

for i in $(seq 1 60); do
  curl -fsS -u "$AUTH" "$API/overview" >/dev/null 2>&1 && break
  sleep 2
done

curl -fsS -u "$AUTH" -H 'content-type: application/json' -X POST "$API/definitions" -d @/definitions.json >/dev/null

# user password configure write read
user() {
  put "users/$1" "{\"password\":\"$2\",\"tags\":\"\"}"
  put "permissions/%2F/$1" "{\"configure\":\"$3\",\"write\":\"$4\",\"read\":\"$5\"}"
}
# fetcher: its own job/lock/presence queues; publishes pages and (via the default exchange) jobs and status.
user fetcher "$FETCHER_AMQP_PASSWORD" "^${N}\\\\.fetch\\\\..*" "^(${N}\\\\.pages|${N}\\\\.fetch\\\\..*|amq\\\\.default)$" "^${N}\\\\.fetch\\\\..*"
# transformer: reads pages; publishes records and dead letters.
user transformer "$TRANSFORMER_AMQP_PASSWORD" "^$" "^${N}\\\\.(records|dead)$" "^${N}\\\\.pages$"
# writer: reads records; publishes retries and dead letters.
user writer "$WRITER_AMQP_PASSWORD" "^$" "^${N}\\\\.(retry|dead)$" "^${N}\\\\.records$"
echo "broker setup done: policies loaded, users fetcher, transformer, writer"
