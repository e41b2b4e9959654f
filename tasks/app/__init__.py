"""The previewed app: its environment and secrets, its compose policy, masking, its cost."""
