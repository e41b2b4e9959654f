#!/bin/bash
# pr-preview bootstrap: {{what}} (runbook §3).
# No secret is written here: the GHCR token, DATABASE_URL and the app's secrets are read from
# Parameter Store at boot with the instance profile, and only ever land in root-only files (an
# ECR image needs no token: the instance role logs in). Every value rendered into this script
# is shell-quoted by tasks/steps/launch.py.
set -euo pipefail
STATE_DIR={{state_dir}}
APP_DIR={{app_dir}}
mkdir -p "$STATE_DIR" "$APP_DIR"
# What root runs (the compose and env files) lives here; containers mount only ./<dir> below.
chmod 700 "$APP_DIR"
# compose: docker compose on the preview's project with every path explicit.
# shellcheck disable=SC2329 # a warm spare's script ends before it starts the app
compose() {
  docker compose --project-directory "$APP_DIR" -f "$APP_DIR/docker-compose.yml" \
    --env-file "$APP_DIR/.env" "$@"
}
# put FILE: stdin into FILE through a new file (mktemp) and a rename, never through a link.
put() {
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  cat > "$tmp"
  mv -fT "$tmp" "$1"
}
rm -f "$STATE_DIR/bootstrap-done" "$STATE_DIR/bootstrap-failed" "$STATE_DIR/migrated"
step=start

# fail [why]: mark the bootstrap failed at $step (what wait-ready reports) and stop.
fail() {
  echo "$step" > "$STATE_DIR/bootstrap-failed"
  echo "pr-preview bootstrap failed at step: $step${1:+ ($1)}" >&2
  exit 1
}
trap 'fail "exit status $?"' ERR

step=shutdown-timer
# Second line of defence behind the shutdown-at tag: power off (= terminate) when the TTL ends.
{{shutdown_timer}} || true

step=activity-timer
# Idle sampling: every minute, whether anyone uses the preview (an SSM session, a connection
# to the app port) goes to a root-only file the sweeper reads (tasks/cloud/on_instance.py).
{{activity_timer}}

step=app-proxy
# 127.0.0.1:<app port> is pr-preview's proxy, forwarding to the port the app's version publishes
# (tasks/cloud/app_proxy.py): a push starts the new version beside the old and switches it.
{{app_proxy}}

step=docker
if ! command -v docker >/dev/null 2>&1; then
  dnf -y install docker
fi
# Container networks come from container_address_pool, never the VPC's range (read any
# daemon.json a baked or custom AMI brought, keep its other settings; restart a running
# Docker only when the pool changed).
DAEMON_JSON={{docker_daemon_json}}
mkdir -p "$(dirname "$DAEMON_JSON")"
daemon_json=$(python3 -c '
import json, sys
try:
    with open(sys.argv[1]) as f:
        settings = json.load(f)
except FileNotFoundError:
    settings = {}
settings["default-address-pools"] = [{"base": sys.argv[2], "size": 24}]
print(json.dumps(settings, indent=2, sort_keys=True))
' "$DAEMON_JSON" {{container_address_pool}})
if ! printf '%s\n' "$daemon_json" | cmp -s - "$DAEMON_JSON"; then
  daemon_tmp=$(mktemp "$DAEMON_JSON.XXXXXX")
  printf '%s\n' "$daemon_json" > "$daemon_tmp"
  chmod 644 "$daemon_tmp"
  mv -fT "$daemon_tmp" "$DAEMON_JSON"
  if systemctl is-active --quiet docker; then systemctl restart docker; fi
fi
systemctl enable --now docker
usermod -aG docker ec2-user || true
usermod -aG docker ssm-user || true
for _ in $(seq 1 30); do
  if [ -S /var/run/docker.sock ]; then break; fi
  sleep 1
done

step=compose
if ! docker compose version >/dev/null 2>&1; then
  # AL2023 has no docker-compose-plugin package: place the Compose v2 release binary (runbook §3).
  dnf -y install docker-compose-plugin 2>/dev/null || {
    mkdir -p /usr/local/lib/docker/cli-plugins
    arch=$(uname -m)
    curl -fsSL -o /usr/local/lib/docker/cli-plugins/docker-compose \
      {{compose_url}}"$arch"
    chmod +x /usr/local/lib/docker/cli-plugins/docker-compose
  }
fi
docker compose version

step=secrets
param() {
  aws ssm get-parameter --region {{region}} --with-decryption --name "$1" \
    --query Parameter.Value --output text
}
umask 077
# Assigned on their own line: inside another command a failed read would go unnoticed.
{{registry_token}}{{database_env}}
chmod 600 "$APP_DIR/app.env"
cd "$APP_DIR"
# The app's settings (not secret) and its secrets from Parameter Store (tasks/app/app_env.py).
{{preview_env}}
{{read_secrets}}

step=compose-file
# shellcheck disable=SC2016 # ${APP_IMAGE} in the compose file is compose's to expand, from .env
printf '%s\n' {{compose_file}} | put "$APP_DIR/docker-compose.yml"
printf '%s\n' {{app_image_line}} {{host_port_line}} | put "$APP_DIR/.env"{{spare_stop}}

{{login_and_pull}}

step=up
compose up -d
{{migrate_on_boot}}touch "$STATE_DIR/bootstrap-done"
echo "pr-preview bootstrap done"
