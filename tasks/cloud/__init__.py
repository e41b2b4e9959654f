"""AWS plumbing the steps share: clients, tags, instances, Run Command, the user data."""
