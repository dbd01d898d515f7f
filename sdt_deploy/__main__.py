"""`python -m sdt_deploy ...` (also what `torchrun -m sdt_deploy verify ...` starts on every rank)."""
from sdt_deploy.cli.app import entry

entry()
