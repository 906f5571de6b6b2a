"""Errors shared by the ``taskray`` CLI and the command modules it registers.

Below ``cluster.cli`` and ``cluster.jobs`` / ``cluster.k8s`` / ``cluster.retrieval_cli``, so the
command modules raise it without importing the CLI that imports them. ``cluster.cli.UserError``
is this same class (``cluster.cli.main`` catches it).
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""
