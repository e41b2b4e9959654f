"""A test's configuration as a deployment's runs get it: the trusted fields in the environment.

A run's ``config`` parameter may only tune (``tasks.config.run_config``); an operator puts
``allowed_repos``, ``image``, the subnet and the rest of ``TRUSTED_FIELDS`` in the Prefect Variable
or in ``PR_PREVIEW_*`` variables. :class:`DeployedConfig` does the latter for a test: passed as
``config=`` to a flow it counts only its tuning fields as set, and every trusted value, including
one a test assigns later (the operator changing the Variable), is in the test's environment.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import PrivateAttr

from tasks.config import TRUSTED_FIELDS, PreviewConfig, as_environment


class DeployedConfig(PreviewConfig):
    _environment: pytest.MonkeyPatch | None = PrivateAttr(None)

    @classmethod
    def of(cls, config: PreviewConfig) -> DeployedConfig:
        """``config``'s values, with the fields it set minus the trusted ones."""
        return cls.model_construct(
            _fields_set=set(config.model_fields_set) - set(TRUSTED_FIELDS), **config.model_dump()
        )

    def deploy(self, environment: pytest.MonkeyPatch) -> DeployedConfig:
        """Put every trusted value into ``environment`` (a test's monkeypatch: undone after it)."""
        self._environment = environment
        for name in TRUSTED_FIELDS:
            self._export(name)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in TRUSTED_FIELDS:
            self._export(name)

    def _export(self, name: str) -> None:
        self.model_fields_set.discard(name)
        if self._environment is not None:
            for variable, text in as_environment({name: getattr(self, name)}).items():
                self._environment.setenv(variable, text)
