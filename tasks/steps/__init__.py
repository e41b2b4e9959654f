"""The runbook's steps, one ``@step`` module each: a step imports foundations, never a step."""
