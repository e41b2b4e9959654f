# The flow image for ECS and Kubernetes work pools (deployments/pools): Prefect at the version
# the project pins, the flows' code and their dependencies, run as an unprivileged user. No
# secret is built in: runs read them at run time (Parameter Store, Prefect blocks).
#   docker build -t <registry>/pr-preview-flows:<tag> .     (make image)
FROM prefecthq/prefect:3.9.1-python3.11

WORKDIR /opt/pr-preview
COPY pyproject.toml README.md prefect.yaml ./
COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin flows

ENV PYTHONUNBUFFERED=1 DO_NOT_TRACK=1
USER 10001
