"""The example serve configs are valid Ray Serve config files with valid taskray args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.config import AppArgs, SchedulerArgs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("serve*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_serve_config_validates(path):
    from ray.serve.schema import ServeDeploySchema

    text = path.read_text()
    assert text.startswith("# taskray serve "), "every example YAML starts with its command"
    data = yaml.safe_load(text)
    ServeDeploySchema.model_validate(data)
    for app in data["applications"]:
        args = AppArgs.model_validate(app["args"])
        generators = {f"generator-{m.name}" for m in args.models}
        for deployment in app.get("deployments", []):
            name = deployment["name"]
            if name.startswith("generator-"):
                assert name in generators, f"{name} names no served model"
                # a hot scheduler change must be one the replica's reconfigure accepts
                hot = (deployment.get("user_config") or {}).get("scheduler")
                if hot is not None:
                    SchedulerArgs.model_validate(hot)


def test_bad_args_name_what_is_wrong():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="used twice"):
        AppArgs.model_validate(
            {"models": [{"name": "a", "bundle": "x"}, {"name": "b", "bundle": "y",
                                                         "adapters": {"a": "z"}}]}
        )  # fmt: skip
    with pytest.raises(ValidationError, match="no served model named 'ghost'"):
        AppArgs.model_validate(
            {"models": [{"name": "a", "bundle": "x"}],
             "retrieval": {"rag": {"generator": "ghost"}}}
        )  # fmt: skip
    with pytest.raises(ValidationError, match="max_queud"):
        AppArgs.model_validate({"models": [{"name": "a", "bundle": "x",
                                            "scheduler": {"max_queud": 3}}]})  # fmt: skip
    with pytest.raises(ValidationError, match="adapter name"):
        AppArgs.model_validate({"models": [{"name": "a", "bundle": "x",
                                            "adapters": {"../etc": "y"}}]})  # fmt: skip
