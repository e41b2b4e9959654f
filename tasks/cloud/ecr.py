"""Amazon ECR as the registry: an image under ``<account>.dkr.ecr.<region>.amazonaws.com/…``.

The build-image check asks ECR's API (``ecr:DescribeImages`` on the repository,
``tasks.steps.check_image.EcrRegistry``) instead of the OCI token dance, with the flows' own AWS
credentials; the instance logs in with its role
(``aws ecr get-login-password | docker login --password-stdin``), so no token parameter exists.
The password travels only through the pipe: never on a command line, in a file or in a log.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.config import ECR_REGISTRY_PATTERN

if TYPE_CHECKING:
    from tasks.config import PreviewConfig

ECR_USERNAME = "AWS"  # what ECR's login password belongs to


@dataclass(frozen=True)
class EcrRepository:
    """``123456789012.dkr.ecr.ap-northeast-1.amazonaws.com/octo-org/app`` split into parts."""

    account: str
    region: str
    name: str

    @classmethod
    def parse(cls, image: str) -> EcrRepository | None:
        """The ECR repository ``image`` names, or None for any other registry."""
        host, _, name = image.partition("/")
        found = ECR_REGISTRY_PATTERN.fullmatch(host)
        if found is None or not name:
            return None
        return cls(found.group("account"), found.group("region"), name)

    @property
    def host(self) -> str:
        return f"{self.account}.dkr.ecr.{self.region}.amazonaws.com"

    @property
    def arn(self) -> str:
        """What the IAM policies scope the check and the pull to."""
        return f"arn:aws:ecr:{self.region}:{self.account}:repository/{self.name}"

    def __str__(self) -> str:
        return f"{self.host}/{self.name}"


def ecr_repository(settings: PreviewConfig, repo: str = "") -> EcrRepository | None:
    """The ECR repository ``repo``'s previews pull from, or None when their registry is not
    ECR (an ECR image is always the configured ``image``: the default is on GHCR)."""
    return EcrRepository.parse(settings.image_for(repo))


def ecr_login(repository: EcrRepository) -> str:
    """The instance's login, under its role: the password goes from the AWS CLI into docker's
    stdin and nowhere else (ECR passwords last 12 hours; every boot and push logs in anew)."""
    q = shlex.quote
    return (
        f"aws ecr get-login-password --region {q(repository.region)}"
        f" | docker login --username {ECR_USERNAME} --password-stdin {q(repository.host)}"
    )
