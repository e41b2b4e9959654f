#!/bin/bash
# pr-preview bake (tasks/steps/bake.py): the stock AMI plus Docker, Compose and the current image's
# layers, made into an AMI once this builder has forgotten every secret and per-instance trace.
# No secret is written here: the GHCR token is read from Parameter Store at boot with the
# instance profile, used for one login and removed with it (an ECR image needs none: the
# instance role logs in). Every value rendered into this script is shell-quoted by tasks/steps/bake.py.
set -euo pipefail
BAKE_DIR={{bake_dir}}
APP_DIR={{app_dir}}
PULL_DIR={{pull_dir}}
mkdir -p "$BAKE_DIR"
rm -f "$BAKE_DIR/failed"
step=start

# forget_secrets: what a login (and a preview's bootstrap) leaves on disk; an image keeps none.
forget_secrets() {
  rm -f /root/.docker/config.json "$APP_DIR/app.env" "$APP_DIR/db.env" "$APP_DIR/.env"
  rm -rf "$PULL_DIR"
}

# fail [why]: mark the bake failed at $step (what the flow's check reads), forget, stop.
fail() {
  echo "$step" > "$BAKE_DIR/failed"
  echo "pr-preview bake failed at step: $step${1:+ ($1)}" >&2
  forget_secrets || true
  exit 1
}
trap 'fail "exit status $?"' ERR

step=shutdown-timer
# Second line of defence behind the shutdown-at tag (a builder powers off to stop, not terminate:
# the sweeper terminates it by the tag).
{{shutdown_timer}} || true

# Docker and Compose exactly as a preview installs them (the lines of user_data.sh).
{{install_docker_and_compose}}

step=secrets
param() {
  aws ssm get-parameter --region {{region}} --with-decryption --name "$1" \
    --query Parameter.Value --output text
}
umask 077
{{registry_login}}

step=pull
# The current image (and the ephemeral database's): a preview then pulls only its own layers.
mkdir -p "$PULL_DIR"
printf '%s\n' {{pull_compose_file}} > "$PULL_DIR/docker-compose.yml"
docker compose -f "$PULL_DIR/docker-compose.yml" pull

step=forget-secrets
forget_secrets
if [ -e /root/.docker/config.json ]; then fail "the registry login is still on disk"; fi

# seal: once cloud-init has written its last state, remove every per-instance trace and power
# off. The builder runs with InstanceInitiatedShutdownBehavior=stop, and the flow images it only
# once it is stopped: nothing runs on the disk after this.
seal() {
  trap 'fail "exit status $?"' ERR
  step=seal-wait-cloud-init
  waited=0
  cloud-init status --wait >/dev/null || waited=$?
  # 2 is "done, with recoverable errors" (cloud-init 23.4+); 1 is a module that failed.
  if [ "$waited" -ne 0 ] && [ "$waited" -ne 2 ]; then fail "cloud-init ended in error"; fi

  step=seal-identity
  if [ -w /etc ]; then
    # Empty, not absent: systemd writes a new one at the image's first boot.
    : > /etc/machine-id
    rm -f /etc/ssh/ssh_host_*
  else
    echo "pr-preview bake: /etc is read-only here: machine-id and SSH host keys left as they are"
  fi

  step=seal-cloud-init
  # What `cloud-init clean --logs` removes: its state (all but the seed) and its logs.
  if [ -d /var/lib/cloud ]; then
    find /var/lib/cloud -mindepth 1 -maxdepth 1 ! -name seed -exec rm -rf {} +
  fi
  rm -f /var/log/cloud-init.log /var/log/cloud-init-output.log

  step=seal-ssm-agent
  if systemctl is-active --quiet amazon-ssm-agent 2>/dev/null; then
    systemctl stop amazon-ssm-agent
  fi
  # Its registration, vault and every command's files: an instance of the image registers anew.
  rm -rf /var/lib/amazon/ssm /var/log/amazon/ssm

  step=seal-logs
  rm -rf /var/log/journal/*
  find /var/log -type f \( -name '*.gz' -o -name '*.old' -o -name '*.[0-9]' \) -delete
  find /var/log -type f -exec truncate -s 0 {} +

  step=seal-history
  for history in /root/.bash_history /home/*/.bash_history; do
    if [ ! -e "$history" ]; then continue; fi
    if [ -w "${history%/*}" ]; then
      rm -f "$history"
    else
      echo "pr-preview bake: ${history%/*} is read-only here: $history left as it is"
    fi
  done

  step=poweroff
  echo "pr-preview bake: sealed, powering off"
  shutdown -h now
}

step=seal
# In a process of its own: cloud-init writes its last state after this script has ended.
seal </dev/null >"$BAKE_DIR/seal.log" 2>&1 &
echo "pr-preview bake: installed and pulled; sealing once cloud-init has finished"
