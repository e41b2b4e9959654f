"""The steps of a preview and what they stand on. Where a new thing goes:

``steps/`` — one ``@step`` module per step, in the runbook's order (docs/runbook.md). A step
module holds its step and what only it needs; it imports foundations and never another step.
Flows compose steps.

    preflight      §2.3   the account can host a preview
    guards                closed, unlabelled and fork pull requests, a fork's approval
    check_image    §2.1   CI's image is in the registry; its manifest digest
    compose               the repository's compose file, read by Compose and judged
    terminate      §2.4   the PR's previous instances, room for a new one
    launch         §2.4   one tagged, TTL-bound instance per pull request and sha
    spares                warm spares, claimed instead of a launch
    update                a push deployed in place
    wait_ready     §2.6   agent, bootstrap, app port, in that order
    migrate        §2.4   migrations in a one-off container of the app image
    probe          §2.6   the app answers, from inside the instance
    report         §2.7   what the pull request sees: the comment, deployment, check run
    diagnose       §7     why it failed, in the failure table's words
    teardown       §2.8   one pull request's previews gone
    command               a /preview command: who may give it, its reaction, stop/start/extend,
                          a fork's commit approved
    pin                   the keep label: a preview pinned, its expiry kept ahead
    sweep          §9     expired previews gone; the warning before a preview expires
    bake                  the baked AMI
    db_access      §2.5   the optional database path
    database              a database of each preview's own: made, handed over, dropped, swept
    dns            §11    a preview's name in the VPC: published, removed, swept

Foundations — plain code the steps share; no ``@step`` in them, and they import no step. They
stand in layers, each importing only those above it (``tests/test_layout.py``):

    run/     step (``@step``), retry, budget, outcome, prefect_context, events,
             errors (``PreviewError``), tls, locks, approvals (a fork's approved commit)
    cloud/   AWS: aws (clients, waiters on our timing), instances, tags, run_instances (the
             request, the AMI), ssm (Run Command), ecr, on_instance (marker files, scripts, the
             app probe's command and answer), expiry (``shutdown-at`` and the on-instance
             timer, moved together), dns (a preview's Route 53 record), db_rules (db-sg rules
             opened for previews),
             databases (a preview database's name, URL and the database host's scripts),
             tunnel (SSM port forwarding)
    app/     the previewed app on its instance: app_env, user_data (the bootstrap script, a
             preview's tags, ``LaunchSpec``), compose_policy, secrets, masking, cost
    github/  client (``GitHub``: the REST resources, errors re-exported), http (transport:
             retry, pagination), sansio (responses to errors, rate-limit waits), app (the App's
             JWT and tokens), pull_request (the sticky comment, the PR's deployment),
             commands (the strict grammar of /preview comments)

    config   ``PreviewConfig``, what a run may tune          inputs   patterns

A new AWS call goes in a cloud module and a step calls it; a new check of the instance is a
script in cloud/on_instance; a new setting is a field of config with its group and description.
What calls more than one step, or asks Prefect about other runs, is flow code: flows/run_end
reports a killed run from the flows' state hooks through the report step, and flows/coalesce
cancels a PR's waiting runs that GitHub has left behind.
"""
