"""``python -m deployments.aws``: the stack's template on stdout; ``--check``: is
deployments/aws/pr-preview.yaml the one deployments/iam/*.json make (exit 1 if not)."""

from __future__ import annotations

import argparse
import sys

from deployments.aws import TEMPLATE, is_current, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.aws", description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        if is_current():
            print(f"{TEMPLATE.name}: current")
            return 0
        print(
            f"{TEMPLATE} is not what deployments/iam/*.json make:"
            f" python -m deployments.aws > {TEMPLATE}",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
