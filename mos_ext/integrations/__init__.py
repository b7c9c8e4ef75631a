"""Integrations with other projects, one module per project; each range-checks its versions."""
