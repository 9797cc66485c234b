"""Shipped defaults (`defaults.toml`), installed as the package ``rinna_cli.defaults``."""
