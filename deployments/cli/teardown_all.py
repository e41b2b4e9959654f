"""``pr-preview teardown-all --stack NAME``: everything pr-preview made outside the stack, gone,
so that the stack deletes cleanly.

    1. terminate every instance tagged ``Purpose=<purpose_tag>`` (previews, warm spares, bake
       builders) and wait until they are terminated: the stack's security group and instance
       profile are in use until then;
    2. revoke the db-sg's temporary /32 rules (runbook §2.5) no preview uses any more;
    3. deregister the baked images (``Purpose`` tagged, this account's) and delete their
       snapshots;
    4. delete the SecureStrings ``pr-preview setup`` stored for this stack (tagged
       ``pr-preview:stack=<NAME>``): the stack's key that encrypts them goes with the stack;
    5. with ``--delete-stack``, delete the stack and wait for it.

Nothing without our tags is touched. The Prefect side (the Variable, the work pool, the
deployments) is left: ``pr-preview setup`` would make it again; the README says how to remove it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from deployments.cli.cleanup import _confirm
from deployments.cli.common import EXIT_WRONG, CliError, _clients, _config
from deployments.cli.setup import STACK_TAG
from deployments.cli.stack import cloudformation, read_outputs

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient


def stack_parameters(ssm: SSMClient, stack: str) -> list[str]:
    """The parameters setup stored for ``stack``, by their tag."""
    paginator = ssm.get_paginator("describe_parameters")
    pages = paginator.paginate(
        ParameterFilters=[{"Key": f"tag:{STACK_TAG}", "Option": "Equals", "Values": [stack]}]
    )
    return sorted(p["Name"] for page in pages for p in page["Parameters"])


def cmd_teardown_all(args: argparse.Namespace) -> int:
    from tasks.cloud.aws import wait_timed
    from tasks.cloud.instances import find_previews, terminate_in_batches
    from tasks.cloud.run_instances import baked_images
    from tasks.steps.bake import Pruned, delete_baked_image
    from tasks.steps.sweep import revoke_leftover_db_rules

    settings = _config(args)
    cfn = cloudformation(settings.region)
    read_outputs(cfn, args.stack)  # the stack exists, or a clear error before anything goes
    clients = _clients(settings)
    instances = [p.instance_id for p in find_previews(clients.ec2, settings.purpose_tag)]
    images = baked_images(clients.ec2, settings, states=("available", "pending", "failed"))
    parameters = stack_parameters(clients.ssm, args.stack)
    print(f"Stack {args.stack} in {settings.region} (Purpose={settings.purpose_tag}):")
    print(f"  instances to terminate: {', '.join(instances) or 'none'}")
    print(f"  baked images to deregister: {', '.join(i['ImageId'] for i in images) or 'none'}")
    print(f"  parameters to delete: {', '.join(parameters) or 'none'}")
    if args.delete_stack:
        print(f"  then the stack {args.stack}")
    if args.dry_run:
        print("Dry run: nothing was changed.")
        return 0
    if not args.yes and not _confirm("Remove all of it?"):
        print("Nothing was removed.")
        return EXIT_WRONG

    # 1. Every instance, and wait: the security group and the profile are in use until then.
    if instances:
        result = terminate_in_batches(clients.ec2, instances)
        if result.failed:
            first = next(iter(result.failed.values()))
            raise CliError(f"{len(result.failed)} instances were not terminated ({first}): rerun")
        wait_timed(
            clients.ec2.get_waiter("instance_terminated"),
            timeout_seconds=600,
            poll_seconds=settings.poll_seconds,
            InstanceIds=instances,
        )
        print(f"terminated {len(instances)} instance(s)")
    # 2. The db-sg's /32 rules: no preview is live any more.
    for rule in revoke_leftover_db_rules(clients.ec2, settings, []):
        print(f"revoked db-sg rule {rule.cidr}")
    # 3. Baked images and their snapshots.
    pruned = Pruned()
    for image in images:
        delete_baked_image(clients.ec2, image, pruned)
    if pruned.failed:
        raise CliError(f"baked images not removed: {pruned.failed}: rerun")
    for image_id in pruned.images:
        print(f"deregistered {image_id}")
    # 4. The secrets setup stored.
    for name in parameters:
        clients.ssm.delete_parameter(Name=name)
        print(f"deleted parameter {name}")
    # 5. The stack.
    if args.delete_stack:
        cfn.delete_stack(StackName=args.stack)
        wait_timed(
            cfn.get_waiter("stack_delete_complete"),
            timeout_seconds=1800,
            poll_seconds=max(settings.poll_seconds, 0.01),
            StackName=args.stack,
        )
        print(f"deleted stack {args.stack}")
    else:
        print(f"Now: aws cloudformation delete-stack --stack-name {args.stack}")
    return 0
