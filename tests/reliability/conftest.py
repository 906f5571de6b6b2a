"""The API key of the reliability tests' Serve application.

It is put in this process's environment when pytest imports this file (during collection,
before the session's Ray instance starts), so Ray's workers inherit it the way a Kubernetes
pod's containers inherit a Secret: in the node's environment, not in any Serve config or
runtime env. (Ray's runtime-env agent logs ``runtime_env.env_vars`` verbatim; a key passed that
way would be in ``runtime_env_agent.log``.)
"""

from __future__ import annotations

import os
import secrets

KEY_ENV = "TASKRAY_RELIABILITY_KEY"
# Fresh per run, so any hit in the logs is this run's.
os.environ.setdefault(KEY_ENV, "rel-" + secrets.token_hex(16))
