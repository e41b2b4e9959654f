"""A run's machinery: ``@step``, retries, the time budget, locks, events and the run's errors."""
