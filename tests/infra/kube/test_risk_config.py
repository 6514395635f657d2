"""The risk service's settings in the rendered pods: the environment's task as JSON the runtime reads with
its own model, the stack's prediction table, the model revision; a task turned off reaches no pod."""

from __future__ import annotations

import pytest

from infra.catalog.environments import RuntimeSettings
from infra.catalog.names import DEFAULT_RISK_TASK_FILE
from infra.kube.render import render
from runtime import contract as c
from runtime.risk_task import RiskTask, load_task
from tests.infra.kube.inputs import make_input
from tests.infra.kube.test_render import _runtime_env


@pytest.mark.parametrize("env", ["local", "dev", "prod"])  # Deployment and LeaderWorkerSet
def test_task_table_and_revision_reach_every_runtime_container(inputs, env):
    inp = inputs[env]
    for pod_env in _runtime_env(render(inp)):
        assert RiskTask.model_validate_json(pod_env[c.ENV_RISK_TASK]) == load_task(str(DEFAULT_RISK_TASK_FILE))
        assert pod_env[c.ENV_RISK_STORE_TABLE] == inp.outputs.prediction_table == f"moefleet-{env}-risk-predictions"
        assert pod_env[c.ENV_MODEL_REVISION] == inp.model.revision
        assert pod_env[c.ENV_AWS_REGION] == inp.outputs.region


def test_no_task_reaches_no_pod(environments):
    off = make_input(environments["dev"].model_copy(update={"runtime": RuntimeSettings(risk_task="")}))
    for pod_env in _runtime_env(render(off)):
        assert c.ENV_RISK_TASK not in pod_env
