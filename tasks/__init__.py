"""The steps of a preview and what they stand on. Where a new thing goes:

Steps — one ``@step`` function each, in the runbook's order (docs/runbook.md); a step module
holds its step and what only it needs, and imports no other step's internals:

    preflight      §2.3   the account can host a preview
    guards                closed, unlabelled and fork pull requests
    check_image    §2.1   CI's image is in the registry; its manifest digest
    compose               the repository's compose file, read by Compose and judged
    terminate      §2.4   the PR's previous instances, room for a new one
    launch         §2.4   one tagged, TTL-bound instance per pull request and sha
    spares                warm spares, claimed instead of a launch
    update                a push deployed in place
    wait_ready     §2.6   agent, bootstrap, app port, in that order
    migrate        §2.4   migrations in a one-off container of the app image
    probe          §2.6   the app answers, from inside the instance
    comment, report §2.7  what the pull request sees
    diagnose       §7     why it failed, in the failure table's words
    teardown       §2.8   one pull request's previews gone
    sweep          §9     expired previews gone
    bake                  the baked AMI
    db_access      §2.5   the optional database path
    locks                 one run per pull request

Foundations — plain code the steps share; no ``@step`` here:

    AWS            aws (clients), instances, tags, run_instances (the request, the AMI),
                   ssm (Run Command), ecr, on_instance (marker files, scripts, compose calls)
    GitHub         github (the REST resources), github_http (transport: retry, pagination),
                   github_sansio (responses to errors, rate-limit waits), github_app
    the app        app_env, compose_policy, secrets, masking, cost
    the run        step (``@step``), retry, budget, outcome, run_end, coalesce,
                   prefect_context, events, errors (``PreviewError``), tls
    settings       config (``PreviewConfig``, what a run may tune), inputs (patterns)

A new AWS call goes in a foundation module and a step calls it; a new check of the instance is a
script in on_instance; a new setting is a field of config with its group and description.
"""
