"""hello-api: the sample app a pull request's preview runs."""
