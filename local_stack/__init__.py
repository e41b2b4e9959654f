"""The local stack: what make demo, the tests and the benchmarks run on. Not shipped.

moto with the runbook's account, a local Prefect server, the scripted instance, a fake OCI
registry and the demo itself. Product packages (flows, tasks, deployments) never import it.
"""
