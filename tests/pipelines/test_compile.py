"""Compile checks: task names, the GPU request on train, and the dsl.If gates."""

import pytest
import yaml

from stratarec.pipelines.retrain import RETRAIN_GATE
from stratarec.pipelines.runners import compile_pipelines
from stratarec.pipelines.training import GATE_NAME, TASK_NAMES

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    paths = compile_pipelines(out)
    return {p.stem: list(yaml.safe_load_all(p.read_text())) for p in paths}


def _spec(docs):
    return docs[0]


def test_training_pipeline_tasks(compiled):
    spec = _spec(compiled["training_pipeline"])
    tasks = spec["root"]["dag"]["tasks"]
    names = set(tasks)
    gate = next(n for n in names if n.startswith("condition"))
    inner = set(spec["components"][tasks[gate]["componentRef"]["name"]]["dag"]["tasks"])
    assert (names | inner) - {gate} == set(TASK_NAMES)
    assert "package-model" in inner  # packaging only happens inside the gate


def test_gate_condition_reads_promote(compiled):
    spec = _spec(compiled["training_pipeline"])
    tasks = spec["root"]["dag"]["tasks"]
    gate = next(t for n, t in tasks.items() if n.startswith("condition"))
    assert gate["taskInfo"]["name"] == GATE_NAME
    cond = gate["triggerPolicy"]["condition"]
    assert "promote" in cond and "true" in cond.lower()
    assert "evaluate-candidate" in gate["dependentTasks"]


def test_train_requests_one_gpu_and_resources(compiled):
    spec = _spec(compiled["training_pipeline"])
    ex = spec["deploymentSpec"]["executors"]["exec-train-recommender"]["container"]
    res = ex["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert str(res["accelerator"]["resourceCount"]) == "1"
    assert res["resourceCpuLimit"] == "8" and res["resourceMemoryLimit"] == "32G"
    assert "cuda" in ex["image"]
    others = [k for k in spec["deploymentSpec"]["executors"] if k != "exec-train-recommender"]
    for k in others:
        assert "accelerator" not in spec["deploymentSpec"]["executors"][k]["container"].get("resources", {})


def test_components_do_not_pip_install_at_runtime(compiled):
    spec = _spec(compiled["training_pipeline"])
    for name, ex in spec["deploymentSpec"]["executors"].items():
        cmd = " ".join(ex["container"]["command"])
        assert "pip install" not in cmd, name


def test_pipeline_parameters_are_only_the_config(compiled):
    spec = _spec(compiled["training_pipeline"])
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"config_json"}
    assert "defaultValue" not in params["config_json"]  # nothing from the environment frozen in


def test_retrain_pipeline_nests_training_under_drift_gate(compiled):
    spec = _spec(compiled["retrain_on_drift_pipeline"])
    tasks = spec["root"]["dag"]["tasks"]
    gate = next(t for n, t in tasks.items() if n.startswith("condition"))
    assert gate["taskInfo"]["name"] == RETRAIN_GATE
    assert "drift_detected" in gate["triggerPolicy"]["condition"]
    inner = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert any("training" in n for n in inner)
