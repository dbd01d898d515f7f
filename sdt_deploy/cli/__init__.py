"""The `sdt-deploy` command line."""
from sdt_deploy.cli.app import entry, main

__all__ = ["entry", "main"]
