"""GitHub: the REST client and its transport, the App's credentials, what the pull request shows."""
