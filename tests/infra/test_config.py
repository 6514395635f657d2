"""environments.toml validation: every bad input gets one clear message naming env, field, value, allowed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from infra.catalog.environments import DEFAULT_ENVIRONMENTS_FILE, ConfigError, load_environments
from infra.catalog.names import DEFAULT_RISK_TASK_FILE
from runtime.risk_task import RiskTask, load_task

GOOD = """
[environments.dev]
size = "devtest"
region = "us-east-1"
azs = ["us-east-1a", "us-east-1b"]
vpc_cidr = "10.20.0.0/16"
kubernetes_version = "1.33"
state = { kind = "local" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "environments.toml"
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_environments(write(tmp_path, text))
    return str(info.value)


def test_shipped_environments_load() -> None:
    envs = load_environments(DEFAULT_ENVIRONMENTS_FILE)
    assert set(envs) == {"local", "dev", "staging", "prod"}
    assert {e.name: e.size.value for e in envs.values()} == {
        "local": "devtest",
        "dev": "devtest",
        "staging": "medium",
        "prod": "large",
    }
    assert envs["local"].emulated and not envs["prod"].emulated


def test_minimal_environment_gets_defaults(tmp_path: Path) -> None:
    env = load_environments(write(tmp_path, GOOD))["dev"]
    assert env.gpu_instance_type == "g6e.4xlarge"
    assert env.gpu_node_counts == (0, 0, 1)
    public, private = env.subnets()
    assert len(public) == len(private) == 2


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (
            ('size = "devtest"', 'size = "huge"'),
            r"environment 'dev': field 'size' = 'huge': allowed: devtest, medium, large",
        ),
        (
            ('vpc_cidr = "10.20.0.0/16"', 'vpc_cidr = "10.20.0.0/33"'),
            r"field 'vpc_cidr' = '10.20.0.0/33': not a valid IPv4 CIDR",
        ),
        (
            ('vpc_cidr = "10.20.0.0/16"', 'vpc_cidr = "8.8.0.0/16"'),
            r"field 'vpc_cidr' = '8.8.0.0/16': the VPC range must be private",
        ),
        (('region = "us-east-1"', 'region = "moon-1"'), r"field 'region' = 'moon-1': expected an AWS region"),
        (
            ('kubernetes_version = "1.33"', 'kubernetes_version = "1.20"'),
            r"field 'kubernetes_version' = '1.20': allowed: 1.31, 1.32, 1.33, 1.34",
        ),
        (
            ('azs = ["us-east-1a", "us-east-1b"]', 'azs = ["us-east-1a", "eu-west-1b"]'),
            r"'eu-west-1b' is not an availability zone of region 'us-east-1'",
        ),
        (
            ('state = { kind = "local" }', 'state = { kind = "s3" }'),
            r"field 'state': backend kind 's3' needs 'bucket' and 'key'",
        ),
        (
            ('state = { kind = "local" }', 'state = { kind = "local" }\nflavour = "x"'),
            r"field 'flavour' = 'x': unknown key",
        ),
    ],
)
def test_bad_field_is_named(tmp_path: Path, replace: tuple[str, str], expected: str) -> None:
    message = error_for(tmp_path, GOOD.replace(*replace))
    assert re.search(expected, message), message


def test_instance_type_that_fails_the_size_lists_the_reasons_and_alternatives(tmp_path: Path) -> None:
    message = error_for(tmp_path, GOOD + 'overrides = { instance_type = "g5.xlarge" }\n')
    assert "environment 'dev'" in message
    assert "instance type 'g5.xlarge' fails size devtest" in message
    assert "A10G has 24 GB per GPU, size devtest needs ≥ 40 GB" in message
    assert "allowed for devtest: g6e.4xlarge" in message


def test_overlapping_subnets_are_rejected(tmp_path: Path) -> None:
    text = (
        GOOD
        + 'public_subnets = ["10.20.0.0/24", "10.20.1.0/24"]\nprivate_subnets = ["10.20.0.0/20", "10.20.16.0/20"]\n'
    )
    message = error_for(tmp_path, text)
    assert "environment 'dev': subnets 10.20.0.0/24 and 10.20.0.0/20 overlap" in message


def test_subnet_outside_vpc_is_rejected(tmp_path: Path) -> None:
    message = error_for(tmp_path, GOOD + 'private_subnets = ["10.99.0.0/20", "10.20.16.0/20"]\n')
    assert "private_subnets: 10.99.0.0/20 is not inside vpc_cidr 10.20.0.0/16" in message


