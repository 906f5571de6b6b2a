"""Ray Serve deployments, the HTTP ingress, the serve config and the Python client.

Importing this package does not import Ray, so ``from serve.client import Client`` works in
any environment with ``httpx`` and ``pydantic``.
"""
