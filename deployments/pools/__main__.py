"""``python -m deployments.pools KIND``: prefect.yaml for that work pool, on stdout
(``--from-stack NAME``: the ECS values read from the CloudFormation stack's outputs);
``--check``: each variant's job_variables against the workers' base job templates;
``--process-template``: the process pool's base job template (JSON), for
``prefect work-pool create pr-preview --type process --base-job-template FILE``."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from deployments.cli.common import CliError
from deployments.cli.stack import cloudformation, read_outputs, stack_name, stack_region
from deployments.pools import (
    KINDS,
    problems,
    process_base_job_template,
    render,
    values_from_stack,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.pools", description=__doc__)
    parser.add_argument("kind", nargs="?", choices=KINDS)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--process-template", action="store_true")
    parser.add_argument(
        "--from-stack",
        metavar="NAME",
        type=stack_name,
        help="fill the ECS values from this deployments/aws stack (deployed with WorkPool=ecs)",
    )
    parser.add_argument("--region", help="the stack's region (default: the AWS environment's)")
    args = parser.parse_args(argv)
    if args.process_template:
        sys.stdout.write(json.dumps(process_base_job_template(), indent=2) + "\n")
        return 0
    if args.check:
        found = {kind: problems(kind) for kind in KINDS}
        for kind, messages in found.items():
            print(f"{kind}: {'ok' if not messages else '; '.join(messages)}")
        return 1 if any(found.values()) else 0
    if args.kind is None:
        parser.error("name a work pool type, or --check")
    values = None
    if args.from_stack:
        try:
            cfn = cloudformation(stack_region(args.region))
            outputs = read_outputs(cfn, args.from_stack)
            values = values_from_stack(args.kind, args.from_stack, outputs)
        except (CliError, ValueError) as exc:
            print(f"python -m deployments.pools: {exc}", file=sys.stderr)
            return 2
    header = (
        f"# prefect.yaml for the {args.kind} work pool: python -m deployments.pools {args.kind}\n"
    )
    sys.stdout.write(header + yaml.safe_dump(render(args.kind, values=values), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
