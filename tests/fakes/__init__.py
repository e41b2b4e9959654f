"""Fakes that behave like the services pr-preview talks to."""