def test_open_api_and_remote_emulator_are_refused(tmp_path: Path) -> None:
    message = error_for(
        tmp_path,
        GOOD + 'api_access_cidrs = ["0.0.0.0/0"]\npublic_api_endpoint = true\naws_endpoint = "http://10.0.0.5:4566"\n',
    )
    assert "0.0.0.0/0 would open the cluster API to the internet" in message


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = GOOD + GOOD.replace("[environments.dev]", "[environments.prod]").replace('size = "devtest"', 'size = "xl"')
    text = text.replace('region = "us-east-1"', 'region = "nowhere"', 1)
    message = error_for(tmp_path, text)
    assert "2 problem(s)" in message
    assert "environment 'dev'" in message and "environment 'prod'" in message


def test_bad_capacity_reservation_and_node_counts(tmp_path: Path) -> None:
    message = error_for(
        tmp_path,
        GOOD + 'overrides = { capacity_reservation_id = "res-1", gpu_nodes = { min = 3, max = 1 } }\n',
    )
    assert "field 'overrides.capacity_reservation_id' = 'res-1': expected an EC2 capacity reservation id" in message


LARGE = GOOD.replace('size = "devtest"', 'size = "large"')


def test_bad_capacity_block_id_names_the_field(tmp_path: Path) -> None:
    for bad in ("cr-0123", "cr-0123456789ABCDEF0", "cb-0123456789abcdef0", "cr-0123456789abcdef"):
        message = error_for(tmp_path, LARGE + f'overrides = {{ capacity_block_id = "{bad}" }}\n')
        assert f"environment 'dev': field 'overrides.capacity_block_id' = {bad!r}" in message
        assert "^cr-[0-9a-f]{8}([0-9a-f]{9})?$" in message


def test_capacity_block_rules(tmp_path: Path) -> None:
    both = 'overrides = { capacity_block_id = "cr-0123abcd", capacity_reservation_id = "cr-0123456789abcdef0" }\n'
    message = error_for(tmp_path, LARGE + both)
    assert "environment 'dev'" in message and "overrides.capacity_block_id = 'cr-0123abcd'" in message
    assert "cannot be combined with overrides.capacity_reservation_id" in message
    # devtest's g6e.4xlarge: AWS sells no capacity blocks for it
    message = error_for(tmp_path, GOOD + 'overrides = { capacity_block_id = "cr-0123abcd" }\n')
    assert "AWS sells no capacity blocks for g6e.4xlarge" in message and "p5.48xlarge" in message
    message = error_for(tmp_path, GOOD + "overrides = { placement_group = true }\n")
    assert "overrides.placement_group = true: size devtest" in message and "(large)" in message


