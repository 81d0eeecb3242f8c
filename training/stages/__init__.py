"""Stages built on training/ and training/infra/: each plans what to run, runs it on Ray, reports and hands off a typed file."""
