"""scripts/ascend/ (issue #29): every msrun launcher, for 1 node x 8 NPUs and 2 nodes x 8, prints (DRY_RUN=1) an msrun
command with the right topology whose tool arguments the tool's own parser accepts; bad topologies are refused."""

import os
import shlex
import subprocess

import pytest
from conftest import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts", "ascend")
# script -> (tool, extra environment, extra arguments)
CASES = {
    "selfcheck.sh": ("tools/selfcheck.py", {}, ["--dtypes", "bf16"]),
    "infer.sh": ("tools/sample.py", {"MODEL": "models/pipe", "PROMPTS": "prompts.txt"}, ["--resolution", "1024x1024"]),
    "extract.sh": ("tools/extract_features.py", {}, ["--data", "d", "--text-encoder", "g", "--output", "s"]),
    "train.sh": ("tools/train.py", {}, ["--init", "ckpt.safetensors"]),
    "train_lora.sh": ("tools/train.py", {}, ["--export", "runs/lora/adapter"]),
}


def _dry_run(script: str, env: dict, args=()):
    full = {**os.environ, "DRY_RUN": "1", **env}
    return subprocess.run(["bash", os.path.join(SCRIPTS, script), *args], env=full, capture_output=True, text=True)


def _tool_parser(tool: str):
    return load_tool(os.path.basename(tool)[: -len(".py")]).parser()


@pytest.mark.parametrize("nodes, node_rank", [(1, 0), (2, 1)])
@pytest.mark.parametrize("script", sorted(CASES))
def test_launcher_builds_an_msrun_command_the_tool_accepts(script, nodes, node_rank):
    tool, env, args = CASES[script]
    topology = {"NNODES": str(nodes), "NODE_RANK": str(node_rank), "MASTER_ADDR": "10.0.0.1" if nodes > 1 else ""}
    done = _dry_run(script, {**env, **{k: v for k, v in topology.items() if v}}, args)
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout)
    assert argv[0] == "msrun"
    python = argv.index("python")
    flags = dict(a[2:].split("=", 1) for a in argv[1:python])
    assert flags["worker_num"] == str(8 * nodes) and flags["local_worker_num"] == "8"
    assert flags["node_rank"] == str(node_rank) and flags["join"] == "True"
    assert flags["master_addr"] == ("10.0.0.1" if nodes > 1 else "127.0.0.1")
    assert argv[python + 1] == os.path.join(ROOT, tool)
    parsed = _tool_parser(tool).parse_args(argv[python + 2 :])
    assert parsed.device == "Ascend"
    if tool == "tools/train.py":
        assert os.path.isfile(parsed.config), parsed.config
    for a in args:  # the caller's arguments reach the tool
        assert a in argv[python + 2 :]


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2"}, "needs MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "NODE_RANK": "2"}, "NODE_RANK=2 must be below NNODES=2"),
])  # fmt: skip
def test_bad_topology_is_refused(env, message):
    done = _dry_run("train.sh", env)
    assert done.returncode == 2 and message in done.stderr and not done.stdout


def test_inference_needs_a_model_and_prompts():
    done = _dry_run("infer.sh", {"PROMPTS": "p.txt"})
    assert done.returncode != 0 and "set MODEL" in done.stderr and not done.stdout
