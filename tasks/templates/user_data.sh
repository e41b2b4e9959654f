#!/bin/bash
# pr-preview bootstrap: {{repo}}#{{pr_number}} at {{sha}} (runbook §3).
# No secret is written here: the GHCR token and DATABASE_URL are read from Parameter Store at
# boot with the instance profile, and only ever land in root-only files.
set -euo pipefail
STATE_DIR=/var/lib/pr-preview
APP_DIR={{app_dir}}
mkdir -p "$STATE_DIR" "$APP_DIR"
rm -f "$STATE_DIR/bootstrap-done" "$STATE_DIR/bootstrap-failed"
step=start
trap 'echo "$step" > "$STATE_DIR/bootstrap-failed"; echo "pr-preview bootstrap failed at step: $step" >&2' ERR

step=shutdown-timer
# Second line of defence behind the shutdown-at tag: power off (= terminate) when the TTL ends.
shutdown -h +{{ttl_minutes}} "pr-preview TTL reached" || true

step=docker
if ! command -v docker >/dev/null 2>&1; then
  dnf -y install docker
fi
systemctl enable --now docker
usermod -aG docker ec2-user || true
usermod -aG docker ssm-user || true
for _ in $(seq 1 30); do [ -S /var/run/docker.sock ] && break || sleep 1; done

step=compose
if ! docker compose version >/dev/null 2>&1; then
  # AL2023 has no docker-compose-plugin package: place the Compose v2 release binary (runbook §3).
  dnf -y install docker-compose-plugin 2>/dev/null || {
    mkdir -p /usr/local/lib/docker/cli-plugins
    curl -fsSL -o /usr/local/lib/docker/cli-plugins/docker-compose \
      "https://github.com/docker/compose/releases/download/{{compose_version}}/docker-compose-linux-$(uname -m)"
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
GHCR_TOKEN="$(param {{ghcr_token_parameter}})"
{{database_env}}
chmod 600 "$APP_DIR/app.env"

step=compose-file
cat > "$APP_DIR/docker-compose.yml" <<'YAML'
{{compose_file}}
YAML
echo "APP_IMAGE={{image}}:{{sha}}" > "$APP_DIR/.env"

step=ghcr-login
echo "$GHCR_TOKEN" | docker login {{registry}} -u {{registry_username}} --password-stdin

step=pull
cd "$APP_DIR"
if ! docker compose pull {{app_service}}; then
  # The image cannot be pulled: build it from the GitHub tarball of this sha (runbook §3).
  step=tarball-build
  mkdir -p "$APP_DIR/build"
  curl -fsSL -H "Authorization: Bearer $GHCR_TOKEN" \
    "https://api.github.com/repos/{{repo}}/tarball/{{sha}}" \
    | tar -xz --strip-components=1 -C "$APP_DIR/build"
  docker build -t "{{image}}:{{sha}}" "$APP_DIR/build"
fi
unset GHCR_TOKEN

step=up
docker compose up -d
touch "$STATE_DIR/bootstrap-done"
echo "pr-preview bootstrap done"