def test_capacity_block_defaults(tmp_path: Path) -> None:
    block = load_environments(write(tmp_path, LARGE + 'overrides = { capacity_block_id = "cr-0123456789abcdef0" }\n'))
    env = block["dev"]
    assert env.gpu_capacity_block and env.gpu_capacity_reservation_id == "cr-0123456789abcdef0"
    assert not env.gpu_placement_group and env.gpu_pool_single_az
    medium = GOOD.replace('size = "devtest"', 'size = "medium"')
    assert load_environments(write(tmp_path, medium + 'overrides = { capacity_block_id = "cr-0123abcd" }\n'))
    plain = load_environments(write(tmp_path, LARGE))["dev"]
    assert plain.gpu_placement_group and not plain.gpu_capacity_block
    odcr = LARGE + 'overrides = { capacity_reservation_id = "cr-0123abcd" }\n'
    assert not load_environments(write(tmp_path, odcr))["dev"].gpu_placement_group
    forced = LARGE + 'overrides = { capacity_block_id = "cr-0123abcd", placement_group = true }\n'
    assert load_environments(write(tmp_path, forced))["dev"].gpu_placement_group


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid TOML" in error_for(tmp_path, "[environments.dev\n")
    with pytest.raises(ConfigError, match="file not found"):
        load_environments(tmp_path / "nope.toml")
    assert "no [environments.<name>] tables found" in error_for(tmp_path, "")


def test_alert_thresholds_are_overridable_and_checked(tmp_path: Path) -> None:
    envs = load_environments(
        write(tmp_path, GOOD + 'alert_thresholds = { p99_latency_seconds = 0.8, latency_for = "15m" }\n')
    )
    thresholds = envs["dev"].thresholds
    assert thresholds.p99_latency_seconds == 0.8 and thresholds.latency_for == "15m"
    assert thresholds.gpu_utilization_perc == 90.0, "the rest keep the source document's values"
    message = error_for(tmp_path, GOOD + "alert_thresholds = { p99_latency_ms = 800 }\n")
    assert "dev" in message and "alert_thresholds" in message and "p99_latency_ms" in message
    assert "p99_latency_seconds" in message, "the allowed names are listed"


def test_model_defaults_to_the_sizes_model_and_main(tmp_path: Path) -> None:
    env = load_environments(write(tmp_path, GOOD))["dev"]
    assert (env.model.name, env.model.revision) == (env.size_spec.default_model, "main")
    shipped = load_environments(DEFAULT_ENVIRONMENTS_FILE)
    assert (shipped["local"].model.name, shipped["local"].model.revision) == ("tiny-deepseek", "demo")
    assert shipped["staging"].model.name == shipped["staging"].size_spec.default_model


def test_model_setting_is_read_and_checked(tmp_path: Path) -> None:
    good = GOOD + 'model = { name = "deepseek-ai/DeepSeek-V2-Lite", revision = "0123abc" }\n'
    env = load_environments(write(tmp_path, good))["dev"]
    assert (env.model.name, env.model.revision) == ("deepseek-ai/DeepSeek-V2-Lite", "0123abc")
    only_name = load_environments(write(tmp_path, GOOD + 'model = { name = "org/m" }\n'))["dev"]
    assert (only_name.model.name, only_name.model.revision) == ("org/m", "main")

    message = error_for(tmp_path, GOOD + 'model = { name = "../etc/passwd", revision = "has space" }\n')
    assert "environment 'dev': field 'model.name' = '../etc/passwd': expected NAME or ORG/NAME of letters" in message
    assert "environment 'dev': field 'model.revision' = 'has space': expected letters, digits" in message
    assert "2 problem(s)" in message
    assert "field 'model.name' = 'a/b/c'" in error_for(tmp_path, GOOD + 'model = { name = "a/b/c" }\n')
    assert "field 'model.tag' = 'x': unknown key" in error_for(tmp_path, GOOD + 'model = { name = "m", tag = "x" }\n')


def test_runtime_settings_default_and_are_read(tmp_path: Path) -> None:
    from runtime import contract as c

    env = load_environments(write(tmp_path, GOOD))["dev"]
    assert (env.runtime.accuracy_baseline, env.runtime.accuracy_window, env.runtime.log_level) == (
        None,
        c.DEFAULT_ACCURACY_WINDOW,
        c.DEFAULT_LOG_LEVEL,
    )
    assert c.ENV_ACCURACY_BASELINE not in env.runtime.env(), "no baseline unless the environment sets one"
    good = GOOD + 'runtime = { accuracy_baseline = 1, accuracy_window = 200, log_level = "debug" }\n'
    env = load_environments(write(tmp_path, good))["dev"]
    rendered = env.runtime.env()
    assert RiskTask.model_validate_json(rendered.pop(c.ENV_RISK_TASK)) == load_task(str(DEFAULT_RISK_TASK_FILE))
    assert rendered == {c.ENV_ACCURACY_BASELINE: "1.0", c.ENV_ACCURACY_WINDOW: "200", c.ENV_LOG_LEVEL: "debug"}
    assert load_environments(DEFAULT_ENVIRONMENTS_FILE)["local"].runtime.accuracy_baseline == 0.9


def test_risk_task_is_chosen_per_environment(tmp_path: Path) -> None:
    from runtime import contract as c

    task = tmp_path / "fs.json"
    task.write_text(json.dumps({"name": "fs", "threshold": 0.7, "positive_label": " Yes"}))
    env = load_environments(write(tmp_path, GOOD + f'runtime = {{ risk_task = "{task}" }}\n'))["dev"]
    assert json.loads(env.runtime.env()[c.ENV_RISK_TASK])["threshold"] == 0.7
    off = load_environments(write(tmp_path, GOOD + 'runtime = { risk_task = "" }\n'))["dev"]
    assert c.ENV_RISK_TASK not in off.runtime.env()
    task.write_text(json.dumps({"name": "fs", "threshold": 7}))
    message = error_for(tmp_path, GOOD + f'runtime = {{ risk_task = "{task}" }}\n')
    assert f"field 'runtime.risk_task' = '{task}'" in message and "threshold = 7" in message
    missing = error_for(tmp_path, GOOD + 'runtime = { risk_task = "tasks/nope.toml" }\n')
    assert "tasks/nope.toml': file not found" in missing


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("accuracy_baseline = 0", "field 'runtime.accuracy_baseline' = 0: expected a number in (0, 1]"),
        ("accuracy_baseline = 1.5", "field 'runtime.accuracy_baseline' = 1.5: expected a number in (0, 1]"),
        ('accuracy_baseline = "0.9"', "field 'runtime.accuracy_baseline' = '0.9': expected a number in (0, 1]"),
        ("accuracy_window = 0", "field 'runtime.accuracy_window' = 0: expected a whole number"),
        ('log_level = "verbose"', "field 'runtime.log_level' = 'verbose': allowed: debug, info, warning, error"),
        ("log_lvl = 'info'", "field 'runtime.log_lvl' = 'info': unknown key"),
    ],
)
def test_bad_runtime_setting_is_named(tmp_path: Path, setting: str, expected: str) -> None:
    message = error_for(tmp_path, GOOD + f"runtime = {{ {setting} }}\n")
    assert f"environment 'dev': {expected}" in message
